//go:build !xesp_benchslow

package worker

// slowKnob is the benchmark gate's test-only slowdown (slow_on.go). In
// every build without the xesp_benchslow tag — the daemon's included — it
// is an empty struct whose method the compiler inlines away: no field, no
// branch, no environment read on the data path.
type slowKnob struct{}

func newSlowKnob() slowKnob { return slowKnob{} }

func (slowKnob) start() {}

func (slowKnob) after(int) {}

// SlowKnob reports the test-only slowdown in effect: always 0 here.
func SlowKnob() float64 { return 0 }
