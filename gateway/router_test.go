package gateway

import (
	"context"

	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
)

func workerDrops(tp *topo, dir func(*worker.Stats) *worker.DirStats, d worker.Drop) (n uint64) {
	for _, w := range tp.g.Workers {
		n += dir(w.Stats()).Drops[d].Load()
	}
	return n
}

func decapOf(s *worker.Stats) *worker.DirStats { return &s.Decap }
func encapOf(s *worker.Stats) *worker.DirStats { return &s.Encap }

// Selectors both ways through a running gateway (RFC 4301 5.2, 5.1): an
// authenticated phone reaches only inner.local (10.0.0.0/24), and only
// cleartext from inner.local is sealed toward it; the rest is dropped as
// `selector` and never leaves.
func TestGatewaySelectorsBothWays(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)

	// Inbound: 10.0.1.9 is outside inner.local; the core's link never
	// sees it (a route would take it there otherwise).
	tp.gw.MustRun("ip", "route", "add", "10.0.1.0/24", "via", "10.0.0.1")
	coreRaw := packetSock(t, tp.core, tp.coreIf)
	for _, dst := range []string{"10.0.1.9:5060", coreAddr.String()} {
		inner := pkt.UDP4(phoneInner, netip.MustParseAddrPort(dst), []byte("to "+dst))
		if _, err := phone.WriteToUDP(seal(t, phoneOut, inner), gwPublic); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 2048)
	coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := coreUDP.Read(buf); err != nil || string(buf[:n]) != "to "+coreAddr.String() {
		t.Fatalf("core got %q (%v)", buf[:n], err)
	}
	eventually(t, "one inbound selector drop", func() bool { return workerDrops(tp, decapOf, worker.DropPolicy) == 1 })
	// Had it been forwarded, it would have gone to the core's MAC (the
	// route's next hop) before the allowed packet, which the core got.
	unix.SetsockoptTimeval(coreRaw, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200000})
	for {
		n, _, err := unix.Recvfrom(coreRaw, buf, 0)
		if err != nil {
			break
		}
		if n > 34 && buf[12] == 8 && netip.AddrFrom4([4]byte(buf[30:34])) == netip.MustParseAddr("10.0.1.9") {
			t.Fatal("the packet outside inner.local reached the core's link")
		}
	}
}

// The outbound half: a core host outside inner.local (10.1.0.1, on the
// same link) sends to the phone's inner address; XDP steers it by
// destination, the worker refuses to seal it.
func TestGatewayOutboundSelector(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	udpSock(t, tp.core, coreAddr.String())
	tp.core.MustRun("ip", "addr", "add", "10.1.0.1/32", "dev", tp.coreIf)
	stranger := udpSock(t, tp.core, "10.1.0.1:5060")
	coreUDP := udpSock(t, tp.core, "10.0.0.1:5070")
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)
	if _, err := phone.WriteToUDP(seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the phone's first packet", func() bool { return tp.g.Workers[0].Stats().Decap.Packets.Load() == 1 })
	if _, err := stranger.WriteToUDPAddrPort([]byte("from outside inner.local"), phoneInner); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the outbound selector drop", func() bool { return workerDrops(tp, encapOf, worker.DropPolicy) == 1 })
	if _, err := coreUDP.WriteToUDPAddrPort([]byte("from inner.local"), phoneInner); err != nil {
		t.Fatal(err)
	}
	inner, _ := recvInner(t, phone, phoneIn)
	if string(inner[28:]) != "from inner.local" {
		t.Fatalf("phone got %q", inner[28:])
	}
}

// Idle phones through a running gateway: the inbound SA's last-seen
// follows authenticated packets; NAT-keepalives from the current binding
// are stamped by XDP (and one from another port moves nothing); when both
// stop for idle.timeout an idle event is raised.
func TestGatewayIdlePhone(t *testing.T) {
	tp := newTopo(t, 1)
	tp.restart(t, func(cfg *config.Config) { cfg.Idle.Every = 2 * time.Second })
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	other := udpSock(t, tp.phone, "192.0.2.10:40000")
	udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	in := sa.ID{Dir: sa.In, SPI: spiIn}
	before := time.Now()
	if _, err := phone.WriteToUDP(seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "last seen", func() bool {
		c, _ := tp.g.Manager.Counters(in)
		return !c.LastSeen.Before(before)
	})
	// The manager registers the binding within a second; keepalives
	// from it are stamped from then on.
	eventually(t, "a stamped keepalive", func() bool {
		phone.WriteToUDP([]byte{0xff}, gwPublic)
		return !tp.g.Manager.LastKeepalive(in).Before(before)
	})
	other.WriteToUDP([]byte{0xff}, gwPublic)
	eventually(t, "the stranger's keepalive dropped in XDP", func() bool { return xdpCount(t, tp.g, bpf.DropKeepalive) >= 2 })
	if e, _ := tp.g.SAD.Get(in); e.Binding != netip.MustParseAddrPort("192.0.2.10:4500") {
		t.Fatalf("a keepalive moved the binding to %s", e.Binding)
	}
	// Silence: the idle event comes about 2 s after the last keepalive.
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	var since uint64
	for {
		if err := tp.g.Lifetime.Wait(ctx, since); err != nil {
			t.Fatalf("no idle event: %v", err)
		}
		evs, next := tp.g.Lifetime.Events(since, 10)
		since = next
		for _, ev := range evs {
			if ev.Kind == lifetime.Idle && ev.ID == in {
				if ev.Threshold != 2 || tp.g.Lifetime.IdleNow() != 1 {
					t.Fatalf("idle event %+v, idle now %d", ev, tp.g.Lifetime.IdleNow())
				}
				return
			}
		}
	}
}
