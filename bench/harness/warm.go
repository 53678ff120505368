package harness

import (
	"context"
	"fmt"
	"time"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/dataplane/worker"
)

// The cipher warm-up. The gateway builds an SA's AEAD on the SA's first
// packet (dataplane/worker idle.go, xesp_sa_ciphers_total{result="built"})
// and the bench gateway keeps it for the run (benchCipherIdle). Without a
// warm-up the first scenario to reach N SAs pays every new SA's build
// inside its measured trials (0.3-2 µs and a 1.3 KB allocation each): at
// a million SAs its NDR measured the builds (1M÷1 NDR 0.10 for decap
// 200 B, 0.92 for decap IMIX right after it). So before the first
// measured trial at N SAs, every SA of the scenario carries traffic, both
// ways, until no SA in the gateway's workers lacks its cipher.
//
// Traffic: a generator per side with a small ring (warmChunk frames of
// warmSize bytes, one per SA, consecutive SAs) sent as one live-frames
// burst at a time. A burst fits the gateway's RX ring (umem.rx_ring,
// 8192 by default), and the next one leaves only once the workers have
// handled (forwarded or dropped) the last, so a worker that the shared
// host deschedules loses nothing: the pass is clocked by the gateway, not
// by a rate. Decap goes first: its authenticated packets confirm each
// SA's NAT binding before encap uses it.
//
// Completion: no SA without a cipher in the workers' own tables, read on
// their threads (coldSAs), with the CipherBuilds counter beside it. The
// counter alone cannot decide: CipherBuilds − CipherReleases overcounts
// the ciphers alive when the manager reinstalls an SA (the old entry's
// cipher goes with its keys, uncounted, and the new entry builds again;
// measured: 400,002 "alive" for 400,000 SAs after a 1 → 200k load). A
// pass that leaves some cold (a burst lost to a ring the worker had not
// emptied, a frame dropped before its SA's cipher was touched) is
// followed by another over the direction that fell short, until
// warmDeadline.

const (
	// warmChunk is a warm-up burst: half the gateway's default RX and
	// fill rings, so a burst never overflows them.
	warmChunk = 4096
	// warmSize is the warm-up's inner packet size: small, the ciphers
	// do not care, and the ring stays small.
	warmSize = 64
	// warmMaxFrame holds a warmSize packet sealed in ESP-in-UDP.
	warmMaxFrame = 256
	// warmQuiet is how long the workers' counters may stand still before
	// a burst is taken as handled though short of what was sent (frames
	// lost before the worker); the final cipher count decides.
	warmQuiet = 250 * time.Millisecond
)

// warmDeadline bounds a warm-up of n SA pairs: a minute plus 150 µs a
// pair (the measured pace here is ~30 µs a pair, both ways: five times
// that leaves room for a host three times slower and a second pass).
func warmDeadline(n int) time.Duration {
	return time.Minute + time.Duration(n)*150*time.Microsecond
}

// Warmup is one cipher warm-up: before the first measured trial with
// SAs pairs on a gateway of Workers workers.
type Warmup struct {
	Workers int `json:"workers"`
	SAs     int `json:"sa_pairs"`
	// Installed is the SAs the workers held (2 per pair); ColdBefore
	// those whose cipher was not built when the warm-up began, ColdAfter
	// when it ended (0: every SA warm), both read in the workers' own
	// tables. Built is what the workers' CipherBuilds counter rose by
	// during the warm-up; Alive is CipherBuilds − CipherReleases after it
	// (the xesp_sa_ciphers_total view: an SA reinstalled by the manager
	// drops its old cipher uncounted, so Alive can exceed Installed).
	Installed  int    `json:"sas_installed"`
	ColdBefore int    `json:"cold_before"`
	ColdAfter  int    `json:"cold_after"`
	Built      uint64 `json:"ciphers_built"`
	Alive      uint64 `json:"ciphers_alive"`
	// Frames sent per direction, and the passes over the SAs it took.
	DecapFrames uint64  `json:"decap_frames"`
	EncapFrames uint64  `json:"encap_frames"`
	Passes      int     `json:"passes"`
	Seconds     float64 `json:"seconds"`
	// TrialBuilds are the ciphers the gateway built during the measured
	// trials at this SA count after the warm-up (saturation, NDR search,
	// latency): 0 when the trials measured forwarding only.
	TrialBuilds uint64 `json:"ciphers_built_in_trials"`
}

// ciphers are the gateway's cipher counters, summed over its workers.
func (gu *gatewayUnder) ciphers() (built, released uint64) {
	for _, w := range gu.g.Workers {
		st := w.Stats()
		built += st.CipherBuilds.Load()
		released += st.CipherReleases.Load()
	}
	return built, released
}

// coldSAs counts the SAs the workers hold and, per direction (0 inbound,
// 1 outbound), those whose cipher is not built. It reads each worker's
// table on the worker's own thread (Command.Visit, between two batches:
// the one moment its entries can be read without a race); a million
// entries take a few ms there, outside any trial.
func (gu *gatewayUnder) coldSAs(ctx context.Context) (installed int, cold [2]int, err error) {
	for _, w := range gu.g.Workers {
		var inst int
		var c [2]int
		done := make(chan struct{})
		visit := func(table []*worker.Slot) {
			for _, e := range table {
				if e == nil || e.SA == nil {
					continue
				}
				inst++
				if e.SA.Cold() {
					c[min(int(e.Dir), 1)]++
				}
			}
		}
		if err := w.Send(ctx, []worker.Command{{Index: ^uint32(0), Visit: visit, Done: done}}); err != nil {
			return 0, cold, err
		}
		select {
		case <-done:
		case <-ctx.Done():
			return 0, cold, ctx.Err()
		}
		installed += inst
		cold[0] += c[0]
		cold[1] += c[1]
	}
	return installed, cold, nil
}

// handled is what the workers did with one direction's frames: forwarded
// or dropped (a frame parked for a neighbour's MAC counts once it leaves).
func (gu *gatewayUnder) handled(encap bool) (n, forwarded uint64) {
	for _, w := range gu.g.Workers {
		st := w.Stats()
		d := &st.Decap
		if encap {
			d = &st.Encap
		}
		forwarded += d.Packets.Load()
		n += d.Packets.Load()
		for i := range worker.NumDrops {
			n += d.Drops[i].Load()
		}
	}
	return n, forwarded
}

// warmup makes every one of the n SA pairs' ciphers (both directions) be
// built in gw before any measured trial at n, and records the warm-up:
// passes over the cold directions until the workers' tables hold no cold
// SA, the build counter showing the progress.
func (r *runner) warmup(gw *gatewayUnder, workers, n int) (*Warmup, error) {
	r.phase("warm-up")
	t0 := time.Now()
	deadline := t0.Add(warmDeadline(n))
	b0, _ := gw.ciphers()
	w := &Warmup{Workers: workers, SAs: n}
	inst, cold, err := gw.coldSAs(r.ctx)
	if err != nil {
		return nil, err
	}
	if inst != 2*n {
		return nil, fmt.Errorf("warm-up: the workers hold %d SAs, want %d for %d pairs", inst, 2*n, n)
	}
	w.Installed, w.ColdBefore = inst, cold[0]+cold[1]
	for cold[0]+cold[1] > 0 {
		if w.Passes > 0 {
			b, rel := gw.ciphers()
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("warm-up of %d SA pairs: %d inbound and %d outbound of the %d SAs still without a cipher after %d passes in %v (the workers' counters: %d built during the warm-up, %d released in all)",
					n, cold[0], cold[1], inst, w.Passes, time.Since(t0).Round(time.Millisecond), b-b0, rel)
			}
			r.logf("  warm-up pass %d left %d inbound and %d outbound SAs cold; another pass", w.Passes, cold[0], cold[1])
		}
		w.Passes++
		for i, encap := range []bool{false, true} {
			if cold[i] == 0 {
				continue
			}
			sent, err := r.warmPass(gw, encap, n, deadline)
			if encap {
				w.EncapFrames += sent
			} else {
				w.DecapFrames += sent
			}
			if err != nil {
				return nil, err
			}
		}
		if inst, cold, err = gw.coldSAs(r.ctx); err != nil {
			return nil, err
		}
	}
	if err := r.warmDrain(gw); err != nil {
		return nil, err
	}
	b, rel := gw.ciphers()
	w.Built, w.Alive, w.ColdAfter, w.Seconds = b-b0, b-rel, cold[0]+cold[1], time.Since(t0).Seconds()
	r.logf("  warm-up: all %d SAs of %d pairs have their cipher (%d were cold; the workers built %d) in %.2f s, %d pass(es), %d decap + %d encap frames; not part of any trial",
		w.Installed, n, w.ColdBefore, w.Built, w.Seconds, w.Passes, w.DecapFrames, w.EncapFrames)
	return w, nil
}

// warmPass sends one frame to each of the n SAs of one direction, a burst
// of warmChunk at a time, each once the workers handled the last.
func (r *runner) warmPass(gw *gatewayUnder, encap bool, n int, deadline time.Time) (uint64, error) {
	gp, end, l2 := &r.warmPhone, r.tp.ph, gen.L2{Src: r.tp.ph.mac, Dst: r.tp.pub.mac}
	if encap {
		gp, end, l2 = &r.warmCore, r.tp.co, gen.L2{Src: r.tp.co.mac, Dst: r.tp.priv.mac}
	}
	e := end.ns
	if *gp == nil {
		// Made on first use (the gate's ceiling and baseline runners
		// never warm a gateway); setup's teardown closes them.
		if err := e.Do(func() (err error) {
			*gp, err = gen.New(gen.Options{Ifindex: end.index, Ring: warmChunk, MaxFrame: warmMaxFrame, Ctx: r.ctx})
			return err
		}); err != nil {
			return 0, err
		}
	}
	g := *gp
	g.SetFirst(0)
	var err error
	if encap {
		err = g.LoadClear(l2, r.clear[:n], gen.Fixed(warmSize))
	} else {
		err = g.LoadESP(l2, r.flows[:n], gen.Fixed(warmSize))
	}
	if err != nil {
		return 0, err
	}
	var sent uint64
	err = e.Do(func() error {
		restore, err := gen.PinThread(GenCPU)
		if err != nil {
			return err
		}
		defer restore()
		for sent < uint64(n) {
			if err := r.ctx.Err(); err != nil {
				return err
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("warm-up: %s pass past its deadline after %d of %d frames", dirName(encap), sent, n)
			}
			h0, _ := gw.handled(encap)
			k := min(g.Ring(), n-int(sent))
			got, _, err := g.SendN(k)
			if err != nil {
				return err
			}
			sent += uint64(got)
			if sent < uint64(n) {
				r.phase("warm-up burst")
				// Seal the next burst while the workers take this one.
				if err := g.Refill(); err != nil {
					return err
				}
			}
			if err := r.warmWait(gw, encap, h0+uint64(got), deadline); err != nil {
				return err
			}
		}
		return nil
	})
	return sent, err
}

// warmWait waits until the workers handled target frames of a direction
// (cumulative), or their count stood still for warmQuiet.
func (r *runner) warmWait(gw *gatewayUnder, encap bool, target uint64, deadline time.Time) error {
	last, moved := uint64(0), time.Now()
	for {
		h, _ := gw.handled(encap)
		if h >= target {
			return nil
		}
		if h != last {
			last, moved = h, time.Now()
		}
		if time.Since(moved) > warmQuiet {
			return nil
		}
		if err := r.ctx.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("warm-up: workers handled %d of %d %s frames by the deadline", h, target, dirName(encap))
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// warmDrain waits until the far ends counted every frame the workers
// forwarded (both count since the gateway started), so no warm-up frame
// lands in the first trial, or until they stood still for warmQuiet.
func (r *runner) warmDrain(gw *gatewayUnder) error {
	var last uint64
	moved := time.Now()
	for {
		_, fd := gw.handled(false)
		_, fe := gw.handled(true)
		d, err := counterOf(gw.decapCount)()
		if err != nil {
			return err
		}
		e, err := counterOf(gw.encapCount)()
		if err != nil {
			return err
		}
		if d >= fd && e >= fe {
			return nil
		}
		if d+e != last {
			last, moved = d+e, time.Now()
		}
		if time.Since(moved) > warmQuiet {
			return nil
		}
		if err := r.ctx.Err(); err != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
}

func dirName(encap bool) string {
	if encap {
		return "encap"
	}
	return "decap"
}

// phaseHook, when set (tests), is called as the bench enters a phase
// ("warm-up", "saturation", "trial") or has sent a warm-up burst with
// more to come ("warm-up burst"), on the bench's goroutine.
var phaseHook func(r *runner, phase string)

func (r *runner) phase(p string) {
	if phaseHook != nil {
		phaseHook(r, p)
	}
}
