package worker

import (
	"bytes"
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

// FuzzPipelineMeta: whatever the metadata in front of a valid frame
// says (the fuzzer's bytes XORed onto what XDP would write; magic and
// worker number kept), decap and encap do not panic, and what they
// forward is the packet sent: decap the routed inner packet (ESP
// authentication catches offsets and lengths that lie), encap a packet
// the phone opens to the routed cleartext (the worker holds the
// metadata's length to the header's). The all-zero seed is the valid
// frame, forwarded.
func FuzzPipelineMeta(f *testing.F) {
	f.Add(make([]byte, bpf.MetaSize), true)
	f.Add(make([]byte, bpf.MetaSize), false)
	flip := make([]byte, bpf.MetaSize)
	flip[26] = 8 // l3_len off by the UDP header
	f.Add(flip, true)
	f.Add(flip, false)
	f.Fuzz(func(t *testing.T, meta []byte, inbound bool) {
		if len(meta) != bpf.MetaSize {
			return
		}
		meta[bpf.MetaSize-1], meta[28] = 0, 0 // magic, worker
		fx := newPipeFixture(t)
		req := pkt.UDP4(pipeInner, pipeCore, []byte("REGISTER sip:ims"))
		resp := pkt.UDP4(pipeCore, pipeInner, []byte("SIP/2.0 200 OK"))
		var d xsk.Desc
		if inbound {
			d = fx.espFrame(mustESP(t, pipeSPIIn, 0), req, pipeNatHW, 4777)
		} else {
			d = fx.clearFrame(1, resp)
		}
		for i, b := range fx.u.Meta(d.Addr, bpf.MetaSize) {
			fx.u.Meta(d.Addr, bpf.MetaSize)[i] = b ^ meta[i]
		}
		var tx []xsk.Desc
		var dropped []uint64
		if inbound {
			tx, dropped = fx.p.decap([]xsk.Desc{d}, nil, nil)
		} else {
			tx, dropped = fx.p.encap([]xsk.Desc{d}, nil, nil)
		}
		if len(tx)+len(dropped) != 1 {
			t.Fatalf("one frame in, %d out, %d dropped", len(tx), len(dropped))
		}
		if len(tx) == 0 {
			if bytes.Equal(meta, make([]byte, bpf.MetaSize)) {
				t.Fatalf("the valid frame was dropped: %v %v", drops(&fx.st.Decap), drops(&fx.st.Encap))
			}
			return
		}
		got := fx.u.Packet(tx[0])
		if inbound {
			if w := append(eth(pipeCoreHW, pipePrvHW), routed(req)...); !bytes.Equal(got, w) {
				t.Fatalf("forwarded\n got %x\nwant %x", got, w)
			}
			return
		}
		opened, err := mustESP(t, pipeSPIOut, 64).OpenPacket(append([]byte(nil), got[ethLen:]...))
		if err != nil || !bytes.Equal(opened.IP, routed(resp)) {
			t.Fatalf("the phone opens %x, %v; want %x", opened.IP, err, routed(resp))
		}
	})
}
