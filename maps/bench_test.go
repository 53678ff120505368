package maps_test

import (
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
	sas := make([]bpf.SA, n)
	for i := range spis {
		spis[i] = uint32(0x100 + i)
		sas[i] = bpf.SA{SaIndex: uint32(i)}
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
