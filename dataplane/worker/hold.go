package worker

import (
	"context"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A worker started with Config.Held applies commands (so the manager can
// install every SA and Sync returns) but neither refills nor receives
// until Release. A hitless upgrade needs this: the handed-over RX rings
// already hold packets, and a worker that read them before its SAs were
// installed would drop them as no_sa.

// holdFlag is set while a held worker waits for Release.
type holdFlag struct{ atomic.Bool }

// Release lets a held worker start serving its sockets.
func (w *Worker) Release() {
	w.held.Store(false)
	w.poke()
}

// waitRelease applies commands until Release or the end of ctx; it
// reports whether the worker may go on serving.
func (w *Worker) waitRelease(ctx context.Context) bool {
	fds := []unix.PollFd{{Fd: int32(w.wake), Events: unix.POLLIN}}
	var buf [8]byte
	for w.held.Load() {
		w.drainCommands()
		if ctx.Err() != nil {
			return false
		}
		if !w.held.Load() {
			break
		}
		// The eventfd wakes it for commands, Release and shutdown; the
		// timeout only bounds a missed wake-up.
		if _, err := unix.Poll(fds, 100); err == nil && fds[0].Revents&unix.POLLIN != 0 {
			unix.Read(w.wake, buf[:])
		}
	}
	w.drainCommands()
	return ctx.Err() == nil
}
