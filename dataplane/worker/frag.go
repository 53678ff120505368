package worker

import (
	"encoding/binary"

	"github.com/xesp/xesp/dataplane/xsk"
	cksum "github.com/xesp/xesp/internal/pkt"
)

// Fitting sealed packets into the public MTU.
//
// The encap path checks, before sealing, whether the outer packet would
// exceed the public MTU. A DF-set IPv4 or any IPv6 packet is refused with
// ICMP Fragmentation Needed / Packet Too Big carrying the inner MTU that
// fits (pipeline.icmpToCore); a DF-clear IPv4 packet is split into inner
// fragments that are sealed one by one (prefragment, RFC 4459 3.2
// "pre-fragmentation"), so every outer packet crosses the phone's NAPT
// whole and the phone reassembles after decryption.
//
// fragment4, outer post-fragmentation (RFC 4459 3.1), remains the
// fallback for an outer IPv4 packet that still exceeds the MTU (an inner
// header with options the size estimate did not foresee). Every outer
// IPv4 packet leaves with DF clear and a non-zero IP ID, so a router on a
// smaller-MTU access link (PPPoE: 1492) fragments instead of dropping:
// its "fragmentation needed" would reach the kernel, never the AF_XDP
// path. IDs are partitioned by worker (id ≡ worker mod workers) so two
// workers sending to phones behind the same NAPT never share one, which
// would let the NAPT or phone splice fragments of two packets.

// fragmenter holds what outer fragmentation needs from the worker.
type fragmenter struct {
	mtu     int    // public link MTU (IP bytes)
	idSeq   uint32 // IP IDs handed out so far
	worker  uint16 // this worker's residue class
	stride  uint16 // number of workers
	pool    *xsk.Pool
	mem     *xsk.UMEM
	rxOff   uint64 // where a fresh frame's packet starts
	tag     uint32 // the public side's VLAN tag (pipeline.pubTag): 4 more L2 bytes
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
	ethLen := f.l2() // the public side's L2 header, tag included
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

// l2 is the length of the public side's L2 header.
func (f *fragmenter) l2() int {
	if f.tag != 0 {
		return ethLen + 4
	}
	return ethLen
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

// prefragment splits the cleartext IPv4 packet frame[l3:l3+n] (DF clear)
// into fragments of at most fit bytes and seals each with e (RFC 4459 3.2
// "pre-fragmentation"): every outer packet then fits the public MTU whole,
// so no outer fragment has to cross the phone's NAPT (many drop or
// mangle them) and the phone's IPsec never reassembles. The phone's IP
// stack reassembles the inner fragments after decryption. The first
// fragment stays in d's frame and is returned; the others take frames
// from the pool (all or none) and go to p.toPub.
func (p *pipeline) prefragment(e *Slot, d xsk.Desc, frame []byte, l3, n, fit int) (xsk.Desc, Drop) {
	f := &p.frag
	ip := frame[l3 : l3+n]
	hl := int(ip[0]&0x0f) * 4
	chunk := (fit - hl) &^ 7
	if chunk < 8 {
		e.Counters.Drops.Add(1)
		return d, DropOversized
	}
	k := (n - hl + chunk - 1) / chunk
	if k > maxFragments {
		e.Counters.Drops.Add(1)
		return d, DropOversized
	}
	extra := f.extra[:0]
	for i := 1; i < k; i++ {
		if f.pool == nil || f.pool.Get(f.scratch[:]) == 0 {
			if f.pool != nil {
				f.pool.Put(extra)
			}
			e.Counters.Drops.Add(1)
			return d, DropNoFrame
		}
		extra = append(extra, f.scratch[0])
	}
	fo := binary.BigEndian.Uint16(ip[6:])
	mf := fo & 0x2000 // the packet may itself be a fragment: keep its MF
	fo &= 0x1fff
	at := int(f.rxOff) + ethLen // where a fresh frame's IP packet goes
	for i := 1; i < k; i++ {
		start := hl + i*chunk
		stop := min(start+chunk, n)
		addr := extra[i-1]
		fr := f.mem.Frame(addr)
		// Options are copied into every fragment; RFC 791 wants only the
		// "copied" ones there, but gateways see options in practice never.
		copy(fr[at:], ip[:hl])
		copy(fr[at+hl:], ip[start:stop])
		h := fr[at : at+hl]
		binary.BigEndian.PutUint16(h[2:], uint16(hl+stop-start))
		flags := uint16(0)
		if i < k-1 || mf != 0 {
			flags = 0x2000
		}
		binary.BigEndian.PutUint16(h[6:], flags|(fo+uint16((start-hl)/8)))
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:], cksum.Checksum(h))
		out, why := p.seal(e, xsk.Desc{Addr: addr + f.rxOff, Len: uint32(ethLen + hl + stop - start)}, fr, at, hl+stop-start)
		switch why {
		case 0:
			p.toPub = append(p.toPub, out)
		case held:
		default:
			p.stats.Encap.Drops[why].Add(1)
			f.scratch[0] = addr
			f.pool.Put(f.scratch[:])
		}
	}
	binary.BigEndian.PutUint16(ip[2:], uint16(hl+chunk))
	binary.BigEndian.PutUint16(ip[6:], 0x2000|fo)
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], cksum.Checksum(ip[:hl]))
	p.stats.PreFragmented.Add(1)
	p.stats.PreFragments.Add(uint64(k))
	return p.seal(e, d, frame, l3, hl+chunk)
}
