package esp

import "encoding/binary"

// Next Header values the engine gives meaning to.
const (
	NextHeaderIPv4  = 4
	NextHeaderIPv6  = 41
	NextHeaderDummy = 59 // RFC 4303 2.6: "no next header", a dummy packet
)

// Seal turns buf[off:off+n] into an ESP packet in place: it writes the ESP
// header and IV into the Headroom() bytes before off, tfc zero bytes of TFC
// padding (RFC 4303 2.7; only meaningful when the payload carries its own
// length, i.e. tunnel mode), the padding, trailer and ICV after the payload,
// and encrypts. buf[start:end] is the ESP packet, SPI to ICV.
//
// The caller guarantees off >= Headroom() and len(buf) >= off+n+Tailroom(n,
// tfc); otherwise ReasonNoRoom. When the sequence space is exhausted Seal
// returns ReasonSeqCycled and never wraps: the SA must be rekeyed.
func (sa *Transform) Seal(buf []byte, off, n int, nextHeader uint8, tfc int) (start, end int, err error) {
	if sa.seq >= sa.maxSeq() {
		return 0, 0, ReasonSeqCycled
	}
	seq := sa.seq + 1
	start, end, err = sa.seal(buf, off, n, nextHeader, tfc, seq, nil)
	if err == nil {
		sa.seq = seq
	}
	return start, end, err
}

// seal is Seal with an explicit sequence number and, for the published
// vectors only, an explicit IV (nil: the SA's own IV discipline). It leaves
// the counter alone.
func (sa *Transform) seal(buf []byte, off, n int, nextHeader uint8, tfc int, seq uint64, iv []byte) (int, int, error) {
	hdr := 8 + int(sa.ivLen)
	if n < 0 || tfc < 0 || off < 0 {
		return 0, 0, ReasonInvalid
	}
	if sa.lazy && sa.aead == nil && sa.Warm() != nil {
		return 0, 0, ReasonInvalid
	}
	if off < hdr || n > len(buf) || tfc > len(buf) || off > len(buf)-n-tfc {
		return 0, 0, ReasonNoRoom
	}
	pad := sa.padLen(n + tfc)
	ptEnd := off + n + tfc + pad + 2 // end of the plaintext to encrypt
	end := ptEnd + int(sa.icv)
	need := end
	if sa.gcm8 {
		need += 8
	}
	if need > len(buf) {
		return 0, 0, ReasonNoRoom
	}
	start := off - hdr

	p := off + n
	clear(buf[p : p+tfc])
	p += tfc
	for i := 1; i <= pad; i++ {
		buf[p] = byte(i)
		p++
	}
	buf[p] = byte(pad)
	buf[p+1] = nextHeader

	sa.protect(buf, start, off, ptEnd, seq, iv)
	return start, end, nil
}

// protect writes the ESP header and IV at buf[start:off], encrypts the
// plaintext buf[off:ptEnd] (payload and trailer, already in place) and
// writes the ICV after it. Split from seal so tests can protect trailers
// seal would never write (bad padding).
func (sa *Transform) protect(buf []byte, start, off, ptEnd int, seq uint64, iv []byte) {
	binary.BigEndian.PutUint32(buf[start:], sa.spi)
	binary.BigEndian.PutUint32(buf[start+4:], uint32(seq))
	ivb := buf[start+8 : off]

	switch {
	case sa.aead != nil:
		// RFC 4106 3.1 / RFC 7634 2: the IV is the 64-bit sequence number,
		// unique per packet under the key by construction.
		if iv != nil {
			copy(ivb, iv)
		} else {
			binary.BigEndian.PutUint64(ivb, seq)
		}
		copy(sa.nonce[4:], ivb)
		aad := sa.aadFor(buf[start:], seq)
		pt := buf[off:ptEnd]
		sa.aead.Seal(pt[:0], sa.nonce[:], pt, aad)
		// gcm8: Go wrote a 16-byte tag; its first 8 bytes are the
		// truncated GCM tag (SP 800-38D 5.2.1.2), the rest falls in the
		// scratch past end.
	case sa.ext != nil && sa.ext.block != nil: // AES-CBC
		if iv != nil {
			copy(ivb, iv)
		} else {
			binary.BigEndian.PutUint64(sa.ext.ivSeed[:8], seq)
			sa.ext.block.Encrypt(ivb, sa.ext.ivSeed[:])
		}
		sa.ext.cbcEnc.SetIV(ivb)
		pt := buf[off:ptEnd]
		sa.ext.cbcEnc.CryptBlocks(pt, pt)
	}
	if sa.ext != nil && sa.ext.mac != nil {
		icv := sa.hmacSum(buf[start:ptEnd], seq)
		copy(buf[ptEnd:], icv)
	}
}

// aadFor returns the AAD of RFC 4106 5 / RFC 7634 2.1: SPI || seq (32 bit),
// or SPI || seq high || seq low with ESN. hdr starts at the SPI.
func (sa *Transform) aadFor(hdr []byte, seq uint64) []byte {
	if !sa.esn {
		return hdr[:8]
	}
	copy(sa.aad[:4], hdr[:4])
	binary.BigEndian.PutUint64(sa.aad[4:], seq)
	return sa.aad[:12]
}

// hmacSum computes the ICV over the ESP header through the trailer; with ESN
// the high 32 bits of the sequence number are appended implicitly (RFC 4303
// 2.2.1). The result aliases SA scratch and is truncated to the ICV length.
func (sa *Transform) hmacSum(b []byte, seq uint64) []byte {
	sa.ext.mac.Reset()
	sa.ext.mac.Write(b)
	if sa.esn {
		binary.BigEndian.PutUint32(sa.seqHi[:], uint32(seq>>32))
		sa.ext.mac.Write(sa.seqHi[:])
	}
	return sa.ext.mac.Sum(sa.ext.sum[:0])[:int(sa.icv)]
}
