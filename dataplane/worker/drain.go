package worker

// pendingDrain is a removal waiting for the frames XDP steered to its
// slot before the slot was unpublished. The kernel flushes XSK redirects
// at the end of the NAPI poll that made them, so once the sender has
// waited out the XDP runs in flight (an RCU grace period) every such frame
// is in an RX ring, below the producer index read here; the slow path's
// queue is FIFO, so its frames are below the count taken plus its length.
type pendingDrain struct {
	index uint32
	rx    []uint32 // RX producer index of each of w.socks when the removal was applied
	inj   uint64   // slow-path packets taken by then, plus those queued
	visit func(table []*Slot)
	done  chan struct{}
}

// startDrain records c, a Drain removal of an installed slot.
func (w *Worker) startDrain(c Command) {
	d := pendingDrain{index: c.Index, inj: w.injTaken + uint64(len(w.inject)), visit: c.Visit, done: c.Done,
		rx: make([]uint32, len(w.socks))}
	for i, s := range w.socks {
		if s != nil {
			d.rx[i], _ = s.RxPositions()
		}
	}
	w.drains = append(w.drains, d)
}

// settle completes the removals whose frames have all been taken: they
// were processed in earlier batches of this loop. Called between batches.
func (w *Worker) settle() {
	keep := w.drains[:0]
	for _, d := range w.drains {
		if !w.taken(d) {
			keep = append(keep, d)
			continue
		}
		w.finish(d)
	}
	clear(w.drains[len(keep):])
	w.drains = keep
}

// taken reports whether every frame d waits for has been received.
func (w *Worker) taken(d pendingDrain) bool {
	if w.injTaken < d.inj {
		return false
	}
	for i, s := range w.socks {
		if s == nil {
			continue
		}
		if _, cons := s.RxPositions(); int32(cons-d.rx[i]) < 0 {
			return false
		}
	}
	return true
}

// finishDrain completes a pending removal of index at once: a later
// command for the same slot overrides the wait (the manager never sends
// one before the removal's Done, so this only keeps the table consistent).
func (w *Worker) finishDrain(index uint32) {
	for i, d := range w.drains {
		if d.index == index {
			w.drains = append(w.drains[:i], w.drains[i+1:]...)
			w.finish(d)
			return
		}
	}
}

// finishAll completes every pending removal: the worker is stopping and
// will process no more frames.
func (w *Worker) finishAll() {
	for _, d := range w.drains {
		w.finish(d)
	}
	clear(w.drains)
	w.drains = w.drains[:0]
}

func (w *Worker) finish(d pendingDrain) {
	w.pipe.track(w.pipe.table[d.index], nil)
	w.pipe.table[d.index] = nil
	w.stats.Drained.Add(1)
	if d.visit != nil {
		d.visit(w.pipe.table)
	}
	if d.done != nil {
		close(d.done)
	}
}
