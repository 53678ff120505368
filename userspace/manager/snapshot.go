package manager

import (
	"context"
	"fmt"

	"github.com/xesp/xesp/userspace/esp"
	"github.com/xesp/xesp/userspace/sa"
	"github.com/xesp/xesp/userspace/worker"
)

// InboundState is what a restarted gateway needs of an inbound SA that
// the BPF maps do not hold: its replay window.
type InboundState struct {
	ID     sa.ID
	Replay esp.ReplayState
}

// SnapshotInbound copies every installed inbound SA's replay window. Each
// worker copies its own on its thread between two batches, so nothing
// races the data path. With stopped set the workers no longer run (their
// Run returned) and the windows are read directly.
func (m *Manager) SnapshotInbound(ctx context.Context, stopped bool) ([]InboundState, error) {
	type want struct {
		id    sa.ID
		index uint32
		entry *worker.Entry
	}
	m.mu.RLock()
	per := make(map[uint16][]want)
	n := 0
	for id, s := range m.live {
		if s.entry.Dir == worker.Inbound {
			per[s.worker] = append(per[s.worker], want{id, s.index, s.entry})
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
	for w, ws := range per {
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
		out = append(out, got...)
	}
	return out, nil
}
