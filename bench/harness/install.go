package harness

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/loader"
	"golang.org/x/sys/unix"
)

// Install is SA installation at carrier speed (issue 13, item 3),
// measured on its own topology before anything is pinned: the daemon's
// load is not pinned to one CPU either.
//
//   - Config: `xesp run` with a JSON-lines SA file of Pairs pairs named by
//     sa_files (pktgen.WriteSAFile: keys inline, as an operator provisions
//     phones): from config.Load until the manager has installed every SA
//     and the XDP SA map holds every inbound one, as the daemon runs it
//     (config.Load, gateway.Start) minus the exec.
//   - API: POST /v1/sas/batch over the Unix socket into a running gateway
//     with no SAs, APIBatch SAs a request and APIParallel requests in
//     flight (as `xesp sa import` sends them), until the SA map holds
//     them all. The client runs in the same process: its JSON encoding is
//     counted in the rate.
//   - Ceiling: the same entries written straight into fresh SA and policy
//     maps of the same capacity with BPF_MAP_UPDATE_BATCH, the kernel's
//     share of any install; the ratios say how much of that rate xesp
//     keeps.
type Install struct {
	Pairs              int     `json:"pairs"`
	ConfigSeconds      float64 `json:"config_seconds"`
	ConfigParseSeconds float64 `json:"config_parse_seconds"` // config.Load alone
	ConfigSAsPerSec    float64 `json:"config_sas_per_sec"`
	// ConfigStopSeconds is the stop of that gateway, all its SAs
	// installed: the final state snapshot (every SA's window, binding
	// and counters), the API store's flush, the sockets closed.
	// ConfigRestartSeconds is the start after it, as ConfigSeconds but
	// from the state it left (windows, bindings, counters and sequence
	// reservations restored). A restart's outage is the two together.
	ConfigStopSeconds    float64 `json:"config_stop_seconds"`
	ConfigRestartSeconds float64 `json:"config_restart_seconds"`
	// HandOver* is a hitless upgrade of the restarted gateway
	// (`xesp run --upgrade-from`, in one process: the descriptors are
	// duplicated as SCM_RIGHTS would, the hand-over goes through JSON as
	// on the socket). The successor parses its config and builds its SA
	// database first (gateway.Prepare), as the daemon does before it
	// asks. HandOverStopSeconds is the running
	// gateway's side (workers stopped, exact snapshot, API store flushed,
	// state exported); HandOverStartSeconds the successor's start with
	// it, until its workers serve. Packets arriving meanwhile wait on the
	// RX rings, up to their size: the sum is the gap they must bridge.
	HandOverStopSeconds float64 `json:"handover_stop_seconds,omitempty"`
	// HandOverBytes is the JSON and the replay-window snapshot's memfd.
	HandOverBytes        int     `json:"handover_bytes,omitempty"`
	HandOverStartSeconds float64 `json:"handover_start_seconds,omitempty"`
	// ConfigCPUSeconds and APICPUSeconds are the process's CPU time
	// (user + system, every thread) over each path: on a shared machine
	// they move less than wall time. The API's includes its client.
	ConfigCPUSeconds float64 `json:"config_cpu_seconds"`
	APICPUSeconds    float64 `json:"api_cpu_seconds"`
	APISAs           int     `json:"api_sas"`
	APIBatch         int     `json:"api_batch"`
	APIParallel      int     `json:"api_parallel"`
	APISeconds       float64 `json:"api_seconds"`
	APISAsPerSec     float64 `json:"api_sas_per_sec"`
	// MapSAsPerSec is the ceiling: SA map and policy map entries written
	// per second by batch updates (one entry per SA).
	MapSAsPerSec float64 `json:"map_sas_per_sec"`
	// ConfigVsMap and APIVsMap are the install rates over the ceiling.
	ConfigVsMap float64 `json:"config_vs_map"`
	APIVsMap    float64 `json:"api_vs_map"`
}

// Install goals of issue 13.
const (
	installConfigGoal = 15.0   // seconds for 1M pairs from config
	installAPIGoal    = 50_000 // SAs/s through the API
)

// Install measurement settings: the API's batch limit, and four in
// flight so one batch is parsed while another waits for the data path.
const (
	installBatch    = api.MaxBatch
	installParallel = 4
)

// measureInstall runs the three measurements with pairs SA pairs.
func measureInstall(ctx context.Context, pairs int, logf func(string, ...any)) (*Install, error) {
	if pairs < 1 || pairs > pktgen.MaxSAs {
		return nil, fmt.Errorf("bench: install: %d pairs outside 1..%d", pairs, pktgen.MaxSAs)
	}
	dir, err := os.MkdirTemp("", "xesp-install")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	nw := pktgen.DefaultNet()
	file := filepath.Join(dir, "phones.jsonl")
	logf("install: writing %d SA pairs to %s", pairs, file)
	if err := pktgen.WriteSAFile(ctx, file, pairs, nw); err != nil {
		return nil, err
	}
	tp, err := newTopo()
	if err != nil {
		return nil, err
	}
	defer tp.close()
	in := &Install{Pairs: pairs, APIBatch: installBatch, APIParallel: installParallel}

	if err := in.config(ctx, tp, dir, file, pairs); err != nil {
		return nil, fmt.Errorf("install from config: %w", err)
	}
	logf("install: %d pairs from config in %.2f s (config.Load %.2f s, CPU %.2f s): %.0f SAs/s; stopped in %.2f s, started again from its state in %.2f s; handed over in %.2f s (%d bytes) + %.2f s",
		pairs, in.ConfigSeconds, in.ConfigParseSeconds, in.ConfigCPUSeconds, in.ConfigSAsPerSec, in.ConfigStopSeconds, in.ConfigRestartSeconds,
		in.HandOverStopSeconds, in.HandOverBytes, in.HandOverStartSeconds)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// The file's SAs, parsed once, are what the API client sends.
	list, err := sa.ParseFile(file, sa.Options{})
	if err != nil {
		return nil, err
	}
	if err := in.api(ctx, tp, dir, list, pairs); err != nil {
		return nil, fmt.Errorf("install through the API: %w", err)
	}
	logf("install: %d SAs through POST /v1/sas/batch in %.2f s (CPU %.2f s): %.0f SAs/s", in.APISAs, in.APISeconds, in.APICPUSeconds, in.APISAsPerSec)
	list = nil
	if err := in.ceiling(pairs); err != nil {
		return nil, fmt.Errorf("install ceiling: %w", err)
	}
	in.ConfigVsMap = in.ConfigSAsPerSec / in.MapSAsPerSec
	in.APIVsMap = in.APISAsPerSec / in.MapSAsPerSec
	logf("install: ceiling %.0f map entries/s (BPF batch updates); config %.4f of it, API %.4f", in.MapSAsPerSec, in.ConfigVsMap, in.APIVsMap)
	return in, nil
}

// installConfig is the gateway's config, SA file and API socket included.
func installConfig(tp *topo, dir, file string) string {
	return fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1]}
private: {interface: %s, next_hop_mac: "%s"}
workers: 1
max_sas: %d
state_dir: %s
metrics: {listen: ""}
api: {unix: %s}
`, tp.pub.name, tp.priv.name, tp.co.mac, 1<<21, filepath.Join(dir, "state"), filepath.Join(dir, "api.sock")) + func() string {
		if file == "" {
			return ""
		}
		return fmt.Sprintf("sa_files: [%s]\n", file)
	}()
}

// config loads the SA file as `xesp run` does.
func (in *Install) config(ctx context.Context, tp *topo, dir, file string, pairs int) error {
	path := filepath.Join(dir, "xesp.yaml")
	if err := os.WriteFile(path, []byte(installConfig(tp, dir, file)), 0o600); err != nil {
		return err
	}
	t0, c0 := time.Now(), cpuSeconds()
	parse, err := startFromConfig(ctx, tp, path, pairs, func(g *gateway.Gateway) error {
		in.ConfigSeconds = time.Since(t0).Seconds()
		in.ConfigCPUSeconds = cpuSeconds() - c0
		in.ConfigSAsPerSec = float64(2*pairs) / in.ConfigSeconds
		t1 := time.Now()
		if err := g.Stop(false); err != nil {
			return fmt.Errorf("stop: %w", err)
		}
		in.ConfigStopSeconds = time.Since(t1).Seconds()
		return nil
	})
	if err != nil {
		return err
	}
	in.ConfigParseSeconds = parse
	// The restart pins its maps (a hand-over needs them) on a bpffs of
	// its own, unmounted afterwards.
	pins := filepath.Join(dir, "bpffs")
	if err := os.Mkdir(pins, 0o700); err != nil {
		return err
	}
	if err := syscall.Mount("bpf", pins, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs for the hand-over's pins: %w", err)
	}
	defer syscall.Unmount(pins, syscall.MNT_DETACH)
	pinned := filepath.Join(dir, "xesp-pinned.yaml")
	if err := os.WriteFile(pinned, []byte(installConfig(tp, dir, file)+fmt.Sprintf("pin_dir: %s\n", filepath.Join(pins, "xesp"))), 0o600); err != nil {
		return err
	}
	t2 := time.Now()
	_, err = startFromConfigWith(ctx, tp, pinned, pairs, false, func(g *gateway.Gateway) error {
		in.ConfigRestartSeconds = time.Since(t2).Seconds()
		return in.handOver(ctx, tp, g, pinned, pairs)
	})
	if err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	return nil
}

// handOver hands g over to a successor started from the config at path,
// as `xesp run --upgrade-from` does, and stops the successor once it
// holds every SA.
func (in *Install) handOver(ctx context.Context, tp *topo, g *gateway.Gateway, path string, pairs int) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	prepared, err := gateway.Prepare(cfg)
	if err != nil {
		return err
	}
	t0 := time.Now()
	h, fds, err := g.HandOver(ctx, gateway.Shape{StateFD: true})
	if err != nil {
		return fmt.Errorf("hand over: %w", err)
	}
	// What crosses the socket: JSON, and duplicates of the descriptors.
	// Until a successor has them, a failure ends the hand-over as the
	// daemon does (AbortHandOver), not by the deferred plain Stop.
	var up gateway.Upgrade
	b, err := json.Marshal(h)
	if err == nil {
		err = json.Unmarshal(b, &up.Handover)
	}
	for _, fd := range fds {
		if err != nil {
			break
		}
		var d int
		if d, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err == nil {
			up.FDs = append(up.FDs, d)
		}
	}
	if err != nil {
		for _, d := range up.FDs {
			unix.Close(d)
		}
		return fmt.Errorf("hand over: %w", errors.Join(err, g.AbortHandOver()))
	}
	in.HandOverStopSeconds, in.HandOverBytes = time.Since(t0).Seconds(), len(b)
	if h.RxStateFD {
		var st unix.Stat_t
		if err := unix.Fstat(fds[len(fds)-1], &st); err != nil {
			return err
		}
		in.HandOverBytes += int(st.Size)
	}
	t1 := time.Now()
	var next *gateway.Gateway
	err = tp.gw.Do(func() (err error) {
		next, err = gateway.Start(ctx, cfg, gateway.Options{Upgrade: &up, Prepared: prepared, CipherIdle: benchCipherIdle})
		return err
	})
	if err != nil {
		return fmt.Errorf("successor: %w", errors.Join(err, g.AbortHandOver()))
	}
	in.HandOverStartSeconds = time.Since(t1).Seconds()
	g.FinishHandOver()
	defer next.Stop(false)
	return waitInstalled(ctx, next, pairs)
}

// startFromConfig runs `xesp run`'s start with the config file at path
// (config.Load, gateway.Start), waits until every SA is installed, then
// calls installed and stops the gateway. It returns config.Load's
// seconds.
func startFromConfig(ctx context.Context, tp *topo, path string, pairs int, installed func(*gateway.Gateway) error) (float64, error) {
	return startFromConfigWith(ctx, tp, path, pairs, true, installed)
}

// startFromConfigWith is startFromConfig, pinning the maps unless noPin.
func startFromConfigWith(ctx context.Context, tp *topo, path string, pairs int, noPin bool, installed func(*gateway.Gateway) error) (float64, error) {
	t0 := time.Now()
	cfg, err := config.Load(path)
	if err != nil {
		return 0, err
	}
	parse := time.Since(t0).Seconds()
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	g, err := startConfiguredPin(ctx, tp, cfg, noPin)
	if err != nil {
		return 0, err
	}
	defer g.Stop(false) // a no-op once installed stopped it or handed it over
	if err := waitInstalled(ctx, g, pairs); err != nil {
		return 0, err
	}
	if err := installed(g); err != nil {
		return 0, err
	}
	return parse, nil
}

// api installs list through the control API of a gateway started empty.
func (in *Install) api(ctx context.Context, tp *topo, dir string, list []sa.SA, pairs int) error {
	path := filepath.Join(dir, "empty.yaml")
	if err := os.WriteFile(path, []byte(installConfig(tp, dir, "")), 0o600); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(dir, "state")); err != nil {
		return err
	}
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	g, err := startConfigured(ctx, tp, cfg)
	if err != nil {
		return err
	}
	defer g.Stop(false)
	dp, err := g.DataPath()
	if err != nil {
		return err
	}
	srv, err := api.New(api.Options{SAD: g.SAD, DataPath: dp, API: cfg.API, NATTPort: cfg.NATTPort, Check: cfg.CheckSA})
	if err != nil {
		return err
	}
	if err := srv.Listen(); err != nil {
		return err
	}
	sctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx) }()
	defer func() { stop(); <-served }()
	c, err := api.NewClient("unix:"+cfg.API.Unix, "")
	if err != nil {
		return err
	}
	defer c.Close()

	n := (len(list) + installBatch - 1) / installBatch
	next := make(chan int)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	t0, c0 := time.Now(), cpuSeconds()
	for range installParallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			specs := make([]sa.Spec, 0, installBatch)
			for b := range next {
				specs = specs[:0]
				for i := b * installBatch; i < min((b+1)*installBatch, len(list)); i++ {
					specs = append(specs, list[i].WithKeys())
				}
				if _, err := c.AddBatch(ctx, specs); err != nil {
					errs <- fmt.Errorf("batch %d: %w", b, err)
				}
			}
		}()
	}
	for b := range n {
		if ctx.Err() != nil {
			break
		}
		next <- b
	}
	close(next)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	if err := waitInstalled(ctx, g, pairs); err != nil {
		return err
	}
	in.APISAs = len(list)
	in.APISeconds = time.Since(t0).Seconds()
	in.APICPUSeconds = cpuSeconds() - c0
	in.APISAsPerSec = float64(in.APISAs) / in.APISeconds
	return nil
}

// waitInstalled waits until the manager holds 2×pairs SAs and the XDP SA
// map pairs inbound ones.
func waitInstalled(ctx context.Context, g *gateway.Gateway, pairs int) error {
	deadline := time.Now().Add(10 * time.Minute)
	for g.Manager.Installed() < 2*pairs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("manager installed %d of %d SAs in 10 minutes", g.Manager.Installed(), 2*pairs)
		}
		time.Sleep(2 * time.Millisecond)
	}
	keys, vals := make([]uint32, 1<<16), make([]bpf.SASteer, 1<<16)
	for {
		c, err := countMap(g.Maps.SAs.Map(), keys, vals)
		if err != nil {
			return err
		}
		if c >= pairs {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("SA map holds %d of %d SAs after 10 minutes", c, pairs)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// cpuSeconds is the process's CPU time so far.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// ceiling writes pairs inbound SA entries and pairs outbound policies
// (/32 each, as the pairs' inner peers) into fresh maps of the gateway's
// capacity with batch updates.
func (in *Install) ceiling(pairs int) error {
	inst, err := loader.Load(loader.Options{Public: "unused", NoPin: true, SACapacity: 1 << 21, PolicyCapacity: 1 << 21})
	if err != nil {
		return err
	}
	defer inst.Close()
	spis := make([]uint32, pairs)
	steer := make([]bpf.SASteer, pairs)
	prefixes := make([]netip.Prefix, pairs)
	pols := make([]bpf.Policy, pairs)
	for i := range pairs {
		spis[i] = pktgen.InSPIBase + uint32(i)
		steer[i] = bpf.SASteer{SaIndex: uint32(2 * i)}
		prefixes[i] = netip.PrefixFrom(pktgen.Inner(i), 32)
		pols[i] = bpf.Policy{SaIndex: uint32(2*i + 1)}
	}
	t0 := time.Now()
	if err := inst.Maps.SAs.PutBatch(spis, steer); err != nil {
		return err
	}
	if err := inst.Maps.Policies.PutBatch(prefixes, pols); err != nil {
		return err
	}
	in.MapSAsPerSec = float64(2*pairs) / time.Since(t0).Seconds()
	return nil
}

// targets are the two install goals; the config goal is for a
// million pairs, so a smaller run reports the figure without a verdict.
func (in *Install) targets() []Target {
	var out []Target
	ceiling := fmt.Sprintf("BPF batch updates into fresh maps: %.0f SAs/s", in.MapSAsPerSec)
	if in.Pairs >= 1_000_000 {
		t := Target{Measure: "load 1M SA pairs from config ≤ 15 s", Name: fmt.Sprintf("xesp run, %d pairs in a JSON-lines sa_file", in.Pairs),
			Cmp: "<=", Ratio: in.ConfigSeconds, Goal: installConfigGoal, Unit: "s", Ceiling: ceiling,
			Figure: fmt.Sprintf("%.1f s (%.0f SAs/s, %.1f CPU s)", in.ConfigSeconds, in.ConfigSAsPerSec, in.ConfigCPUSeconds),
			How:    "process start until the XDP SA map holds every inbound SA"}
		t.Met = in.ConfigSeconds <= installConfigGoal
		out = append(out, t)
	}
	t := Target{Measure: "install through the API ≥ 50k SAs/s", Name: fmt.Sprintf("POST /v1/sas/batch, %d a batch, %d in flight", in.APIBatch, in.APIParallel),
		Cmp: ">=", Ratio: in.APISAsPerSec, Goal: installAPIGoal, Unit: "SAs/s", Ceiling: ceiling,
		Figure: fmt.Sprintf("%.0f SAs/s (%d SAs, %.1f CPU µs/SA with the client)", in.APISAsPerSec, in.APISAs, 1e6*in.APICPUSeconds/float64(max(in.APISAs, 1))),
		How:    "first request until the XDP SA map holds every inbound SA"}
	t.Met = in.APISAsPerSec >= installAPIGoal
	out = append(out, t)
	return out
}

func init() {
	targetHooks = append(targetHooks, func(r *Report) []Target {
		if r.Install == nil {
			return nil
		}
		return r.Install.targets()
	})
}

// markdown renders the figures as a table.
func (in *Install) markdown(w io.Writer) {
	fmt.Fprintln(w, "SA installation (issue 13 item 3): from config (`xesp run`, JSON-lines SA file in sa_files, until the XDP SA map holds every inbound SA) and through the API (POST /v1/sas/batch over the Unix socket), beside the same-run ceiling: the same entries written into fresh BPF maps by batch updates.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| Path | SA pairs | SAs | Seconds | SAs/s | CPU s | CPU µs/SA | ÷ map ceiling |\n|---|---:|---:|---:|---:|---:|---:|---:|")
	fmt.Fprintf(w, "| config (load %.2f s) | %d | %d | %.2f | %.0f | %.2f | %.1f | %.4f |\n", in.ConfigParseSeconds, in.Pairs, 2*in.Pairs, in.ConfigSeconds, in.ConfigSAsPerSec,
		in.ConfigCPUSeconds, 1e6*in.ConfigCPUSeconds/float64(2*in.Pairs), in.ConfigVsMap)
	fmt.Fprintf(w, "| API, %d a batch, %d in flight | %d | %d | %.2f | %.0f | %.2f | %.1f | %.4f |\n", in.APIBatch, in.APIParallel, in.APISAs/2, in.APISAs, in.APISeconds, in.APISAsPerSec,
		in.APICPUSeconds, 1e6*in.APICPUSeconds/float64(max(in.APISAs, 1)), in.APIVsMap)
	fmt.Fprintf(w, "| ceiling: BPF batch updates | %d | %d | %.2f | %.0f | | | 1 |\n", in.Pairs, 2*in.Pairs, float64(2*in.Pairs)/in.MapSAsPerSec, in.MapSAsPerSec)
	fmt.Fprintln(w)
	if in.ConfigStopSeconds > 0 {
		fmt.Fprintf(w, "Restart with %d SAs: stopping the config-loaded gateway (final state snapshot, API store flush, sockets closed) took %.2f s, and starting it again from the state it left (windows, bindings, counters and sequence reservations restored) %.2f s: an outage of %.1f s.\n\n",
			2*in.Pairs, in.ConfigStopSeconds, in.ConfigRestartSeconds, in.ConfigStopSeconds+in.ConfigRestartSeconds)
	}
	if in.HandOverStartSeconds > 0 {
		fmt.Fprintf(w, "Hitless upgrade with %d SAs (`--upgrade-from`; the successor parsed its config and built its SA database before it asked): the running gateway stopped its workers and exported its state in %.2f s (%.1f MB of JSON and replay state), the successor's start took %.2f s until its workers served: %.1f s that the RX rings must bridge. Both gateways run in this one process here, sharing a heap and its collector; between two processes the successor's share is smaller (docs/operations.md, \"Stop and start\").\n\n",
			2*in.Pairs, in.HandOverStopSeconds, float64(in.HandOverBytes)/1e6, in.HandOverStartSeconds, in.HandOverStopSeconds+in.HandOverStartSeconds)
	}
}
