package manager

import (
	"context"
	"fmt"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
)

// InboundState is what a restarted gateway needs of an inbound SA that
// the BPF maps do not hold: its replay window.
type InboundState struct {
	ID     sa.ID
	Replay esp.ReplayState
}

// snapshotWant is an inbound SA SnapshotInbound asks its worker for.
type snapshotWant struct {
	id    sa.ID
	index uint32
	entry *worker.Entry
}

// SnapshotInbound copies every installed inbound SA's replay window. Each
// worker copies its own on its thread between two batches, so nothing
// races the data path. With stopped set the workers no longer run (their
// Run returned) and the windows are read directly.
func (m *Manager) SnapshotInbound(ctx context.Context, stopped bool) ([]InboundState, error) {
	m.mu.RLock()
	per := make(map[uint16][]snapshotWant)
	n := 0
	for id, s := range m.live {
		if s.entry.Dir == worker.Inbound {
			per[s.worker] = append(per[s.worker], snapshotWant{id, s.index, s.entry})
			n++
		}
	}
	m.mu.RUnlock()
	out := make([]InboundState, 0, n)
	if stopped {
		for _, ws := range per {
			for _, x := range ws {
				out = append(out, InboundState{ID: x.id, Replay: x.entry.SA.Replay().Export()})
			}
		}
		return out, nil
	}
	for w, all := range per {
		// In chunks, each its own command: the worker forwards a batch
		// between two, so exporting a million windows (~0.1 s) never
		// stalls it long enough to overflow its RX ring.
		for len(all) > 0 {
			ws := all[:min(len(all), snapshotChunk)]
			all = all[len(ws):]
			got, err := m.exportChunk(ctx, w, ws)
			if err != nil {
				return nil, err
			}
			out = append(out, got...)
		}
	}
	return out, nil
}

// snapshotChunk is how many windows one Visit exports: ~0.5 ms of the
// worker's time. A variable for tests.
var snapshotChunk = 4096

// exportChunk has worker w export the windows of ws on its thread.
func (m *Manager) exportChunk(ctx context.Context, w uint16, ws []snapshotWant) ([]InboundState, error) {
	got := make([]InboundState, 0, len(ws))
	visit := func(table []*worker.Entry) {
		for _, x := range ws {
			// Only the entry we listed: the slot may have been
			// reused since.
			if int(x.index) < len(table) && table[x.index] == x.entry {
				got = append(got, InboundState{ID: x.id, Replay: x.entry.SA.Replay().Export()})
			}
		}
	}
	done := make(chan struct{})
	if err := m.o.Workers.Send(ctx, int(w), []worker.Command{{Index: ^uint32(0), Visit: visit, Done: done}}); err != nil {
		return nil, fmt.Errorf("snapshot worker %d: %w", w, err)
	}
	select {
	case <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("snapshot worker %d: %w", w, ctx.Err())
	}
	return got, nil
}
