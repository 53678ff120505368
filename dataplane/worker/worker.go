package worker

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/flood"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/procs"
)

// Config is what one worker needs. Public and Private are this worker's
// sockets on the two interfaces, opened on the same UMEM.
type Config struct {
	ID              int
	UMEM            *xsk.UMEM
	Public, Private *xsk.Socket
	// PublicRX and PrivateRX are the worker's sockets on the sides' other
	// RX queues (one per queue besides Public's and Private's): the
	// worker receives from them and transmits only on Public and Private.
	// It feeds the fill and drains the completion ring of every queue
	// whose rings its sockets own (xsk.Socket.OwnsRings).
	PublicRX, PrivateRX   []*xsk.Socket
	PublicMAC, PrivateMAC [6]byte
	// PublicMTU and PrivateMTU are the links' MTUs (IP bytes). Cleartext
	// that would exceed PublicMTU once sealed is fragmented before
	// sealing (IPv4, DF clear) or answered with an ICMP Fragmentation
	// Needed / Packet Too Big; decrypted packets above PrivateMTU are
	// dropped as oversized. 0 disables the checks.
	PublicMTU, PrivateMTU int
	// PrivateAddrs are the gateway's addresses on the private side: the
	// source of the ICMP errors it sends (to the core, and to phones
	// inside their SAs). Without one of a family, no ICMP of that family.
	PrivateAddrs []netip.Addr
	// PublicVLAN and PrivateVLAN tag the frames each side sends (VLAN ID
	// 1..4094; 0 untagged) with the TPID PublicTPID/PrivateTPID (0:
	// 0x8100, 802.1Q; 0x88a8 is 802.1ad). XDP takes only frames with the
	// same tag on that side, so both directions match.
	PublicVLAN, PrivateVLAN uint16
	PublicTPID, PrivateTPID uint16
	// OuterTTL is the TTL/hop limit of outer headers (0: 64).
	OuterTTL uint8
	// DSCP, when FixDSCP, is the outer DSCP (0..63) for SAs without
	// their own; otherwise the inner DSCP is copied (RFC 4301 5.1.2.1).
	DSCP    uint8
	FixDSCP bool
	// ICMPRate bounds the ICMP errors this worker sends per second
	// (burst a tenth of it); 0 sends none.
	ICMPRate int
	// Clock is the time source for last-seen stamps and the ICMP rate
	// limit (unix ns); nil is time.Now.
	Clock func() int64
	// Workers is how many workers the gateway runs; it partitions the
	// outer IPv4 ID space between them (1 when 0).
	Workers   int
	Neighbors Neighbors
	// BindingEvents receives binding changes without blocking the worker;
	// nil discards them (they are still counted).
	BindingEvents chan<- BindingChange
	// SeqRequests receives requests for more reserved sequence numbers
	// (outbound SAs with a Limit); required when any entry has one.
	SeqRequests chan<- SeqRequest
	// Batch is the most descriptors taken from a ring at once (64).
	Batch int
	// Spin is how many empty loop turns pass before the worker sleeps in
	// poll(2) (256): enough to ride out gaps inside a burst without a
	// syscall, few enough that an idle gateway does not burn a core.
	Spin int
	// IdleWait bounds one poll(2) sleep (100 ms).
	IdleWait time.Duration
	// Flood receives this worker's failed authentications and publishes
	// spent budgets to XDP (package flood); nil: no budgets. One per
	// worker: a Guard is not shared.
	Flood *flood.Guard
	// Held starts the worker applying commands only, its sockets
	// untouched until Release (hold.go).
	Held bool
	// CipherIdle is how long an SA carries no packet before its worker
	// drops its cipher, to rebuild it from the key on the next packet
	// (idle.go); 0 is DefaultCipherIdle.
	CipherIdle time.Duration
}

// Worker runs one data-path loop.
type Worker struct {
	cfg    Config
	pipe   pipeline
	stats  Stats
	cmds   chan []Command
	inject chan SlowPacket
	wake   int // eventfd: commands queued, packets injected, or shutdown requested

	// drains are removals waiting for frames already steered to their
	// slots; injTaken counts slow-path packets taken off inject.
	drains   []pendingDrain
	injTaken uint64
	held     holdFlag // Config.Held until Release (hold.go)

	// pubRX and privRX are every socket the worker receives from on each
	// side (Public or Private first); socks is both, in that order, which
	// is also the order of pendingDrain.rx.
	pubRX, privRX, socks []*xsk.Socket
}

// New checks cfg and prepares the worker; Run starts it.
func New(cfg Config) (*Worker, error) {
	if cfg.UMEM == nil || cfg.Public == nil || cfg.Private == nil || cfg.Neighbors == nil {
		return nil, fmt.Errorf("worker %d: UMEM, both sockets and a neighbour resolver are required", cfg.ID)
	}
	if cfg.Batch <= 0 {
		cfg.Batch = 64
	}
	if cfg.Spin <= 0 {
		cfg.Spin = 256
	}
	if cfg.IdleWait <= 0 {
		cfg.IdleWait = 100 * time.Millisecond
	}
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("worker %d: eventfd: %w", cfg.ID, err)
	}
	w := &Worker{cfg: cfg, cmds: make(chan []Command, 64), inject: make(chan SlowPacket, injectQueue), wake: fd}
	w.held.Store(cfg.Held)
	w.pubRX = append([]*xsk.Socket{cfg.Public}, cfg.PublicRX...)
	w.privRX = append([]*xsk.Socket{cfg.Private}, cfg.PrivateRX...)
	w.socks = append(append([]*xsk.Socket(nil), w.pubRX...), w.privRX...)
	events := cfg.BindingEvents
	if events == nil {
		events = make(chan BindingChange) // never read: every send takes the default branch
	}
	seqReq := cfg.SeqRequests
	if seqReq == nil {
		seqReq = make(chan SeqRequest) // never read: requests wait for a manager that never comes
	}
	w.pipe = pipeline{
		seqRequests: seqReq,
		mem:         cfg.UMEM,
		nb:          cfg.Neighbors,
		pubMAC:      cfg.PublicMAC,
		privMAC:     cfg.PrivateMAC,
		stats:       &w.stats,
		id:          cfg.ID,
		bindEvents:  events,
		privateMTU:  cfg.PrivateMTU,
		flood:       cfg.Flood,
		privAddrs:   cfg.PrivateAddrs,
		outerTTL:    cfg.OuterTTL,
		dscp:        cfg.DSCP,
		fixDSCP:     cfg.FixDSCP,
		icmp:        newLimiter(cfg.ICMPRate),
		clock:       cfg.Clock,
		toPub:       make([]xsk.Desc, 0, cfg.Batch*maxFragments),
		back:        make([]xsk.Desc, 0, cfg.Batch),
		idle:        idler{limit: idleTicks(cfg.CipherIdle)},
	}
	stride := max(cfg.Workers, 1)
	w.pipe.pubTag, w.pipe.privTag = vlanTag(cfg.PublicTPID, cfg.PublicVLAN), vlanTag(cfg.PrivateTPID, cfg.PrivateVLAN)
	w.pipe.frag = fragmenter{mtu: cfg.PublicMTU, mem: cfg.UMEM, rxOff: uint64(cfg.UMEM.RxOffset()),
		stride: uint16(stride), worker: uint16(cfg.ID), tag: w.pipe.pubTag}
	return w, nil
}

// Stats are the worker's live figures.
func (w *Worker) Stats() *Stats { return &w.stats }

// ID is the worker's number, its index in the XSK maps.
func (w *Worker) ID() int { return w.cfg.ID }

// Send queues commands; the worker applies them, in order, between two
// batches. It blocks only while 64 earlier batches of commands are pending.
func (w *Worker) Send(ctx context.Context, cmds []Command) error {
	select {
	case w.cmds <- cmds:
	case <-ctx.Done():
		return ctx.Err()
	}
	w.poke()
	return nil
}

// Pending is how many batches of commands are queued and not yet taken
// by the worker loop.
func (w *Worker) Pending() int { return len(w.cmds) }

// Sync returns once the worker has applied every command sent before it.
func (w *Worker) Sync(ctx context.Context) error {
	done := make(chan struct{})
	if err := w.Send(ctx, []Command{{Index: ^uint32(0), Done: done}}); err != nil {
		return err
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (w *Worker) poke() {
	var one = [8]byte{1}
	unix.Write(w.wake, one[:])
}

// Close releases the worker's eventfd; call it after Run returned.
func (w *Worker) Close() error { return unix.Close(w.wake) }

func (w *Worker) apply(cmds []Command) {
	for _, c := range cmds {
		if c.Index != ^uint32(0) {
			if len(w.drains) > 0 {
				w.finishDrain(c.Index)
			}
			if c.Drain && c.Entry == nil && int(c.Index) < len(w.pipe.table) && w.pipe.table[c.Index] != nil {
				w.startDrain(c)
				continue
			}
			if int(c.Index) >= len(w.pipe.table) {
				if c.Entry == nil {
					goto done
				}
				grown := make([]*Slot, max(int(c.Index)+1, 2*len(w.pipe.table)))
				copy(grown, w.pipe.table)
				w.pipe.table = grown
			}
			if c.Entry != nil {
				c.Entry.index = c.Index
				if old := w.pipe.table[c.Index]; c.Inherit && old != nil && old.Dir == c.Entry.Dir && old.SA.SPI() == c.Entry.SA.SPI() {
					Inherit(c.Entry, old)
				}
			}
			w.pipe.track(w.pipe.table[c.Index], c.Entry)
			w.pipe.table[c.Index] = c.Entry
			if c.Entry != nil && c.Entry.Dir == Inbound && c.Entry.marks&markDirty == 0 {
				w.pipe.markDirty(c.Entry) // restored or inherited: export it once
			}
		}
	done:
		if c.Visit != nil {
			c.Visit(w.pipe.table)
		}
		if c.Dirty != nil {
			w.pipe.takeDirty(c.Dirty)
		}
		if c.Done != nil {
			close(c.Done)
		}
	}
}

// drainCommands applies queued commands and completes the pending
// removals whose frames the previous batches took.
func (w *Worker) drainCommands() {
	for {
		select {
		case cmds := <-w.cmds:
			w.apply(cmds)
		default:
			if len(w.drains) > 0 {
				w.settle()
			}
			return
		}
	}
}

// Run is the worker loop. It returns nil when ctx is cancelled, after
// handing back every frame it held.
func (w *Worker) Run(ctx context.Context) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// A P of its own: back from poll(2), the loop must not wait for a
	// busy goroutine's preemption (internal/procs).
	defer procs.Reserve()()
	stop := context.AfterFunc(ctx, w.poke)
	defer stop()

	pub, priv := w.cfg.Public, w.cfg.Private
	pool := w.cfg.UMEM.NewPool()
	defer pool.Close()
	w.pipe.frag.pool = pool
	rx := make([]xsk.Desc, w.cfg.Batch)
	tx := make([]xsk.Desc, 0, w.cfg.Batch)
	drop := make([]uint64, 0, w.cfg.Batch)
	fds := make([]unix.PollFd, 0, len(w.socks)+1)
	for _, s := range w.socks {
		fds = append(fds, unix.PollFd{Fd: int32(s.FD()), Events: unix.POLLIN})
	}
	fds = append(fds, unix.PollFd{Fd: int32(w.wake), Events: unix.POLLIN})
	wakeFd := &fds[len(fds)-1]
	var evbuf [8]byte
	txPubBuf := make([]xsk.Desc, 0, parkMax)
	var nextRetry int64
	var slowAddrs [1]uint64
	defer func() {
		w.finishAll()
		for _, f := range w.pipe.parked {
			pool.Put([]uint64{f.d.Addr})
		}
		w.pipe.parked = w.pipe.parked[:0]
	}()

	// Only the sockets owning their queue's rings move frames here; on
	// the others Refill is an atomic load.
	refill := func() error {
		for _, s := range w.socks {
			if _, err := s.Refill(pool, 0); err != nil {
				return fmt.Errorf("worker %d: %w", w.cfg.ID, err)
			}
		}
		return nil
	}
	if !w.waitRelease(ctx) {
		return nil
	}
	if err := refill(); err != nil {
		return err
	}
	idle := 0
	slow := newSlowKnob()
	t0 := time.Now() // the idle clock's origin: monotonic, wall-clock steps do not move it
	for {
		slow.start()
		w.drainCommands()
		got := 0
		for _, s := range w.pubRX {
			if n := s.Receive(rx); n > 0 {
				got += n
				tx, drop = w.pipe.decap(rx[:n], tx[:0], drop[:0])
				pool.Put(drop)
				w.transmit(priv, tx, &w.stats.Decap, pool)
				w.flushExtra(pub, priv, pool)
			}
		}
		if len(w.inject) > 0 {
			if n := w.injected(pool, rx, slowAddrs[:]); n > 0 {
				got += n
				tx, drop = w.pipe.decap(rx[:n], tx[:0], drop[:0])
				pool.Put(drop)
				w.transmit(priv, tx, &w.stats.Decap, pool)
				w.flushExtra(pub, priv, pool)
			}
		}
		for _, s := range w.privRX {
			if n := s.Receive(rx); n > 0 {
				got += n
				tx, drop = w.pipe.encap(rx[:n], tx[:0], drop[:0])
				pool.Put(drop)
				w.transmit(pub, tx, &w.stats.Encap, pool)
				w.flushExtra(pub, priv, pool)
			}
		}
		if len(w.pipe.parked) > 0 {
			if now := time.Now().UnixNano(); now >= nextRetry {
				nextRetry = now + int64(parkRetry)
				var txPub []xsk.Desc
				txPub, tx, drop = w.pipe.retryParked(now, txPubBuf[:0], tx[:0], drop[:0])
				pool.Put(drop)
				w.transmit(priv, tx, &w.stats.Decap, pool)
				w.transmit(pub, txPub, &w.stats.Encap, pool)
			}
		}
		for _, s := range w.socks {
			s.Complete(pool)
		}
		if err := refill(); err != nil {
			return err
		}
		// Copy mode sends at most the TX budget per kick: keep kicking
		// while frames wait.
		for _, s := range [2]*xsk.Socket{pub, priv} {
			if s.TxPending() > 0 {
				s.Kick()
			}
		}
		slow.after(got)
		w.pipe.tick(int64(time.Since(t0)))
		if got > 0 {
			idle = 0
			continue
		}
		if ctx.Err() != nil {
			return nil
		}
		if idle++; idle < w.cfg.Spin || len(w.pipe.parked) > 0 {
			continue
		}
		idle = 0
		w.stats.Polls.Add(1)
		_, err := unix.Poll(fds, int(w.cfg.IdleWait/time.Millisecond))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("worker %d: poll: %w", w.cfg.ID, err)
		}
		if wakeFd.Revents&unix.POLLIN != 0 {
			unix.Read(w.wake, evbuf[:])
		}
	}
}

// vlanTag is the 4-byte tag for vid (0: none): TPID (0x8100 when 0) and
// a TCI with priority 0.
func vlanTag(tpid, vid uint16) uint32 {
	if vid == 0 {
		return 0
	}
	if tpid == 0 {
		tpid = 0x8100
	}
	return uint32(tpid)<<16 | uint32(vid&0x0fff)
}

// flushExtra transmits what a batch made besides its own output: sealed
// frames for the public side (ICMP to phones, inner fragments) and ICMP
// errors back to the core.
func (w *Worker) flushExtra(pub, priv *xsk.Socket, pool *xsk.Pool) {
	if len(w.pipe.toPub) > 0 {
		w.transmit(pub, w.pipe.toPub, &w.stats.Encap, pool)
		w.pipe.toPub = w.pipe.toPub[:0]
	}
	if len(w.pipe.back) > 0 {
		w.transmit(priv, w.pipe.back, &w.stats.Decap, pool)
		w.pipe.back = w.pipe.back[:0]
	}
}

// transmit hands tx to s's TX ring and counts what it took; frames the
// ring cannot take are dropped (tx_full) rather than held, so a stalled
// peer never starves the fill rings.
func (w *Worker) transmit(s *xsk.Socket, tx []xsk.Desc, st *DirStats, pool *xsk.Pool) {
	for len(tx) > 0 {
		n, err := s.Transmit(tx)
		var bytes uint64
		for i := range tx[:n] {
			bytes += uint64(tx[i].Len)
		}
		st.Packets.Add(uint64(n))
		st.Bytes.Add(bytes)
		tx = tx[n:]
		if err != nil {
			// A descriptor the pipeline should never build: drop it alone.
			st.Drops[esp.ReasonInvalid].Add(1)
			pool.PutDescs(tx[:1])
			tx = tx[1:]
			continue
		}
		if len(tx) > 0 {
			st.Drops[DropTxFull].Add(uint64(len(tx)))
			pool.PutDescs(tx)
		}
		break
	}
	s.Kick()
}

// Set is the gateway's workers, indexed by worker number; it is what the
// manager sends commands through.
type Set []*Worker

// Send queues commands for worker w.
func (s Set) Send(ctx context.Context, w int, cmds []Command) error { return s[w].Send(ctx, cmds) }

// Sync waits until worker w has applied everything sent to it.
func (s Set) Sync(ctx context.Context, w int) error { return s[w].Sync(ctx) }

// Len is the number of workers.
func (s Set) Len() int { return len(s) }
