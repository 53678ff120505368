package xsk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

type queueKey struct {
	ifindex, queue int
}

// queue is the fill and completion ring pair of one (device, queue). The
// kernel gives each (device, queue) of a shared UMEM its own buffer pool
// and with it its own pair; every socket bound there shares it, and one of
// them, the ring owner (Socket.OwnsRings), is the only one that produces
// on fill and consumes on completion, so no lock guards them.
type queue struct {
	key        queueKey
	fill, comp *ring
	fillAddrs  []uint64
	compAddrs  []uint64
	// sockets bound here; the first carried the ring pair at bind time.
	sockets []*Socket
	// ring indexes of sockets already closed, so Accounting still knows
	// what went through them (uint32 arithmetic, like the rings).
	rxRetired, txRetired uint32
}

// Socket is one AF_XDP socket: an RX and a TX ring on one (device,
// queue). Its rings belong to one goroutine (see the package doc).
type Socket struct {
	u        *UMEM
	q        *queue
	fd       int
	rx, tx   *ring
	rxDescs  []Desc
	txDescs  []Desc
	mode     Mode
	wakeup   bool // XDP_USE_NEED_WAKEUP in force
	budgetOK bool
	closed   atomic.Bool
	// owns: this socket's worker feeds the queue's fill ring and drains
	// its completion ring. Set for the first socket on a (device, queue)
	// and handed to the next one when the owner closes.
	owns atomic.Bool
	held counter // frames Receive handed out minus frames Transmit took
}

// Open creates a socket bound to (ifindex, queueID) on the UMEM. The
// first socket of the UMEM registers it (XDP_UMEM_REG) and fixes the mode
// for all; the first socket on each further (device, queue) brings that
// queue's fill and completion rings and binds with XDP_SHARED_UMEM to an
// existing socket and owns them (OwnsRings); the next ones on the same
// (device, queue) bind with XDP_SHARED_UMEM to a socket of that queue and
// share its rings without owning them. Put FD() in the XSK map only after
// Open returns.
func (u *UMEM) Open(ifindex, queueID int) (*Socket, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil, errors.New("open xsk: umem closed")
	}
	s, err := u.open(ifindex, queueID)
	if err != nil {
		return nil, fmt.Errorf("open xsk on ifindex %d queue %d: %w", ifindex, queueID, err)
	}
	return s, nil
}

func (u *UMEM) open(ifindex, queueID int) (_ *Socket, err error) {
	fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket(AF_XDP): %w", err)
	}
	s := &Socket{u: u, fd: fd}
	var q *queue
	defer func() {
		if err != nil {
			s.rx.unmap()
			s.tx.unmap()
			if q != nil && len(q.sockets) == 0 {
				q.fill.unmap()
				q.comp.unmap()
			}
			unix.Close(fd)
		}
	}()

	primary := len(u.sockets) == 0
	if primary && u.lost.Load() > 0 && u.heldLocked() == 0 && len(u.pools) == 0 {
		// No socket, no pool, no frame in a worker: whatever is not in the
		// overflow was left in a kernel pool that no longer exists, so
		// every frame is free again.
		u.spare = u.spare[:0]
		for i := uint32(0); i < u.cfg.FrameCount; i++ {
			u.spare = append(u.spare, uint64(i)*uint64(u.cfg.FrameSize))
		}
		u.lost.Store(0)
	}
	key := queueKey{ifindex, queueID}
	q = u.queues[key]
	newQueue := q == nil
	if primary {
		reg := unix.XDPUmemReg{
			Addr:     uint64(uintptr(unsafe.Pointer(&u.area[0]))),
			Len:      uint64(len(u.area)),
			Size:     u.cfg.FrameSize,
			Headroom: u.cfg.Headroom,
		}
		if err := setsockopt(fd, unix.SOL_XDP, unix.XDP_UMEM_REG, unsafe.Pointer(&reg), unsafe.Sizeof(reg)); err != nil {
			return nil, fmt.Errorf("XDP_UMEM_REG: %w", err)
		}
	}
	if newQueue {
		q = &queue{key: key}
		if err := setRingSize(fd, unix.XDP_UMEM_FILL_RING, u.cfg.FillSize); err != nil {
			return nil, err
		}
		if err := setRingSize(fd, unix.XDP_UMEM_COMPLETION_RING, u.cfg.CompletionSize); err != nil {
			return nil, err
		}
	}
	if err := setRingSize(fd, unix.XDP_RX_RING, u.cfg.RxSize); err != nil {
		return nil, err
	}
	if err := setRingSize(fd, unix.XDP_TX_RING, u.cfg.TxSize); err != nil {
		return nil, err
	}
	var off unix.XDPMmapOffsets
	if _, err := getsockopt(fd, unix.SOL_XDP, unix.XDP_MMAP_OFFSETS, unsafe.Pointer(&off), unsafe.Sizeof(off)); err != nil {
		return nil, fmt.Errorf("XDP_MMAP_OFFSETS: %w", err)
	}
	if newQueue {
		if q.fill, err = mapRing(fd, off.Fr, unix.XDP_UMEM_PGOFF_FILL_RING, u.cfg.FillSize, 8); err != nil {
			return nil, fmt.Errorf("fill ring: %w", err)
		}
		if q.comp, err = mapRing(fd, off.Cr, unix.XDP_UMEM_PGOFF_COMPLETION_RING, u.cfg.CompletionSize, 8); err != nil {
			return nil, fmt.Errorf("completion ring: %w", err)
		}
		q.fillAddrs = q.fill.addrs(off.Fr.Desc)
		q.compAddrs = q.comp.addrs(off.Cr.Desc)
	}
	if s.rx, err = mapRing(fd, off.Rx, unix.XDP_PGOFF_RX_RING, u.cfg.RxSize, unsafe.Sizeof(Desc{})); err != nil {
		return nil, fmt.Errorf("rx ring: %w", err)
	}
	if s.tx, err = mapRing(fd, off.Tx, unix.XDP_PGOFF_TX_RING, u.cfg.TxSize, unsafe.Sizeof(Desc{})); err != nil {
		return nil, fmt.Errorf("tx ring: %w", err)
	}
	s.rxDescs = s.rx.descs(off.Rx.Desc)
	s.txDescs = s.tx.descs(off.Tx.Desc)

	// Kernels before 6.17 lack the option: keep their default of 32.
	budget := u.cfg.TxBudget
	switch err := setsockopt(fd, unix.SOL_XDP, unix.XDP_MAX_TX_SKB_BUDGET, unsafe.Pointer(&budget), 4); {
	case err == nil:
		s.budgetOK = true
	case errors.Is(err, unix.ENOPROTOOPT):
	default:
		return nil, fmt.Errorf("XDP_MAX_TX_SKB_BUDGET %d: %w", budget, err)
	}

	sa := &unix.SockaddrXDP{Ifindex: uint32(ifindex), QueueID: uint32(queueID)}
	if primary {
		// Flags are only allowed on the socket that brings the UMEM;
		// sharers inherit copy/zero-copy and need_wakeup from it.
		switch u.cfg.Bind {
		case BindCopy:
			sa.Flags |= unix.XDP_COPY
		case BindZeroCopy:
			sa.Flags |= unix.XDP_ZEROCOPY
		}
		if !u.cfg.NoNeedWakeup {
			sa.Flags |= unix.XDP_USE_NEED_WAKEUP
		}
	} else {
		sa.Flags = unix.XDP_SHARED_UMEM
		if newQueue {
			sa.SharedUmemFD = uint32(u.sockets[0].fd)
		} else {
			sa.SharedUmemFD = uint32(q.sockets[0].fd)
		}
	}
	// A socket closed just before may still own the (device, queue): the
	// kernel releases its buffer pool from a workqueue, and bind says
	// EBUSY until that ran.
	for deadline := time.Now().Add(bindBusyTimeout); ; time.Sleep(time.Millisecond) {
		err := unix.Bind(fd, sa)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return nil, fmt.Errorf("bind (flags %#x, shared fd %d): %w", sa.Flags, sa.SharedUmemFD, err)
		}
	}
	var opts struct{ flags uint32 }
	if _, err := getsockopt(fd, unix.SOL_XDP, unix.XDP_OPTIONS, unsafe.Pointer(&opts), 4); err != nil {
		return nil, fmt.Errorf("XDP_OPTIONS: %w", err)
	}
	s.mode = ModeCopy
	if opts.flags&unix.XDP_OPTIONS_ZEROCOPY != 0 {
		s.mode = ModeZeroCopy
	}
	s.wakeup = !u.cfg.NoNeedWakeup
	s.q = q
	s.owns.Store(newQueue)
	q.sockets = append(q.sockets, s)
	if newQueue {
		u.queues[key] = q
	}
	u.sockets = append(u.sockets, s)
	return s, nil
}

func setRingSize(fd, opt int, n uint32) error {
	if err := setsockopt(fd, unix.SOL_XDP, opt, unsafe.Pointer(&n), 4); err != nil {
		return fmt.Errorf("ring size option %d = %d: %w", opt, n, err)
	}
	return nil
}

// FD is the socket to put in the XSK map.
func (s *Socket) FD() int { return s.fd }

// Mode is copy or zero-copy, as confirmed by XDP_OPTIONS after bind.
func (s *Socket) Mode() Mode { return s.mode }

// Ifindex and Queue name the (device, queue) the socket is bound to.
func (s *Socket) Ifindex() int { return s.q.key.ifindex }
func (s *Socket) Queue() int   { return s.q.key.queue }

// OwnsRings reports whether this socket's worker is the one that feeds
// its (device, queue)'s fill ring and drains its completion ring: Refill
// and Complete do nothing on the other sockets of the queue. The first
// socket opened on a (device, queue) owns them until it closes.
func (s *Socket) OwnsRings() bool { return s.owns.Load() }

// TxBudgetSet reports whether XDP_MAX_TX_SKB_BUDGET was accepted.
func (s *Socket) TxBudgetSet() bool { return s.budgetOK }

// Receive moves up to len(descs) received packets from the RX ring into
// descs and returns how many. The frames now belong to the caller until
// it transmits or frees them.
func (s *Socket) Receive(descs []Desc) int {
	n := s.rx.consAvail(uint32(len(descs)))
	if n == 0 {
		return 0
	}
	n = min(n, uint32(len(descs)))
	idx := s.rx.cachedCons
	for i := uint32(0); i < n; i++ {
		descs[i] = s.rxDescs[(idx+i)&s.rx.mask]
	}
	s.rx.consRelease(n)
	s.held.add(int64(n))
	return int(n)
}

// ErrInvalidDesc is returned by Transmit for a descriptor the kernel
// would reject: empty, outside the UMEM, crossing its frame's end, or
// with options set.
var ErrInvalidDesc = errors.New("xsk: invalid tx descriptor")

// Transmit puts descriptors on the TX ring and returns how many it took;
// the rest (ring full, or an invalid descriptor at index n) stay with the
// caller. A descriptor may start anywhere inside its frame. Nothing is
// sent until Kick.
func (s *Socket) Transmit(descs []Desc) (int, error) {
	want := uint32(len(descs))
	free := min(s.tx.prodFree(want), want)
	idx := s.tx.cachedProd
	var err error
	n := uint32(0)
	for ; n < free; n++ {
		d := descs[n]
		if !s.u.valid(d) {
			err = fmt.Errorf("%w: addr %#x len %d options %#x", ErrInvalidDesc, d.Addr, d.Len, d.Options)
			break
		}
		s.txDescs[(idx+n)&s.tx.mask] = d
	}
	if n > 0 {
		s.tx.prodSubmit(n)
		s.held.add(-int64(n))
	}
	return int(n), err
}

// Kick makes the kernel send what is on the TX ring, if it asked for it
// (need_wakeup) or always without need_wakeup. In copy mode the kernel
// always asks: transmission happens inside this sendto, up to the TX
// budget per call.
func (s *Socket) Kick() error {
	if s.wakeup && !s.tx.needWakeup() {
		return nil
	}
	if err := kick(s.fd); err != nil {
		return fmt.Errorf("xsk tx kick: %w", err)
	}
	return nil
}

// TxPending is the number of descriptors on the TX ring the kernel has
// not taken yet.
func (s *Socket) TxPending() int { return int(s.tx.occupancy()) }

// Complete drains the completion ring of the socket's (device, queue)
// into p and returns how many frames it recovered. Only the ring owner
// drains (OwnsRings); on another socket it returns 0. Frames another
// worker sent on this queue come back to the owner's pool and drift back
// through the UMEM's overflow (Pool).
func (s *Socket) Complete(p *Pool) int {
	if !s.owns.Load() {
		return 0
	}
	q := s.q
	n := q.comp.consAvail(q.comp.size)
	if n == 0 {
		return 0
	}
	idx := q.comp.cachedCons
	fm := s.u.frameMask
	for i := uint32(0); i < n; i++ {
		p.free = append(p.free, q.compAddrs[(idx+i)&q.comp.mask]&^fm)
	}
	// The pool is counted before the ring index moves, so Accounting
	// never sees these frames in neither place.
	p.n.add(int64(n))
	q.comp.consRelease(n)
	p.spill()
	return int(n)
}

// Refill tops up the fill ring of the socket's (device, queue) from p
// (and through p from the shared overflow) with at most max frames (all
// the ring takes if max <= 0) and returns how many it added. It wakes the
// kernel if the ring asks for it. Only the ring owner refills
// (OwnsRings); on another socket it returns 0.
func (s *Socket) Refill(p *Pool, max int) (int, error) {
	if !s.owns.Load() {
		return 0, nil
	}
	q := s.q
	free := q.fill.prodFree(q.fill.size)
	if max > 0 && uint32(max) < free {
		free = uint32(max)
	}
	if free == 0 {
		return 0, nil
	}
	p.ensure(int(free))
	n := min(free, uint32(len(p.free)))
	idx := q.fill.cachedProd
	src := p.free[len(p.free)-int(n):]
	for i := uint32(0); i < n; i++ {
		q.fillAddrs[(idx+i)&q.fill.mask] = src[i]
	}
	p.free = p.free[:len(p.free)-int(n)]
	q.fill.prodSubmit(n)
	p.n.add(-int64(n))
	if s.wakeup && q.fill.needWakeup() {
		if err := wakeRX(s.fd); err != nil {
			return int(n), fmt.Errorf("xsk fill wakeup: %w", err)
		}
	}
	return int(n), nil
}

// Stats are the kernel's XDP_STATISTICS for one socket. The fill-ring
// figure is per (device, queue) since the ring is shared.
type Stats struct {
	RxDropped            uint64 // no frame or no room: packet lost
	RxInvalidDescs       uint64
	TxInvalidDescs       uint64
	RxRingFull           uint64 // RX ring full: packet dropped
	RxFillRingEmptyDescs uint64 // fill ring empty when a packet arrived
	TxRingEmptyDescs     uint64 // kick found nothing to send
}

// Stats reads XDP_STATISTICS.
func (s *Socket) Stats() (Stats, error) {
	var st unix.XDPStatistics
	if _, err := getsockopt(s.fd, unix.SOL_XDP, unix.XDP_STATISTICS, unsafe.Pointer(&st), unsafe.Sizeof(st)); err != nil {
		return Stats{}, fmt.Errorf("XDP_STATISTICS: %w", err)
	}
	return Stats{
		RxDropped:            st.Rx_dropped,
		RxInvalidDescs:       st.Rx_invalid_descs,
		TxInvalidDescs:       st.Tx_invalid_descs,
		RxRingFull:           st.Rx_ring_full,
		RxFillRingEmptyDescs: st.Rx_fill_ring_empty_descs,
		TxRingEmptyDescs:     st.Tx_ring_empty_descs,
	}, nil
}

// RxPositions returns the RX ring's producer index as the kernel last
// published it and this socket's own consumer index (frames Receive has
// handed out). Every frame the kernel had queued when prod was read has
// been received once cons has reached prod (indices wrap: compare with
// int32(cons-prod) >= 0).
func (s *Socket) RxPositions() (prod, cons uint32) {
	return atomic.LoadUint32(s.rx.producer), s.rx.cachedCons
}

// RxOccupancy and FillOccupancy are ring levels for metrics.
func (s *Socket) RxOccupancy() int   { return int(s.rx.occupancy()) }
func (s *Socket) FillOccupancy() int { return int(s.q.fill.occupancy()) }

// bindBusyTimeout bounds how long Open waits for a previous owner of the
// (device, queue) to be released.
const bindBusyTimeout = time.Second

// closeDrainTimeout bounds how long Close waits for the kernel to send
// what is on the TX ring and post its completions.
const closeDrainTimeout = 500 * time.Millisecond

// Close drains and closes the socket; it is idempotent. Remove FD() from
// the XSK map first: packets redirected to a closing socket are lost. It
// must not run concurrently with the socket's own worker. Frames on its
// rings go back to the shared overflow: sent ones through the completion
// ring, unsent and unreceived ones by reading the rings. The last socket
// on a (device, queue) also returns that queue's fill ring; frames the
// kernel still holds then are counted in Accounting.Lost.
func (s *Socket) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	u, q := s.u, s.q
	// Let the kernel finish what is queued so its frames come back
	// through completions.
	deadline := time.Now().Add(closeDrainTimeout)
	for s.tx.occupancy() > 0 && time.Now().Before(deadline) {
		if err := kick(s.fd); err != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	owner := s.owns.Load()
	// Completions for this socket's last sends may still be in flight
	// (copy mode posts them when the skb is freed). Only the ring owner
	// may drain them; another socket's come back through the owner's
	// Complete.
	for owner && time.Now().Before(deadline) {
		var inflight uint32
		for _, o := range q.sockets {
			inflight += atomic.LoadUint32(o.tx.consumer)
		}
		inflight += q.txRetired
		if inflight == atomic.LoadUint32(q.comp.producer) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	// Completion ring: every sharer's frames, all ours again.
	if owner {
		n := q.comp.consAvail(q.comp.size)
		for i := uint32(0); i < n; i++ {
			u.spare = append(u.spare, q.compAddrs[(q.comp.cachedCons+i)&q.comp.mask]&^u.frameMask)
		}
		q.comp.consRelease(n)
	}
	// Unsent TX descriptors.
	txCons := atomic.LoadUint32(s.tx.consumer)
	for i := txCons; i != s.tx.cachedProd; i++ {
		u.spare = append(u.spare, s.txDescs[i&s.tx.mask].Addr&^u.frameMask)
	}
	// Received, not yet taken.
	rxProd := atomic.LoadUint32(s.rx.producer)
	for i := s.rx.cachedCons; i != rxProd; i++ {
		u.spare = append(u.spare, s.rxDescs[i&s.rx.mask].Addr&^u.frameMask)
	}
	q.rxRetired += rxProd
	// Unsent descriptors went back to the overflow above; only what the
	// kernel took can still come through the completion ring.
	q.txRetired += txCons

	for i, o := range q.sockets {
		if o == s {
			q.sockets = append(q.sockets[:i], q.sockets[i+1:]...)
			break
		}
	}
	u.heldRetired += s.held.load()
	s.held.store(0)
	if owner && len(q.sockets) > 0 {
		// The rings' cached indexes live in q, so the next owner carries
		// on where this one stopped; the atomic store publishes them.
		s.owns.Store(false)
		q.sockets[0].owns.Store(true)
	}
	for i, o := range u.sockets {
		if o == s {
			u.sockets = append(u.sockets[:i], u.sockets[i+1:]...)
			break
		}
	}
	var errs []error
	if err := s.rx.unmap(); err != nil {
		errs = append(errs, fmt.Errorf("munmap rx ring: %w", err))
	}
	if err := s.tx.unmap(); err != nil {
		errs = append(errs, fmt.Errorf("munmap tx ring: %w", err))
	}
	if len(q.sockets) == 0 {
		fillCons := atomic.LoadUint32(q.fill.consumer)
		for i := fillCons; i != q.fill.cachedProd; i++ {
			u.spare = append(u.spare, q.fillAddrs[i&q.fill.mask]&^u.frameMask)
		}
		u.lost.Add(int64(int32(fillCons - q.rxRetired)))
		u.lost.Add(int64(int32(q.txRetired - atomic.LoadUint32(q.comp.producer))))
		if err := q.fill.unmap(); err != nil {
			errs = append(errs, fmt.Errorf("munmap fill ring: %w", err))
		}
		if err := q.comp.unmap(); err != nil {
			errs = append(errs, fmt.Errorf("munmap completion ring: %w", err))
		}
		delete(u.queues, q.key)
	}
	if err := unix.Close(s.fd); err != nil {
		errs = append(errs, fmt.Errorf("close xsk fd %d: %w", s.fd, err))
	}
	return errors.Join(errs...)
}
