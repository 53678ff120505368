package harness

import (
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// CPU time per packet: on a machine shared with other users, a
// saturated rate in wall time measures how much of GwCPU the system under
// test happened to get in that tenth of a second as much as what it
// costs (on the development VM, with a load average of 5–12 on 2 vCPUs,
// single trials of the same system spanned 44k–730k pps). The CPU time
// the process's threads spent running, per packet delivered, does not
// depend on the share: it is the gate's measure (gate.go).
//
// threadCPU reads every thread's time on a CPU (schedstat's first field:
// the scheduler's exact run time in ns; without IRQ time accounting, as
// on this kernel, it includes the softirq work — the copy-mode TX path,
// the veth's delivery to its peer — run in the thread's context).
func threadCPU() map[int]uint64 {
	out := map[int]uint64{}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return out
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/self/task/" + t.Name() + "/schedstat")
		if err != nil {
			continue // the thread exited
		}
		f, _, _ := strings.Cut(string(b), " ")
		if ns, err := strconv.ParseUint(f, 10, 64); err == nil {
			out[tid] = ns
		}
	}
	return out
}

// cpuSince is the run time every thread but the excluded ones spent
// since before (threads born since count from zero).
func cpuSince(before map[int]uint64, exclude map[int]bool) uint64 {
	var sum uint64
	for tid, ns := range threadCPU() {
		if exclude[tid] {
			continue
		}
		if ns > before[tid] {
			sum += ns - before[tid]
		}
	}
	return sum
}

// tidSet collects the threads that did the generator's (GenCPU) work
// during a measurement, which is not the system under test's cost.
type tidSet struct {
	mu sync.Mutex
	m  map[int]bool
}

func (s *tidSet) addSelf() {
	s.mu.Lock()
	if s.m == nil {
		s.m = map[int]bool{}
	}
	s.m[unix.Gettid()] = true
	s.mu.Unlock()
}

// loadAvg is the host's 1-minute load average (0 if unreadable).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f, _, _ := strings.Cut(string(b), " ")
	v, _ := strconv.ParseFloat(f, 64)
	return v
}
