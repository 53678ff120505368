package esp

import (
	"crypto/subtle"
	"encoding/binary"
)

// Result describes an opened packet. Offsets are into the slice given to
// Open.
type Result struct {
	// Start and End bound the Payload Data: tunnel mode the inner IP packet
	// (TFC padding trimmed by the inner length), transport mode the
	// upper-layer segment.
	Start, End int
	NextHeader uint8
	PadLen     uint8
	// Seq is the full sequence number (ESN high bits inferred).
	Seq uint64
}

// Open authenticates and decrypts the ESP packet pkt (SPI through ICV, its
// exact length) in place, in the order of RFC 4303 3.4: SPI, replay
// pre-check, integrity (constant time), decryption, replay window update,
// then padding and Next Header checks. A packet that authenticates updates
// the window even when its padding or Next Header is then rejected: the peer
// did send it.
//
// Errors are Reason values. ReasonDummy comes with a filled Result: the
// packet was valid and is to be discarded. When integrity fails nothing is
// decrypted: HMAC and 8-byte-ICV GCM proposals leave pkt as it was, Go's
// AEADs zero the ciphertext they were given.
func (sa *Transform) Open(pkt []byte) (Result, error) {
	var res Result
	hdr := 8 + int(sa.ivLen)
	icv := int(sa.icv)
	cbc := sa.info().cbc
	minCT := 2 // Pad Length and Next Header
	if cbc {
		minCT = 16
	}
	if len(pkt) < hdr+minCT+icv {
		return res, ReasonRunt
	}
	ctEnd := len(pkt) - icv
	if cbc && (ctEnd-hdr)%16 != 0 {
		return res, ReasonTruncated
	}
	if binary.BigEndian.Uint32(pkt) != sa.spi {
		return res, ReasonNoSA
	}
	seq, r := sa.replay.Check(binary.BigEndian.Uint32(pkt[4:]))
	res.Seq = seq
	if r != ReasonNone {
		return res, r
	}
	if sa.lazy && sa.aead == nil && sa.Warm() != nil {
		return res, ReasonInvalid
	}

	switch {
	case sa.gcm8:
		if !sa.openGCM8(pkt, ctEnd, seq) {
			return res, ReasonIntegrity
		}
	case sa.aead != nil:
		copy(sa.nonce[4:], pkt[8:16])
		ct := pkt[hdr:]
		if _, err := sa.aead.Open(ct[:0], sa.nonce[:], ct, sa.aadFor(pkt, seq)); err != nil {
			return res, ReasonIntegrity
		}
	default:
		if sa.ext != nil && sa.ext.mac != nil {
			want := sa.hmacSum(pkt[:ctEnd], seq)
			if subtle.ConstantTimeCompare(want, pkt[ctEnd:]) != 1 {
				return res, ReasonIntegrity
			}
		}
		if sa.ext != nil && sa.ext.cbcDec != nil {
			sa.ext.cbcDec.SetIV(pkt[8:hdr])
			ct := pkt[hdr:ctEnd]
			sa.ext.cbcDec.CryptBlocks(ct, ct)
		}
	}
	sa.replay.Update(seq)

	padLen := int(pkt[ctEnd-2])
	nh := pkt[ctEnd-1]
	res.NextHeader, res.PadLen = nh, uint8(padLen)
	payEnd := ctEnd - 2 - padLen
	if payEnd < hdr {
		return res, ReasonPadding
	}
	for i := 0; i < padLen; i++ {
		if pkt[payEnd+i] != byte(i+1) {
			return res, ReasonPadding
		}
	}
	res.Start, res.End = hdr, payEnd
	if nh == NextHeaderDummy {
		return res, ReasonDummy
	}
	if sa.mode == ModeTunnel {
		n, ok := innerLen(pkt[hdr:payEnd], nh)
		if !ok {
			return res, ReasonNextHeader
		}
		res.End = hdr + n
	} else if nh == 0 || nh == 255 {
		// Hop-by-hop options must follow the IPv6 header directly, and 255
		// is reserved: neither can be an ESP payload.
		return res, ReasonNextHeader
	}
	return res, nil
}

// innerLen checks that a tunnel-mode payload is the IP packet its Next
// Header says and returns that packet's own length, which excludes TFC
// padding (RFC 4303 2.7).
func innerLen(p []byte, nh uint8) (int, bool) {
	switch nh {
	case NextHeaderIPv4:
		if len(p) < 20 || p[0]>>4 != 4 {
			return 0, false
		}
		tl := int(binary.BigEndian.Uint16(p[2:]))
		if tl < 20 || tl > len(p) {
			return 0, false
		}
		return tl, true
	case NextHeaderIPv6:
		if len(p) < 40 || p[0]>>4 != 6 {
			return 0, false
		}
		pl := int(binary.BigEndian.Uint16(p[4:]))
		if pl == 0 { // jumbogram or empty: nothing to trim by
			return len(p), true
		}
		if 40+pl > len(p) {
			return 0, false
		}
		return 40 + pl, true
	}
	return 0, false
}
