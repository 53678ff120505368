package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/lab/netns"
)

// A small run of every scenario kind on the real topology: every selected
// scenario is reported, frames were sent and arrived at each far end
// (decap frames decrypted by the gateway and counted at the core), the
// ratios and targets are computed from the same run, the outputs parse,
// and the gate passes against the run's own ratios and fails on a drop.
func TestRunSmallMatrix(t *testing.T) {
	netns.RequireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 CPUs")
	}
	o := Options{Sizes: []string{"200", "imix"}, SAs: []int{1, 3}, Workers: []int{1}, Dirs: []string{"decap", "encap", "both"},
		Ceilings: true, Baseline: true, Flood: true, Rounds: 1, Ring: 2048, Log: testLog{t}}
	rep, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	want := Selected(o)
	if len(rep.Results) != len(want) {
		t.Fatalf("%d results, want %d", len(rep.Results), len(want))
	}
	for i, name := range want {
		x := rep.Results[i]
		if x.Name != name {
			t.Fatalf("result %d is %s, want %s", i, x.Name, name)
		}
		if x.PPS <= 0 {
			t.Errorf("%s: %v pps", x.Name, x.PPS)
		}
		if strings.HasPrefix(x.Test, "aead") {
			continue
		}
		perRound := uint64(o.Ring)
		if x.Test == "both" {
			perRound *= 2
		}
		if x.Offered != perRound*uint64(o.Rounds) {
			t.Errorf("%s: offered %d, want %d", x.Name, x.Offered, perRound*uint64(o.Rounds))
		}
		if x.Delivered == 0 || x.Delivered > x.Offered {
			t.Errorf("%s: delivered %d of %d", x.Name, x.Delivered, x.Offered)
		}
		if x.Group != "ceiling" && x.Ratios["afxdp_rx"] <= 0 {
			t.Errorf("%s: no ratio to the AF_XDP ceiling: %v", x.Name, x.Ratios)
		}
		if x.Group == "flood" && x.Ratios["vs_no_flood"] <= 0 {
			t.Errorf("%s: no ratio to decap without the flood: %v", x.Name, x.Ratios)
		}
	}
	// Per direction and size: vs reflect, 3 SAs vs 1, vs sockets at 1 and
	// 3; per size, decap under the flood vs without (no NDR search: no
	// NDR rows); then the SA load and its heap, and the API install rate,
	// not measured by this run.
	if len(rep.Targets) != 2*2*4+2+3 {
		t.Errorf("targets %+v, want 21", rep.Targets)
	}
	for _, tg := range rep.Targets {
		switch {
		case tg.Status == "not measured in this run":
		case tg.Measure == "" || tg.How == "" || tg.Status == "":
			t.Errorf("target %+v", tg)
		case tg.Cmp == ">=" && tg.Ratio <= 0:
			t.Errorf("target %+v: no ratio", tg)
		case tg.Met != (tg.Status == "met"):
			t.Errorf("target %+v: met %v but status %q", tg, tg.Met, tg.Status)
		}
	}
	// Every SA count was warmed: each SA's cipher built, both ways,
	// before its first trial, none built in the trials.
	if len(rep.Warmups) != len(o.SAs) {
		t.Errorf("warm-ups %+v, want one per SA count %v", rep.Warmups, o.SAs)
	}
	for i, w := range rep.Warmups {
		if w.SAs != o.SAs[i] || w.Installed != 2*w.SAs || w.ColdAfter != 0 || w.TrialBuilds != 0 {
			t.Errorf("warm-up %+v: want all %d SAs warm and none built in the trials", w, 2*o.SAs[i])
		}
	}
	if rep.Machine.Cores != runtime.NumCPU() || rep.Machine.Kernel == "" {
		t.Errorf("machine %+v", rep.Machine)
	}

	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Results) != len(rep.Results) {
		t.Fatalf("JSON round trip: %v, %d results", err, len(back.Results))
	}
	var md bytes.Buffer
	rep.Markdown(&md)
	for _, name := range want {
		if !strings.Contains(md.String(), "| "+name+" |") {
			t.Errorf("Markdown lacks a row for %s", name)
		}
	}
	var svg bytes.Buffer
	rep.SVG(&svg)
	if err := wellFormed(svg.Bytes()); err != nil {
		t.Fatalf("SVG: %v", err)
	}
	for _, s := range []string{"afxdp_rx/public", "aead_open", "decap/200/1sa/1w"} {
		if !strings.Contains(svg.String(), s) {
			t.Errorf("SVG lacks %q", s)
		}
	}

	// The gate: the run's own ratios pass; a baseline 50% above fails
	// with that metric named; a scenario missing from the run fails.
	b := &Baseline{Runs: 1, Metrics: map[string]Metric{}}
	for k, v := range GateRatios(rep) {
		b.Metrics[k] = Metric{Value: v, Tolerance: 0.1}
	}
	if err := b.Compare(rep, io.Discard); err != nil {
		t.Fatalf("gate fails on its own figures: %v", err)
	}
	key := "xesp/decap/200/1sa/1w ÷ afxdp_reflect"
	m := b.Metrics[key]
	m.Value *= 1.5
	b.Metrics[key] = m
	if err := b.Compare(rep, io.Discard); err == nil || !strings.Contains(err.Error(), key) {
		t.Fatalf("gate with a 50%% higher baseline: %v", err)
	}
	b.Metrics[key] = Metric{Value: m.Value / 1.5, Tolerance: 0.1}
	// The socket baseline's ratio is reported, never gated: a drop or
	// a missing figure there passes.
	sk := "xesp/decap/200/1sa/1w ÷ vs_sockets"
	if _, ok := b.Metrics[sk]; !ok {
		t.Fatalf("no %s figure: %v", sk, b.Metrics)
	}
	b.Metrics[sk] = Metric{Value: 1.5 * b.Metrics[sk].Value, Tolerance: 0.1}
	b.Metrics["xesp/decap/9999/1sa/1w ÷ vs_sockets"] = Metric{Value: 1, Tolerance: 0.1}
	var out strings.Builder
	if err := b.Compare(rep, &out); err != nil || !strings.Contains(out.String(), "not gated") {
		t.Fatalf("gate with a 50%% higher socket-ratio baseline: %v\n%s", err, out.String())
	}
	b.Metrics["xesp/decap/9999/1sa/1w ÷ afxdp_reflect"] = Metric{Value: 1, Tolerance: 0.1}
	if err := b.Compare(rep, io.Discard); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("gate with a missing scenario: %v", err)
	}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func wellFormed(b []byte) error {
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		_, err := d.Token()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// The tolerance rule: twice the measured relative range, clamped, with
// tighter bounds for the geometric means.
func TestToleranceFromSpread(t *testing.T) {
	const scen, geo = "xesp/decap/200/1sa/1w ÷ afxdp_reflect", "geomean of 4 xesp scenarios ÷ afxdp_reflect"
	for _, c := range []struct {
		key       string
		samples   []float64
		value     float64
		tolerance float64
		noisy     bool
	}{
		{scen, []float64{1, 1, 1}, 1, MinTolerance, false},            // no noise: the floor
		{scen, []float64{0.95, 1.0, 1.05, 1.0, 1.0}, 1, 0.2, false},   // range 10% → 20%
		{scen, []float64{0.5, 1.0, 1.5}, 1, MaxTolerance, true},       // too noisy: capped
		{scen, []float64{0.80, 0.82, 0.84, 0.86}, 0.83, 0.15, false},  // even count: mean of the middle two; 2×7.2% under the floor
		{geo, []float64{1, 1, 1}, 1, MinGeomeanTolerance, false},      // the geomean floor
		{geo, []float64{0.97, 1.0, 1.03}, 1, 0.12, false},             // range 6% → 12%
		{geo, []float64{0.8, 1.0, 1.2}, 1, MaxGeomeanTolerance, true}, // too noisy for the promise
	} {
		m, ok := newMetric(c.key, c.samples)
		if !ok {
			t.Fatalf("%v: no metric", c.samples)
		}
		if !near(m.Value, c.value) || !near(m.Tolerance, c.tolerance) || m.Noisy != c.noisy {
			t.Errorf("%s %v: value %v tolerance %v noisy %v, want %v %v %v", c.key, c.samples, m.Value, m.Tolerance, m.Noisy, c.value, c.tolerance, c.noisy)
		}
	}
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

// The committed baseline parses and gates the check subset: every
// scenario it names is one the check preset runs.
func TestCommittedBaselineMatchesCheckSubset(t *testing.T) {
	path := filepath.Join("..", "baseline.json")
	if _, err := os.Stat(path); err != nil {
		t.Skip("no committed baseline yet")
	}
	b, err := ReadBaseline(path)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, n := range Selected(Check()) {
		names[n] = true
	}
	for k := range b.Metrics {
		if isGeomean(k) {
			continue
		}
		scenario, _, _ := strings.Cut(k, " ÷ ")
		if !names[scenario] {
			t.Errorf("baseline metric %q names a scenario the check subset does not run", k)
		}
	}
}

// The gate on a small selection: every pair measured all three systems,
// the gated ratios and their per-pair samples are there, CPU time per
// packet is positive, and the run passes against itself.
func TestGateSmall(t *testing.T) {
	netns.RequireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 CPUs")
	}
	o := Options{Sizes: []string{"200"}, SAs: []int{1}, Workers: []int{1}, Dirs: []string{"decap", "encap"}, Ring: 2048, Pairs: 3, Log: testLog{t}}
	rep, err := Gate(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	g := GateRatios(rep)
	for _, k := range []string{"xesp/decap/200/1sa/1w ÷ afxdp_reflect", "xesp/encap/200/1sa/1w ÷ vs_sockets", geomeanKey("afxdp_reflect", 2)} {
		if g[k] <= 0 {
			t.Errorf("gate figure %q missing: %v", k, g)
		}
	}
	for _, x := range rep.Results {
		if x.Group == "ceiling" && strings.HasPrefix(x.Test, "aead") {
			continue
		}
		if x.CPUNs <= 0 || len(x.Samples) != o.Pairs {
			t.Errorf("%s: %v ns/pkt, %d samples", x.Name, x.CPUNs, len(x.Samples))
		}
		if x.Group == "xesp" && len(x.RatioSamples["afxdp_reflect"]) != o.Pairs {
			t.Errorf("%s: ratio samples %v", x.Name, x.RatioSamples)
		}
	}
	b := &Baseline{Runs: 1, Metrics: map[string]Metric{}}
	for k, v := range g {
		b.Metrics[k] = Metric{Value: v, Tolerance: 0.1}
	}
	if err := b.Compare(rep, io.Discard); err != nil {
		t.Fatalf("gate fails on its own figures: %v", err)
	}
}

// The goal model's load classification (mlr.go) on hand-made trial
// sets, NDR goal with 1 s final trials, 3 s duration sum, exceed ratio
// 0.5: one bad trial of three does not decide; two do.
func TestClassify(t *testing.T) {
	g := Options{}.Goals()[0]
	long := func(loss float64) trialResult { return trialResult{dur: time.Second, loss: loss} }
	short := func(loss float64) trialResult { return trialResult{dur: 500 * time.Millisecond, loss: loss} }
	for _, c := range []struct {
		trials []trialResult
		want   class
	}{
		{nil, undecided},
		{[]trialResult{long(0)}, undecided},
		{[]trialResult{long(0.01)}, undecided},
		{[]trialResult{long(0), long(0)}, lowerBound},
		{[]trialResult{long(0.01), long(0.2)}, upperBound},
		{[]trialResult{long(0), long(0.01)}, undecided},
		{[]trialResult{long(0), long(0.01), long(0)}, lowerBound},
		{[]trialResult{long(0.01), long(0), long(0.01)}, upperBound},
		// Short trials: good ones never make a lower bound alone; bad
		// ones count unless balanced by good short ones.
		{[]trialResult{short(0), short(0), short(0), short(0), short(0), short(0), short(0)}, undecided},
		{[]trialResult{short(0.1), short(0.1), short(0.1), short(0.1)}, upperBound},
		{[]trialResult{short(0.1), short(0), long(0), long(0)}, lowerBound},
		{[]trialResult{short(0.1), long(0.1), long(0)}, undecided},
	} {
		if got := classify(g, c.trials); got != c.want {
			t.Errorf("%v: %v, want %v", c.trials, got, c.want)
		}
	}
}

// modelPath forwards capacity packets/s and loses the rest, and every
// hiccup-th trial (if hiccup > 0) loses 2% more, as a scheduling stall on
// the shared VM does; the sender offers at most top.
func modelPath(capacity, top float64, hiccup int) trialFunc {
	n := 0
	return func(rate float64, d time.Duration) (float64, float64, float64, error) {
		n++
		offered := min(rate, top)
		loss := max(0, 1-capacity/offered)
		if hiccup > 0 && n%hiccup == 0 {
			loss += 0.02
		}
		return offered, loss, offered * (1 - loss), nil
	}
}

func runSearch(t *testing.T, trial trialFunc) *searcher {
	t.Helper()
	s := newSearcher(context.Background(), "model", 1.2e6, Options{}.Goals(), trial, nil)
	if err := interleave(s); err != nil {
		t.Fatal(err)
	}
	return s
}

// The search against model paths: NDR within the goal width below the
// capacity, PDR at or above NDR and within its loss, converged; with a
// hiccup every third trial (a single stall spoiling one trial) the
// exceed ratio still lands NDR near the capacity, where judging a load by
// one trial would have put it below.
func TestSearchModel(t *testing.T) {
	for _, hiccup := range []int{0, 3} {
		for _, capacity := range []float64{50e3, 280e3, 900e3} {
			s := runSearch(t, modelPath(capacity, 1e6, hiccup))
			res := s.result()
			ndr, pdr := res[0], res[1]
			if ndr.Load > capacity || ndr.Load < capacity*(1-2*defaultWidth) || pdr.Load < ndr.Load || pdr.Load > capacity/(1-PDRLoss) {
				t.Errorf("capacity %.0f, hiccup %d: NDR %.0f PDR %.0f (%d trials)", capacity, hiccup, ndr.Load, pdr.Load, s.trials)
			}
			if !ndr.Converged || !pdr.Converged || ndr.SenderBound || s.trials >= maxSearchTrials {
				t.Errorf("capacity %.0f, hiccup %d: %+v, %d trials", capacity, hiccup, res, s.trials)
			}
			if ndr.Trials < 2 {
				t.Errorf("capacity %.0f: NDR judged on %d trial(s)", capacity, ndr.Trials)
			}
		}
	}
	// A path faster than the sender: sender-bound, at the sender's rate.
	s := runSearch(t, modelPath(1e6, 1e5, 0))
	if ndr := s.result()[0]; !ndr.SenderBound || ndr.Load != 1e5 || !ndr.Converged {
		t.Errorf("sender-bound search: %+v", ndr)
	}
}

// Nearest-rank percentiles of a known sample, and the sampling mask.
func TestPercentiles(t *testing.T) {
	v := make([]float64, 0, 1000)
	for i := 1000; i >= 1; i-- {
		v = append(v, float64(i))
	}
	q := percentiles(v, 0.5, 0.99, 0.999, 1)
	if want := []float64{500, 990, 999, 1000}; !slices.Equal(q, want) {
		t.Errorf("percentiles of 1..1000 = %v, want %v", q, want)
	}
	if q := percentiles([]float64{7}, 0.5, 0.999); q[0] != 7 || q[1] != 7 {
		t.Errorf("one sample: %v", q)
	}
	if q := percentiles([]float64{3, 1, 2, 100}, 0.5, 0.99); q[0] != 2 || q[1] != 100 {
		t.Errorf("4 samples: %v, want [2 100]", q)
	}
	if q := percentiles(nil, 0.5); q[0] != 0 {
		t.Errorf("empty: %v", q)
	}
	for _, c := range []struct {
		expected float64
		mask     uint64
	}{{100, 0}, {latencySamples, 0}, {latencySamples + 1, 1}, {4 * latencySamples, 3}, {5 * latencySamples, 7}} {
		if m := sampleMask(c.expected); m != c.mask {
			t.Errorf("sampleMask(%.0f) = %d, want %d", c.expected, m, c.mask)
		}
	}
}

// Latency at 50% and 90% of NDR for decap, encap and both reflect
// ceilings, with a low top rate so the search ends at once (sender-bound
// by construction): every row carries both fractions, ordered
// percentiles, positive, from matched samples, sent by the paced
// live-frames engine whose XDP program records the send times.
func TestRunLatency(t *testing.T) {
	netns.RequireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 CPUs")
	}
	o := Options{Sizes: []string{"200"}, SAs: []int{1}, Workers: []int{1}, Dirs: []string{"decap", "encap"},
		Ceilings: true, Rounds: 1, Ring: 2048, NDR: true, Latency: true, MaxRate: 20000, Log: testLog{t}}
	rep, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"xesp/decap/200/1sa/1w", "xesp/encap/200/1sa/1w",
		ceilingName("afxdp_reflect", "public", "200"), ceilingName("afxdp_reflect", "private", "200")} {
		x, ok := rep.Find(name)
		if !ok {
			t.Errorf("no %s", name)
			continue
		}
		if x.NDR <= 0 || len(x.Latency) != len(LatencyFractions) {
			t.Errorf("%s: NDR %.0f, latency %+v", name, x.NDR, x.Latency)
			continue
		}
		// Every goal judged on at least two full-length trials at its
		// load; xesp's rows carry the reflect ceiling searched and
		// timed interleaved with them.
		for _, g := range x.Goals {
			if g.Load <= 0 || g.Trials < 2 || !g.Converged {
				t.Errorf("%s: goal %+v", name, g)
			}
		}
		if x.Group == "xesp" && (x.CeilingNDR <= 0 || len(x.CeilingLatency) != len(LatencyFractions) || x.FlowsVisited != 1) {
			t.Errorf("%s: ceiling NDR %.0f, ceiling latency %d trials, %d SAs visited", name, x.CeilingNDR, len(x.CeilingLatency), x.FlowsVisited)
		}
		for i, l := range x.Latency {
			if l.OfNDR != LatencyFractions[i] || l.Rate <= 0 {
				t.Errorf("%s: trial %d at %.2f of NDR, %.0f pps", name, i, l.OfNDR, l.Rate)
			}
			if l.Samples < 100 {
				t.Errorf("%s at %.0f%%: %d samples (%d unmatched)", name, 100*l.OfNDR, l.Samples, l.Unmatched)
			}
			if !(l.P50 > 0 && l.P50 <= l.P99 && l.P99 <= l.P999 && l.P999 <= l.Max) {
				t.Errorf("%s at %.0f%%: p50 %.1f p99 %.1f p99.9 %.1f max %.1f µs, want 0 < p50 ≤ p99 ≤ p99.9 ≤ max", name, 100*l.OfNDR, l.P50, l.P99, l.P999, l.Max)
			}
		}
	}
	var md bytes.Buffer
	rep.Markdown(&md)
	if !strings.Contains(md.String(), "| p50 µs | p99 µs | p99.9 µs |") || !strings.Contains(md.String(), "| xesp/encap/200/1sa/1w | 90% (sender) |") {
		t.Errorf("markdown has no latency table:\n%s", md.String())
	}
}
