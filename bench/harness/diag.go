package harness

import (
	"math"
	"os"
	"runtime/metrics"
	"strconv"
	"strings"
)

// Tail evidence for a latency trial (issue 13: what makes the tail on
// this VM?): the host's scheduling, measured per thread, and the Go
// runtime's own stalls, measured from runtime/metrics, over the trial.
//
//   - run-queue wait (/proc/self/task/*/schedstat, second field): time
//     each thread of the process was runnable while another task held its
//     CPU. The largest single thread's share tells a worker kept off its
//     CPU (a stall of that length holds every packet in its RX ring)
//     from many threads each waiting a little;
//   - GC: cycles completed and stop-the-world pause time during the trial
//     (/gc/cycles/total:gc-cycles, /sched/pauses/total/gc:seconds), the
//     live heap (/gc/heap/live:bytes): a million SAs make a multi-GB heap
//     whose marking runs on the workers' CPU;
//   - goroutine scheduling latency (/sched/latencies:seconds): the p99 of
//     the time goroutines waited runnable for a Go P.
type tailDiag struct {
	RunqWaitMs      float64 `json:"runq_wait_ms"`
	MaxThreadWaitMs float64 `json:"max_thread_runq_wait_ms"`
	GCCycles        uint64  `json:"gc_cycles"`
	GCPauseMs       float64 `json:"gc_pause_ms"`
	GCPauseMaxUs    float64 `json:"gc_pause_max_us"`
	HeapLiveGiB     float64 `json:"heap_live_gib"`
	SchedLatP99Us   float64 `json:"goroutine_sched_latency_p99_us"`
}

type diagSnap struct {
	wait    map[string]uint64
	samples []metrics.Sample
}

var diagMetrics = []string{"/gc/cycles/total:gc-cycles", "/sched/pauses/total/gc:seconds", "/gc/heap/live:bytes", "/sched/latencies:seconds"}

func takeDiag() diagSnap {
	d := diagSnap{wait: threadWaits(), samples: make([]metrics.Sample, len(diagMetrics))}
	for i, n := range diagMetrics {
		d.samples[i].Name = n
	}
	metrics.Read(d.samples)
	return d
}

// threadWaits is each thread's run-queue wait in ns.
func threadWaits() map[string]uint64 {
	out := map[string]uint64{}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return out
	}
	for _, t := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + t.Name() + "/schedstat")
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) >= 2 {
			if ns, err := strconv.ParseUint(f[1], 10, 64); err == nil {
				out[t.Name()] = ns
			}
		}
	}
	return out
}

// since is the diagnosis of the interval from d to now.
func (d diagSnap) since() tailDiag {
	now := takeDiag()
	var td tailDiag
	for tid, w := range now.wait {
		dw := float64(w-min(w, d.wait[tid])) / 1e6
		td.RunqWaitMs += dw
		td.MaxThreadWaitMs = math.Max(td.MaxThreadWaitMs, dw)
	}
	td.GCCycles = now.samples[0].Value.Uint64() - d.samples[0].Value.Uint64()
	sum, mx := histDiff(d.samples[1].Value.Float64Histogram(), now.samples[1].Value.Float64Histogram())
	td.GCPauseMs, td.GCPauseMaxUs = sum*1e3, mx*1e6
	td.HeapLiveGiB = float64(now.samples[2].Value.Uint64()) / (1 << 30)
	td.SchedLatP99Us = histQuantile(d.samples[3].Value.Float64Histogram(), now.samples[3].Value.Float64Histogram(), 0.99) * 1e6
	return td
}

// histDiff is the approximate sum (bucket midpoints) and the largest
// bucket's upper edge of what a cumulative histogram gained.
func histDiff(a, b *metrics.Float64Histogram) (sum, maxV float64) {
	for i := range b.Counts {
		c := b.Counts[i]
		if i < len(a.Counts) {
			c -= a.Counts[i]
		}
		if c == 0 {
			continue
		}
		lo, hi := b.Buckets[i], b.Buckets[i+1]
		if math.IsInf(lo, -1) {
			lo = 0
		}
		if math.IsInf(hi, 1) {
			hi = lo
		}
		sum += float64(c) * (lo + hi) / 2
		maxV = math.Max(maxV, hi)
	}
	return sum, maxV
}

// histQuantile is the q-quantile (bucket upper edge) of what a cumulative
// histogram gained.
func histQuantile(a, b *metrics.Float64Histogram, q float64) float64 {
	var total uint64
	d := make([]uint64, len(b.Counts))
	for i := range b.Counts {
		d[i] = b.Counts[i]
		if i < len(a.Counts) {
			d[i] -= a.Counts[i]
		}
		total += d[i]
	}
	if total == 0 {
		return 0
	}
	want := uint64(math.Ceil(q * float64(total)))
	var acc uint64
	for i, c := range d {
		if acc += c; acc >= want {
			hi := b.Buckets[i+1]
			if math.IsInf(hi, 1) {
				hi = b.Buckets[i]
			}
			return hi
		}
	}
	return 0
}
