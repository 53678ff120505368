package manager

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// The binding table under total collision (every key one hash) and with
// the real hash: each group finds its own binding, removing one from the
// head, middle or tail of a chain leaves the others findable.
func TestBindingTable(t *testing.T) {
	for _, collide := range []bool{true, false} {
		tb := newBindingTable()
		if collide {
			tb.hashOf = func(groupRef) uint64 { return 7 }
		}
		var sbs []*sharedBinding
		for i := range 6 {
			s := sa.SA{Peer: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), InnerPeer: netip.MustParsePrefix("100.64.0.1/32")}
			sb := newShared(groupRef{worker: uint16(i % 2), key: sad.GroupOf(&s)})
			if tb.get(sb.ref()) != nil {
				t.Fatalf("group %d found before it was added", i)
			}
			tb.add(sb)
			sbs = append(sbs, sb)
		}
		if collide && len(tb.m) != 1 {
			t.Fatalf("%d buckets under total collision", len(tb.m))
		}
		for _, i := range []int{5, 2, 0} { // head of the chain (last added), middle, tail
			tb.del(sbs[i])
			sbs[i] = nil
			for j, sb := range sbs {
				if sb != nil && tb.get(sb.ref()) != sb {
					t.Fatalf("collide=%v: after removing %d, group %d not found", collide, i, j)
				}
			}
		}
		for _, sb := range sbs {
			if sb != nil {
				tb.del(sb)
			}
		}
		if len(tb.m) != 0 {
			t.Fatalf("collide=%v: %d buckets left", collide, len(tb.m))
		}
	}
}

// Policy keys round-trip their prefix or core address, IPv4 apart from
// IPv4-mapped IPv6.
func TestPolicyKey(t *testing.T) {
	for _, p := range []string{"100.64.0.1/32", "10.0.0.0/8", "::ffff:100.64.0.1/128", "2001:db8::/64"} {
		pr := netip.MustParsePrefix(p)
		if k := prefixKey(pr); k.isCore() || k.prefix() != pr {
			t.Fatalf("%s: key gives %v", p, k.prefix())
		}
	}
	a4, a6 := netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("::ffff:100.64.0.1")
	if k := coreKey(a4, 5060); !k.isCore() || k.core() != a4 || k.port != 5060 || k == coreKey(a6, 5060) {
		t.Fatal("core key")
	}
	if prefixKey(netip.PrefixFrom(a4, 32)) == prefixKey(netip.PrefixFrom(a6, 128)) {
		t.Fatal("IPv4 and IPv4-mapped prefixes share a key")
	}
}

// The compact SA identity round-trips every kind of sa.ID, and different
// IDs get different keys.
func TestSAKey(t *testing.T) {
	ids := []sa.ID{
		{Dir: sa.In, SPI: 0x1001},
		{Dir: sa.Out, SPI: 0x1001, Peer: netip.MustParseAddrPort("192.0.2.10:4500")},
		{Dir: sa.Out, SPI: 0x1001, Peer: netip.MustParseAddrPort("[::ffff:192.0.2.10]:4500")},
		{Dir: sa.Out, SPI: 0x1001, Peer: netip.MustParseAddrPort("[2001:db8::10]:4500")},
		{Dir: sa.Out, SPI: 0x1001, Peer: netip.MustParseAddrPort("192.0.2.10:0")},
		{Dir: sa.Out, SPI: 0x1001},
	}
	seen := map[saKey]sa.ID{}
	for _, id := range ids {
		k := keyOf(id)
		if got := k.id(); got != id {
			t.Fatalf("%v: round trip gives %v", id, got)
		}
		if other, dup := seen[k]; dup {
			t.Fatalf("%v and %v share a key", id, other)
		}
		seen[k] = id
	}
}
