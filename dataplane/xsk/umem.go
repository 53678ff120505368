package xsk

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// BindMode chooses how sockets bind. Auto asks the kernel for zero-copy
// and lets it fall back to copy mode when the driver cannot (veth always
// falls back, docs/platform.md); Socket.Mode reports what was granted.
type BindMode int

const (
	BindAuto BindMode = iota
	BindCopy
	BindZeroCopy
)

// Mode is the data path the kernel granted a bound socket.
type Mode int

const (
	ModeCopy Mode = iota + 1
	ModeZeroCopy
)

func (m Mode) String() string {
	switch m {
	case ModeCopy:
		return "copy"
	case ModeZeroCopy:
		return "zerocopy"
	}
	return "unbound"
}

// DefaultTxBudget is XDP_MAX_TX_SKB_BUDGET for every socket: how many
// frames one copy-mode kick turns into skbs. The kernel default is 32;
// 1024 gave about 60% more TX rate on these machines (docs/platform.md).
const DefaultTxBudget = 1024

// Config sizes a UMEM and the rings of the sockets opened on it. Zero
// fields take the defaults in parentheses. Ring sizes must be powers of two.
type Config struct {
	// FrameSize is the chunk size (4096). Aligned mode allows a power of
	// two from 2048 to the page size. 4096 is the default because a frame
	// must hold headroom + XDP_PACKET_HEADROOM (256) + the largest packet
	// + the encapsulation a worker prepends when it turns an RX frame into
	// a TX frame in place: 2048 caps packets near 1.7 KB, too tight for
	// the private side's MTU up to ~3.5 KB on veth, and a page per frame
	// never lets one packet straddle two pages.
	FrameSize uint32
	// FrameCount is the number of frames (16384): ≥10 ms of traffic, so a
	// Go scheduling stall of a few ms does not empty the fill rings.
	FrameCount uint32
	// Headroom is the UMEM headroom (0): bytes the kernel leaves free at
	// the start of every RX frame, in front of its own 256 bytes of
	// XDP_PACKET_HEADROOM.
	Headroom uint32
	// FillSize and CompletionSize size the rings of each (device, queue)
	// (4096 each).
	FillSize, CompletionSize uint32
	// RxSize and TxSize size the rings of each socket (4096 each).
	RxSize, TxSize uint32
	// TxBudget is XDP_MAX_TX_SKB_BUDGET (DefaultTxBudget); it is clamped
	// to TxSize, which the kernel requires.
	TxBudget uint32
	// PoolSize is the high-water mark of a worker's free-frame pool
	// (1024); frames above it spill to the shared overflow.
	PoolSize int
	// Bind selects zero-copy, copy, or automatic choice (BindAuto).
	Bind BindMode
	// NoNeedWakeup disables XDP_USE_NEED_WAKEUP; then every Kick and
	// Refill makes a syscall.
	NoNeedWakeup bool
}

func (c *Config) setDefaults() error {
	def := func(v *uint32, d uint32) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.FrameSize, 4096)
	def(&c.FrameCount, 16384)
	def(&c.FillSize, 4096)
	def(&c.CompletionSize, 4096)
	def(&c.RxSize, 4096)
	def(&c.TxSize, 4096)
	def(&c.TxBudget, DefaultTxBudget)
	if c.TxBudget > c.TxSize {
		c.TxBudget = c.TxSize
	}
	if c.PoolSize == 0 {
		c.PoolSize = 1024
	}
	pow2 := func(name string, v uint32) error {
		if v == 0 || v&(v-1) != 0 {
			return fmt.Errorf("%s %d is not a power of two", name, v)
		}
		return nil
	}
	for _, f := range []struct {
		n string
		v uint32
	}{{"frame size", c.FrameSize}, {"fill ring size", c.FillSize}, {"completion ring size", c.CompletionSize},
		{"rx ring size", c.RxSize}, {"tx ring size", c.TxSize}} {
		if err := pow2(f.n, f.v); err != nil {
			return err
		}
	}
	if c.FrameSize < 2048 || c.FrameSize > uint32(unix.Getpagesize()) {
		return fmt.Errorf("frame size %d outside 2048..%d (aligned mode)", c.FrameSize, unix.Getpagesize())
	}
	if c.Headroom+unix.XDP_PACKET_HEADROOM+64 > c.FrameSize {
		return fmt.Errorf("headroom %d leaves no room for a packet in a %d-byte frame", c.Headroom, c.FrameSize)
	}
	return nil
}

// UMEM is the packet memory shared by every AF_XDP socket of the gateway,
// on every device and queue, so a frame received on one device can be
// transmitted on another by passing its address.
type UMEM struct {
	cfg       Config
	area      []byte
	memfd     int // backs area (memfd.go), passed on in a hand-over
	frameMask uint64

	mu      sync.Mutex // guards everything below, never taken per packet
	queues  map[queueKey]*queue
	sockets []*Socket
	pools   map[*Pool]struct{}
	spare   []uint64 // shared overflow of free frames
	closed  bool

	// heldRetired is what closed sockets and pools still counted as held
	// (a frame received on one socket and freed into a pool counts +1 on
	// the socket and -1 on the pool): only the sum over all of them is
	// the number of frames in workers' hands.
	heldRetired int64
	lost        atomic.Int64 // frames the kernel still held when their (device, queue) was torn down
}

// New maps the packet area. Registration with the kernel happens when the
// first socket opens (XDP_UMEM_REG is a socket option), again after all
// sockets were closed.
func New(cfg Config) (*UMEM, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("umem config: %w", err)
	}
	size := int(cfg.FrameSize) * int(cfg.FrameCount)
	area, memfd, err := newArea(size)
	if err != nil {
		return nil, fmt.Errorf("umem (%d frames of %d bytes): %w", cfg.FrameCount, cfg.FrameSize, err)
	}
	u := &UMEM{
		cfg:       cfg,
		area:      area,
		memfd:     memfd,
		frameMask: uint64(cfg.FrameSize - 1),
		queues:    map[queueKey]*queue{},
		pools:     map[*Pool]struct{}{},
		spare:     make([]uint64, cfg.FrameCount),
	}
	for i := range u.spare {
		u.spare[i] = uint64(i) * uint64(cfg.FrameSize)
	}
	return u, nil
}

// Config returns the configuration with defaults filled in.
func (u *UMEM) Config() Config { return u.cfg }

// FrameSize is the size of one frame (chunk).
func (u *UMEM) FrameSize() uint32 { return u.cfg.FrameSize }

// RxOffset is where in a frame the kernel puts a received packet:
// UMEM headroom plus XDP_PACKET_HEADROOM.
func (u *UMEM) RxOffset() uint32 { return u.cfg.Headroom + unix.XDP_PACKET_HEADROOM }

// Frame returns the whole frame that contains addr. Writing in front of a
// received packet (a new L2 header, encapsulation) happens through it.
func (u *UMEM) Frame(addr uint64) []byte {
	base := addr &^ u.frameMask
	return u.area[base : base+uint64(u.cfg.FrameSize) : base+uint64(u.cfg.FrameSize)]
}

// FrameBase is the address of the frame containing addr.
func (u *UMEM) FrameBase(addr uint64) uint64 { return addr &^ u.frameMask }

// Packet returns the bytes a descriptor names.
func (u *UMEM) Packet(d Desc) []byte {
	end := d.Addr + uint64(d.Len)
	return u.area[d.Addr:end:end]
}

// Meta returns the n bytes just before addr, where the kernel leaves XDP
// metadata (bpf_xdp_adjust_meta) of a received packet, or nil if they
// would reach outside addr's frame. Whether they hold metadata depends on
// the mode and kernel: see the package documentation.
func (u *UMEM) Meta(addr uint64, n int) []byte {
	if uint64(n) > addr&u.frameMask {
		return nil
	}
	return u.area[addr-uint64(n) : addr : addr]
}

// valid reports whether d may go on a TX ring: inside the area and, in
// aligned mode, not crossing the end of its frame (the kernel counts such
// a descriptor in tx_invalid_descs and never completes it, losing the
// frame).
func (u *UMEM) valid(d Desc) bool {
	return d.Len > 0 && d.Addr < uint64(len(u.area)) && (d.Addr&u.frameMask)+uint64(d.Len) <= uint64(u.cfg.FrameSize) && d.Options == 0
}

// Accounting is where every frame is. Total equals FrameCount at all
// times when nothing moves frames; under traffic the figures are read one
// after the other and may be off by a batch.
type Accounting struct {
	Free       int64 // worker pools and the shared overflow
	Fill       int64 // in fill rings, not yet taken by the kernel
	KernelRX   int64 // taken from a fill ring, not yet on an RX ring
	RX         int64 // on RX rings, not yet received
	Worker     int64 // received or allocated, not yet transmitted or freed
	TX         int64 // on TX rings, not yet taken by the kernel
	KernelTX   int64 // taken from a TX ring, completion not yet posted
	Completion int64 // on completion rings, not yet drained
	Lost       int64 // still in the kernel when their (device, queue) was torn down
}

// Total is the sum of all places.
func (a Accounting) Total() int64 {
	return a.Free + a.Fill + a.KernelRX + a.RX + a.Worker + a.TX + a.KernelTX + a.Completion + a.Lost
}

// Accounting counts the frames in each place. Each figure comes from its
// own source (pool lengths, ring indexes, event counters), so a lost or
// doubled frame shows as a Total different from FrameCount.
func (u *UMEM) Accounting() Accounting {
	u.mu.Lock()
	defer u.mu.Unlock()
	var a Accounting
	a.Free = int64(len(u.spare))
	for p := range u.pools {
		a.Free += p.n.load()
	}
	a.Worker = u.heldLocked()
	a.Lost = u.lost.Load()
	for _, q := range u.queues {
		fillCons := atomic.LoadUint32(q.fill.consumer)
		compProd := atomic.LoadUint32(q.comp.producer)
		a.Fill += int64(atomic.LoadUint32(q.fill.producer) - fillCons)
		a.Completion += int64(atomic.LoadUint32(q.comp.producer) - atomic.LoadUint32(q.comp.consumer))
		rxProd, txCons := q.rxRetired, q.txRetired
		for _, s := range q.sockets {
			p := atomic.LoadUint32(s.rx.producer)
			rxProd += p
			a.RX += int64(p - atomic.LoadUint32(s.rx.consumer))
			c := atomic.LoadUint32(s.tx.consumer)
			txCons += c
			a.TX += int64(atomic.LoadUint32(s.tx.producer) - c)
		}
		a.KernelRX += int64(int32(fillCons - rxProd))
		a.KernelTX += int64(int32(txCons - compProd))
	}
	return a
}

// heldLocked sums the frames handed to workers and not yet given back
// (Receive, Pool.Get minus Transmit, Pool.Put): each socket and pool
// counts its own, so no counter is shared between workers.
func (u *UMEM) heldLocked() int64 {
	n := u.heldRetired
	for _, s := range u.sockets {
		n += s.held.load()
	}
	for p := range u.pools {
		n += p.held.load()
	}
	return n
}

// counter is a figure with one writer (the worker owning the socket or
// pool) and readers elsewhere (Accounting): the writer's add is a plain
// load and store, no locked instruction, and nothing is shared between
// workers on the packet path.
type counter struct{ v atomic.Int64 }

func (c *counter) add(n int64)   { c.v.Store(c.v.Load() + n) }
func (c *counter) load() int64   { return c.v.Load() }
func (c *counter) store(n int64) { c.v.Store(n) }

// Close closes every socket and pool and unmaps the area. It is
// idempotent. Frames held by workers are gone with the area: nothing may
// touch a Frame after Close.
func (u *UMEM) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	socks := append([]*Socket(nil), u.sockets...)
	u.mu.Unlock()
	var errs []error
	for _, s := range socks {
		if err := s.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	u.mu.Lock()
	u.closed = true
	for p := range u.pools {
		delete(u.pools, p)
	}
	if err := unix.Munmap(u.area); err != nil {
		errs = append(errs, fmt.Errorf("munmap umem: %w", err))
	}
	u.area = nil
	if u.memfd >= 0 {
		unix.Close(u.memfd)
		u.memfd = -1
	}
	u.mu.Unlock()
	return errors.Join(errs...)
}

// takeSpare moves up to n frames from the shared overflow into dst.
func (u *UMEM) takeSpare(dst []uint64, n int) []uint64 {
	u.mu.Lock()
	if n > len(u.spare) {
		n = len(u.spare)
	}
	dst = append(dst, u.spare[len(u.spare)-n:]...)
	u.spare = u.spare[:len(u.spare)-n]
	u.mu.Unlock()
	return dst
}

func (u *UMEM) putSpareLocked(addrs []uint64) {
	for _, a := range addrs {
		u.spare = append(u.spare, a&^u.frameMask)
	}
}
