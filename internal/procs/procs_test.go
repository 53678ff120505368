package procs

import (
	"context"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Each reservation adds one P; releases take them back in any order, a
// second release of the same reservation changes nothing, and the last
// one restores the setting found before the first.
func TestReserveAddsOnePerLoop(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	r1 := Reserve()
	r2 := Reserve()
	if got := runtime.GOMAXPROCS(0); got != before+2 {
		t.Fatalf("two reservations: GOMAXPROCS %d, want %d", got, before+2)
	}
	r1()
	r1()
	if got, h := runtime.GOMAXPROCS(0), Held(); got != before+1 || h != 1 {
		t.Fatalf("one released twice: GOMAXPROCS %d held %d, want %d and 1", got, h, before+1)
	}
	r2()
	if got, h := runtime.GOMAXPROCS(0), Held(); got != before || h != 0 {
		t.Fatalf("all released: GOMAXPROCS %d held %d, want %d and 0", got, h, before)
	}
}

// BenchmarkPollReturn measures how late a locked thread's 1 ms poll(2)
// comes back to its goroutine while CPU-bound goroutines hold every P of
// the unreserved setting — a worker woken by packets while the rest of
// the process is busy. "late-p99-µs" is what a packet waits on top of the
// loop's own work.
func BenchmarkPollReturn(b *testing.B) {
	for _, reserve := range []bool{false, true} {
		name := "unreserved"
		if reserve {
			name = "reserved"
		}
		b.Run(name, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			for range runtime.GOMAXPROCS(0) {
				wg.Go(func() {
					for ctx.Err() == nil {
						spin()
					}
				})
			}
			late := make([]float64, 0, b.N)
			done := make(chan struct{})
			go func() {
				defer close(done)
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				if reserve {
					defer Reserve()()
				}
				b.ResetTimer()
				for range b.N {
					t0 := time.Now()
					unix.Poll(nil, 1)
					late = append(late, float64(time.Since(t0)-time.Millisecond)/1e3)
				}
			}()
			<-done
			cancel()
			wg.Wait()
			slices.Sort(late)
			b.ReportMetric(late[len(late)*99/100], "late-p99-µs")
			b.ReportMetric(late[len(late)/2], "late-p50-µs")
		})
	}
}

//go:noinline
func spin() {
	x := 0
	for i := range 1 << 16 {
		x += i
	}
	_ = x
}
