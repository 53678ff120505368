package maps_test

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/loader"
)

// BenchmarkPoliciesWalk200k: reading 200,000 /32 policies back, one op is
// all of them: "iterate" (two syscalls an entry, as PruneStale does
// today) and "batch" (Policies.Walk).
func BenchmarkPoliciesWalk200k(b *testing.B) {
	netns.RequireRoot(b)
	const n = 200_000
	in, err := loader.Load(loader.Options{Public: "unused", NoPin: true, SACapacity: 16, PolicyCapacity: n})
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	p := in.Maps.Policies
	prefixes := make([]netip.Prefix, n)
	pols := make([]bpf.Policy, n)
	for i := range prefixes {
		prefixes[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}), 32)
	}
	if err := p.PutBatch(prefixes, pols); err != nil {
		b.Fatal(err)
	}
	b.Run("iterate", func(b *testing.B) {
		for b.Loop() {
			var k bpf.PolicyKey
			var v bpf.Policy
			it := p.Map().Iterate()
			c := 0
			for it.Next(&k, &v) {
				c++
			}
			if it.Err() != nil || c != n {
				b.Fatal(c, it.Err())
			}
		}
	})
	b.Run("batch", func(b *testing.B) {
		for b.Loop() {
			c := 0
			if err := p.Walk(func(*bpf.PolicyKey, *bpf.Policy) bool { c++; return true }); err != nil || c != n {
				b.Fatal(c, err)
			}
		}
	})
}
