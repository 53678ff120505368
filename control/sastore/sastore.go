// Package sastore keeps the SAs a gateway was given through its control
// API in a file of its state directory, so a restart (or a crash) does
// not lose them: the config file and etcd are the stores of their own
// SAs, the API has none but this one.
//
// The file holds keys, so it is created 0600 and replaced atomically
// (temporary file, fsync, rename, fsync of the directory): a reader sees
// the old or the new set, never a mixture. Its first line is a header,
//
//	xesp-api-sas 1 <count> <sha256 of the rest, hex>
//
// (a snapshot streamed by Store.CompactStream pads the count with spaces
// to ten digits, so the header can be written after the body),
// and the rest is a JSON array of SAs in the SA format (docs/sa-format.md)
// with their keys inline. The checksum makes a torn or edited file an
// error at start instead of a silently shorter SAD.
package sastore

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"

	"github.com/xesp/xesp/internal/safefile"

	"github.com/xesp/xesp/control/sa"
)

const magic = "xesp-api-sas"

// version is the file format's version; Decode refuses others.
const version = 1

// maxFile bounds what Load reads: ~1 KiB per SA leaves room for millions.
const maxFile = 1 << 31

// ErrCorrupt: the bytes are not a whole API SA file.
var ErrCorrupt = errors.New("not a valid API SA file")

// Encode returns the file's bytes for sas.
func Encode(sas []sa.SA) ([]byte, error) {
	items := make([][]byte, len(sas))
	for i := range sas {
		b, err := EncodeSA(&sas[i])
		if err != nil {
			return nil, err
		}
		items[i] = b
	}
	return Assemble(items), nil
}

// EncodeSA is one SA's entry of the file. A writer that keeps these per
// SA re-encodes only what changed (Assemble builds the file from them):
// encoding is most of a large file's cost.
func EncodeSA(s *sa.SA) ([]byte, error) { return AppendSA(nil, s), nil }

// Assemble returns the file's bytes for entries made by EncodeSA.
func Assemble(items [][]byte) []byte {
	n := 2
	for _, it := range items {
		n += len(it) + 1
	}
	body := make([]byte, 0, n)
	body = append(body, '[')
	for i, it := range items {
		if i > 0 {
			body = append(body, ',')
		}
		body = append(body, it...)
	}
	body = append(body, ']')
	sum := sha256.Sum256(body)
	out := make([]byte, 0, len(body)+100)
	out = fmt.Appendf(out, "%s %d %d %s\n", magic, version, len(items), hex.EncodeToString(sum[:]))
	return append(out, body...)
}

// Decode parses a file's bytes. Every SA is validated as the API
// validates a request (no key files, integrity required); an error says
// which entry is wrong and why, and wraps ErrCorrupt.
func Decode(b []byte) ([]sa.SA, error) {
	nl := bytes.IndexByte(b, '\n')
	if nl < 0 {
		return nil, fmt.Errorf("%w: no header line", ErrCorrupt)
	}
	f := strings.Fields(string(b[:nl]))
	if len(f) != 4 || f[0] != magic {
		return nil, fmt.Errorf("%w: header %q is not \"%s <version> <count> <sha256>\"", ErrCorrupt, clip(b[:nl]), magic)
	}
	if f[1] != strconv.Itoa(version) {
		return nil, fmt.Errorf("%w: format version %q, this xesp reads %d", ErrCorrupt, clip([]byte(f[1])), version)
	}
	count, err := strconv.ParseUint(f[2], 10, 32)
	if err != nil {
		return nil, fmt.Errorf("%w: count %q", ErrCorrupt, clip([]byte(f[2])))
	}
	body := b[nl+1:]
	sum := sha256.Sum256(body)
	if want, err := hex.DecodeString(f[3]); err != nil || !bytes.Equal(want, sum[:]) {
		return nil, fmt.Errorf("%w: checksum mismatch (%d bytes after the header; truncated or modified)", ErrCorrupt, len(body))
	}
	var specs []sa.Spec
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&specs); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: data after the SA list", ErrCorrupt)
	}
	if uint64(len(specs)) != count {
		return nil, fmt.Errorf("%w: header says %d SAs, the list holds %d", ErrCorrupt, count, len(specs))
	}
	return parseSpecs(specs)
}

func parseSpecs(specs []sa.Spec) ([]sa.SA, error) {
	out := make([]sa.SA, 0, len(specs))
	for i := range specs {
		s, err := specs[i].Parse(sa.Options{Label: fmt.Sprintf("sas[%d]", i)})
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// decodeEntry parses one SA entry (EncodeSA) as Decode parses the list's.
func decodeEntry(b []byte, label string) (sa.SA, error) {
	var spec sa.Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return sa.SA{}, err
	}
	if dec.More() {
		return sa.SA{}, errors.New("data after the SA")
	}
	return spec.Parse(sa.Options{Label: label})
}

func clip(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}

// Save replaces the file at path with sas, durably.
func Save(path string, sas []sa.SA) error {
	b, err := Encode(sas)
	if err != nil {
		return err
	}
	return WriteFile(path, b)
}

// WriteFile replaces path with b atomically and durably, mode 0600.
func WriteFile(path string, b []byte) error { return safefile.Replace(path, b) }

// Load reads the store at path (the snapshot, path+JournalSuffix replayed
// over it) without changing it: a torn journal tail is left out, as Open
// would cut it. Missing files are no SAs. Errors name the file.
func Load(path string) ([]sa.SA, error) {
	sas, _, err := loadSnapshot(path)
	if err != nil {
		return nil, err
	}
	jpath := path + JournalSuffix
	b, err := readPrivate(jpath)
	if errors.Is(err, fs.ErrNotExist) {
		return sas, nil
	}
	if err != nil {
		return nil, err
	}
	recs, _, err := DecodeJournal(b)
	if err != nil {
		return nil, fmt.Errorf("API SA journal %s: %w", jpath, err)
	}
	return replay(sas, recs), nil
}
