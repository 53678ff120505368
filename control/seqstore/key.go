package seqstore

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
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
	// The input is laid out in one buffer and hashed with one Write: the
	// HMAC's per-Write cost was most of KeyFor's, which runs once per SA
	// install (a million times at a large start). Same bytes as writing
	// each field in turn.
	st := s.macs.Get().(*keyState)
	msg := st.buf[:0]
	msg = appendField(msg, []byte(dir))
	msg = binary.BigEndian.AppendUint32(msg, spi)

	addr := peer.Addr().Unmap()
	switch {
	case addr.Is4():
		msg = append(msg, 4)
	case addr.Is6():
		msg = append(msg, 6)
	default: // the zero Addr: still distinct from every real address
		msg = append(msg, 0)
	}
	var a16 [16]byte
	if addr.IsValid() {
		a16 = addr.As16()
	}
	msg = append(msg, a16[:]...)
	msg = binary.BigEndian.AppendUint16(msg, peer.Port())
	msg = appendField(msg, []byte(addr.Zone()))

	msg = appendField(msg, []byte(proposal))
	msg = appendField(msg, encKey)
	msg = appendField(msg, authKey)

	st.mac.Reset()
	st.mac.Write(msg)
	var k Key
	copy(k[:], st.mac.Sum(st.sum[:0]))
	clear(msg) // key material
	st.buf = msg[:0]
	s.macs.Put(st)
	return k
}

// keyState is one KeyFor's reusable HMAC and buffers, pooled: nothing is
// allocated per call.
type keyState struct {
	mac hash.Hash
	buf []byte
	sum [sha256.Size]byte
}

func appendField(b, p []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

// newMACPool returns a pool of HMAC states keyed with the store secret:
// KeyFor runs once per SA install, a million times at startup.
func newMACPool(secret []byte) *sync.Pool {
	return &sync.Pool{New: func() any { return &keyState{mac: hmac.New(sha256.New, secret), buf: make([]byte, 0, 192)} }}
}
