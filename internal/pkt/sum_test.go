package pkt

import (
	"math/rand/v2"
	"testing"
)

// The eight-bytes-at-a-time sum against RFC 1071's worked example and a
// 16-bit-word reference, over every alignment and odd lengths.
func TestChecksum(t *testing.T) {
	// RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2; the
	// checksum is its complement.
	ex := []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}
	if s, c := Fold(Sum(ex, 0)), Checksum(ex); s != 0xddf2 || c != 0x220d {
		t.Fatalf("RFC 1071 example: sum %#x checksum %#x, want 0xddf2 0x220d", s, c)
	}
	ref := func(b []byte) uint16 {
		var s uint32
		for i := 0; i < len(b); i += 2 {
			w := uint32(b[i]) << 8
			if i+1 < len(b) {
				w |= uint32(b[i+1])
			}
			s += w
			s = s&0xffff + s>>16
		}
		return ^uint16(s)
	}
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 9000)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	for n := 0; n < 80; n++ {
		for off := 0; off < 8; off++ {
			if got, want := Checksum(buf[off:off+n]), ref(buf[off:off+n]); got != want {
				t.Fatalf("len %d at %d: %#x, want %#x", n, off, got, want)
			}
		}
	}
	for i := range buf {
		buf[i] = 0xff // the largest sums: carries at every step
	}
	if got, want := Checksum(buf), ref(buf); got != want {
		t.Fatalf("9000 bytes of 0xff: %#x, want %#x", got, want)
	}
}
