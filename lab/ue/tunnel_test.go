package ue

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
)

// pairSAs returns two SA pairs with mirrored keys: a seals what b opens
// and the other way round.
func pairSAs(t *testing.T, mode esp.Mode) (aOut, aIn, bOut, bIn *esp.Transform) {
	t.Helper()
	mk := func(spi uint32, key []byte, window int) *esp.Transform {
		s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: key, ReplayWindow: window, Mode: mode})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	k1, k2 := make([]byte, 20), make([]byte, 20)
	rand.Read(k1)
	rand.Read(k2)
	return mk(0x1001, k1, 0), mk(0x2001, k2, 1024), mk(0x2001, k2, 0), mk(0x1001, k1, 1024)
}

// twoNS makes namespaces a (192.0.2.1) and b (192.0.2.2) on one veth.
func twoNS(t *testing.T) (a, b *netns.NS) {
	a, b = netns.ForTest(t, "uea"), netns.ForTest(t, "ueb")
	va, vb := netns.VethForTest(t, a, b)
	a.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", va)
	b.MustRun("ip", "addr", "add", "192.0.2.2/24", "dev", vb)
	return a, b
}

func startIn(t *testing.T, ns *netns.NS, cfg TunnelConfig) *Tunnel {
	t.Helper()
	var tun *Tunnel
	if err := ns.Do(func() (err error) { tun, err = StartTunnel(cfg); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tun.Close() })
	return tun
}

func udpIn(t *testing.T, ns *netns.NS, addr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitFor polls cond until it holds or 5 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Two TUN phones face each other in tunnel mode: an ordinary UDP socket on
// one side reaches an ordinary socket on the other through both TUNs, the
// bytes arrive unchanged both ways, and the counters agree packet for
// packet.
func TestTunnelTUNToTUN(t *testing.T) {
	a, b := twoNS(t)
	aOut, aIn, bOut, bIn := pairSAs(t, esp.ModeTunnel)
	ta := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: netip.MustParseAddrPort("192.0.2.2:4500"),
		Out: aOut, In: aIn, Inner: netip.MustParseAddr("10.99.0.1"), Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}, Keepalive: -1})
	tb := startIn(t, b, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.2:4500"), Gateway: netip.MustParseAddrPort("192.0.2.1:4500"),
		Out: bOut, In: bIn, Inner: netip.MustParseAddr("10.0.0.1"), Routes: []netip.Prefix{netip.MustParsePrefix("10.99.0.1/32")}, Keepalive: -1})

	srv := udpIn(t, b, "10.0.0.1:7000")
	cli := udpIn(t, a, "10.99.0.1:7001")
	const n = 20
	buf := make([]byte, 2000)
	for i := range n {
		msg := make([]byte, 100+i*50)
		rand.Read(msg)
		if _, err := cli.WriteToUDPAddrPort(msg, netip.MustParseAddrPort("10.0.0.1:7000")); err != nil {
			t.Fatal(err)
		}
		srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		k, from, err := srv.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("packet %d at the far socket: %v (a %+v, b %+v)", i, err, ta.Counters(), tb.Counters())
		}
		if from != netip.MustParseAddrPort("10.99.0.1:7001") || !bytes.Equal(buf[:k], msg) {
			t.Fatalf("packet %d: from %s, %d bytes, want %d bytes from the phone's inner address", i, from, k, len(msg))
		}
		// Echo reversed so a reply cannot be mistaken for the request.
		for l, r := 0, k-1; l < r; l, r = l+1, r-1 {
			buf[l], buf[r] = buf[r], buf[l]
		}
		if _, err := srv.WriteToUDPAddrPort(buf[:k], from); err != nil {
			t.Fatal(err)
		}
		cli.SetReadDeadline(time.Now().Add(5 * time.Second))
		back := make([]byte, 2000)
		k2, from2, err := cli.ReadFromUDPAddrPort(back)
		if err != nil {
			t.Fatalf("echo %d: %v", i, err)
		}
		got := back[:k2]
		for l, r := 0, len(got)-1; l < r; l, r = l+1, r-1 {
			got[l], got[r] = got[r], got[l]
		}
		if from2 != netip.MustParseAddrPort("10.0.0.1:7000") || !bytes.Equal(got, msg) {
			t.Fatalf("echo %d: from %s, bytes differ", i, from2)
		}
	}
	// A side counts a packet sent after the send returns, which can be
	// after the far side has received it: both sent counters are awaited.
	waitFor(t, "a's sent counter", func() bool { return ta.Counters().Sent >= n })
	waitFor(t, "b's sent counter", func() bool { return tb.Counters().Sent >= n })
	// The reader gets the last echo from the TUN before a's ToTUN counts
	// the write that delivered it.
	waitFor(t, "a's ToTUN counter", func() bool { return ta.Counters().ToTUN >= n })
	ca, cb := ta.Counters(), tb.Counters()
	// Each side may also read packets the kernel sends on its own (none
	// for IPv4 on a TUN, but be exact only where the test is).
	if ca.Sent < n || ca.Received != n || ca.ToTUN != n || cb.Received != ca.Sent || cb.Sent < n || cb.ToTUN != cb.Received-cb.Drops[DropSelector] {
		t.Fatalf("counters: a %+v\nb %+v", ca, cb)
	}
	if len(ca.DropList()) != 0 || cb.ToTUN < n {
		t.Fatalf("drops: a %v b %v", ca.DropList(), cb.DropList())
	}
}

// espPeer is a Go-driven gateway side: a UDP socket and the mirrored SAs.
type espPeer struct {
	c       *net.UDPConn
	out, in *esp.Transform
}

func (p *espPeer) recv(t *testing.T) ([]byte, esp.Result, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 65536)
	p.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		n, from, err := p.c.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("peer recv: %v", err)
		}
		if n == 1 && buf[0] == 0xff {
			continue // keepalive
		}
		res, err := p.in.Open(buf[:n])
		if err != nil {
			t.Fatalf("peer open: %v", err)
		}
		return buf, res, from
	}
}

func (p *espPeer) send(t *testing.T, payload []byte, nh uint8, to netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 65536)
	copy(buf[64:], payload)
	s, e, err := p.out.Seal(buf, 64, len(payload), nh, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.c.WriteToUDPAddrPort(buf[s:e], to); err != nil {
		t.Fatal(err)
	}
}

// Transport mode: the TUN phone strips its IPv4 header, the peer sees the
// bare UDP segment; the peer's answer carries a checksum computed for
// addresses the phone never had (as behind a NAT), and the phone's kernel
// still accepts it because the tunnel recomputes it for the rebuilt header.
func TestTunnelTransport(t *testing.T) {
	a, b := twoNS(t)
	aOut, aIn, bOut, bIn := pairSAs(t, esp.ModeTransport)
	ta := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: netip.MustParseAddrPort("192.0.2.2:4500"),
		Out: aOut, In: aIn, Inner: netip.MustParseAddr("10.99.0.1"), Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}, Keepalive: -1})
	peer := &espPeer{c: udpIn(t, b, "192.0.2.2:4500"), out: bOut, in: bIn}
	cli := udpIn(t, a, "10.99.0.1:5060")

	msg := []byte("OPTIONS sip:core SIP/2.0\r\n\r\n")
	if _, err := cli.WriteToUDPAddrPort(msg, netip.MustParseAddrPort("10.0.0.1:5060")); err != nil {
		t.Fatal(err)
	}
	buf, res, from := peer.recv(t)
	seg := buf[res.Start:res.End]
	if res.NextHeader != 17 || len(seg) != 8+len(msg) || !bytes.Equal(seg[8:], msg) ||
		binary.BigEndian.Uint16(seg[0:]) != 5060 || binary.BigEndian.Uint16(seg[2:]) != 5060 {
		t.Fatalf("peer got next header %d segment %x", res.NextHeader, seg)
	}
	if from != netip.MustParseAddrPort("192.0.2.1:4500") {
		t.Fatalf("ESP from %s", from)
	}
	reply := []byte("SIP/2.0 200 OK\r\n\r\n")
	rseg := make([]byte, 8+len(reply))
	binary.BigEndian.PutUint16(rseg[0:], 5060)
	binary.BigEndian.PutUint16(rseg[2:], 5060)
	binary.BigEndian.PutUint16(rseg[4:], uint16(len(rseg)))
	binary.BigEndian.PutUint16(rseg[6:], 0x1234) // wrong for the phone's addresses
	copy(rseg[8:], reply)
	peer.send(t, rseg, 17, from)
	cli.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 2000)
	n, src, err := cli.ReadFromUDPAddrPort(got)
	if err != nil {
		t.Fatalf("reply at the phone's socket: %v (%+v)", err, ta.Counters())
	}
	if src != netip.MustParseAddrPort("10.0.0.1:5060") || !bytes.Equal(got[:n], reply) {
		t.Fatalf("reply from %s: %q", src, got[:n])
	}
	waitFor(t, "sent counter", func() bool { return ta.Counters().Sent == 1 })
	if c := ta.Counters(); c.Sent != 1 || c.Received != 1 || c.ToTUN != 1 || len(c.DropList()) != 0 {
		t.Fatalf("counters %+v", c)
	}
}

// What the phone must not accept: a tunnel-mode packet for another inner
// address (selector), a forged packet (integrity), a replay, and ESP from
// an address that is not the gateway. Each is counted by reason and none
// reaches the TUN.
func TestTunnelDrops(t *testing.T) {
	a, b := twoNS(t)
	aOut, aIn, bOut, bIn := pairSAs(t, esp.ModeTunnel)
	ta := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: netip.MustParseAddrPort("192.0.2.2:4500"),
		Out: aOut, In: aIn, Inner: netip.MustParseAddr("10.99.0.1"), Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}, Keepalive: -1})
	_ = bIn
	peer := &espPeer{c: udpIn(t, b, "192.0.2.2:4500"), out: bOut}
	to := netip.MustParseAddrPort("192.0.2.1:4500")
	core := netip.MustParseAddrPort("10.0.0.1:5060")

	peer.send(t, pkt.UDP4(core, netip.MustParseAddrPort("10.99.0.2:5060"), []byte("x")), 4, to)
	waitFor(t, "selector drop", func() bool { return ta.Counters().Drops[DropSelector] == 1 })

	// A sealed packet kept for replay, and a copy with a flipped ICV bit.
	buf := make([]byte, 4096)
	inner := pkt.UDP4(core, netip.MustParseAddrPort("10.99.0.1:5060"), []byte("hello"))
	copy(buf[64:], inner)
	s, e, err := bOut.Seal(buf, 64, len(inner), 4, 0)
	if err != nil {
		t.Fatal(err)
	}
	good := append([]byte(nil), buf[s:e]...)
	bad := append([]byte(nil), good...)
	bad[len(bad)-1] ^= 1
	peer.c.WriteToUDPAddrPort(bad, to)
	waitFor(t, "integrity drop", func() bool { return ta.Counters().Open[esp.ReasonIntegrity] == 1 })
	peer.c.WriteToUDPAddrPort(good, to)
	waitFor(t, "good packet", func() bool { return ta.Counters().ToTUN == 1 })
	peer.c.WriteToUDPAddrPort(good, to)
	waitFor(t, "replay drop", func() bool { return ta.Counters().Open[esp.ReasonReplay] == 1 })

	// The same valid packet from another address of the far namespace.
	b.MustRun("ip", "addr", "add", "192.0.2.3/32", "dev", "lo")
	other := udpIn(t, b, "192.0.2.3:4500")
	other.WriteToUDPAddrPort(good, to)
	waitFor(t, "not-gateway drop", func() bool { return ta.Counters().Drops[DropNotGateway] == 1 })
	// An IKE packet (non-ESP marker) from the gateway.
	peer.c.WriteToUDPAddrPort([]byte{0, 0, 0, 0, 1, 2, 3, 4, 5, 6}, to)
	waitFor(t, "non-ESP drop", func() bool { return ta.Counters().Drops[DropNonESP] == 1 })

	c := ta.Counters()
	// Received counts what opened: the good packet and the one for
	// another inner address.
	if c.Received != 2 || c.ToTUN != 1 {
		t.Fatalf("only the one good packet may reach the TUN: %+v", c)
	}
	want := map[string]uint64{"selector": 1, "open:" + esp.ReasonIntegrity.String(): 1, "open:replay": 1, "not_gateway": 1, "non_esp": 1}
	got := map[string]uint64{}
	for _, d := range c.DropList() {
		got[d.Reason] = d.N
	}
	if len(got) != len(want) {
		t.Fatalf("drops %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("drops %v, want %v", got, want)
		}
	}
}

// Keepalives leave on the configured interval as single 0xFF bytes to the
// gateway's encapsulation port, and none are sent when disabled.
func TestTunnelKeepalive(t *testing.T) {
	a, b := twoNS(t)
	aOut, aIn, _, _ := pairSAs(t, esp.ModeTunnel)
	peer := udpIn(t, b, "192.0.2.2:4500")
	const every = 100 * time.Millisecond
	start := time.Now()
	ta := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: netip.MustParseAddrPort("192.0.2.2:4500"),
		Out: aOut, In: aIn, Inner: netip.MustParseAddr("10.99.0.1"), Keepalive: every})
	buf := make([]byte, 100)
	var arrivals []time.Time
	for len(arrivals) < 5 {
		peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := peer.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("keepalive %d: %v", len(arrivals), err)
		}
		if n != 1 || buf[0] != 0xff || from != netip.MustParseAddrPort("192.0.2.1:4500") {
			t.Fatalf("keepalive %d: %x from %s", len(arrivals), buf[:n], from)
		}
		arrivals = append(arrivals, time.Now())
	}
	// Five ticks cannot come sooner than five intervals after the start.
	if el := arrivals[4].Sub(start); el < 5*every-every/2 {
		t.Fatalf("5 keepalives after %v: interval not honoured", el)
	}
	waitFor(t, "keepalive counter", func() bool { return ta.Counters().KeepalivesSent >= 5 })
	if c := ta.Counters(); c.Sent != 0 || c.FromTUN != 0 {
		t.Fatalf("counters %+v", c)
	}
	// Default interval: none in the first second.
	aOut2, aIn2, _, _ := pairSAs(t, esp.ModeTunnel)
	td := startIn(t, a, TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4501"), Gateway: netip.MustParseAddrPort("192.0.2.2:4501"),
		Out: aOut2, In: aIn2, Inner: netip.MustParseAddr("10.99.0.2")})
	if td.cfg.Keepalive != DefaultKeepalive {
		t.Fatalf("default keepalive %v", td.cfg.Keepalive)
	}
	time.Sleep(time.Second)
	if c := td.Counters(); c.KeepalivesSent != 0 {
		t.Fatalf("default-interval tunnel sent %d keepalives in a second", c.KeepalivesSent)
	}
}
