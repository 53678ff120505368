package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/internal/procs"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

const (
	keyIn  = "000102030405060708090a0b0c0d0e0f10111213" // phone → gateway, aes128gcm16 key||salt
	keyOut = "202122232425262728292a2b2c2d2e2f30313233" // gateway → phone
	spiIn  = 0x1001
	spiOut = 0x2001
)

// topo is phone ─ gw ─ core, the gateway running in-process in gw.
type topo struct {
	phone, gw, core *netns.NS
	phIf, pubIf     string
	privIf, coreIf  string
	g               *Gateway
}

func newTopo(t *testing.T, workers int) *topo {
	t.Helper()
	return newTopoWith(t, workers, Options{})
}

// newTopoWith is newTopo with gateway options (NoPin is always set).
func newTopoWith(t *testing.T, workers int, o Options) *topo {
	t.Helper()
	return newTopoConfig(t, workers, o, "", nil)
}

// newTopoConfig is newTopoWith with more SAs appended under sas: and a
// change to the parsed configuration (nil: none).
func newTopoConfig(t *testing.T, workers int, o Options, extra string, mod func(*config.Config)) *topo {
	t.Helper()
	return newTopoQueues(t, workers, 1, o, extra, mod)
}

// newTopoQueues is newTopoConfig with queues TX and RX queues on every
// veth end.
func newTopoQueues(t *testing.T, workers, queues int, o Options, extra string, mod func(*config.Config)) *topo {
	t.Helper()
	tp := &topo{phone: netns.ForTest(t, "ph"), gw: netns.ForTest(t, "gw"), core: netns.ForTest(t, "co")}
	tp.phIf, tp.pubIf = netns.VethQueuesForTest(t, tp.phone, tp.gw, queues)
	tp.privIf, tp.coreIf = netns.VethQueuesForTest(t, tp.gw, tp.core, queues)
	tp.phone.MustRun("ip", "addr", "add", "192.0.2.10/24", "dev", tp.phIf)
	tp.gw.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", tp.pubIf)
	tp.gw.MustRun("ip", "addr", "add", "10.0.0.254/24", "dev", tp.privIf)
	tp.core.MustRun("ip", "addr", "add", "10.0.0.1/24", "dev", tp.coreIf)
	tp.core.MustRun("ip", "route", "add", "10.99.0.0/16", "via", "10.0.0.254")

	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1]}
private: {interface: %s}
workers: %d
state_dir: %s
umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}
sas:
  - {name: ue1-in, spi: %d, direction: in, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
     local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}}
  - {name: ue1-out, spi: %d, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
     local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}}
`, tp.pubIf, tp.privIf, workers, t.TempDir(), spiIn, keyIn, spiOut, keyOut) + extra
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		t.Fatal(err)
	}
	if mod != nil {
		mod(cfg)
	}
	if err := tp.gw.Do(func() (err error) {
		o.NoPin = true
		tp.g, err = Start(context.Background(), cfg, o)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			tp.dump(t)
		}
		if err := tp.g.Stop(false); err != nil {
			t.Errorf("stop gateway: %v", err)
		}
	})
	return tp
}

// dump logs what the data path counted, for a failed test.
func (tp *topo) dump(t *testing.T) {
	var s maps.Snapshot
	if err := tp.g.Maps.Counters.Read(&s); err == nil {
		for r := range s {
			if s[r].Packets > 0 {
				t.Logf("xdp %s: %d", bpf.Reason(r), s[r].Packets)
			}
		}
	}
	for _, w := range tp.g.Workers {
		st := w.Stats()
		for _, d := range []*worker.DirStats{&st.Decap, &st.Encap} {
			for r := range d.Drops {
				if n := d.Drops[r].Load(); n > 0 {
					t.Logf("worker %d drop %s: %d", w.ID(), worker.Drop(r), n)
				}
			}
		}
		t.Logf("worker %d: decap %d encap %d polls %d", w.ID(), st.Decap.Packets.Load(), st.Encap.Packets.Load(), st.Polls.Load())
	}
	t.Logf("resolver: %+v", tp.g.Neighbors.Stats())
}

func mustSA(t *testing.T, spi uint32, key string, window int) *esp.Transform {
	t.Helper()
	k, _ := hex.DecodeString(key)
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// seal returns the ESP packet (SPI..ICV) for inner under s.
func seal(t *testing.T, s *esp.Transform, inner []byte) []byte {
	t.Helper()
	buf := make([]byte, 64+len(inner)+64)
	copy(buf[64:], inner)
	start, end, err := s.Seal(buf, 64, len(inner), esp.NextHeaderFor(inner), 0)
	if err != nil {
		t.Fatal(err)
	}
	return buf[start:end]
}

// packetSock opens an AF_PACKET socket on ifname inside ns: it sees every
// frame on the link, byte for byte.
func packetSock(t *testing.T, ns *netns.NS, ifname string) int {
	t.Helper()
	var fd int
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index})
	}); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(3 * time.Second))
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// forwarded is an IPv4 packet as a router forwards it: TTL one less,
// header checksum recomputed.
func forwarded(ip []byte) []byte {
	f := append([]byte(nil), ip...)
	f[8]--
	f[10], f[11] = 0, 0
	binary.BigEndian.PutUint16(f[10:], ^pkt.Fold(pkt.Sum(f[:int(f[0]&0x0f)*4], 0)))
	return f
}

// nextFrame returns the next incoming frame on fd for which match is true.
func nextFrame(t *testing.T, fd int, match func([]byte) bool) []byte {
	t.Helper()
	buf := make([]byte, 9000)
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatalf("no matching frame: %v", err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if match(buf[:n]) {
			return append([]byte(nil), buf[:n]...)
		}
	}
	t.Fatal("no matching frame before the deadline")
	return nil
}

func udpSock(t testing.TB, ns *netns.NS, addr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() error {
		a, err := net.ResolveUDPAddr("udp4", addr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP("udp4", a)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func macOf(t *testing.T, ns *netns.NS, ifname string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err == nil {
			mac = ifi.HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return mac
}

func xdpCount(t *testing.T, g *Gateway, r bpf.Reason) uint64 {
	t.Helper()
	var s maps.Snapshot
	if err := g.Maps.Counters.Read(&s); err != nil {
		t.Fatal(err)
	}
	return s[r].Packets
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if f() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

var (
	phoneInner = netip.MustParseAddrPort("10.99.0.1:5060")
	coreAddr   = netip.MustParseAddrPort("10.0.0.1:5060")
	gwPublic   = &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4500}
)

// The whole path, both directions, byte for byte: ESP-in-UDP from the
// phone comes out on the private side as the exact inner packet; the
// core's reply comes out on the public side as the exact ESP packet a
// reference SA produces, to the phone's NAT binding.
func TestGatewayBothDirectionsByteExact(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	coreRaw := packetSock(t, tp.core, tp.coreIf)
	phoneRaw := packetSock(t, tp.phone, tp.phIf)

	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)
	ref := mustSA(t, spiOut, keyOut, 0) // the gateway's outbound SA, replayed

	// Decap.
	inner := pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER sip:ims.example SIP/2.0\r\n\r\n"))
	if _, err := phone.WriteToUDP(seal(t, phoneOut, inner), gwPublic); err != nil {
		t.Fatal(err)
	}
	fwd := forwarded(inner) // the gateway is a router: TTL one less
	frame := nextFrame(t, coreRaw, func(f []byte) bool { return len(f) > 14 && bytes.Equal(f[14:], fwd) })
	if got, want := net.HardwareAddr(frame[0:6]), macOf(t, tp.core, tp.coreIf); got.String() != want.String() {
		t.Fatalf("decap frame to %s, want the core's MAC %s", got, want)
	}
	if got, want := net.HardwareAddr(frame[6:12]), macOf(t, tp.gw, tp.privIf); got.String() != want.String() {
		t.Fatalf("decap frame from %s, want the gateway's private MAC %s", got, want)
	}
	buf := make([]byte, 2048)
	coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := coreUDP.ReadFromUDPAddrPort(buf)
	if err != nil || from != phoneInner || !bytes.Equal(buf[:n], inner[28:]) {
		t.Fatalf("core got %q from %v (%v)", buf[:n], from, err)
	}

	// Encap: the core answers the phone's inner address.
	reply := []byte("SIP/2.0 200 OK\r\n\r\n")
	if _, err := coreUDP.WriteToUDPAddrPort(reply, phoneInner); err != nil {
		t.Fatal(err)
	}
	out := nextFrame(t, phoneRaw, func(f []byte) bool {
		return len(f) > 42 && f[23] == 17 && binary.BigEndian.Uint16(f[34:]) == 4500
	})
	n, err = phone.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	espPkt := append([]byte(nil), buf[:n]...)
	res, err := phoneIn.Open(buf[:n])
	if err != nil {
		t.Fatalf("phone cannot open the gateway's ESP: %v", err)
	}
	got := buf[res.Start:res.End]
	if src, dst := netip.AddrFrom4([4]byte(got[12:16])), netip.AddrFrom4([4]byte(got[16:20])); src != coreAddr.Addr() || dst != phoneInner.Addr() || !bytes.Equal(got[28:], reply) {
		t.Fatalf("phone decrypted %x", got)
	}
	// The reference SA at the same sequence number seals the same inner
	// packet to the same bytes: GCM's IV is the sequence number.
	if want := seal(t, ref, got); !bytes.Equal(espPkt, want) {
		t.Fatalf("ESP from the gateway\n got %x\nwant %x", espPkt, want)
	}
	// And the frame around it: Ethernet to the phone's MAC (learned from
	// its authenticated packet), IPv4 192.0.2.1 → 192.0.2.10, DF clear
	// with the worker's first IP ID, UDP 4500 → 4500 with checksum 0
	// (RFC 3948 2.1).
	wantFrame := make([]byte, 14+28+len(espPkt))
	copy(wantFrame[14+28:], espPkt)
	if _, err := esp.PutOuter(wantFrame, 42, len(wantFrame), &esp.Outer{Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("192.0.2.10"), Encap: true, SrcPort: 4500, DstPort: 4500, ID: 1}); err != nil {
		t.Fatal(err)
	}
	copy(wantFrame[0:6], macOf(t, tp.phone, tp.phIf))
	copy(wantFrame[6:12], macOf(t, tp.gw, tp.pubIf))
	wantFrame[12], wantFrame[13] = 0x08, 0x00
	if !bytes.Equal(out, wantFrame) {
		t.Fatalf("frame on the public side\n got %x\nwant %x", out, wantFrame)
	}

	// Per-SA counters match what was sent.
	in, _ := tp.g.Manager.Counters(sa.ID{Dir: sa.In, SPI: spiIn})
	outC, _ := tp.g.Manager.Counters(sa.ID{Dir: sa.Out, SPI: spiOut, Peer: netip.MustParseAddrPort("192.0.2.10:4500")})
	if in.Packets != 1 || in.Seq != 1 || outC.Packets != 1 || outC.Seq != 1 {
		t.Fatalf("per-SA counters: in %+v out %+v", in, outC)
	}
	st := tp.g.Workers[0].Stats()
	if st.Decap.Packets.Load() != 1 || st.Encap.Packets.Load() != 1 {
		t.Fatalf("worker forwarded decap %d encap %d", st.Decap.Packets.Load(), st.Encap.Packets.Load())
	}
}

// Unknown SPI (XDP), bad ICV and replay (worker) are dropped and counted by
// reason; nothing reaches the core.
func TestGatewayDropsByReason(t *testing.T) {
	tp := newTopo(t, 2)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	stranger := mustSA(t, 0x7777, keyIn, 0)
	inner := pkt.UDP4(phoneInner, coreAddr, []byte("OPTIONS"))

	if _, err := phone.WriteToUDP(seal(t, stranger, inner), gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "drop_no_sa", func() bool { return xdpCount(t, tp.g, bpf.DropNoSA) == 1 })

	good := seal(t, phoneOut, inner)
	bad := append([]byte(nil), seal(t, phoneOut, inner)...)
	bad[len(bad)-1] ^= 1
	for _, p := range [][]byte{bad, good, good} {
		if _, err := phone.WriteToUDP(p, gwPublic); err != nil {
			t.Fatal(err)
		}
	}
	drops := func(d worker.Drop) (n uint64) {
		for _, w := range tp.g.Workers {
			n += w.Stats().Decap.Drops[d].Load()
		}
		return n
	}
	eventually(t, "integ_error and replay drops", func() bool {
		return drops(worker.Drop(esp.ReasonIntegrity)) == 1 && drops(worker.Drop(esp.ReasonReplay)) == 1
	})
	c, _ := tp.g.Manager.Counters(sa.ID{Dir: sa.In, SPI: spiIn})
	if c.Packets != 1 || c.Drops != 2 {
		t.Fatalf("SA counters %+v, want 1 packet and 2 drops", c)
	}
	if got := xdpCount(t, tp.g, bpf.RedirectESPUDP); got != 3 {
		t.Fatalf("XDP redirected %d packets, want 3", got)
	}
}

// RFC 3948 NAT re-mapping: after an authenticated packet from a new
// source port, replies follow it; a forged packet (bad ICV) from yet
// another port does not move the binding.
func TestGatewayFollowsNATRemapping(t *testing.T) {
	tp := newTopo(t, 1)
	oldPort := udpSock(t, tp.phone, "192.0.2.10:4500")
	newPort := udpSock(t, tp.phone, "192.0.2.10:40000")
	forger := udpSock(t, tp.phone, "192.0.2.10:50000")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	inner := pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER"))

	for _, c := range []*net.UDPConn{oldPort, newPort} {
		if _, err := c.WriteToUDP(seal(t, phoneOut, inner), gwPublic); err != nil {
			t.Fatal(err)
		}
	}
	forged := seal(t, phoneOut, inner)
	forged[20] ^= 0x55
	if _, err := forger.WriteToUDP(forged, gwPublic); err != nil {
		t.Fatal(err)
	}
	id := sa.ID{Dir: sa.In, SPI: spiIn}
	eventually(t, "binding at port 40000 in the SAD", func() bool {
		e, ok := tp.g.SAD.Get(id)
		return ok && e.Binding == netip.MustParseAddrPort("192.0.2.10:40000")
	})
	eventually(t, "the forged packet's drop", func() bool {
		return tp.g.Workers[0].Stats().Decap.Drops[esp.ReasonIntegrity].Load() == 1
	})
	if _, err := coreUDP.WriteToUDPAddrPort([]byte("200 OK"), phoneInner); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	newPort.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := newPort.Read(buf); err != nil {
		t.Fatalf("reply did not follow the binding to port 40000: %v", err)
	}
	for _, c := range []*net.UDPConn{oldPort, forger} {
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := c.Read(buf); err == nil {
			t.Fatalf("%s got %d bytes meant for the new binding", c.LocalAddr(), n)
		}
	}
	if got := tp.g.Workers[0].Stats().BindingChanges.Load(); got != 1 {
		t.Fatalf("binding changes %d, want 1", got)
	}
}

// noDF makes c send with DF clear (IP_PMTUDISC_DONT), as a SIP stack
// that leaves fragmentation to the network does.
func noDF(t *testing.T, c *net.UDPConn) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DONT)
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
}

// recvInner reads ESP datagrams on c, opens them with s and returns the
// inner IPv4 packet, reassembling inner fragments (what the phone's IP
// stack does after its IPsec), and how many ESP packets carried it.
func recvInner(t *testing.T, c *net.UDPConn, s *esp.Transform) ([]byte, int) {
	t.Helper()
	buf := make([]byte, 65536)
	var whole []byte
	got, packets := 0, 0
	for {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("after %d ESP packets: %v", packets, err)
		}
		packets++
		res, err := s.Open(buf[:n])
		if err != nil {
			t.Fatalf("phone cannot open ESP packet %d: %v", packets, err)
		}
		ip := buf[res.Start:res.End]
		fo := binary.BigEndian.Uint16(ip[6:])
		if fo&0x3fff == 0 {
			return append([]byte(nil), ip...), packets
		}
		hl := int(ip[0]&0x0f) * 4
		off := int(fo&0x1fff) * 8
		if whole == nil {
			whole = make([]byte, 65536)
		}
		if off == 0 {
			copy(whole, ip[:hl])
		}
		copy(whole[20+off:], ip[hl:])
		got += len(ip) - hl
		if fo&0x2000 == 0 && got == off+len(ip)-hl {
			w := whole[:20+got]
			binary.BigEndian.PutUint16(w[2:], uint16(len(w)))
			w[6], w[7] = 0, 0
			return w, packets
		}
	}
}

// A DF-clear reply larger than the public MTU once sealed is split into
// inner fragments before sealing (RFC 4459 pre-fragmentation): every
// outer packet fits the link whole (no outer fragment for a NAPT to
// drop), each is one ESP packet, and the phone reassembles the inner
// fragments after decryption.
func TestGatewayPreFragmentsLargeReplies(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	noDF(t, coreUDP)
	phoneRaw := packetSock(t, tp.phone, tp.phIf)
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)
	if _, err := phone.WriteToUDP(seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := coreUDP.Read(buf); err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("SIP/2.0 200 OK with a large SDP body. "), 38)[:1440] // 1468-byte inner packet
	if _, err := coreUDP.WriteToUDPAddrPort(big, phoneInner); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		f := nextFrame(t, phoneRaw, func(f []byte) bool { return len(f) > 34 && f[23] == 17 && binary.BigEndian.Uint16(f[36:]) == 4500 })
		if len(f) > 14+1500 || binary.BigEndian.Uint16(f[20:])&0x3fff != 0 {
			t.Fatalf("outer packet: %d bytes, frag field %#x: want whole and within the MTU", len(f), binary.BigEndian.Uint16(f[20:]))
		}
	}
	inner, packets := recvInner(t, phone, phoneIn)
	if packets != 2 || !bytes.Equal(inner[28:], big) || inner[8] != 63 {
		t.Fatalf("phone reassembled %d bytes (TTL %d) from %d ESP packets", len(inner), inner[8], packets)
	}
	st := tp.g.Workers[0].Stats()
	if st.Encap.Packets.Load() != 2 || st.PreFragmented.Load() != 1 || st.PreFragments.Load() != 2 {
		t.Fatalf("encap sent %d, pre-fragmented %d into %d", st.Encap.Packets.Load(), st.PreFragmented.Load(), st.PreFragments.Load())
	}
}

// Path MTU discovery through the gateway: `ping -M do -s N` from the core
// namespace gets "Frag needed" from the gateway's private address
// carrying the inner MTU that fits the public link once sealed; after it,
// the core's kernel knows that MTU for the phone's address. A DF-clear
// ping of the same size is pre-fragmented and reaches the phone's link.
func TestGatewayPMTUProbe(t *testing.T) {
	tp := newTopo(t, 1)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	udpSock(t, tp.core, coreAddr.String()) // takes the REGISTER: no port unreachable back
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)
	if _, err := phone.WriteToUDP(seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the phone's binding", func() bool { return tp.g.Workers[0].Stats().Decap.Packets.Load() == 1 })
	fit := 1500 - 28 // the largest inner packet whose ESP-in-UDP/IPv4 fits 1500
	for 28+fit+phoneIn.Overhead(fit, 0) > 1500 {
		fit--
	}
	out, _ := tp.core.Run("ping", "-M", "do", "-s", fmt.Sprint(1460), "-c", "1", "-W", "2", phoneInner.Addr().String())
	want := fmt.Sprintf("From 10.0.0.254 icmp_seq=1 Frag needed and DF set (mtu = %d)", fit)
	if !strings.Contains(string(out), want) {
		t.Fatalf("ping -M do: want %q in:\n%s", want, out)
	}
	if route, _ := tp.core.Run("ip", "route", "get", phoneInner.Addr().String()); !strings.Contains(string(route), fmt.Sprintf("mtu %d", fit)) {
		t.Fatalf("the core did not learn the path MTU:\n%s", route)
	}
	st := tp.g.Workers[0].Stats()
	if st.ICMP[1].Load() != 1 || st.Encap.Drops[worker.DropTooBig].Load() != 1 {
		t.Fatalf("too_big ICMP %d, drops %d", st.ICMP[1].Load(), st.Encap.Drops[worker.DropTooBig].Load())
	}

	// DF clear: pre-fragmented, the echo request reaches the phone.
	tp.core.Run("ping", "-M", "dont", "-s", "1460", "-c", "1", "-W", "1", phoneInner.Addr().String())
	inner, packets := recvInner(t, phone, phoneIn)
	if packets != 2 || len(inner) != 1488 || inner[9] != 1 || inner[20] != 8 {
		t.Fatalf("phone got %d bytes (proto %d) in %d ESP packets: % x", len(inner), inner[9], packets, inner[:min(len(inner), 64)])
	}
}

// Each running worker holds a Go P of its own (internal/procs): while the
// gateway runs, GOMAXPROCS is what it was plus one per worker, so a
// worker back from poll(2) never waits for the Go scheduler; Stop gives
// them back.
func TestWorkersHoldTheirOwnP(t *testing.T) {
	base, held := runtime.GOMAXPROCS(0), procs.Held()
	t.Cleanup(func() { // runs after the gateway's Stop (cleanups run last first)
		if got := procs.Held(); got != held {
			t.Errorf("after Stop: %d Ps held, want %d", got, held)
		}
		if got := runtime.GOMAXPROCS(0); got != base {
			t.Errorf("after Stop: GOMAXPROCS %d, want %d", got, base)
		}
	})
	tp := newTopo(t, 2)
	for _, w := range tp.g.Workers {
		// Sync returns once the worker's loop has drained its commands,
		// so it has reserved its P.
		if err := w.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if got := procs.Held(); got != held+2 {
		t.Fatalf("2 workers running: %d Ps held, want %d", got, held+2)
	}
	if got := runtime.GOMAXPROCS(0); got != base+2 {
		t.Fatalf("2 workers running: GOMAXPROCS %d, want %d", got, base+2)
	}
}
