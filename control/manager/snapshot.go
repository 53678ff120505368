package manager

import (
	"context"
	"fmt"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
)

// Stopped returns an installed SA's counters and, for an inbound SA,
// its replay window read directly from its entry (nil for an outbound
// one); false when the SA is not installed. The workers must
// no longer run (their Run returned), as at shutdown or a hand-over.
// While they run, ExportChanged returns what changed. One lookup gives
// both: a stop's final snapshot asks it of every SA, a million at a
// carrier edge.
func (m *Manager) Stopped(id sa.ID) (SACounters, *esp.ReplayState, bool) {
	m.mu.RLock()
	s := m.live.get(id)
	m.mu.RUnlock()
	if s == nil {
		return SACounters{}, nil, false
	}
	var w *esp.ReplayState
	if s.entry.Dir == worker.Inbound {
		st := s.entry.SA.Replay().Export()
		w = &st
	}
	return countersOf(s), w, true
}

// Changed is an SA whose persisted state (package rxstate) changed since
// the previous ExportChanged: an inbound SA installed or that
// authenticated a packet since, with its window and counters as its
// worker exported them; an outbound SA that carried traffic since, with
// its counters.
type Changed struct {
	ID             sa.ID
	Replay         *esp.ReplayState // inbound only
	Packets, Bytes uint64
}

// ExportChanged returns the SAs whose state changed since the previous
// call, while the workers run. Each worker exports on its own thread,
// between two batches, only the SAs on its dirty list (installed or
// restored, or that authenticated or sealed a packet since its last
// export): inbound SAs with their windows, outbound ones with their
// counters. So a snapshot's cost is proportional to the SAs active in the
// interval, not to the SAs installed. The manager keeps no copy: the
// caller persists what it gets (an export is handed out once). One
// goroutine calls it at a time.
func (m *Manager) ExportChanged(ctx context.Context) ([]Changed, error) {
	var out []Changed
	for w := range m.slots {
		// In chunks, each its own command: the worker forwards a batch
		// between two, so exporting a million windows (~0.1 s) never
		// stalls it long enough to overflow its RX ring.
		for {
			n, err := m.exportDirty(ctx, uint16(w), &out)
			if err != nil {
				return out, err
			}
			if n < worker.DirtyChunk {
				break
			}
		}
	}
	return out, nil
}

// exportDirty has worker w export the windows on its dirty list (one
// chunk) and appends those of entries still installed to out. It returns
// how many slots the worker listed.
func (m *Manager) exportDirty(ctx context.Context, w uint16, out *[]Changed) (int, error) {
	type exported struct {
		index   uint32
		entry   *worker.Slot
		state   esp.ReplayState
		window  bool // inbound: state holds its replay window
		packets uint64
		bytes   uint64
	}
	var got []exported
	listed := 0
	dirty := func(table []*worker.Slot, slots []uint32) {
		listed = len(slots)
		got = make([]exported, 0, len(slots))
		for _, i := range slots {
			if int(i) >= len(table) || table[i] == nil {
				continue
			}
			e := table[i]
			x := exported{index: i, entry: e, packets: e.Counters.Packets.Load(), bytes: e.Counters.Bytes.Load()}
			if e.Dir == worker.Inbound {
				x.state, x.window = e.SA.Replay().Export(), true
			}
			got = append(got, x)
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
	m.mu.RLock()
	ws := m.slots[w]
	for i := range got {
		x := &got[i]
		// Only the entry the slot still holds: it may have been reused.
		if int(x.index) < len(ws) && ws[x.index] != nil && ws[x.index].entry == x.entry {
			c := Changed{ID: ws[x.index].id(), Packets: x.packets, Bytes: x.bytes}
			if x.window {
				c.Replay = &x.state
			}
			*out = append(*out, c)
		}
	}
	m.mu.RUnlock()
	return listed, nil
}
