package gateway

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

// benchSnapshotter is the periodic snapshot BenchmarkPeriodicSnapshot
// times: one interval's work.
func benchSnapshotter(g *Gateway) (snapshot func(context.Context) error, compact func() error, done func()) {
	p := newPersister(g)
	return p.snapshot, p.j.Compact, p.close
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// threadCPU is the calling thread's CPU time (the goroutine is locked to
// it while timed).
func threadCPU() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts)
	return time.Duration(ts.Nano())
}

// BenchmarkPeriodicSnapshot times one periodic state snapshot of a
// gateway holding XESP_SNAP_PAIRS SA pairs (default 200,000; one worker)
// of which XESP_SNAP_ACTIVE pairs (default 2,000: 1% of the SAs) carried
// a packet each way in the interval, real packets through XDP and the
// worker. It reports the snapshotting goroutine's CPU time (its thread's,
// locked: what the snapshot itself computes, fsync waits excluded) and
// wall time, medians of XESP_SNAP_ROUNDS intervals (default 7) after the
// run's first snapshot, and the journal bytes appended per interval.
func BenchmarkPeriodicSnapshot(b *testing.B) {
	pairs := envInt("XESP_SNAP_PAIRS", 200_000)
	active := min(envInt("XESP_SNAP_ACTIVE", 2000), pairs)
	rounds := envInt("XESP_SNAP_ROUNDS", 7)
	tp := newBenchTopo(b)
	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1]}
private: {interface: %s, next_hop_mac: "%s"}
workers: 1
state_dir: %s
`, tp.Pub.Name, tp.Priv.Name, tp.Co.MAC, b.TempDir())
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		b.Fatal(err)
	}
	var g *Gateway
	if err := tp.GW.Do(func() (err error) {
		g, err = Start(context.Background(), cfg, Options{NoPin: true, StateInterval: time.Hour}) // the benchmark snapshots
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { g.Stop(false) })

	inner := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}) }
	sas := parsePairs(b, pairs)
	if err := g.SAD.AddAll(sas); err != nil {
		b.Fatal(err)
	}
	sas = nil
	for t0 := time.Now(); g.Manager.Installed() < 2*pairs; time.Sleep(10 * time.Millisecond) {
		if time.Since(t0) > 5*time.Minute {
			b.Fatalf("manager installed %d of %d SAs in 5 minutes", g.Manager.Installed(), 2*pairs)
		}
	}
	syncDataPath(b, g)

	// The active phones, spread over the table.
	idx := make([]int, active)
	sealers := make([]*esp.Transform, active)
	for k := range active {
		idx[k] = k * (pairs / active)
		key, _ := hexBytes(benchKey('i', idx[k]))
		if sealers[k], err = esp.NewTransform(esp.Config{SPI: 0x1000000 + uint32(idx[k]), Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel}); err != nil {
			b.Fatal(err)
		}
	}
	phone := udpSock(b, tp.Phone, "192.0.2.10:4500")
	core := udpSock(b, tp.Core, "10.0.0.1:5060")
	buf := make([]byte, 2048)
	st := g.Workers[0].Stats()
	// interval sends one packet each way for every active pair, in
	// bursts the rings hold, and waits until the worker handled them (a
	// packet lost on the way, e.g. behind the phone's first ARP, is
	// counted, not waited for).
	lost := 0
	interval := func() {
		for k0 := 0; k0 < active; k0 += 64 {
			d0, e0 := st.Decap.Packets.Load(), st.Encap.Packets.Load()
			n := min(64, active-k0)
			for k := k0; k < k0+n; k++ {
				src := netip.AddrPortFrom(inner(idx[k]), 5060)
				in := pkt.UDP4(src, coreAddr, []byte("REGISTER"))
				copy(buf[64:], in)
				start, end, err := sealers[k].Seal(buf, 64, len(in), esp.NextHeaderIPv4, 0)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := phone.WriteToUDP(buf[start:end], gwPublic); err != nil {
					b.Fatal(err)
				}
				if _, err := core.WriteToUDPAddrPort([]byte("NOTIFY"), src); err != nil {
					b.Fatal(err)
				}
			}
			deadline := time.Now().Add(2 * time.Second)
			for st.Decap.Packets.Load()-d0 < uint64(n) || st.Encap.Packets.Load()-e0 < uint64(n) {
				if time.Now().After(deadline) {
					lost += 2*n - int(st.Decap.Packets.Load()-d0+st.Encap.Packets.Load()-e0)
					break
				}
				time.Sleep(time.Millisecond)
			}
		}
	}
	interval() // warms the neighbours and every active SA's cipher
	lost = 0

	snapshot, compact, done := benchSnapshotter(g)
	defer done()
	ctx := context.Background()
	path := filepath.Join(g.Config.StateDir, rxStateFile)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	if err := snapshot(ctx); err != nil { // the run's first: a base (new) or a full file (old)
		b.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	// What the first snapshot left on the heap, per inbound SA (every
	// inbound SA's window is exported by it).
	heapPerIn := float64(int64(m1.HeapInuse)-int64(m0.HeapInuse)) / float64(pairs)
	var cpus, walls []time.Duration
	var journal int64
	b.ResetTimer()
	for range rounds {
		interval()
		runtime.GC()
		j0 := fileSize(path + ".journal")
		c0, w0 := threadCPU(), time.Now()
		if err := snapshot(ctx); err != nil {
			b.Fatal(err)
		}
		cpus, walls = append(cpus, threadCPU()-c0), append(walls, time.Since(w0))
		journal += fileSize(path+".journal") - j0
	}
	b.StopTimer()
	slices.Sort(cpus)
	slices.Sort(walls)
	b.ReportMetric(float64(cpus[len(cpus)/2].Microseconds())/1000, "cpu_ms/snapshot")
	b.ReportMetric(float64(walls[len(walls)/2].Microseconds())/1000, "wall_ms/snapshot")
	b.ReportMetric(float64(journal)/float64(rounds), "journal_B/interval")
	b.ReportMetric(heapPerIn, "kept_heap_B/inbound_SA")
	b.ReportMetric(0, "ns/op")
	if lost > rounds*active/50 {
		b.Fatalf("%d of %d packets lost", lost, 2*rounds*active)
	}
	b.Logf("%d of %d packets lost on the way", lost, 2*rounds*active)
	b.Logf("heap kept by the first snapshot: %.0f B per inbound SA", heapPerIn)
	b.Logf("%d pairs, %d active: snapshot CPU %v (min %v max %v), wall %v; state file %d B, journal +%d B/interval",
		pairs, active, cpus[len(cpus)/2], cpus[0], cpus[len(cpus)-1], walls[len(walls)/2], fileSize(path), journal/int64(rounds))
	if os.Getenv("XESP_SNAP_COMPACT") != "" {
		if compact != nil {
			c0, w0 := threadCPU(), time.Now()
			if err := compact(); err != nil {
				b.Fatal(err)
			}
			b.Logf("one compaction: CPU %v, wall %v", threadCPU()-c0, time.Since(w0))
		}
	}
}

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}
