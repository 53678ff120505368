package worker

import (
	"encoding/binary"
	"net/netip"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
)

// mapNeighbors looks destinations up the way neigh.Resolver does (an
// atomically published map keyed by the 16-byte address), without its
// netlink sockets.
type mapNeighbors struct {
	m atomic.Pointer[map[[16]byte][6]byte]
}

func (n *mapNeighbors) Lookup(dst netip.Addr) ([6]byte, bool) {
	mac, ok := (*n.m.Load())[dst.As16()]
	return mac, ok
}
func (n *mapNeighbors) Request(netip.Addr) {}

// BenchmarkDecapBatch is the pipeline's per-packet decap work (metadata,
// SA lookup, outer parse, AES-128-GCM open, policy, binding, counters,
// next hop, Ethernet rewrite) on 64-frame batches of 200-byte inner
// packets built in a UMEM, without sockets: the worker's own CPU cost,
// which the live harness cannot separate from the kernel's. Each op
// restores the batch's sealed bytes first (copy, ~1/3 of the cost of a
// frame; the same in every version); the SA runs without a replay window
// so the same sequence numbers open again.
func BenchmarkDecapBatch(b *testing.B) {
	const batch, inner = 64, 200
	u, err := xsk.New(xsk.Config{FrameCount: 2 * batch, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64})
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	key := make([]byte, 20)
	phone, err := esp.NewTransform(esp.Config{SPI: 0x1001, Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
	if err != nil {
		b.Fatal(err)
	}
	gw, err := esp.NewTransform(esp.Config{SPI: 0x1001, Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
	if err != nil {
		b.Fatal(err)
	}
	var st Stats
	nb := &mapNeighbors{}
	nm := map[[16]byte][6]byte{netip.MustParseAddr("10.0.0.1").As16(): {2, 0, 0, 0, 0, 1}}
	for i := range 1000 { // a resolver serving a few hosts besides the core
		nm[netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}).As16()] = [6]byte{2, 0, 0, 0, 1, byte(i)}
	}
	nm[netip.MustParseAddr("10.0.0.1").As16()] = [6]byte{2, 0, 0, 0, 0, 1}
	nb.m.Store(&nm)
	p := pipeline{mem: u, nb: nb, stats: &st,
		bindEvents: make(chan BindingChange, 1), seqRequests: make(chan SeqRequest)}
	src := netip.MustParseAddr("192.0.2.10")
	e := withSel(&Slot{SA: gw, Dir: Inbound,
		Binding: NewBinding(Peer{Addr: netip.AddrPortFrom(src, 4500), MAC: [6]byte{2, 0, 0, 0, 0, 2}, HasMAC: true})},
		netip.MustParsePrefix("100.64.0.1/32"), netip.Addr{})
	p.table = []*Slot{e}

	rxOff := uint64(u.RxOffset())
	rx := make([]xsk.Desc, batch)
	saved := make([][]byte, batch)
	frameSize := uint64(4096)
	for i := range rx {
		base := uint64(i) * frameSize
		frame := u.Frame(base + rxOff)[rxOff:]
		// Ethernet, then room for outer IPv4 (20) and the ESP header/IV
		// (16) in front of the inner packet.
		l3 := ethLen
		pay := l3 + 20 + phone.Headroom()
		ip := frame[pay : pay+inner]
		ip[0], ip[8], ip[9] = 0x45, 64, 17 // TTL 64: a router forwards it
		binary.BigEndian.PutUint16(ip[2:], inner)
		copy(ip[12:16], []byte{100, 64, 0, 1})
		copy(ip[16:20], []byte{10, 0, 0, 1})
		binary.BigEndian.PutUint16(ip[20:], 5060)
		binary.BigEndian.PutUint16(ip[22:], 5060)
		start, end, err := phone.Seal(frame, pay, inner, esp.NextHeaderIPv4, 0)
		if err != nil {
			b.Fatal(err)
		}
		o := esp.Outer{Src: src, Dst: netip.MustParseAddr("192.0.2.1")}
		s, err := esp.PutOuter(frame, start, end, &o)
		if err != nil || s != l3 {
			b.Fatalf("outer at %d (want %d): %v", s, l3, err)
		}
		copy(frame[6:12], []byte{2, 0, 0, 0, 0, 2})
		m := (*bpf.Meta)(unsafe.Pointer(&u.Meta(base+rxOff, bpf.MetaSize)[0]))
		*m = bpf.Meta{SaIndex: 0, L3Off: uint16(l3), Kind: uint8(bpf.MetaESP), Magic: bpf.MetaMagic}
		rx[i] = xsk.Desc{Addr: base + rxOff, Len: uint32(end)}
		completeMeta(u, rx[i])
		saved[i] = append([]byte(nil), frame[:end]...)
	}
	tx := make([]xsk.Desc, 0, batch)
	drop := make([]uint64, 0, batch)
	b.SetBytes(inner)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N / batch {
		for i := range rx {
			copy(u.Frame(rx[i].Addr)[rxOff:], saved[i])
		}
		tx, drop = p.decap(rx, tx[:0], drop[:0])
		if len(tx) != batch {
			b.Fatalf("forwarded %d of %d (drops %d)", len(tx), batch, len(drop))
		}
	}
}

// BenchmarkEncapBatch is BenchmarkDecapBatch's other direction: metadata,
// SA lookup, policy, AES-128-GCM seal, outer IPv4/UDP header, counters and
// Ethernet rewrite toward the binding's MAC, on 64-frame batches of
// 200-byte cleartext packets (restored each op: seal works in place).
func BenchmarkEncapBatch(b *testing.B) {
	const batch, inner = 64, 200
	u, err := xsk.New(xsk.Config{FrameCount: 2 * batch, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64})
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	gw, err := esp.NewTransform(esp.Config{SPI: 0x2001, Proposal: esp.AES128GCM16, EncKey: make([]byte, 20), Mode: esp.ModeTunnel})
	if err != nil {
		b.Fatal(err)
	}
	var st Stats
	p := pipeline{mem: u, nb: &mapNeighbors{}, stats: &st,
		bindEvents: make(chan BindingChange, 1), seqRequests: make(chan SeqRequest)}
	p.frag = fragmenter{mtu: 1500, mem: u, rxOff: uint64(u.RxOffset()), stride: 1}
	phone := netip.MustParseAddr("192.0.2.10")
	p.table = []*Slot{withSel(&Slot{SA: gw, Dir: Outbound, scope: &Scope{Local: netip.MustParseAddr("192.0.2.1")}, LocalPort: 4500,
		Binding: NewBinding(Peer{Addr: netip.AddrPortFrom(phone, 4500), MAC: [6]byte{2, 0, 0, 0, 0, 2}, HasMAC: true})},
		netip.MustParsePrefix("100.64.0.1/32"), netip.Addr{})}

	rxOff := uint64(u.RxOffset())
	rx := make([]xsk.Desc, batch)
	saved := make([][]byte, batch)
	for i := range rx {
		base := uint64(i) * 4096
		frame := u.Frame(base + rxOff)[rxOff:]
		ip := frame[ethLen : ethLen+inner]
		ip[0], ip[8], ip[9] = 0x45, 64, 17 // TTL 64: a router forwards it
		binary.BigEndian.PutUint16(ip[2:], inner)
		copy(ip[12:16], []byte{10, 0, 0, 1})
		copy(ip[16:20], []byte{100, 64, 0, 1})
		binary.BigEndian.PutUint16(ip[20:], 5060)
		binary.BigEndian.PutUint16(ip[22:], 5060)
		binary.BigEndian.PutUint16(frame[12:], 0x0800)
		m := (*bpf.Meta)(unsafe.Pointer(&u.Meta(base+rxOff, bpf.MetaSize)[0]))
		*m = bpf.Meta{SaIndex: 0, L3Off: ethLen, Kind: uint8(bpf.MetaClear), Magic: bpf.MetaMagic}
		rx[i] = xsk.Desc{Addr: base + rxOff, Len: ethLen + inner}
		completeMeta(u, rx[i])
		// Sealing writes the outer headers over the metadata in front.
		saved[i] = append([]byte(nil), u.Frame(base)[rxOff-bpf.MetaSize:rxOff+ethLen+inner]...)
	}
	tx := make([]xsk.Desc, 0, batch)
	drop := make([]uint64, 0, batch)
	b.SetBytes(inner)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N / batch {
		for i := range rx {
			copy(u.Frame(rx[i].Addr)[rxOff-bpf.MetaSize:], saved[i])
		}
		tx, drop = p.encap(rx, tx[:0], drop[:0])
		if len(tx) != batch {
			b.Fatalf("sealed %d of %d (drops %d)", len(tx), batch, len(drop))
		}
	}
}

// BenchmarkRouterChecks is the per-packet cost of what the gateway does
// as a router, apart from the ESP work, on the rig's SA pair: decap side
// (selectors, ECN, TTL decrement with checksum fix, last-seen stamp) and
// encap side (selectors, TTL, MTU bound, TTL decrement, outer TOS). The
// full-path figures are BenchmarkDecapBatch/BenchmarkEncapBatch; this one
// isolates the checks from the AES-GCM noise of a shared machine.
func BenchmarkRouterChecks(b *testing.B) {
	r := newRig(b)
	in := udp4("100.64.0.1:5060", "10.0.0.1:5060", string(make([]byte, 172)))
	out := udp4("10.0.0.1:5060", "100.64.0.1:5060", string(make([]byte, 172)))
	b.Run("decap", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			in[8] = 64
			if !r.in.inSelectors(in) {
				b.Fatal("selector")
			}
			if tos := tosOf(in); tos != 0 {
				nt, _ := decapECN(2, tos)
				setTOS(in, nt)
			}
			if !decTTL(in) {
				b.Fatal("ttl")
			}
			r.in.Counters.LastSeen.Store(r.p.nowNS())
		}
	})
	b.Run("encap", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			out[8] = 64
			if !r.out.outSelectors(out) || !ttlLeft(out) {
				b.Fatal("selector/ttl")
			}
			if 28+len(out)+r.out.overheadBound() > 1500 {
				b.Fatal("mtu")
			}
			decTTL(out)
			_ = r.p.outerTOS(r.out, tosOf(out))
		}
	})
}
