package sad

import (
	"fmt"
	"net/netip"
	"reflect"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
)

// The packed form gives back exactly the SA it was made from, for every
// field in every form (IPv6, IPv4-mapped, no encap, the rare fields), and
// an entry's group is GroupOf its SA.
func TestPackRoundTrip(t *testing.T) {
	v6 := phone(7, sa.Out)
	v6.Local, v6.Peer = netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("::ffff:192.0.2.7")
	v6.InnerLocal, v6.InnerPeer = netip.MustParsePrefix("2001:db8:1::/48"), netip.MustParsePrefix("2001:db8:2::/64")
	v6.Encap = nil
	rareOne := phone(8, sa.In)
	rareOne.Pair, rareOne.AuthKey, rareOne.IdleTimeout = "p8", sa.Secret{1, 2, 3}, 30
	rareOne.Lifetime = sa.Lifetime{SoftBytes: 1, HardSeconds: 9}
	rareOne.Proposal, rareOne.ESN, rareOne.DSCP, rareOne.HasDSCP = esp.AES128SHA256, true, 46, true
	core := phone(9, sa.Out)
	core.Core, core.Ports = netip.MustParseAddr("100.64.0.9"), sa.Ports{Local: 5060, Peer: 5062, Proto: 17}
	core6 := v6
	core6.Core = netip.MustParseAddr("2001:db8:3::9")
	transport := phone(10, sa.In)
	transport.Mode, transport.InnerPeer = sa.Transport, netip.Prefix{}
	transport.InnerLocal = netip.MustParsePrefix("10.0.0.1/32")
	// Keys not of the proposal's length (not from sa.Parse) and an empty
	// non-nil one come back as given too.
	short, empty := phone(11, sa.In), phone(12, sa.Out)
	short.EncKey, empty.EncKey = sa.Secret{1, 2, 3}, sa.Secret{}
	for i, s := range []sa.SA{phone(1, sa.In), phone(2, sa.Out), v6, rareOne, core, core6, transport, short, empty} {
		p, sh := pack(&s)
		p.sh = &shared{sharedVal: sh}
		e := &entry{p: p}
		got := e.p.unpack()
		if !reflect.DeepEqual(got, s) {
			t.Errorf("SA %d: unpack(pack(s)) = %+v\nwant %+v", i, got, s)
		}
		if len(s.EncKey) > 0 && &got.EncKey[0] != &s.EncKey[0] {
			t.Errorf("SA %d: the packed key is a copy, not the SA's", i)
		}
		if e.id() != s.ID() || e.p.label() != s.Label() {
			t.Errorf("SA %d: id %v label %s, want %v %s", i, e.id(), e.p.label(), s.ID(), s.Label())
		}
		if e.group() != GroupOf(&s) {
			t.Errorf("SA %d: entry group %+v, GroupOf %+v", i, e.group(), GroupOf(&s))
		}
	}
	// An entry fits the 192-byte size class.
	if n, m := unsafe.Sizeof(packed{}), unsafe.Sizeof(entry{}); n > 120 || m > 192 {
		t.Errorf("packed is %d bytes, entry %d", n, m)
	}
}

// ListChanged pages through exactly the SAs changed after a version, in
// creation order, whatever the page size.
func TestListChanged(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	for i := range 10 {
		mustAdd(t, d, phone(i, sa.In))
	}
	v := d.Version()
	for _, i := range []int{2, 5, 9} {
		s := phone(i, sa.In)
		s.ReplayWindow = 64
		if _, err := d.Update(s); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.Delete(phone(5, sa.In).ID()); err != nil {
		t.Fatal(err)
	}
	if n := d.ChangedSince(v); n != 2 {
		t.Fatalf("ChangedSince: %d", n)
	}
	for _, limit := range []int{1, 2, 100} {
		var got []uint32
		var cur uint64
		for {
			var page []Record
			page, cur = d.ListChanged(v, cur, limit, nil)
			for _, r := range page {
				got = append(got, r.SA.SPI)
			}
			if cur == 0 {
				break
			}
		}
		if want := []uint32{0x10002, 0x10009}; !reflect.DeepEqual(got, want) {
			t.Fatalf("limit %d: %x, want %x", limit, got, want)
		}
	}
}

// SAs sharing the gateway's address and the core-side prefix share one
// interned copy, counted: an update to another prefix moves the count,
// the last delete drops the copy.
func TestSharedInterned(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	for i := range 100 {
		mustAdd(t, d, phone(i, sa.Direction(1+i%2)))
	}
	if len(d.shared) != 1 || d.order[0].p.sh.refs != 100 || d.order[0].p.sh != d.order[99].p.sh {
		t.Fatalf("%d shared values for one (local, inner local)", len(d.shared))
	}
	s := phone(3, sa.Out)
	s.InnerLocal = netip.MustParsePrefix("10.1.0.0/24")
	if _, err := d.Update(s); err != nil {
		t.Fatal(err)
	}
	if len(d.shared) != 2 || d.order[0].p.sh.refs != 99 {
		t.Fatalf("after an update: %d shared values, %d refs", len(d.shared), d.order[0].p.sh.refs)
	}
	if r, _ := d.Get(s.ID()); r.SA.InnerLocal != s.InnerLocal {
		t.Fatalf("updated SA reads back inner local %v", r.SA.InnerLocal)
	}
	for i := range 100 {
		if _, err := d.Delete(phone(i, sa.Direction(1+i%2)).ID()); err != nil {
			t.Fatal(err)
		}
	}
	if len(d.shared) != 0 {
		t.Fatalf("%d shared values left after every SA went", len(d.shared))
	}
}

// Groups whose keys collide in the group index behave exactly as groups
// that do not: a SAD whose every group hashes alike (all but one in the
// overflow map) pairs, places, binds, moves and forgets SAs as a normal
// one does.
func TestGroupHashCollisions(t *testing.T) {
	normal := newSAD(t, Options{Workers: 3})
	collide := newSAD(t, Options{Workers: 3})
	collide.groups.hash = func(GroupKey) uint64 { return 7 }
	both := func(f func(d *SAD) error) {
		t.Helper()
		if e1, e2 := f(normal), f(collide); (e1 == nil) != (e2 == nil) {
			t.Fatalf("normal: %v, colliding: %v", e1, e2)
		}
	}
	for i := range 40 {
		for _, dir := range []sa.Direction{sa.In, sa.Out} {
			both(func(d *SAD) error { _, err := d.Add(phone(i, dir)); return err })
		}
	}
	for i := 0; i < 40; i += 3 {
		both(func(d *SAD) error { _, err := d.Delete(phone(i, sa.In).ID()); return err })
	}
	for i := 1; i < 40; i += 4 { // move an SA into another phone's group
		s := phone(i, sa.In)
		s.Pair = fmt.Sprintf("p%d", i%3)
		both(func(d *SAD) error { _, err := d.Update(s); return err })
	}
	for i := 2; i < 40; i += 5 {
		b := netip.MustParseAddrPort(fmt.Sprintf("203.0.113.%d:%d", i, 40000+i))
		both(func(d *SAD) error { _, err := d.SetBinding(phone(i, sa.Out).ID(), b); return err })
	}
	if len(collide.groups.ovf) == 0 || len(collide.groups.byHash) != 1 {
		t.Fatalf("collisions not exercised: %d in byHash, %d in ovf", len(collide.groups.byHash), len(collide.groups.ovf))
	}
	for i := range 40 {
		for _, dir := range []sa.Direction{sa.In, sa.Out} {
			id := phone(i, dir).ID()
			r1, ok1 := normal.Get(id)
			r2, ok2 := collide.Get(id)
			r2.Created = r1.Created
			if ok1 != ok2 || !reflect.DeepEqual(r1, r2) {
				t.Fatalf("%v: normal %+v %v, colliding %+v %v", id, r1, ok1, r2, ok2)
			}
			g1, g2 := normal.Group(id), collide.Group(id)
			if !reflect.DeepEqual(g1, g2) {
				t.Fatalf("%v: group %v vs %v", id, g1, g2)
			}
		}
	}
	for i := range 40 {
		for _, dir := range []sa.Direction{sa.In, sa.Out} {
			normal.Delete(phone(i, dir).ID())
			collide.Delete(phone(i, dir).ID())
		}
	}
	if len(collide.groups.ovf)+len(collide.groups.byHash)+len(normal.groups.byHash) != 0 {
		t.Fatalf("groups left after every SA went: %d %d", len(collide.groups.ovf), len(collide.groups.byHash))
	}
}
