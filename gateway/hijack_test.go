package gateway

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
)

// Binding hijack (issue 7): an attacker who can send from another address
// or port and who has seen the phone's packets tries to pull the phone's
// replies toward itself. Through the real XDP + AF_XDP path: forged
// packets (the phone's SPI, a wrong ICV; a sequence number far ahead) and
// replays of the phone's own valid packets, from a new address and from
// a new port on the phone's address, are all dropped with their reason,
// never reach the core and never move the NAT binding; the core's reply
// still goes to the phone's real port. Then the phone itself moves (a
// fresh authenticated packet from a new port) and the binding follows,
// which shows the binding could have moved had the checks let a packet by.
func TestGatewayBindingHijack(t *testing.T) {
	tp := newTopo(t, 1)
	tp.phone.MustRun("ip", "addr", "add", "192.0.2.66/24", "dev", tp.phIf)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	attackers := []*net.UDPConn{
		udpSock(t, tp.phone, "192.0.2.66:4500"),  // another address, the NAT-T port
		udpSock(t, tp.phone, "192.0.2.66:33333"), // another address and port
		udpSock(t, tp.phone, "192.0.2.10:50000"), // the phone's address, another port
	}
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	id := sa.ID{Dir: sa.In, SPI: spiIn}
	home := netip.MustParseAddrPort("192.0.2.10:4500")

	// Three genuine packets from the phone's real mapping.
	var genuine [][]byte
	for i := 0; i < 3; i++ {
		p := seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER")))
		genuine = append(genuine, p)
		if _, err := phone.WriteToUDP(p, gwPublic); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 2048)
	coreRead := func(d time.Duration) (int, error) {
		coreUDP.SetReadDeadline(time.Now().Add(d))
		return coreUDP.Read(buf)
	}
	for i := 0; i < 3; i++ {
		if _, err := coreRead(3 * time.Second); err != nil {
			t.Fatalf("genuine packet %d did not reach the core: %v", i+1, err)
		}
	}

	// The attack: every captured packet replayed from every attacker
	// socket, and forgeries under the phone's SPI.
	var forged [][]byte
	{
		// Wrong ICV on an otherwise well-formed, not-yet-seen sequence number.
		// (Sequence numbers below 4 would be dropped as replays before
		// the ICV is checked, RFC 4303 3.4.3.)
		ahead := mustSA(t, spiIn, keyIn, 0)
		ahead.SetNextSeq(100)
		f := append([]byte(nil), seal(t, ahead, pkt.UDP4(phoneInner, coreAddr, []byte("x")))...)
		f[len(f)-1] ^= 0x80
		forged = append(forged, f)
		// A sequence number far ahead with a garbage body: must neither
		// authenticate nor advance the window.
		far := append([]byte(nil), genuine[0]...)
		far[4], far[5], far[6], far[7] = 0, 0, 0x10, 0
		forged = append(forged, far)
		// A different key under the right SPI (an attacker's own SA).
		other := mustSA(t, spiIn, "ff0102030405060708090a0b0c0d0e0f10111213", 0)
		other.SetNextSeq(200)
		forged = append(forged, seal(t, other, pkt.UDP4(phoneInner, coreAddr, []byte("INVITE"))))
	}
	sent := map[string]int{}
	for _, a := range attackers {
		for _, p := range genuine {
			if _, err := a.WriteToUDP(p, gwPublic); err != nil {
				t.Fatal(err)
			}
			sent["replay"]++
		}
		for _, p := range forged {
			if _, err := a.WriteToUDP(p, gwPublic); err != nil {
				t.Fatal(err)
			}
			sent["forged"]++
		}
	}
	// Replays of the genuine packets from the phone's own mapping too.
	for _, p := range genuine {
		phone.WriteToUDP(p, gwPublic)
		sent["replay"]++
	}
	st := tp.g.Workers[0].Stats()
	eventually(t, "every attack packet dropped", func() bool {
		return st.Decap.Drops[esp.ReasonReplay].Load() == uint64(sent["replay"]) &&
			st.Decap.Drops[esp.ReasonIntegrity].Load() == uint64(sent["forged"])
	})
	if n, err := coreRead(200 * time.Millisecond); err == nil {
		t.Fatalf("an attack packet reached the core: %q", buf[:n])
	}
	c, _ := tp.g.Manager.Counters(id)
	if c.Packets != 3 || c.Seq != 3 || c.Drops != uint64(sent["replay"]+sent["forged"]) {
		t.Fatalf("SA counters %+v, want 3 packets, seq 3, %d drops", c, sent["replay"]+sent["forged"])
	}
	if c.Binding.Addr != home {
		t.Fatalf("data-path binding moved to %v", c.Binding.Addr)
	}
	if e, _ := tp.g.SAD.Get(id); e.Binding != home {
		t.Fatalf("SAD binding moved to %v", e.Binding)
	}
	if n := st.BindingChanges.Load(); n != 0 {
		t.Fatalf("%d binding changes during the attack", n)
	}

	// Replies still go to the phone's real mapping only.
	if _, err := coreUDP.WriteToUDPAddrPort([]byte("200 OK"), phoneInner); err != nil {
		t.Fatal(err)
	}
	phone.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := phone.Read(buf); err != nil {
		t.Fatalf("the phone lost its reply: %v", err)
	}
	for _, a := range attackers {
		a.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := a.Read(buf); err == nil {
			t.Fatalf("attacker %s received %d bytes of the phone's traffic", a.LocalAddr(), n)
		}
	}

	// The forged far-ahead sequence number did not advance the window: the
	// phone's next packet (seq 4) is accepted, here from a new port, and
	// the binding follows it.
	moved := attackers[2]
	if _, err := moved.WriteToUDP(seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	if _, err := coreRead(3 * time.Second); err != nil {
		t.Fatalf("the phone's fourth packet was not accepted: %v", err)
	}
	eventually(t, "the binding to follow the phone's authenticated packet", func() bool {
		e, _ := tp.g.SAD.Get(id)
		return e.Binding == netip.MustParseAddrPort("192.0.2.10:50000") && st.BindingChanges.Load() == 1
	})
	if st.Decap.Drops[worker.DropPolicy].Load() != 0 {
		t.Fatal("unexpected policy drops")
	}
}
