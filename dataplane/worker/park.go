package worker

import (
	"net/netip"
	"time"

	"github.com/xesp/xesp/dataplane/xsk"
)

// A frame that is ready to send but for its destination MAC waits here
// while the resolver asks the kernel (ARP/ND), as the kernel itself queues
// a few packets per unresolved neighbour: dropping the first packet of
// every new flow would cost a phone a SIP retransmission (T1, 500 ms).
// The queue is bounded and short-lived so an unreachable next hop cannot
// hold frames hostage.
const (
	parkMax     = 256
	parkTimeout = time.Second
	parkRetry   = time.Millisecond
)

type side uint8

const (
	toPrivate side = iota // decapsulated, for the private TX ring
	toPublic              // encapsulated, for the public TX ring
)

type parkedFrame struct {
	d     xsk.Desc
	dst   netip.Addr
	side  side
	since int64 // unix ns
}

// held is what park returns: the frame is neither sent nor dropped yet.
const held = Drop(255)

func (p *pipeline) park(d xsk.Desc, dst netip.Addr, s side) (xsk.Desc, Drop) {
	p.nb.Request(dst)
	if len(p.parked) >= parkMax {
		return d, DropNoNeighbor
	}
	if p.now == 0 {
		p.now = time.Now().UnixNano()
	}
	p.parked = append(p.parked, parkedFrame{d: d, dst: dst, side: s, since: p.now})
	return d, held
}

// retryParked sends parked frames whose MAC is now known and drops those
// that waited too long. It returns frames for each TX ring and drops.
func (p *pipeline) retryParked(now int64, pub, priv []xsk.Desc, drop []uint64) ([]xsk.Desc, []xsk.Desc, []uint64) {
	keep := p.parked[:0]
	for _, f := range p.parked {
		if mac, ok := p.nb.Lookup(f.dst); ok {
			frame := p.mem.Frame(f.d.Addr)
			off := f.d.Addr - p.mem.FrameBase(f.d.Addr)
			copy(frame[off:off+6], mac[:])
			if f.side == toPublic {
				pub, drop = p.emitPublic(f.d, pub, drop)
			} else {
				priv = append(priv, f.d)
			}
			continue
		}
		if now-f.since > int64(parkTimeout) {
			st := &p.stats.Decap
			if f.side == toPublic {
				st = &p.stats.Encap
			}
			st.Drops[DropNoNeighbor].Add(1)
			drop = append(drop, f.d.Addr)
			continue
		}
		keep = append(keep, f)
	}
	p.parked = keep
	return pub, priv, drop
}
