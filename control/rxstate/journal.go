package rxstate

// The journal continues a base file with what changed since it was
// written, so a periodic snapshot costs what changed in its interval.
//
// # Journal file (path + ".journal", little-endian)
//
//	0  8  magic "XESPRJ\x00\x01"
//	8  8  generation of the base it continues
//	16 4  CRC32C of the 16 bytes before
//	then records, each:
//	  4  n: length of the body
//	  n  body: 1 kind, then by kind:
//	     1 set:   16 identity tag, 1 field mask, then the fields present:
//	              16 key (mask 1); binding as in the base (2);
//	              8 packets, 8 bytes (4); 8 creation time (8);
//	              window: 8 top, 2 words n, n*8 bitmap (16)
//	     2 delete: 16 identity tag
//	     3 sweep begin, 4 sweep end: no body
//	  4  CRC32C of the length and the body
//
// Records apply in order to the base's records, found by identity tag.
// A set creates the record when missing and overwrites the fields it
// carries; a delete removes the record (a later set starts a new one, so
// a deleted SA's window never reaches an SA added again under its
// identity). Between a sweep's begin and end every live SA is set; at
// the end the records none of them set are removed (the SA change feed
// overran: deletions are not known one by one). A record without a key
// (its SA's window exported before its add was journalled) is not
// restored.
//
// A crash during an append leaves a torn last record: its length or CRC
// does not match, and it and anything after it are ignored (the append
// had not returned, so nothing relied on it). A journal whose generation
// is not its base's is stale (left from before a compaction's new base,
// until the next append starts a new journal) and ignored whole: the base
// already holds it.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/internal/safefile"
)

const journalMagic = "XESPRJ\x00\x01"

const journalHeader = 20

// Field mask bits of a set record.
const (
	HasKey      = 1 << iota // Key
	HasBinding              // Binding (invalid: none)
	HasCounters             // Packets, Bytes
	HasCreated              // Created
	HasReplay               // Replay
	hasAll      = HasKey | HasBinding | HasCounters | HasCreated | HasReplay
)

// Record kinds.
const (
	kindSet = iota + 1
	kindDelete
	kindSweepBegin
	kindSweepEnd
)

// JournalPath is where the journal of the base at path lives.
func JournalPath(path string) string { return path + ".journal" }

// Batch is one interval's changes, encoded as journal records.
type Batch struct {
	b []byte
	n int
}

// Len is the number of records in the batch.
func (b *Batch) Len() int { return b.n }

// Bytes is the batch's encoded size.
func (b *Batch) Bytes() int { return len(b.b) }

// Reset empties the batch, keeping its buffer.
func (b *Batch) Reset() {
	if cap(b.b) > keepBuffer {
		// A sweep (a feed overrun: every SA) grew it to the SAD's size;
		// held between quiet intervals it would be heap per SA for good.
		b.b = nil
	}
	b.b, b.n = b.b[:0], 0
}

// keepBuffer is the largest buffer a Batch or a Journal keeps between
// appends (about 10k records).
const keepBuffer = 1 << 20

func (b *Batch) begin(kind byte) int {
	at := len(b.b)
	b.b = append(b.b, 0, 0, 0, 0, kind)
	return at
}

func (b *Batch) end(at int) {
	binary.LittleEndian.PutUint32(b.b[at:], uint32(len(b.b)-at-4))
	b.b = binary.LittleEndian.AppendUint32(b.b, crc32.Checksum(b.b[at:], castagnoli))
	b.n++
}

// Set journals the fields of r that mask names for the record tagged
// r.ID.
func (b *Batch) Set(r *Record, mask uint8) error {
	if mask&^hasAll != 0 || mask&HasReplay != 0 && r.Replay == nil {
		return fmt.Errorf("journal set: bad field mask %#x", mask)
	}
	at := b.begin(kindSet)
	b.b = append(b.b, r.ID[:]...)
	b.b = append(b.b, mask)
	if mask&HasKey != 0 {
		b.b = append(b.b, r.Key[:]...)
	}
	if mask&HasBinding != 0 {
		b.b = appendBinding(b.b, r.Binding)
	}
	if mask&HasCounters != 0 {
		b.b = binary.LittleEndian.AppendUint64(b.b, r.Packets)
		b.b = binary.LittleEndian.AppendUint64(b.b, r.Bytes)
	}
	if mask&HasCreated != 0 {
		b.b = binary.LittleEndian.AppendUint64(b.b, uint64(r.Created))
	}
	if mask&HasReplay != 0 {
		var err error
		if b.b, err = appendReplay(b.b, r.Replay); err != nil {
			b.b = b.b[:at]
			return err
		}
	}
	b.end(at)
	return nil
}

// Delete journals the removal of the record tagged id.
func (b *Batch) Delete(id seqstore.Key) {
	at := b.begin(kindDelete)
	b.b = append(b.b, id[:]...)
	b.end(at)
}

// SweepBegin and SweepEnd bracket a set of every live SA: records not set
// between them are removed at the end.
func (b *Batch) SweepBegin() { b.end(b.begin(kindSweepBegin)) }

// SweepEnd: see SweepBegin.
func (b *Batch) SweepEnd() { b.end(b.begin(kindSweepEnd)) }

// applier is a snapshot being changed by journal records.
type applier struct {
	s     *Snapshot
	byID  map[seqstore.Key]int // index in s.Records
	swept map[seqstore.Key]bool
	dirty bool // a record was applied: the result is not clean
}

func newApplier(s *Snapshot) *applier {
	a := &applier{s: s, byID: make(map[seqstore.Key]int, len(s.Records))}
	for i := range s.Records {
		if id := s.Records[i].ID; id != (seqstore.Key{}) {
			a.byID[id] = i
		}
	}
	return a
}

// apply applies one record body (kind onwards).
func (a *applier) apply(body []byte) error {
	a.dirty = true
	kind, p := body[0], body[1:]
	switch kind {
	case kindSweepBegin:
		a.swept = make(map[seqstore.Key]bool)
		return nil
	case kindSweepEnd:
		if a.swept == nil {
			return fmt.Errorf("%w: sweep end without a begin", ErrCorrupt)
		}
		for id, i := range a.byID {
			if !a.swept[id] {
				a.s.Records[i] = Record{}
				delete(a.byID, id)
			}
		}
		a.swept = nil
		return nil
	case kindSet, kindDelete:
	default:
		return fmt.Errorf("%w: journal record kind %d", ErrCorrupt, kind)
	}
	if len(p) < 16 {
		return errShort
	}
	id := seqstore.Key(p[:16])
	p = p[16:]
	if a.swept != nil {
		a.swept[id] = true
	}
	i, ok := a.byID[id]
	if kind == kindDelete {
		if len(p) != 0 {
			return fmt.Errorf("%w: %d bytes after a delete", ErrCorrupt, len(p))
		}
		if ok {
			a.s.Records[i] = Record{}
			delete(a.byID, id)
		}
		return nil
	}
	if len(p) < 1 {
		return errShort
	}
	mask := p[0]
	p = p[1:]
	if mask&^hasAll != 0 {
		return fmt.Errorf("%w: field mask %#x", ErrCorrupt, mask)
	}
	if !ok {
		i = len(a.s.Records)
		a.s.Records = append(a.s.Records, Record{ID: id})
		a.byID[id] = i
	}
	r := &a.s.Records[i]
	var err error
	if mask&HasKey != 0 {
		if len(p) < 16 {
			return errShort
		}
		r.Key = seqstore.Key(p[:16])
		p = p[16:]
	}
	if mask&HasBinding != 0 {
		if r.Binding, p, err = readBinding(p); err != nil {
			return err
		}
	}
	if mask&HasCounters != 0 {
		if len(p) < 16 {
			return errShort
		}
		r.Packets, r.Bytes = binary.LittleEndian.Uint64(p), binary.LittleEndian.Uint64(p[8:])
		p = p[16:]
	}
	if mask&HasCreated != 0 {
		if len(p) < 8 {
			return errShort
		}
		r.Created = int64(binary.LittleEndian.Uint64(p))
		p = p[8:]
	}
	if mask&HasReplay != 0 {
		if r.Replay, p, err = readReplay(p); err != nil {
			return err
		}
	}
	if len(p) != 0 {
		return fmt.Errorf("%w: %d bytes after a set", ErrCorrupt, len(p))
	}
	return nil
}

// snapshot is the result: the records with a key, in base order then
// journal order.
func (a *applier) snapshot() *Snapshot {
	out := &Snapshot{Clean: a.s.Clean && !a.dirty, Records: a.s.Records[:0]}
	for _, r := range a.s.Records {
		if r.Key != (seqstore.Key{}) {
			out.Records = append(out.Records, r)
		}
	}
	return out
}

// replayJournal applies the whole records of journal j to a. ok is false
// when j does not continue the base of generation gen (nothing applied);
// used is the length of the header and the whole records.
func replayJournal(j []byte, gen uint64, a *applier) (n, used int, ok bool, err error) {
	if len(j) < journalHeader || string(j[:8]) != journalMagic ||
		crc32.Checksum(j[:16], castagnoli) != binary.LittleEndian.Uint32(j[16:]) ||
		binary.LittleEndian.Uint64(j[8:]) != gen {
		return 0, 0, false, nil
	}
	used = journalHeader
	for p := j[used:]; len(p) >= 9; p = j[used:] {
		l := int(binary.LittleEndian.Uint32(p))
		if l < 1 || l > len(p)-8 {
			break // torn
		}
		if crc32.Checksum(p[:4+l], castagnoli) != binary.LittleEndian.Uint32(p[4+l:]) {
			break // torn
		}
		if err := a.apply(p[4 : 4+l]); err != nil {
			return n, used, true, fmt.Errorf("journal record %d at byte %d: %w", n, used, err)
		}
		n++
		used += 8 + l
	}
	return n, used, true, nil
}

// writeBase replaces the base at path with s under a new generation and
// starts its empty journal. A crash between the two leaves the old
// journal, of the old generation: stale against the new base, ignored.
func writeBase(path string, s *Snapshot) (gen uint64, err error) {
	return writeBaseContext(context.Background(), path, s)
}

// writeBaseContext is writeBase that stops, leaving the old base, once
// ctx ends.
func writeBaseContext(ctx context.Context, path string, s *Snapshot) (gen uint64, err error) {
	var g [8]byte
	if _, err := rand.Read(g[:]); err != nil {
		return 0, fmt.Errorf("save %s: generation: %w", path, err)
	}
	gen = binary.LittleEndian.Uint64(g[:]) | 1 // never 0 (version 2, hand-over)
	b, err := encode(s, gen)
	if err != nil {
		return 0, fmt.Errorf("save %s: %w", path, err)
	}
	if err := safefile.ReplaceContext(ctx, path, b); err != nil {
		return 0, err
	}
	return gen, nil
}

// Journal keeps the state at a path: a base and the journal after it.
// One goroutine uses it.
type Journal struct {
	path     string
	f        *os.File // the open journal, nil until a base was written
	gen      uint64
	baseSize int64
	size     int64 // journal bytes written and synced
	// pending is a batch whose append failed: the journal was cut back
	// to size, and the next append writes it first.
	pending []byte
	// Floor is the journal size below which Due never asks for a
	// compaction (DefaultFloor): small states are not rewritten every
	// few intervals.
	Floor int64
}

// DefaultFloor is Journal.Floor's default.
const DefaultFloor = 1 << 20

// OpenJournal returns the state at path for writing; nothing is written
// until Rebase.
func OpenJournal(path string) *Journal { return &Journal{path: path, Floor: DefaultFloor} }

// Due says the journal has outgrown its base (and the floor): compacting
// now keeps the amortised cost of the state proportional to the changes,
// since a base of B bytes is rewritten only after B bytes of journal.
func (j *Journal) Due() bool { return j.size > max(j.baseSize, j.Floor) }

// Ready says a base was written this run: Append may follow it.
func (j *Journal) Ready() bool { return j.gen != 0 }

// Sizes are the base's and the journal's bytes.
func (j *Journal) Sizes() (base, journal int64) { return j.baseSize, j.size }

// Rebase replaces the state with s: a fresh base, after which the old
// journal is stale.
func (j *Journal) Rebase(s *Snapshot) error {
	return j.RebaseContext(context.Background(), s)
}

// RebaseContext is Rebase that gives up once ctx ends, leaving the old
// base and journal on disk, which restore as they did before.
func (j *Journal) RebaseContext(ctx context.Context, s *Snapshot) error {
	j.Close()
	gen, err := writeBaseContext(ctx, j.path, s)
	if err != nil {
		return err
	}
	st, err := os.Stat(j.path)
	if err != nil {
		return fmt.Errorf("save %s: %w", j.path, err)
	}
	if s.Clean {
		// Nothing may follow a clean base: drop the old journal.
		if err := os.Remove(JournalPath(j.path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("save %s: %w", j.path, err)
		}
		j.pending, j.gen = nil, 0
		return nil
	}
	// The journal itself is started by the first append with records: a
	// base costs what the whole file cost before (one file and one
	// directory fsync), and the old journal, of another generation, is
	// ignored until then.
	j.gen, j.baseSize, j.size = gen, st.Size(), 0
	return nil
}

// startJournal truncates the journal to a header naming j.gen followed
// by recs, durably.
func (j *Journal) startJournal(recs []byte) error {
	jp := JournalPath(j.path)
	f, err := os.OpenFile(jp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("journal %s: %w", jp, err)
	}
	// A journal left by an older umask keeps its mode through O_TRUNC.
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(journalHeaderFor(j.gen, nil))
	}
	if err == nil {
		_, err = f.Write(recs)
	}
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = syncDir(filepath.Dir(jp))
	}
	if err != nil {
		f.Close()
		return fmt.Errorf("journal %s: %w", jp, err)
	}
	j.f, j.size = f, journalHeader+int64(len(recs))
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Append writes b (and a batch whose append failed before) to the
// journal and syncs it: when it returns nil the records survive a crash.
// On failure the journal is cut back to its last synced size and the
// records are kept for the next append or Compact.
func (j *Journal) Append(b *Batch) error {
	if j.gen == 0 {
		return errors.New("journal append before a base was written")
	}
	if b.n == 0 && len(j.pending) == 0 {
		return nil
	}
	// Written from the batch itself when nothing failed before: a sweep's
	// batch holds every SA, and a copy would double it.
	recs := b.b
	if len(j.pending) > 0 {
		j.pending = append(j.pending, b.b...)
		recs = j.pending
	}
	keep := func() {
		if len(j.pending) == 0 {
			j.pending = append(j.pending, b.b...)
		}
	}
	if j.f == nil {
		if err := j.startJournal(recs); err != nil {
			keep()
			return err // the records stay pending
		}
		j.dropPending()
		return nil
	}
	_, err := j.f.WriteAt(recs, j.size)
	if err == nil {
		err = j.f.Sync()
	}
	if err != nil {
		if terr := j.f.Truncate(j.size); terr != nil {
			err = errors.Join(err, terr)
		}
		keep()
		return fmt.Errorf("journal %s: append: %w", JournalPath(j.path), err)
	}
	j.size += int64(len(recs))
	j.dropPending()
	return nil
}

// dropPending empties the records kept from failed appends, and frees a
// large buffer.
func (j *Journal) dropPending() {
	if cap(j.pending) > keepBuffer {
		j.pending = nil
	}
	j.pending = j.pending[:0]
}

// Compact replaces the base and its journal (and any records an append
// failed to write) with one fresh base holding the same state. A crash
// while it runs leaves the old base and journal, or the new base and the
// stale old journal (ignored), which restore alike.
func (j *Journal) Compact() error {
	return j.CompactContext(context.Background())
}

// CompactContext is Compact that gives up once ctx ends; what was pending
// stays pending.
func (j *Journal) CompactContext(ctx context.Context) error {
	s, info, err := load(j.path)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("compact %s: %w", j.path, err)
	}
	if j.gen != 0 && info.Gen != j.gen {
		return fmt.Errorf("compact %s: base generation %x, want %x: replaced behind the gateway's back", j.path, info.Gen, j.gen)
	}
	if len(j.pending) > 0 {
		a := newApplier(s)
		if _, _, _, err := replayJournal(journalHeaderFor(info.Gen, j.pending), info.Gen, a); err != nil {
			return fmt.Errorf("compact %s: %w", j.path, err)
		}
		s = a.snapshot()
	}
	s.Clean = false
	if err := j.RebaseContext(ctx, s); err != nil {
		return err
	}
	j.pending = nil
	return nil
}

// journalHeaderFor is a journal header for gen followed by recs.
func journalHeaderFor(gen uint64, recs []byte) []byte {
	h := append([]byte(journalMagic), make([]byte, 8)...)
	binary.LittleEndian.PutUint64(h[8:], gen)
	h = binary.LittleEndian.AppendUint32(h, crc32.Checksum(h, castagnoli))
	return append(h, recs...)
}

// Close closes the journal file.
func (j *Journal) Close() {
	if j.f != nil {
		j.f.Close()
		j.f = nil
	}
}
