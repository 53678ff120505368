package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/fdpass"
	"github.com/xesp/xesp/internal/instlock"
	"golang.org/x/sys/unix"
)

// Handover is what a running gateway gives its successor process in a
// hitless upgrade (docs/operations.md "Upgrades and restarts"). It
// travels as JSON with its descriptors passed alongside (SCM_RIGHTS), in
// this order: the state_dir lock, the pin_dir lock, the UMEM's memfd,
// the AF_XDP sockets in handoverIndex order, then, with RxStateFD, the
// replay-window snapshot's memfd. The pinned maps and links are adopted
// from bpffs as in any restart.
type Handover struct {
	PID      int // the handing-over daemon
	Workers  int
	Public   string // interface names, which the successor's config must keep
	Private  string
	StateDir string
	PinDir   string
	// RXQueues is how many RX queues of the public and the private
	// interface the sockets serve. Zero: an exporter that predates the
	// field, which served one queue per side.
	RXQueues [2]int
	UMEM     xsk.Handover
	// RxState is the clean replay-window and binding snapshot taken with
	// the workers stopped (rxstate.Encode), used instead of state_dir's
	// copy. It travels inline only to a successor that cannot take it
	// as a descriptor (Shape.StateFD): at ~170 bytes of JSON per SA it
	// outgrows the socket message's 64 MiB near 400k SAs. Otherwise
	// RxStateFD is set and the bytes are in the last descriptor, a sealed
	// memfd. The outbound sequence reservations are the seqstore's: the
	// successor reserves its first block above everything this daemon
	// reserved, so no (SPI, sequence number) pair is ever sent twice.
	RxState   []byte `json:",omitempty"`
	RxStateFD bool   `json:",omitempty"`
	// Neighbors are the next hops the old daemon had resolved, for the
	// successor to resolve before its workers read the queued packets.
	Neighbors []netip.Addr
}

// Upgrade is a received hand-over: Start continues from it instead of
// building a data path from scratch. Start owns FDs from then on, also
// when it fails.
type Upgrade struct {
	Handover Handover
	FDs      []int
}

func (u *Upgrade) closeFDs() {
	for _, fd := range u.FDs {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	u.FDs = nil
}

// Shape is what a hand-over cannot change: the successor's
// configuration must agree with the running data path on all of it.
// Zero UMEM sizes mean "whatever runs".
type Shape struct {
	Workers                           int
	Public, Private, StateDir, PinDir string
	UMEM                              config.UMEM
	// RXQueues is how many RX queues the successor finds on the public
	// and the private interface; the hand-over carries a socket per
	// worker on each, so they must be the ones the running daemon
	// serves. Zero: a successor that predates the field, which can take
	// over one queue per side only.
	RXQueues [2]int
	// StateFD says the successor takes the replay-window snapshot as a
	// descriptor (Handover.RxStateFD). One that predates it takes it
	// inline, which bounds the SAs it can take over.
	StateFD bool
}

// ShapeOf is cfg's shape without the interfaces' queue counts.
func ShapeOf(cfg *config.Config) Shape {
	return Shape{Workers: cfg.Workers, Public: cfg.Public.Interface, Private: cfg.Private.Interface,
		StateDir: cfg.StateDir, PinDir: cfg.PinDir, UMEM: cfg.UMEM}
}

// SuccessorShape is cfg's shape with the RX queue counts of its
// interfaces as this process sees them, and what it can take: what a
// successor sends with its request.
func SuccessorShape(cfg *config.Config) (Shape, error) {
	s := ShapeOf(cfg)
	s.StateFD = true
	for i, f := range []struct{ field, name string }{{"public.interface", cfg.Public.Interface}, {"private.interface", cfg.Private.Interface}} {
		ifi, err := interfaceByName(f.field, f.name)
		if err != nil {
			return Shape{}, err
		}
		if s.RXQueues[i], err = rxQueues(ifi.Name); err != nil {
			return Shape{}, err
		}
	}
	return s, nil
}

// compareQueues says what differs between the RX queues a successor
// finds (next) and those the running daemon's sockets serve.
func compareQueues(next, running [2]int, pid int) error {
	if next == [2]int{} {
		if running == [2]int{1, 1} {
			return nil
		}
		return fmt.Errorf("upgrade: the new daemon does not say how many RX queues it serves (it is an older xesp than the running daemon, pid %d); a hand-over of %d public and %d private RX queues needs one that does: upgrade by stop and start", pid, running[0], running[1])
	}
	for i, side := range []string{"public", "private"} {
		if next[i] != running[i] {
			return fmt.Errorf("upgrade: %s.interface has %d RX queues now and the running daemon (pid %d) serves %d (the queue count changed since it started, ethtool -L): stop and start to serve the new count", side, next[i], pid, running[i])
		}
	}
	return nil
}

func (h *Handover) shape() Shape {
	c := h.UMEM.Config
	return Shape{Workers: h.Workers, Public: h.Public, Private: h.Private, StateDir: h.StateDir, PinDir: h.PinDir,
		// FillRing 0: the running fill ring is the configured one capped
		// per queue (fillRingFor); CheckSuccessor compared the configured
		// values before anything stopped.
		UMEM: config.UMEM{Frames: int(c.FrameCount), FrameSize: int(c.FrameSize),
			CompletionRing: int(c.CompletionSize), RXRing: int(c.RxSize), TXRing: int(c.TxSize)}}
}

// compare says in one line what next changes from running (the data
// path of pid) that a hand-over cannot carry over.
func (next Shape) compare(running Shape, pid int) error {
	keep := "a hand-over keeps the running data path's; change it with a stop and start instead"
	for _, c := range []struct {
		field       string
		next, runng any
	}{
		{"workers", next.Workers, running.Workers}, {"public.interface", next.Public, running.Public},
		{"private.interface", next.Private, running.Private}, {"state_dir", next.StateDir, running.StateDir},
		{"pin_dir", next.PinDir, running.PinDir},
	} {
		if c.next != c.runng {
			return fmt.Errorf("config: %s: %v in the new daemon's config, %v in the running daemon (pid %d): %s", c.field, c.next, c.runng, pid, keep)
		}
	}
	for _, c := range []struct {
		field       string
		next, runng int
	}{
		{"umem.frame_size", next.UMEM.FrameSize, running.UMEM.FrameSize}, {"umem.frames", next.UMEM.Frames, running.UMEM.Frames},
		{"umem.fill_ring", next.UMEM.FillRing, running.UMEM.FillRing}, {"umem.completion_ring", next.UMEM.CompletionRing, running.UMEM.CompletionRing},
		{"umem.rx_ring", next.UMEM.RXRing, running.UMEM.RXRing}, {"umem.tx_ring", next.UMEM.TXRing, running.UMEM.TXRing},
	} {
		if c.next != 0 && c.runng != 0 && c.next != c.runng {
			return fmt.Errorf("config: %s: %d in the new daemon's config, %d in the running daemon (pid %d): %s", c.field, c.next, c.runng, pid, keep)
		}
	}
	return nil
}

// CheckSuccessor tells a would-be successor, before anything stops, what
// in its configuration a hand-over cannot carry over, or that this
// daemon cannot hand over at all.
func (g *Gateway) CheckSuccessor(next Shape) error {
	if err := g.canHandOver(); err != nil {
		return err
	}
	c := g.UMEM.Config()
	running := ShapeOf(g.Config)
	// The fill ring as configured: the running UMEM's is that capped to
	// a share of the frames per queue (fillRingFor), and the successor
	// adopts the running UMEM's sizes whatever its config says.
	running.UMEM = config.UMEM{Frames: int(c.FrameCount), FrameSize: int(c.FrameSize), FillRing: g.Config.UMEM.FillRing,
		CompletionRing: int(c.CompletionSize), RXRing: int(c.RxSize), TXRing: int(c.TxSize)}
	if err := next.compare(running, os.Getpid()); err != nil {
		return err
	}
	if err := compareQueues(next.RXQueues, g.rxQueues(), os.Getpid()); err != nil {
		return err
	}
	if !next.StateFD {
		// The snapshot would travel inline: refuse, while everything
		// still runs, what would not fit the message. The state files'
		// sizes stand in for it (the base is the snapshot's encoding,
		// the journal what changed since: together at least as large).
		var n int64
		for _, f := range []string{rxStateFile, rxstate.JournalPath(rxStateFile)} {
			if st, err := os.Stat(filepath.Join(g.Config.StateDir, f)); err == nil {
				n += st.Size()
			}
		}
		in, out := g.SAD.Len()
		if inline := n * 4 / 3; inline > inlineStateMax {
			return fmt.Errorf("upgrade: the new daemon takes the replay state inline (an older xesp), and this daemon's %d SAs need about %d MiB of it, more than the %d MiB it can receive: upgrade by stop and start", in+out, inline>>20, inlineStateMax>>20)
		}
	}
	return nil
}

// inlineStateMax is how much inline replay state (base64 in the JSON) a
// successor that takes it so is sent at most: the message limit less room
// for the rest of the hand-over (the UMEM's free list above all).
const inlineStateMax = fdpass.MaxMessage - 16<<20

func (g *Gateway) canHandOver() error {
	if g.Loader == nil || g.Loader.PinLock() == nil || g.stateLock == nil || g.Started.IsZero() {
		return errors.New("upgrade: the running daemon has no pinned maps (pin_dir): nothing can be handed over")
	}
	return nil
}

// rxQueues is how many RX queues of each side the sockets serve.
func (g *Gateway) rxQueues() [2]int {
	var n [2]int
	for _, s := range g.RX {
		if s.Private {
			n[1]++
		} else {
			n[0]++
		}
	}
	w := max(len(g.Workers), 1)
	return [2]int{n[0] / w, n[1] / w}
}

// handoverIndex is where worker w's socket on RX queue q of side (0
// public, 1 private) travels among a hand-over's sockets: worker by
// worker, each worker's public sockets by queue, then its private ones.
// With one queue per side that is worker 0's public and private socket,
// then worker 1's: the order of the exporters that served one queue, so
// a hand-over of one queue per side goes both ways between versions.
func handoverIndex(w, side, q int, queues [2]int) int {
	i := w*(queues[0]+queues[1]) + q
	if side == 1 {
		i += queues[0]
	}
	return i
}

// check repeats the comparison on what actually arrived.
func (u *Upgrade) check(cfg *config.Config) error {
	h := &u.Handover
	q := u.queues()
	extra := 0
	if h.RxStateFD {
		extra = 1
	}
	if n := h.Workers * (q[0] + q[1]); len(u.FDs) != 3+n+extra || len(h.UMEM.Sockets) != n {
		return fmt.Errorf("upgrade: %d descriptors and %d sockets for %d workers on %d+%d RX queues: not a hand-over from this xesp version", len(u.FDs), len(h.UMEM.Sockets), h.Workers, q[0], q[1])
	}
	return ShapeOf(cfg).compare(h.shape(), h.PID)
}

// queues is how many RX queues per side the handed-over sockets serve.
func (u *Upgrade) queues() [2]int {
	if q := u.Handover.RXQueues; q != [2]int{} {
		return q
	}
	return [2]int{1, 1}
}

// locks takes over the two instance locks: an flock belongs to the open
// file, which the passed descriptors share, so they are held without a
// gap. The state_dir lock file then names this process.
func (u *Upgrade) locks(cfg *config.Config) (state, pin *instlock.Lock, err error) {
	state = instlock.Adopt(os.NewFile(uintptr(u.FDs[0]), filepath.Join(cfg.StateDir, instlock.FileName)), "state_dir", cfg.StateDir)
	pin = instlock.Adopt(os.NewFile(uintptr(u.FDs[1]), cfg.PinDir), "pin_dir", cfg.PinDir)
	u.FDs[0], u.FDs[1] = -1, -1
	if err := state.WritePID(os.Getpid()); err != nil {
		return state, pin, err
	}
	return state, pin, nil
}

// adoptUMEM continues the UMEM and sockets; the descriptors are Adopt's
// from here.
func (u *Upgrade) adoptUMEM() (*xsk.UMEM, []*xsk.Socket, error) {
	memfd, socks := u.FDs[2], append([]int(nil), u.FDs[3:3+len(u.Handover.UMEM.Sockets)]...)
	for i := 2; i < 3+len(socks); i++ {
		u.FDs[i] = -1
	}
	return xsk.Adopt(u.Handover.UMEM, memfd, socks)
}

// rxState is the handed-over replay-window snapshot, from the memfd
// (which it closes) or inline.
func (u *Upgrade) rxState() (*rxstate.Snapshot, error) {
	if !u.Handover.RxStateFD {
		return rxstate.Decode(u.Handover.RxState)
	}
	last := len(u.FDs) - 1
	fd := u.FDs[last]
	u.FDs[last] = -1
	s, err := readHandedState(fd)
	if err != nil {
		return nil, fmt.Errorf("handed-over replay windows: %w", err)
	}
	return s, nil
}

// HandOver stops the workers at a batch boundary (every frame they held
// goes back to the free list; what the kernel holds stays on the rings)
// and prepares the hand-over: a clean snapshot of the replay windows and
// bindings (written to state_dir by AbortHandOver if the hand-over
// fails, so a plain start can replace the successor), the SAs added
// through the API flushed, the sequence store and the slow path's socket
// closed so the successor can open them. The XSK map slots keep pointing
// at the same sockets: packets arriving meanwhile wait on their RX rings.
//
// Then send the Handover with the descriptors (owned by the gateway:
// send them, never close them) and call FinishHandOver once the successor
// runs, or AbortHandOver if it failed.
func (g *Gateway) HandOver(ctx context.Context, next Shape) (*Handover, []int, error) {
	if err := g.canHandOver(); err != nil {
		return nil, nil, err
	}
	g.cancel()
	g.wg.Wait()
	snap, err := g.snapshotState(ctx, true)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade: snapshot replay windows: %w", err)
	}
	rx, err := rxstate.Encode(snap)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade: encode replay windows: %w", err)
	}
	// Not written to state_dir here: at a million SAs that is seconds
	// of the gap the RX rings must bridge. The successor persists its
	// own; a crash meanwhile restores from the last periodic snapshot
	// as any crash does, and a failed hand-over writes this one
	// (AbortHandOver).
	g.handoverSnap = snap
	if err := g.apiSAs.flush(g.SAD.Version()); err != nil {
		return nil, nil, fmt.Errorf("upgrade: %w", err)
	}
	// From here teardown must not snapshot again: the store is closed.
	g.Started = time.Time{}
	g.apiSAs.close()
	g.apiSAs = nil
	g.SlowPath.Close()
	g.SlowPath = nil
	if err := g.Seq.Close(); err != nil {
		return nil, nil, fmt.Errorf("upgrade: close sequence store: %w", err)
	}
	g.Seq = nil
	queues := g.rxQueues()
	socks := make([]*xsk.Socket, len(g.RX))
	for _, s := range g.RX {
		side := 0
		if s.Private {
			side = 1
		}
		socks[handoverIndex(s.Worker, side, s.Queue, queues)] = s.XSK
	}
	uh, ufds, err := g.UMEM.Export(socks)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade: %w", err)
	}
	cfg := g.Config
	h := &Handover{PID: os.Getpid(), Workers: cfg.Workers, Public: cfg.Public.Interface, Private: cfg.Private.Interface,
		StateDir: cfg.StateDir, PinDir: cfg.PinDir, RXQueues: queues, UMEM: uh, Neighbors: g.Neighbors.Resolved()}
	fds := append([]int{int(g.stateLock.File().Fd()), int(g.Loader.PinLock().File().Fd())}, ufds...)
	if !next.StateFD {
		h.RxState = rx
		return h, fds, nil
	}
	if g.handoverState, err = sealedMemfd("xesp-rxstate", rx); err != nil {
		return nil, nil, fmt.Errorf("upgrade: replay windows: %w", err)
	}
	h.RxStateFD = true
	return h, append(fds, g.handoverState), nil
}

// sealedMemfd is a memfd holding b, sealed against any change: the
// successor reads exactly what was written.
func sealedMemfd(name string, b []byte) (int, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, fmt.Errorf("memfd_create: %w", err)
	}
	for off := 0; off < len(b); {
		n, err := unix.Write(fd, b[off:])
		if err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("write memfd: %w", err)
		}
		off += n
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("seal memfd: %w", err)
	}
	return fd, nil
}

// readHandedState reads the replay-window snapshot from the handed-over
// memfd, which it closes.
func readHandedState(fd int) (*rxstate.Snapshot, error) {
	f := os.NewFile(uintptr(fd), "handed-over replay windows")
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > rxstate.MaxSize {
		return nil, fmt.Errorf("%d bytes, at most %d", st.Size(), rxstate.MaxSize)
	}
	// At offset 0: the exporter's writes left the shared offset at the
	// end.
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, err
	}
	return rxstate.Decode(b)
}

// AbortHandOver stops this gateway after a hand-over whose successor
// failed, keeping the XDP programs attached and pinned: the successor may
// have served the rings for a while, so their positions are taken back
// from the rings first.
func (g *Gateway) AbortHandOver() error {
	g.closeHandoverState()
	var saveErr error
	if s := g.handoverSnap; s != nil {
		// The successor may have accepted packets before it gave up,
		// which this snapshot does not know: saved as not clean, the
		// next start trusts each window only up to its top, as after a
		// crash.
		s.Clean = false
		if err := rxstate.Save(filepath.Join(g.Config.StateDir, rxStateFile), s); err != nil {
			saveErr = fmt.Errorf("upgrade: save the replay windows for the next start: %w", err)
		}
		g.handoverSnap = nil
	}
	if g.UMEM != nil {
		g.UMEM.Reclaim()
	}
	return errors.Join(saveErr, g.Stop(true))
}

func (g *Gateway) closeHandoverState() {
	if g.handoverState > 0 {
		unix.Close(g.handoverState)
		g.handoverState = 0
	}
}

// FinishHandOver ends this gateway after its successor took over: it
// releases this process's handles (mappings, descriptors, the locks'
// files) without unsteering, unbinding, detaching or draining anything
// the successor now uses. Stop is a no-op afterwards.
func (g *Gateway) FinishHandOver() {
	g.closeHandoverState()
	g.handoverSnap = nil
	g.once.Do(func() {
		for _, w := range g.Workers {
			w.Close()
		}
		g.UMEM.Abandon()
		if g.Neighbors != nil {
			g.Neighbors.Close()
		}
		if g.Etcd != nil {
			g.Etcd.Close()
		}
		g.Loader.Close() // pinned links stay attached
		g.stateLock.Release()
	})
}
