package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"syscall"

	"github.com/xesp/xesp/bench/harness"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "bench", Summary: "measure xesp against ceilings and a socket baseline in namespaces it builds (root)", Run: runBench})
}

func runBench(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: xesp-lab bench [flags]

Builds phone ─ gateway ─ core in network namespaces, then measures in one
run: the ceilings (XDP_DROP and AF_XDP receive-only on the gateway's links,
AF_XDP reflect, bare AES-GCM open/seal on one core), xesp's decap, encap
and both over packet sizes, SA counts and worker counts, and the same ESP
engine behind UDP sockets (recvmmsg/sendmmsg). Writes results.json,
results.md and results.svg to -out. The generator runs on CPU 0, the
gateway on CPU 1.

-check FILE runs the bench-check subset and fails when a ratio fell below
the baseline in FILE by more than its tolerance; -calibrate N runs the
subset N times and writes FILE from the spread it measured.`)
		fs.PrintDefaults()
	}
	preset := fs.String("preset", "full", `scenario set: "full" (the whole matrix) or "check" (the bench-check subset); the flags below override parts`)
	sizes := fs.String("sizes", "", "inner packet sizes, comma-separated (200,1400,imix,sip)")
	sas := fs.String("sas", "", "SA pair counts, comma-separated (1,1000,100000,1000000)")
	workers := fs.String("workers", "", "worker counts, comma-separated (1,2)")
	dirs := fs.String("dirs", "", `directions, comma-separated (decap,encap,both; "none" for none)`)
	ceilings := fs.Bool("ceilings", true, "measure the ceilings")
	baseline := fs.Bool("baseline", true, "measure the UDP-socket baseline")
	flood := fs.Bool("flood", true, "after each decap scenario, measure it again under a forged flood of one SA (not with -check/-calibrate)")
	rounds := fs.Int("rounds", 0, "rings sent per scenario (0: the preset's)")
	repeat := fs.Int("repeat", 0, "measure everything this many times and report medians (0: the preset's)")
	ndr := fs.Bool("ndr", false, "search each xesp scenario's and reflect ceiling's NDR (no loss) and PDR (≤0.5% loss) over a paced offered rate (docs/benchmarking.md)")
	latency := fs.Bool("latency", true, "with -ndr: measure latency p50/p99/p99.9 at 50% and 90% of each searched NDR, timestamps matched by the payload's serial (not with -check/-calibrate)")
	maxRate := fs.Float64("max-rate", 0, "with -ndr: the top offered rate, packets/s (0: harness.DefaultMaxRate)")
	scalingSAs := fs.Int("scaling-sas", 0, "also measure every -workers count at this many SA pairs, at saturation only (the worker-scaling experiment; 0: the 2-worker gateway at the -sas counts up to 1000)")
	install := fs.Int("install", 0, "first measure SA installation with this many pairs: from config (JSON-lines sa_files) and through POST /v1/sas/batch, beside BPF batch updates (0: not)")
	trial := fs.Duration("trial", harness.DefaultTrial, "with -ndr: MLRsearch's final trial duration")
	durSum := fs.Duration("duration-sum", harness.DefaultDurationSum, "with -ndr: full-length trial time a load is judged on (MLRsearch's goal duration sum)")
	pacedEngine := fs.String("paced-engine", "live", "with -ndr: the paced sender: live (live frames paced inside the XDP program) or afxdp (copy-mode AF_XDP TX, slower on veth)")
	exceed := fs.Float64("exceed-ratio", harness.DefaultExceedRatio, "with -ndr: share of that time allowed above the goal's loss ratio (MLRsearch's goal exceed ratio; 0.5: the median trial decides)")
	pairs := fs.Int("pairs", 0, "with -check/-calibrate: interleaved trial pairs per scenario (0: harness.DefaultPairs)")
	out := fs.String("out", "bench/results", "directory for results.{json,md,svg}")
	list := fs.Bool("list", false, "list the selected scenarios and exit")
	check := fs.String("check", "", "compare the check subset's ratios with this baseline file")
	calibrate := fs.Int("calibrate", 0, "run the check subset this many times and write -check's file from the spread")
	cpuProfile := fs.String("cpuprofile", "", "write the bench process's CPU profile (gateway, generator and harness alike) to this file")
	render := fs.String("render", "", "redraw results.{json,md,svg} in -out from this results.json, ratios and targets recomputed, and exit")
	if err := fs.Parse(args); err != nil {
		return errors.Join(errUsage, err)
	}
	if *render != "" {
		data, err := os.ReadFile(*render)
		if err != nil {
			return err
		}
		var rep harness.Report
		if err := json.Unmarshal(data, &rep); err != nil {
			return fmt.Errorf("%s: %w", *render, err)
		}
		rep.Retarget()
		return writeReport(&rep, *out)
	}
	var o harness.Options
	switch *preset {
	case "full":
		o = harness.Full()
	case "check":
		o = harness.Check()
	default:
		return fmt.Errorf("%w: -preset %q (full or check)", errUsage, *preset)
	}
	if *check != "" || *calibrate > 0 {
		o = harness.Check()
	}
	if *sizes != "" {
		o.Sizes = harness.ParseList(*sizes)
	}
	if *sas != "" {
		v, err := atoiList(*sas)
		if err != nil {
			return fmt.Errorf("%w: -sas: %v", errUsage, err)
		}
		o.SAs = v
	}
	if *workers != "" {
		v, err := atoiList(*workers)
		if err != nil {
			return fmt.Errorf("%w: -workers: %v", errUsage, err)
		}
		o.Workers = v
	}
	if *dirs == "none" {
		o.Dirs = nil
	} else if *dirs != "" {
		o.Dirs = harness.ParseList(*dirs)
	}
	o.Ceilings, o.Baseline = *ceilings, *baseline
	o.Flood = *flood && *check == "" && *calibrate == 0
	if *rounds > 0 {
		o.Rounds = *rounds
	}
	if *repeat > 0 {
		o.Repeat = *repeat
	}
	o.Pairs = *pairs
	o.Install = *install
	o.ScalingSAs = *scalingSAs
	o.NDR, o.MaxRate = *ndr, *maxRate
	o.TrialDuration, o.DurationSum, o.ExceedRatio, o.PacedEngine = *trial, *durSum, *exceed, *pacedEngine
	o.Latency = *latency && *ndr && *check == "" && *calibrate == 0
	if *list {
		for _, n := range harness.Selected(o) {
			fmt.Println(n)
		}
		return nil
	}
	o.Log = os.Stderr
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("-cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if *calibrate > 0 {
		if *check == "" {
			return fmt.Errorf("%w: -calibrate needs -check FILE to write", errUsage)
		}
		b, err := harness.Calibrate(ctx, o, *calibrate)
		if err != nil {
			return err
		}
		if err := b.Write(*check); err != nil {
			return err
		}
		b.Summary(os.Stdout)
		fmt.Printf("wrote %s\n", *check)
		return nil
	}
	run := harness.Run
	if *check != "" {
		run = harness.Gate
	}
	rep, err := run(ctx, o)
	if err != nil {
		if rep != nil {
			// A partial run's report is written, then the error returned.
			if werr := writeReport(rep, *out); werr != nil {
				return errors.Join(err, werr)
			}
		}
		return err
	}
	if err := writeReport(rep, *out); err != nil {
		return err
	}
	rep.Markdown(os.Stdout)
	if *check != "" {
		b, err := harness.ReadBaseline(*check)
		if err != nil {
			return err
		}
		if err := b.Compare(rep, os.Stdout); err != nil {
			return err
		}
	}
	return nil
}

func writeReport(rep *harness.Report, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range []struct {
		name  string
		write func(*os.File) error
	}{
		{"results.json", func(f *os.File) error { return rep.WriteJSON(f) }},
		{"results.md", func(f *os.File) error { rep.Markdown(f); return nil }},
		{"results.svg", func(f *os.File) error { rep.SVG(f); return nil }},
	} {
		p := filepath.Join(dir, f.name)
		fh, err := os.Create(p)
		if err != nil {
			return err
		}
		err = f.write(fh)
		if cerr := fh.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	fmt.Fprintf(os.Stderr, "wrote %s/results.{json,md,svg}\n", dir)
	return nil
}

func atoiList(s string) ([]int, error) {
	var out []int
	for _, f := range harness.ParseList(s) {
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}
