package gateway

import (
	"errors"
	"fmt"
	"hash/maphash"
	"path/filepath"
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
// million. In memory it keeps no SA's encoding, only which SAs the store
// holds and a 63-bit fingerprint of each one's entry (held: 16 bytes of
// map slot per inbound SA, 32 per outbound, no pointers), enough to tell a change that alters the
// entry from one that does not (a binding, a state), and an SA that needs
// a delete record from one the store never held.
//
// When the feed has dropped changes (a bulk add of more SAs than it
// holds) a flush lists the SAD but encodes only the SAs whose SAD version
// is newer than the store's (plus a delete for each held SA that is
// gone), so a burst of overruns does not re-encode the whole SAD each
// time; when most of the SAD changed, it writes a new snapshot of it
// instead (rewrite), which is what the journal would soon compact to.
type apiSAs struct {
	g    *Gateway
	path string
	// config finds a config-file SA by identity: its index in
	// g.Config.SAList. Built by the first keep, not at start: with a
	// million config SAs it costs a second, which is not the start's to
	// pay (nothing reads it before the first flush).
	config     map[sa.Key]int32
	configOnce sync.Once

	mu    sync.Mutex
	store *sastore.Store
	saved uint64 // the SAD version the store reflects
	// held is, per SA the store holds, the fingerprint of its entry
	// (fingerprint) in the low 63 bits and the mark of the last sweep
	// that saw it in the top bit (see mark).
	held heldSet
	// mark is the top bit the current sweep sets on what it sees: a
	// sweep flips it, marks every SA it lists, and what is left with the
	// old mark is gone from the SAD.
	mark uint64
	// rewrite: held may not match the files (a failed compaction left it
	// half updated): the next flush writes a new snapshot from the SAD.
	rewrite bool
	seed    maphash.Seed
	chg     []sad.Change
	buf     []sad.Record
	recs    []byte    // records of the append being built
	pend    []pending // their effect on held, applied once they are durable
	enc     []byte
	encodes int             // entries encoded so far (tests)
	etcd    *etcdsrc.Source // its SAs live in etcd, not here
	// stale: a delete or a replacement left an SA's old keys in the
	// snapshot or the journal; the next compaction removes them (see
	// scrub). lastCompact is when the last one ran.
	stale       bool
	lastCompact time.Time
}

// pending is one record's effect on held: the SA's new fingerprint, or
// its removal.
type pending struct {
	k   sa.Key
	fp  uint64
	del bool
}

const (
	markBit = 1 << 63
	// appendChunk bounds the records one append carries: a bulk change
	// is written in pieces of this size, not built whole in memory.
	appendChunk = 4 << 20
)

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
	return &apiSAs{g: g, path: filepath.Join(g.Config.StateDir, apiSAsFile), held: newHeldSet(), seed: maphash.MakeSeed()}
}

// configIndex is config, built on first use.
func (p *apiSAs) configIndex() map[sa.Key]int32 {
	p.configOnce.Do(func() {
		list := p.g.Config.SAList
		p.config = make(map[sa.Key]int32, len(list))
		for i := range list {
			p.config[list[i].ID().Key()] = int32(i)
		}
	})
	return p.config
}

// fingerprint is what held keeps of an entry: 63 bits of a keyed hash,
// so two different entries of one SA collide with probability 2^-63.
func (p *apiSAs) fingerprint(entry []byte) uint64 {
	return maphash.Bytes(p.seed, entry) &^ markBit
}

// hold records the SAs the store holds as it was opened.
func (p *apiSAs) hold(sas []sa.SA) {
	for i := range sas {
		p.enc = sastore.AppendSA(p.enc[:0], &sas[i])
		p.encodes++
		p.held.put(sas[i].ID().Key(), p.fingerprint(p.enc)|p.mark)
	}
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
	}
	p.mu.Lock()
	p.store = st
	p.hold(sas)
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
	if i, ok := p.configIndex()[e.ID.Key()]; ok && p.g.Config.SAList[i].Equal(&e.SA) {
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
	if p.saved >= version && (p.store == nil || !p.scrubDue()) && !p.rewrite {
		return nil
	}
	if p.store == nil {
		// A gateway built without restore (tests): open the store now.
		st, res, err := sastore.Open(p.path)
		if err != nil {
			return fmt.Errorf("state_dir: %w", err)
		}
		p.store = st
		p.hold(res.SAs)
	}
	var etcd map[sa.ID]bool
	if p.etcd != nil {
		etcd = p.etcd.OwnedIDs()
	}
	p.recs, p.pend = p.recs[:0], p.pend[:0]
	if p.rewrite {
		return p.compact(etcd, true)
	}
	chg, v, err := p.g.SAD.Changes(p.saved, p.chg[:0])
	p.chg = chg
	if err == nil {
		seen := make(map[sa.Key]struct{}, len(chg))
		for i := range chg {
			k := chg[i].ID.Key()
			if _, dup := seen[k]; dup {
				continue
			}
			seen[k] = struct{}{}
			e, ok := p.g.SAD.Get(chg[i].ID)
			if err := p.diff(k, &e, ok, etcd); err != nil {
				return err
			}
		}
		clear(p.chg)
	} else {
		// The feed dropped changes this store has not seen. When most
		// of the SAD is new to the store, a new snapshot is cheaper than
		// records the journal would soon be compacted from.
		if changed := p.g.SAD.ChangedSince(p.saved); changed > 1024 && changed >= p.held.len() {
			return p.compact(etcd, true)
		}
		if v, err = p.resync(etcd); err != nil {
			return err
		}
	}
	if err := p.commit(); err != nil {
		return err
	}
	p.saved = max(p.saved, v)
	if p.store.NeedCompact() || p.scrubDue() {
		// The changes are durable already; after a failed compaction
		// the files are as they were and the next flush rewrites them.
		if err := p.compact(etcd, false); err != nil && p.g.log != nil {
			p.g.log.Warn("API SA store: compaction failed; the journal keeps the SAs (and deleted SAs' keys)", "err", err)
		}
	}
	return nil
}

// resync brings the store to the SAD from a listing: the SAs changed
// since the version the store reflects are compared, a delete is written
// for each held SA the listing lacks. It returns the version the store
// then reflects. The version is read before listing: a change made while
// listing is then written by the next flush (again), never skipped.
func (p *apiSAs) resync(etcd map[sa.ID]bool) (uint64, error) {
	v := p.g.SAD.Version()
	p.mark ^= markBit
	var cur uint64
	for {
		p.buf, cur = p.g.SAD.List(cur, 4096, p.buf[:0])
		for i := range p.buf {
			e := &p.buf[i]
			k := e.ID.Key()
			if f, had := p.held.get(k); had {
				p.held.put(k, f&^markBit|p.mark)
			}
			if e.Version <= p.saved {
				continue // the store holds it as it is, or rightly lacks it
			}
			if err := p.diff(k, e, true, etcd); err != nil {
				clear(p.buf)
				return 0, err
			}
		}
		if cur == 0 {
			break
		}
	}
	clear(p.buf) // do not keep key slices of deleted SAs alive
	if err := p.held.each(func(k sa.Key, f uint64) error {
		if f&markBit != p.mark {
			return p.diff(k, nil, false, etcd)
		}
		return nil
	}); err != nil {
		return 0, err
	}
	return v, nil
}

// diff appends the record (if any) that brings the store's entry for k
// to the SAD's entry e (ok: e exists). Records are appended in chunks.
func (p *apiSAs) diff(k sa.Key, e *sad.Record, ok bool, etcd map[sa.ID]bool) error {
	old, had := p.held.get(k)
	if ok && p.keep(e, etcd) {
		p.enc = sastore.AppendSA(p.enc[:0], &e.SA)
		p.encodes++
		f := p.fingerprint(p.enc)
		if had && old&^markBit == f {
			return nil
		}
		p.recs = sastore.AppendPut(p.recs, p.enc)
		p.pend = append(p.pend, pending{k: k, fp: f})
	} else if had {
		p.recs = sastore.AppendDelete(p.recs, k.ID())
		p.pend = append(p.pend, pending{k: k, del: true})
	}
	if len(p.recs) >= appendChunk {
		return p.commit()
	}
	return nil
}

// commit appends the records built so far and, once they are durable,
// applies them to held.
func (p *apiSAs) commit() error {
	if err := p.store.Append(p.recs); err != nil {
		p.recs, p.pend = p.recs[:0], p.pend[:0]
		return err
	}
	for _, c := range p.pend {
		if _, had := p.held.get(c.k); had {
			p.stale = true // the old entry's keys are still on disk
		}
		if c.del {
			p.held.del(c.k)
		} else {
			p.held.put(c.k, c.fp|p.mark)
		}
	}
	if cap(p.recs) > appendChunk*2 {
		p.recs = nil // a bulk change's buffer is not kept for the next API call
	}
	p.recs, p.pend = p.recs[:0], p.pend[:0]
	return nil
}

// compact writes a new snapshot, streamed from a listing of the SAD, and
// empties the journal. all: of every SA the store should hold (a rewrite:
// held is rebuilt, and the store then reflects the version read before
// listing); otherwise of the SAs held (a compaction: the set does not
// change, their entries may be newer than the journal's, which the next
// flush then finds equal). SAs held but gone from the SAD are left out
// and forgotten either way. On a failure the files are as they were but
// held may not be: the next flush rewrites.
func (p *apiSAs) compact(etcd map[sa.ID]bool, all bool) error {
	v := p.g.SAD.Version()
	p.mark ^= markBit
	p.rewrite = true
	p.lastCompact = time.Now()
	err := p.store.CompactStream(func(put func([]byte)) error {
		var cur uint64
		for {
			p.buf, cur = p.g.SAD.List(cur, 4096, p.buf[:0])
			for i := range p.buf {
				e := &p.buf[i]
				k := e.ID.Key()
				if _, had := p.held.get(k); all && !p.keep(e, etcd) || !all && !had {
					continue
				}
				p.enc = sastore.AppendSA(p.enc[:0], &e.SA)
				p.encodes++
				put(p.enc)
				p.held.put(k, p.fingerprint(p.enc)|p.mark)
			}
			if cur == 0 {
				return nil
			}
		}
	})
	clear(p.buf)
	if err != nil {
		return err
	}
	_ = p.held.each(func(k sa.Key, f uint64) error {
		if f&markBit != p.mark {
			p.held.del(k)
		}
		return nil
	})
	p.rewrite, p.stale = false, false
	if all {
		p.saved = max(p.saved, v)
	}
	return nil
}

// heldSet is apiSAs.held: a fingerprint per SA. Inbound SAs, whose
// identity is their SPI alone, are keyed by it (16 bytes of map slot),
// the others by their whole Key (32).
type heldSet struct {
	in  map[uint32]uint64
	out map[sa.Key]uint64
}

func newHeldSet() heldSet {
	return heldSet{in: map[uint32]uint64{}, out: map[sa.Key]uint64{}}
}

// inSPI returns k's SPI when k is an inbound identity: (in, SPI), no peer.
func inSPI(k sa.Key) (uint32, bool) {
	id := k.ID()
	if id.Dir != sa.In || id.Peer.IsValid() {
		return 0, false
	}
	return id.SPI, true
}

func (h *heldSet) get(k sa.Key) (uint64, bool) {
	if spi, ok := inSPI(k); ok {
		f, had := h.in[spi]
		return f, had
	}
	f, had := h.out[k]
	return f, had
}

func (h *heldSet) put(k sa.Key, f uint64) {
	if spi, ok := inSPI(k); ok {
		h.in[spi] = f
		return
	}
	h.out[k] = f
}

func (h *heldSet) del(k sa.Key) {
	if spi, ok := inSPI(k); ok {
		delete(h.in, spi)
		return
	}
	delete(h.out, k)
}

func (h *heldSet) len() int { return len(h.in) + len(h.out) }

// each calls f for every SA held until f fails; f may delete (del) the
// SA it is given, or others.
func (h *heldSet) each(f func(k sa.Key, fp uint64) error) error {
	for spi, fp := range h.in {
		if err := f(sa.ID{Dir: sa.In, SPI: spi}.Key(), fp); err != nil {
			return err
		}
	}
	for k, fp := range h.out {
		if err := f(k, fp); err != nil {
			return err
		}
	}
	return nil
}
