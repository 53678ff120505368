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

// snapshotWant is an inbound SA SnapshotInbound reads directly from its
// entry (workers stopped).
type snapshotWant struct {
	id    sa.ID
	entry *worker.Slot
}

// SnapshotInbound returns every installed inbound SA's replay window.
// While the workers run, each worker exports on its own thread, between
// two batches, only the windows that changed since its last export (its
// dirty list: SAs installed or that authenticated a packet since); the
// manager keeps the last export of each SA in its slot and returns those
// for the rest. So the workers' share of a snapshot is proportional to
// the SAs active in the interval, not to the SAs installed. With stopped
// set the workers no longer run (their Run returned) and the windows are
// read directly.
func (m *Manager) SnapshotInbound(ctx context.Context, stopped bool) ([]InboundState, error) {
	if stopped {
		m.mu.RLock()
		var ws []snapshotWant
		for s := range m.live.all() {
			if s.entry.Dir == worker.Inbound {
				ws = append(ws, snapshotWant{s.id(), s.entry})
			}
		}
		m.mu.RUnlock()
		out := make([]InboundState, 0, len(ws))
		for _, x := range ws {
			out = append(out, InboundState{ID: x.id, Replay: x.entry.SA.Replay().Export()})
		}
		return out, nil
	}
	for w := range m.slots {
		// In chunks, each its own command: the worker forwards a batch
		// between two, so exporting a million windows (~0.1 s) never
		// stalls it long enough to overflow its RX ring.
		for {
			n, err := m.exportDirty(ctx, uint16(w))
			if err != nil {
				return nil, err
			}
			if n < worker.DirtyChunk {
				break
			}
		}
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]InboundState, 0, len(m.live.in))
	for s := range m.live.all() {
		if s.entry.Dir == worker.Inbound && s.snap != nil {
			out = append(out, InboundState{ID: s.id(), Replay: *s.snap})
		}
	}
	return out, nil
}

// exported is one window a worker exported.
type exported struct {
	index uint32
	entry *worker.Slot
	state esp.ReplayState
}

// exportDirty has worker w export the windows on its dirty list (one
// chunk) and files them in their slots. It returns how many slots the
// worker listed.
func (m *Manager) exportDirty(ctx context.Context, w uint16) (int, error) {
	var got []exported
	listed := 0
	dirty := func(table []*worker.Slot, slots []uint32) {
		listed = len(slots)
		got = make([]exported, 0, len(slots))
		for _, i := range slots {
			if int(i) < len(table) && table[i] != nil && table[i].Dir == worker.Inbound {
				got = append(got, exported{i, table[i], table[i].SA.Replay().Export()})
			}
		}
	}
	done := make(chan struct{})
	if err := m.o.Workers.Send(ctx, int(w), []worker.Command{{Index: ^uint32(0), Dirty: dirty, Done: done}}); err != nil {
		return 0, fmt.Errorf("snapshot worker %d: %w", w, err)
	}
	select {
	case <-done:
	case <-ctx.Done():
		return 0, fmt.Errorf("snapshot worker %d: %w", w, ctx.Err())
	}
	m.mu.Lock()
	ws := m.slots[w]
	for _, x := range got {
		// Only the entry the slot still holds: it may have been reused.
		if int(x.index) < len(ws) && ws[x.index] != nil && ws[x.index].entry == x.entry {
			ws[x.index].snap = &x.state
		}
	}
	m.mu.Unlock()
	return listed, nil
}
