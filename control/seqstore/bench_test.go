package seqstore

import (
	"net/netip"
	"testing"
)

// benchReserve measures one Reserve call of n keys, each raising every
// key's mark, so every call appends n records and pays one fdatasync.
// Automatic compaction runs when it would in production and is part of
// the figure.
func benchReserve(b *testing.B, n int) {
	s := open(b, b.TempDir(), Options{})
	batch := make([]Reservation, n)
	for i := range batch {
		batch[i].Key = testKey(i)
	}
	b.SetBytes(int64(n * recordSize))
	b.ReportAllocs()
	var high uint64
	for b.Loop() {
		high++
		for i := range batch {
			batch[i].High = high
		}
		if err := s.Reserve(batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "keys/s")
	st := s.Stats()
	b.ReportMetric(float64(st.Compactions), "compactions")
}

func BenchmarkReserve1(b *testing.B)     { benchReserve(b, 1) }
func BenchmarkReserve10000(b *testing.B) { benchReserve(b, 10_000) }

func BenchmarkKeyFor(b *testing.B) {
	s := open(b, b.TempDir(), Options{})
	peer := netip.MustParseAddrPort("192.0.2.10:4500")
	enc := make([]byte, 20)
	b.ReportAllocs()
	for b.Loop() {
		s.KeyFor("out", 0x1001, peer, "aes128gcm16", enc, nil)
	}
}
