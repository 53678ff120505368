package sad

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

// Overlapping outbound selectors are refused naming both SAs; a rekey's
// new SA may overlap exactly the SAs it replaces; deleting frees the
// selector; an update is checked against everyone but itself.
func TestOverlapAndRekeyException(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	a := phone(1, sa.Out)
	mustAdd(t, d, a)
	b := phone(2, sa.Out)
	b.InnerPeer = a.InnerPeer // another phone, same inner address
	_, err := d.Add(b)
	if !errors.Is(err, ErrOverlap) || !strings.Contains(err.Error(), `sa "ue2-out": selectors overlap sa "ue1-out"`) {
		t.Fatalf("overlap: %v", err)
	}
	var oe *sa.OverlapError
	if !errors.As(err, &oe) || oe.Other != `sa "ue1-out"` {
		t.Fatalf("not an OverlapError naming ue1-out: %v", err)
	}
	// A rekey of a: the new SA has a's selectors.
	na := phone(1, sa.Out)
	na.SPI, na.Name = 0xd0000001, "ue1-out-2"
	if _, err := d.AddRekey(na, []sa.ID{b.ID()}); !errors.Is(err, ErrOverlap) {
		t.Fatalf("rekey replacing another SA: %v", err)
	}
	if _, err := d.AddRekey(na, []sa.ID{a.ID()}); err != nil {
		t.Fatalf("rekey make-before-break: %v", err)
	}
	// While both are there, nobody else may join.
	c := phone(3, sa.Out)
	c.InnerPeer = a.InnerPeer
	if _, err := d.Add(c); !errors.Is(err, ErrOverlap) {
		t.Fatalf("third SA during a rekey: %v", err)
	}
	if _, err := d.Delete(a.ID()); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Delete(na.ID()); err != nil {
		t.Fatal(err)
	}
	mustAdd(t, d, c) // the selector is free again
	// Update: itself is not an overlap; moving onto c's selector is.
	e := mustAdd(t, d, phone(4, sa.Out))
	up := e.SA
	up.Lifetime.HardPackets = 100
	if _, err := d.Update(up); err != nil {
		t.Fatal(err)
	}
	up.InnerPeer = c.InnerPeer
	if _, err := d.Update(up); !errors.Is(err, ErrOverlap) {
		t.Fatalf("update onto another selector: %v", err)
	}
}

// SAs with a core address: phones sharing an inner address are told
// apart by it; a phone's SA sets (a re-registration) group by it, so they
// share a worker whatever the worker count and pair labels; CoreOf and
// CoreInUse follow adds and deletes.
func TestCoreGrouping(t *testing.T) {
	d := newSAD(t, Options{Workers: 4})
	inner := netip.MustParsePrefix("192.168.1.10/32")
	core := netip.MustParseAddr("100.64.0.1")
	mk := func(i int, dir sa.Direction, pair string, local, peer uint16) sa.SA {
		s := phone(1, dir)
		s.SPI += uint32(i)
		s.Name = s.Name + "-" + pair
		s.Pair, s.InnerPeer, s.Core = pair, inner, core
		s.Ports = sa.Ports{Local: local, Peer: peer}
		return s
	}
	var workers []uint16
	for i, reg := range []string{"reg1", "reg2", "reg3"} {
		port := uint16(5063 + 10*i)
		for _, s := range []sa.SA{mk(10*i, sa.In, reg, port, 5064), mk(10*i+1, sa.Out, reg, port, 5064)} {
			workers = append(workers, mustAdd(t, d, s).Worker)
		}
		// Fill other workers in between so least-loaded would move on.
		mustAdd(t, d, phone(100+i, sa.In))
	}
	for _, w := range workers {
		if w != workers[0] {
			t.Fatalf("a phone's SA sets on workers %v", workers)
		}
	}
	s1 := phone(1, sa.In)
	if got, ok := d.CoreOf(netip.AddrPortFrom(s1.Peer, s1.Encap.PeerPort), inner); !ok || got != core {
		t.Fatalf("CoreOf = %v %v", got, ok)
	}
	if !d.CoreInUse(core) || d.CoreInUse(netip.MustParseAddr("100.64.0.2")) {
		t.Fatal("CoreInUse")
	}
	// A second phone, same inner address, another core: no overlap.
	o := phone(2, sa.Out)
	o.InnerPeer, o.Core, o.Ports = inner, netip.MustParseAddr("100.64.0.2"), sa.Ports{Local: 5063, Peer: 5064}
	mustAdd(t, d, o)
	// The same core on a port pair a set already has: refused.
	dup := mk(99, sa.Out, "reg9", 5073, 5064)
	if _, err := d.Add(dup); !errors.Is(err, ErrOverlap) || !strings.Contains(err.Error(), "destination 100.64.0.1/32") {
		t.Fatalf("duplicate ports on one core: %v", err)
	}
	for _, e := range d.order {
		if s := e.p.unpack(); s.Core == core {
			if _, err := d.Delete(e.id()); err != nil {
				t.Fatal(err)
			}
		}
	}
	if d.CoreInUse(core) {
		t.Fatal("core still in use after its SAs went")
	}
	if _, ok := d.CoreOf(netip.AddrPortFrom(s1.Peer, s1.Encap.PeerPort), inner); ok {
		t.Fatal("CoreOf after delete")
	}
}

// Without core addresses, SAs whose inner peer prefix already has an
// outbound SA join that SA's worker (XDP's trie steers one prefix to one
// worker): two phones on 192.168.1.10 told apart by ports, even when the
// least-loaded worker is another.
func TestPlacementByPrefix(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	inner := netip.MustParsePrefix("192.168.1.10/32")
	a := phone(1, sa.Out)
	a.InnerPeer, a.Ports = inner, sa.Ports{Local: 5063, Peer: 5064}
	wa := mustAdd(t, d, a).Worker
	mustAdd(t, d, phone(50, sa.In)) // the other worker
	mustAdd(t, d, phone(51, sa.In)) // a's worker is now the more loaded
	b := phone(2, sa.In)            // another phone, its inbound SA first
	b.InnerPeer, b.Ports = inner, sa.Ports{Local: 6063, Peer: 5062}
	if w := mustAdd(t, d, b).Worker; w != wa {
		t.Fatalf("phone 2 on worker %d, phone 1's outbound SA on %d", w, wa)
	}
	// An unrelated phone still goes by load.
	if w := mustAdd(t, d, phone(3, sa.In)).Worker; w == wa {
		t.Fatalf("unrelated SA joined worker %d instead of the least-loaded", w)
	}
}
