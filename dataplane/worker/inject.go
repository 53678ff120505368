package worker

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
)

// SlowPacket is an ESP packet that reached the gateway outside XDP's fast
// path: typically an IP-fragmented ESP-in-UDP datagram the kernel
// reassembled and delivered to the slow-path socket. Only the owning
// worker may open it (it alone writes the SA's replay window), so the slow
// path hands it over with Inject.
type SlowPacket struct {
	ESP   []byte         // SPI through ICV; the worker copies it
	Src   netip.AddrPort // outer source; port 0 for plain ESP
	Dst   netip.Addr     // the gateway's address it was sent to
	Index uint32         // the SA's slot in the worker's table
}

const injectQueue = 256

// Inject queues packets for the worker without blocking and returns how
// many it took; the caller counts the rest as dropped.
func (w *Worker) Inject(pkts []SlowPacket) int {
	for i, p := range pkts {
		select {
		case w.inject <- p:
		default:
			w.poke()
			return i
		}
	}
	w.poke()
	return len(pkts)
}

// injected turns queued slow-path packets into frames laid out as XDP
// would have left them (metadata, Ethernet, IP protocol 50, ESP) so the
// normal decap path opens them. Their Ethernet source is zero, which
// learn takes as "no MAC learnt".
func (w *Worker) injected(pool *xsk.Pool, rx []xsk.Desc, addrs []uint64) int {
	n := 0
	for n < len(rx) {
		var p SlowPacket
		select {
		case p = <-w.inject:
			w.injTaken++
		default:
			return n
		}
		if pool.Get(addrs[:1]) == 0 {
			w.stats.Decap.Drops[DropNoFrame].Add(1)
			continue
		}
		u := w.cfg.UMEM
		base := addrs[0]
		off := int(u.RxOffset())
		frame := u.Frame(base)
		o := esp.Outer{Src: p.Src.Addr(), Dst: p.Dst}
		l3 := ethLen
		total := ethLen + esp.OuterLen(&o) + len(p.ESP)
		if off+total > len(frame) || off < bpf.MetaSize {
			pool.Put(addrs[:1])
			w.stats.Decap.Drops[esp.ReasonNoRoom].Add(1)
			continue
		}
		espStart := off + total - len(p.ESP)
		copy(frame[espStart:], p.ESP)
		if _, err := esp.PutOuter(frame, espStart, off+total, &o); err != nil {
			pool.Put(addrs[:1])
			w.stats.Decap.Drops[esp.ReasonOf(err)].Add(1)
			continue
		}
		eth := frame[off : off+ethLen]
		clear(eth[:12])
		binary.BigEndian.PutUint16(eth[12:], etherType(frame[off+l3:]))
		// The metadata XDP would have written for this frame: the
		// decap path reads the outer header through it alone.
		hl := esp.OuterLen(&o)
		m := (*bpf.Meta)(unsafe.Pointer(&frame[off-bpf.MetaSize]))
		*m = bpf.Meta{Src: p.Src.Addr().As16(), SaIndex: p.Index, L3Off: uint16(l3), L4Off: uint16(l3 + hl),
			L3Len: uint16(hl + len(p.ESP)), Worker: uint8(w.pipe.id), Family: 6, Kind: uint8(bpf.MetaESP), Magic: bpf.MetaMagic}
		if o.Src.Is4() {
			m.Family = 4
		}
		if p.Src.Port() != 0 {
			m.Kind = uint8(bpf.MetaESPUDP)
			binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&m.Sport))[:], p.Src.Port())
		}
		rx[n] = xsk.Desc{Addr: base + uint64(off), Len: uint32(total)}
		n++
	}
	return n
}
