package harness

import (
	"fmt"
	"slices"
	"time"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
)

// NDR and PDR as the field reports them (RFC 2544 throughput, FD.io
// CSIT's MLRsearch; the search and its goal model: mlr.go): the highest
// offered rate judged to lose nothing (NDR) and at most PDRLoss (PDR),
// each trial paced by the AF_XDP engine of bench/pktgen (copy-mode TX on
// the sender's veth, 2 ms chunks) instead of the saturating burst of the
// live-frames engine. The saturation figure (Result.PPS) stays beside
// them as the third column.
//
// xesp's searches run interleaved, trial by trial, with a search of the
// AF_XDP reflect ceiling of the same link on a second, identical
// topology (Result.CeilingNDR): the ratio's two figures see the same
// minutes of the shared host.
//
// The paced sender's limit: AF_XDP TX on veth is copy mode, every frame
// an skb, and the receiving XDP program and the copy into the gateway's
// UMEM run in the sender's sendto on GenCPU; on the shared 2-vCPU VM it
// offered 60–110 kpps, below what one worker forwards. A search that
// judges the most the sender offers a lower bound reports NDR = PDR =
// that rate, marked sender-bound (a lower bound). The live-frames engine
// cannot pace: each BPF_PROG_RUN costs a fixed 30–45 ms on this kernel
// (16 frames per run → 471 pps). On a NIC with a hardware generator
// (TRex) the same search applies unchanged.

// pacedTrial offers rate packets/s for d on tp from the phone (ESP,
// flows n) or the core (cleartext), paced by pktgen's AF_XDP engine on
// GenCPU, and counts what arrived with count after the far end went
// quiet.
func (r *runner) pacedTrial(tp *topo, fromCore bool, n int, sz gen.Sizes, rate float64, d time.Duration, count func() (uint64, error)) (offered, loss, delivered float64, err error) {
	return r.pacedTrialKeep(tp, fromCore, n, sz, rate, d, count, nil)
}

// pacedTrialKeep is pacedTrial recording each frame's send time, handed
// to keep (when not nil) after the send, before the sender closes.
//
// Flow order: a trial's frames visit consecutive flows from a cursor the
// runner keeps per side, each flow at most once per trial when the trial
// has fewer frames than flows, and the next trial continues where this
// one stopped — with a million SAs, every packet of a trial is a
// different SA (the worst case for caches) and the search's trials
// together visit all of them (Result.FlowsVisited).
func (r *runner) pacedTrialKeep(tp *topo, fromCore bool, n int, sz gen.Sizes, rate float64, d time.Duration, count func() (uint64, error), keep func(*pktgen.Sender)) (offered, loss, delivered float64, err error) {
	e, dst, flows := tp.ph, tp.pub.mac, r.flows[:n]
	ns := tp.phone
	if fromCore {
		e, dst, flows, ns = tp.co, tp.priv.mac, r.clear[:n], tp.core
	}
	before, err := count()
	if err != nil {
		return 0, 0, 0, err
	}
	var res pktgen.Result
	var t0 time.Time
	// The whole trial's frames are sealed before it starts, so the
	// sender only copies and kicks while it runs.
	maxLen := slices.Max(sz.Pattern())
	maxFrame := min(gen.DefaultMaxFrame, maxLen+128)
	ring := int(min(max(rate*d.Seconds(), 64), float64(min(ndrMaxRing, ndrMaxRingBytes/(maxFrame+16)))))
	ck := cursorKey{tp, fromCore}
	first := r.cursor[ck] % uint64(n)
	if err := r.ctx.Err(); err != nil {
		// Before the sender's ring (hundreds of MB at a high rate) is
		// allocated: a signal ends the bench within 2 s.
		return 0, 0, 0, err
	}
	err = ns.Do(func() error {
		s, err := pktgen.New(pktgen.Options{Ifindex: e.index, Src: e.mac, Dst: dst, Clear: fromCore, Flows: flows, Sizes: sz, FirstFlow: first,
			Rate: rate, CPU: GenCPU, Engine: r.pacedEngine(), Ring: ring, MaxFrame: maxFrame, SendTimes: keep != nil, RealTime: true, Ctx: r.ctx})
		if err != nil {
			return err
		}
		defer s.Close()
		r.phase("trial")
		t0 = time.Now()
		res, err = s.RunPaced(r.ctx)
		if keep != nil {
			keep(s)
		}
		return err
	})
	if err == nil {
		err = r.ctx.Err()
	}
	if err != nil {
		return 0, 0, 0, err
	}
	r.cursor[ck] = first + res.Sent
	r.visited[ck] += res.Sent
	// Drain: until the far-end counter has not moved for 30 ms. What
	// arrives more than lateLimit after the send ended is lost to this
	// trial; the drain goes on (uncounted, up to 5 s) so that it does not
	// arrive in the next one.
	sendEnd := time.Now()
	last, lastMove := before, time.Now()
	counted := before
	for time.Since(lastMove) < 30*time.Millisecond && time.Since(sendEnd) < 5*time.Second && r.ctx.Err() == nil {
		c, err := count()
		if err != nil {
			return 0, 0, 0, err
		}
		if time.Since(sendEnd) <= lateLimit {
			counted = c
		}
		if c != last {
			last, lastMove = c, time.Now()
		}
		time.Sleep(2 * time.Millisecond)
	}
	got := counted - before
	if res.Sent == 0 {
		return 0, 0, 0, fmt.Errorf("paced trial at %.0f pps sent nothing", rate)
	}
	offered = float64(res.Sent) / res.Elapsed.Seconds()
	loss = 1 - float64(got)/float64(res.Sent)
	if loss < 0 {
		loss = 0 // a late frame of the previous trial
	}
	return offered, loss, float64(got) / time.Since(t0).Seconds(), nil
}

// lateLimit is how long after a paced trial's last frame left an
// arrival still counts: later ones are lost (RFC 2544 waits 2 s after a
// trial; a trial of ~1 s on a shared VM should not be rescued by queues
// that deep — a socket's 32 MB receive buffer would hide a rate the
// loop cannot keep for seconds).
const lateLimit = 200 * time.Millisecond

// cursorKey names a flow cursor: a topology's side.
type cursorKey struct {
	tp       *topo
	fromCore bool
}

// pacedEngine is the paced sender's engine (Options.PacedEngine).
func (r *runner) pacedEngine() string {
	if r.o.PacedEngine != "" {
		return r.o.PacedEngine
	}
	return pktgen.EngineLive
}

func (r *runner) maxRate() float64 {
	if r.o.MaxRate > 0 {
		return r.o.MaxRate
	}
	return DefaultMaxRate
}

// searchFor builds res's search over tp.
func (r *runner) searchFor(name string, tp *topo, fromCore bool, n int, sz gen.Sizes, count func() (uint64, error)) *searcher {
	return newSearcher(r.ctx, name, r.maxRate(), r.o.Goals(), func(rate float64, d time.Duration) (float64, float64, float64, error) {
		return r.pacedTrial(tp, fromCore, n, sz, rate, d, count)
	}, r.logf)
}

// ndr runs the search for one scenario alone and writes it into res (the
// reflect ceilings' own rows).
func (r *runner) ndr(res *Result, fromCore bool, n int, sz gen.Sizes, count func() (uint64, error)) error {
	r.logf("  NDR/PDR search for %s", res.Name)
	s := r.searchFor(res.Name, r.tp, fromCore, n, sz, count)
	if err := interleave(s); err != nil {
		return err
	}
	r.setSearch(res, s)
	return nil
}

// ndrWithCeiling runs res's search interleaved, trial by trial, with the
// AF_XDP reflect ceiling's on the second topology (same link, same size),
// and writes both into res. It returns the ceiling's session, still
// running, for the latency trials; the caller closes it.
func (r *runner) ndrWithCeiling(res *Result, fromCore bool, n int, sz gen.Sizes, count func() (uint64, error)) (*session, error) {
	link := "public"
	if fromCore {
		link = "private"
	}
	ss, err := r.startReflectOn(r.tp2, link)
	if err != nil {
		return nil, err
	}
	ck := cursorKey{r.tp, fromCore}
	v0 := r.visited[ck]
	r.logf("  NDR/PDR search for %s, interleaved with the AF_XDP reflect ceiling (%s link) on a second topology", res.Name, link)
	x := r.searchFor(res.Name, r.tp, fromCore, n, sz, count)
	// The ceiling's frames are the same at every SA count (ceilingFlows
	// of them: the reflect loop does not look inside), so the ceiling
	// beside the 1-SA and the 1M-SA searches is taken the same way.
	c := r.searchFor(res.Name+" reflect ceiling", r.tp2, fromCore, r.ceilFlows(), sz, ss.count)
	if err := interleave(x, c); err != nil {
		ss.close()
		return nil, err
	}
	r.setSearch(res, x)
	cr := Result{Name: c.name}
	r.setSearch(&cr, c)
	res.CeilingNDR, res.CeilingPDR, res.CeilingSenderBound, res.CeilingGoals = cr.NDR, cr.PDR, cr.SenderBound, cr.Goals
	res.FlowsVisited = min(r.visited[ck]-v0, uint64(n))
	r.logf("  %s: the search's trials visited %d of its %d SAs (each trial's frames consecutive SAs, each at most once per trial)", res.Name, res.FlowsVisited, n)
	return ss, nil
}

// setSearch writes a finished search into res.
func (r *runner) setSearch(res *Result, s *searcher) {
	res.Goals = s.result()
	for _, g := range res.Goals {
		switch g.Name {
		case "NDR":
			res.NDR = g.Load
			res.SenderBound = g.SenderBound
		case "PDR":
			res.PDR, res.PDRLossPct = g.Load, g.LossPct
		}
	}
	res.SaturationPaced, res.Trials, res.SenderShortTrials, res.SenderRetried = s.saturation, s.trials, s.senderShort, s.retried
	res.SenderTop = s.top
	r.logf("  %s: NDR %.0f pps, PDR %.0f pps (worst loss there %.2f%%), paced saturation %.0f pps, sender top %.0f pps, %d trials (%d short of their load, %d more not counted: sender > 10%% short)%s",
		res.Name, res.NDR, res.PDR, res.PDRLossPct, s.saturation, s.top, s.trials, s.senderShort, s.retried, map[bool]string{true: ", SENDER-BOUND", false: ""}[res.SenderBound])
}
