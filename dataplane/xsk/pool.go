package xsk

// Pool is one worker's stack of free frames. Only its worker touches it;
// it reaches the UMEM's shared overflow (under the UMEM mutex) once per
// batch when it runs dry or grows past Config.PoolSize, which is how
// frames drift back to balance when one worker receives frames another
// worker's fill put on a queue, or completions for one worker's
// transmissions are drained by the owner of the queue's rings.
type Pool struct {
	u    *UMEM
	free []uint64
	n    counter // len(free), readable by Accounting
	held counter // frames Get handed out minus frames Put/PutDescs took back
	max  int
}

// NewPool creates an empty pool; it fills itself from the shared overflow
// on first use.
func (u *UMEM) NewPool() *Pool {
	p := &Pool{u: u, max: u.cfg.PoolSize, free: make([]uint64, 0, 2*u.cfg.PoolSize+int(u.cfg.CompletionSize))}
	u.mu.Lock()
	u.pools[p] = struct{}{}
	u.mu.Unlock()
	return p
}

// Len is the number of frames in the pool.
func (p *Pool) Len() int { return len(p.free) }

// ensure tops the pool up from the shared overflow so it holds at least
// want frames if the overflow has them.
func (p *Pool) ensure(want int) {
	if len(p.free) >= want {
		return
	}
	take := want - len(p.free)
	if take < p.max/2 {
		take = p.max / 2
	}
	before := len(p.free)
	p.free = p.u.takeSpare(p.free, take)
	p.n.add(int64(len(p.free) - before))
}

// spill returns frames above the high-water mark to the shared overflow.
func (p *Pool) spill() {
	if len(p.free) <= p.max {
		return
	}
	keep := p.max / 2
	p.u.mu.Lock()
	p.u.putSpareLocked(p.free[keep:])
	p.u.mu.Unlock()
	p.n.add(int64(keep - len(p.free)))
	p.free = p.free[:keep]
}

// Get hands up to len(dst) free frames (their base addresses) to the
// worker, for packets it builds from scratch.
func (p *Pool) Get(dst []uint64) int {
	p.ensure(len(dst))
	n := copy(dst, p.free[len(p.free)-min(len(dst), len(p.free)):])
	p.free = p.free[:len(p.free)-n]
	p.n.add(int64(-n))
	p.held.add(int64(n))
	return n
}

// Put takes back frames the worker is done with. Any address inside a
// frame frees the frame.
func (p *Pool) Put(addrs []uint64) {
	for _, a := range addrs {
		p.free = append(p.free, a&^p.u.frameMask)
	}
	p.n.add(int64(len(addrs)))
	p.held.add(int64(-len(addrs)))
	p.spill()
}

// PutDescs takes back the frames of descriptors the worker drops.
func (p *Pool) PutDescs(descs []Desc) {
	for i := range descs {
		p.free = append(p.free, descs[i].Addr&^p.u.frameMask)
	}
	p.n.add(int64(len(descs)))
	p.held.add(int64(-len(descs)))
	p.spill()
}

// Close returns the pool's frames to the shared overflow. The pool must
// not be used afterwards.
func (p *Pool) Close() {
	p.u.mu.Lock()
	p.u.putSpareLocked(p.free)
	delete(p.u.pools, p)
	p.u.heldRetired += p.held.load()
	p.u.mu.Unlock()
	p.n.store(0)
	p.free = p.free[:0]
}
