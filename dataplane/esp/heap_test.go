package esp

import (
	"runtime"
	"testing"
)

// BenchmarkSAHeap reports the Go heap one SA keeps, per proposal family,
// for an inbound SA with the default replay window and an outbound one
// without: the dominant per-SA cost of a gateway holding a million.
// heap_B/SA is an idle SA (as installed: the lazy AEADs' cipher not built),
// warm_B/SA one that carried a packet since (cipher built).
func BenchmarkSAHeap(b *testing.B) {
	for _, p := range []Proposal{AES128GCM16, AES128GCM8, ChaCha20Poly1305, AES128SHA256} {
		for _, w := range []int{DefaultReplayWindow, 0} {
			b.Run(p.String()+"/window="+itoa(w), func(b *testing.B) {
				const n = 10000
				c := Config{SPI: 0x1000, Proposal: p, EncKey: make([]byte, p.info().encKeyLen),
					AuthKey: make([]byte, p.info().authKeyLen), ReplayWindow: w, Mode: ModeTunnel}
				keep := make([]*Transform, n)
				var before, after, warm runtime.MemStats
				for range b.N {
					clear(keep) // the previous round's SAs are not this one's
					runtime.GC()
					runtime.ReadMemStats(&before)
					for i := range keep {
						sa, err := NewTransform(c)
						if err != nil {
							b.Fatal(err)
						}
						keep[i] = sa
					}
					runtime.GC()
					runtime.ReadMemStats(&after)
					for _, sa := range keep {
						if err := sa.Warm(); err != nil {
							b.Fatal(err)
						}
					}
					runtime.GC()
					runtime.ReadMemStats(&warm)
				}
				b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/n, "heap_B/SA")
				b.ReportMetric(float64(int64(warm.HeapAlloc)-int64(before.HeapAlloc))/n, "warm_B/SA")
				runtime.KeepAlive(keep)
			})
		}
	}
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for ; n > 0; n /= 10 {
		i--
		b[i] = byte('0' + n%10)
	}
	return string(b[i:])
}
