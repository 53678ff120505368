package sastore

// The journal makes an acknowledged API change cost one append of the
// changed SAs instead of a rewrite of the whole file: the store is the
// snapshot (the whole-file format above, at path) plus path+".journal",
//
//	xesp-api-sas-journal 1\n
//	record*
//
// where a record is a 4-byte big-endian payload length, the payload's
// CRC-32C (4 bytes, big-endian) and the payload: 'P' and one SA's entry
// (EncodeSA) to put it, or 'D' and an ID (appendID) to delete it. Load
// is the snapshot with the records replayed in order.
//
// A crash while appending leaves at most a torn last record: an
// incomplete one, one whose checksum fails at the end of the file, or
// zeros. It was never acknowledged (the append's fsync had not
// returned), so Open cuts it off and says so. A bad record with data
// after it is not a torn append: that is an error naming the offset.
//
// Compaction (Store.Compact) writes a new snapshot of the whole set
// (atomically, WriteFile), then replaces the journal with an empty one
// (atomically, too). The set it writes is the snapshot with all of the
// journal replayed, so a crash between the two renames leaves a snapshot
// and a journal whose replay over it changes nothing (puts of what the
// snapshot holds, deletes of what it lacks): every crash point loads
// the same set.

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/xesp/xesp/control/sa"
)

// JournalSuffix names the journal next to the snapshot.
const JournalSuffix = ".journal"

const journalHeader = "xesp-api-sas-journal 1\n"

// maxRecord bounds one record's payload (an SA entry is ~1 KiB).
const maxRecord = 1 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one journal entry: put SA, or delete ID.
type Record struct {
	Delete bool
	ID     sa.ID // of the SA put, or deleted
	SA     sa.SA // for a put
}

// AppendPut appends a record putting the SA whose entry (EncodeSA) is entry.
func AppendPut(dst, entry []byte) []byte {
	return appendRecord(dst, 'P', entry)
}

// AppendDelete appends a record deleting id.
func AppendDelete(dst []byte, id sa.ID) []byte {
	return appendRecord(dst, 'D', appendID(nil, id))
}

func appendRecord(dst []byte, op byte, data []byte) []byte {
	n := 1 + len(data)
	start := len(dst)
	dst = binary.BigEndian.AppendUint32(dst, uint32(n))
	dst = append(dst, 0, 0, 0, 0)
	dst = append(dst, op)
	dst = append(dst, data...)
	binary.BigEndian.PutUint32(dst[start+4:], crc32.Checksum(dst[start+8:], castagnoli))
	return dst
}

func appendID(dst []byte, id sa.ID) []byte {
	dst = append(dst, byte(id.Dir))
	dst = binary.BigEndian.AppendUint32(dst, id.SPI)
	if id.Peer.IsValid() {
		b, _ := id.Peer.MarshalBinary()
		dst = append(dst, b...)
	}
	return dst
}

func parseID(b []byte) (sa.ID, error) {
	if len(b) < 5 {
		return sa.ID{}, errors.New("short SA id")
	}
	id := sa.ID{Dir: sa.Direction(b[0]), SPI: binary.BigEndian.Uint32(b[1:5])}
	if id.Dir != sa.In && id.Dir != sa.Out {
		return sa.ID{}, fmt.Errorf("direction %d", b[0])
	}
	if len(b) > 5 {
		if err := id.Peer.UnmarshalBinary(b[5:]); err != nil {
			return sa.ID{}, fmt.Errorf("peer: %v", err)
		}
		if !id.Peer.IsValid() {
			return sa.ID{}, errors.New("peer: invalid address")
		}
	}
	if (id.Dir == sa.Out) != id.Peer.IsValid() {
		return sa.ID{}, errors.New("peer given for an inbound SA or missing for an outbound one")
	}
	return id, nil
}

// DecodeJournal parses a journal's bytes. It returns the records and the
// length of the valid prefix: less than len(b) when the tail is a torn
// append (see the package comment), which is not an error. Anything else
// wrong is an error that wraps ErrCorrupt and names the offset.
func DecodeJournal(b []byte) (recs []Record, valid int64, err error) {
	if len(b) < len(journalHeader) && bytes.HasPrefix([]byte(journalHeader), b) {
		// The header is written with the (empty) file's creation, atomically;
		// a shorter one is not a torn append.
		return nil, 0, fmt.Errorf("%w: offset 0: journal header cut short (%d bytes)", ErrCorrupt, len(b))
	}
	if !bytes.HasPrefix(b, []byte(journalHeader)) {
		return nil, 0, fmt.Errorf("%w: offset 0: not a journal header %q", ErrCorrupt, clip(b[:min(len(b), len(journalHeader))]))
	}
	off := len(journalHeader)
	for off < len(b) {
		rest := b[off:]
		if allZero(rest) || len(rest) < 8 {
			return recs, int64(off), nil // torn append
		}
		n := int(binary.BigEndian.Uint32(rest))
		if n == 0 || n > maxRecord {
			return nil, 0, fmt.Errorf("%w: offset %d: record length %d", ErrCorrupt, off, n)
		}
		if 8+n > len(rest) {
			return recs, int64(off), nil // torn append
		}
		p := rest[8 : 8+n]
		if crc32.Checksum(p, castagnoli) != binary.BigEndian.Uint32(rest[4:]) {
			if 8+n == len(rest) {
				return recs, int64(off), nil // torn append: its data never reached the disk
			}
			return nil, 0, fmt.Errorf("%w: offset %d: record checksum mismatch with %d bytes after it", ErrCorrupt, off, len(rest)-8-n)
		}
		r, err := parseRecord(p, off)
		if err != nil {
			return nil, 0, err
		}
		recs = append(recs, r)
		off += 8 + n
	}
	return recs, int64(off), nil
}

func parseRecord(p []byte, off int) (Record, error) {
	switch p[0] {
	case 'P':
		s, err := decodeEntry(p[1:], fmt.Sprintf("journal record at offset %d", off))
		if err != nil {
			return Record{}, fmt.Errorf("%w: offset %d: %v", ErrCorrupt, off, err)
		}
		return Record{ID: s.ID(), SA: s}, nil
	case 'D':
		id, err := parseID(p[1:])
		if err != nil {
			return Record{}, fmt.Errorf("%w: offset %d: delete record: %v", ErrCorrupt, off, err)
		}
		return Record{Delete: true, ID: id}, nil
	}
	return Record{}, fmt.Errorf("%w: offset %d: record type %q", ErrCorrupt, off, p[0])
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// replay applies recs to sas, keeping the order SAs were first put.
func replay(sas []sa.SA, recs []Record) []sa.SA {
	if len(recs) == 0 {
		return sas
	}
	at := make(map[sa.ID]int, len(sas))
	for i := range sas {
		at[sas[i].ID()] = i
	}
	gone := make([]bool, len(sas))
	for i := range recs {
		r := &recs[i]
		j, ok := at[r.ID]
		switch {
		case r.Delete && ok:
			gone[j] = true
			delete(at, r.ID)
		case r.Delete:
			// Replayed over a snapshot written after it: nothing to do.
		case ok:
			sas[j] = r.SA
		default:
			at[r.ID] = len(sas)
			sas = append(sas, r.SA)
			gone = append(gone, false)
		}
	}
	out := sas[:0]
	for i := range sas {
		if !gone[i] {
			out = append(out, sas[i])
		}
	}
	clear(sas[len(out):])
	return out
}

// Store is an open snapshot and journal.
type Store struct {
	path     string
	f        *os.File // the journal, positioned nowhere: writes use WriteAt
	size     int64    // the journal's valid length
	snapSize int64
}

// OpenResult tells what Open found.
type OpenResult struct {
	SAs       []sa.SA
	Snapshot  int   // SAs in the snapshot
	Records   int   // journal records replayed
	TornBytes int64 // bytes of a torn last append cut off the journal
	TornAt    int64 // where
}

// Open loads the store at path (snapshot path, journal path+JournalSuffix),
// cuts a torn tail off the journal, and creates what is missing (an empty
// snapshot, an empty journal) so the store is ready for Append.
func Open(path string) (*Store, OpenResult, error) {
	var res OpenResult
	snap, snapSize, err := loadSnapshot(path)
	if err != nil {
		return nil, res, err
	}
	if snapSize < 0 {
		b := Assemble(nil)
		if err := WriteFile(path, b); err != nil {
			return nil, res, err
		}
		snapSize = int64(len(b))
	}
	res.Snapshot = len(snap)
	jpath := path + JournalSuffix
	b, err := readPrivate(jpath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := WriteFile(jpath, []byte(journalHeader)); err != nil {
			return nil, res, err
		}
		b = []byte(journalHeader)
	case err != nil:
		return nil, res, err
	}
	recs, valid, err := DecodeJournal(b)
	if err != nil {
		return nil, res, fmt.Errorf("API SA journal %s: %w", jpath, err)
	}
	f, err := os.OpenFile(jpath, os.O_RDWR, 0o600)
	if err != nil {
		return nil, res, fmt.Errorf("API SA journal %s: %w", jpath, err)
	}
	if valid < int64(len(b)) {
		res.TornBytes, res.TornAt = int64(len(b))-valid, valid
		if err := f.Truncate(valid); err != nil {
			f.Close()
			return nil, res, fmt.Errorf("API SA journal %s: cut torn tail at %d: %w", jpath, valid, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, res, fmt.Errorf("API SA journal %s: fsync: %w", jpath, err)
		}
	}
	res.Records = len(recs)
	res.SAs = replay(snap, recs)
	return &Store{path: path, f: f, size: valid, snapSize: snapSize}, res, nil
}

// loadSnapshot reads the snapshot; size -1 when there is none.
func loadSnapshot(path string) ([]sa.SA, int64, error) {
	b, err := readPrivate(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, -1, nil
	}
	if err != nil {
		return nil, 0, err
	}
	sas, err := Decode(b)
	if err != nil {
		return nil, 0, fmt.Errorf("API SA file %s: %w", path, err)
	}
	return sas, int64(len(b)), nil
}

// readPrivate reads a file that holds keys, refusing one others can read.
func readPrivate(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("API SA file %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("API SA file %s: %w", path, err)
	}
	if st.Size() > maxFile {
		return nil, fmt.Errorf("API SA file %s: %w: %d bytes", path, ErrCorrupt, st.Size())
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("API SA file %s: mode %v lets others read its keys; chmod 600 it", path, st.Mode().Perm())
	}
	b := make([]byte, st.Size())
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("API SA file %s: %w", path, err)
	}
	return b, nil
}

// Append writes records (AppendPut, AppendDelete) to the journal and
// fsyncs it: when it returns nil they survive a crash. On an error the
// journal is cut back to where it was, so a later append does not land
// after a partial one.
func (s *Store) Append(recs []byte) error {
	if len(recs) == 0 {
		return nil
	}
	jpath := s.path + JournalSuffix
	if _, err := s.f.WriteAt(recs, s.size); err != nil {
		s.f.Truncate(s.size)
		return fmt.Errorf("API SA journal %s: append: %w", jpath, err)
	}
	if err := s.f.Sync(); err != nil {
		// The page cache state is unknown after a failed fsync; cutting
		// back keeps the acknowledged prefix the only content.
		s.f.Truncate(s.size)
		return fmt.Errorf("API SA journal %s: fsync: %w", jpath, err)
	}
	s.size += int64(len(recs))
	return nil
}

// SnapshotSize is the snapshot's length in bytes.
func (s *Store) SnapshotSize() int64 { return s.snapSize }

// JournalSize is the journal's length in bytes.
func (s *Store) JournalSize() int64 { return s.size }

// NeedCompact says the journal has grown past the snapshot (and past a
// floor, so a small set does not compact at every call): replaying it
// would then cost more than reading the snapshot, and compacting now
// costs at most one snapshot write per snapshot's worth of appends.
func (s *Store) NeedCompact() bool {
	return s.size > max(s.snapSize, 1<<20)
}

// Compact writes entries (EncodeSA, the whole set: the snapshot with the
// journal replayed) as the new snapshot and starts an empty journal.
func (s *Store) Compact(entries [][]byte) error {
	return s.CompactStream(func(put func([]byte)) error {
		for _, e := range entries {
			put(e)
		}
		return nil
	})
}

// CompactStream is Compact for a set too large to hold encoded in memory:
// each calls put with every entry of the set (EncodeSA; put copies it),
// and the snapshot is written as they come. An error from each leaves
// the store as it was.
func (s *Store) CompactStream(each func(put func(entry []byte)) error) error {
	size, err := writeSnapshot(s.path, each)
	if err != nil {
		return err
	}
	s.snapSize = size
	jpath := s.path + JournalSuffix
	werr := WriteFile(jpath, []byte(journalHeader))
	// Whether or not the rename happened, appends must go to the file at
	// jpath from now on: the old journal (still valid over the new
	// snapshot) or the new empty one.
	f, err := os.OpenFile(jpath, os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("API SA journal %s: %w", jpath, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("API SA journal %s: %w", jpath, err)
	}
	s.f.Close()
	s.f, s.size = f, st.Size()
	return werr
}

// headerLen is the length of a streamed snapshot's header line: the
// count is padded to ten digits with spaces (Decode splits on
// whitespace), so the header can be written last, over a placeholder.
var headerLen = len(fmt.Sprintf("%s %d %-10d %064x\n", magic, version, 0, 0))

// writeSnapshot replaces the snapshot at path with the entries each
// puts, as WriteFile would (temporary file, fsync, rename, fsync of the
// directory), streaming them through a buffer: at no point is the whole
// file in memory. It returns the file's size.
func writeSnapshot(path string, each func(put func([]byte)) error) (int64, error) {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, fmt.Errorf("save %s: %w", path, err)
	}
	fail := func(err error) (int64, error) {
		f.Close()
		os.Remove(tmp)
		return 0, fmt.Errorf("save %s: %w", path, err)
	}
	// A leftover temporary file keeps its mode through O_TRUNC.
	if err := f.Chmod(0o600); err != nil {
		return fail(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	sum := sha256.New()
	body := io.MultiWriter(w, sum)
	w.Write(make([]byte, headerLen))
	body.Write([]byte{'['})
	n, size := 0, int64(headerLen+2)
	err = each(func(e []byte) {
		if n > 0 {
			body.Write([]byte{','})
			size++
		}
		body.Write(e)
		size += int64(len(e))
		n++
	})
	if err != nil {
		return fail(err)
	}
	body.Write([]byte{']'})
	if err := w.Flush(); err != nil { // bufio keeps its first write error
		return fail(err)
	}
	hdr := fmt.Appendf(nil, "%s %d %-10d %x\n", magic, version, n, sum.Sum(nil))
	if len(hdr) != headerLen {
		return fail(fmt.Errorf("header of %d bytes, want %d", len(hdr), headerLen))
	}
	if _, err := f.WriteAt(hdr, 0); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("fsync: %w", err))
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("save %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, fmt.Errorf("save %s: %w", path, err)
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return 0, fmt.Errorf("save %s: %w", path, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return 0, fmt.Errorf("save %s: fsync directory: %w", path, err)
	}
	return size, nil
}

// Close closes the journal.
func (s *Store) Close() error { return s.f.Close() }
