// Package kek owns the key-encryption keys (KEKs) that seal SA records
// kept outside the gateway (in etcd): the KEK file's format, sealing and
// opening with AES-256-GCM, and the key ids that make rotation possible.
//
// It must not talk to etcd, know the SA format or log anything: callers
// decide what a record is and what to do with one that does not open.
//
// A KEK file holds one key per line, "<id> <64 hex digits>", '#' starting
// a comment. Every key opens records sealed under its id; the last one is
// the current key, the one Seal uses. Rotation is appending a line: new
// records get the new id, old ones still open, and a rewrite (xesp fleet
// rekey-store) re-seals them under the new id before the old line goes.
//
// Each seal draws a fresh random 96-bit nonce: with at most 2^32 seals
// per key the chance of a repeated nonce stays below 2^-32 (NIST SP
// 800-38D, 8.3); a fleet rotates long before it writes four billion SA
// records under one KEK.
package kek

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
)

// KeyLen is a KEK's length: AES-256.
const KeyLen = 32

// maxFile bounds a KEK file.
const maxFile = 64 << 10

// ErrUnknownKey: a record was sealed under an id the ring does not hold.
var ErrUnknownKey = errors.New("sealed under an unknown key id")

// ErrOpen: a record does not authenticate under its key (altered, or
// bound to another name).
var ErrOpen = errors.New("does not authenticate under its key")

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$`)

// Ring is a set of KEKs, one of them current.
type Ring struct {
	aead    map[string]cipher.AEAD
	current string
}

// Load reads a KEK file, refusing one that group or others can read.
func Load(path string) (*Ring, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kek: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("kek: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() > maxFile {
		return nil, fmt.Errorf("kek: %s: not a regular file of at most %d bytes", path, maxFile)
	}
	if m := st.Mode().Perm(); m&0o077 != 0 {
		return nil, fmt.Errorf("kek: %s: mode %04o lets group or others read the key-encryption key; chmod 600 it", path, m)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil && st.Size() > 0 {
		return nil, fmt.Errorf("kek: %s: %w", path, err)
	}
	r, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("kek: %s: %w", path, err)
	}
	return r, nil
}

// Parse reads a KEK file's text. Errors name the line, never a key.
func Parse(b []byte) (*Ring, error) {
	r := &Ring{aead: map[string]cipher.AEAD{}}
	for i, line := range bytes.Split(b, []byte("\n")) {
		if j := bytes.IndexByte(line, '#'); j >= 0 {
			line = line[:j]
		}
		f := strings.Fields(string(line))
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("line %d: want \"<id> <64 hex digits>\"", i+1)
		}
		id := f[0]
		if !idRE.MatchString(id) {
			return nil, fmt.Errorf("line %d: key id %q: want 1..32 letters, digits, '.', '_' or '-'", i+1, id)
		}
		if _, dup := r.aead[id]; dup {
			return nil, fmt.Errorf("line %d: key id %q given twice", i+1, id)
		}
		k, err := hex.DecodeString(f[1])
		if err != nil || len(k) != KeyLen {
			return nil, fmt.Errorf("line %d: key %q: want %d hex digits", i+1, id, 2*KeyLen)
		}
		a, err := newAEAD(k)
		clear(k)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		r.aead[id] = a
		r.current = id
	}
	if r.current == "" {
		return nil, errors.New("no key in it")
	}
	return r, nil
}

func newAEAD(k []byte) (cipher.AEAD, error) {
	blk, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(blk)
}

// Current is the id new records are sealed under.
func (r *Ring) Current() string { return r.current }

// IDs lists the ids the ring opens, sorted.
func (r *Ring) IDs() []string {
	out := make([]string, 0, len(r.aead))
	for id := range r.aead {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// Has reports whether the ring opens records sealed under id.
func (r *Ring) Has(id string) bool { _, ok := r.aead[id]; return ok }

// Seal encrypts plain under the current key, bound to ad (what the
// record is: its name), and returns the key id and nonce||ciphertext.
func (r *Ring) Seal(plain, ad []byte) (string, []byte) {
	a := r.aead[r.current]
	out := make([]byte, a.NonceSize(), a.NonceSize()+len(plain)+a.Overhead())
	if _, err := rand.Read(out); err != nil {
		panic("kek: no randomness: " + err.Error()) // crypto/rand never fails on Linux ≥ 3.17
	}
	return r.current, a.Seal(out, out, plain, ad)
}

// Open decrypts a record Seal made under id with the same ad.
func (r *Ring) Open(id string, sealed, ad []byte) ([]byte, error) {
	a, ok := r.aead[id]
	if !ok {
		return nil, fmt.Errorf("%w %q (this gateway holds %s)", ErrUnknownKey, id, strings.Join(r.IDs(), ", "))
	}
	if len(sealed) < a.NonceSize()+a.Overhead() {
		return nil, fmt.Errorf("key id %q: %w: %d bytes is too short", id, ErrOpen, len(sealed))
	}
	n := a.NonceSize()
	plain, err := a.Open(nil, sealed[:n], sealed[n:], ad)
	if err != nil {
		return nil, fmt.Errorf("key id %q: %w", id, ErrOpen)
	}
	return plain, nil
}
