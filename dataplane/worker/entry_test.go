package worker

import (
	"math/rand/v2"
	"net/netip"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/dataplane/esp"
)

// SetSelectors keeps InnerPeer and Core exactly, in every family form
// (IPv4, IPv6, IPv4-mapped IPv6, none), and inner is InnerPeer's address.
func TestSlotSelectors(t *testing.T) {
	for _, c := range []struct{ peer, core string }{
		{"192.168.1.10/32", "100.64.0.1"},
		{"10.1.0.0/16", ""},
		{"2001:db8::7/128", "fd00::9"},
		{"::ffff:192.168.1.10/128", "::ffff:100.64.0.1"},
		{"", "100.64.0.2"},
		{"", ""},
		{"0.0.0.0/0", ""},
	} {
		var p netip.Prefix
		var a netip.Addr
		if c.peer != "" {
			p = netip.MustParsePrefix(c.peer)
		}
		if c.core != "" {
			a = netip.MustParseAddr(c.core)
		}
		var e Slot
		e.SetSelectors(netip.MustParsePrefix("1.2.3.4/32"), netip.MustParseAddr("fd00::1")) // overwritten
		e.SetSelectors(p, a)
		if e.InnerPeer() != p || e.Core() != a || e.hasCore() != a.IsValid() || e.inner() != p.Addr() {
			t.Errorf("%s %s: got %v %v (inner %v)", c.peer, c.core, e.InnerPeer(), e.Core(), e.inner())
		}
	}
}

// A slot, its Transform and the shared-part pointer fit the 288-byte size
// class: a million idle SAs, two slots per phone, are ~0.6 GB of it.
func TestSlotSize(t *testing.T) {
	if n := unsafe.Sizeof(slotAndSA{}); n > 288 {
		t.Errorf("slot and Transform: %d bytes, more than the 288-byte size class", n)
	}
	s, err := NewSlot(esp.Config{SPI: 0x1000, Proposal: esp.AES128GCM16, EncKey: make([]byte, 20), ReplayWindow: 1024, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	if s.SA == nil || s.SA.SPI() != 0x1000 {
		t.Fatalf("slot's Transform %+v", s.SA)
	}
}

// Equal Scopes are one copy; different ones are not; the zero Scope is
// no pointer at all and reads as zero.
func TestScopeInterned(t *testing.T) {
	v := Scope{Local: netip.MustParseAddr("192.0.2.1"), InnerLocal: netip.MustParsePrefix("10.0.0.0/24"), HardPackets: 7}
	var a, b, c, z Slot
	a.SetScope(v)
	b.SetScope(v)
	w := v
	w.HardPackets = 8
	c.SetScope(w)
	z.SetScope(Scope{})
	if a.scope != b.scope || a.scope == c.scope || *a.Scope() != v || *c.Scope() != w {
		t.Fatalf("interning: %p %p %p", a.scope, b.scope, c.scope)
	}
	if z.scope != nil || *z.Scope() != (Scope{}) {
		t.Fatalf("zero scope: %p %+v", z.scope, *z.Scope())
	}
}

// within answers as netip.Prefix.Contains of srcAddr/dstAddr does, for
// prefixes of every length and family (IPv4-mapped IPv6 included) against
// IPv4 and IPv6 packets whose addresses share a random number of bits
// with the prefix.
func TestWithinIsContains(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	rnd16 := func() (b [16]byte) {
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	for i := 0; i < 200000; i++ {
		base := rnd16()
		var p netip.Prefix
		switch rng.IntN(3) {
		case 0:
			p = netip.PrefixFrom(netip.AddrFrom4([4]byte(base[12:])), rng.IntN(33))
		case 1:
			p = netip.PrefixFrom(netip.AddrFrom16(base), rng.IntN(129))
		default:
			m := base
			copy(m[:12], []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff})
			p = netip.PrefixFrom(netip.AddrFrom16(m), 96+rng.IntN(33))
		}
		// The packet's address: the prefix's with a random tail flipped.
		a := p.Addr().As16()
		if k := rng.IntN(129); k < 128 {
			a[k/8] ^= 1 << (7 - k%8)
		}
		var ip []byte
		var addr netip.Addr
		if rng.IntN(2) == 0 {
			ip = make([]byte, 20)
			ip[0] = 0x45
			addr = netip.AddrFrom4([4]byte(a[12:]))
		} else {
			ip = make([]byte, 40)
			ip[0] = 0x60
			addr = netip.AddrFrom16(a)
		}
		dst := rng.IntN(2) == 0
		if ip[0]>>4 == 4 {
			off := 12
			if dst {
				off = 16
			}
			copy(ip[off:], a[12:])
		} else {
			off := 8
			if dst {
				off = 24
			}
			copy(ip[off:], a[:])
		}
		var e Slot
		e.SetSelectors(p, netip.Addr{})
		got := within(ip, dst, &e.innerPeer, e.fams&famPeer4 != 0, int(e.ipBits)-1)
		if want := p.Contains(addr); got != want {
			t.Fatalf("%v contains %v (dst %v): within %v, netip %v", p, addr, dst, got, want)
		}
	}
	if within(nil, false, &[16]byte{}, true, 0) || within([]byte{0x45, 0}, true, &[16]byte{}, true, 0) {
		t.Fatal("short packets are within")
	}
}
