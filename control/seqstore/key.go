package seqstore

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"io"
	"net/netip"
	"sync"
)

// Key names one outbound SA's sequence space: its identity and its key
// material together, so a reused SPI with a new key starts fresh while the
// same key always continues. Only the store that made it can interpret it.
type Key [16]byte

func (k Key) String() string { return hex.EncodeToString(k[:]) }

// KeyFor derives the record key of an SA:
//
//	HMAC-SHA256(storeSecret, dir || spi || peer || proposal || encKey || authKey)[:16]
//
// with every variable-length field length-prefixed so that no two inputs
// encode alike. The secret is per store, so the log holds no plain hash of
// any key that could be checked against a guessed or leaked key elsewhere.
//
// The inputs must be the ones that stay fixed for the SA's lifetime:
//   - peer is the configured peer address and encap port (sad's outbound
//     identity), never the current NAT binding. A binding that moved before
//     a crash would otherwise give the SA a new key and a restart at 1 with
//     the same cipher key: exactly the reuse this package exists to stop.
//     An IPv4-mapped IPv6 address is unmapped so both spellings agree.
//   - proposal is the canonical keyword (esp.Proposal.String()), not an
//     alias an operator happened to type.
//   - encKey includes the AEAD salt, as SA files carry it.
//
// Anything that makes two spellings of one SA differ costs safety, not
// just space; anything that makes two SAs with different key material
// collide costs only a skipped block, because High never goes down.
func (s *Store) KeyFor(dir string, spi uint32, peer netip.AddrPort, proposal string, encKey, authKey []byte) Key {
	m := s.macs.Get().(hash.Hash)
	defer s.macs.Put(m)
	m.Reset()
	var b [32]byte

	writeField(m, []byte(dir))

	binary.BigEndian.PutUint32(b[:4], spi)
	m.Write(b[:4])

	addr := peer.Addr().Unmap()
	switch {
	case addr.Is4():
		b[0] = 4
	case addr.Is6():
		b[0] = 6
	default: // the zero Addr: still distinct from every real address
		b[0] = 0
	}
	var a16 [16]byte
	if addr.IsValid() {
		a16 = addr.As16()
	}
	copy(b[1:17], a16[:])
	binary.BigEndian.PutUint16(b[17:19], peer.Port())
	m.Write(b[:19])
	writeField(m, []byte(addr.Zone()))

	writeField(m, []byte(proposal))
	writeField(m, encKey)
	writeField(m, authKey)

	var k Key
	copy(k[:], m.Sum(b[:0]))
	return k
}

// newMACPool returns a pool of HMAC states keyed with the store secret:
// KeyFor runs once per SA install, a million times at startup.
func newMACPool(secret []byte) *sync.Pool {
	return &sync.Pool{New: func() any { return hmac.New(sha256.New, secret) }}
}

func writeField(m io.Writer, p []byte) {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(p)))
	m.Write(n[:])
	m.Write(p)
}
