package esp

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"fmt"
	"hash"
	"math/rand/v2"
	"testing"

	"golang.org/x/crypto/chacha20poly1305"
)

var benchSizes = []int{64, 200, 600, 1400}

// benchProposals: one per algorithm family (key sizes behave alike).
var benchProposals = []Proposal{AES128GCM16, AES256GCM16, AES128GCM8, ChaCha20Poly1305, AES128SHA1, AES128SHA256, NullSHA1}

// bare is the primitive under an ESP proposal, on the same n bytes, with
// instances built once: the ceiling ESP's own work is measured against.
type bare struct {
	aead  cipher.AEAD
	cbcE  ivBlockMode
	cbcD  ivBlockMode
	mac   hash.Hash
	icv   int
	nonce [12]byte
	aad   [8]byte
	sum   [32]byte
	iv    [16]byte
}

func newBare(p Proposal) *bare {
	b := &bare{icv: p.ICVLen()}
	key := make([]byte, 32)
	switch {
	case p == ChaCha20Poly1305:
		b.aead, _ = chacha20poly1305.New(key)
	case p.AEAD():
		blk, _ := aes.NewCipher(key[:p.EncKeyLen()-4])
		b.aead, _ = cipher.NewGCM(blk)
	case p.info().cbc:
		blk, _ := aes.NewCipher(key[:p.EncKeyLen()])
		b.cbcE = cipher.NewCBCEncrypter(blk, b.iv[:]).(ivBlockMode)
		b.cbcD = cipher.NewCBCDecrypter(blk, b.iv[:]).(ivBlockMode)
	}
	if b.aead != nil {
		b.icv = b.aead.Overhead() // gcm8's bare primitive is full-tag GCM
	}
	switch p.AuthKeyLen() {
	case 20:
		b.mac = hmac.New(sha1.New, key[:20])
	case 32:
		b.mac = hmac.New(sha256.New, key)
	}
	return b
}

// bareLen is the length the primitive runs on: n, rounded up to the block
// for CBC.
func bareLen(p Proposal, n int) int {
	if p.info().cbc {
		return (n + 15) &^ 15
	}
	return n
}

func (b *bare) seal(buf []byte, n int) {
	switch {
	case b.aead != nil:
		b.aead.Seal(buf[:0], b.nonce[:], buf[:n], b.aad[:])
	case b.cbcE != nil:
		b.cbcE.SetIV(b.iv[:])
		b.cbcE.CryptBlocks(buf[:n], buf[:n])
	}
	if b.mac != nil {
		b.mac.Reset()
		b.mac.Write(buf[:n])
		copy(buf[n:], b.mac.Sum(b.sum[:0])[:b.icv])
	}
}

func (b *bare) open(buf []byte, n int) error {
	switch {
	case b.aead != nil:
		_, err := b.aead.Open(buf[:0], b.nonce[:], buf[:n+b.icv], b.aad[:])
		return err
	case b.mac != nil:
		b.mac.Reset()
		b.mac.Write(buf[:n])
		if !hmac.Equal(b.mac.Sum(b.sum[:0])[:b.icv], buf[n:n+b.icv]) {
			return ErrIntegrity
		}
	}
	if b.cbcD != nil {
		b.cbcD.SetIV(b.iv[:])
		b.cbcD.CryptBlocks(buf[:n], buf[:n])
	}
	return nil
}

func BenchmarkSeal(b *testing.B) {
	rng := rand.New(rand.NewPCG(41, 42))
	for _, p := range benchProposals {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%v/%d", p, n), func(b *testing.B) {
				out, _ := pair(b, p, ModeTunnel, false, 0, rng)
				payload := innerIP(rng, false, n)
				hr := out.Headroom()
				buf := make([]byte, hr+n+out.MaxTailroom())
				b.SetBytes(int64(n))
				b.ReportAllocs()
				for b.Loop() {
					copy(buf[hr:], payload)
					if _, _, err := out.Seal(buf, hr, n, NextHeaderIPv4, 0); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkBareSeal(b *testing.B) {
	rng := rand.New(rand.NewPCG(41, 42))
	for _, p := range benchProposals {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%v/%d", p, n), func(b *testing.B) {
				bb := newBare(p)
				m := bareLen(p, n)
				payload := randBytes(rng, m)
				buf := make([]byte, m+32)
				b.SetBytes(int64(n))
				b.ReportAllocs()
				for b.Loop() {
					copy(buf, payload)
					bb.seal(buf, m)
				}
			})
		}
	}
}

// openRing is how many distinct sealed packets the open benchmarks cycle
// through: opening is in place and the replay window rejects repeats, so
// each iteration copies a pristine packet and the window is reset once per
// ring (amortised to nothing).
const openRing = 1024

func BenchmarkOpen(b *testing.B) {
	rng := rand.New(rand.NewPCG(43, 44))
	for _, p := range benchProposals {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%v/%d", p, n), func(b *testing.B) {
				out, in := pair(b, p, ModeTunnel, false, DefaultReplayWindow, rng)
				payload := innerIP(rng, false, n)
				hr := out.Headroom()
				pkts := make([][]byte, openRing)
				for i := range pkts {
					buf := make([]byte, hr+n+out.MaxTailroom())
					copy(buf[hr:], payload)
					s, e, err := out.Seal(buf, hr, n, NextHeaderIPv4, 0)
					if err != nil {
						b.Fatal(err)
					}
					pkts[i] = buf[s:e]
				}
				work := make([]byte, len(pkts[0]))
				empty := ReplayState{Bitmap: make([]uint64, DefaultReplayWindow/64)}
				b.SetBytes(int64(n))
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					if i == openRing {
						i = 0
						_ = in.Replay().Import(empty)
					}
					copy(work, pkts[i])
					if _, err := in.Open(work); err != nil {
						b.Fatal(err)
					}
					i++
				}
			})
		}
	}
}

func BenchmarkBareOpen(b *testing.B) {
	rng := rand.New(rand.NewPCG(43, 44))
	for _, p := range benchProposals {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%v/%d", p, n), func(b *testing.B) {
				bb := newBare(p)
				m := bareLen(p, n)
				buf := make([]byte, m+32)
				copy(buf, randBytes(rng, m))
				bb.seal(buf, m)
				pristine := append([]byte(nil), buf...)
				b.SetBytes(int64(n))
				b.ReportAllocs()
				for b.Loop() {
					copy(buf, pristine)
					if err := bb.open(buf, m); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
