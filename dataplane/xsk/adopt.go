package xsk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Handover is what a successor process needs, besides the file
// descriptors, to continue a UMEM and its bound sockets without unbinding
// them (hitless upgrade, docs/operations.md "Upgrades and restarts").
// The ring indexes need no transfer: they live in the rings, which the
// successor maps again from the passed socket fds.
type Handover struct {
	Config Config
	// Free are the frames no ring and no kernel pool holds: the shared
	// overflow once every worker pool was closed.
	Free []uint64
	// Lost counts frames the exporter could not account for (still held
	// by a component, or lost with an earlier torn-down queue).
	Lost    int64
	Queues  []QueueState
	Sockets []SocketState // in the order of the socket fds passed along
}

// QueueState is one (device, queue)'s bookkeeping of closed sockets.
type QueueState struct {
	Ifindex, Queue       int
	RxRetired, TxRetired uint32
}

// SocketState is one bound socket's properties the kernel does not
// report back on a passed fd.
type SocketState struct {
	Ifindex, Queue int
	Mode           Mode
	Wakeup         bool
	BudgetOK       bool
	// Owner marks the socket that feeds its (device, queue)'s fill ring
	// and drains its completion ring. An exporter that predates the
	// field marks none; then the first socket listed on a queue owns it,
	// which is how that exporter listed them.
	Owner bool
}

// Export describes the UMEM and socks for a successor and returns the
// descriptors to pass with it: the memfd first, then socks' fds in order.
// Every worker must have stopped and closed its pool (Run returned), so
// every frame is either on a ring, in the kernel, or in the overflow.
// Export changes nothing: until Abandon the UMEM keeps working, so a
// failed hand-over can still be torn down normally.
func (u *UMEM) Export(socks []*Socket) (Handover, []int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return Handover{}, nil, errors.New("export umem: closed")
	}
	if len(u.pools) > 0 {
		return Handover{}, nil, fmt.Errorf("export umem: %d worker pools still open (stop the workers first)", len(u.pools))
	}
	if len(socks) != len(u.sockets) {
		return Handover{}, nil, fmt.Errorf("export umem: %d of its %d sockets named", len(socks), len(u.sockets))
	}
	h := Handover{Config: u.cfg, Free: append([]uint64(nil), u.spare...), Lost: u.lost.Load() + u.heldLocked()}
	fds := []int{u.memfd}
	for _, q := range u.queues {
		h.Queues = append(h.Queues, QueueState{Ifindex: q.key.ifindex, Queue: q.key.queue, RxRetired: q.rxRetired, TxRetired: q.txRetired})
	}
	for _, s := range socks {
		if s.u != u || s.closed.Load() {
			return Handover{}, nil, fmt.Errorf("export umem: socket fd %d is not an open socket of this umem", s.fd)
		}
		h.Sockets = append(h.Sockets, SocketState{Ifindex: s.q.key.ifindex, Queue: s.q.key.queue, Mode: s.mode, Wakeup: s.wakeup, BudgetOK: s.budgetOK,
			Owner: s.owns.Load()})
		fds = append(fds, s.fd)
	}
	return h, fds, nil
}

// Abandon is the exporter's end after a successful hand-over: it unmaps
// the area and the rings and closes its own descriptors, without reading
// or moving any ring index, draining anything or unbinding: the
// successor's duplicates keep the sockets bound and the memory alive.
// Close and Socket.Close are no-ops afterwards.
func (u *UMEM) Abandon() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return
	}
	for _, s := range u.sockets {
		s.closed.Store(true)
		s.rx.unmap()
		s.tx.unmap()
		unix.Close(s.fd)
	}
	for _, q := range u.queues {
		q.fill.unmap()
		q.comp.unmap()
	}
	u.sockets, u.queues = nil, map[queueKey]*queue{}
	unix.Munmap(u.area)
	u.area = nil
	if u.memfd >= 0 {
		unix.Close(u.memfd)
		u.memfd = -1
	}
	u.closed = true
}

// Adopt continues an exported UMEM in this process: memfd is its area,
// sockFDs its bound sockets in the order of h.Sockets (both received
// with SCM_RIGHTS; Adopt owns them from here, also on error). Each
// socket's RX and TX rings, and each (device, queue)'s fill and
// completion rings, are mapped again from the bound sockets (the kernel
// allows mapping a bound socket's rings); nothing is unbound, so XDP
// keeps redirecting into the same rings throughout.
func Adopt(h Handover, memfd int, sockFDs []int) (_ *UMEM, _ []*Socket, err error) {
	closeAll := func() {
		unix.Close(memfd)
		for _, fd := range sockFDs {
			unix.Close(fd)
		}
	}
	if len(sockFDs) != len(h.Sockets) {
		closeAll()
		return nil, nil, fmt.Errorf("adopt umem: %d socket fds for %d sockets", len(sockFDs), len(h.Sockets))
	}
	cfg := h.Config
	if err := cfg.setDefaults(); err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("adopt umem config: %w", err)
	}
	area, err := mapAreaFD(memfd, int(cfg.FrameSize)*int(cfg.FrameCount))
	if err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("adopt umem: %w", err)
	}
	u := &UMEM{
		cfg: cfg, area: area, memfd: memfd, frameMask: uint64(cfg.FrameSize - 1),
		queues: map[queueKey]*queue{}, pools: map[*Pool]struct{}{},
		spare: make([]uint64, 0, cfg.FrameCount),
	}
	for _, a := range h.Free {
		if a >= uint64(len(area)) {
			u.Abandon()
			for _, fd := range sockFDs {
				unix.Close(fd)
			}
			return nil, nil, fmt.Errorf("adopt umem: free frame %#x outside the %d-byte area", a, len(area))
		}
		u.spare = append(u.spare, a&^u.frameMask)
	}
	u.lost.Store(h.Lost)
	marked, err := owners(h.Sockets)
	if err != nil {
		u.Abandon()
		for _, fd := range sockFDs {
			unix.Close(fd)
		}
		return nil, nil, fmt.Errorf("adopt umem: %w", err)
	}
	for _, qs := range h.Queues {
		k := queueKey{qs.Ifindex, qs.Queue}
		u.queues[k] = &queue{key: k, rxRetired: qs.RxRetired, txRetired: qs.TxRetired}
	}
	defer func() {
		if err != nil {
			// Sockets adopted so far are in u.sockets; the rest close here.
			for _, fd := range sockFDs[len(u.sockets):] {
				unix.Close(fd)
			}
			u.Abandon()
		}
	}()
	for i, st := range h.Sockets {
		fd := sockFDs[i]
		k := queueKey{st.Ifindex, st.Queue}
		q := u.queues[k]
		if q == nil {
			q = &queue{key: k}
			u.queues[k] = q
		}
		var off unix.XDPMmapOffsets
		if _, err := getsockopt(fd, unix.SOL_XDP, unix.XDP_MMAP_OFFSETS, unsafe.Pointer(&off), unsafe.Sizeof(off)); err != nil {
			unix.Close(fd)
			sockFDs[i] = -1
			return nil, nil, fmt.Errorf("adopt socket %d (ifindex %d queue %d): XDP_MMAP_OFFSETS: %w", i, st.Ifindex, st.Queue, err)
		}
		s := &Socket{u: u, q: q, fd: fd, mode: st.Mode, wakeup: st.Wakeup, budgetOK: st.BudgetOK}
		u.sockets = append(u.sockets, s) // from here Abandon unmaps and closes it
		if q.fill == nil {
			if q.fill, err = mapRing(fd, off.Fr, unix.XDP_UMEM_PGOFF_FILL_RING, cfg.FillSize, 8); err != nil {
				return nil, nil, fmt.Errorf("adopt socket %d: fill ring: %w", i, err)
			}
			if q.comp, err = mapRing(fd, off.Cr, unix.XDP_UMEM_PGOFF_COMPLETION_RING, cfg.CompletionSize, 8); err != nil {
				return nil, nil, fmt.Errorf("adopt socket %d: completion ring: %w", i, err)
			}
			q.fillAddrs = q.fill.addrs(off.Fr.Desc)
			q.compAddrs = q.comp.addrs(off.Cr.Desc)
		}
		if s.rx, err = mapRing(fd, off.Rx, unix.XDP_PGOFF_RX_RING, cfg.RxSize, unsafe.Sizeof(Desc{})); err != nil {
			return nil, nil, fmt.Errorf("adopt socket %d: rx ring: %w", i, err)
		}
		if s.tx, err = mapRing(fd, off.Tx, unix.XDP_PGOFF_TX_RING, cfg.TxSize, unsafe.Sizeof(Desc{})); err != nil {
			return nil, nil, fmt.Errorf("adopt socket %d: tx ring: %w", i, err)
		}
		s.rxDescs = s.rx.descs(off.Rx.Desc)
		s.txDescs = s.tx.descs(off.Tx.Desc)
		// The socket that owned the queue's fill and completion rings
		// keeps them: its worker's pool is where the frames on them
		// came from and go back to.
		s.owns.Store(st.Owner || !marked && len(q.sockets) == 0)
		q.sockets = append(q.sockets, s)
	}
	for k, q := range u.queues {
		if q.fill == nil {
			return nil, nil, fmt.Errorf("adopt umem: queue %d of ifindex %d has no socket", k.queue, k.ifindex)
		}
	}
	return u, append([]*Socket(nil), u.sockets...), nil
}

// owners checks that an exporter which marks ring owners marked exactly
// one socket on every (device, queue), and says whether it marked any.
func owners(socks []SocketState) (marked bool, err error) {
	n := map[queueKey]int{}
	for _, st := range socks {
		k := queueKey{st.Ifindex, st.Queue}
		n[k] += 0
		if st.Owner {
			n[k]++
			marked = true
		}
	}
	if !marked {
		return false, nil
	}
	for k, c := range n {
		if c != 1 {
			return true, fmt.Errorf("queue %d of ifindex %d has %d ring owners among the handed-over sockets, want 1", k.queue, k.ifindex, c)
		}
	}
	return true, nil
}

// Reclaim takes the rings back after a hand-over whose successor failed:
// the successor may have moved this side's ring indexes (received,
// refilled, transmitted) before it gave up, so the cached copies are
// reloaded from the rings. Frames it held are not known here; Close
// then counts them as lost. Call it with no worker running, before Close.
func (u *UMEM) Reclaim() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return
	}
	for _, q := range u.queues {
		q.fill.cachedProd = atomic.LoadUint32(q.fill.producer)
		q.fill.cachedCons = atomic.LoadUint32(q.fill.consumer)
		q.comp.cachedCons = atomic.LoadUint32(q.comp.consumer)
		q.comp.cachedProd = atomic.LoadUint32(q.comp.producer)
	}
	for _, s := range u.sockets {
		s.rx.cachedCons = atomic.LoadUint32(s.rx.consumer)
		s.rx.cachedProd = atomic.LoadUint32(s.rx.producer)
		s.tx.cachedProd = atomic.LoadUint32(s.tx.producer)
		s.tx.cachedCons = atomic.LoadUint32(s.tx.consumer)
	}
}
