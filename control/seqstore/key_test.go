package seqstore

import (
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
