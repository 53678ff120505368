package gateway

import (
	"context"
	"net/netip"
	"path/filepath"
	"sync"
	"time"

	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
)

// rxStateFile is the replay-window and binding snapshot in state_dir.
const rxStateFile = "rx.state"

// DefaultStateInterval is how often the replay windows and bindings are
// snapshotted while running.
const DefaultStateInterval = time.Second

// Restored says what Start took over from the previous run's snapshot.
type Restored struct {
	Clean    bool // the snapshot was written at a clean shutdown
	Windows  int  // inbound replay windows restored
	Bindings int  // NAT bindings restored
	Counters int  // SAs whose counters and lifetime start were restored
	APISAs   int  // SAs added through the API in earlier runs (state_dir/api-sas)
	// StaleSAs and StalePolicies are the entries of adopted BPF maps
	// that no SA of this run published (removed at start).
	StaleSAs, StalePolicies int
	// Neighbors counts the next hops resolved before a hand-over start
	// let its workers read.
	Neighbors int
}

// restorer hands the previous run's state to SAs as they are installed.
type restorer struct {
	seq     *seqstore.Store
	clean   bool
	mu      sync.Mutex
	byKey   map[seqstore.Key]*rxstate.Record
	windows int
	counted int
	// born is when each SA continued from the snapshot was first created:
	// its lifetime counts from there, in this run and the next.
	born map[sa.ID]time.Time
}

func newRestorer(seq *seqstore.Store, s *rxstate.Snapshot) *restorer {
	r := &restorer{seq: seq, clean: s.Clean, byKey: make(map[seqstore.Key]*rxstate.Record, len(s.Records)),
		born: make(map[sa.ID]time.Time)}
	for i := range s.Records {
		r.byKey[s.Records[i].Key] = &s.Records[i]
	}
	return r
}

func stateKey(seq *seqstore.Store, id sa.ID, s *sa.SA) seqstore.Key {
	return seq.KeyFor("rx/"+id.Dir.String(), s.SPI, id.Peer, s.Proposal.String(), s.EncKey, s.AuthKey)
}

// entry is the manager's Restore: the first install of an SA continues
// the counters (lifetime) and, inbound, the replay window it had when the
// snapshot was taken.
func (r *restorer) entry(id sa.ID, s *sa.SA, e *worker.Slot) {
	r.mu.Lock()
	empty := len(r.byKey) == 0
	r.mu.Unlock()
	if empty {
		// A first start, or every record handed out: no key to derive
		// (an HMAC per SA, a million of them at a large start).
		return
	}
	k := stateKey(r.seq, id, s)
	r.mu.Lock()
	defer r.mu.Unlock()
	rec := r.byKey[k]
	if rec == nil {
		return
	}
	delete(r.byKey, k) // once: later installs of this SA inherit their own state
	e.Counters.Packets.Store(rec.Packets)
	e.Counters.Bytes.Store(rec.Bytes)
	if rec.Created != 0 {
		r.born[id] = time.Unix(0, rec.Created)
	}
	r.counted++
	if rec.Replay == nil || e.Dir != worker.Inbound {
		return
	}
	st := *rec.Replay
	if !r.clean {
		rxstate.Distrust(&st)
	}
	if e.SA.Replay().Import(st) == nil {
		r.windows++
	}
}

// since is when the SA id was first created, if it continues a previous
// run's SA.
func (r *restorer) since(id sa.ID) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.born[id]
}

// bindings moves every SA in d whose snapshot has a binding to it.
func (r *restorer) bindings(d *sad.SAD) int {
	r.mu.Lock()
	some := false
	for _, rec := range r.byKey {
		if rec.Binding.IsValid() {
			some = true
			break
		}
	}
	r.mu.Unlock()
	if !some {
		return 0 // no binding to restore: no key to derive per SA
	}
	n := 0
	var page []sad.Record
	var cur uint64
	for {
		page, cur = d.List(cur, 4096, page[:0])
		for i := range page {
			e := &page[i]
			r.mu.Lock()
			rec := r.byKey[stateKey(r.seq, e.ID, &e.SA)]
			r.mu.Unlock()
			if rec != nil && rec.Binding.IsValid() && rec.Binding != e.Binding {
				if c, err := d.SetBinding(e.ID, rec.Binding); err == nil && c > 0 {
					n++
				}
			}
		}
		if cur == 0 {
			return n
		}
	}
}

// saveState snapshots every inbound SA's replay window and every SA's
// binding. stopped says the workers are no longer running (shutdown):
// the snapshot is then exact and marked clean.
func (g *Gateway) saveState(ctx context.Context, stopped bool) error {
	snap, err := g.snapshotState(ctx, stopped)
	if err != nil {
		return err
	}
	return rxstate.Save(filepath.Join(g.Config.StateDir, rxStateFile), snap)
}

// snapshotState collects what saveState writes.
func (g *Gateway) snapshotState(ctx context.Context, stopped bool) (*rxstate.Snapshot, error) {
	states, err := g.Manager.SnapshotInbound(ctx, stopped)
	if err != nil {
		return nil, err
	}
	windows := make(map[sa.ID]*esp.ReplayState, len(states))
	for i := range states {
		windows[states[i].ID] = &states[i].Replay
	}
	in, out := g.SAD.Len()
	// Sized up front: append's doubling left up to half of a
	// million-SA slice as garbage every snapshot interval.
	snap := &rxstate.Snapshot{Clean: stopped, Records: make([]rxstate.Record, 0, in+out)}
	var page []sad.Record
	var cur uint64
	for {
		page, cur = g.SAD.List(cur, 4096, page[:0])
		for i := range page {
			e := &page[i]
			rec := rxstate.Record{Key: stateKey(g.Seq, e.ID, &e.SA), Replay: windows[e.ID], Created: e.Created.UnixNano()}
			if b := g.rest.since(e.ID); !b.IsZero() && b.Before(e.Created) {
				rec.Created = b.UnixNano()
			}
			if e.Binding.IsValid() && e.Binding != configuredBinding(&e.SA) {
				rec.Binding = e.Binding
			}
			if c, ok := g.Manager.Counters(e.ID); ok {
				rec.Packets, rec.Bytes = c.Packets, c.Bytes
			}
			snap.Records = append(snap.Records, rec)
		}
		if cur == 0 {
			break
		}
	}
	return snap, nil
}

// configuredBinding is where an SA's packets go before any was learnt.
func configuredBinding(s *sa.SA) netip.AddrPort {
	var port uint16
	if s.Encap != nil {
		port = s.Encap.PeerPort
	}
	return netip.AddrPortFrom(s.Peer, port)
}

// persistShare bounds the share of one core the periodic snapshot takes:
// after a snapshot that took d, the next comes no sooner than
// persistShare × d. With a million SAs a snapshot lists every SA and
// writes every record (~0.5 s of CPU), and a snapshot each second took a
// fifth of a 2-CPU machine while a million SAs were being installed. The
// crash exposure (package rxstate) grows with the interval accordingly.
const persistShare = 10

// persistState snapshots every interval (or persistShare times the last
// snapshot's duration, if longer) until ctx ends.
func (g *Gateway) persistState(ctx context.Context, every time.Duration) error {
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			start := time.Now()
			if err := g.saveState(ctx, false); err != nil && ctx.Err() == nil {
				g.log.Error("snapshot replay windows and bindings", "err", err)
			}
			// What the API waits for is written before it answers; this
			// catches the rest (lifetime expiries, etcd deletions).
			if err := g.apiSAs.flush(g.SAD.Version()); err != nil && ctx.Err() == nil {
				g.log.Error("save the SAs added through the API", "err", err)
			}
			t.Reset(max(every, persistShare*time.Since(start)))
		}
	}
}
