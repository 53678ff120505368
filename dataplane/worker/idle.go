package worker

import (
	"time"
	"unsafe"

	"github.com/xesp/xesp/dataplane/xsk"
)

// Idle ciphers. A lazy SA's AEAD instance (esp.Transform: ~0.8 KB for
// AES-GCM, more than all the rest of an SA) is built by its worker on the
// SA's first packet and dropped again once the SA carried no packet for
// Config.CipherIdle, so a gateway of a million mostly idle phones holds
// ciphers only for those that talk. The worker keeps the entries whose
// cipher it built on a list and walks that list once per idle-clock tick
// (a second), a bounded chunk per loop turn: the work is proportional to
// the live ciphers, never to the SAs installed, and never stalls a batch.

// DefaultCipherIdle is Config.CipherIdle's default: long against a phone's
// SIP exchanges (a call's media keeps its SA busy; a REGISTER refresh
// comes every few minutes), so a talking phone pays the rebuild (0.3-2 µs)
// at most once per conversation.
const DefaultCipherIdle = 30 * time.Second

// idleTick is the idle clock's period: an entry's cipher goes between
// CipherIdle and CipherIdle+idleTick (plus one pass) after its last packet.
const idleTick = time.Second

// sweepChunk bounds the list entries one loop turn looks at (~10-100 µs).
const sweepChunk = 1024

// idler is a pipeline's cipher list and idle clock.
type idler struct {
	ciphers  []*Slot // entries whose cipher this worker built, listed set
	clock    uint32  // idle ticks since the worker started; Slot.used is a reading of it
	limit    uint32  // ticks without a packet before a release (>= 1)
	pos      int     // next list position of the pass in progress
	sweeping bool
	nextTick int64 // monotonic ns, tick's now
}

// touch marks e used by a packet now and builds its cipher if it is cold.
// Called before every Open/Seal of the worker.
func (p *pipeline) touch(e *Slot) {
	e.used = p.idle.clock
	if e.SA.Cold() {
		p.warm(e)
	}
}

// warm builds e's cipher and lists e. A failure (wiped keys: an entry
// used after its removal, which the table never allows) is left to Open
// or Seal, which refuse the packet.
func (p *pipeline) warm(e *Slot) {
	if e.SA.Warm() != nil {
		return
	}
	p.stats.CipherBuilds.Add(1)
	if e.marks&markListed == 0 {
		e.marks |= markListed
		p.idle.ciphers = append(p.idle.ciphers, e)
	}
}

// tick advances the idle clock when a tick passed and runs one chunk of
// the sweep in progress. now is monotonic ns (the worker's run time).
func (p *pipeline) tick(now int64) {
	d := &p.idle
	if d.limit == 0 {
		d.limit = idleTicks(0)
	}
	if now >= d.nextTick {
		d.nextTick = now + int64(idleTick)
		d.clock++
		d.pos, d.sweeping = 0, len(d.ciphers) > 0
	}
	if d.sweeping {
		p.sweep()
	}
}

// sweep looks at up to sweepChunk listed entries: it releases the ciphers
// of those idle for limit ticks and delists them, and delists entries that
// left the table (their cipher went with their keys, see track) or whose
// cipher is gone.
func (p *pipeline) sweep() {
	d := &p.idle
	for n := 0; n < sweepChunk && d.pos < len(d.ciphers); n++ {
		e := d.ciphers[d.pos]
		inTable := int(e.index) < len(p.table) && p.table[e.index] == e
		switch {
		case inTable && !e.SA.Cold() && d.clock-e.used < d.limit:
			d.pos++
			continue
		case inTable && e.SA.Release():
			p.stats.CipherReleases.Add(1)
		}
		e.marks &^= markListed
		last := len(d.ciphers) - 1
		d.ciphers[d.pos] = d.ciphers[last]
		d.ciphers[last] = nil
		d.ciphers = d.ciphers[:last]
	}
	if d.pos >= len(d.ciphers) {
		d.sweeping = false
	}
}

// idleTicks converts Config.CipherIdle to idle ticks.
func idleTicks(idle time.Duration) uint32 {
	if idle <= 0 {
		idle = DefaultCipherIdle
	}
	return uint32(max(1, (idle+idleTick-1)/idleTick))
}

// touchBatch reads the per-SA state of every frame of a batch before the
// first is processed (esp.Transform.Touch): with a million SAs their
// state is out of cache, and these independent loads overlap their
// misses, where the packets' own work would take them one at a time.
// Runs of frames for one SA touch it once.
func (p *pipeline) touchBatch(rx []xsk.Desc) {
	var v uintptr
	last := ^uint32(0)
	for _, d := range rx {
		m := p.meta(d.Addr)
		if m == nil || m.SaIndex == last || int(m.SaIndex) >= len(p.table) {
			continue
		}
		last = m.SaIndex
		if e := p.table[last]; e != nil && e.SA != nil {
			for off := uintptr(0); off < unsafe.Sizeof(*e); off += 64 {
				v += uintptr(*(*byte)(unsafe.Add(unsafe.Pointer(e), off)))
			}
			v += e.SA.Touch()
			if e.Binding != nil {
				v += uintptr(e.Binding.Load().Addr.Port())
			}
		}
	}
	p.touched = v
}
