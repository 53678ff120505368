package gateway

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/maphash"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/xesp/xesp/control/manager"
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
	// JournalRecords is how many journal records were applied to the
	// base; TornBytes the torn tail after them a crash left (ignored).
	JournalRecords int
	TornBytes      int64
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
	// born gets an entry per restored record: sized for them, not
	// rehashed a million SAs long.
	r := &restorer{seq: seq, clean: s.Clean, byKey: make(map[seqstore.Key]*rxstate.Record, len(s.Records)),
		born: make(map[sa.ID]time.Time, len(s.Records))}
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

// carry fills in rec, of an SA the data path does not hold yet, the
// window and counters its record in the previous run's snapshot has, if
// that record was not handed out yet.
func (r *restorer) carry(rec *rxstate.Record, inbound bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.byKey) == 0 {
		return
	}
	old := r.byKey[rec.Key]
	if old == nil {
		return
	}
	if inbound && old.Replay != nil {
		w := *old.Replay
		if !r.clean {
			w.Bitmap = slices.Clone(w.Bitmap)
			rxstate.Distrust(&w)
		}
		rec.Replay = &w
	}
	if rec.Packets == 0 && rec.Bytes == 0 {
		rec.Packets, rec.Bytes = old.Packets, old.Bytes
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

// saveState writes a full, clean snapshot with the workers stopped
// (shutdown): a fresh base, no journal.
func (g *Gateway) saveState(ctx context.Context) error {
	snap, err := g.snapshotState(ctx, true)
	if err != nil {
		return err
	}
	return rxstate.Save(filepath.Join(g.Config.StateDir, rxStateFile), snap)
}

// snapshotState collects a full snapshot: every SA in the SAD, with the
// windows read directly when stopped (the workers no longer run: the
// snapshot is exact and marked clean), else the windows in exported
// (nil: none).
func (g *Gateway) snapshotState(ctx context.Context, stopped bool, exported ...manager.Changed) (*rxstate.Snapshot, error) {
	windows := make(map[sa.ID]*esp.ReplayState, len(exported))
	for i := range exported {
		if exported[i].Replay != nil {
			windows[exported[i].ID] = exported[i].Replay
		}
	}
	in, out := g.SAD.Len()
	// Sized up front: append's doubling left up to half of a
	// million-SA slice as garbage.
	snap := &rxstate.Snapshot{Clean: stopped, Records: make([]rxstate.Record, 0, in+out)}
	var page []sad.Record
	var cur uint64
	for {
		page, cur = g.SAD.List(cur, 4096, page[:0])
		for i := range page {
			e := &page[i]
			var rec rxstate.Record
			if stopped {
				// The window from the entry itself, in the lookup
				// that reads the counters: no map of a million
				// windows on the side.
				c, w, ok := g.Manager.Stopped(e.ID)
				rec = g.recordOf(e, c, ok)
				rec.Replay = w
			} else {
				rec = g.stateRecord(e)
				rec.Replay = windows[e.ID]
				if rec.Replay == nil {
					// Not installed yet (or not exported): keep what the
					// previous run persisted rather than drop it.
					g.rest.carry(&rec, e.ID.Dir == sa.In)
				}
			}
			snap.Records = append(snap.Records, rec)
		}
		if cur == 0 {
			break
		}
		if !stopped && ctx.Err() != nil {
			// A periodic snapshot the stop overtook: the stop takes
			// an exact one of its own.
			return nil, ctx.Err()
		}
	}
	return snap, nil
}

// stateRecord is e's record without its window.
func (g *Gateway) stateRecord(e *sad.Record) rxstate.Record {
	c, ok := g.Manager.Counters(e.ID)
	return g.recordOf(e, c, ok)
}

// recordOf is e's record without its window, with counters c when
// counted (installed).
func (g *Gateway) recordOf(e *sad.Record, c manager.SACounters, counted bool) rxstate.Record {
	rec := rxstate.Record{ID: stateID(e.ID), Key: stateKey(g.Seq, e.ID, &e.SA), Created: e.Created.UnixNano()}
	if b := g.rest.since(e.ID); !b.IsZero() && b.Before(e.Created) {
		rec.Created = b.UnixNano()
	}
	if e.Binding.IsValid() && e.Binding != configuredBinding(&e.SA) {
		rec.Binding = e.Binding
	}
	if counted {
		rec.Packets, rec.Bytes = c.Packets, c.Bytes
	}
	return rec
}

// stateID is the identity tag of the SA id in the state files: what a
// journal record names it by, so a deletion needs no keys. Tags only need
// to agree within one base and its journal, all written by one process
// (each run writes a fresh base before it appends), so they are a 128-bit
// hash under seeds drawn at process start (~30 ns) rather than an HMAC
// under the state directory's secret (~1 µs, per changed SA per
// interval). The seeds are secret to the process: SA identities cannot
// be chosen to collide.
func stateID(id sa.ID) seqstore.Key {
	var b [1 + 4 + 16 + 2 + 1]byte
	b[0] = byte(id.Dir)
	binary.LittleEndian.PutUint32(b[1:], id.SPI)
	if a := id.Peer.Addr(); a.IsValid() {
		a16 := a.As16()
		copy(b[5:], a16[:])
		binary.LittleEndian.PutUint16(b[21:], id.Peer.Port())
		b[23] = 6
		if a.Is4() { // apart from IPv4-mapped IPv6, as sa.ID compares
			b[23] = 4
		}
	}
	var k seqstore.Key
	binary.LittleEndian.PutUint64(k[:], maphash.Bytes(stateIDSeeds[0], b[:]))
	binary.LittleEndian.PutUint64(k[8:], maphash.Bytes(stateIDSeeds[1], b[:]))
	return k
}

var stateIDSeeds = [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}

// persister is the periodic snapshot: a base written at the first
// interval of a run, then each interval a journal append of what changed
// in it (rxstate), compacted into a fresh base when the journal outgrows
// the base. Its cost per interval is proportional to the changes (SA
// feed entries, windows and counters the workers exported from their
// dirty lists), not to the SAs installed.
type persister struct {
	g       *Gateway
	j       *rxstate.Journal
	version uint64 // SAD version the state on disk covers
	changes []sad.Change
	ids     map[sa.ID]uint8 // this interval's changed SAs: fromFeed, deleted
	order   []sa.ID
	batch   rxstate.Batch
	// carry holds exports not yet written: an export is handed out
	// once, so a snapshot that fails before its append keeps them for
	// the next (a base without them would hold older windows).
	carry []manager.Changed
	// stats of the last snapshot, for logs and tests
	last persistStats
}

type persistStats struct {
	Full      bool // a base was written (first of the run, or compaction)
	Compacted bool
	Records   int // journal records appended
	Bytes     int
}

const (
	fromFeed = 1 << iota // set from the SAD this interval
	deleted              // deleted this interval (maybe added again since)
)

func newPersister(g *Gateway) *persister {
	return &persister{g: g, j: rxstate.OpenJournal(filepath.Join(g.Config.StateDir, rxStateFile)),
		ids: make(map[sa.ID]uint8)}
}

func (p *persister) close() { p.j.Close() }

// snapshot persists what changed since the previous call.
func (p *persister) snapshot(ctx context.Context) error {
	g := p.g
	p.last = persistStats{}
	if !p.j.Ready() {
		// The run's first: a base of every SA. Every inbound SA was put
		// on its worker's dirty list at install, so this export holds
		// all their windows (as a full snapshot's would).
		v := g.SAD.Version()
		exported, err := p.export(ctx)
		if err != nil {
			return err
		}
		snap, err := g.snapshotState(ctx, false, exported...)
		if err != nil {
			return err
		}
		if err := p.j.RebaseContext(ctx, snap); err != nil {
			return err
		}
		p.version, p.carry = v, nil
		p.last.Full = true
		return nil
	}
	// Exports first, then the feed: an SA a window was exported for was
	// added before the feed is read, so its add is journalled in this
	// batch or an earlier one, ahead of its window.
	exported, err := p.export(ctx)
	if err != nil {
		return err
	}
	p.batch.Reset()
	if len(p.ids) > 1024 {
		// clear costs what the map once held: after a burst of changes
		// a fresh map keeps quiet intervals cheap.
		p.ids = make(map[sa.ID]uint8)
	} else {
		clear(p.ids)
	}
	p.order = p.order[:0]
	changes, v, err := g.SAD.Changes(p.version, p.changes[:0])
	p.changes = changes
	switch {
	case errors.Is(err, sad.ErrResync):
		// The feed overran (more changes than its log holds in one
		// interval): set every SA between sweep marks, which deletes
		// the rest. O(SAs) once; compaction follows.
		if err := p.sweep(); err != nil {
			return err
		}
	case err != nil:
		return err
	default:
		for _, c := range changes {
			if c.Op == sad.OpState {
				continue // not persisted
			}
			f, seen := p.ids[c.ID]
			if !seen {
				p.order = append(p.order, c.ID)
			}
			if c.Op == sad.OpDelete {
				f |= deleted
			}
			p.ids[c.ID] = f
		}
		for _, id := range p.order {
			if p.ids[id]&deleted != 0 {
				p.batch.Delete(stateID(id))
			}
			e, ok := g.SAD.Get(id)
			if !ok {
				continue
			}
			rec := g.stateRecord(&e)
			if err := p.batch.Set(&rec, rxstate.HasKey|rxstate.HasBinding|rxstate.HasCounters|rxstate.HasCreated); err != nil {
				return err
			}
			p.ids[id] |= fromFeed
		}
	}
	for i := range exported {
		x := &exported[i]
		f := p.ids[x.ID]
		if f&deleted != 0 && f&fromFeed == 0 {
			continue // gone: a window would only make a keyless record
		}
		rec := rxstate.Record{ID: stateID(x.ID), Replay: x.Replay, Packets: x.Packets, Bytes: x.Bytes}
		var mask uint8
		if x.Replay != nil {
			mask |= rxstate.HasReplay
		}
		if f&fromFeed == 0 {
			// The feed's set read the counters later than the export.
			mask |= rxstate.HasCounters
		}
		if b := g.rest.since(x.ID); !b.IsZero() {
			// Restored at an install after the base was written.
			rec.Created = b.UnixNano()
			mask |= rxstate.HasCreated
		}
		if mask == 0 {
			continue
		}
		if err := p.batch.Set(&rec, mask); err != nil {
			return err
		}
	}
	p.last.Records, p.last.Bytes = p.batch.Len(), p.batch.Bytes()
	// From here the records are the journal's: kept by it if the
	// append fails, and retried.
	p.carry = nil
	appendErr := p.j.Append(&p.batch)
	if appendErr == nil {
		p.version = v
	}
	// Compaction keeps the amortised cost proportional to the changes
	// (rxstate.Journal.Due). A failed append is retried inside it (its
	// records are kept).
	if appendErr != nil || p.j.Due() {
		if err := p.j.CompactContext(ctx); err != nil {
			return errors.Join(appendErr, err)
		}
		if appendErr != nil {
			p.version = v
		}
		p.last.Full, p.last.Compacted = true, true
	}
	return nil
}

// export is the SAs changed since the last export, after those of a
// failed snapshot.
func (p *persister) export(ctx context.Context) ([]manager.Changed, error) {
	fresh, err := p.g.Manager.ExportChanged(ctx)
	p.carry = append(p.carry, fresh...)
	return p.carry, err
}

// sweep journals every SA in the SAD between sweep marks.
func (p *persister) sweep() error {
	g := p.g
	p.batch.SweepBegin()
	var page []sad.Record
	var cur uint64
	for {
		page, cur = g.SAD.List(cur, 4096, page[:0])
		for i := range page {
			rec := g.stateRecord(&page[i])
			if err := p.batch.Set(&rec, rxstate.HasKey|rxstate.HasBinding|rxstate.HasCounters|rxstate.HasCreated); err != nil {
				return err
			}
		}
		if cur == 0 {
			break
		}
	}
	p.batch.SweepEnd()
	return nil
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
// persistShare × d. A journal append costs what changed in the interval,
// so this stretches the interval only under heavy churn, and after a
// base or a compaction (O(SAs)): a bulk load of a million SAs overruns
// the change feed every interval, and without the stretch each interval
// swept every SA into the journal and compacted it, taking a core from
// the load (37 s instead of 17 for 1M pairs). The crash exposure
// (package rxstate) grows with the interval.
const persistShare = 10

// persistState snapshots every interval (or persistShare times the last
// snapshot's duration, if longer) until ctx ends.
func (g *Gateway) persistState(ctx context.Context, every time.Duration) error {
	p := newPersister(g)
	defer p.close()
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			start := time.Now()
			if err := p.snapshot(ctx); err != nil && ctx.Err() == nil {
				g.log.Error("snapshot replay windows and bindings", "err", err)
			}
			took := time.Since(start)
			// What the API waits for is written before it answers; this
			// catches the rest (lifetime expiries, etcd deletions).
			if err := g.apiSAs.flush(g.SAD.Version()); err != nil && ctx.Err() == nil {
				g.log.Error("save the SAs added through the API", "err", err)
			}
			g.Persisted.Add(1)
			t.Reset(max(every, persistShare*took))
		}
	}
}
