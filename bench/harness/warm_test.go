package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/lab/netns"
)

// The warm-up builds every SA's cipher, both ways, before the first
// trial at an SA count, by the gateway's own counters, with several
// bursts per direction (10,000 pairs > warmChunk); the trials then build
// none, and the report shows the warm-up.
func TestWarmupBuildsEveryCipher(t *testing.T) {
	netns.RequireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 CPUs")
	}
	o := Options{Sizes: []string{"200"}, SAs: []int{1, 10000}, Workers: []int{1}, Dirs: []string{"decap", "encap"},
		Rounds: 1, Ring: 2048, Log: testLog{t}}
	rep, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Warmups) != 2 {
		t.Fatalf("warm-ups %+v, want 2", rep.Warmups)
	}
	one, big := rep.Warmups[0], rep.Warmups[1]
	if one.Installed != 2 || one.ColdBefore != 2 || one.ColdAfter != 0 || one.Built != 2 {
		t.Errorf("1-SA warm-up %+v: want 2 SAs, both cold before, built, warm after", one)
	}
	// The 10k warm-up found the new SAs cold (and any the load
	// reinstalled) and left none.
	if big.SAs != 10000 || big.Installed != 20000 || big.ColdBefore < 20000-2 || big.ColdAfter != 0 {
		t.Errorf("10k warm-up %+v: want 20000 SAs held, at least 19998 cold before, none after", big)
	}
	if big.Built < uint64(big.ColdBefore) {
		t.Errorf("10k warm-up: the workers counted %d builds for %d cold SAs", big.Built, big.ColdBefore)
	}
	if big.DecapFrames < 10000 || big.EncapFrames < 10000 {
		t.Errorf("10k warm-up sent %d decap and %d encap frames, want each SA at least once", big.DecapFrames, big.EncapFrames)
	}
	for _, w := range rep.Warmups {
		if w.TrialBuilds != 0 {
			t.Errorf("%d ciphers built during the trials at %d SAs", w.TrialBuilds, w.SAs)
		}
	}
	for _, x := range rep.Results {
		if x.Delivered == 0 {
			t.Errorf("%s delivered nothing", x.Name)
		}
	}
	var md bytes.Buffer
	rep.Markdown(&md)
	if row := fmt.Sprintf("| 1 | 10000 | 20000 | %d → 0 | %d |", big.ColdBefore, big.Built); !strings.Contains(md.String(), row) {
		t.Errorf("Markdown lacks the warm-up row %q", row)
	}
}

// A signal (the run's context ending) stops the bench within 2 s in each
// phase — mid-warm-up (after its first burst of several), in a saturation
// measurement, in an NDR trial — and the namespaces are gone when Run
// returns.
func TestStopWithinTwoSeconds(t *testing.T) {
	netns.RequireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 CPUs")
	}
	t.Cleanup(func() { phaseHook = nil })
	for _, phase := range []string{"warm-up burst", "saturation", "trial"} {
		t.Run(strings.ReplaceAll(phase, " ", "-"), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var cancelled time.Time
			var names []string
			phaseHook = func(r *runner, p string) {
				if p != phase || !cancelled.IsZero() {
					return
				}
				for _, tp := range []*topo{r.tp, r.tp2} {
					if tp != nil {
						names = append(names, tp.phone.Name, tp.gw.Name, tp.core.Name)
					}
				}
				cancelled = time.Now()
				cancel()
			}
			o := Options{Sizes: []string{"200"}, SAs: []int{20000}, Workers: []int{1}, Dirs: []string{"decap", "encap"},
				Rounds: 1, Ring: 2048, NDR: phase == "trial", Log: testLog{t}}
			_, err := Run(ctx, o)
			stopped := time.Since(cancelled)
			phaseHook = nil
			if cancelled.IsZero() {
				t.Fatalf("the run never reached phase %q (err %v)", phase, err)
			}
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run after the cancel: %v, want context.Canceled", err)
			}
			if stopped > 2*time.Second {
				t.Errorf("stopped %v after the cancel in phase %q, want <= 2 s", stopped.Round(time.Millisecond), phase)
			}
			t.Logf("phase %q: stopped %v after the cancel", phase, stopped.Round(time.Millisecond))
			if len(names) == 0 {
				t.Fatal("no topology recorded")
			}
			for _, n := range names {
				if _, err := os.Stat("/run/netns/" + n); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("namespace %s left behind (%v)", n, err)
				}
			}
		})
	}
}

// The worker-scaling experiment's SA count is measured with every worker
// count, searched for NDR with none: the 2-worker gateway at 1 SA would
// leave its second worker idle.
func TestScalingSAs(t *testing.T) {
	o := Options{SAs: []int{1000000, 1}, Workers: []int{1, 2}, NDR: true}
	if got := o.SASFor(1); !slices.Equal(got, []int{1, 1000000}) {
		t.Errorf("without ScalingSAs, 1 worker: %v", got)
	}
	if got := o.SASFor(2); !slices.Equal(got, []int{1}) {
		t.Errorf("without ScalingSAs, 2 workers: %v (the counts up to %d)", got, ScalingMaxSAs)
	}
	o.ScalingSAs = 1000
	if got := o.SASFor(1); !slices.Equal(got, []int{1, 1000, 1000000}) {
		t.Errorf("ScalingSAs 1000, 1 worker: %v", got)
	}
	if got := o.SASFor(2); !slices.Equal(got, []int{1000}) {
		t.Errorf("ScalingSAs 1000, 2 workers: %v", got)
	}
	for _, c := range []struct {
		n, workers int
		want       bool
	}{{1, 1, true}, {1000000, 1, true}, {1000, 1, false}, {1000, 2, false}, {1, 2, false}} {
		if got := o.searched(c.n, c.workers); got != c.want {
			t.Errorf("searched(%d SAs, %d workers) = %v, want %v", c.n, c.workers, got, c.want)
		}
	}
	o.NDR = false
	if o.searched(1, 1) {
		t.Error("searched without NDR")
	}
}
