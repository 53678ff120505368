package worker

import (
	"encoding/binary"

	"github.com/xesp/xesp/dataplane/xsk"
	cksum "github.com/xesp/xesp/internal/pkt"
)

// Outer IPv4 fragmentation for sealed packets larger than the public MTU.
//
// SIP over UDP fills the core's MTU, and ESP in UDP adds about 60 bytes, so
// a large 200 OK would not fit the public link. Like Linux's xfrm, the
// gateway then fragments the outer packet after encryption (RFC 4459 3.1
// "post-fragmentation"): the phone's stack reassembles before its IPsec
// sees the packet. Every outer IPv4 packet leaves with DF clear and a
// non-zero IP ID, so a router on a smaller-MTU access link (PPPoE: 1492)
// fragments instead of dropping: its "fragmentation needed" would reach
// the kernel, never the AF_XDP path. IDs are partitioned by worker
// (id ≡ worker mod workers) so two workers sending to phones behind the
// same NAPT never share one, which would let the NAPT or phone splice
// fragments of two packets.
//
// IPv6 outer packets are not fragmented (that would take a Fragment
// extension header and most NAPT paths drop IPv6 fragments): they are
// dropped as oversized.

// fragmenter holds what outer fragmentation needs from the worker.
type fragmenter struct {
	mtu     int    // public link MTU (IP bytes)
	idSeq   uint32 // IP IDs handed out so far
	worker  uint16 // this worker's residue class
	stride  uint16 // number of workers
	pool    *xsk.Pool
	mem     *xsk.UMEM
	rxOff   uint64 // where a fresh frame's packet starts
	scratch [1]uint64
	extra   [maxFragments]uint64
}

// maxFragments bounds one packet's fragments: a 9000-byte frame on a
// 1280-byte MTU needs 8.
const maxFragments = 16

// fragment4 splits the IPv4 packet of d (Ethernet + IPv4 + payload) into
// MTU-sized fragments: the first reuses d's frame, the rest take frames
// from the pool. It appends them to tx and reports false (tx unchanged,
// d untouched) when the packet cannot be split, e.g. no free frame.
func (f *fragmenter) fragment4(d xsk.Desc, tx []xsk.Desc) ([]xsk.Desc, bool) {
	frame := f.mem.Frame(d.Addr)
	off := int(d.Addr - f.mem.FrameBase(d.Addr))
	pkt := frame[off : off+int(d.Len)]
	ip := pkt[ethLen:]
	hl := int(ip[0]&0x0f) * 4
	if ip[0]>>4 != 4 || hl < 20 || len(ip) <= f.mtu || f.mtu < hl+8 {
		return tx, false
	}
	chunk := (f.mtu - hl) &^ 7
	payload := len(ip) - hl
	n := (payload + chunk - 1) / chunk
	if n > maxFragments {
		return tx, false
	}
	// Take every extra frame first, so a shortage drops the packet whole
	// instead of sending a fragment train with a hole.
	extra := f.extra[:0]
	for i := 1; i < n; i++ {
		if f.pool.Get(f.scratch[:]) == 0 {
			f.pool.Put(extra)
			return tx, false
		}
		extra = append(extra, f.scratch[0])
	}
	id := binary.BigEndian.Uint16(ip[4:]) // set by PutOuter from nextIPID
	for i := n - 1; i >= 0; i-- {         // last first: the first fragment's bytes are rewritten in place
		start := hl + i*chunk
		end := min(start+chunk, len(ip))
		var fr []byte
		var addr uint64
		if i == 0 {
			fr, addr = pkt[:ethLen+hl+end-start], d.Addr
		} else {
			base := extra[i-1]
			whole := f.mem.Frame(base)
			o := int(f.rxOff)
			fr = whole[o : o+ethLen+hl+end-start]
			addr = base + f.rxOff
			copy(fr[:ethLen+hl], pkt[:ethLen+hl])
			copy(fr[ethLen+hl:], ip[start:end])
		}
		h := fr[ethLen : ethLen+hl]
		binary.BigEndian.PutUint16(h[2:], uint16(hl+end-start))
		binary.BigEndian.PutUint16(h[4:], id)
		fo := uint16((start - hl) / 8)
		if i < n-1 {
			fo |= 0x2000 // MF
		}
		binary.BigEndian.PutUint16(h[6:], fo)
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:], cksum.Checksum(h))
		tx = append(tx, xsk.Desc{Addr: addr, Len: uint32(len(fr))})
	}
	// Fragments were appended last-first; the wire order does not matter
	// to reassembly, but first-first is kinder to middleboxes.
	k := len(tx) - n
	for i, j := k, len(tx)-1; i < j; i, j = i+1, j-1 {
		tx[i], tx[j] = tx[j], tx[i]
	}
	return tx, true
}

// nextIPID is the IP ID for the next outer IPv4 packet: never zero (zero
// asks PutOuter for an atomic DF datagram), and always ≡ the worker's
// number modulo the number of workers. The cycle is the largest multiple
// of the worker count that fits 16 bits, so the partition survives the
// wrap (65536 is not a multiple of 3).
func (f *fragmenter) nextIPID() uint16 {
	stride := uint32(max(f.stride, 1))
	per := 65536 / stride
	for {
		id := uint16((f.idSeq%per)*stride + uint32(f.worker))
		f.idSeq++
		if id != 0 {
			return id
		}
	}
}
