package worker

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// completeMeta fills in what xesp_public/xesp_private learn by parsing
// d's frame (family, IP header end, IP length, outer source for the ESP
// kinds) into the metadata already in front of it, whose kind, slot,
// worker, port and L3 offset the test chose. bpf's TestMetaBytes and
// fixture tables pin what the programs write; this stands in for them
// when frames are built in memory.
func completeMeta(u *xsk.UMEM, d xsk.Desc) {
	m := (*bpf.Meta)(unsafe.Pointer(&u.Meta(d.Addr, bpf.MetaSize)[0]))
	ip := u.Packet(d)[m.L3Off:]
	var src netip.Addr
	switch ip[0] >> 4 {
	case 4:
		m.Family, m.L4Off, m.L3Len = 4, m.L3Off+uint16(ip[0]&0x0f)*4, binary.BigEndian.Uint16(ip[2:])
		src = netip.AddrFrom4([4]byte(ip[12:16]))
	case 6:
		m.Family, m.L4Off, m.L3Len = 6, m.L3Off+40, 40+binary.BigEndian.Uint16(ip[4:])
		src = netip.AddrFrom16([16]byte(ip[8:24]))
	}
	if m.Kind != uint8(bpf.MetaClear) {
		m.Src = src.As16()
	}
	m.Magic = bpf.MetaMagic
}

// TestDecapReadsOuterFromMetadata: the outer source and port the binding
// learns are the metadata's, not a second parse of the header (XDP is
// the one parser; docs/architecture.md, "The XDP-to-worker hand-off"). A
// frame whose metadata names 203.0.113.5 moves the binding there though
// its IPv4 header says 192.0.2.10.
func TestDecapReadsOuterFromMetadata(t *testing.T) {
	f := newPipeFixture(t)
	phone := mustESP(t, pipeSPIIn, 0)
	req := pkt.UDP4(pipeInner, pipeCore, []byte("REGISTER sip:ims"))
	d := f.espFrame(phone, req, pipeNatHW, 4777)
	m := (*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0]))
	other := netip.MustParseAddr("203.0.113.5")
	m.Src = other.As16()
	tx, dropped := f.p.decap([]xsk.Desc{d}, nil, nil)
	if len(tx) != 1 || len(dropped) != 0 {
		t.Fatalf("forwarded %d, dropped %d (%v)", len(tx), len(dropped), drops(&f.st.Decap))
	}
	if b := f.in.Binding.Load(); b.Addr != netip.AddrPortFrom(other, 4777) {
		t.Fatalf("binding %v, want %v:4777 from the metadata", b.Addr, other)
	}
}

// TestInjectedFrameMetadata: a slow-path packet (reassembled by the
// kernel) gets the metadata XDP would have written, so the one decap
// path opens it; IPv4 and IPv6 outer sources, with and without a port.
func TestInjectedFrameMetadata(t *testing.T) {
	u, err := xsk.New(xsk.Config{FrameCount: 8, FillSize: 4, CompletionSize: 4, RxSize: 4, TxSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	pool := u.NewPool()
	esp := make([]byte, 40)
	binary.BigEndian.PutUint32(esp, 0x1234)
	for _, c := range []struct {
		src    netip.AddrPort
		dst    netip.Addr
		family uint8
		hl     uint16
		kind   bpf.MetaKind
	}{
		{netip.MustParseAddrPort("192.0.2.7:4500"), netip.MustParseAddr("192.0.2.1"), 4, 20, bpf.MetaESPUDP},
		{netip.MustParseAddrPort("[2001:db8::7]:0"), netip.MustParseAddr("2001:db8::1"), 6, 40, bpf.MetaESP},
	} {
		w := &Worker{cfg: Config{UMEM: u}, inject: make(chan SlowPacket, 1)}
		w.pipe.id = 2
		w.inject <- SlowPacket{ESP: esp, Src: c.src, Dst: c.dst, Index: 9}
		rx, addrs := make([]xsk.Desc, 1), make([]uint64, 1)
		if n := w.injected(pool, rx, addrs); n != 1 {
			t.Fatalf("%v: injected %d frames", c.src, n)
		}
		m := *(*bpf.Meta)(unsafe.Pointer(&u.Meta(rx[0].Addr, bpf.MetaSize)[0]))
		want := bpf.Meta{Src: c.src.Addr().As16(), SaIndex: 9, L3Off: ethLen, L4Off: ethLen + c.hl, L3Len: c.hl + 40,
			Worker: 2, Family: c.family, Kind: uint8(c.kind), Magic: bpf.MetaMagic}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&want.Sport))[:], c.src.Port())
		if m != want {
			t.Errorf("%v: metadata %+v\nwant %+v", c.src, m, want)
		}
		if int(rx[0].Len) != ethLen+int(c.hl)+40 {
			t.Errorf("%v: frame of %d bytes", c.src, rx[0].Len)
		}
		pool.Put(addrs)
	}
}
