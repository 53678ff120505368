//go:build xesp_benchslow

package worker

import (
	"os"
	"strconv"
	"time"
)

// The benchmark gate's proof knob, compiled only with the xesp_benchslow
// build tag (never into the daemon: `make build` does not set it, and no
// config or API field reaches it). XESP_BENCH_SLOW=F makes every loop
// turn that handled packets spin for F × that turn's own duration after
// it, so each packet costs the worker (1+F) times as much whatever the
// host's speed: F=0.3 is a 30% per-packet regression, which
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

type slowKnob struct{ last time.Time }

func newSlowKnob() slowKnob { return slowKnob{last: time.Now()} }

// after ends a loop turn that handled got frames.
func (s *slowKnob) after(got int) {
	now := time.Now()
	if got > 0 && slowFrac > 0 {
		until := now.Add(time.Duration(slowFrac * float64(now.Sub(s.last))))
		for time.Now().Before(until) {
		}
		now = time.Now()
	}
	s.last = now
}
