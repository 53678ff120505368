package gateway

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"syscall"
	"testing"
	"time"

	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/control/config"
)

// BenchmarkLoadConfig is the harness's config install (`xesp-lab bench
// -install`) on the gateway benchmark's topology: a JSON-lines SA file of
// XESP_LOAD_PAIRS pairs (default 200,000) named by sa_files, from
// config.Load until the manager holds every SA and the XDP SA map every
// inbound one. XESP_CPUPROFILE and XESP_HEAPPROFILE write a CPU profile
// of the load and a heap profile with every SA loaded.
func BenchmarkLoadConfig(b *testing.B) {
	if testing.Short() {
		b.Skip("loads hundreds of thousands of SAs; skipped under -short")
	}
	pairs, err := pktgen.LoadPairs(200_000)
	if err != nil {
		b.Fatal(err)
	}
	tp := newBenchTopo(b)
	dir := b.TempDir()
	file := filepath.Join(dir, "phones.jsonl")
	if err := pktgen.WriteSAFile(context.Background(), file, pairs, pktgen.DefaultNet()); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(dir, "xesp.yaml")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1]}
private: {interface: %s, next_hop_mac: "%s"}
workers: 1
max_sas: %d
state_dir: %s
metrics: {listen: ""}
api: {unix: ""}
sa_files: [%s]
`, tp.Pub.Name, tp.Priv.Name, tp.Co.MAC, 1<<21, filepath.Join(dir, "state"), file)), 0o600); err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	var m0 runtime.MemStats
	runtime.ReadMemStats(&m0)
	if p := os.Getenv("XESP_CPUPROFILE"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}

	b.ResetTimer()
	t0, c0 := time.Now(), cpuTime()
	cfg, err := config.Load(path)
	if err != nil {
		b.Fatal(err)
	}
	tParse := time.Since(t0)
	var g *Gateway
	if err := tp.GW.Do(func() (err error) {
		g, err = Start(context.Background(), cfg, Options{NoPin: true})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := g.Stop(false); err != nil {
			b.Errorf("stop gateway: %v", err)
		}
	})
	tStart := time.Since(t0)
	waitLoaded(b, g, pairs, t0, 10*time.Minute)
	total, cpu := time.Since(t0), cpuTime()-c0
	b.StopTimer()
	pprof.StopCPUProfile()
	runtime.GC()
	var m1 runtime.MemStats
	runtime.ReadMemStats(&m1)
	if p := os.Getenv("XESP_HEAPPROFILE"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
	b.ReportMetric(total.Seconds(), "load_s")
	b.ReportMetric(tParse.Seconds(), "config_load_s")
	b.ReportMetric(cpu.Seconds(), "cpu_s")
	b.ReportMetric(float64(2*pairs)/total.Seconds(), "SAs/s")
	b.ReportMetric(float64(int64(m1.HeapInuse)-int64(m0.HeapInuse))/float64(2*pairs), "heap_B/SA")
	b.ReportMetric(0, "ns/op")
	b.Logf("%d pairs: config.Load %v, Start returned at %v, all installed at %v; %d GCs",
		pairs, tParse, tStart, total, m1.NumGC-m0.NumGC)
}

// cpuTime is the process's CPU time so far (user + system, every thread):
// on a shared machine it moves less than wall time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
