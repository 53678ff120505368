// Package rxstate persists what a restarted gateway needs of its SAs that
// neither the SA configuration nor the pinned BPF maps hold: each inbound
// SA's anti-replay window and each SA's learnt NAT binding. Without the
// windows a restart would accept again every packet an attacker captured
// before it (and let such a replay move the binding); without the
// bindings replies would go to the configured peer until each phone sent
// again.
//
// The state is a base file plus an append-only journal (journal.go). The
// base is replaced atomically (written beside, fsync'd, renamed, directory
// fsync'd), so a crash leaves the old or the new one, never a mix. While
// running the gateway appends to the journal, each interval, only what
// changed in it (windows that moved, bindings learnt, SAs added, updated
// or deleted, counters of SAs that carried traffic), fsync'd before the
// append returns; when the journal has grown past the base, the two are
// compacted into a fresh base. So a periodic snapshot costs what changed,
// not what is installed. At shutdown a fresh base, marked clean, is
// written with the data path stopped. After a crash the base and journal
// are behind: packets accepted after the last append are not in its
// windows. Restore therefore treats an unclean snapshot's whole window as
// received, which closes the holes below each window's top; what an SA
// accepted above its snapshot top in the last interval before the crash
// stays replayable once. The interval bounds that exposure.
//
// Each SA's packet and byte counters and its creation time are kept too,
// so that lifetimes (RFC 4301 4.4.2.1) are not reset by a restart.
//
// Records are keyed by seqstore keys (an HMAC of the SA's identity and key
// material under the state directory's secret), so a state never carries
// over to an SA that reuses the SPI with other keys. Since version 3 each
// record also carries an identity tag (a keyed hash of the SA's identity
// only, whose key the writing process draws at start), which the journal
// names records by: a deletion is journalled without the deleted SA's
// keys. Neither holds key material.
//
// # Base file (little-endian)
//
//	0  8  magic "XESPRX\x00\x03" (version 2: "XESPRX\x00\x02", still read)
//	8  4  flags: bit 0 clean (written at shutdown, data path stopped)
//	12 4  record count
//	16 8  generation (version 3 only): the journal that continues this base
//	      names it; a journal of another generation is stale and ignored
//	then per record:
//	  16 identity tag (version 3 only)
//	  16 key
//	  1  address length (0: no binding, 4 or 16), the address, 2 port
//	  8  packets, 8 bytes, 8 creation time (Unix ns, 0: unknown)
//	  1  1 when a replay window follows: 8 top, 2 words n, n*8 bitmap
//	last 4: CRC32C (Castagnoli) of everything before
package rxstate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"net/netip"
	"os"

	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
)

const (
	magic   = "XESPRX\x00\x03"
	magicV2 = "XESPRX\x00\x02"
)

// MaxSize bounds a snapshot file read back (1M SAs with 4096-packet
// windows fit); the journal is bounded by it too.
const MaxSize = 1 << 30

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one SA's state.
type Record struct {
	// ID is the SA's identity tag (zero in a version-2 file): what the
	// journal names the record by.
	ID      seqstore.Key
	Key     seqstore.Key
	Binding netip.AddrPort   // invalid: none recorded
	Replay  *esp.ReplayState // nil: none (outbound SAs)
	// Packets and Bytes are the SA's counters; Created is when it was
	// first installed (Unix ns, 0 unknown): what its lifetime counts from.
	Packets, Bytes uint64
	Created        int64
}

// Snapshot is the whole state: a base file with its journal applied.
type Snapshot struct {
	// Clean says the data path was stopped when it was taken: it is exact.
	Clean   bool
	Records []Record
}

// Save replaces the state at path with s: a fresh base, atomically and
// durably, and no journal.
func Save(path string, s *Snapshot) error {
	if _, err := writeBase(path, s); err != nil {
		return err
	}
	// The old journal names the old base's generation: ignored already,
	// removed for tidiness.
	if err := os.Remove(JournalPath(path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("save %s: %w", path, err)
	}
	return nil
}

// Encode is the snapshot in the base file's format, which Decode reads:
// also what a daemon hands its successor in an upgrade instead of a file.
func Encode(s *Snapshot) ([]byte, error) {
	return encode(s, 0)
}

func encode(s *Snapshot, gen uint64) ([]byte, error) {
	// Size the buffer exactly: with a million SAs a guess grown by
	// append reached twice the file's size, every snapshot interval.
	size := 24 + 4
	for i := range s.Records {
		size += recordSize(&s.Records[i])
	}
	b := make([]byte, 0, size)
	b = append(b, magic...)
	var flags uint32
	if s.Clean {
		flags |= 1
	}
	b = binary.LittleEndian.AppendUint32(b, flags)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s.Records)))
	b = binary.LittleEndian.AppendUint64(b, gen)
	for i := range s.Records {
		r := &s.Records[i]
		b = append(b, r.ID[:]...)
		b = append(b, r.Key[:]...)
		b = appendBinding(b, r.Binding)
		b = binary.LittleEndian.AppendUint64(b, r.Packets)
		b = binary.LittleEndian.AppendUint64(b, r.Bytes)
		b = binary.LittleEndian.AppendUint64(b, uint64(r.Created))
		if r.Replay == nil {
			b = append(b, 0)
			continue
		}
		var err error
		if b, err = appendReplay(append(b, 1), r.Replay); err != nil {
			return nil, err
		}
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

func recordSize(r *Record) int {
	n := 16 + 16 + 1 + 24 + 1
	if r.Binding.IsValid() {
		n += r.Binding.Addr().BitLen()/8 + 2
	}
	if r.Replay != nil {
		n += 8 + 2 + 8*len(r.Replay.Bitmap)
	}
	return n
}

func appendBinding(b []byte, ap netip.AddrPort) []byte {
	if !ap.IsValid() {
		return append(b, 0)
	}
	a := ap.Addr()
	if a.Is4() {
		b = append(b, 4)
	} else {
		b = append(b, 16)
	}
	b = append(b, a.AsSlice()...)
	return binary.LittleEndian.AppendUint16(b, ap.Port())
}

func appendReplay(b []byte, r *esp.ReplayState) ([]byte, error) {
	if len(r.Bitmap) > 0xffff {
		return nil, fmt.Errorf("replay bitmap of %d words", len(r.Bitmap))
	}
	b = binary.LittleEndian.AppendUint64(b, r.Top)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(r.Bitmap)))
	for _, w := range r.Bitmap {
		b = binary.LittleEndian.AppendUint64(b, w)
	}
	return b, nil
}

// ErrCorrupt: the file is not a whole snapshot.
var ErrCorrupt = errors.New("not a valid rx state snapshot")

var errShort = fmt.Errorf("%w: truncated record", ErrCorrupt)

// readBinding parses appendBinding's bytes.
func readBinding(p []byte) (netip.AddrPort, []byte, error) {
	if len(p) < 1 {
		return netip.AddrPort{}, nil, errShort
	}
	al := int(p[0])
	p = p[1:]
	switch al {
	case 0:
		return netip.AddrPort{}, p, nil
	case 4, 16:
		if len(p) < al+2 {
			return netip.AddrPort{}, nil, errShort
		}
		a, _ := netip.AddrFromSlice(p[:al])
		return netip.AddrPortFrom(a, binary.LittleEndian.Uint16(p[al:])), p[al+2:], nil
	}
	return netip.AddrPort{}, nil, fmt.Errorf("%w: address length %d", ErrCorrupt, al)
}

// readReplay parses appendReplay's bytes.
func readReplay(p []byte) (*esp.ReplayState, []byte, error) {
	if len(p) < 10 {
		return nil, nil, errShort
	}
	rs := &esp.ReplayState{Top: binary.LittleEndian.Uint64(p)}
	words := int(binary.LittleEndian.Uint16(p[8:]))
	p = p[10:]
	if len(p) < words*8 {
		return nil, nil, errShort
	}
	rs.Bitmap = make([]uint64, words)
	for j := range rs.Bitmap {
		rs.Bitmap[j] = binary.LittleEndian.Uint64(p[j*8:])
	}
	return rs, p[words*8:], nil
}

// Load reads the state at path: its base and, when it continues that
// base, its journal (path + ".journal"), whose torn tail after a crash
// is ignored. A missing base is an empty snapshot.
func Load(path string) (*Snapshot, error) {
	s, _, err := load(path)
	return s, err
}

// LoadDetail is Load with what it found besides the snapshot.
func LoadDetail(path string) (*Snapshot, LoadInfo, error) { return load(path) }

// LoadInfo is what load found besides the snapshot.
type LoadInfo struct {
	Gen            uint64 // the base's generation (0: version 2 or none)
	BaseSize       int64
	JournalRecords int   // journal records applied
	JournalSize    int64 // bytes of the journal applied (header included)
	TornBytes      int64 // bytes after the last whole record, ignored
	StaleJournal   bool  // a journal of another base, ignored
}

func load(path string) (*Snapshot, LoadInfo, error) {
	var info LoadInfo
	b, err := readState(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &Snapshot{}, info, nil
	}
	if err != nil {
		return nil, info, fmt.Errorf("load %s: %w", path, err)
	}
	info.BaseSize = int64(len(b))
	s, gen, err := decode(b)
	if err != nil {
		return nil, info, fmt.Errorf("load %s: %w", path, err)
	}
	info.Gen = gen
	if gen == 0 {
		return s, info, nil // version 2, or a hand-over's bytes: no journal
	}
	jpath := JournalPath(path)
	j, err := readState(jpath)
	if errors.Is(err, fs.ErrNotExist) {
		return s, info, nil
	}
	if err != nil {
		return nil, info, fmt.Errorf("load %s: %w", jpath, err)
	}
	st := newApplier(s)
	n, used, ok, err := replayJournal(j, gen, st)
	if err != nil {
		return nil, info, fmt.Errorf("load %s: %w", jpath, err)
	}
	if !ok {
		info.StaleJournal = true
		return s, info, nil
	}
	info.JournalRecords, info.JournalSize, info.TornBytes = n, int64(used), int64(len(j)-used)
	return st.snapshot(), info, nil
}

// readState reads a whole state file of at most MaxSize bytes.
func readState(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() > MaxSize {
		return nil, fmt.Errorf("%w: not a regular file of at most %d bytes", ErrCorrupt, MaxSize)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b, nil
}

// Decode parses a base file's bytes (version 2 or 3).
func Decode(b []byte) (*Snapshot, error) {
	s, _, err := decode(b)
	return s, err
}

func decode(b []byte) (*Snapshot, uint64, error) {
	if len(b) < 20 || string(b[:8]) != magic && string(b[:8]) != magicV2 {
		return nil, 0, fmt.Errorf("%w: bad header", ErrCorrupt)
	}
	v3 := string(b[:8]) == magic
	body := b[:len(b)-4]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil, 0, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	flags := binary.LittleEndian.Uint32(body[8:])
	if flags&^1 != 0 {
		return nil, 0, fmt.Errorf("%w: unknown flags %#x", ErrCorrupt, flags)
	}
	s := &Snapshot{Clean: flags&1 != 0}
	n := binary.LittleEndian.Uint32(body[12:])
	p := body[16:]
	var gen uint64
	minRec := uint64(42)
	if v3 {
		if len(p) < 8 {
			return nil, 0, fmt.Errorf("%w: bad header", ErrCorrupt)
		}
		gen = binary.LittleEndian.Uint64(p)
		p = p[8:]
		minRec += 16
	}
	if uint64(n) > uint64(len(p))/minRec {
		return nil, 0, fmt.Errorf("%w: %d records cannot fit %d bytes", ErrCorrupt, n, len(p))
	}
	s.Records = make([]Record, n)
	for i := range s.Records {
		r := &s.Records[i]
		if v3 {
			if len(p) < 16 {
				return nil, 0, errShort
			}
			copy(r.ID[:], p)
			p = p[16:]
		}
		if len(p) < 16 {
			return nil, 0, errShort
		}
		copy(r.Key[:], p)
		var err error
		if r.Binding, p, err = readBinding(p[16:]); err != nil {
			return nil, 0, err
		}
		if len(p) < 25 {
			return nil, 0, errShort
		}
		r.Packets = binary.LittleEndian.Uint64(p)
		r.Bytes = binary.LittleEndian.Uint64(p[8:])
		r.Created = int64(binary.LittleEndian.Uint64(p[16:]))
		has := p[24]
		p = p[25:]
		switch has {
		case 0:
			continue
		case 1:
		default:
			return nil, 0, fmt.Errorf("%w: replay flag %d", ErrCorrupt, has)
		}
		if r.Replay, p, err = readReplay(p); err != nil {
			return nil, 0, err
		}
	}
	if len(p) != 0 {
		return nil, 0, fmt.Errorf("%w: %d bytes after the last record", ErrCorrupt, len(p))
	}
	return s, gen, nil
}

// Distrust makes a window restored from an unclean snapshot treat every
// number in it as received (see the package doc).
func Distrust(r *esp.ReplayState) {
	for i := range r.Bitmap {
		r.Bitmap[i] = ^uint64(0)
	}
}
