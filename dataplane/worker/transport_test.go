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

// Transport-mode SAs through the pipeline (transport.go): the phone's
// segment to the gateway's public address leaves toward the core from
// the phone's core address to the SA's core-side host, checksums valid
// for the new pseudo-header; the core's reply to the core address is
// sealed as a bare segment (Next Header = UDP/TCP) whose checksum is
// valid for the outer pseudo-header (gateway public address -> binding).

var (
	trGW    = netip.MustParseAddr("198.51.100.1") // the gateway's public address
	trNAT   = netip.MustParseAddr("203.0.113.7")  // the phone's NAPT (or the phone itself, plain ESP)
	trPhone = netip.MustParseAddr("192.168.1.10") // the phone's own address behind the NAPT
	trCore  = netip.MustParseAddr("100.64.0.9")   // its core address
	trPCSCF = netip.MustParseAddr("10.0.0.1")     // inner.local
	trOther = netip.MustParseAddr("100.64.0.10")  // another phone's core address
)

type trRig struct {
	*pipeFixture
	phoneOut, phoneIn *esp.Transform // the phone's halves of the pair
}

// newTrRig is a transport-mode pair: index 0 inbound (ports 5062 -> 5064
// as sec-agree's client->server), index 1 outbound; encap says UDP
// encapsulation (the binding has a port) or plain ESP.
func newTrRig(t *testing.T, encap bool) *trRig {
	f := newPipeFixture(t)
	nm := map[[16]byte][6]byte{trPCSCF.As16(): pipeCoreHW, trNAT.As16(): pipeNatHW}
	f.p.nb.(*mapNeighbors).m.Store(&nm)
	mk := func(spi uint32, window int) *esp.Transform {
		s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: pipeKey, Mode: esp.ModeTransport, ReplayWindow: window})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	var port, lport uint16
	if encap {
		port, lport = 4500, 4500
	}
	bind := NewBinding(Peer{Addr: netip.AddrPortFrom(trNAT, port)})
	f.in = withSel(&Slot{SA: mk(pipeSPIIn, 64), Dir: Inbound, Transport: true,
		scope: &Scope{Dest: trPCSCF, InnerLocal: netip.PrefixFrom(trPCSCF, 32)}, Proto: 0, PortPeer: 5062, PortLocal: 5064, Binding: bind},
		netip.Prefix{}, trCore)
	f.out = withSel(&Slot{SA: mk(pipeSPIOut, 0), Dir: Outbound, Transport: true, LocalPort: lport,
		scope: &Scope{Local: trGW, InnerLocal: netip.PrefixFrom(trPCSCF, 32)}, PortLocal: 5064, PortPeer: 5062,
		Binding: bind, index: 1}, netip.PrefixFrom(trNAT, 32), trCore)
	f.p.table = []*Slot{f.in, f.out}
	f.p.track(nil, f.out)
	return &trRig{pipeFixture: f, phoneOut: mk(pipeSPIIn, 0), phoneIn: mk(pipeSPIOut, 64)}
}

// fromPhone is the phone's segment seg (protocol proto) sealed in
// transport mode, as XDP hands it over: outer IPv4 from the NAPT to the
// gateway, the UDP header stripped (sport in the metadata, kind ESPUDP)
// or plain ESP.
func (r *trRig) fromPhone(seg []byte, proto uint8, sport uint16) xsk.Desc {
	m := bpf.Meta{SaIndex: 0, L3Off: ethLen, Kind: uint8(bpf.MetaESP)}
	if sport != 0 {
		m.Kind = uint8(bpf.MetaESPUDP)
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&m.Sport))[:], sport)
	}
	addr, b := r.frame(m)
	pay := ethLen + 20 + r.phoneOut.Headroom()
	copy(b[pay:], seg)
	start, end, err := r.phoneOut.Seal(b, pay, len(seg), proto, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	if s, err := esp.PutOuter(b, start, end, &esp.Outer{Src: trNAT, Dst: trGW}); err != nil || s != ethLen {
		r.t.Fatalf("outer header at %d: %v", s, err)
	}
	copy(b[0:6], pipePubHW[:])
	copy(b[6:12], pipeNatHW[:])
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	d := xsk.Desc{Addr: addr, Len: uint32(end)}
	completeMeta(r.u, d)
	return d
}

func (r *trRig) bytes(d xsk.Desc) []byte {
	return r.u.Frame(d.Addr)[d.Addr-r.u.FrameBase(d.Addr):][:d.Len]
}

// tcp4 is an IPv4/TCP packet (20-byte header, ACK|PSH) with valid
// checksums.
func tcp4(src, dst netip.AddrPort, payload []byte) []byte {
	p := make([]byte, 40+len(payload))
	p[0], p[8], p[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[10:], pkt.Checksum(p[:20]))
	t := p[20:]
	binary.BigEndian.PutUint16(t[0:], src.Port())
	binary.BigEndian.PutUint16(t[2:], dst.Port())
	binary.BigEndian.PutUint32(t[4:], 1000)
	binary.BigEndian.PutUint32(t[8:], 2000)
	t[12], t[13] = 5<<4, 0x18
	binary.BigEndian.PutUint16(t[14:], 65535)
	copy(t[20:], payload)
	binary.BigEndian.PutUint16(t[16:], ^pkt.Fold(pkt.Sum(t, pkt.Sum(p[12:20], 6+uint64(len(t))))))
	return p
}

// segOf is the transport segment of an IPv4 packet built by pkt.UDP4 or
// tcp4: what the phone's stack hands its ESP transport SA.
func segOf(ip []byte) []byte { return append([]byte(nil), ip[20:]...) }

// l4Valid checks an IPv4 segment's UDP/TCP checksum against the
// pseudo-header src -> dst.
func l4Valid(seg []byte, proto uint8, src, dst netip.Addr) bool {
	ph := append(src.AsSlice(), dst.AsSlice()...)
	return pkt.Fold(pkt.Sum(seg, pkt.Sum(ph, uint64(proto)+uint64(len(seg))))) == 0xffff
}

// checkForwarded asserts the decapsulated packet is exactly want's
// addresses, protocol and segment, with a fresh TTL and a valid header
// checksum (ID and flags are the outer header's).
func checkForwarded(t *testing.T, got, want []byte) {
	t.Helper()
	if len(got) != len(want) || got[0] != 0x45 || got[8] != 64 || got[9] != want[9] ||
		!bytes.Equal(got[2:4], want[2:4]) || !bytes.Equal(got[12:20], want[12:20]) || pkt.Checksum(got[:20]) != 0 {
		t.Fatalf("forwarded header\n got %x\nwant %x", got[:min(20, len(got))], want[:20])
	}
	if !bytes.Equal(got[20:], want[20:]) {
		t.Fatalf("forwarded segment (checksum included)\n got %x\nwant %x", got[20:], want[20:])
	}
}

// UDP-encapsulated transport through a NAPT: the phone computed its UDP
// checksum over its private address (RFC 3948 3.1.2's case); the packet
// reaches the P-CSCF from the core address with a checksum valid for
// core -> P-CSCF, the binding follows the NAPT's port; the reply is sealed
// as a UDP segment (Next Header 17) valid for gateway -> NAPT, sent from
// 4500 to the binding.
func TestTransportPipelineUDPEncap(t *testing.T) {
	r := newTrRig(t, true)
	req := []byte("REGISTER sip:ims SIP/2.0\r\n\r\n")
	seg := segOf(pkt.UDP4(netip.AddrPortFrom(trPhone, 5062), netip.AddrPortFrom(trGW, 5064), req))
	if l4Valid(seg, 17, trNAT, trGW) {
		t.Fatal("fixture: the phone's checksum must not be valid for the NAPT's address")
	}
	tx, drop := r.p.decap([]xsk.Desc{r.fromPhone(seg, 17, 40001)}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("decap: %d forwarded, %d dropped %v", len(tx), len(drop), drops(&r.st.Decap))
	}
	got := r.bytes(tx[0])
	if !bytes.Equal(got[:ethLen], eth(pipeCoreHW, pipePrvHW)) {
		t.Fatalf("Ethernet header %x", got[:ethLen])
	}
	checkForwarded(t, got[ethLen:], pkt.UDP4(netip.AddrPortFrom(trCore, 5062), netip.AddrPortFrom(trPCSCF, 5064), req))
	if b := r.in.Binding.Load(); b.Addr != netip.AddrPortFrom(trNAT, 40001) || b.MAC != pipeNatHW {
		t.Fatalf("binding %+v", b)
	}
	if r.in.Counters.Packets.Load() != 1 {
		t.Fatalf("inbound packets %d", r.in.Counters.Packets.Load())
	}

	// The reply, DF set as a Linux UDP socket sends it.
	resp := []byte("SIP/2.0 200 OK\r\n\r\n")
	ip := pkt.UDP4(netip.AddrPortFrom(trPCSCF, 5064), netip.AddrPortFrom(trCore, 5062), resp)
	ip[6] = 0x40
	binary.BigEndian.PutUint16(ip[10:], 0)
	binary.BigEndian.PutUint16(ip[10:], pkt.Checksum(ip[:20]))
	tx, drop = r.p.encap([]xsk.Desc{r.clearFrame(1, ip)}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("encap: %d sealed, %d dropped %v", len(tx), len(drop), drops(&r.st.Encap))
	}
	f := r.bytes(tx[0])
	o := f[ethLen:]
	if !bytes.Equal(f[:6], pipeNatHW[:]) || o[9] != 17 || !bytes.Equal(o[12:16], trGW.AsSlice()) || !bytes.Equal(o[16:20], trNAT.AsSlice()) ||
		binary.BigEndian.Uint16(o[20:]) != 4500 || binary.BigEndian.Uint16(o[22:]) != 40001 {
		t.Fatalf("outer headers %x", f[:ethLen+28])
	}
	res, err := r.phoneIn.Open(o[28:])
	if err != nil {
		t.Fatalf("the phone opens the reply: %v", err)
	}
	if res.NextHeader != 17 {
		t.Fatalf("Next Header %d, want 17 (transport-mode UDP)", res.NextHeader)
	}
	opened := o[28:][res.Start:res.End]
	if want := segOf(pkt.UDP4(netip.AddrPortFrom(trGW, 5064), netip.AddrPortFrom(trNAT, 5062), resp)); !bytes.Equal(opened, want) {
		t.Fatalf("sealed segment\n got %x\nwant %x", opened, want)
	}
	if !l4Valid(opened, 17, trGW, trNAT) {
		t.Fatal("sealed UDP checksum not valid for gateway -> binding")
	}

	// Selectors: a segment to another port of the gateway, a reply to
	// another phone's core address, a reply from another core host.
	tx, drop = r.p.decap([]xsk.Desc{r.fromPhone(segOf(pkt.UDP4(netip.AddrPortFrom(trPhone, 5062), netip.AddrPortFrom(trGW, 5070), req)), 17, 40001)}, nil, nil)
	if len(tx) != 0 || len(drop) != 1 || r.st.Decap.Drops[DropPolicy].Load() != 1 {
		t.Fatalf("segment to port 5070: %d forwarded, %v", len(tx), drops(&r.st.Decap))
	}
	for _, c := range [][]byte{
		pkt.UDP4(netip.AddrPortFrom(trPCSCF, 5064), netip.AddrPortFrom(trOther, 5062), resp),
		pkt.UDP4(netip.MustParseAddrPort("10.0.0.2:5064"), netip.AddrPortFrom(trCore, 5062), resp),
	} {
		if tx, _ = r.p.encap([]xsk.Desc{r.clearFrame(1, c)}, nil, nil); len(tx) != 0 {
			t.Fatalf("sealed %x", c[12:20])
		}
	}
	if n := r.st.Encap.Drops[DropPolicy].Load(); n != 2 {
		t.Fatalf("encap selector drops %d, want 2", n)
	}
	// A fragment cannot be sealed in transport mode.
	fr := append([]byte(nil), ip...)
	fr[6] = 0x20 // MF
	binary.BigEndian.PutUint16(fr[10:], 0)
	binary.BigEndian.PutUint16(fr[10:], pkt.Checksum(fr[:20]))
	if tx, _ = r.p.encap([]xsk.Desc{r.clearFrame(1, fr)}, nil, nil); len(tx) != 0 || r.st.Encap.Drops[DropFragment].Load() != 1 {
		t.Fatalf("fragment: sealed %d, %v", len(tx), drops(&r.st.Encap))
	}

	// No allocation per packet on the transport encap path.
	r.frames = 0
	d := r.clearFrame(1, ip)
	saved := append([]byte(nil), r.u.Frame(d.Addr)[:d.Addr-r.u.FrameBase(d.Addr)+uint64(d.Len)]...)
	txb, dropb := make([]xsk.Desc, 0, 1), make([]uint64, 0, 1)
	allocs := testing.AllocsPerRun(50, func() {
		copy(r.u.Frame(d.Addr), saved)
		txb, dropb = r.p.encap([]xsk.Desc{d}, txb[:0], dropb[:0])
	})
	if allocs != 0 || len(txb) != 1 {
		t.Fatalf("%v allocations per transport encap (sealed %d, dropped %v)", allocs, len(txb), drops(&r.st.Encap))
	}
}

// Plain ESP (protocol 50) transport, no NAPT: a TCP segment both ways,
// TCP checksums valid at each hop (core -> P-CSCF after decap, gateway ->
// phone inside the reply), the outer packet protocol 50 to the phone's
// own address, port-less binding.
func TestTransportPipelinePlainESPTCP(t *testing.T) {
	r := newTrRig(t, false)
	req := []byte("OPTIONS sip:pcscf SIP/2.0\r\n\r\n")
	// Without a NAPT the phone's own address is the outer source.
	seg := segOf(tcp4(netip.AddrPortFrom(trNAT, 5062), netip.AddrPortFrom(trGW, 5064), req))
	tx, drop := r.p.decap([]xsk.Desc{r.fromPhone(seg, 6, 0)}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("decap: %d forwarded, %d dropped %v", len(tx), len(drop), drops(&r.st.Decap))
	}
	got := r.bytes(tx[0])[ethLen:]
	checkForwarded(t, got, tcp4(netip.AddrPortFrom(trCore, 5062), netip.AddrPortFrom(trPCSCF, 5064), req))
	if !l4Valid(got[20:], 6, trCore, trPCSCF) {
		t.Fatal("forwarded TCP checksum not valid")
	}
	if b := r.in.Binding.Load(); b.Addr != netip.AddrPortFrom(trNAT, 0) {
		t.Fatalf("binding %v", b.Addr)
	}

	resp := []byte("SIP/2.0 200 OK\r\n\r\n")
	ip := tcp4(netip.AddrPortFrom(trPCSCF, 5064), netip.AddrPortFrom(trCore, 5062), resp)
	ip[1] = 0x68 // DSCP AF31, copied to the outer header
	binary.BigEndian.PutUint16(ip[10:], 0)
	binary.BigEndian.PutUint16(ip[10:], pkt.Checksum(ip[:20]))
	tx, drop = r.p.encap([]xsk.Desc{r.clearFrame(1, ip)}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("encap: %d sealed, %d dropped %v", len(tx), len(drop), drops(&r.st.Encap))
	}
	o := r.bytes(tx[0])[ethLen:]
	if o[9] != 50 || o[1] != 0x68 || !bytes.Equal(o[16:20], trNAT.AsSlice()) || pkt.Checksum(o[:20]) != 0 {
		t.Fatalf("outer header %x", o[:20])
	}
	// The phone's view: the whole packet opened and rebuilt as its
	// stack does, checksum checked over the outer addresses.
	pk, err := r.phoneIn.OpenPacket(o)
	if err != nil {
		t.Fatal(err)
	}
	if pk.NextHeader != 6 || !bytes.Equal(pk.Payload, segOf(tcp4(netip.AddrPortFrom(trGW, 5064), netip.AddrPortFrom(trNAT, 5062), resp))) {
		t.Fatalf("opened NH %d payload %x", pk.NextHeader, pk.Payload)
	}
}

// The MTU check counts the stripped IP header: a DF reply that fits once
// its 20-byte header is gone is sealed; one that does not gets an ICMP
// Fragmentation Needed to the core whose MTU includes that header.
func TestTransportPipelineMTU(t *testing.T) {
	r := newTrRig(t, true)
	r.p.frag = fragmenter{mtu: 600, mem: r.u, rxOff: uint64(r.u.RxOffset()), stride: 1}
	r.p.privAddrs = []netip.Addr{netip.MustParseAddr("10.0.0.254")}
	r.p.icmp = newLimiter(100)
	r.p.clock = func() int64 { return 1 }
	fit := maxInner(r.out.SA, 28, 600) + 20
	for _, size := range []int{fit, fit + 1} {
		ip := pkt.UDP4(netip.AddrPortFrom(trPCSCF, 5064), netip.AddrPortFrom(trCore, 5062), make([]byte, size-28))
		ip[6] = 0x40
		binary.BigEndian.PutUint16(ip[10:], 0)
		binary.BigEndian.PutUint16(ip[10:], pkt.Checksum(ip[:20]))
		r.p.toPub, r.p.back = r.p.toPub[:0], r.p.back[:0]
		tx, _ := r.p.encap([]xsk.Desc{r.clearFrame(1, ip)}, nil, nil)
		switch size {
		case fit:
			if len(tx) != 1 || int(tx[0].Len)-ethLen > 600 {
				t.Fatalf("%d bytes: sealed %d (%v)", size, len(tx), drops(&r.st.Encap))
			}
		default:
			if len(tx) != 0 || len(r.p.back) != 1 || r.st.Encap.Drops[DropTooBig].Load() != 1 {
				t.Fatalf("%d bytes: sealed %d, ICMP %d, %v", size, len(tx), len(r.p.back), drops(&r.st.Encap))
			}
			icmp := r.bytes(r.p.back[0])[ethLen:]
			if icmp[9] != 1 || icmp[20] != 3 || icmp[21] != 4 || int(binary.BigEndian.Uint16(icmp[26:])) != fit {
				t.Fatalf("ICMP %x, want type 3 code 4 MTU %d", icmp[:28], fit)
			}
		}
	}
}

// BenchmarkEncapModes seals 64-packet batches of 200-byte UDP packets
// from the P-CSCF to a phone's core address, tunnel mode (core address
// rewritten to the phone's inner address, whole packet sealed) beside
// transport mode (re-addressed to gateway -> binding, header stripped,
// segment sealed), in the same run: the ratio is transport's cost.
func BenchmarkEncapModes(b *testing.B) {
	for _, mode := range []esp.Mode{esp.ModeTunnel, esp.ModeTransport} {
		b.Run(mode.String(), func(b *testing.B) {
			const batch, inner = 64, 200
			u, err := xsk.New(xsk.Config{FrameCount: batch, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64})
			if err != nil {
				b.Fatal(err)
			}
			defer u.Close()
			gw, err := esp.NewTransform(esp.Config{SPI: 0x2001, Proposal: esp.AES128GCM16, EncKey: make([]byte, 20), Mode: mode})
			if err != nil {
				b.Fatal(err)
			}
			p := pipeline{mem: u, nb: &mapNeighbors{}, stats: &Stats{}, bindEvents: make(chan BindingChange, 1), seqRequests: make(chan SeqRequest)}
			p.frag = fragmenter{mtu: 1500, mem: u, rxOff: uint64(u.RxOffset()), stride: 1}
			e := withSel(&Slot{SA: gw, Dir: Outbound, LocalPort: 4500, scope: &Scope{Local: trGW, InnerLocal: netip.PrefixFrom(trPCSCF, 32)},
				Binding: NewBinding(Peer{Addr: netip.AddrPortFrom(trNAT, 4500), MAC: [6]byte{2, 0, 0, 0, 0, 2}, HasMAC: true})},
				netip.Prefix{}, trCore)
			if mode == esp.ModeTransport {
				e.Transport = true
			} else {
				e.SetSelectors(netip.PrefixFrom(trPhone, 32), trCore)
			}
			p.table = []*Slot{e}
			rxOff := uint64(u.RxOffset())
			ip := pkt.UDP4(netip.AddrPortFrom(trPCSCF, 5064), netip.AddrPortFrom(trCore, 5062), make([]byte, inner-28))
			rx := make([]xsk.Desc, batch)
			saved := make([][]byte, batch)
			for i := range rx {
				base := uint64(i) * uint64(u.FrameSize())
				frame := u.Frame(base + rxOff)[rxOff:]
				copy(frame[ethLen:], ip)
				binary.BigEndian.PutUint16(frame[12:], 0x0800)
				*(*bpf.Meta)(unsafe.Pointer(&u.Meta(base+rxOff, bpf.MetaSize)[0])) = bpf.Meta{L3Off: ethLen, Kind: uint8(bpf.MetaClear), Magic: bpf.MetaMagic}
				rx[i] = xsk.Desc{Addr: base + rxOff, Len: ethLen + inner}
				completeMeta(u, rx[i])
				saved[i] = append([]byte(nil), u.Frame(base)[rxOff-bpf.MetaSize:rxOff+ethLen+inner]...)
			}
			tx, drop := make([]xsk.Desc, 0, batch), make([]uint64, 0, batch)
			b.SetBytes(inner)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N / batch {
				for i := range rx {
					copy(u.Frame(rx[i].Addr)[rxOff-bpf.MetaSize:], saved[i])
				}
				tx, drop = p.encap(rx, tx[:0], drop[:0])
				if len(tx) != batch {
					b.Fatalf("sealed %d of %d (%v)", len(tx), batch, drops(&p.stats.Encap))
				}
			}
		})
	}
}

// udp6 is an IPv6/UDP packet (hop limit 64) with a valid checksum.
func udp6(src, dst netip.AddrPort, payload []byte) []byte {
	p := make([]byte, 48+len(payload))
	p[0], p[6], p[7] = 0x60, 17, 64
	binary.BigEndian.PutUint16(p[4:], uint16(8+len(payload)))
	s, d := src.Addr().As16(), dst.Addr().As16()
	copy(p[8:], s[:])
	copy(p[24:], d[:])
	u := p[40:]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	copy(u[8:], payload)
	ck := ^pkt.Fold(pkt.Sum(u, pkt.Sum(p[8:40], 17+uint64(len(u)))))
	if ck == 0 {
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], ck)
	return p
}

// IPv6 transport, UDP-encapsulated: the same two steps over IPv6 headers
// (hop limit set, UDP checksum, mandatory in IPv6, valid after each
// re-addressing).
func TestTransportPipelineIPv6(t *testing.T) {
	gw6, nat6, ph6 := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8:7::7"), netip.MustParseAddr("fd00:1::10")
	core6, pcscf6 := netip.MustParseAddr("fd64::9"), netip.MustParseAddr("fd00::1")
	r := newTrRig(t, true)
	nm := map[[16]byte][6]byte{pcscf6.As16(): pipeCoreHW}
	r.p.nb.(*mapNeighbors).m.Store(&nm)
	bind := NewBinding(Peer{Addr: netip.AddrPortFrom(nat6, 4500)})
	r.in.Binding = bind
	r.in.SetSelectors(r.in.InnerPeer(), core6)
	r.in.SetScope(Scope{Dest: pcscf6, InnerLocal: netip.PrefixFrom(pcscf6, 128)})
	r.out.Binding = bind
	r.out.SetSelectors(netip.PrefixFrom(nat6, 128), core6)
	r.out.SetScope(Scope{Local: gw6, InnerLocal: netip.PrefixFrom(pcscf6, 128)})

	req := []byte("REGISTER sip:ims SIP/2.0\r\n\r\n")
	seg := append([]byte(nil), udp6(netip.AddrPortFrom(ph6, 5062), netip.AddrPortFrom(gw6, 5064), req)[40:]...)
	m := bpf.Meta{SaIndex: 0, L3Off: ethLen, Kind: uint8(bpf.MetaESPUDP)}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&m.Sport))[:], 40001)
	addr, b := r.frame(m)
	pay := ethLen + 40 + r.phoneOut.Headroom()
	copy(b[pay:], seg)
	start, end, err := r.phoneOut.Seal(b, pay, len(seg), 17, 0)
	if err != nil {
		t.Fatal(err)
	}
	if s, err := esp.PutOuter(b, start, end, &esp.Outer{Src: nat6, Dst: gw6, TTL: 3}); err != nil || s != ethLen {
		t.Fatalf("outer at %d: %v", s, err)
	}
	copy(b[6:12], pipeNatHW[:])
	binary.BigEndian.PutUint16(b[12:], 0x86dd)
	completeMeta(r.u, xsk.Desc{Addr: addr, Len: uint32(end)})
	tx, drop := r.p.decap([]xsk.Desc{{Addr: addr, Len: uint32(end)}}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("decap: %d forwarded, %v", len(tx), drops(&r.st.Decap))
	}
	got := r.bytes(tx[0])[ethLen:]
	if want := udp6(netip.AddrPortFrom(core6, 5062), netip.AddrPortFrom(pcscf6, 5064), req); !bytes.Equal(got[4:], want[4:]) || got[0]>>4 != 6 {
		t.Fatalf("forwarded\n got %x\nwant %x", got, want)
	}
	if b := bind.Load(); b.Addr != netip.AddrPortFrom(nat6, 40001) {
		t.Fatalf("binding %v", b.Addr)
	}

	resp := []byte("SIP/2.0 200 OK\r\n\r\n")
	ip := udp6(netip.AddrPortFrom(pcscf6, 5064), netip.AddrPortFrom(core6, 5062), resp)
	d := r.clearFrame(1, ip)
	binary.BigEndian.PutUint16(r.bytes(d)[12:], 0x86dd)
	tx, drop = r.p.encap([]xsk.Desc{d}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("encap: %d sealed, %v", len(tx), drops(&r.st.Encap))
	}
	o := r.bytes(tx[0])[ethLen:]
	if o[6] != 17 || !bytes.Equal(o[8:24], gw6.AsSlice()) || !bytes.Equal(o[24:40], nat6.AsSlice()) || binary.BigEndian.Uint16(o[42:]) != 40001 {
		t.Fatalf("outer %x", o[:48])
	}
	res, err := r.phoneIn.Open(o[48:])
	if err != nil || res.NextHeader != 17 {
		t.Fatalf("open: %v (next header %d)", err, res.NextHeader)
	}
	if want := udp6(netip.AddrPortFrom(gw6, 5064), netip.AddrPortFrom(nat6, 5062), resp)[40:]; !bytes.Equal(o[48:][res.Start:res.End], want) {
		t.Fatalf("sealed segment\n got %x\nwant %x", o[48:][res.Start:res.End], want)
	}
}
