package worker

import (
	"bytes"
	"net/netip"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// Through the pipeline: decap of a phone's packet (inner source
// 192.168.1.10) forwards it from its core address, checksums valid; encap
// of the core's reply to the core address seals it with the inner
// destination back at 192.168.1.10, checksums valid; a reply to another
// phone's core address is dropped by the selectors, never sealed. No allocation
// per packet.
func TestPipelineCoreTranslation(t *testing.T) {
	u, err := xsk.New(xsk.Config{FrameCount: 8, FillSize: 8, CompletionSize: 8, RxSize: 8, TxSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	key := make([]byte, 20)
	key[0] = 7
	mk := func(spi uint32, window int) *esp.Transform {
		s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: key, ReplayWindow: window, Mode: esp.ModeTunnel})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	phoneAddr, core, other := netip.MustParseAddr("192.168.1.10"), netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2")
	peer := netip.MustParseAddr("198.51.100.7")
	inner := netip.PrefixFrom(phoneAddr, 32)
	bind := NewBinding(Peer{Addr: netip.AddrPortFrom(peer, 4500), MAC: [6]byte{2, 0, 0, 0, 0, 2}, HasMAC: true})
	var st Stats
	nm := map[[16]byte][6]byte{netip.MustParseAddr("10.0.0.1").As16(): {2, 0, 0, 0, 0, 1}}
	nb := &mapNeighbors{}
	nb.m.Store(&nm)
	p := pipeline{mem: u, nb: nb, stats: &st, bindEvents: make(chan BindingChange, 1), seqRequests: make(chan SeqRequest)}
	p.frag = fragmenter{mtu: 1500, mem: u, rxOff: uint64(u.RxOffset()), stride: 1}
	in := withSel(&Slot{SA: mk(0x1001, 1024), Dir: Inbound, Binding: bind}, inner, core)
	out := withSel(&Slot{SA: mk(0x2001, 0), Dir: Outbound, scope: &Scope{Local: netip.MustParseAddr("198.51.100.1")}, LocalPort: 4500,
		Binding: bind}, inner, core)
	p.table = []*Slot{in, out}
	p.track(nil, out)
	rxOff := uint64(u.RxOffset())
	setMeta := func(base uint64, m bpf.Meta) {
		*(*bpf.Meta)(unsafe.Pointer(&u.Meta(base+rxOff, bpf.MetaSize)[0])) = m
	}

	// Decap.
	phoneSA := mk(0x1001, 0)
	req := pkt.UDP4(netip.AddrPortFrom(phoneAddr, 5060), netip.MustParseAddrPort("10.0.0.1:5060"), []byte("REGISTER sip:ims SIP/2.0\r\n\r\n"))
	frame := u.Frame(rxOff)[rxOff:]
	pay := ethLen + 20 + phoneSA.Headroom()
	copy(frame[pay:], req)
	start, end, err := phoneSA.Seal(frame, pay, len(req), esp.NextHeaderIPv4, 0)
	if err != nil {
		t.Fatal(err)
	}
	if s, err := esp.PutOuter(frame, start, end, &esp.Outer{Src: peer, Dst: netip.MustParseAddr("198.51.100.1")}); err != nil || s != ethLen {
		t.Fatalf("outer at %d: %v", s, err)
	}
	copy(frame[6:12], []byte{2, 0, 0, 0, 0, 2})
	setMeta(0, bpf.Meta{SaIndex: 0, L3Off: ethLen, Kind: uint8(bpf.MetaESP), Magic: bpf.MetaMagic})
	completeMeta(u, xsk.Desc{Addr: rxOff, Len: uint32(end)})
	tx, drop := p.decap([]xsk.Desc{{Addr: rxOff, Len: uint32(end)}}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("decap: %d forwarded, %d dropped", len(tx), len(drop))
	}
	got := u.Frame(tx[0].Addr)[tx[0].Addr-u.FrameBase(tx[0].Addr):][ethLen:tx[0].Len]
	want := routed(pkt.UDP4(netip.AddrPortFrom(core, 5060), netip.MustParseAddrPort("10.0.0.1:5060"), []byte("REGISTER sip:ims SIP/2.0\r\n\r\n")))
	if !bytes.Equal(got, want) {
		t.Fatalf("decap forwarded\n got %x\nwant %x", got, want)
	}

	// Encap: the reply to the core address, and one to another phone's.
	reply := func(dst netip.Addr) uint64 {
		base := uint64(4096)
		f := u.Frame(base + rxOff)[rxOff:]
		ip := pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5060"), netip.AddrPortFrom(dst, 5060), []byte("SIP/2.0 200 OK\r\n\r\n"))
		copy(f[ethLen:], ip)
		f[12], f[13] = 0x08, 0x00
		setMeta(base, bpf.Meta{SaIndex: 1, L3Off: ethLen, Kind: uint8(bpf.MetaClear), Magic: bpf.MetaMagic})
		completeMeta(u, xsk.Desc{Addr: base + rxOff, Len: uint32(ethLen + len(ip))})
		return uint64(len(ip))
	}
	n := reply(core)
	tx, drop = p.encap([]xsk.Desc{{Addr: 4096 + rxOff, Len: uint32(ethLen + n)}}, nil, nil)
	if len(tx) != 1 || len(drop) != 0 {
		t.Fatalf("encap: %d sealed, %d dropped", len(tx), len(drop))
	}
	f := u.Frame(tx[0].Addr)[tx[0].Addr-u.FrameBase(tx[0].Addr):][:tx[0].Len]
	res, err := mk(0x2001, 1024).Open(f[ethLen+28:])
	if err != nil {
		t.Fatalf("open the sealed reply: %v", err)
	}
	want = routed(pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5060"), netip.AddrPortFrom(phoneAddr, 5060), []byte("SIP/2.0 200 OK\r\n\r\n")))
	if opened := f[ethLen+28:][res.Start:res.End]; !bytes.Equal(opened, want) {
		t.Fatalf("sealed inner\n got %x\nwant %x", opened, want)
	}
	n = reply(other)
	tx, drop = p.encap([]xsk.Desc{{Addr: 4096 + rxOff, Len: uint32(ethLen + n)}}, nil, nil)
	if len(tx) != 0 || len(drop) != 1 || st.Encap.Drops[DropPolicy].Load() != 1 {
		t.Fatalf("reply to another core address: %d sealed, %d dropped, policy %d", len(tx), len(drop), st.Encap.Drops[DropPolicy].Load())
	}

	// No allocation per packet on the translated encap path.
	n = reply(core)
	saved := append([]byte(nil), u.Frame(4096)[rxOff-bpf.MetaSize:rxOff+ethLen+n]...)
	rx := []xsk.Desc{{Addr: 4096 + rxOff, Len: uint32(ethLen + n)}}
	txb, dropb := make([]xsk.Desc, 0, 1), make([]uint64, 0, 1)
	allocs := testing.AllocsPerRun(50, func() {
		copy(u.Frame(4096)[rxOff-bpf.MetaSize:], saved)
		txb, dropb = p.encap(rx, txb[:0], dropb[:0])
	})
	if allocs != 0 || len(txb) != 1 {
		t.Fatalf("%v allocations per encap (sealed %d)", allocs, len(txb))
	}
}
