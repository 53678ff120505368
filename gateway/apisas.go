package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"sync"
	"time"

	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/sastore"
)

// apiSAsFile holds, in state_dir, the SAs that came through the control
// API (sastore); the config file and etcd keep their own.
const apiSAsFile = "api-sas"

// apiSAs persists the part of the SAD no other store holds: every SA that
// is neither a config-file SA as the file gives it nor owned by the etcd
// source. An API PUT of a config SA is kept (it overrides the file's
// version at the next start); an API DELETE of a config SA is not
// remembered (the file brings it back).
//
// The store is a snapshot plus a journal (sastore.Store): a flush appends
// a record per SA that changed since the last flush, found through the
// SAD's change feed, so an API call costs the same with ten SAs or a
// million. Only when the feed has dropped changes does a flush list the
// whole SAD.
type apiSAs struct {
	g      *Gateway
	path   string
	config map[sa.ID]*sa.SA

	mu    sync.Mutex
	store *sastore.Store
	saved uint64           // the SAD version the store reflects
	enc   map[sa.ID][]byte // each kept SA's entry as the store holds it
	chg   []sad.Change
	buf   []sad.Record
	recs  []byte
	etcd  *etcdsrc.Source // its SAs live in etcd, not here
	// stale: a delete or a replacement left an SA's old keys in the
	// snapshot or the journal; the next compaction removes them (see
	// scrub). lastCompact is when the last one ran.
	stale       bool
	lastCompact time.Time
}

// Deleted keys leave the disk: an SA deleted or replaced (a rekey, an
// API PUT, a sec-agree delete) still has its old keys in the snapshot
// or the journal, so the flush that records the change also compacts
// the store, which rewrites both files without them (the old files are
// unlinked by the renames). With a large store compactions are spaced
// at least scrubEvery apart: changes in between share one, made by the
// next flush after the pause (the state snapshot ticker flushes every
// few seconds), so a deleted SA's keys stay on disk for seconds at most
// and a burst of deletes costs one rewrite, not one each.
const (
	scrubEvery     = time.Second
	scrubSmallSize = 4 << 20 // below this a compaction costs a few ms: never wait
)

// scrubDue says whether a compaction for stale entries may run now.
func (p *apiSAs) scrubDue() bool {
	return p.stale && (p.store.SnapshotSize() < scrubSmallSize || time.Since(p.lastCompact) >= scrubEvery)
}

// setEtcd names the source whose SAs are not the API's.
func (p *apiSAs) setEtcd(src *etcdsrc.Source) {
	p.mu.Lock()
	p.etcd = src
	p.mu.Unlock()
}

func newAPISAs(g *Gateway) *apiSAs {
	p := &apiSAs{g: g, path: filepath.Join(g.Config.StateDir, apiSAsFile), config: make(map[sa.ID]*sa.SA, len(g.Config.SAList)), enc: map[sa.ID][]byte{}}
	for i := range g.Config.SAList {
		s := &g.Config.SAList[i]
		p.config[s.ID()] = s
	}
	return p
}

// restore loads the store into the SAD, after the config's SAs and before
// the first sync, so the restored SAs get their replay windows, bindings
// and counters (restorer) and sequence reservations like any other.
func (p *apiSAs) restore() (int, error) {
	st, res, err := sastore.Open(p.path)
	if err != nil {
		return 0, fmt.Errorf("state_dir: %w (move %s and %s away to start without the SAs added through the API)", err, apiSAsFile, apiSAsFile+sastore.JournalSuffix)
	}
	if res.TornBytes > 0 && p.g.log != nil {
		p.g.log.Warn("API SA journal: cut off a torn last append (a crash while writing it; it was never acknowledged)",
			"file", p.path+sastore.JournalSuffix, "offset", res.TornAt, "bytes", res.TornBytes)
	}
	sas := res.SAs
	enc := make(map[sa.ID][]byte, len(sas))
	for i := range sas {
		s := sas[i]
		if _, err := p.g.SAD.Add(s); err != nil {
			if !errors.Is(err, sad.ErrExists) {
				st.Close()
				return 0, fmt.Errorf("state_dir: API SA file %s: %s: %w", p.path, s.ID(), err)
			}
			if _, err := p.g.SAD.Update(s); err != nil {
				st.Close()
				return 0, fmt.Errorf("state_dir: API SA file %s: %s: %w", p.path, s.ID(), err)
			}
		}
		b, err := sastore.EncodeSA(&s)
		if err != nil {
			st.Close()
			return 0, err
		}
		enc[s.ID()] = b
	}
	p.mu.Lock()
	p.store, p.enc = st, enc
	p.mu.Unlock()
	return len(sas), nil
}

// close closes the store (a later flush reopens nothing: call at stop).
func (p *apiSAs) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.store != nil {
		p.store.Close()
		p.store = nil
	}
}

// keep says whether the store holds e (see apiSAs).
func (p *apiSAs) keep(e *sad.Record, etcd map[sa.ID]bool) bool {
	if etcd[e.ID] {
		return false
	}
	if c := p.config[e.ID]; c != nil && reflect.DeepEqual(*c, e.SA) {
		return false
	}
	return true
}

// flush makes the store reflect the SAD at version or later. Concurrent
// callers share one append and fsync (the first one's covers the others'
// changes), so a burst of API calls costs far fewer writes than calls.
func (p *apiSAs) flush(version uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.saved >= version && (p.store == nil || !p.scrubDue()) {
		return nil
	}
	if p.store == nil {
		// A gateway built without restore (tests): open the store now.
		st, res, err := sastore.Open(p.path)
		if err != nil {
			return fmt.Errorf("state_dir: %w", err)
		}
		p.store = st
		for i := range res.SAs {
			b, err := sastore.EncodeSA(&res.SAs[i])
			if err != nil {
				return err
			}
			p.enc[res.SAs[i].ID()] = b
		}
	}
	var etcd map[sa.ID]bool
	if p.etcd != nil {
		etcd = p.etcd.OwnedIDs()
	}
	p.recs = p.recs[:0]
	next := map[sa.ID][]byte{} // entries this flush changes (nil: delete)
	chg, v, err := p.g.SAD.Changes(p.saved, p.chg[:0])
	p.chg = chg
	if err == nil {
		seen := make(map[sa.ID]bool, len(chg))
		for i := range chg {
			id := chg[i].ID
			if seen[id] {
				continue
			}
			seen[id] = true
			e, ok := p.g.SAD.Get(id)
			if err := p.diff(id, &e, ok, etcd, next); err != nil {
				return err
			}
		}
	} else {
		// The feed dropped changes this store has not seen: compare the
		// whole SAD. Read the version before listing: a change made while
		// listing is then written by the next flush (again), never skipped.
		v = p.g.SAD.Version()
		present := make(map[sa.ID]bool, len(p.enc))
		var cur uint64
		for {
			p.buf, cur = p.g.SAD.List(cur, 4096, p.buf[:0])
			for i := range p.buf {
				e := &p.buf[i]
				present[e.ID] = true
				if err := p.diff(e.ID, e, true, etcd, next); err != nil {
					return err
				}
			}
			if cur == 0 {
				break
			}
		}
		clear(p.buf) // do not keep key slices of deleted SAs alive
		for id := range p.enc {
			if !present[id] {
				if err := p.diff(id, nil, false, etcd, next); err != nil {
					return err
				}
			}
		}
	}
	clear(p.chg)
	if err := p.store.Append(p.recs); err != nil {
		return err
	}
	for id, b := range next {
		if _, had := p.enc[id]; had {
			p.stale = true // the old entry's keys are still on disk
		}
		if b == nil {
			delete(p.enc, id)
		} else {
			p.enc[id] = b
		}
	}
	p.saved = max(p.saved, v)
	if p.store.NeedCompact() || p.scrubDue() {
		// The changes are durable already; a failed compaction leaves
		// the journal to grow and is tried again at the next flush.
		entries := make([][]byte, 0, len(p.enc))
		for _, b := range p.enc {
			entries = append(entries, b)
		}
		p.lastCompact = time.Now()
		if err := p.store.Compact(entries); err != nil {
			if p.g.log != nil {
				p.g.log.Warn("API SA store: compaction failed; the journal keeps the SAs (and deleted SAs' keys)", "err", err)
			}
		} else {
			p.stale = false
		}
	}
	return nil
}

// diff appends the record (if any) that brings the store's entry for id
// to the SAD's entry e (ok: e exists), and notes it in next.
func (p *apiSAs) diff(id sa.ID, e *sad.Record, ok bool, etcd map[sa.ID]bool, next map[sa.ID][]byte) error {
	old, had := p.enc[id]
	if ok && p.keep(e, etcd) {
		b, err := sastore.EncodeSA(&e.SA)
		if err != nil {
			return err
		}
		if had && bytes.Equal(b, old) {
			return nil
		}
		p.recs = sastore.AppendPut(p.recs, b)
		next[id] = b
		return nil
	}
	if had {
		p.recs = sastore.AppendDelete(p.recs, id)
		next[id] = nil
	}
	return nil
}
