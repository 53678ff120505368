package esp

import (
	"bytes"
	"errors"

	"testing"
)

// The lazy AEADs build their cipher on first use; a released cipher is
// rebuilt from the kept key and goes on exactly where it was: the same
// bytes on the wire as an SA that never released, sequence numbers
// continuing, the receiver's replay window intact. A wiped SA refuses to
// work rather than run on a zero key.
func TestReleaseRebuild(t *testing.T) {
	for _, p := range []Proposal{AES128GCM16, AES256GCM16, AES128GCM12, ChaCha20Poly1305} {
		t.Run(p.String(), func(t *testing.T) {
			key := make([]byte, p.EncKeyLen())
			for i := range key {
				key[i] = byte(i*7 + 1)
			}
			mk := func(window int) *Transform {
				sa, err := NewTransform(Config{SPI: 0x4242, Proposal: p, EncKey: key, ReplayWindow: window, Mode: ModeTunnel})
				if err != nil {
					t.Fatal(err)
				}
				return sa
			}
			tx, ref, rx := mk(0), mk(0), mk(DefaultReplayWindow)
			if !tx.Cold() || !rx.Cold() {
				t.Fatal("a new SA built its cipher before its first packet")
			}
			inner := []byte{0x45, 0, 0, 24, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 1, 2, 3, 4}
			var last []byte
			for i := 1; i <= 6; i++ {
				if i%2 == 0 {
					if !tx.Release() || !rx.Release() {
						t.Fatalf("packet %d: nothing to release", i)
					}
					if !tx.Cold() || tx.Release() {
						t.Fatal("released SA still warm")
					}
				}
				buf := make([]byte, 256)
				copy(buf[64:], inner)
				s, e, err := tx.Seal(buf, 64, len(inner), NextHeaderIPv4, 0)
				if err != nil {
					t.Fatal(err)
				}
				want := make([]byte, 256)
				copy(want[64:], inner)
				rs, re, _ := ref.Seal(want, 64, len(inner), NextHeaderIPv4, 0)
				if !bytes.Equal(buf[s:e], want[rs:re]) {
					t.Fatalf("packet %d: sealed after a release differs from the never-released SA", i)
				}
				last = append(last[:0], buf[s:e]...)
				res, err := rx.Open(buf[s:e])
				if err != nil || res.Seq != uint64(i) || !bytes.Equal(buf[s+res.Start:s+res.End], inner) {
					t.Fatalf("packet %d: open %+v %v", i, res, err)
				}
			}
			if tx.NextSeq() != 7 || rx.Replay().Top() != 6 {
				t.Fatalf("next seq %d, replay top %d", tx.NextSeq(), rx.Replay().Top())
			}
			rx.Release()
			if _, err := rx.Open(last); !errors.Is(err, ReasonReplay) {
				t.Fatalf("replayed packet after a release: %v", err)
			}
			tx.Wipe()
			rx.Wipe()
			if tx.key != [32]byte{} || !tx.Cold() {
				t.Fatal("wipe left key bytes or a cipher")
			}
			buf := make([]byte, 256)
			if _, _, err := tx.Seal(buf, 64, len(inner), NextHeaderIPv4, 0); !errors.Is(err, ReasonInvalid) {
				t.Fatalf("seal on a wiped SA: %v", err)
			}
			if tx.NextSeq() != 7 {
				t.Fatal("a refused seal spent a sequence number")
			}
		})
	}
}

// BenchmarkWarm is the first-packet cost of a cold (idle-released) SA:
// building its cipher from the key.
func BenchmarkWarm(b *testing.B) {
	for _, p := range []Proposal{AES128GCM16, AES256GCM16, ChaCha20Poly1305} {
		b.Run(p.String(), func(b *testing.B) {
			sa, err := NewTransform(Config{SPI: 0x4242, Proposal: p, EncKey: make([]byte, p.EncKeyLen()), Mode: ModeTunnel})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for range b.N {
				sa.Release()
				if err := sa.Warm(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
