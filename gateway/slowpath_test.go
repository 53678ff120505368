package gateway

import (
	"bytes"
	"context"
	"github.com/xesp/xesp/internal/pkt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/dataplane/slowpath"
)

// restart stops tp's gateway, lets change adjust the links and the
// config, and starts a new gateway in its place (newTopo's cleanup stops
// whichever gateway tp holds). The workers read the links' MTUs at start,
// so an MTU change needs a restart.
func (tp *topo) restart(t *testing.T, change func(cfg *config.Config)) {
	t.Helper()
	cfg := *tp.g.Config
	if err := tp.g.Stop(false); err != nil {
		t.Fatalf("stop gateway: %v", err)
	}
	change(&cfg)
	if err := tp.gw.Do(func() (err error) {
		tp.g, err = Start(context.Background(), &cfg, Options{NoPin: true})
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// jumboPrivate gives the private link a 9000-byte MTU on both ends so a
// reassembled SIP message fits it in one packet.
func (tp *topo) jumboPrivate(t *testing.T) {
	tp.restart(t, func(*config.Config) {
		tp.phone.MustRun("ip", "link", "set", tp.phIf, "mtu", "1500")
		tp.gw.MustRun("ip", "link", "set", tp.pubIf, "mtu", "1500")
		tp.gw.MustRun("ip", "link", "set", tp.privIf, "mtu", "9000")
		tp.core.MustRun("ip", "link", "set", tp.coreIf, "mtu", "9000")
	})
}

// fragments is how many IPv4 fragments a UDP datagram with this payload
// becomes on a 1500-byte link.
func fragments(payload int) uint64 { return uint64((8 + payload + 1479) / 1480) }

func slowStats(tp *topo) slowpath.Stats { return tp.g.SlowPath.Stats() }

// A SIP INVITE too big for the phone's link once in ESP-in-UDP: the
// phone's kernel fragments it, XDP passes the fragments up, the kernel
// reassembles the datagram onto the slow path, the slow path injects it
// into the owning worker, and the core receives the exact inner packet.
// The answers (one small, one pre-fragmented before sealing) reach the
// phone and open.
func TestSlowPathFragmentedESP(t *testing.T) {
	tp := newTopo(t, 2)
	tp.jumboPrivate(t)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	noDF(t, coreUDP) // the 3000-byte answer is pre-fragmented, not refused
	coreRaw := packetSock(t, tp.core, tp.coreIf)
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)

	invite := bytes.Repeat([]byte("INVITE sip:bob@ims.example SIP/2.0 with SDP "), 68)[:2972]
	inner := pkt.UDP4(phoneInner, coreAddr, invite) // 3000 bytes
	espPkt := seal(t, phoneOut, inner)
	if _, err := phone.WriteToUDP(espPkt, gwPublic); err != nil {
		t.Fatal(err)
	}
	fwd := forwarded(inner) // the gateway is a router: TTL one less
	frame := nextFrame(t, coreRaw, func(f []byte) bool { return len(f) > 14 && bytes.Equal(f[14:], fwd) })
	if len(frame) != 14+len(inner) {
		t.Fatalf("core frame %d bytes", len(frame))
	}
	buf := make([]byte, 65536)
	coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := coreUDP.ReadFromUDPAddrPort(buf)
	if err != nil || from != phoneInner || !bytes.Equal(buf[:n], invite) {
		t.Fatalf("core got %d bytes from %v (%v)", n, from, err)
	}
	if got, want := xdpCount(t, tp.g, bpf.PassFragment), fragments(len(espPkt)); got != want {
		t.Fatalf("XDP passed %d fragments, want %d", got, want)
	}
	// The slow path publishes its counts after its batch, which may be
	// after the worker already forwarded the packet to the core.
	eventually(t, "esp_injected on the slow path", func() bool { return slowStats(tp)[slowpath.ESPInjected] >= 1 })
	if s := slowStats(tp); s[slowpath.ESPInjected] != 1 || s[slowpath.NoSA] != 0 || s[slowpath.InjectFull] != 0 {
		t.Fatalf("slow path stats %v", s)
	}
	var decap uint64
	for _, w := range tp.g.Workers {
		decap += w.Stats().Decap.Packets.Load()
	}
	if decap != 1 {
		t.Fatalf("workers decapsulated %d packets, want 1", decap)
	}

	for _, reply := range [][]byte{
		[]byte("SIP/2.0 100 Trying\r\n\r\n"),
		bytes.Repeat([]byte("SIP/2.0 200 OK with an SDP answer "), 90)[:3000],
	} {
		if _, err := coreUDP.WriteToUDPAddrPort(reply, phoneInner); err != nil {
			t.Fatal(err)
		}
		if got, _ := recvInner(t, phone, phoneIn); len(got) < 28 || !bytes.Equal(got[28:], reply) {
			t.Fatalf("phone decrypted %d bytes, want the %d-byte reply", len(got), len(reply))
		}
	}
}

// IKE: with no endpoint configured it is counted and dropped; with
// slow_path.ike_forward set, the phone's datagram reaches the "IKE daemon"
// verbatim (non-ESP marker included) and the daemon's answer reaches the
// phone from 192.0.2.1:4500.
func TestSlowPathIKERelay(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	initReq := append([]byte{0, 0, 0, 0}, "IKE_SA_INIT request: SPIi 0x1122334455667788"...)
	if _, err := phone.WriteToUDP(initReq, gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ike_dropped", func() bool { return slowStats(tp)[slowpath.IKEDropped] == 1 })
	if got := xdpCount(t, tp.g, bpf.PassIKE); got != 1 {
		t.Fatalf("XDP pass_ike %d, want 1", got)
	}

	daemon := udpSock(t, tp.gw, "127.0.0.1:0")
	daemonAddr := daemon.LocalAddr().(*net.UDPAddr).AddrPort()
	tp.restart(t, func(cfg *config.Config) {
		cfg.SlowPath.IKEForward = daemonAddr.String()
		cfg.SlowPath.IKEForwardAddr = daemonAddr
	})
	if _, err := phone.WriteToUDP(initReq, gwPublic); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	daemon.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, relay, err := daemon.ReadFromUDPAddrPort(buf)
	if err != nil || !bytes.Equal(buf[:n], initReq) {
		t.Fatalf("IKE daemon got %q (%v)", buf[:n], err)
	}
	if !relay.Addr().IsLoopback() {
		t.Fatalf("relay source %v is not on loopback", relay)
	}
	initResp := append([]byte{0, 0, 0, 0}, "IKE_SA_INIT response: SPIr 0x99aabbccddeeff00"...)
	if _, err := daemon.WriteToUDPAddrPort(initResp, relay); err != nil {
		t.Fatal(err)
	}
	phone.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := phone.ReadFromUDPAddrPort(buf)
	if err != nil || !bytes.Equal(buf[:n], initResp) || from != netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 4500) {
		t.Fatalf("phone got %q from %v (%v), want the daemon's answer from 192.0.2.1:4500", buf[:n], from, err)
	}
	// The counters follow the sends the daemon and the phone may already
	// have seen.
	eventually(t, "ike_returned", func() bool { return slowStats(tp)[slowpath.IKEReturned] == 1 })
	eventually(t, "ike_relayed", func() bool { return slowStats(tp)[slowpath.IKERelayed] == 1 })
	if s := slowStats(tp); s[slowpath.IKERelayed] != 1 || s[slowpath.RelayErrors] != 0 {
		t.Fatalf("slow path stats %v", s)
	}
}

// Fragmented ESP with an SPI no SA has gets as far as the slow path, which
// counts it (XDP cannot: a fragment shows no SPI). Keepalives from the
// phone are XDP's to count; one that bypasses XDP (sent locally) is the
// slow path's.
func TestSlowPathUnknownSPIAndKeepalive(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	stranger := mustSA(t, 0x7777, keyIn, 0)
	espPkt := seal(t, stranger, pkt.UDP4(phoneInner, coreAddr, make([]byte, 2500)))
	if _, err := phone.WriteToUDP(espPkt, gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no_sa on the slow path", func() bool { return slowStats(tp)[slowpath.NoSA] == 1 })
	if got, want := xdpCount(t, tp.g, bpf.PassFragment), fragments(len(espPkt)); got != want {
		t.Fatalf("XDP passed %d fragments, want %d", got, want)
	}

	if _, err := phone.WriteToUDP([]byte{0xff}, gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "drop_keepalive in XDP", func() bool { return xdpCount(t, tp.g, bpf.DropKeepalive) == 1 })
	local := udpSock(t, tp.gw, "192.0.2.1:0")
	if _, err := local.WriteToUDP([]byte{0xff}, gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "keepalive on the slow path", func() bool { return slowStats(tp)[slowpath.Keepalive] == 1 })
	s := slowStats(tp)
	want := slowpath.Stats{}
	want[slowpath.NoSA], want[slowpath.Keepalive] = 1, 1
	if s != want {
		t.Fatalf("slow path stats %v, want %v", s, want)
	}
	for _, w := range tp.g.Workers {
		if n := w.Stats().Decap.Packets.Load(); n != 0 {
			t.Fatalf("worker %d decapsulated %d packets", w.ID(), n)
		}
	}
}
