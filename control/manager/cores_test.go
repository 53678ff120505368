package manager

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/maps"
)

// SAs with a core address are published in the cores map under (core
// address, peer port), never in the trie; several on one key (a phone's
// re-registration) hand it to the newest and back; the core_cfg flag for
// the kind is set; an update that gives an SA a core address moves it
// from the trie to the cores map; PruneStale removes core entries nobody
// published.
func TestCoreEntries(t *testing.T) {
	f := newFixture(t, 2, "")
	core := netip.MustParseAddr("100.64.0.1")
	mk := func(name string, spi uint32, dir sa.Direction, local, peer uint16) sa.SA {
		s := mkSA(name, spi, dir, "192.168.1.10/32", byte(spi))
		s.Core, s.Ports = core, sa.Ports{Local: local, Peer: peer}
		return s
	}
	in1, out1 := mk("in1", 0x1001, sa.In, 5065, 5062), mk("out1", 0x2001, sa.Out, 5065, 5062)
	out2 := mk("out2", 0x2002, sa.Out, 5075, 5062) // the re-registration's set
	for _, s := range []sa.SA{in1, out1, out2} {
		if _, err := f.d.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	f.sync(t)
	e1, _ := f.d.Get(out1.ID())
	e2, _ := f.d.Get(out2.ID())
	if e1.Worker != e2.Worker {
		t.Fatalf("a phone's SAs on workers %d and %d", e1.Worker, e2.Worker)
	}
	pol, err := f.maps.Cores.Lookup(core, 5062)
	if err != nil || pol.SaIndex != e2.Index {
		t.Fatalf("cores (core, 5062): %+v %v; want the newest, index %d", pol, err, e2.Index)
	}
	if _, err := f.maps.Policies.Lookup(netip.MustParseAddr("192.168.1.10")); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("the shared inner address is in the trie: %v", err)
	}
	if k, err := f.maps.Cores.Kinds(); err != nil || k != bpf.CoreFlagPort {
		t.Fatalf("core_cfg flags %#x (%v), want only the port kind", k, err)
	}
	if w := f.w.entry(int(e1.Worker), e1.Index); w == nil || w.Core() != core || w.InnerPeer() != netip.MustParsePrefix("192.168.1.10/32") {
		t.Fatalf("worker entry %+v", w)
	}
	if _, err := f.d.Delete(out2.ID()); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if pol, err := f.maps.Cores.Lookup(core, 5062); err != nil || pol.SaIndex != e1.Index {
		t.Fatalf("after deleting the newest: %+v %v; want index %d", pol, err, e1.Index)
	}
	if _, err := f.d.Delete(out1.ID()); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.maps.Cores.Lookup(core, 5062); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("core entry left: %v", err)
	}

	// An SA without a core address, then given one by an update.
	plain := mkSA("plain", 0x2003, sa.Out, "10.99.0.3/32", 3)
	if _, err := f.d.Add(plain); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.maps.Policies.Lookup(netip.MustParseAddr("10.99.0.3")); err != nil {
		t.Fatal(err)
	}
	plain.Core = netip.MustParseAddr("100.64.0.3")
	if _, err := f.d.Update(plain); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.maps.Policies.Lookup(netip.MustParseAddr("10.99.0.3")); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("trie entry kept after the SA moved to a core address: %v", err)
	}
	ep, _ := f.d.Get(plain.ID())
	if pol, err := f.maps.Cores.Lookup(plain.Core, 0); err != nil || pol.SaIndex != ep.Index {
		t.Fatalf("any-port core entry: %+v %v", pol, err)
	}
	if k, _ := f.maps.Cores.Kinds(); k != bpf.CoreFlags {
		t.Fatalf("core_cfg flags %#x: want both kinds", k)
	}

	// A stale core entry (left by a previous process) is pruned.
	if err := f.maps.Cores.Put(netip.MustParseAddr("100.64.0.99"), 5060, bpf.Policy{SaIndex: 7}); err != nil {
		t.Fatal(err)
	}
	if _, n, err := f.m.PruneStale(); err != nil || n != 1 {
		t.Fatalf("prune: %d %v", n, err)
	}
	if _, err := f.maps.Cores.Lookup(plain.Core, 0); err != nil {
		t.Fatalf("prune removed a live core entry: %v", err)
	}
}
