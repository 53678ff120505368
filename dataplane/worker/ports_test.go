package worker

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/internal/pkt"
)

func TestL4PortsAndSelectors(t *testing.T) {
	udp := pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5063"), netip.MustParseAddrPort("192.168.1.11:5064"), []byte("x"))
	if sp, dp, ok := l4Ports(udp); !ok || sp != 5063 || dp != 5064 {
		t.Fatalf("udp: %d %d %v", sp, dp, ok)
	}
	for _, c := range []struct {
		src, dst uint16
		want     bool
	}{{5063, 5064, true}, {5063, 0, true}, {0, 5064, true}, {0, 0, true}, {5065, 5064, false}, {5063, 5062, false}} {
		if got := portsMatch(udp, c.src, c.dst); got != c.want {
			t.Errorf("portsMatch(%d, %d) = %v", c.src, c.dst, got)
		}
	}
	frag := append([]byte(nil), udp...)
	frag[7] = 1 // fragment offset 8: no ports in this fragment
	icmp := append([]byte(nil), udp...)
	icmp[9] = 1
	for name, p := range map[string][]byte{"non-first fragment": frag, "icmp": icmp, "short": udp[:22], "empty": nil} {
		if _, _, ok := l4Ports(p); ok {
			t.Errorf("%s: ports found", name)
		}
		if portsMatch(p, 0, 0) {
			t.Errorf("%s: matches a port selector", name)
		}
	}
	v6 := make([]byte, 48)
	v6[0], v6[6] = 0x60, 6
	v6[40], v6[41], v6[42], v6[43] = 0x13, 0xc4, 0x13, 0xc6
	if sp, dp, ok := l4Ports(v6); !ok || sp != 5060 || dp != 5062 {
		t.Fatalf("ipv6 tcp: %d %d %v", sp, dp, ok)
	}
}

// track indexes outbound entries with port selectors and forgets an
// entry only while the index still points at it.
func TestTrackByPorts(t *testing.T) {
	var p pipeline
	peer := netip.MustParsePrefix("192.168.1.11/32")
	outC := withSel(&Slot{Dir: Outbound, PortLocal: 5065, PortPeer: 5062}, peer, netip.Addr{})
	outS := withSel(&Slot{Dir: Outbound, PortLocal: 5063, PortPeer: 5064}, peer, netip.Addr{})
	in := withSel(&Slot{Dir: Inbound, PortLocal: 5065, PortPeer: 5062}, peer, netip.Addr{})
	plain := withSel(&Slot{Dir: Outbound}, peer, netip.Addr{})
	for _, e := range []*Slot{outC, outS, in, plain} {
		p.track(nil, e)
	}
	if len(p.byPorts) != 2 || p.byPorts[portKey{peer, 5063, 5064}] != outS || p.byPorts[portKey{peer, 5065, 5062}] != outC {
		t.Fatalf("index %v", p.byPorts)
	}
	// A rebuilt outS (update in place) replaces the old; removing the old
	// afterwards must not drop the new one.
	outS2 := withSel(&Slot{Dir: Outbound, PortLocal: 5063, PortPeer: 5064}, peer, netip.Addr{})
	p.track(outS, outS2)
	p.track(outS, nil)
	if p.byPorts[portKey{peer, 5063, 5064}] != outS2 {
		t.Fatal("update lost the new entry")
	}
	p.track(outS2, nil)
	p.track(outC, nil)
	if len(p.byPorts) != 0 {
		t.Fatalf("left %v", p.byPorts)
	}
}
