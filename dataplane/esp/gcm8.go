package esp

import (
	"crypto/subtle"
	"encoding/binary"
)

// Go's GCM refuses tags shorter than 12 bytes, but RFC 4106 also defines an
// 8-byte ICV, which is the first 8 bytes of the full tag. Sealing simply
// truncates. Opening cannot hand Go an 8-byte tag, so it recovers the full
// tag from a Seal whose additional data is the packet itself:
//
// GHASH is linear: GHASH_H(S) = sum S_i * H^(m-i+1). Seal(nonce, nil, X)
// with X = pad16(AAD) || C hashes pad16(AAD) || pad16(C) || len-block(X, 0),
// which has the same m blocks as the real input pad16(AAD) || pad16(C) ||
// len-block(AAD, C), and differs only in the last block, the one multiplied
// by H^1. Both tags are XORed with the same E_K(J0) (same nonce), so
//
//	tag = tagX XOR ((L_real XOR L_X) * H).
//
// pad16(AAD) is exactly the 16 bytes in front of C (SPI, seq, IV), so X is
// built in place by overwriting the header for the call and restoring it.
// Verified before anything is decrypted; decryption is CTR from counter 2.

// openGCM8 verifies and decrypts an 8-byte-ICV GCM packet in place.
func (sa *Transform) openGCM8(pkt []byte, ctEnd int, seq uint64) bool {
	const hdr = 16
	copy(sa.nonce[4:], pkt[8:16])
	var saved [hdr]byte
	copy(saved[:], pkt[:hdr])
	aad := sa.aadFor(saved[:], seq)
	aadLen := len(aad)
	copy(pkt[:hdr], aad)
	clear(pkt[aadLen:hdr])
	tagX := sa.aead.Seal(sa.ext.tag[:0], sa.nonce[:], nil, pkt[:ctEnd])
	copy(pkt[:hdr], saved[:])

	cLen := uint64(ctEnd - hdr)
	// Length blocks: real (8*len(AAD), 8*len(C)), X's (8*len(X), 0).
	d := [2]uint64{uint64(aadLen)*8 ^ (hdr+cLen)*8, cLen * 8}
	m := gfMul(d, sa.ext.hkey)
	binary.BigEndian.PutUint64(sa.ext.ks[:8], binary.BigEndian.Uint64(tagX[:8])^m[0])
	if subtle.ConstantTimeCompare(sa.ext.ks[:8], pkt[ctEnd:ctEnd+8]) != 1 {
		return false
	}
	sa.ctrXOR(pkt[hdr:ctEnd])
	return true
}

// ctrXOR applies GCM's CTR keystream (counter block salt || IV || i, i from
// 2) to b in place. cipher.NewCTR would allocate per packet; this runs the
// SA's AES block directly.
func (sa *Transform) ctrXOR(b []byte) {
	copy(sa.ext.ctr[:12], sa.nonce[:])
	ctr := uint32(2)
	for len(b) > 0 {
		binary.BigEndian.PutUint32(sa.ext.ctr[12:], ctr)
		sa.ext.block.Encrypt(sa.ext.ks[:], sa.ext.ctr[:])
		n := subtle.XORBytes(b, b, sa.ext.ks[:])
		b = b[n:]
		ctr++
	}
}

// gfMul multiplies in GF(2^128) with GCM's bit order (SP 800-38D
// algorithm 1); each element is two big-endian halves. Branch-free in the
// data so the key-derived H does not leak through timing.
func gfMul(x, y [2]uint64) [2]uint64 {
	var z0, z1 uint64
	v0, v1 := y[0], y[1]
	for i := 0; i < 128; i++ {
		w := x[0]
		if i >= 64 {
			w = x[1]
		}
		bit := (w >> (63 - uint(i&63))) & 1
		mask := -bit
		z0 ^= v0 & mask
		z1 ^= v1 & mask
		lsb := v1 & 1
		v1 = v1>>1 | v0<<63
		v0 = v0>>1 ^ (0xe1<<56)&-lsb
	}
	return [2]uint64{z0, z1}
}
