//go:build xesp_benchslow

package worker

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// The benchmark gate's proof knob, compiled only with the xesp_benchslow
// build tag (never into the daemon: `make build` does not set it, and no
// config or API field reaches it). XESP_BENCH_SLOW=F makes every loop
// turn that handled packets spin for F × the CPU time that turn took
// (the worker's thread clock, so time the thread spent preempted by
// other users of a shared host is not multiplied), so each packet costs
// the worker (1+F) times as much CPU whatever the host's speed: F=0.3 is a 30% per-packet regression, which
// `make bench-gate-proof` shows bench-check catches.
var slowFrac = func() float64 {
	f, err := strconv.ParseFloat(os.Getenv("XESP_BENCH_SLOW"), 64)
	if err != nil || f < 0 || f > 10 {
		return 0
	}
	return f
}()

// SlowKnob reports the test-only slowdown in effect (the fraction of
// per-packet cost added), so a report can say it was on.
func SlowKnob() float64 { return slowFrac }

type slowKnob struct{ last int64 }

func newSlowKnob() slowKnob { return slowKnob{} }

func threadNs() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts)
	return ts.Nano()
}

// start begins a loop turn.
func (s *slowKnob) start() {
	if slowFrac > 0 {
		s.last = threadNs()
	}
}

// after ends a loop turn that handled got frames.
func (s *slowKnob) after(got int) {
	if got == 0 || slowFrac == 0 {
		return
	}
	now := threadNs()
	until := now + int64(slowFrac*float64(now-s.last))
	for threadNs() < until {
	}
}
