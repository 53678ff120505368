package seqstore

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// The on-disk layout; doc.go describes it field by field.
const (
	headerSize = 64
	recordSize = 32
	version    = 1
	secretSize = 32

	kindReserve = 1
	kindForget  = 2
)

var (
	magic    = [8]byte{'X', 'E', 'S', 'P', 'S', 'E', 'Q', 0}
	castagno = crc32.MakeTable(crc32.Castagnoli)
)

type header struct {
	secret [secretSize]byte
}

func (h *header) encode() [headerSize]byte {
	var b [headerSize]byte
	copy(b[0:8], magic[:])
	binary.LittleEndian.PutUint32(b[8:], version)
	binary.LittleEndian.PutUint32(b[12:], recordSize)
	copy(b[16:48], h.secret[:])
	binary.LittleEndian.PutUint32(b[60:], crc32.Checksum(b[:60], castagno))
	return b
}

func decodeHeader(b []byte) (header, error) {
	var h header
	if len(b) < headerSize {
		return h, fmt.Errorf("header is %d bytes, want %d", len(b), headerSize)
	}
	b = b[:headerSize]
	if got, want := binary.LittleEndian.Uint32(b[60:]), crc32.Checksum(b[:60], castagno); got != want {
		return h, fmt.Errorf("header CRC %08x, computed %08x", got, want)
	}
	if !bytes.Equal(b[0:8], magic[:]) {
		return h, fmt.Errorf("bad magic %q", b[0:8])
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != version {
		return h, fmt.Errorf("format version %d, this build reads %d", v, version)
	}
	if rs := binary.LittleEndian.Uint32(b[12:]); rs != recordSize {
		return h, fmt.Errorf("record size %d, this build reads %d", rs, recordSize)
	}
	copy(h.secret[:], b[16:48])
	return h, nil
}

// putRecord encodes one record into b[:recordSize].
func putRecord(b []byte, k Key, high uint64, kind byte) {
	_ = b[recordSize-1]
	copy(b[0:16], k[:])
	binary.LittleEndian.PutUint64(b[16:], high)
	b[24], b[25], b[26], b[27] = kind, 0, 0, 0
	binary.LittleEndian.PutUint32(b[28:], crc32.Checksum(b[:28], castagno))
}

// parseRecord decodes b[:recordSize]; ok is false for a record that must be
// skipped (torn, corrupted, or of a kind this build does not know).
func parseRecord(b []byte) (k Key, high uint64, kind byte, ok bool) {
	_ = b[recordSize-1]
	if binary.LittleEndian.Uint32(b[28:]) != crc32.Checksum(b[:28], castagno) {
		return k, 0, 0, false
	}
	kind = b[24]
	if b[25]|b[26]|b[27] != 0 {
		return k, 0, 0, false
	}
	high = binary.LittleEndian.Uint64(b[16:])
	switch {
	case kind == kindReserve && high != 0:
	case kind == kindForget && high == 0:
	default:
		return k, 0, 0, false
	}
	copy(k[:], b[0:16])
	return k, high, kind, true
}
