// Package rxstate persists what a restarted gateway needs of its SAs that
// neither the SA configuration nor the pinned BPF maps hold: each inbound
// SA's anti-replay window and each SA's learnt NAT binding. Without the
// windows a restart would accept again every packet an attacker captured
// before it (and let such a replay move the binding); without the
// bindings replies would go to the configured peer until each phone sent
// again.
//
// A snapshot is one file, replaced atomically (written beside, fsync'd,
// renamed, directory fsync'd), so a crash leaves the old or the new one,
// never a mix. The gateway writes one periodically and a final, clean one
// on shutdown. After a crash the last periodic snapshot is behind: packets
// accepted after it are not in its windows. Restore therefore treats an
// unclean snapshot's whole window as received, which closes the holes
// below each window's top; what an SA accepted above its snapshot top in
// the last interval before the crash stays replayable once. The interval
// bounds that exposure.
//
// Each SA's packet and byte counters and its creation time are kept too,
// so that lifetimes (RFC 4301 4.4.2.1) are not reset by a restart.
//
// Records are keyed by seqstore keys (an HMAC of the SA's identity and key
// material under the state directory's secret), so a state never carries
// over to an SA that reuses the SPI with other keys.
//
// # File (little-endian)
//
//	0  8  magic "XESPRX\x00\x02"
//	8  4  flags: bit 0 clean (written at shutdown, data path stopped)
//	12 4  record count
//	then per record:
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
	"io/fs"
	"net/netip"
	"os"

	"github.com/xesp/xesp/internal/safefile"

	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
)

const magic = "XESPRX\x00\x02"

// MaxSize bounds a snapshot file read back (1M SAs with 4096-packet
// windows fit).
const MaxSize = 1 << 30

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one SA's state.
type Record struct {
	Key     seqstore.Key
	Binding netip.AddrPort   // invalid: none recorded
	Replay  *esp.ReplayState // nil: none (outbound SAs)
	// Packets and Bytes are the SA's counters; Created is when it was
	// first installed (Unix ns, 0 unknown): what its lifetime counts from.
	Packets, Bytes uint64
	Created        int64
}

// Snapshot is the whole file.
type Snapshot struct {
	// Clean says the data path was stopped when it was taken: it is exact.
	Clean   bool
	Records []Record
}

// Save replaces the snapshot at path atomically and durably.
func Save(path string, s *Snapshot) error {
	b, err := Encode(s)
	if err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	return safefile.Replace(path, b)
}

// Encode is the snapshot in the file's format, which Decode reads: also
// what a daemon hands its successor in an upgrade instead of a file.
func Encode(s *Snapshot) ([]byte, error) {
	// Size the buffer exactly: with a million SAs a guess grown by
	// append reached twice the file's size, every snapshot interval.
	size := 16 + 4
	for i := range s.Records {
		r := &s.Records[i]
		size += 16 + 1 + 24 + 1
		if r.Binding.IsValid() {
			size += r.Binding.Addr().BitLen()/8 + 2
		}
		if r.Replay != nil {
			size += 8 + 2 + 8*len(r.Replay.Bitmap)
		}
	}
	b := make([]byte, 0, size)
	b = append(b, magic...)
	var flags uint32
	if s.Clean {
		flags |= 1
	}
	b = binary.LittleEndian.AppendUint32(b, flags)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s.Records)))
	for i := range s.Records {
		r := &s.Records[i]
		b = append(b, r.Key[:]...)
		if r.Binding.IsValid() {
			a := r.Binding.Addr()
			if a.Is4() {
				b = append(b, 4)
			} else {
				b = append(b, 16)
			}
			b = append(b, a.AsSlice()...)
			b = binary.LittleEndian.AppendUint16(b, r.Binding.Port())
		} else {
			b = append(b, 0)
		}
		b = binary.LittleEndian.AppendUint64(b, r.Packets)
		b = binary.LittleEndian.AppendUint64(b, r.Bytes)
		b = binary.LittleEndian.AppendUint64(b, uint64(r.Created))
		if r.Replay == nil {
			b = append(b, 0)
			continue
		}
		if len(r.Replay.Bitmap) > 0xffff {
			return nil, fmt.Errorf("replay bitmap of %d words", len(r.Replay.Bitmap))
		}
		b = append(b, 1)
		b = binary.LittleEndian.AppendUint64(b, r.Replay.Top)
		b = binary.LittleEndian.AppendUint16(b, uint16(len(r.Replay.Bitmap)))
		for _, w := range r.Replay.Bitmap {
			b = binary.LittleEndian.AppendUint64(b, w)
		}
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

// ErrCorrupt: the file is not a whole snapshot.
var ErrCorrupt = errors.New("not a valid rx state snapshot")

// Load reads the snapshot at path; a missing file is an empty snapshot.
func Load(path string) (*Snapshot, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &Snapshot{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	if !st.Mode().IsRegular() || st.Size() > MaxSize {
		return nil, fmt.Errorf("load %s: %w: not a regular file of at most %d bytes", path, ErrCorrupt, MaxSize)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	s, err := Decode(b)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	return s, nil
}

// Decode parses a snapshot file's bytes.
func Decode(b []byte) (*Snapshot, error) {
	if len(b) < 20 || string(b[:8]) != magic {
		return nil, fmt.Errorf("%w: bad header", ErrCorrupt)
	}
	body := b[:len(b)-4]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	flags := binary.LittleEndian.Uint32(body[8:])
	if flags&^1 != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", ErrCorrupt, flags)
	}
	s := &Snapshot{Clean: flags&1 != 0}
	n := binary.LittleEndian.Uint32(body[12:])
	p := body[16:]
	short := fmt.Errorf("%w: truncated record", ErrCorrupt)
	if uint64(n) > uint64(len(p))/42 {
		return nil, fmt.Errorf("%w: %d records cannot fit %d bytes", ErrCorrupt, n, len(p))
	}
	s.Records = make([]Record, n)
	for i := range s.Records {
		r := &s.Records[i]
		if len(p) < 17 {
			return nil, short
		}
		copy(r.Key[:], p)
		al := int(p[16])
		p = p[17:]
		switch al {
		case 0:
		case 4, 16:
			if len(p) < al+2 {
				return nil, short
			}
			a, _ := netip.AddrFromSlice(p[:al])
			r.Binding = netip.AddrPortFrom(a, binary.LittleEndian.Uint16(p[al:]))
			p = p[al+2:]
		default:
			return nil, fmt.Errorf("%w: address length %d", ErrCorrupt, al)
		}
		if len(p) < 25 {
			return nil, short
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
			return nil, fmt.Errorf("%w: replay flag %d", ErrCorrupt, has)
		}
		if len(p) < 10 {
			return nil, short
		}
		rs := &esp.ReplayState{Top: binary.LittleEndian.Uint64(p)}
		words := int(binary.LittleEndian.Uint16(p[8:]))
		p = p[10:]
		if len(p) < words*8 {
			return nil, short
		}
		rs.Bitmap = make([]uint64, words)
		for j := range rs.Bitmap {
			rs.Bitmap[j] = binary.LittleEndian.Uint64(p[j*8:])
		}
		p = p[words*8:]
		r.Replay = rs
	}
	if len(p) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the last record", ErrCorrupt, len(p))
	}
	return s, nil
}

// Distrust makes a window restored from an unclean snapshot treat every
// number in it as received (see the package doc).
func Distrust(r *esp.ReplayState) {
	for i := range r.Bitmap {
		r.Bitmap[i] = ^uint64(0)
	}
}
