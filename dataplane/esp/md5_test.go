package esp

import (
	"bytes"
	"crypto/hmac"
	"crypto/md5"
	"encoding/hex"
	"math/rand/v2"
	"testing"
)

// TestHMACMD596KnownAnswers runs RFC 2202 section 2 test cases 1-3 through
// the engine's own ICV computation, truncated to 96 bits as RFC 2403
// specifies. Case 2's 4-byte key "Jefe" is given zero-padded to 16 bytes:
// HMAC pads every key shorter than the block with zeros, so the MAC is the
// same.
func TestHMACMD596KnownAnswers(t *testing.T) {
	for i, tc := range []struct {
		key, data []byte
		digest    string
	}{
		{bytes.Repeat([]byte{0x0b}, 16), []byte("Hi There"), "9294727a3638bb1c13f48ef8158bfc9d"},
		{append([]byte("Jefe"), make([]byte, 12)...), []byte("what do ya want for nothing?"), "750c783e6ab0b503eaa86e310a5db738"},
		{bytes.Repeat([]byte{0xaa}, 16), bytes.Repeat([]byte{0xdd}, 50), "56be34521d144c88dbb8c733f0e8b3f6"},
	} {
		for _, p := range []Proposal{NullMD5, AES128MD5, AES256MD5} {
			sa, err := NewTransform(Config{SPI: 0x100, Proposal: p, EncKey: make([]byte, p.EncKeyLen()), AuthKey: tc.key, Mode: ModeTransport})
			if err != nil {
				t.Fatal(err)
			}
			want, _ := hex.DecodeString(tc.digest)
			if got := sa.hmacSum(tc.data, 0); !bytes.Equal(got, want[:12]) {
				t.Errorf("case %d %v: ICV %x, want %x", i+1, p, got, want[:12])
			}
		}
	}
}

// TestMD5SealedICV seals packets with the MD5 proposals and checks each ICV
// independently with crypto/hmac over the ESP header through the trailer
// (plus the implicit high sequence bits with ESN); a flipped ICV bit must be
// refused as an integrity failure.
func TestMD5SealedICV(t *testing.T) {
	rng := rand.New(rand.NewPCG(71, 72))
	for _, p := range []Proposal{NullMD5, AES128MD5, AES256MD5} {
		if p.AuthKeyLen() != 16 || p.ICVLen() != 12 || p.AEAD() || !p.HasIntegrity() {
			t.Fatalf("%v: auth key %d, icv %d", p, p.AuthKeyLen(), p.ICVLen())
		}
		for _, esn := range []bool{false, true} {
			ak := randBytes(rng, 16)
			c := Config{SPI: 0x2000, Proposal: p, EncKey: randBytes(rng, p.EncKeyLen()), AuthKey: ak, ESN: esn, ReplayWindow: 64, Mode: ModeTransport}
			out, err := NewTransform(c)
			if err != nil {
				t.Fatal(err)
			}
			in, err := NewTransform(c)
			if err != nil {
				t.Fatal(err)
			}
			if esn {
				_ = out.SetNextSeq(1<<32 + 7)
				// The receiver infers the high sequence bits from its window.
				in.Replay().Update(1<<32 + 1)
			}
			buf := make([]byte, 256)
			payload := randBytes(rng, 37)
			copy(buf[out.Headroom():], payload)
			s, e, err := out.Seal(buf, out.Headroom(), len(payload), 17, 0)
			if err != nil {
				t.Fatal(err)
			}
			wire := buf[s:e]
			m := hmac.New(md5.New, ak)
			m.Write(wire[:len(wire)-12])
			if esn {
				m.Write([]byte{0, 0, 0, 1}) // seq 1<<32 + 7
			}
			if want := m.Sum(nil)[:12]; !bytes.Equal(wire[len(wire)-12:], want) {
				t.Fatalf("%v esn=%v: ICV %x, HMAC-MD5-96 %x", p, esn, wire[len(wire)-12:], want)
			}
			bad := bytes.Clone(wire)
			bad[len(bad)-1] ^= 1
			if _, err := in.Open(bad); ReasonOf(err) != ReasonIntegrity {
				t.Fatalf("%v: flipped ICV: %v", p, err)
			}
			if _, err := in.Open(wire); err != nil {
				t.Fatalf("%v esn=%v: open: %v", p, esn, err)
			}
			if got := wire[8+p.IVLen() : 8+p.IVLen()+len(payload)]; p == NullMD5 && !bytes.Equal(got, payload) {
				t.Fatalf("%v: opened payload %x, want %x", p, got, payload)
			}
		}
	}
}

// TestMD5RejectAllocFree: refusing a forged packet on the HMAC-MD5 path
// allocates nothing, like the AEAD path TestReasonsAllocFree covers.
func TestMD5RejectAllocFree(t *testing.T) {
	rng := rand.New(rand.NewPCG(73, 74))
	for _, p := range []Proposal{NullMD5, AES128MD5} {
		_, in := pair(t, p, ModeTunnel, false, 64, rng)
		junk := randBytes(rng, 100)
		copy(junk, []byte{byte(in.SPI() >> 24), byte(in.SPI() >> 16), byte(in.SPI() >> 8), byte(in.SPI()), 0, 0, 0, 5})
		var c Counters
		allocs := testing.AllocsPerRun(100, func() {
			_, err := in.Open(junk)
			c.Count(err)
		})
		if allocs != 0 {
			t.Errorf("%v: rejecting a packet allocated %v times", p, allocs)
		}
		if c[ReasonIntegrity] != 101 {
			t.Errorf("%v: counted %v", p, c)
		}
	}
}
