package worker

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// rig is a pipeline over a real UMEM with one phone's SA pair (tunnel,
// ESP in UDP), and the phone's own SAs to build and read its packets.
type rig struct {
	t                 testing.TB
	u                 *xsk.UMEM
	p                 *pipeline
	st                Stats
	in, out           *Slot
	phoneOut, phIn    *esp.Transform
	next              uint64 // next free frame
	now               int64
	coreMAC, phoneMAC [6]byte
}

var (
	phoneInner = netip.MustParseAddr("100.64.0.1")
	coreHost   = netip.MustParseAddr("10.0.0.1")
	gwPriv     = netip.MustParseAddr("10.0.0.254")
)

func newRig(t testing.TB) *rig {
	t.Helper()
	u, err := xsk.New(xsk.Config{FrameCount: 128, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	mk := func(spi uint32, key byte, window int) *esp.Transform {
		k := bytes.Repeat([]byte{key}, 20)
		s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	r := &rig{t: t, u: u, now: 1e18, coreMAC: [6]byte{2, 0, 0, 0, 0, 1}, phoneMAC: [6]byte{2, 0, 0, 0, 0, 2}}
	r.phoneOut, r.phIn = mk(0x1001, 1, 0), mk(0x2001, 2, 64)
	nb := &mapNeighbors{}
	nm := map[[16]byte][6]byte{coreHost.As16(): r.coreMAC}
	nb.m.Store(&nm)
	r.p = &pipeline{mem: u, nb: nb, stats: &r.st, pubMAC: [6]byte{2, 0, 0, 0, 1, 1}, privMAC: [6]byte{2, 0, 0, 0, 1, 2},
		bindEvents: make(chan BindingChange, 16), seqRequests: make(chan SeqRequest, 1),
		privAddrs: []netip.Addr{gwPriv, netip.MustParseAddr("fd00::254")}, icmp: newLimiter(1000),
		clock: func() int64 { return r.now }, privateMTU: 1500}
	r.p.frag = fragmenter{mtu: 1500, mem: u, rxOff: uint64(u.RxOffset()), stride: 1, pool: u.NewPool()}
	// The pool hands out the upper half; the rig builds frames in the lower.
	var all [64]uint64
	for i := range all {
		all[i] = uint64(64+i) * 4096
	}
	r.p.frag.pool.Put(all[:])
	b := NewBinding(Peer{Addr: netip.MustParseAddrPort("192.0.2.10:4500"), MAC: r.phoneMAC, HasMAC: true})
	local := netip.MustParsePrefix("10.0.0.0/24")
	r.in = withSel(&Slot{SA: mk(0x1001, 1, 64), Dir: Inbound, scope: &Scope{InnerLocal: local}, Binding: b},
		netip.PrefixFrom(phoneInner, 32), netip.Addr{})
	r.out = withSel(&Slot{SA: mk(0x2001, 2, 0), Dir: Outbound, LocalPort: 4500,
		scope: &Scope{Local: netip.MustParseAddr("192.0.2.1"), InnerLocal: local}, Binding: b},
		netip.PrefixFrom(phoneInner, 32), netip.Addr{})
	r.p.table = []*Slot{r.in, r.out}
	r.in.index, r.out.index = 0, 1
	r.p.track(nil, r.in)
	r.p.track(nil, r.out)
	return r
}

// frame returns the next free frame's base address and bytes.
func (r *rig) frame() (uint64, []byte) {
	base := r.next * 4096
	r.next++
	if r.next > 64 {
		r.t.Fatal("rig out of frames")
	}
	f := r.u.Frame(base)
	clear(f)
	return base, f
}

// fromPhone is the phone sealing inner with outer TOS tos, as XDP hands
// it to the worker (UDP stripped, metadata in front).
func (r *rig) fromPhone(inner []byte, tos uint8) xsk.Desc {
	base, f := r.frame()
	rxOff := uint64(r.u.RxOffset())
	at := int(rxOff) + ethLen
	pay := at + 20 + r.phoneOut.Headroom()
	copy(f[pay:], inner)
	start, end, err := r.phoneOut.Seal(f, pay, len(inner), esp.NextHeaderIPv4, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	if s, err := esp.PutOuter(f, start, end, &esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("192.0.2.1"), TOS: tos}); err != nil || s != at {
		r.t.Fatalf("outer at %d: %v", s, err)
	}
	copy(f[int(rxOff)+6:], r.phoneMAC[:])
	m := (*bpf.Meta)(unsafe.Pointer(&r.u.Meta(base+rxOff, bpf.MetaSize)[0]))
	*m = bpf.Meta{SaIndex: 0, L3Off: ethLen, Kind: uint8(bpf.MetaESP), Magic: bpf.MetaMagic}
	d := xsk.Desc{Addr: base + rxOff, Len: uint32(end - int(rxOff))}
	completeMeta(r.u, d)
	return d
}

// fromCore is a cleartext frame from the core's MAC, steered to SA 1.
func (r *rig) fromCore(ip []byte) xsk.Desc {
	base, f := r.frame()
	rxOff := uint64(r.u.RxOffset())
	copy(f[rxOff:], r.p.privMAC[:])
	copy(f[rxOff+6:], r.coreMAC[:])
	binary.BigEndian.PutUint16(f[rxOff+12:], etherType(ip))
	copy(f[rxOff+ethLen:], ip)
	m := (*bpf.Meta)(unsafe.Pointer(&r.u.Meta(base+rxOff, bpf.MetaSize)[0]))
	*m = bpf.Meta{SaIndex: 1, L3Off: ethLen, Kind: uint8(bpf.MetaClear), Magic: bpf.MetaMagic}
	d := xsk.Desc{Addr: base + rxOff, Len: uint32(ethLen + len(ip))}
	completeMeta(r.u, d)
	return d
}

func (r *rig) bytes(d xsk.Desc) []byte {
	f := r.u.Frame(d.Addr)
	off := d.Addr - r.u.FrameBase(d.Addr)
	return f[off : off+uint64(d.Len)]
}

// toPhone opens a frame sent on the public side the way the phone would
// and returns the outer TOS and the inner packet.
func (r *rig) toPhone(d xsk.Desc) (uint8, []byte) {
	r.t.Helper()
	b := append([]byte(nil), r.bytes(d)...)
	if string(b[0:6]) != string(r.phoneMAC[:]) {
		r.t.Fatalf("to MAC %x, want the phone's", b[0:6])
	}
	var pk esp.Packet
	if err := r.phIn.OpenPacketTo(b[ethLen:], &pk); err != nil {
		r.t.Fatalf("phone cannot open: %v", err)
	}
	return tosOf(b[ethLen:]), append([]byte(nil), pk.IP...)
}

func (r *rig) decap(ds ...xsk.Desc) ([]xsk.Desc, []uint64) {
	return r.p.decap(ds, nil, nil)
}

func (r *rig) encap(ds ...xsk.Desc) ([]xsk.Desc, []uint64) {
	r.p.toPub, r.p.back = r.p.toPub[:0], r.p.back[:0]
	return r.p.encap(ds, nil, nil)
}

func udp4(src, dst string, payload string) []byte {
	return pkt.UDP4(netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst), []byte(payload))
}

func checkIPv4Sum(t *testing.T, ip []byte) {
	t.Helper()
	if pkt.Fold(pkt.Sum(ip[:int(ip[0]&0x0f)*4], 0)) != 0xffff {
		t.Fatalf("IPv4 header checksum wrong: % x", ip[:20])
	}
}

// RFC 4301 5.2 and 5.1: the inner packet must match the SA's selectors
// both ways (addresses on both sides, protocol, ports), checked on the
// phone's real inner addresses; each miss is a `selector` drop.
func TestSelectorsBothWays(t *testing.T) {
	r := newRig(t)
	// Inbound: to a core host inside inner.local passes; outside is
	// dropped (before this check, any host on the core was reachable).
	tx, drop := r.decap(r.fromPhone(udp4("100.64.0.1:5060", "10.0.0.1:5060", "in"), 0))
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("in-selector packet: tx %d drop %d", len(tx), len(drop))
	}
	for _, c := range []struct{ name, src, dst string }{
		{"destination outside inner.local", "100.64.0.1:5060", "10.0.1.9:5060"},
		{"source outside inner.peer", "100.64.0.2:5060", "10.0.0.1:5060"},
	} {
		before := r.st.Decap.Drops[DropPolicy].Load()
		if tx, _ := r.decap(r.fromPhone(udp4(c.src, c.dst, c.name), 0)); len(tx) != 0 || r.st.Decap.Drops[DropPolicy].Load() != before+1 {
			t.Fatalf("%s: forwarded", c.name)
		}
	}
	// Protocol selector: a UDP-only SA drops TCP.
	r.in.Proto = 17
	tcp := udp4("100.64.0.1:5060", "10.0.0.1:5060", "tcp")
	tcp[9] = 6
	binary.BigEndian.PutUint16(tcp[10:], 0)
	binary.BigEndian.PutUint16(tcp[10:], ^pkt.Fold(pkt.Sum(tcp[:20], 0)))
	if tx, _ := r.decap(r.fromPhone(tcp, 0)); len(tx) != 0 {
		t.Fatal("TCP forwarded on a UDP-only SA")
	}
	r.in.Proto = 0
	if DropPolicy.String() != "selector" {
		t.Fatalf("reason label %q", DropPolicy.String())
	}

	// Outbound: cleartext from inner.local is sealed; from elsewhere on
	// the core it is not.
	tx, _ = r.encap(r.fromCore(udp4("10.0.0.1:5060", "100.64.0.1:5060", "out")))
	if len(tx) != 1 {
		t.Fatal("in-selector cleartext not sealed")
	}
	before := r.st.Encap.Drops[DropPolicy].Load()
	if tx, _ := r.encap(r.fromCore(udp4("10.9.0.1:5060", "100.64.0.1:5060", "out"))); len(tx) != 0 || r.st.Encap.Drops[DropPolicy].Load() != before+1 {
		t.Fatal("cleartext from outside inner.local sealed")
	}
	r.out.Proto, r.out.PortLocal = 17, 5060
	if tx, _ := r.encap(r.fromCore(udp4("10.0.0.1:5061", "100.64.0.1:5060", "port"))); len(tx) != 0 {
		t.Fatal("cleartext from another port sealed")
	}
}

// DSCP: the inner DSCP is copied to the outer header by default (RFC 4301
// 5.1.2.1), or the configured one written; ECN is copied (RFC 6040
// normal mode). Decap: outer CE over ECT gives inner CE, ECT(1) over
// ECT(0) gives ECT(1), CE over Not-ECT is dropped and counted.
func TestDSCPAndECN(t *testing.T) {
	r := newRig(t)
	ef := udp4("10.0.0.1:5060", "100.64.0.1:5060", "voice")
	ef[1] = 46<<2 | ecnECT0
	binary.BigEndian.PutUint16(ef[10:], 0)
	binary.BigEndian.PutUint16(ef[10:], ^pkt.Fold(pkt.Sum(ef[:20], 0)))
	tx, _ := r.encap(r.fromCore(ef))
	if len(tx) != 1 {
		t.Fatal("not sealed")
	}
	if tos, _ := r.toPhone(tx[0]); tos != 46<<2|ecnECT0 {
		t.Fatalf("outer TOS %#x, want EF with ECT(0) %#x", tos, 46<<2|ecnECT0)
	}
	checkIPv4Sum(t, r.bytes(tx[0])[ethLen:])
	r.p.fixDSCP, r.p.dscp = true, 26 // tunnel.dscp: 26 (AF31)
	tx, _ = r.encap(r.fromCore(ef))
	if tos, _ := r.toPhone(tx[0]); tos != 26<<2|ecnECT0 {
		t.Fatalf("outer TOS %#x with tunnel.dscp 26", tos)
	}
	r.out.FixDSCP, r.out.DSCP = true, 24 // the SA's own dscp wins
	tx, _ = r.encap(r.fromCore(ef))
	if tos, _ := r.toPhone(tx[0]); tos != 24<<2|ecnECT0 {
		t.Fatalf("outer TOS %#x with the SA's dscp 24", tos)
	}

	for _, c := range []struct {
		outer, inner, want uint8
		drop               bool
	}{
		{ecnCE, ecnECT0, ecnCE, false},
		{ecnCE, ecnECT1, ecnCE, false},
		{ecnECT1, ecnECT0, ecnECT1, false},
		{ecnECT0, ecnECT1, ecnECT1, false},
		{ecnECT0, ecnNotECT, ecnNotECT, false},
		{ecnCE, ecnNotECT, 0, true},
	} {
		in := udp4("100.64.0.1:5060", "10.0.0.1:5060", "ecn")
		in[1] = 10<<2 | c.inner
		binary.BigEndian.PutUint16(in[10:], 0)
		binary.BigEndian.PutUint16(in[10:], ^pkt.Fold(pkt.Sum(in[:20], 0)))
		before := r.st.Decap.Drops[DropECN].Load()
		tx, _ := r.decap(r.fromPhone(in, c.outer))
		if c.drop {
			if len(tx) != 0 || r.st.Decap.Drops[DropECN].Load() != before+1 {
				t.Fatalf("outer %d inner %d: not dropped as ecn_ce_not_ect", c.outer, c.inner)
			}
			continue
		}
		ip := r.bytes(tx[0])[ethLen:]
		if ip[1] != 10<<2|c.want {
			t.Fatalf("outer %d inner %d: inner TOS %#x, want DSCP 10 ECN %d", c.outer, c.inner, ip[1], c.want)
		}
		checkIPv4Sum(t, ip)
	}
}

// The gateway is a router: the inner TTL drops by one both ways (header
// checksum still valid, outer TTL the configured one); a packet that
// would leave with TTL 0 is dropped and its sender gets an ICMP Time
// Exceeded, the phone's inside its SA.
func TestTTL(t *testing.T) {
	r := newRig(t)
	r.p.outerTTL = 33
	tx, _ := r.encap(r.fromCore(udp4("10.0.0.1:5060", "100.64.0.1:5060", "ttl")))
	out := r.bytes(tx[0])[ethLen:]
	if out[8] != 33 {
		t.Fatalf("outer TTL %d, want 33", out[8])
	}
	_, inner := r.toPhone(tx[0])
	if inner[8] != 63 {
		t.Fatalf("inner TTL %d after the gateway, want 63", inner[8])
	}
	checkIPv4Sum(t, inner)
	tx, _ = r.decap(r.fromPhone(udp4("100.64.0.1:5060", "10.0.0.1:5060", "ttl"), 0))
	if ip := r.bytes(tx[0])[ethLen:]; ip[8] != 63 {
		t.Fatalf("decap: inner TTL %d, want 63", ip[8])
	} else {
		checkIPv4Sum(t, ip)
	}

	// From the core with TTL 1: ICMP Time Exceeded back to its MAC.
	exp := udp4("10.0.0.1:5060", "100.64.0.1:5060", "expiring")
	exp[8] = 1
	binary.BigEndian.PutUint16(exp[10:], 0)
	binary.BigEndian.PutUint16(exp[10:], ^pkt.Fold(pkt.Sum(exp[:20], 0)))
	tx, drop := r.encap(r.fromCore(exp))
	if len(tx) != 0 || len(drop) != 0 || len(r.p.back) != 1 || r.st.Encap.Drops[DropTTL].Load() != 1 || r.st.ICMP[icmpTimeExceeded].Load() != 1 {
		t.Fatalf("TTL 1 from the core: tx %d drop %d back %d", len(tx), len(drop), len(r.p.back))
	}
	f := r.bytes(r.p.back[0])
	if string(f[0:6]) != string(r.coreMAC[:]) || string(f[6:12]) != string(r.p.privMAC[:]) {
		t.Fatalf("ICMP MACs %x → %x", f[6:12], f[0:6])
	}
	icmp := f[ethLen:]
	checkIPv4Sum(t, icmp)
	if icmp[9] != 1 || srcAddr(icmp) != gwPriv || dstAddr(icmp) != coreHost || icmp[20] != 11 || icmp[21] != 0 ||
		!bytes.Equal(icmp[28:], exp) || pkt.Fold(pkt.Sum(icmp[20:], 0)) != 0xffff {
		t.Fatalf("ICMP Time Exceeded % x", icmp)
	}

	// From the phone with TTL 1: Time Exceeded sealed to the phone.
	exp = udp4("100.64.0.1:5060", "10.0.0.1:5060", "expiring")
	exp[8] = 1
	binary.BigEndian.PutUint16(exp[10:], 0)
	binary.BigEndian.PutUint16(exp[10:], ^pkt.Fold(pkt.Sum(exp[:20], 0)))
	r.p.toPub = r.p.toPub[:0]
	tx, drop = r.decap(r.fromPhone(exp, 0))
	if len(tx) != 0 || len(drop) != 0 || len(r.p.toPub) != 1 || r.st.Decap.Drops[DropTTL].Load() != 1 {
		t.Fatalf("TTL 1 from the phone: tx %d drop %d toPub %d", len(tx), len(drop), len(r.p.toPub))
	}
	_, icmp = r.toPhone(r.p.toPub[0])
	if icmp[9] != 1 || srcAddr(icmp) != gwPriv || dstAddr(icmp) != phoneInner || icmp[20] != 11 || !bytes.Equal(icmp[28:], exp) {
		t.Fatalf("ICMP to the phone % x", icmp)
	}
}

// ICMP errors are rate-limited per worker: a burst, then one per
// interval.
func TestICMPRateLimit(t *testing.T) {
	r := newRig(t)
	r.p.icmp = newLimiter(20) // burst 2, one per 50 ms
	exp := udp4("10.0.0.1:5060", "100.64.0.1:5060", "x")
	exp[8] = 1
	send := func() int {
		r.encap(r.fromCore(exp))
		r.next = 0 // reuse frames: nothing is kept
		return len(r.p.back)
	}
	got := 0
	for range 5 {
		got += send()
	}
	if got != 2 || r.st.ICMPLimited.Load() != 3 {
		t.Fatalf("burst: %d sent, %d limited; want 2 and 3", got, r.st.ICMPLimited.Load())
	}
	r.now += 50e6
	if send() != 1 || send() != 0 {
		t.Fatal("after one interval: want exactly one more")
	}
	if r.st.Encap.Drops[DropTTL].Load() != 7 {
		t.Fatalf("ttl_exceeded drops %d, want 7", r.st.Encap.Drops[DropTTL].Load())
	}
}

// MTU: sealed, a DF-set IPv4 or any IPv6 packet from the core that
// would exceed the public MTU is answered with Fragmentation Needed /
// Packet Too Big carrying the inner MTU that fits; a DF-clear IPv4 one is
// split before sealing so every outer packet fits whole.
func TestMTU(t *testing.T) {
	r := newRig(t)
	fit := maxInner(r.out.SA, 28, 1500)
	if 28+fit+r.out.SA.Overhead(fit, 0) > 1500 || 28+fit+1+r.out.SA.Overhead(fit+1, 0) <= 1500 {
		t.Fatalf("maxInner %d is not the largest that fits", fit)
	}
	// Exactly fitting passes whole.
	ok := udp4("10.0.0.1:5060", "100.64.0.1:5060", string(make([]byte, fit-28)))
	if tx, _ := r.encap(r.fromCore(ok)); len(tx) != 1 || int(tx[0].Len) > ethLen+1500 || r.st.PreFragmented.Load() != 0 {
		t.Fatalf("fitting packet: %d frames", len(tx))
	}

	big := udp4("10.0.0.1:5060", "100.64.0.1:5060", string(bytes.Repeat([]byte("s"), 1460)))
	df := append([]byte(nil), big...)
	df[6] |= 0x40
	binary.BigEndian.PutUint16(df[10:], 0)
	binary.BigEndian.PutUint16(df[10:], ^pkt.Fold(pkt.Sum(df[:20], 0)))
	tx, _ := r.encap(r.fromCore(df))
	if len(tx) != 0 || len(r.p.back) != 1 || r.st.Encap.Drops[DropTooBig].Load() != 1 {
		t.Fatalf("DF: tx %d back %d", len(tx), len(r.p.back))
	}
	icmp := r.bytes(r.p.back[0])[ethLen:]
	if icmp[20] != 3 || icmp[21] != 4 || int(binary.BigEndian.Uint16(icmp[26:])) != fit || dstAddr(icmp) != coreHost || len(icmp) != 576 {
		t.Fatalf("Fragmentation Needed: type %d code %d mtu %d len %d", icmp[20], icmp[21], binary.BigEndian.Uint16(icmp[26:]), len(icmp))
	}

	// DF clear: inner fragments, each sealed whole within the MTU, and
	// together the original payload.
	tx, _ = r.encap(r.fromCore(big))
	all := append(tx, r.p.toPub...)
	if len(all) != 2 || r.st.PreFragmented.Load() != 1 || r.st.PreFragments.Load() != 2 {
		t.Fatalf("pre-fragmentation: %d frames", len(all))
	}
	var payload []byte
	for i, d := range all {
		outer := r.bytes(d)[ethLen:]
		if len(outer) > 1500 || binary.BigEndian.Uint16(outer[6:])&0x3fff != 0 {
			t.Fatalf("frame %d: outer %d bytes, frag field %#x", i, len(outer), binary.BigEndian.Uint16(outer[6:]))
		}
		_, in := r.toPhone(d)
		checkIPv4Sum(t, in)
		fo := binary.BigEndian.Uint16(in[6:])
		if (fo&0x2000 != 0) != (i == 0) || int(fo&0x1fff)*8 != len(payload) || in[8] != 63 {
			t.Fatalf("fragment %d: flags/offset %#x, TTL %d", i, fo, in[8])
		}
		payload = append(payload, in[20:]...)
	}
	if !bytes.Equal(payload, big[20:]) {
		t.Fatal("fragments do not reassemble to the original")
	}

	// IPv6 (never fragmented by a router): Packet Too Big.
	r.out.SetSelectors(netip.MustParsePrefix("fd64::1/128"), netip.Addr{})
	r.out.SetScope(Scope{Local: r.out.Scope().Local, InnerLocal: netip.MustParsePrefix("fd00::/64")})
	v6 := make([]byte, 40+8+1400)
	v6[0], v6[6], v6[7] = 0x60, 17, 64
	binary.BigEndian.PutUint16(v6[4:], 8+1400)
	copy(v6[8:], netip.MustParseAddr("fd00::1").AsSlice())
	copy(v6[24:], netip.MustParseAddr("fd64::1").AsSlice())
	tx, _ = r.encap(r.fromCore(v6))
	if len(tx) != 0 || len(r.p.back) != 1 {
		t.Fatalf("IPv6: tx %d back %d", len(tx), len(r.p.back))
	}
	icmp = r.bytes(r.p.back[0])[ethLen:]
	fit6 := maxInner(r.out.SA, 28, 1500)
	if icmp[6] != 58 || icmp[40] != 2 || int(binary.BigEndian.Uint32(icmp[44:])) != fit6 || srcAddr(icmp) != netip.MustParseAddr("fd00::254") {
		t.Fatalf("Packet Too Big % x", icmp[:48])
	}
	acc := pkt.Sum(icmp[8:40], 0) + uint64(len(icmp)-40) + 58
	if pkt.Fold(pkt.Sum(icmp[40:], acc)) != 0xffff {
		t.Fatal("ICMPv6 checksum wrong")
	}
}

// A side with a VLAN sends tagged frames: sealed ones on the public side,
// decrypted ones and ICMP errors on the private side, 802.1Q or 802.1ad.
func TestVLANTags(t *testing.T) {
	r := newRig(t)
	r.p.pubTag, r.p.privTag = vlanTag(0, 100), vlanTag(0x88a8, 200)
	r.p.frag.tag = r.p.pubTag
	tx, _ := r.encap(r.fromCore(udp4("10.0.0.1:5060", "100.64.0.1:5060", "tagged")))
	f := r.bytes(tx[0])
	if binary.BigEndian.Uint32(f[12:]) != 0x81000064 || binary.BigEndian.Uint16(f[16:]) != 0x0800 {
		t.Fatalf("public frame header % x", f[:18])
	}
	var pk esp.Packet
	if err := r.phIn.OpenPacketTo(append([]byte(nil), f[18:]...), &pk); err != nil {
		t.Fatalf("sealed packet behind the tag: %v", err)
	}
	tx, _ = r.decap(r.fromPhone(udp4("100.64.0.1:5060", "10.0.0.1:5060", "tagged"), 0))
	f = r.bytes(tx[0])
	if binary.BigEndian.Uint32(f[12:]) != 0x88a800c8 || binary.BigEndian.Uint16(f[16:]) != 0x0800 || string(f[0:6]) != string(r.coreMAC[:]) {
		t.Fatalf("private frame header % x", f[:18])
	}
	if _, _, payload, ok := pkt.UDP4Parse(f[18:]); !ok || string(payload) != "tagged" {
		t.Fatal("decrypted packet not behind the tag")
	}
	exp := udp4("10.0.0.1:5060", "100.64.0.1:5060", "x")
	exp[8] = 1
	r.encap(r.fromCore(exp))
	if f = r.bytes(r.p.back[0]); binary.BigEndian.Uint32(f[12:]) != 0x88a800c8 || f[18+9] != 1 {
		t.Fatalf("ICMP frame header % x", f[:28])
	}
	if vlanTag(0, 0) != 0 {
		t.Fatal("no VLAN must mean no tag")
	}
}
