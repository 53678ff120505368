package seqstore

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"net/netip"
	"testing"
)

type keyInput struct {
	dir      string
	spi      uint32
	peer     netip.AddrPort
	proposal string
	enc, au  []byte
}

func (in keyInput) key(s *Store) Key {
	return s.KeyFor(in.dir, in.spi, in.peer, in.proposal, in.enc, in.au)
}

func TestKeyFor(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	base := keyInput{
		dir:      "out",
		spi:      0x1001,
		peer:     netip.MustParseAddrPort("192.0.2.10:4500"),
		proposal: "aes128-sha1",
		enc:      []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
		au:       []byte{0xaa, 0xbb, 0xcc},
	}
	k0 := base.key(s)
	if k0 != base.key(s) {
		t.Fatal("KeyFor is not deterministic")
	}

	variants := map[string]func(*keyInput){
		"dir":        func(in *keyInput) { in.dir = "in" },
		"spi":        func(in *keyInput) { in.spi = 0x1002 },
		"spi byte 3": func(in *keyInput) { in.spi = 0x01001001 },
		"peer addr":  func(in *keyInput) { in.peer = netip.MustParseAddrPort("192.0.2.11:4500") },
		"peer port":  func(in *keyInput) { in.peer = netip.MustParseAddrPort("192.0.2.10:4501") },
		"peer v6":    func(in *keyInput) { in.peer = netip.MustParseAddrPort("[2001:db8::10]:4500") },
		"peer zero":  func(in *keyInput) { in.peer = netip.AddrPort{} },
		"proposal":   func(in *keyInput) { in.proposal = "aes128-sha256" },
		"enc bit":    func(in *keyInput) { in.enc = flip(in.enc, 15) },
		"enc longer": func(in *keyInput) { in.enc = append(append([]byte{}, in.enc...), 0) },
		"auth bit":   func(in *keyInput) { in.au = flip(in.au, 0) },
		"auth empty": func(in *keyInput) { in.au = nil },
		// Length prefixes: moving a byte across a field boundary must matter.
		"enc->auth": func(in *keyInput) {
			in.enc, in.au = in.enc[:15], append([]byte{in.enc[15]}, in.au...)
		},
		"proposal->enc": func(in *keyInput) {
			in.proposal, in.enc = "aes128-sha", append([]byte("1"), in.enc...)
		},
	}
	seen := map[Key]string{k0: "base"}
	for name, mod := range variants {
		in := base
		mod(&in)
		k := in.key(s)
		if other, dup := seen[k]; dup {
			t.Errorf("%s gives the same key as %s", name, other)
		}
		seen[k] = name
	}

	// Both spellings of one IPv4 peer are one SA.
	mapped := base
	mapped.peer = netip.MustParseAddrPort("[::ffff:192.0.2.10]:4500")
	if mapped.key(s) != k0 {
		t.Error("IPv4-mapped peer gives a different key than plain IPv4")
	}

	// The key depends on the store's secret, and the secret persists.
	other := open(t, t.TempDir(), Options{})
	if base.key(other) == k0 {
		t.Error("two stores derive the same key: the secret is not used")
	}
	s = reopen(t, s, Options{})
	if base.key(s) != k0 {
		t.Fatal("KeyFor changed across Close/Open: every SA would restart at 1")
	}
}

func flip(b []byte, i int) []byte {
	c := append([]byte{}, b...)
	c[i] ^= 1
	return c
}

// TestKeyForUnchanged: KeyFor hashes exactly the bytes the original
// field-by-field writer did, so the records a store already holds keep
// naming their SAs (a changed key would restart a sequence at 1 under the
// same cipher key).
func TestKeyForUnchanged(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	field := func(m hash.Hash, p []byte) {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(p)))
		m.Write(n[:])
		m.Write(p)
	}
	reference := func(in keyInput) Key {
		m := hmac.New(sha256.New, s.hdr.secret[:])
		var b [32]byte
		field(m, []byte(in.dir))
		binary.BigEndian.PutUint32(b[:4], in.spi)
		m.Write(b[:4])
		addr := in.peer.Addr().Unmap()
		switch {
		case addr.Is4():
			b[0] = 4
		case addr.Is6():
			b[0] = 6
		default:
			b[0] = 0
		}
		var a16 [16]byte
		if addr.IsValid() {
			a16 = addr.As16()
		}
		copy(b[1:17], a16[:])
		binary.BigEndian.PutUint16(b[17:19], in.peer.Port())
		m.Write(b[:19])
		field(m, []byte(addr.Zone()))
		field(m, []byte(in.proposal))
		field(m, in.enc)
		field(m, in.au)
		var k Key
		copy(k[:], m.Sum(nil))
		return k
	}
	for i, in := range []keyInput{
		{"rx/in", 0x1001, netip.MustParseAddrPort("192.0.2.10:4500"), "aes128gcm16", make([]byte, 20), nil},
		{"out", 0xc0000001, netip.MustParseAddrPort("[2001:db8::1%eth0]:4500"), "aes256-sha256", make([]byte, 32), make([]byte, 32)},
		{"out", 7, netip.AddrPort{}, "null-sha1", nil, []byte{1, 2, 3}},
		{"rx/out", 0xffffffff, netip.MustParseAddrPort("[::ffff:192.0.2.1]:1"), "chacha20poly1305", make([]byte, 36), nil},
	} {
		if got, want := in.key(s), reference(in); got != want {
			t.Errorf("input %d: KeyFor %s, the field-by-field derivation %s", i, got, want)
		}
	}
}
