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
// ciphers only for those that talk. The worker files each entry whose
// cipher it built on a timing wheel at the tick its idle limit would
// run out, and looks at an entry only when that tick comes: an idle one
// is released, a busy one filed again at its own last use plus the
// limit. So each live cipher is looked at about once per CipherIdle (a
// million live ciphers and the default 30 s: ~33k looks a second, where
// a walk of the whole list each second was 1M), packets pay nothing but
// a store of the clock, and the looks due at one tick are spread over
// loop turns in bounded chunks, never stalling a batch.

// DefaultCipherIdle is Config.CipherIdle's default: long against a phone's
// SIP exchanges (a call's media keeps its SA busy; a REGISTER refresh
// comes every few minutes), so a talking phone pays the rebuild (0.3-2 µs)
// at most once per conversation.
const DefaultCipherIdle = 30 * time.Second

// idleTick is the idle clock's period: an entry's cipher goes between
// CipherIdle and CipherIdle+idleTick (plus the chunks ahead of it) after
// its last packet.
const idleTick = time.Second

// sweepChunk bounds the entries one loop turn looks at (~10-100 µs).
const sweepChunk = 1024

// idler is a pipeline's cipher wheel and idle clock.
type idler struct {
	// wheel[t % len(wheel)] holds the entries to look at when the clock
	// reaches t (len: limit+1, so every t in (clock, clock+limit] has
	// its own bucket); due holds the buckets whose tick came, from
	// position pos on.
	wheel    [][]*Slot
	due      []*Slot
	pos      int
	listed   int    // entries on the wheel or due
	clock    uint32 // idle ticks since the worker started; Slot.used is a reading of it
	limit    uint32 // ticks without a packet before a release (>= 1)
	nextTick int64  // monotonic ns, tick's now
}

// file puts e in the bucket of tick at.
func (d *idler) file(e *Slot, at uint32) {
	if len(d.wheel) == 0 {
		d.wheel = make([][]*Slot, d.limit+1)
	}
	b := at % uint32(len(d.wheel))
	d.wheel[b] = append(d.wheel[b], e)
}

// touch marks e used by a packet now and builds its cipher if it is cold.
// Called before every Open/Seal of the worker.
func (p *pipeline) touch(e *Slot) {
	e.used = p.idle.clock
	if e.SA.Cold() {
		p.warm(e)
	}
}

// warm builds e's cipher and files e. A failure (wiped keys: an entry
// used after its removal, which the table never allows) is left to Open
// or Seal, which refuse the packet.
func (p *pipeline) warm(e *Slot) {
	if e.SA.Warm() != nil {
		return
	}
	p.stats.CipherBuilds.Add(1)
	if e.marks&markListed == 0 {
		e.marks |= markListed
		p.idle.listed++
		p.idle.file(e, p.idle.clock+p.idle.limit)
	}
}

// tick advances the idle clock when a tick passed, takes that tick's
// bucket as due, and looks at one chunk of what is due. now is monotonic
// ns (the worker's run time).
func (p *pipeline) tick(now int64) {
	d := &p.idle
	if d.limit == 0 {
		d.limit = idleTicks(0)
	}
	if now >= d.nextTick {
		d.nextTick = now + int64(idleTick)
		d.clock++
		if len(d.wheel) > 0 {
			b := d.clock % uint32(len(d.wheel))
			if len(d.wheel[b]) > 0 {
				d.due = append(d.due, d.wheel[b]...)
				clear(d.wheel[b])
				d.wheel[b] = d.wheel[b][:0]
			}
		}
	}
	if d.pos < len(d.due) {
		p.sweep()
	}
}

// sweep looks at up to sweepChunk due entries: it releases the ciphers of
// those idle for limit ticks, files the busy ones again at their last use
// plus the limit, and drops entries that left the table (their cipher
// went with their keys, see track) or whose cipher is gone.
func (p *pipeline) sweep() {
	d := &p.idle
	for n := 0; n < sweepChunk && d.pos < len(d.due); n++ {
		e := d.due[d.pos]
		d.due[d.pos] = nil
		d.pos++
		inTable := int(e.index) < len(p.table) && p.table[e.index] == e
		switch {
		case inTable && !e.SA.Cold() && d.clock-e.used < d.limit:
			d.file(e, e.used+d.limit) // after the clock: used+limit > clock
			continue
		case inTable && e.SA.Release():
			p.stats.CipherReleases.Add(1)
		}
		e.marks &^= markListed
		d.listed--
	}
	if d.pos == len(d.due) {
		d.due, d.pos = d.due[:0], 0
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
