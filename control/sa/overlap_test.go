package sa

import (
	"net/netip"
	"strings"
	"testing"
)

// The index finds overlaps through shorter prefixes (probes), longer ones
// (scan), exact keys, never across families, and honours ports, the
// source prefix and the skip function; Remove forgets.
func TestOutIndex(t *testing.T) {
	sel := func(dst, src string, local, peer uint16) Selector {
		s := Selector{Dst: netip.MustParsePrefix(dst), Ports: Ports{Local: local, Peer: peer}}
		if src != "" {
			s.Src = netip.MustParsePrefix(src)
		}
		return s
	}
	var x OutIndex[string]
	x.Add(sel("10.0.0.0/8", "", 0, 0), "site")
	x.Add(sel("100.64.0.1/32", "10.0.0.0/24", 5065, 5062), "a-c")
	x.Add(sel("2001:db8::/64", "", 0, 0), "v6")
	for _, c := range []struct {
		name string
		s    Selector
		want string // "" = no conflict
	}{
		{"inside-site", sel("10.1.2.3/32", "", 0, 0), "site"},
		{"covers-site", sel("0.0.0.0/0", "", 0, 0), "site"},
		{"other-port", sel("100.64.0.1/32", "", 5075, 5062), ""},
		{"same-ports", sel("100.64.0.1/32", "", 5065, 5062), "a-c"},
		{"any-port", sel("100.64.0.1/32", "", 0, 0), "a-c"},
		{"other-source", sel("100.64.0.1/32", "10.0.1.0/24", 5065, 5062), ""},
		{"covers-core", sel("100.64.0.0/10", "", 0, 5062), "a-c"},
		{"v6-inside", sel("2001:db8::5/128", "", 0, 0), "v6"},
		{"v4-mapped-not-v6", sel("192.168.1.10/32", "", 0, 0), ""},
	} {
		got, _, ok := x.Conflict(c.s, nil)
		if !ok {
			got = ""
		}
		if got != c.want {
			t.Errorf("%s: conflict %q, want %q", c.name, got, c.want)
		}
	}
	if _, _, ok := x.Conflict(sel("10.1.2.3/32", "", 0, 0), func(v string) bool { return v == "site" }); ok {
		t.Error("skip ignored")
	}
	x.Remove(sel("10.0.0.0/8", "", 0, 0), "site")
	if _, _, ok := x.Conflict(sel("10.1.2.3/32", "", 0, 0), nil); ok {
		t.Error("removed entry still conflicts")
	}
	if v, ok := x.Any(netip.MustParsePrefix("100.64.0.1/32")); !ok || v != "a-c" {
		t.Errorf("Any: %q %v", v, ok)
	}
}

func TestCoreValidation(t *testing.T) {
	base := func(peer, core string) Spec {
		local := "10.0.0.0/24"
		if strings.Contains(peer, ":") {
			local = "2001:db8::/64"
		}
		return Spec{SPI: SPIOf(0x2001), Direction: "out", Mode: "tunnel", Proposal: "aes128gcm16",
			EncKey: "000102030405060708090a0b0c0d0e0f10111213", Local: "198.51.100.1", Peer: "203.0.113.7",
			Inner: &InnerSpec{Local: local, Peer: peer, Core: core}}
	}
	for _, c := range []struct{ peer, core, err string }{
		{"192.168.1.10", "100.64.0.1", ""},
		{"192.168.1.10/32", "100.64.0.1", ""},
		{"fd00::10", "2001:db8:c0::1", ""},
		{"192.168.1.10", "100.64.0.1/32", `inner.core: "100.64.0.1/32" is not an IP address`},
		{"192.168.1.10", "224.0.0.1", "inner.core: 224.0.0.1 is not a unicast address"},
		{"192.168.1.10", "::ffff:100.64.0.1", "inner.core: ::ffff:100.64.0.1: write IPv4 addresses as a.b.c.d"},
		{"192.168.1.0/24", "100.64.0.1", "inner.peer: 192.168.1.0/24: with inner.core, inner.peer must be the phone's one address (/32)"},
	} {
		sp := base(c.peer, c.core)
		s, err := sp.Parse(Options{})
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%s/%s: %v", c.peer, c.core, err)
		case c.err == "" && s.Core != netip.MustParseAddr(c.core):
			t.Errorf("%s/%s: core %v", c.peer, c.core, s.Core)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%s/%s: %v, want %q", c.peer, c.core, err, c.err)
		}
	}
	sp := base("192.168.1.10", "100.64.0.1")
	sp.Mode, sp.Inner = "transport", nil
	if s, err := sp.Parse(Options{}); err != nil || s.Core.IsValid() {
		t.Errorf("transport: %v %v", s.Core, err)
	}
	// The public view carries the core address, and parses back to it.
	sp = base("192.168.1.10", "100.64.0.1")
	s, _ := sp.Parse(Options{})
	pub := s.Public()
	if pub.Inner == nil || pub.Inner.Core != "100.64.0.1" {
		t.Fatalf("public view %+v", pub.Inner)
	}
}

// The cost of an add (Conflict, then Add) with n SAs indexed: per-phone
// core addresses (one key each), and 100k phones on one inner address
// told apart by the P-CSCF's ports (one key, ports differ). Both must stay
// flat as n grows.
func BenchmarkOutIndex(b *testing.B) {
	for _, c := range []struct {
		name string
		sel  func(i int) Selector
	}{
		{"core-addresses", func(i int) Selector {
			return Selector{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{100, byte(64 + i>>16), byte(i >> 8), byte(i)}), 32), Ports: Ports{Local: 5065, Peer: 5062}}
		}},
		{"shared-inner-address", func(i int) Selector {
			return Selector{Dst: netip.MustParsePrefix("192.168.1.10/32"), Ports: Ports{Local: uint16(1024 + i%60000), Peer: uint16(5062 + i/60000)}}
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			var x OutIndex[int]
			const n = 100_000
			for i := range n {
				x.Add(c.sel(i), i)
			}
			b.ResetTimer()
			for i := range b.N {
				s := c.sel(n + i%1000)
				if _, _, ok := x.Conflict(s, nil); ok {
					b.Fatalf("unexpected conflict for %+v", s)
				}
			}
		})
	}
}

// A destination shared by more SAs than a bucket lists (phones on one
// inner address told apart by ports) is indexed by ports: conflicts,
// the returned selector (source prefix included), Any and Remove work
// the same on both sides of the switch.
func TestOutIndexSharedDestination(t *testing.T) {
	dst := netip.MustParsePrefix("192.168.1.10/32")
	src := netip.MustParsePrefix("10.0.0.0/24")
	sel := func(i int) Selector {
		return Selector{Dst: dst, Src: src, Ports: Ports{Local: uint16(5000 + i), Peer: 5062, Proto: 17}}
	}
	var x OutIndex[int]
	for _, n := range []int{3, bucketList + 5} {
		for i := range n {
			if v, _, ok := x.Conflict(sel(i), nil); ok {
				t.Fatalf("n=%d: SA %d conflicts with %d", n, i, v)
			}
			x.Add(sel(i), i)
		}
		for i := range n {
			v, o, ok := x.Conflict(sel(i), nil)
			if !ok || v != i || o != sel(i) {
				t.Fatalf("n=%d: conflict of %d: %d %+v %v", n, i, v, o, ok)
			}
		}
		any := sel(0)
		any.Ports.Local = 0
		if _, _, ok := x.Conflict(any, func(v int) bool { return v != n-1 }); !ok {
			t.Fatalf("n=%d: an any-port selector misses SA %d", n, n-1)
		}
		for i := range n {
			x.Remove(sel(i), i)
		}
		if _, ok := x.Any(dst); ok || x.lens[0][32] != 0 || len(x.byLen[0][32]) != 0 {
			t.Fatalf("n=%d: removed SAs still indexed", n)
		}
	}
}

// A destination's one SA is kept inline; a second moves both to a list,
// and removing one moves the other back: conflicts, Any and Remove see
// the same SAs in every form.
func TestOutIndexInlineAndBack(t *testing.T) {
	dst := netip.MustParsePrefix("100.64.0.1/32")
	src := netip.MustParsePrefix("10.0.0.0/24")
	a := Selector{Dst: dst, Src: src, Ports: Ports{Local: 5065, Peer: 5062}}
	b := Selector{Dst: dst, Src: src, Ports: Ports{Local: 5067, Peer: 5064}}
	var x OutIndex[string]
	x.Add(a, "a")
	if bk := x.byLen[0][32][dst.Addr().As16()]; bk.more != nil || bk.one.v != "a" {
		t.Fatalf("one SA not inline: %+v", bk)
	}
	if v, o, ok := x.Conflict(a, nil); !ok || v != "a" || o != a {
		t.Fatalf("inline conflict: %q %+v %v", v, o, ok)
	}
	x.Add(b, "b")
	if v, o, ok := x.Conflict(b, nil); !ok || v != "b" || o != b {
		t.Fatalf("listed conflict: %q %+v %v", v, o, ok)
	}
	x.Remove(a, "a")
	bk := x.byLen[0][32][dst.Addr().As16()]
	if bk.more != nil || bk.one.v != "b" || x.lens[0][32] != 1 {
		t.Fatalf("the one SA left is not back inline: %+v", bk)
	}
	if _, _, ok := x.Conflict(a, nil); ok {
		t.Fatal("removed SA still conflicts")
	}
	if v, ok := x.Any(dst); !ok || v != "b" {
		t.Fatalf("Any: %q %v", v, ok)
	}
	x.Remove(b, "b")
	if _, ok := x.Any(dst); ok || len(x.byLen[0][32]) != 0 || x.lens[0][32] != 0 {
		t.Fatal("removed SAs still indexed")
	}
}
