package pktgen

import (
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/dataplane/xsk"
)

// Engines that put the frames on the wire.
const (
	// EngineLive is BPF_PROG_RUN in XDP live-frames mode: the kernel
	// builds and sends each frame from the ring in the BPF map; no
	// syscall or copy per packet.
	EngineLive = "live"
	// EngineAFXDP is AF_XDP TX (copy mode on veth): frames copied from
	// the ring into a UMEM and sent in batches of 64. The path a
	// userspace sender on a NIC without BPF_PROG_RUN support would take.
	EngineAFXDP = "afxdp"
)

// xskTX sends ring slots through an AF_XDP socket's TX ring.
type xskTX struct {
	u     *xsk.UMEM
	s     *xsk.Socket
	pool  *xsk.Pool
	addrs []uint64
	descs []xsk.Desc
}

func newXSKTX(ifindex int) (*xskTX, error) {
	u, err := xsk.New(xsk.Config{FrameCount: 8192, FillSize: 64, CompletionSize: 4096, RxSize: 64, TxSize: 4096})
	if err != nil {
		return nil, fmt.Errorf("pktgen: afxdp engine: %w", err)
	}
	s, err := u.Open(ifindex, 0)
	if err != nil {
		u.Close()
		return nil, fmt.Errorf("pktgen: afxdp engine: %w", err)
	}
	return &xskTX{u: u, s: s, pool: u.NewPool(), addrs: make([]uint64, 64), descs: make([]xsk.Desc, 64)}, nil
}

// send transmits slots 0..n-1 of the sender's ring and waits for their
// completions.
func (x *xskTX) send(s *Sender, n int) (int, time.Duration, error) {
	return x.sendRange(s, 0, n)
}

// sendRange transmits slots from..to-1 and waits for their completions.
func (x *xskTX) sendRange(s *Sender, from, to int) (int, time.Duration, error) {
	start := time.Now()
	n := to - from
	next, done, stamped := 0, 0, 0
	lastProgress := start
	for done < n {
		if next < n {
			got := x.pool.Get(x.addrs[:min(len(x.addrs), n-next)])
			for j := range got {
				l := s.g.CopyFrame(x.u.Frame(x.addrs[j]), from+next+j)
				x.descs[j] = xsk.Desc{Addr: x.addrs[j], Len: uint32(l)}
			}
			t, err := x.s.Transmit(x.descs[:got])
			if t < got {
				x.pool.Put(x.addrs[t:got])
			}
			if err != nil {
				return done, time.Since(start), fmt.Errorf("pktgen: afxdp transmit: %w", err)
			}
			next += t
		}
		if p0 := x.s.TxPending(); p0 > 0 {
			var t0 int64
			if s.sendNs != nil {
				t0 = monoNs()
			}
			if err := x.s.Kick(); err != nil {
				return done, time.Since(start), err
			}
			if s.sendNs != nil {
				// The sendto took p0 − pending frames, in ring order.
				t1 := monoNs()
				c := min(p0-x.s.TxPending(), next-stamped)
				for k := range c {
					s.sendNs[from+stamped+k] = t0 + (t1-t0)*int64(2*k+1)/int64(2*c)
				}
				stamped += max(c, 0)
			}
		}
		if c := x.s.Complete(x.pool); c > 0 {
			done += c
			lastProgress = time.Now()
		} else if time.Since(lastProgress) > 2*time.Second {
			return done, time.Since(start), fmt.Errorf("pktgen: afxdp: %d of %d frames completed, no progress for 2 s", done, n)
		}
	}
	return done, time.Since(start), nil
}

func (x *xskTX) close() {
	x.pool.Close()
	x.s.Close()
	x.u.Close()
}

// CLOCK_MONOTONIC in nanoseconds, the clock of bpf_ktime_get_ns: Go's
// monotonic clock reads the same clock (vDSO), so one calibration against
// clock_gettime maps time.Since onto it without a syscall per reading.
var (
	monoOnce   sync.Once
	monoBase   time.Time
	monoBaseNs int64
)

func monoNs() int64 {
	monoOnce.Do(func() {
		var ts unix.Timespec
		a := time.Now()
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		b := time.Now()
		monoBase, monoBaseNs = a.Add(b.Sub(a)/2), ts.Nano()
	})
	return monoBaseNs + int64(time.Since(monoBase))
}

// MonoNs is the current CLOCK_MONOTONIC time in nanoseconds (the clock of
// SendNs and of bpf_ktime_get_ns).
func MonoNs() int64 { return monoNs() }
