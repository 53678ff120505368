package ue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

// DefaultKeepalive is the NAT keepalive interval (RFC 3948 4 suggests 20 s).
const DefaultKeepalive = 20 * time.Second

// DefaultMTU leaves room under a 1500-byte path for the outer IPv6 or IPv4
// header, UDP, ESP header, the largest IV, padding and ICV.
const DefaultMTU = 1400

// TunnelConfig describes one phone whose IP stack sends through a TUN.
type TunnelConfig struct {
	// Local is the UDP socket's address (e.g. 0.0.0.0:4500); Gateway is
	// where ESP goes.
	Local, Gateway netip.AddrPort
	// Out seals what the phone sends, In opens what the gateway sends back.
	// Either may be nil: the tunnel then starts without it and SAs come
	// later through AddSA (e.g. from the phone's control API). Their mode
	// decides how the TUN's packets are carried; both must agree, and
	// agree with Mode when it is set.
	Out, In *esp.Transform
	// Mode is the ESP mode of every SA the tunnel will ever hold; zero
	// means the mode of Out or In, or tunnel mode when there are none.
	Mode esp.Mode
	// TUN is the device name; empty lets the kernel choose.
	TUN string
	// Inner is the phone's inner address, given to the TUN as a host
	// prefix. Routes are sent through the TUN with Inner as their source.
	Inner  netip.Addr
	Routes []netip.Prefix
	// MTU of the TUN; 0 means DefaultMTU.
	MTU int
	// Keepalive is the NAT keepalive interval; 0 means DefaultKeepalive,
	// negative disables keepalives.
	Keepalive time.Duration
	// Ports are the inner UDP/TCP ports the phone listens on (e.g. its
	// SIP port). Tunnel mode: a decrypted packet to another port is not
	// addressed to the phone and is counted as misdelivered. Empty: any.
	Ports []uint16
	// PlainESP carries ESP as IP protocol 50 (a raw socket bound to
	// Local's address; Local's port and keepalives are unused) instead of
	// UDP-encapsulated: a phone with no NAPT in front of it.
	PlainESP bool
	// Claim, when set, is asked about every decrypted tunnel-mode packet
	// that is addressed to the phone; false means it carries another
	// phone's traffic (phones behind different NAPTs share inner
	// addresses and ports, so only the content tells them apart: the lab
	// checks the SIP user). It is counted as misdelivered and dropped.
	Claim func(inner []byte) bool
}

// Drop is why the tunnel discarded a packet outside the ESP engine.
type Drop uint8

const (
	DropNotGateway     Drop = iota // datagram from an address other than the gateway
	DropNonESP                     // non-ESP marker (IKE) or too short to be ESP
	DropSelector                   // tunnel mode: inner destination is not the phone's address
	DropBadInner                   // TUN packet not IPv4/IPv6 (tunnel) or not an unfragmented IPv4 packet (transport)
	DropTooBig                     // TUN packet too large for the send buffer
	DropSendFailed                 // sendto(2) to the gateway failed
	DropTUNWriteFailed             // write to the TUN failed
	DropNoSA                       // TUN packet while the tunnel has no outbound SA
	DropUnknownSPI                 // ESP from the gateway whose SPI is no inbound SA of the tunnel
	DropOtherPhone                 // tunnel mode: addressed to the phone but TunnelConfig.Claim says it is another phone's
	NumDrops
)

var dropNames = [NumDrops]string{"not_gateway", "non_esp", "selector", "bad_inner", "too_big", "send_failed", "tun_write_failed", "no_sa", "unknown_spi", "other_phone"}

func (d Drop) String() string {
	if d < NumDrops {
		return dropNames[d]
	}
	return fmt.Sprintf("drop(%d)", uint8(d))
}

// Counters is a snapshot of a tunnel's packet counts.
type Counters struct {
	FromTUN            uint64 // IP packets read from the TUN
	Sent               uint64 // ESP packets sent to the gateway
	Received           uint64 // ESP packets from the gateway that opened
	ToTUN              uint64 // inner packets written to the TUN
	KeepalivesSent     uint64
	KeepalivesReceived uint64
	// Seal and Open count ESP engine failures by reason (ReasonNone unused).
	Seal, Open esp.Counters
	Drops      [NumDrops]uint64
}

// Misdelivered is what a phone received that was meant for another phone,
// measured at the phone: the evidence that a gateway sealed one phone's
// traffic for another.
type Misdelivered struct {
	// ForeignSPI counts ESP packets under an SPI that is none of the
	// phone's inbound SAs (another phone's SA, sent to this binding).
	ForeignSPI uint64
	// NotAddressed counts packets that opened under the phone's SA but
	// whose inner destination is not the phone's inner address and ports.
	NotAddressed uint64
	// OtherPhone counts packets that opened and were addressed to the
	// phone's inner address and ports, but whose content names another
	// phone (TunnelConfig.Claim / Phone.Expect): behind different NAPTs
	// phones share inner addresses and ports, so a packet sealed with
	// phone B's SA for phone A's cleartext looks addressed to B.
	OtherPhone uint64
}

// Total is the sum of the three counts.
func (m Misdelivered) Total() uint64 { return m.ForeignSPI + m.NotAddressed + m.OtherPhone }

// Misdelivered are the misdelivery counts among the drops.
func (c Counters) Misdelivered() Misdelivered {
	return Misdelivered{ForeignSPI: c.Drops[DropUnknownSPI], NotAddressed: c.Drops[DropSelector], OtherPhone: c.Drops[DropOtherPhone]}
}

// DropCount is one non-zero drop counter with its name.
type DropCount struct {
	Reason string
	N      uint64
}

// DropList lists the non-zero drop counters: "seal:<reason>",
// "open:<reason>" for the ESP engine, plain names for the tunnel's own.
func (c *Counters) DropList() []DropCount {
	var l []DropCount
	for r := esp.ReasonNone + 1; r < esp.NumReasons; r++ {
		if c.Seal[r] != 0 {
			l = append(l, DropCount{"seal:" + r.String(), c.Seal[r]})
		}
		if c.Open[r] != 0 {
			l = append(l, DropCount{"open:" + r.String(), c.Open[r]})
		}
	}
	for d := Drop(0); d < NumDrops; d++ {
		if c.Drops[d] != 0 {
			l = append(l, DropCount{d.String(), c.Drops[d]})
		}
	}
	return l
}

// Tunnel is a running phone: one goroutine moves TUN packets to the
// gateway, one moves the gateway's ESP to the TUN, one sends keepalives.
// The phone side needs no batching: a handset's traffic is a few calls.
type Tunnel struct {
	cfg   TunnelConfig
	mode  esp.Mode
	tun   *TUN
	conn  espConn
	gw    netip.AddrPort
	inner netip.Addr

	// transportPeer is the IPv4 destination of the last packet sent in
	// transport mode: replies are given it as their source (see
	// sendTransport).
	transportPeer atomic.Uint32

	// sas is the SA set the loops use, replaced whole by the writers
	// (under sasMu) and read with one atomic load per packet.
	sas   atomic.Pointer[saSet]
	sasMu sync.Mutex

	fromTUN, sent, received, toTUN atomic.Uint64
	kaSent, kaReceived             atomic.Uint64
	seal, open                     [esp.NumReasons + 1]atomic.Uint64
	drops                          [NumDrops]atomic.Uint64

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// StartTunnel creates the TUN and the UDP socket in the calling thread's
// network namespace (call it under netns.Do to place the phone), routes
// cfg.Routes through the TUN and starts moving packets.
func StartTunnel(cfg TunnelConfig) (*Tunnel, error) {
	mode := cfg.Mode
	for _, s := range []*esp.Transform{cfg.Out, cfg.In} {
		switch {
		case s == nil:
		case mode == esp.ModeInvalid:
			mode = s.Mode()
		case s.Mode() != mode:
			return nil, fmt.Errorf("tunnel: SA 0x%08x is %s mode, the tunnel %s mode", s.SPI(), s.Mode(), mode)
		}
	}
	if mode == esp.ModeInvalid {
		mode = esp.ModeTunnel
	}
	if mode != esp.ModeTunnel && mode != esp.ModeTransport {
		return nil, fmt.Errorf("tunnel: mode %v: want tunnel or transport", mode)
	}
	if !cfg.Inner.IsValid() {
		return nil, errors.New("tunnel: no inner address")
	}
	if mode == esp.ModeTransport && !cfg.Inner.Is4() {
		return nil, fmt.Errorf("tunnel: transport mode supports IPv4 inner addresses only, got %s", cfg.Inner)
	}
	if !cfg.Gateway.IsValid() {
		return nil, errors.New("tunnel: no gateway address")
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	if cfg.Keepalive == 0 {
		cfg.Keepalive = DefaultKeepalive
	}
	var conn espConn
	if cfg.PlainESP {
		cfg.Keepalive = -1 // NAT keepalives are UDP's (RFC 3948 2.3)
		c, err := net.ListenIP(ipNet(cfg.Gateway.Addr())+":50", &net.IPAddr{IP: cfg.Local.Addr().AsSlice()})
		if err != nil {
			return nil, fmt.Errorf("tunnel: raw ESP socket on %s: %w", cfg.Local.Addr(), err)
		}
		conn = rawESP{c}
	} else {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(cfg.Local))
		if err != nil {
			return nil, fmt.Errorf("tunnel: bind %s: %w", cfg.Local, err)
		}
		conn = udpESP{c}
	}
	tun, err := OpenTUN(cfg.TUN)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("tunnel: %w", err)
	}
	if err := tun.Configure(cfg.Inner, cfg.MTU, cfg.Routes); err != nil {
		tun.Close()
		conn.Close()
		return nil, fmt.Errorf("tunnel: %w", err)
	}
	t := &Tunnel{cfg: cfg, mode: mode, tun: tun, conn: conn, gw: cfg.Gateway, inner: cfg.Inner.Unmap(), stop: make(chan struct{})}
	set := &saSet{out: cfg.Out}
	if cfg.In != nil {
		set.in = []*esp.Transform{cfg.In}
	}
	t.sas.Store(set)
	t.wg.Add(2)
	go t.txLoop()
	go t.rxLoop()
	if cfg.Keepalive > 0 {
		t.wg.Add(1)
		go t.keepaliveLoop()
	}
	return t, nil
}

// TUNName is the TUN device's name.
func (t *Tunnel) TUNName() string { return t.tun.Name() }

// LocalAddr is the UDP socket's address (before any NAT).
func (t *Tunnel) LocalAddr() netip.AddrPort { return t.conn.local() }

// espConn is how the phone's ESP travels: UDP-encapsulated (RFC 3948)
// or plain IP protocol 50.
type espConn interface {
	send(b []byte, to netip.AddrPort) error
	recv(b []byte) (int, netip.AddrPort, error)
	local() netip.AddrPort
	Close() error
}

type udpESP struct{ *net.UDPConn }

func (c udpESP) send(b []byte, to netip.AddrPort) error {
	_, err := c.WriteToUDPAddrPort(b, to)
	return err
}
func (c udpESP) recv(b []byte) (int, netip.AddrPort, error) { return c.ReadFromUDPAddrPort(b) }
func (c udpESP) local() netip.AddrPort                      { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

// rawESP is a raw IP socket for protocol 50: the kernel adds the IP
// header on send and strips it (IPv4) on receive.
type rawESP struct{ *net.IPConn }

func (c rawESP) send(b []byte, to netip.AddrPort) error {
	_, err := c.WriteToIP(b, &net.IPAddr{IP: to.Addr().AsSlice()})
	return err
}
func (c rawESP) recv(b []byte) (int, netip.AddrPort, error) {
	n, from, err := c.ReadFromIP(b)
	if err != nil {
		return n, netip.AddrPort{}, err
	}
	a, _ := netip.AddrFromSlice(from.IP)
	return n, netip.AddrPortFrom(a.Unmap(), 0), nil
}
func (c rawESP) local() netip.AddrPort {
	a, _ := netip.AddrFromSlice(c.LocalAddr().(*net.IPAddr).IP)
	return netip.AddrPortFrom(a.Unmap(), 0)
}

func ipNet(a netip.Addr) string {
	if a.Is4() {
		return "ip4"
	}
	return "ip6"
}

// Counters returns a snapshot of the packet counts.
func (t *Tunnel) Counters() Counters {
	c := Counters{
		FromTUN: t.fromTUN.Load(), Sent: t.sent.Load(), Received: t.received.Load(), ToTUN: t.toTUN.Load(),
		KeepalivesSent: t.kaSent.Load(), KeepalivesReceived: t.kaReceived.Load(),
	}
	for i := range t.seal {
		c.Seal[i] = t.seal[i].Load()
		c.Open[i] = t.open[i].Load()
	}
	for i := range t.drops {
		c.Drops[i] = t.drops[i].Load()
	}
	return c
}

// Close stops the goroutines and removes the TUN and the socket.
func (t *Tunnel) Close() error {
	var err error
	t.closeOnce.Do(func() {
		close(t.stop)
		err = errors.Join(t.tun.Close(), t.conn.Close())
		t.wg.Wait()
	})
	return err
}

func (t *Tunnel) stopped() bool {
	select {
	case <-t.stop:
		return true
	default:
		return false
	}
}

func (t *Tunnel) keepaliveLoop() {
	defer t.wg.Done()
	tick := time.NewTicker(t.cfg.Keepalive)
	defer tick.Stop()
	ka := []byte{0xff}
	for {
		select {
		case <-t.stop:
			return
		case <-tick.C:
			if err := t.conn.send(ka, t.gw); err != nil {
				t.drops[DropSendFailed].Add(1)
				continue
			}
			t.kaSent.Add(1)
		}
	}
}

// txLoop reads IP packets from the TUN into the buffer behind a headroom
// for the ESP header, seals them in place and sends them.
func (t *Tunnel) txLoop() {
	defer t.wg.Done()
	buf := make([]byte, 65536)
	transport := t.mode == esp.ModeTransport
	room := len(buf) - headroom - maxTailroom
	for {
		n, err := t.tun.Read(buf[headroom : headroom+room])
		if err != nil {
			if t.stopped() {
				return
			}
			// A TUN read fails only when the device goes away under us.
			t.drops[DropBadInner].Add(1)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		t.fromTUN.Add(1)
		off, nh := headroom, esp.NextHeaderFor(buf[headroom:headroom+n])
		if transport {
			off, n, nh = t.transportPayload(buf, headroom, n)
		}
		if nh == 0 {
			t.drops[DropBadInner].Add(1)
			continue
		}
		// One load per packet: a rekey's new outbound SA takes over
		// between two packets, and only this goroutine ever seals, so
		// each SA's sequence counter keeps its single writer.
		out := t.sas.Load().out
		if out == nil {
			t.drops[DropNoSA].Add(1)
			continue
		}
		start, end, err := out.Seal(buf, off, n, nh, 0)
		if err != nil {
			t.seal[esp.ReasonOf(err)].Add(1)
			continue
		}
		if err := t.conn.send(buf[start:end], t.gw); err != nil {
			if t.stopped() {
				return
			}
			t.drops[DropSendFailed].Add(1)
			continue
		}
		t.sent.Add(1)
	}
}

// transportPayload strips the IPv4 header of a TUN packet at buf[off:off+n]
// and returns where its upper-layer payload lies and its protocol (0:
// refuse). Transport mode here is the simple case a handset's IMS stack
// uses: one correspondent (the P-CSCF) over IPv4, no fragments. The
// destination is remembered so replies can be given an IP header again.
func (t *Tunnel) transportPayload(buf []byte, off, n int) (int, int, uint8) {
	p := buf[off : off+n]
	if n < 20 || p[0]>>4 != 4 {
		return 0, 0, 0
	}
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:4]))
	if ihl < 20 || total < ihl || total > n || binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 {
		return 0, 0, 0
	}
	t.transportPeer.Store(binary.BigEndian.Uint32(p[16:20]))
	return off + ihl, total - ihl, p[9]
}

// rxLoop opens the gateway's ESP and writes the inner packets to the TUN.
func (t *Tunnel) rxLoop() {
	defer t.wg.Done()
	buf := make([]byte, 65536)
	var wbuf []byte
	transport := t.mode == esp.ModeTransport
	if transport {
		wbuf = make([]byte, 65536)
	}
	gw := t.gw.Addr().Unmap()
	for {
		n, from, err := t.conn.recv(buf)
		if err != nil {
			if t.stopped() {
				return
			}
			continue
		}
		if from.Addr().Unmap() != gw {
			t.drops[DropNotGateway].Add(1)
			continue
		}
		if n == 1 && buf[0] == 0xff && !t.cfg.PlainESP {
			t.kaReceived.Add(1)
			continue
		}
		if n < 8 || binary.BigEndian.Uint32(buf[:4]) == 0 {
			t.drops[DropNonESP].Add(1)
			continue
		}
		// Only this goroutine opens, so each inbound SA's replay
		// window has one writer.
		in := t.sas.Load().lookupIn(binary.BigEndian.Uint32(buf[:4]))
		if in == nil {
			t.drops[DropUnknownSPI].Add(1)
			continue
		}
		res, err := in.Open(buf[:n])
		if err != nil {
			t.open[esp.ReasonOf(err)].Add(1)
			continue
		}
		t.received.Add(1)
		pkt := buf[res.Start:res.End]
		if transport {
			pkt = t.transportPacket(wbuf, pkt, res.NextHeader)
		} else if !addressedTo(pkt, t.inner, t.cfg.Ports) {
			t.drops[DropSelector].Add(1)
			continue
		} else if t.cfg.Claim != nil && !t.cfg.Claim(pkt) {
			t.drops[DropOtherPhone].Add(1)
			continue
		}
		if _, err := t.tun.Write(pkt); err != nil {
			if t.stopped() {
				return
			}
			t.drops[DropTUNWriteFailed].Add(1)
			continue
		}
		t.toTUN.Add(1)
	}
}

// addressedTo is the inbound selector check (RFC 4301 5.2): a tunnel-mode
// inner packet must be addressed to the phone's inner address and, when
// ports are given, to one of them (UDP and TCP; other protocols pass on
// the address alone).
func addressedTo(p []byte, inner netip.Addr, ports []uint16) bool {
	var dst netip.Addr
	var proto byte
	var l4 []byte
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		dst = netip.AddrFrom4([4]byte(p[16:20]))
		ihl := int(p[0]&0x0f) * 4
		proto = p[9]
		if ihl >= 20 && len(p) >= ihl && binary.BigEndian.Uint16(p[6:8])&0x1fff == 0 {
			l4 = p[ihl:]
		}
	case len(p) >= 40 && p[0]>>4 == 6:
		dst = netip.AddrFrom16([16]byte(p[24:40]))
		proto, l4 = p[6], p[40:]
	default:
		return false
	}
	if dst != inner {
		return false
	}
	if len(ports) == 0 || (proto != 6 && proto != 17) {
		return true
	}
	if len(l4) < 4 {
		return false
	}
	port := binary.BigEndian.Uint16(l4[2:4])
	for _, q := range ports {
		if q == port {
			return true
		}
	}
	return false
}

// transportPacket gives an upper-layer segment an IPv4 header from the
// remembered correspondent to the phone and recomputes its TCP/UDP
// checksum: the sender computed it over its own view of the addresses,
// which NAT changes (RFC 3948 3.1.2).
func (t *Tunnel) transportPacket(w, seg []byte, proto uint8) []byte {
	n := 20 + len(seg)
	h := w[:20]
	h[0], h[1] = 0x45, 0
	binary.BigEndian.PutUint16(h[2:4], uint16(n))
	binary.BigEndian.PutUint32(h[4:8], 0)
	h[8], h[9] = 64, proto
	binary.BigEndian.PutUint16(h[10:12], 0)
	binary.BigEndian.PutUint32(h[12:16], t.transportPeer.Load())
	copy(h[16:20], t.inner.AsSlice())
	binary.BigEndian.PutUint16(h[10:12], pkt.Checksum(h))
	copy(w[20:], seg)
	l4 := w[20:n]
	var ck int
	switch {
	case proto == 6 && len(l4) >= 20:
		ck = 16
	case proto == 17 && len(l4) >= 8 && binary.BigEndian.Uint16(l4[6:8]) != 0:
		ck = 6
	default:
		return w[:n]
	}
	binary.BigEndian.PutUint16(l4[ck:], 0)
	pseudo := pkt.Sum(h[12:20], uint64(proto)+uint64(len(l4)))
	c := ^pkt.Fold(pkt.Sum(l4, pseudo))
	if c == 0 && proto == 17 {
		c = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	binary.BigEndian.PutUint16(l4[ck:], c)
	return w[:n]
}
