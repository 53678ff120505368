package flood

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/bpf"
)

type fakePub struct {
	sas  map[uint32]bpf.FloodSA
	srcs map[bpf.FloodSrcKey]bpf.FloodSrc
	puts int
}

func (f *fakePub) PutSA(spi uint32, v *bpf.FloodSA) error { f.sas[spi] = *v; f.puts++; return nil }
func (f *fakePub) PutSrc(k *bpf.FloodSrcKey, v *bpf.FloodSrc) error {
	f.srcs[*k] = *v
	f.puts++
	return nil
}

// overBudget is XDP's test (bpf/xesp.c flood_check).
func overBudget(tat, tol uint64, now int64) bool { return tat > uint64(now)+tol }

// The GCRA arithmetic: Burst failures at once are within budget, the next
// one spends it and is published once; XDP would then drop foreign
// packets until the bucket drains at Rate; a failure after that publishes
// again. The binding has no source bucket; a moved binding is republished.
func TestGuardBudgets(t *testing.T) {
	var now int64 = 1e12
	pub := &fakePub{sas: map[uint32]bpf.FloodSA{}, srcs: map[bpf.FloodSrcKey]bpf.FloodSrc{}}
	g, err := New(Config{SA: Budget{Rate: 100, Burst: 10}, Source: Budget{Rate: 50, Burst: 5}}, pub, func() int64 { return now })
	if err != nil {
		t.Fatal(err)
	}
	binding := netip.MustParseAddrPort("192.0.2.10:4500")
	spoof := netip.MustParseAddrPort("203.0.113.66:4500")
	const spi = 0x1001
	// Source budget: 5 at once, the 6th spends it.
	for i := 0; i < 5; i++ {
		g.Failed(spi, binding, spoof)
	}
	srcKey := bpf.FloodSrcKey{Addr: addr16(spoof.Addr()), Port: htons(4500)}
	if _, ok := pub.srcs[srcKey]; ok || pub.puts != 0 {
		t.Fatalf("published within budget: %d puts", pub.puts)
	}
	g.Failed(spi, binding, spoof)
	src, ok := pub.srcs[srcKey]
	if !ok || !overBudget(src.Tat, src.Tolerance, now) {
		t.Fatalf("6th failure from one source: published %v %+v, want a spent source budget", ok, src)
	}
	if srcKey.Addr[10] != 0xff || srcKey.Addr[11] != 0xff || srcKey.Addr[12] != 203 {
		t.Fatalf("source key address %v is not IPv4-mapped", srcKey.Addr)
	}
	// SA budget: 10 at once; failures 7..10 from the binding itself
	// charge only the SA.
	for i := 0; i < 4; i++ {
		g.Failed(spi, binding, binding)
	}
	if _, ok := pub.sas[spi]; ok {
		t.Fatal("SA budget published after 10 failures, burst is 10")
	}
	puts := pub.puts
	g.Failed(spi, binding, binding)
	sa, ok := pub.sas[spi]
	if !ok || !overBudget(sa.Tat, sa.Tolerance, now) || sa.BindAddr != addr16(binding.Addr()) || sa.BindPort != htons(4500) {
		t.Fatalf("11th failure: SA entry %v %+v, want spent with the binding", ok, sa)
	}
	if pub.puts != puts+1 {
		t.Fatalf("%d writes for one spent SA budget", pub.puts-puts)
	}
	// While XDP drops, more failures (from the binding) publish nothing.
	puts = pub.puts
	for i := 0; i < 100; i++ {
		g.Failed(spi, binding, binding)
	}
	if pub.puts != puts {
		t.Fatalf("%d writes while XDP already held the spent budget", pub.puts-puts)
	}
	// Once the published tat is within tolerance again, XDP admits
	// foreign packets; the next failure publishes again.
	now = int64(pub.sas[spi].Tat-pub.sas[spi].Tolerance) + 1
	if overBudget(pub.sas[spi].Tat, pub.sas[spi].Tolerance, now) {
		t.Fatal("still over budget after draining")
	}
	g.Failed(spi, binding, binding)
	if pub.puts != puts+1 || !overBudget(pub.sas[spi].Tat, pub.sas[spi].Tolerance, now) {
		t.Fatalf("after draining, a failure did not publish a spent budget (%d writes)", pub.puts-puts)
	}
	// A new authenticated binding is republished at once.
	moved := netip.MustParseAddrPort("192.0.2.10:61000")
	g.Rebound(spi, moved)
	if pub.sas[spi].BindPort != htons(61000) {
		t.Fatalf("rebound not published: port %#x", pub.sas[spi].BindPort)
	}
	// Idle for long: the budget is whole again (tat in the past).
	now += 10e9
	if overBudget(pub.sas[spi].Tat, pub.sas[spi].Tolerance, now) {
		t.Fatal("budget not refilled after 10 s idle")
	}
}

func TestBudgetCheck(t *testing.T) {
	for _, b := range []Budget{{0, 1}, {-1, 1}, {1, 0}, {1, 1 << 25}} {
		if b.Check("flood.sa") == nil {
			t.Errorf("%+v accepted", b)
		}
	}
	if err := Defaults.SA.Check("flood.sa"); err != nil {
		t.Fatal(err)
	}
}
