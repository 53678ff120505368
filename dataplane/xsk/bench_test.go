package xsk_test

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/xsktest"
)

const (
	genCPU    = 0
	workerCPU = 1
	chunk     = 1 << 16 // frames per benchmark iteration
)

// swapAttach replaces whatever XDP program e has with prog.
type swapAttach struct {
	l link.Link
}

func (s *swapAttach) set(b *testing.B, e end, prog *ebpf.Program) {
	b.Helper()
	if s.l != nil {
		s.l.Close()
		s.l = nil
	}
	if err := e.ns.Do(func() (err error) {
		s.l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: e.ifindex, Flags: link.XDPDriverMode})
		return err
	}); err != nil {
		b.Fatal(err)
	}
}

func pin(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	return unix.SchedSetaffinity(0, &set)
}

// BenchmarkCeilings measures, on one veth link in one run, what the
// receiver side can absorb from the live-frames generator (peer1, CPU 0):
// XDP_DROP, AF_XDP receive-only, and AF_XDP reflect (RX → TX on the same
// socket, MACs swapped, no crypto; counted where the reflected frames
// arrive back at the generator's veth). The worker runs on CPU 1.
// Frames are 200 bytes. One op is a chunk of 65536 generated frames.
func BenchmarkCeilings(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs 2 CPUs to pin generator and worker apart")
	}
	tp := newTopo(b, false)
	frame := xsktest.UDPFrame(tp.a.mac, tp.peer1.mac, tp.peer1.ip, tp.a.ip, 5000, testPort, make([]byte, 200-42))
	var gen *xsktest.Generator
	if err := tp.peer1.ns.Do(func() (err error) {
		gen, err = xsktest.NewGenerator(tp.peer1.ifindex, xsktest.GenOptions{})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer gen.Close()
	generate := func(n int) (time.Duration, error) {
		start := time.Now()
		err := tp.peer1.ns.Do(func() error {
			for sent := 0; sent < n; sent += chunk {
				if err := gen.SendPinned(genCPU, frame, chunk, 0); err != nil {
					return err
				}
			}
			return nil
		})
		return time.Since(start), err
	}
	var gw, back swapAttach
	defer func() {
		if gw.l != nil {
			gw.l.Close()
		}
		if back.l != nil {
			back.l.Close()
		}
	}()

	b.Run("xdp_drop", func(b *testing.B) {
		prog, m, err := xsktest.NewCountingVerdict(1)
		if err != nil {
			b.Fatal(err)
		}
		defer prog.Close()
		defer m.Close()
		gw.set(b, tp.a, prog)
		b.ResetTimer()
		el, err := generate(b.N * chunk)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		n, err := xsktest.Count(m)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(n)/el.Seconds(), "pkts/s")
		b.ReportMetric(100*(1-float64(n)/float64(b.N*chunk)), "loss%")
	})

	for _, reflect := range []bool{false, true} {
		name := "afxdp_rx"
		if reflect {
			name = "afxdp_reflect"
		}
		b.Run(name, func(b *testing.B) {
			// Rings for ~4 ms at 2 Mpps: the worker's CPU is shared with
			// everything else on these machines and stalls for ms.
			u, err := xsk.New(xsk.Config{FrameSize: 2048, FrameCount: 32768, FillSize: 8192, CompletionSize: 8192, RxSize: 8192, TxSize: 8192})
			if err != nil {
				b.Fatal(err)
			}
			defer u.Close()
			st, err := xsktest.NewSteer(testPort, 1, 1)
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			s := open(b, u, tp.a)
			if err := st.Set(0, 0, s.FD()); err != nil {
				b.Fatal(err)
			}
			cnt, m, err := xsktest.NewCountingVerdict(1)
			if err != nil {
				b.Fatal(err)
			}
			defer cnt.Close()
			defer m.Close()
			back.set(b, tp.peer1, cnt)
			gw.set(b, tp.a, st.Prog)
			p := u.NewPool()
			if _, err := s.Refill(p, 0); err != nil {
				b.Fatal(err)
			}

			var stop atomic.Bool
			var received atomic.Int64
			var lastRx atomic.Int64
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				if err := pin(workerCPU); err != nil {
					b.Error(err)
					return
				}
				batch := make([]xsk.Desc, 64)
				idle := 0
				for !stop.Load() || idle < 1000 {
					n := s.Receive(batch)
					if n == 0 {
						idle++
						if reflect {
							s.Kick()
							s.Complete(p)
						}
						s.Refill(p, 0)
						continue
					}
					idle = 0
					received.Add(int64(n))
					lastRx.Store(time.Now().UnixNano())
					if reflect {
						for _, d := range batch[:n] {
							f := u.Packet(d)
							var mac [6]byte
							copy(mac[:], f[0:6])
							copy(f[0:6], f[6:12])
							copy(f[6:12], mac[:])
						}
						k, _ := s.Transmit(batch[:n])
						p.PutDescs(batch[k:n])
						s.Kick()
						s.Complete(p)
					} else {
						p.PutDescs(batch[:n])
					}
					s.Refill(p, 0)
				}
			}()
			b.ResetTimer()
			start := time.Now()
			_, err = generate(b.N * chunk)
			stop.Store(true)
			wg.Wait()
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			el := time.Duration(lastRx.Load() - start.UnixNano())
			got := received.Load()
			if reflect {
				n, err := xsktest.Count(m)
				if err != nil {
					b.Fatal(err)
				}
				got = int64(n)
			}
			stats, _ := s.Stats()
			b.ReportMetric(float64(got)/el.Seconds(), "pkts/s")
			b.ReportMetric(100*(1-float64(got)/float64(b.N*chunk)), "loss%")
			b.Logf("%s: %d of %d frames in %v; %+v; %s", name, got, b.N*chunk, el, stats, fmt.Sprint(u.Accounting()))
			st.Clear(0, 0)
		})
	}
}

// BenchmarkComplete is the per-loop cost of a worker's ring upkeep on an
// idle queue: one Complete and one Refill on the ring owner (read the
// kernel's index, nothing to move) and the same calls on a socket of the
// queue that does not own its rings (an atomic load). No lock is taken:
// each (device, queue)'s fill and completion rings have one owner.
func BenchmarkComplete(b *testing.B) {
	tp := newTopo(b, false)
	u := newUMEM(b, xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	owner, other := open(b, u, tp.a), open(b, u, tp.a)
	if !owner.OwnsRings() || other.OwnsRings() {
		b.Fatalf("owner %v, other %v: the first socket on a queue must own its rings", owner.OwnsRings(), other.OwnsRings())
	}
	p := u.NewPool()
	if _, err := owner.Refill(p, 0); err != nil {
		b.Fatal(err)
	}
	for _, s := range []struct {
		name string
		s    *xsk.Socket
	}{{"owner", owner}, {"other", other}} {
		b.Run(s.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				s.s.Complete(p)
				s.s.Refill(p, 0)
			}
		})
	}
}
