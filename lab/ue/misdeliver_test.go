package ue

import (
	"crypto/rand"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

func sipTo(user, inner string, port int) []byte {
	return fmt.Appendf(nil, "OPTIONS sip:%s@%s:%d SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n"+
		"From: <sip:core@ims.example>;tag=1\r\nTo: <sip:%s@%s>\r\nCall-ID: x@core\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
		user, inner, port, user, inner)
}

// The misdelivery counters see what they exist to see. Two phones share
// the inner address 192.168.1.10 and SIP port 5060, as first phones
// behind two NAPTs do: phone A on a TUN, phone B Go-driven. A
// deliberately wrong "gateway" crosses their SAs (B's SA sent to A's
// socket and the reverse), seals A's SA over packets for another inner
// address or port, and over a SIP request for B addressed exactly like A.
// Each lands in its own counter at the receiving phone; the one correct
// packet for each phone is delivered and counted nowhere.
func TestMisdeliveryCountersSeeCrossedSAs(t *testing.T) {
	a, b := twoNS(t)
	mk := func(spi uint32, window int) (*esp.Transform, *esp.Transform) {
		k := make([]byte, 20)
		rand.Read(k)
		cfg := esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel}
		gw, err := esp.NewTransform(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cfg.ReplayWindow = 1024
		ph, err := esp.NewTransform(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return gw, ph
	}
	inner := netip.MustParseAddr("192.168.1.10")
	gwOutA, phInA := mk(0x2001, 0)
	gwOutB, phInB := mk(0x2002, 0)
	phOutA, _ := mk(0x1001, 0)
	phOutB, _ := mk(0x1002, 0)
	gwAddr := netip.MustParseAddrPort("192.0.2.2:4500")
	ta := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: gwAddr, Out: phOutA, In: phInA,
		Inner: inner, Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}, Keepalive: -1,
		Ports: []uint16{5060}, Claim: SIPClaim("ueA")})
	var pb *Phone
	if err := a.Do(func() (err error) {
		pb, err = New(netip.MustParseAddrPort("192.0.2.1:4501"), gwAddr, phOutB, phInB)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pb.Close()
	pb.Expect(inner, []uint16{5060}, SIPClaim("ueB"))

	toA, toB := netip.MustParseAddrPort("192.0.2.1:4500"), netip.MustParseAddrPort("192.0.2.1:4501")
	core := netip.MustParseAddrPort("10.0.0.1:5060")
	at := func(addr netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(addr, port) }
	peerA := &espPeer{c: udpIn(t, b, "192.0.2.2:4500"), out: gwOutA}
	peerB := &espPeer{c: peerA.c, out: gwOutB}

	// Crossed SAs: each phone gets ESP under the other's SPI.
	peerB.send(t, pkt.UDP4(core, at(inner, 5060), sipTo("ueA", "192.168.1.10", 5060)), 4, toA)
	peerA.send(t, pkt.UDP4(core, at(inner, 5060), sipTo("ueB", "192.168.1.10", 5060)), 4, toB)
	// Right SA, wrong inner address; right SA, wrong port.
	peerA.send(t, pkt.UDP4(core, netip.MustParseAddrPort("192.168.1.11:5060"), sipTo("ueA", "192.168.1.11", 5060)), 4, toA)
	peerA.send(t, pkt.UDP4(core, at(inner, 5070), sipTo("ueA", "192.168.1.10", 5070)), 4, toA)
	peerB.send(t, pkt.UDP4(core, netip.MustParseAddrPort("192.168.1.11:5060"), sipTo("ueB", "192.168.1.11", 5060)), 4, toB)
	// Right SA, right address and port, the other phone's SIP request:
	// what a gateway that seals B's cleartext with A's SA produces.
	peerA.send(t, pkt.UDP4(core, at(inner, 5060), sipTo("ueB", "192.168.1.10", 5060)), 4, toA)
	peerB.send(t, pkt.UDP4(core, at(inner, 5060), sipTo("ueA", "192.168.1.10", 5060)), 4, toB)
	// And each phone's own request, which must be delivered.
	peerA.send(t, pkt.UDP4(core, at(inner, 5060), sipTo("ueA", "192.168.1.10", 5060)), 4, toA)
	peerB.send(t, pkt.UDP4(core, at(inner, 5060), sipTo("ueB", "192.168.1.10", 5060)), 4, toB)

	waitFor(t, "phone A's counters", func() bool { c := ta.Counters(); return c.Misdelivered().Total() == 4 && c.ToTUN == 1 })
	if m, want := ta.Counters().Misdelivered(), (Misdelivered{ForeignSPI: 1, NotAddressed: 2, OtherPhone: 1}); m != want {
		t.Fatalf("phone A misdelivered %+v, want %+v", m, want)
	}
	buf := make([]byte, 65536)
	got, drops, err := pb.Recv(buf, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatalf("phone B: %v (misdelivered %+v)", err, pb.Misdelivered())
	}
	if _, dst, payload, ok := pkt.UDP4Parse(got); !ok || dst != at(inner, 5060) || string(payload) != string(sipTo("ueB", "192.168.1.10", 5060)) {
		t.Fatalf("phone B delivered %q", got)
	}
	if m, want := pb.Misdelivered(), (Misdelivered{ForeignSPI: 1, NotAddressed: 1, OtherPhone: 1}); m != want || drops != 3 {
		t.Fatalf("phone B misdelivered %+v (%d drops), want %+v", m, drops, want)
	}
}

func TestSIPClaim(t *testing.T) {
	core := netip.MustParseAddrPort("10.0.0.1:5060")
	ph := netip.MustParseAddrPort("192.168.1.10:5060")
	claim := SIPClaim("ue1")
	for _, c := range []struct {
		msg  string
		want bool
	}{
		{"OPTIONS sip:ue1@192.168.1.10:5060 SIP/2.0\r\nTo: <sip:ue1@x>\r\n\r\n", true},
		{"OPTIONS sip:ue12@192.168.1.10:5060 SIP/2.0\r\nTo: <sip:ue1@x>\r\n\r\n", false},
		{"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.168.1.10\r\nFrom: <sip:ue1@ims.example>;tag=a\r\nTo: <sip:ue1@ims.example>;tag=b\r\n\r\n", true},
		{"SIP/2.0 200 OK\r\nFrom: <sip:ue1@ims.example>;tag=a\r\nt: <sip:ue2@ims.example>\r\n\r\n", false},
		{"SIP/2.0 200 OK\r\nFrom: <sip:ue1@ims.example>\r\n\r\n", false},
		{"hello, not SIP", true},
	} {
		if got := claim(pkt.UDP4(core, ph, []byte(c.msg))); got != c.want {
			t.Errorf("%q: claim %v, want %v", c.msg, got, c.want)
		}
	}
}
