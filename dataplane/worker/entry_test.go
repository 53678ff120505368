package worker

import (
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
