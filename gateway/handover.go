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
	"github.com/xesp/xesp/internal/instlock"
	"golang.org/x/sys/unix"
)

// Handover is what a running gateway gives its successor process in a
// hitless upgrade (docs/operations.md "Upgrades and restarts"). It
// travels as JSON with its descriptors passed alongside (SCM_RIGHTS), in
// this order: the state_dir lock, the pin_dir lock, the UMEM's memfd,
// then every worker's public and private AF_XDP socket (worker 0 first).
// The pinned maps and links are adopted from bpffs as in any restart.
type Handover struct {
	PID      int // the handing-over daemon
	Workers  int
	Public   string // interface names, which the successor's config must keep
	Private  string
	StateDir string
	PinDir   string
	UMEM     xsk.Handover
	// RxState is the clean replay-window and binding snapshot taken with
	// the workers stopped (rxstate.Encode), used instead of state_dir's
	// copy. The outbound sequence reservations are the seqstore's: the
	// successor reserves its first block above everything this daemon
	// reserved, so no (SPI, sequence number) pair is ever sent twice.
	RxState []byte
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
}

// ShapeOf is cfg's shape, as a successor sends it with its request.
func ShapeOf(cfg *config.Config) Shape {
	return Shape{Workers: cfg.Workers, Public: cfg.Public.Interface, Private: cfg.Private.Interface,
		StateDir: cfg.StateDir, PinDir: cfg.PinDir, UMEM: cfg.UMEM}
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
	return next.compare(running, os.Getpid())
}

func (g *Gateway) canHandOver() error {
	if g.Loader == nil || g.Loader.PinLock() == nil || g.stateLock == nil || g.Started.IsZero() {
		return errors.New("upgrade: the running daemon has no pinned maps (pin_dir): nothing can be handed over")
	}
	if len(g.RX) != 2*len(g.Sockets) {
		return fmt.Errorf("upgrade: the running daemon serves %d AF_XDP sockets for %d workers (several RX queues); a hand-over carries one RX queue per side: stop and start instead", len(g.RX), len(g.Sockets))
	}
	return nil
}

// check repeats the comparison on what actually arrived.
func (u *Upgrade) check(cfg *config.Config) error {
	h := &u.Handover
	if want := 3 + 2*h.Workers; len(u.FDs) != want || len(h.UMEM.Sockets) != 2*h.Workers {
		return fmt.Errorf("upgrade: %d descriptors and %d sockets for %d workers: not a hand-over from this xesp version", len(u.FDs), len(h.UMEM.Sockets), h.Workers)
	}
	return ShapeOf(cfg).compare(h.shape(), h.PID)
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
	memfd, socks := u.FDs[2], append([]int(nil), u.FDs[3:]...)
	u.FDs = nil
	return xsk.Adopt(u.Handover.UMEM, memfd, socks)
}

// HandOver stops the workers at a batch boundary (every frame they held
// goes back to the free list; what the kernel holds stays on the rings)
// and prepares the hand-over: a clean snapshot of the replay windows and
// bindings (also written to state_dir, so a failed successor can be
// replaced by a plain start), the SAs added through the API flushed, the
// sequence store and the slow path's socket closed so the successor can
// open them. The XSK map slots keep pointing at the same sockets:
// packets arriving meanwhile wait on their RX rings.
//
// Then send the Handover with the descriptors (owned by the gateway:
// send them, never close them) and call FinishHandOver once the successor
// runs, or Stop(true) if it failed.
func (g *Gateway) HandOver(ctx context.Context) (*Handover, []int, error) {
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
	if err := rxstate.Save(filepath.Join(g.Config.StateDir, rxStateFile), snap); err != nil {
		return nil, nil, fmt.Errorf("upgrade: %w", err)
	}
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
	var socks []*xsk.Socket
	for _, s := range g.Sockets {
		socks = append(socks, s[0], s[1])
	}
	uh, ufds, err := g.UMEM.Export(socks)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade: %w", err)
	}
	cfg := g.Config
	h := &Handover{PID: os.Getpid(), Workers: cfg.Workers, Public: cfg.Public.Interface, Private: cfg.Private.Interface,
		StateDir: cfg.StateDir, PinDir: cfg.PinDir, UMEM: uh, RxState: rx, Neighbors: g.Neighbors.Resolved()}
	fds := append([]int{int(g.stateLock.File().Fd()), int(g.Loader.PinLock().File().Fd())}, ufds...)
	return h, fds, nil
}

// AbortHandOver stops this gateway after a hand-over whose successor
// failed, keeping the XDP programs attached and pinned: the successor may
// have served the rings for a while, so their positions are taken back
// from the rings first.
func (g *Gateway) AbortHandOver() error {
	if g.UMEM != nil {
		g.UMEM.Reclaim()
	}
	return g.Stop(true)
}

// FinishHandOver ends this gateway after its successor took over: it
// releases this process's handles (mappings, descriptors, the locks'
// files) without unsteering, unbinding, detaching or draining anything
// the successor now uses. Stop is a no-op afterwards.
func (g *Gateway) FinishHandOver() {
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
