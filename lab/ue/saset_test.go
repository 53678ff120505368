package ue

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/xesp/xesp/dataplane/esp"
)

// The SA-change rules: an outbound SPI already sealing is refused (its
// counter would restart: IV reuse), a duplicate inbound SPI too, a mode
// other than the tunnel's, and deletes of SAs that are not there; a rekey
// returns the replaced SA and the set seen by the loops changes whole.
func TestTunnelSAChanges(t *testing.T) {
	a, _ := twoNS(t)
	aOut, aIn, _, _ := pairSAs(t, esp.ModeTunnel)
	trOut, _, _, _ := pairSAs(t, esp.ModeTransport)
	tun := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: netip.MustParseAddrPort("192.0.2.2:4500"),
		Inner: netip.MustParseAddr("10.99.0.1"), Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}, Keepalive: -1})
	if out, in := tun.SAs(); out != nil || len(in) != 0 || tun.Mode() != esp.ModeTunnel {
		t.Fatalf("fresh tunnel holds %v %v, mode %v", out, in, tun.Mode())
	}
	if old, err := tun.SetOut(aOut); err != nil || old != nil {
		t.Fatalf("first outbound: %v %v", old, err)
	}
	if _, err := tun.SetOut(aOut); !errors.Is(err, ErrSAExists) {
		t.Fatalf("same outbound again: %v", err)
	}
	again, _, _, _ := pairSAs(t, esp.ModeTunnel) // a new object under the same SPI 0x1001
	if _, err := tun.SetOut(again); !errors.Is(err, ErrSAExists) {
		t.Fatalf("same outbound SPI, new SA: %v", err)
	}
	if _, err := tun.SetOut(trOut); !errors.Is(err, ErrSAMode) {
		t.Fatalf("transport SA on a tunnel-mode phone: %v", err)
	}
	if err := tun.AddIn(aIn); err != nil {
		t.Fatal(err)
	}
	if err := tun.AddIn(aIn); !errors.Is(err, ErrSAExists) {
		t.Fatalf("duplicate inbound: %v", err)
	}
	next, err := esp.NewTransform(esp.Config{SPI: 0x1002, Proposal: esp.AES128GCM16, EncKey: make([]byte, 20), Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	before := tun.sas.Load()
	if old, err := tun.SetOut(next); err != nil || old != aOut {
		t.Fatalf("rekey: replaced %v, %v", old, err)
	}
	if before.out != aOut || len(before.in) != 1 {
		t.Fatal("a published SA set changed in place")
	}
	if _, err := tun.DeleteOut(0x1001); !errors.Is(err, ErrSANotFound) {
		t.Fatalf("delete the replaced outbound: %v", err)
	}
	if _, err := tun.DeleteIn(0x9999); !errors.Is(err, ErrSANotFound) {
		t.Fatalf("delete an unknown inbound: %v", err)
	}
	if s, err := tun.DeleteIn(aIn.SPI()); err != nil || s != aIn {
		t.Fatalf("delete inbound: %v %v", s, err)
	}
	if s, err := tun.DeleteOut(0x1002); err != nil || s != next {
		t.Fatalf("delete outbound: %v %v", s, err)
	}
	if out, in := tun.SAs(); out != nil || len(in) != 0 {
		t.Fatalf("after the deletes: %v %v", out, in)
	}
	// The per-packet lookup allocates nothing.
	set := &saSet{in: []*esp.Transform{aIn, next}}
	if n := testing.AllocsPerRun(100, func() { _ = set.lookupIn(0x1002) }); n != 0 {
		t.Fatalf("lookupIn allocates %v", n)
	}
}
