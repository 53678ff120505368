package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"

	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
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
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
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

// tagged is an Ethernet frame from src to dst with one tag (TPID, VID)
// around an IPv4 packet.
func tagged(dst, src net.HardwareAddr, tpid, vid uint16, ip []byte) []byte {
	f := make([]byte, 18+len(ip))
	copy(f[0:], dst)
	copy(f[6:], src)
	binary.BigEndian.PutUint16(f[12:], tpid)
	binary.BigEndian.PutUint16(f[14:], vid)
	binary.BigEndian.PutUint16(f[16:], 0x0800)
	copy(f[18:], ip)
	return f
}

// nextTagged is nextFrame for a link whose receiver has no VLAN device:
// the kernel moves the tag out of the frame before packet sockets see it,
// so it comes back from PACKET_AUXDATA (TPID 0: untagged).
func nextTagged(t *testing.T, fd int, match func([]byte) bool) (frame []byte, tpid, tci uint16) {
	t.Helper()
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_AUXDATA, 1); err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 9000), make([]byte, 256)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		n, oobn, _, from, err := unix.Recvmsg(fd, buf, oob, 0)
		if err != nil {
			t.Fatalf("no matching frame: %v", err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if !match(buf[:n]) {
			continue
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_PACKET && m.Header.Type == unix.PACKET_AUXDATA && len(m.Data) >= int(unsafe.Sizeof(unix.TpacketAuxdata{})) {
				aux := (*unix.TpacketAuxdata)(unsafe.Pointer(&m.Data[0]))
				if aux.Status&unix.TP_STATUS_VLAN_VALID != 0 {
					tpid, tci = 0x8100, aux.Vlan_tci
					if aux.Status&unix.TP_STATUS_VLAN_TPID_VALID != 0 {
						tpid = aux.Vlan_tpid
					}
				}
			}
		}
		return append([]byte(nil), buf[:n]...), tpid, tci
	}
	t.Fatal("no matching frame before the deadline")
	return nil, 0, 0
}

func sendFrame(t *testing.T, fd int, ns *netns.NS, ifname string, f []byte) {
	t.Helper()
	var idx int
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		idx = ifi.Index
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Sendto(fd, f, 0, &unix.SockaddrLinklayer{Ifindex: idx, Halen: 6}); err != nil {
		t.Fatal(err)
	}
}

// VLANs over veth (this kernel has no VLAN devices, so the phone and the
// core are raw sockets that speak tagged Ethernet): the public side on
// 802.1Q VLAN 100, the private side on 802.1ad VLAN 200. The phone's
// tagged ESP takes the XDP fast path, its inner packet leaves tagged 200
// toward the core, the core's tagged reply leaves sealed and tagged 100
// toward the phone: both directions symmetric. Untagged frames on the
// VLAN side are left to the kernel.
func TestGatewayVLANs(t *testing.T) {
	tp := &topo{phone: netns.ForTest(t, "vph"), gw: netns.ForTest(t, "vgw"), core: netns.ForTest(t, "vco")}
	tp.phIf, tp.pubIf = netns.VethForTest(t, tp.phone, tp.gw)
	tp.privIf, tp.coreIf = netns.VethForTest(t, tp.gw, tp.core)
	tp.gw.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", tp.pubIf)
	tp.gw.MustRun("ip", "addr", "add", "10.0.0.254/24", "dev", tp.privIf)
	coreMAC := macOf(t, tp.core, tp.coreIf)
	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1], vlan: 100}
private: {interface: %s, vlan: 200, vlan_proto: 802.1ad, next_hop_mac: "%s"}
workers: 1
state_dir: %s
umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}
sas:
  - {name: ue1-in, spi: %d, direction: in, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
     local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}}
  - {name: ue1-out, spi: %d, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
     local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}}
`, tp.pubIf, tp.privIf, coreMAC, t.TempDir(), spiIn, keyIn, spiOut, keyOut)
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.gw.Do(func() (err error) {
		tp.g, err = Start(context.Background(), cfg, Options{NoPin: true})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			tp.dump(t)
		}
		tp.g.Stop(false)
	})
	coreRaw := packetSock(t, tp.core, tp.coreIf)
	phoneRaw := packetSock(t, tp.phone, tp.phIf)
	phoneMAC, pubMAC, privMAC := macOf(t, tp.phone, tp.phIf), macOf(t, tp.gw, tp.pubIf), macOf(t, tp.gw, tp.privIf)
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)
	phoneNAT := netip.MustParseAddrPort("192.0.2.10:4500")
	gwNAT := netip.MustParseAddrPort("192.0.2.1:4500")

	inner := pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER over VLAN 100"))
	espIn := pkt.UDP4(phoneNAT, gwNAT, seal(t, phoneOut, inner))
	binary.BigEndian.PutUint16(espIn[26:], 0) // UDP checksum 0 (RFC 3948 2.1)
	sendFrame(t, phoneRaw, tp.phone, tp.phIf, tagged(pubMAC, phoneMAC, 0x8100, 100, espIn))
	fwd := forwarded(inner)
	f, tpid, tci := nextTagged(t, coreRaw, func(f []byte) bool { return bytes.Equal(f[14:], fwd) })
	if tpid != 0x88a8 || tci&0x0fff != 200 || !bytes.Equal(f[0:6], coreMAC) {
		t.Fatalf("decapsulated frame tagged %#x/%d: want 802.1ad VLAN 200 to the core", tpid, tci&0x0fff)
	}

	reply := pkt.UDP4(coreAddr, phoneInner, []byte("200 OK over VLAN 200"))
	sendFrame(t, coreRaw, tp.core, tp.coreIf, tagged(privMAC, coreMAC, 0x88a8, 200, reply))
	f, tpid, tci = nextTagged(t, phoneRaw, func(f []byte) bool {
		return len(f) > 42 && f[23] == 17 && binary.BigEndian.Uint16(f[34:]) == 4500
	})
	if tpid != 0x8100 || tci&0x0fff != 100 || !bytes.Equal(f[0:6], phoneMAC) {
		t.Fatalf("sealed frame tagged %#x/%d: want 802.1Q VLAN 100 to the phone", tpid, tci&0x0fff)
	}
	res, err := phoneIn.Open(f[14+28:])
	if err != nil {
		t.Fatalf("phone cannot open the tagged reply: %v", err)
	}
	if got := f[14+28+res.Start : 14+28+res.End]; string(got[28:]) != "200 OK over VLAN 200" {
		t.Fatalf("phone got %q", got[28:])
	}
	if xdpCount(t, tp.g, bpf.RedirectESPUDP) != 1 || xdpCount(t, tp.g, bpf.PrivRedirect) != 1 {
		t.Fatal("tagged frames did not take the XDP fast path")
	}
	// Untagged ESP on the VLAN side is the kernel's, not the gateway's.
	sendFrame(t, phoneRaw, tp.phone, tp.phIf, append(append(append([]byte(nil), pubMAC...), phoneMAC...), append([]byte{8, 0}, espIn...)...))
	eventually(t, "pass_other_vlan", func() bool { return xdpCount(t, tp.g, bpf.PassOtherVLAN) >= 1 })
}
