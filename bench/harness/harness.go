// Package harness is xesp's benchmark: in one invocation it builds the
// phone ─ gateway ─ core namespace topology, measures the ceilings of the
// gateway's links and of the crypto (XDP_DROP, AF_XDP receive-only,
// AF_XDP reflect, bare AES-GCM open/seal on one core), then xesp's decap,
// encap and both at once over a matrix of packet sizes, SA counts and
// worker counts, and the baseline a Go user would write without XDP: the
// same ESP engine behind plain UDP sockets with recvmmsg/sendmmsg. Every
// figure is reported as packets/s with its loss (sent vs arrived at the
// far end, i.e. decrypted for decap) and as ratios to ceilings measured
// in the same run: the machine is shared and noisy, ratios travel.
//
// CPU placement: the generator's thread runs on GenCPU, and with it, in
// softirq, the receiving veth's XDP program and AF_XDP's copy into the
// UMEM (veth delivers in the sender's context). Every other thread of the
// process — workers, manager, Go runtime — is pinned to GwCPU. With two
// CPUs, two workers share GwCPU: the 2-worker figures show the cost of
// the split, not a second core's gain.
//
// Output: Report (JSON), Markdown (a table) and SVG (a log-scale bar
// chart with the ceilings drawn in); check.go compares a run's ratios
// with a committed baseline for CI.
package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/internal/procs"
	"github.com/xesp/xesp/lab/netns"
)

// CPU placement (see the package comment).
const (
	GenCPU = 0
	GwCPU  = 1
)

// Options select the scenarios.
type Options struct {
	Sizes   []string // "200", "1400", "imix", "sip" (pktgen.ParseSizes)
	SAs     []int    // SA pairs
	Workers []int
	Dirs    []string // "decap", "encap", "both"
	// Ceilings and Baseline switch those scenario groups on.
	Ceilings, Baseline bool
	// Flood adds, after each decap scenario, the same decap while a
	// second generator floods SA 0's SPI with forged ESP (wrong key) from
	// a spoofed source at full speed: flood/decap/... next to
	// xesp/decap/..., and the target that the first stays within 0.9x of
	// the second (issue 18, flood budgets).
	Flood bool
	// Rounds is the number of rings sent per scenario (each Ring frames).
	Rounds int
	// Repeat measures the whole selection this many times and reports
	// medians (1 if unset).
	Repeat int
	Ring   int
	// MaxFrame bounds the generator's frames (0: gen's default, a full
	// MTU); the gate's 200-byte rings use less kernel memory with less.
	MaxFrame int
	// NDR adds the NDR/PDR search (ndr.go) to every xesp scenario and
	// the reflect ceilings; MaxRate is its top offered rate (0:
	// DefaultMaxRate).
	NDR     bool
	MaxRate float64
	// The search's goal model (mlr.go; zero: the defaults): final trial
	// duration, full-length trial time a load is judged on, and the
	// share of it allowed to exceed the goal's loss ratio.
	TrialDuration, DurationSum time.Duration
	ExceedRatio                float64
	// PacedEngine is the paced sender's engine: pktgen.EngineLive (the
	// default: live frames paced inside the XDP program) or
	// pktgen.EngineAFXDP (copy-mode AF_XDP TX, the slower sender).
	PacedEngine string
	// Latency adds, to every scenario searched for NDR, latency
	// p50/p99/p99.9 at LatencyFractions of its NDR (latency.go).
	Latency bool
	// Pairs is how many interleaved trial pairs the gate takes per
	// scenario (Gate; 0: DefaultPairs).
	Pairs int
	// Install measures SA installation with this many pairs first, from
	// config and through the API (install.go); 0: not.
	Install int
	// ScalingSAs is the worker-scaling experiment's SA count (0: none):
	// every worker count is measured there at saturation (CPU time per
	// packet, the scaling targets), without NDR search or latency. The
	// gateway steers each SA to one worker, so the experiment needs many
	// SAs: at 1 SA the second worker would idle.
	ScalingSAs int
	Log        io.Writer
}

// Full is the whole matrix of the issue.
func Full() Options {
	return Options{
		Sizes: []string{"200", "1400", "imix"}, SAs: []int{1, 1000, 100_000, 1_000_000},
		Workers: []int{1, 2}, Dirs: []string{"decap", "encap", "both"},
		Ceilings: true, Baseline: true, Rounds: 4, Ring: 32768,
	}
}

// Check is the CI subset (bench-check): 200-byte packets, 1 and 1000
// SAs, one worker, decap and encap, the ceilings and the baseline, all
// five times over for medians. It runs in about a minute.
func Check() Options {
	return Options{
		Sizes: []string{"200"}, SAs: []int{1, 1000}, Workers: []int{1}, Dirs: []string{"decap", "encap"},
		Ceilings: true, Baseline: true, Rounds: 4, Ring: 32768, Repeat: 5,
	}
}

// Result is one scenario's figures.
type Result struct {
	Name    string `json:"name"`
	Group   string `json:"group"`         // ceiling, xesp, baseline
	Test    string `json:"test"`          // xdp_drop, afxdp_rx, afxdp_reflect, aead_open, aead_seal, decap, encap, both, udp_sockets
	Dir     string `json:"dir,omitempty"` // decap, encap or both (xesp and the baseline)
	Link    string `json:"link,omitempty"`
	Size    string `json:"size"`
	SAs     int    `json:"sas,omitempty"`
	Workers int    `json:"workers,omitempty"`
	// Offered frames were sent by the generator; OfferedPPS divides them
	// by the live-frames runs' wall time, fixed per-run cost included
	// (see measure), so it understates the burst rate. Delivered frames
	// arrived at the far end (decrypted, for decap) at PPS, timed from
	// the first to the last arrival the observer saw.
	Offered    uint64  `json:"offered"`
	Delivered  uint64  `json:"delivered"`
	OfferedPPS float64 `json:"offered_pps"`
	PPS        float64 `json:"pps"`
	LossPct    float64 `json:"loss_pct"`
	// CPUNs is the system under test's CPU time per delivered packet
	// (cpu.go), in ns; CPUPPS = 1e9/CPUNs is the rate it would reach
	// with a CPU to itself.
	CPUNs float64 `json:"cpu_ns_per_pkt,omitempty"`
	// Ratios of PPS to the ceilings of the same size (and link).
	Ratios map[string]float64 `json:"ratios,omitempty"`
	// Samples are the repetitions' (or the gate's pairs') packets/s.
	Samples []float64 `json:"pps_samples,omitempty"`
	// NDR and PDR (ndr.go): the highest paced offered rates with no loss
	// and with loss ≤ 0.5% (PDRLossPct: the loss at the PDR trial);
	// SaturationPaced is what arrived per second when offered MaxRate;
	// Trials counts the search's trials.
	NDR             float64 `json:"ndr_pps,omitempty"`
	PDR             float64 `json:"pdr_pps,omitempty"`
	PDRLossPct      float64 `json:"pdr_loss_pct,omitempty"`
	SaturationPaced float64 `json:"saturation_paced_pps,omitempty"`
	Trials          int     `json:"search_trials,omitempty"`
	SenderBound     bool    `json:"sender_bound,omitempty"`
	// Goals are the search's per-goal outcomes (mlr.go); SenderTop the
	// most the paced sender offered when asked for MaxRate;
	// SenderShortTrials the trials whose sender fell 3% short of the load.
	Goals             []GoalResult `json:"goals,omitempty"`
	SenderTop         float64      `json:"sender_top_pps,omitempty"`
	SenderShortTrials int          `json:"sender_short_trials,omitempty"`
	SenderRetried     int          `json:"sender_retried_trials,omitempty"`
	// The AF_XDP reflect ceiling of the same link and size, searched
	// interleaved with this scenario, trial by trial, on a second
	// topology (xesp rows): the ratio's denominator.
	CeilingNDR         float64      `json:"ceiling_ndr_pps,omitempty"`
	CeilingPDR         float64      `json:"ceiling_pdr_pps,omitempty"`
	CeilingSenderBound bool         `json:"ceiling_sender_bound,omitempty"`
	CeilingGoals       []GoalResult `json:"ceiling_goals,omitempty"`
	CeilingLatency     []Latency    `json:"ceiling_latency,omitempty"`
	// FlowsVisited is how many of the scenario's SAs the search's trials
	// sent to (consecutive SAs from a cursor, each at most once a trial).
	FlowsVisited uint64 `json:"flows_visited,omitempty"`
	// Latency at fractions of NDR (Options.Latency).
	Latency []Latency `json:"latency,omitempty"`
	// RatioSamples are the gate's per-pair ratios behind Ratios' medians.
	RatioSamples map[string][]float64 `json:"ratio_samples,omitempty"`
	Note         string               `json:"note,omitempty"`
}

// Load is one SA load into a running gateway: from SAs pairs to To,
// added to the SAD in chunks and waited for until the workers and the
// XDP SA map held them; the heap figure is the live Go heap after a
// collection, before and after, per SA (two per pair).
type Load struct {
	Workers      int     `json:"workers"`
	From         int     `json:"from_pairs"`
	To           int     `json:"to_pairs"`
	Seconds      float64 `json:"seconds"`
	PairsPerSec  float64 `json:"pairs_per_sec"`
	HeapPerSA    float64 `json:"heap_bytes_per_sa"`
	HeapAfterGiB float64 `json:"heap_after_gib"`
}

// Target is one figure of the issue's targets table, evaluated on this
// run: Ratio (a ratio, or a value in Unit) compared with Goal by Cmp
// (">=" or "<="), the figure as read and the same-run ceiling or control
// beside it. Status is "met", "not met", or why it is undecided
// ("undecided: sender-bound", "not measured in this run").
type Target struct {
	Measure string  `json:"measure"`
	Name    string  `json:"name"`
	Ratio   float64 `json:"ratio"`
	Goal    float64 `json:"goal"`
	Cmp     string  `json:"cmp"`
	Unit    string  `json:"unit,omitempty"`
	Figure  string  `json:"figure,omitempty"`
	Ceiling string  `json:"ceiling,omitempty"`
	Met     bool    `json:"met"`
	Status  string  `json:"status"`
	How     string  `json:"how"`
}

// Report is a whole run.
type Report struct {
	Machine Machine   `json:"machine"`
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"`
	GenCPU  int       `json:"gen_cpu"`
	GwCPU   int       `json:"gw_cpu"`
	Ring    int       `json:"ring"`
	Rounds  int       `json:"rounds"`
	Repeat  int       `json:"repeat,omitempty"`
	// Pairs is the gate's interleaved trial pairs per scenario.
	Pairs int `json:"pairs,omitempty"`
	// SlowKnob is the test-only worker slowdown in effect (0 in every
	// normal build; see dataplane/worker/slow_on.go).
	SlowKnob float64  `json:"slow_knob,omitempty"`
	Results  []Result `json:"results"`
	// Loads are the SA loads the run made (xesp gateways), with their
	// rate and the Go heap they added per SA.
	Loads []Load `json:"loads,omitempty"`
	// Warmups are the cipher warm-ups before each SA count's first
	// measured trial (warm.go).
	Warmups  []Warmup `json:"warmups,omitempty"`
	Install  *Install `json:"install,omitempty"` // Options.Install's figures (install.go)
	Targets  []Target `json:"targets,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

// Find returns the result named name.
func (r *Report) Find(name string) (Result, bool) {
	for _, x := range r.Results {
		if x.Name == name {
			return x, true
		}
	}
	return Result{}, false
}

// Name builders, shared with check.go and the report.
func ceilingName(test, link, size string) string {
	if link == "" {
		return fmt.Sprintf("ceiling/%s/%s", test, size)
	}
	return fmt.Sprintf("ceiling/%s/%s/%s", test, link, size)
}
func xespName(dir, size string, sas, workers int) string {
	return fmt.Sprintf("xesp/%s/%s/%s/%dw", dir, size, saLabel(sas), workers)
}
func baselineName(dir, size string, sas int) string {
	return fmt.Sprintf("baseline/udp_sockets/%s/%s/%s", dir, size, saLabel(sas))
}

// baselineDirs are the socket baseline's directions.
var baselineDirs = []string{"decap", "encap"}

func saLabel(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return fmt.Sprintf("%dMsa", n/1_000_000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dksa", n/1000)
	}
	return fmt.Sprintf("%dsa", n)
}

type runner struct {
	// ctx stops a measurement between rounds and a drain at once (a
	// signal must end the bench within 2 s in any phase).
	ctx    context.Context
	o      Options
	tp     *topo
	nw     pktgen.Net
	rep    *Report
	flows  []gen.Flow // the phones' side, ESP
	clear  []gen.Flow // the core's side, cleartext
	phoneG *gen.Gen
	coreG  *gen.Gen
	// warmPhone and warmCore send the cipher warm-up (warm.go): small
	// rings, one frame per SA.
	warmPhone, warmCore *gen.Gen
	floodG              *gen.Gen // Options.Flood: the forged flood, loaded once
	// ceilSizes are the sizes the ceilings in progress use.
	ceilSizes gen.Sizes
	// tp2 is a second topology (Options.NDR) on which the reflect
	// ceiling runs while xesp runs on tp, for interleaved searches.
	tp2 *topo
	// cursor is each side's next flow for paced trials; visited counts
	// the frames they sent (ndr.go).
	cursor, visited map[cursorKey]uint64
}

// setup builds the runner's topology and its two generators (phone side
// and core side); the returned function removes them.
func (r *runner) setup() (func(), error) {
	tp, err := newTopo()
	if err != nil {
		return nil, err
	}
	r.tp = tp
	closeAll := func() {
		for _, g := range []*gen.Gen{r.phoneG, r.coreG, r.warmPhone, r.warmCore} {
			if g != nil {
				g.Close()
			}
		}
		tp.close()
	}
	for _, g := range []struct {
		dst **gen.Gen
		e   end
	}{{&r.phoneG, tp.ph}, {&r.coreG, tp.co}} {
		if err := g.e.ns.Do(func() (err error) {
			*g.dst, err = gen.New(gen.Options{Ifindex: g.e.index, Ring: r.o.Ring, MaxFrame: r.o.MaxFrame, Ctx: r.ctx})
			return err
		}); err != nil {
			closeAll()
			return nil, err
		}
	}
	return closeAll, nil
}

// buildFlows builds the generator's n SA pairs (phone side sealed, core
// side clear), checking ctx every 4096 so a signal stops it at once.
func buildFlows(ctx context.Context, n int, nw pktgen.Net) (flows, clear []gen.Flow, err error) {
	if clear, err = pktgen.ClearFlows(n, nw); err != nil {
		return nil, nil, err
	}
	const chunk = 4096
	flows = make([]gen.Flow, 0, n)
	for from := 0; from < n; from += chunk {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		f, err := pktgen.FlowsRange(from, min(n, from+chunk), nw)
		if err != nil {
			return nil, nil, err
		}
		flows = append(flows, f...)
	}
	return flows, clear, nil
}

func (r *runner) logf(format string, args ...any) {
	if r.o.Log != nil {
		fmt.Fprintf(r.o.Log, format+"\n", args...)
	}
}

// Run runs the selected scenarios. Needs root and 2 CPUs. On an error
// after some results (Repeat 1), it returns the partial report beside the
// error, marked in Warnings.
func Run(ctx context.Context, o Options) (*Report, error) {
	if runtime.NumCPU() < 2 {
		return nil, errors.New("bench: needs 2 CPUs to pin the generator and the gateway apart")
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("bench: needs root (BPF, network namespaces)")
	}
	if o.Rounds < 1 {
		o.Rounds = 4
	}
	if o.Ring == 0 {
		o.Ring = 32768
	}
	if o.Repeat < 1 {
		o.Repeat = 1
	}
	sizes := map[string]gen.Sizes{}
	for _, s := range o.Sizes {
		sz, err := pktgen.ParseSizes(s)
		if err != nil {
			return nil, err
		}
		sizes[s] = sz
	}
	for _, d := range o.Dirs {
		if d != "decap" && d != "encap" && d != "both" {
			return nil, fmt.Errorf("bench: direction %q (want decap, encap or both)", d)
		}
	}
	for _, w := range o.Workers {
		if w < 1 || w > 64 {
			return nil, fmt.Errorf("bench: %d workers", w)
		}
	}
	maxSAs := 1
	o.SAs = slices.Sorted(slices.Values(o.SAs))
	if len(o.SAs) > 0 {
		maxSAs = o.SAs[len(o.SAs)-1]
	}
	maxSAs = max(maxSAs, o.ScalingSAs)
	rep := &Report{Machine: ReadMachine(), Started: time.Now().UTC(), GenCPU: GenCPU, GwCPU: GwCPU, Ring: o.Ring, Rounds: o.Rounds}
	r := &runner{ctx: ctx, o: o, rep: rep, nw: pktgen.DefaultNet(), cursor: map[cursorKey]uint64{}, visited: map[cursorKey]uint64{}}
	t0 := time.Now()
	var err error
	if o.Install > 0 {
		if rep.Install, err = measureInstall(ctx, o.Install, r.logf); err != nil {
			return nil, err
		}
	}
	r.logf("building %d generator SAs", maxSAs)
	if r.flows, r.clear, err = buildFlows(ctx, maxSAs, r.nw); err != nil {
		return nil, err
	}
	unpin, err := pinProcess(GwCPU)
	if err != nil {
		return nil, err
	}
	defer unpin()
	closeTopo, err := r.setup()
	if err != nil {
		return nil, err
	}
	defer func() {
		// The second topology (Options.NDR) goes alongside the main
		// one: each removal waits for the kernel, and a signal's stop
		// has 2 s in all.
		var wg sync.WaitGroup
		if r.tp2 != nil {
			wg.Go(func() { r.tp2.close() })
		}
		closeTopo()
		wg.Wait()
	}()
	if o.NDR && len(o.Dirs) > 0 {
		if r.tp2, err = newTopo(); err != nil {
			return nil, err
		}
	}
	if o.Flood && len(o.Dirs) > 0 {
		if err := r.loadFlood(); err != nil {
			return nil, err
		}
		defer r.floodG.Close()
	}

	// Each repetition measures every scenario once, ceilings first; the
	// ratios are taken within a repetition (ceiling and scenario seconds
	// apart) and the report keeps their median, so a burst of load from
	// elsewhere on the machine moves one sample, not the figure.
	var reps [][]Result
	for k := range o.Repeat {
		if o.Repeat > 1 {
			r.logf("repetition %d of %d", k+1, o.Repeat)
		}
		r.rep.Results = nil
		if err := r.once(ctx, sizes); err != nil {
			if o.Repeat == 1 && len(rep.Results) > 0 {
				// What was measured before the failure (a signal, a
				// scenario's error) is still a report: a long run
				// should not lose its first hour to its last step.
				rep.ratios()
				rep.Warnings = append(rep.Warnings, fmt.Sprintf("partial run: stopped after %d results: %v", len(rep.Results), err))
				rep.Seconds = time.Since(t0).Seconds()
				rep.targets()
				return rep, err
			}
			return nil, err
		}
		rep.ratios()
		reps = append(reps, rep.Results)
	}
	rep.Results = merge(reps)
	rep.Repeat = o.Repeat
	for _, h := range runHooks {
		if err := h(ctx, o, rep); err != nil {
			return nil, err
		}
	}
	rep.Seconds = time.Since(t0).Seconds()
	rep.targets()
	return rep, nil
}

// runHooks run after the scenarios, before the targets, for parts of the
// run that live in their own files (install.go: SA install figures into
// a gateway of their own); they add to the report (and targetHooks turn
// that into targets rows).
var runHooks []func(ctx context.Context, o Options, rep *Report) error

// once measures every selected scenario once.
func (r *runner) once(ctx context.Context, sizes map[string]gen.Sizes) error {
	o := r.o
	if o.Ceilings {
		for _, s := range o.Sizes {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := r.ceilings(s, sizes[s]); err != nil {
				return fmt.Errorf("ceilings at %s: %w", s, err)
			}
		}
	}
	if o.Baseline {
		for _, s := range o.Sizes {
			for _, n := range o.SAs {
				if err := ctx.Err(); err != nil {
					return err
				}
				if err := r.baseline("decap", s, sizes[s], n); err != nil {
					return fmt.Errorf("socket baseline at %s, %d SAs: %w", s, n, err)
				}
				if err := r.baseline("encap", s, sizes[s], n); err != nil {
					return fmt.Errorf("socket baseline (encap) at %s, %d SAs: %w", s, n, err)
				}
			}
		}
	}
	if len(o.Dirs) > 0 {
		for _, w := range o.Workers {
			if err := r.xesp(ctx, w, sizes); err != nil {
				return fmt.Errorf("xesp with %d workers: %w", w, err)
			}
		}
	}
	return nil
}

// merge folds repetitions into one result per scenario: frames summed
// (so loss covers every repetition), packets/s and each ratio the median
// of the repetitions' values, the samples kept.
func merge(reps [][]Result) []Result {
	if len(reps) == 1 {
		return reps[0]
	}
	out := make([]Result, len(reps[0]))
	for i := range out {
		x := reps[0][i]
		x.Offered, x.Delivered = 0, 0
		var pps, offered []float64
		ratios := map[string][]float64{}
		for _, rr := range reps {
			y := rr[i]
			x.Offered += y.Offered
			x.Delivered += y.Delivered
			pps = append(pps, y.PPS)
			offered = append(offered, y.OfferedPPS)
			for k, v := range y.Ratios {
				ratios[k] = append(ratios[k], v)
			}
		}
		x.PPS, x.OfferedPPS, x.Samples = medianOf(pps), medianOf(offered), pps
		if x.Offered > 0 {
			x.LossPct = 100 * (1 - float64(x.Delivered)/float64(x.Offered))
		}
		if len(ratios) > 0 {
			x.Ratios = map[string]float64{}
			for k, v := range ratios {
				x.Ratios[k] = medianOf(v)
			}
		}
		out[i] = x
	}
	return out
}

func medianOf(v []float64) float64 {
	return median(slices.Sorted(slices.Values(v)))
}

// sender is one generator in a phase.
type sender struct {
	ns  *netns.NS
	g   *gen.Gen
	esp bool
	// noise is traffic nobody should deliver (the forged flood): not
	// offered, not refilled.
	noise bool
}

// phase is what one measured scenario sent and what arrived at its far
// end.
type phase struct {
	offered, delivered uint64
	// send is the generators' time inside live-frames runs; busy runs
	// from each round's start to the last frame counted at the far end.
	send, busy time.Duration
	// cpu is the run time of the process's threads other than the
	// generators' and the observer's from each round's first frame to
	// its drain: the system under test's CPU cost (cpu.go).
	cpu time.Duration
}

func (p phase) result(r Result) Result {
	r.Offered, r.Delivered = p.offered, p.delivered
	if p.send > 0 {
		r.OfferedPPS = float64(p.offered) / p.send.Seconds()
	}
	if p.busy > 0 {
		r.PPS = float64(p.delivered) / p.busy.Seconds()
	}
	if p.offered > 0 {
		r.LossPct = 100 * (1 - float64(p.delivered)/float64(p.offered))
	}
	if p.cpu > 0 && p.delivered > 0 {
		r.CPUNs = float64(p.cpu.Nanoseconds()) / float64(p.delivered)
	}
	return r
}

// measure sends rounds rings from every sender at once (each on its own
// thread pinned to GenCPU, in its namespace) while an observer polls
// count, the far ends' cumulative counter, and after each round waits
// until the counter stops moving. ESP rings are refilled before every
// round, outside the timing.
//
// Why an observer: a live-frames run costs a fixed 20–40 ms on top of
// its frames (measured on this kernel, in 4 ms steps: a few scheduler
// ticks), and the frames themselves leave in a burst of a few ms at
// ~6 Mpps. Timing the arrivals by the sender's syscall would charge that
// fixed cost, and its tick-sized jitter, to the receiver. So the
// delivered rate is what arrived between the first and the last frame
// the observer saw counted: the receiver's throughput while saturated.
func (r *runner) measure(senders []sender, count func() (uint64, error)) (phase, error) {
	var p phase
	r.phase("saturation")
	for range r.o.Rounds {
		if err := r.ctx.Err(); err != nil {
			return p, err
		}
		for _, s := range senders {
			if s.esp && !s.noise {
				if err := s.g.Refill(); err != nil {
					return p, err
				}
			}
		}
		before, err := count()
		if err != nil {
			return p, err
		}
		var gens tidSet
		cpu0 := threadCPU()
		obs := startObserver(count, before, &gens)
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex
			sent    int
			sendMax time.Duration
			errs    []error
		)
		for _, s := range senders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := s.ns.Do(func() error {
					gens.addSelf()
					restore, err := gen.PinThread(GenCPU)
					if err != nil {
						return err
					}
					defer restore()
					n, el, err := s.g.Send()
					mu.Lock()
					if !s.noise {
						sent += n
						sendMax = max(sendMax, el)
					}
					mu.Unlock()
					return err
				})
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		sendEnd := time.Now()
		if err := errors.Join(errs...); err != nil {
			obs.stop()
			return p, err
		}
		// Drain: the workers may still be working through their rings.
		// The far end is quiet once its counter has not moved for 20 ms,
		// and not before drainMin after the send: on a loaded shared
		// host the system's thread may wait that long for its CPU with
		// a full RX ring, and frames it handles after the window would
		// be counted (and their CPU time charged) to the next round.
		for {
			c, last, _ := obs.state()
			if c-before >= uint64(sent) || time.Since(last) > 20*time.Millisecond && time.Since(sendEnd) > drainMin || r.ctx.Err() != nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
		c, first, last, err := obs.stop()
		if err != nil {
			return p, err
		}
		p.cpu += time.Duration(cpuSince(cpu0, gens.m))
		p.offered += uint64(sent)
		p.delivered += c - before
		p.send += sendMax
		if c > before {
			p.busy += last.Sub(first)
		}
	}
	return p, nil
}

// drainMin is the least a round waits after its send for the far end to
// go quiet (see measure).
const drainMin = 80 * time.Millisecond

// observer polls a counter every 100 µs from GenCPU (where it takes a
// few µs from the generator per wake rather than from the workers),
// recording when it last saw it still and when it last saw it move.
type observer struct {
	mu          sync.Mutex
	c           uint64
	first, last time.Time
	err         error
	done        chan struct{}
	quit        atomic.Bool
}

func startObserver(count func() (uint64, error), before uint64, gens *tidSet) *observer {
	o := &observer{c: before, last: time.Now(), done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(o.done)
		runtime.LockOSThread()
		// Left locked: the thread is pinned to GenCPU and exits with
		// the goroutine rather than serving others there.
		defer procs.Reserve()() // a late observer would stretch the trial
		gens.addSelf()
		close(ready)
		if _, err := gen.PinThread(GenCPU); err != nil {
			o.err = err
			return
		}
		prev := time.Now()
		for !o.quit.Load() {
			c, err := count()
			now := time.Now()
			o.mu.Lock()
			if err != nil {
				o.err = err
				o.mu.Unlock()
				return
			}
			if c != o.c {
				// The first frame arrived after the previous poll:
				// starting the window there errs by at most one poll
				// toward a lower rate, never a zero-length window.
				if o.first.IsZero() {
					o.first = prev
				}
				o.c, o.last = c, now
			}
			o.mu.Unlock()
			prev = now
			time.Sleep(100 * time.Microsecond)
		}
	}()
	<-ready
	return o
}

func (o *observer) state() (uint64, time.Time, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.c, o.last, o.err
}

func (o *observer) stop() (c uint64, first, last time.Time, err error) {
	o.quit.Store(true)
	<-o.done
	return o.c, o.first, o.last, o.err
}

func counterOf(c *gen.Counter) func() (uint64, error) {
	return func() (uint64, error) { n, _, err := c.Read(); return n, err }
}

func (r *runner) loadPhone(sz gen.Sizes, n int) error {
	return r.phoneG.LoadESP(gen.L2{Src: r.tp.ph.mac, Dst: r.tp.pub.mac}, r.flows[:n], sz)
}

func (r *runner) loadCore(sz gen.Sizes, n int) error {
	return r.coreG.LoadClear(gen.L2{Src: r.tp.co.mac, Dst: r.tp.priv.mac}, r.clear[:n], sz)
}

func (r *runner) add(res Result) {
	r.rep.Results = append(r.rep.Results, res)
	r.logf("%-44s %12.0f pps  offered %12.0f pps  loss %5.1f%%  %s", res.Name, res.PPS, res.OfferedPPS, res.LossPct, res.Note)
}

// xesp starts a gateway with workers workers and runs every direction,
// size and SA count on it, loading SAs in ascending counts.
func (r *runner) xesp(ctx context.Context, workers int, sizes map[string]gen.Sizes) error {
	gw, err := r.startGateway(workers)
	if err != nil {
		return err
	}
	defer gw.stop()
	loaded := 0
	for _, n := range r.o.SASFor(workers) {
		if n > loaded {
			var ms runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&ms)
			heap0 := ms.HeapAlloc
			t := time.Now()
			if err := gw.load(ctx, loaded, n, r.nw); err != nil {
				return err
			}
			el := time.Since(t)
			// Collect now what loading left behind: a collection of the
			// multi-GB heap of a million SAs during a scenario would run
			// on the workers' CPU and be measured as xesp's cost.
			runtime.GC()
			runtime.ReadMemStats(&ms)
			ld := Load{Workers: workers, From: loaded, To: n, Seconds: el.Seconds(), PairsPerSec: float64(n-loaded) / el.Seconds(),
				HeapPerSA: (float64(ms.HeapAlloc) - float64(heap0)) / float64(2*(n-loaded)), HeapAfterGiB: float64(ms.HeapAlloc) / (1 << 30)}
			r.rep.Loads = append(r.rep.Loads, ld)
			r.logf("gateway (%d workers) holds %d SA pairs (loaded in %v: %.0f pairs/s; %.0f B of live heap added per SA: the gateway's share, the generator's SAs were built before)",
				workers, n, el.Round(time.Millisecond), ld.PairsPerSec, ld.HeapPerSA)
			loaded = n
		}
		// Every SA's cipher built before the first measured trial at n
		// (warm.go); the builds during the trials are counted after.
		wu, err := r.warmup(gw, workers, n)
		if err != nil {
			return err
		}
		// The heap grew by the ciphers (the gateway's and the
		// generator's): collect now, not in a trial.
		runtime.GC()
		trialBuilds0, _ := gw.ciphers()
		for si, s := range r.o.Sizes {
			if err := r.loadPhone(sizes[s], n); err != nil {
				return err
			}
			if err := r.loadCore(sizes[s], n); err != nil {
				return err
			}
			if si == 0 {
				// One ring each way at the scenario's sizes, not
				// measured: the ciphers are built (warmup above), this
				// faults in the rings' and UMEM's pages at full rate.
				if err := r.warm(gw); err != nil {
					return err
				}
			}
			// Decap first: its authenticated packets confirm each SA's
			// NAT binding before encap uses it.
			for _, d := range r.o.Dirs {
				if err := ctx.Err(); err != nil {
					return err
				}
				var senders []sender
				var count func() (uint64, error)
				switch d {
				case "decap":
					senders, count = []sender{{r.tp.phone, r.phoneG, true, false}}, counterOf(gw.decapCount)
				case "encap":
					senders, count = []sender{{r.tp.core, r.coreG, false, false}}, counterOf(gw.encapCount)
				case "both":
					senders = []sender{{r.tp.phone, r.phoneG, true, false}, {r.tp.core, r.coreG, false, false}}
					count = func() (uint64, error) {
						a, err := counterOf(gw.decapCount)()
						if err != nil {
							return 0, err
						}
						b, err := counterOf(gw.encapCount)()
						return a + b, err
					}
				}
				before := gw.snapshot()
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				gcs := ms.NumGC
				p, err := r.measure(senders, count)
				if err != nil {
					return err
				}
				runtime.ReadMemStats(&ms)
				res := p.result(Result{Name: xespName(d, s, n, workers), Group: "xesp", Test: d, Dir: d, Size: s, SAs: n, Workers: workers})
				res.Note = gw.explain(before)
				if d := ms.NumGC - gcs; d > 0 {
					res.Note += fmt.Sprintf("; %d GC cycle(s) during the run", d)
				}
				if d != "both" && r.o.searched(n, workers) {
					if err := r.searchXesp(&res, gw, d == "encap", n, sizes[s], count); err != nil {
						return err
					}
				}
				r.add(res)
				if d == "decap" && r.floodG != nil {
					// The same again under the flood; its own snapshot, so
					// the note counts only this run (not the one before
					// or the NDR search's trials).
					fb := gw.snapshot()
					p, err := r.measure(append(senders, sender{ns: r.tp.phone, g: r.floodG, esp: true, noise: true}), count)
					if err != nil {
						return err
					}
					fr := p.result(Result{Name: floodName(s, n, workers), Group: "flood", Test: "decap_under_flood", Dir: d, Size: s, SAs: n, Workers: workers})
					fr.Note = gw.explain(fb) // ratios(): vs_no_flood
					r.add(fr)
				}
			}
		}
		b, _ := gw.ciphers()
		wu.TrialBuilds = b - trialBuilds0
		r.rep.Warmups = append(r.rep.Warmups, *wu)
	}
	return nil
}

// searchXesp runs res's NDR/PDR search interleaved with the reflect
// ceiling's, then (Options.Latency) the latency trials at LatencyFractions
// of each one's own NDR, xesp's and the ceiling's alternating.
func (r *runner) searchXesp(res *Result, gw *gatewayUnder, encap bool, n int, sz gen.Sizes, count func() (uint64, error)) error {
	ss, err := r.ndrWithCeiling(res, encap, n, sz, count)
	if err != nil {
		return err
	}
	defer ss.close()
	if !r.o.Latency {
		return nil
	}
	c := gw.decapCount
	if encap {
		c = gw.encapCount
	}
	for _, f := range LatencyFractions {
		if res.NDR > 0 {
			l, err := r.latencyAt(r.tp, res.Name, encap, encap, n, sz, c, f, res.NDR, res.SenderBound)
			if err != nil {
				return err
			}
			res.Latency = append(res.Latency, l)
		}
		if res.CeilingNDR > 0 {
			// Reflected back to the sender: ESP on the public link,
			// cleartext on the private one.
			l, err := r.latencyAt(r.tp2, res.Name+" (reflect ceiling)", encap, !encap, r.ceilFlows(), sz, ss.stamps, f, res.CeilingNDR, res.CeilingSenderBound)
			if err != nil {
				return err
			}
			res.CeilingLatency = append(res.CeilingLatency, l)
		}
	}
	return nil
}

// floodName names the decap scenario under a forged flood.
func floodName(size string, sas, workers int) string {
	return fmt.Sprintf("flood/decap/%s/%s/%dw", size, saLabel(sas), workers)
}

// loadFlood builds the forged flood: SA 0's SPI sealed under a wrong key
// with sequence numbers far ahead of the window (so the replay
// pre-check passes them and each would cost a verification), from a
// spoofed source, re-sent unchanged (gen.Options.Forged).
func (r *runner) loadFlood() error {
	victim := r.flows[0]
	key := make([]byte, 20) // pktgen's SAs are aes128gcm16: key and salt
	for i := range key {
		key[i] = byte(0xf0 ^ i)
	}
	forger, err := esp.NewTransform(esp.Config{SPI: victim.SA.SPI(), Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
	if err != nil {
		return fmt.Errorf("bench: flood SA: %w", err)
	}
	forger.SetNextSeq(1 << 30)
	out := victim.Outer
	out.Src = netip.MustParseAddr("203.0.113.66")
	flows := []gen.Flow{{SA: forger, Outer: out, Src: victim.Src, Dst: victim.Dst}}
	return r.tp.ph.ns.Do(func() (err error) {
		if r.floodG, err = gen.New(gen.Options{Ifindex: r.tp.ph.index, Ring: r.o.Ring, Forged: true}); err != nil {
			return err
		}
		return r.floodG.LoadESP(gen.L2{Src: r.tp.ph.mac, Dst: r.tp.pub.mac}, flows, gen.Fixed(200))
	})
}

// warm sends one unmeasured ring each way through the gateway.
func (r *runner) warm(gw *gatewayUnder) error {
	rounds := r.o.Rounds
	r.o.Rounds = 1
	defer func() { r.o.Rounds = rounds }()
	if _, err := r.measure([]sender{{r.tp.phone, r.phoneG, true, false}}, counterOf(gw.decapCount)); err != nil {
		return err
	}
	_, err := r.measure([]sender{{r.tp.core, r.coreG, false, false}}, counterOf(gw.encapCount))
	return err
}

// gatewayUnder is a gateway on the topology with far-end counters.
type gatewayUnder struct {
	// ctx is the run's: once a signal ended it, stop leaves the gateway
	// to the process's exit (see stop).
	ctx                    context.Context
	g                      *gateway.Gateway
	stateDir               string
	decapCount, encapCount *gen.Counter
	closers                []io.Closer
}

func (r *runner) startGateway(workers int) (_ *gatewayUnder, err error) {
	gu := &gatewayUnder{ctx: r.ctx}
	defer func() {
		if err != nil {
			gu.stop()
		}
	}()
	if gu.stateDir, err = os.MkdirTemp("", "xesp-bench-"); err != nil {
		return nil, err
	}
	if gu.g, err = startGateway(r.tp, workers, gu.stateDir); err != nil {
		return nil, err
	}
	// Stamping counters: the latency trials sample their arrivals
	// (latency.go); between them the program only counts.
	if gu.decapCount, err = gen.NewStampCounter(r.nw.Core.Port(), stampRingBytes); err != nil {
		return nil, err
	}
	gu.closers = append(gu.closers, gu.decapCount)
	l, err := attach(r.tp.co, gu.decapCount.Prog)
	if err != nil {
		return nil, err
	}
	gu.closers = append(gu.closers, l)
	if gu.encapCount, err = gen.NewStampCounter(esp.NATTPort, stampRingBytes); err != nil {
		return nil, err
	}
	gu.closers = append(gu.closers, gu.encapCount)
	if l, err = attach(r.tp.ph, gu.encapCount.Prog); err != nil {
		return nil, err
	}
	gu.closers = append(gu.closers, l)
	return gu, nil
}

func (gu *gatewayUnder) stop() {
	for i := len(gu.closers) - 1; i >= 0; i-- {
		gu.closers[i].Close()
	}
	// A graceful stop snapshots every SA's replay window and persists
	// the SAs the bench added (they count as API SAs): tens of seconds
	// at a million. After a signal the process is about to exit and
	// its state directory is deleted, so the bench leaves the gateway
	// running; removing the namespaces takes its links and sockets, and
	// the exit takes the rest. That keeps a signal's stop under 2 s.
	if gu.g != nil && (gu.ctx == nil || gu.ctx.Err() == nil) {
		gu.g.Stop(false)
	}
	if gu.stateDir != "" {
		os.RemoveAll(gu.stateDir)
	}
}

// ScalingMaxSAs is the largest SA count a gateway with more workers than
// the fewest selected is measured at: the worker-scaling experiment
// (targets: 2 workers ÷ 1) needs one count, not a second 1M-SA gateway.
const ScalingMaxSAs = 1000

// SASFor is the SA counts measured with workers workers, ascending: all,
// and ScalingSAs, for the fewest workers selected; for more, ScalingSAs
// if set, else those up to ScalingMaxSAs (saturation and CPU per packet;
// the NDR search runs for the fewest workers at the SAs counts only, see
// searched).
func (o Options) SASFor(workers int) []int {
	all := slices.Sorted(slices.Values(o.SAs))
	if o.ScalingSAs > 0 && !slices.Contains(all, o.ScalingSAs) {
		all = slices.Sorted(slices.Values(append(all, o.ScalingSAs)))
	}
	if len(o.Workers) == 0 || workers == slices.Min(o.Workers) {
		return all
	}
	if o.ScalingSAs > 0 {
		return []int{o.ScalingSAs}
	}
	var out []int
	for _, n := range all {
		if n <= ScalingMaxSAs {
			out = append(out, n)
		}
	}
	return out
}

// searched reports whether the scenarios at n SA pairs with workers get
// the NDR search (and latency): the fewest workers, at the SAs counts
// (not at ScalingSAs alone).
func (o Options) searched(n, workers int) bool {
	return o.NDR && workers == slices.Min(o.Workers) && slices.Contains(o.SAs, n)
}

// Selected lists the scenario names o would run, for -list.
func Selected(o Options) []string {
	var out []string
	if o.Ceilings {
		for _, s := range o.Sizes {
			for _, c := range ceilingTests {
				out = append(out, ceilingName(c.test, c.link, s))
			}
		}
	}
	if o.Baseline {
		for _, s := range o.Sizes {
			for _, n := range o.SAs {
				for _, d := range baselineDirs {
					out = append(out, baselineName(d, s, n))
				}
			}
		}
	}
	for _, w := range o.Workers {
		for _, n := range o.SASFor(w) {
			for _, s := range o.Sizes {
				for _, d := range o.Dirs {
					out = append(out, xespName(d, s, n, w))
					if d == "decap" && o.Flood {
						out = append(out, floodName(s, n, w))
					}
				}
			}
		}
	}
	return out
}

// ParseList splits a comma-separated flag value.
func ParseList(s string) []string {
	var out []string
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
