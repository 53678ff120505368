package maps_test

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

// BenchmarkPutBatch1M: time to load a million SAs (one op = one million).
func BenchmarkPutBatch1M(b *testing.B) {
	netns.RequireRoot(b)
	const n = 1_000_000
	spis := make([]uint32, n)
	sas := make([]bpf.SASteer, n)
	for i := range spis {
		spis[i] = uint32(0x100 + i)
		sas[i] = bpf.SASteer{SaIndex: uint32(i)}
	}
	for b.Loop() {
		b.StopTimer()
		in, err := loader.Load(loader.Options{Public: "unused", NoPin: true})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := in.Maps.SAs.PutBatch(spis, sas); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		in.Close()
		b.StartTimer()
	}
}

// BenchmarkCountersRead: one scrape of every reason summed over CPUs.
func BenchmarkCountersRead(b *testing.B) {
	netns.RequireRoot(b)
	in, err := loader.Load(loader.Options{Public: "unused", NoPin: true, SACapacity: 16})
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	var s maps.Snapshot
	b.ReportAllocs()
	for b.Loop() {
		if err := in.Maps.Counters.Read(&s); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPolicies60k: writing 60,000 /32 policies into the trie one
// syscall each ("put") and in batches ("batch"); one op is all of them.
func BenchmarkPolicies60k(b *testing.B) {
	netns.RequireRoot(b)
	const n = 60000
	prefixes := make([]netip.Prefix, n)
	pols := make([]bpf.Policy, n)
	for i := range prefixes {
		prefixes[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}), 32)
		pols[i] = bpf.Policy{SaIndex: uint32(i)}
	}
	in, err := loader.Load(loader.Options{Public: "unused", NoPin: true, SACapacity: 16})
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	p := in.Maps.Policies
	b.Run("put", func(b *testing.B) {
		for b.Loop() {
			for i := range prefixes {
				if err := p.Put(prefixes[i], pols[i]); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("batch", func(b *testing.B) {
		for b.Loop() {
			if err := p.PutBatch(prefixes, pols); err != nil {
				b.Fatal(err)
			}
		}
	})
}
