package harness

import (
	"fmt"
	"math"
	"math/bits"
	"slices"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/dataplane/esp"
)

// Latency at fractions of NDR (issue 13), one paced trial per fraction:
//
//   - send: the paced AF_XDP sender records, per ring slot, when the
//     sendto that took the frame ran (pktgen.Options.SendTimes,
//     CLOCK_MONOTONIC); each frame's payload carries the generator's
//     marker, whose serial number names its slot (gen.Gen.SlotSerial) —
//     inside the ESP encryption for decap, in the cleartext for encap;
//   - receive: the far end's counter program (gen.NewStampCounter) copies
//     a sample of the arrivals into a BPF ring buffer with
//     bpf_ktime_get_ns() — the same clock on the same host — and the
//     packet's first bytes: the cleartext marker, or the whole ESP packet,
//     which the harness opens after the trial with the test SAs' keys
//     (pktgen.Key) to read the marker inside;
//   - latency = arrival − send, per sampled packet; p50/p99/p99.9 are
//     exact order statistics of the sample (nearest rank).
//
// The sample is 1 in 2^k arrivals, k chosen for ≈ latencySamples per
// trial, so the ring buffer holds the whole trial and is read after it:
// nothing reads it on the gateway's CPU while the trial runs.
const (
	latencySamples = 20000
	stampRingBytes = 32 << 20
)

// LatencyFractions are the fractions of NDR latency is measured at.
var LatencyFractions = []float64{0.5, 0.9}

// Latency is one latency trial's figures, in microseconds.
type Latency struct {
	// OfNDR is the fraction of NDR offered; Rate the offered rate.
	OfNDR float64 `json:"of_ndr"`
	Rate  float64 `json:"rate_pps"`
	// SenderBound: the NDR was the sender's top rate (a lower bound), so
	// the fraction is of that rate, not of the gateway's NDR.
	SenderBound bool    `json:"sender_bound,omitempty"`
	P50         float64 `json:"p50_us"`
	P99         float64 `json:"p99_us"`
	P999        float64 `json:"p99_9_us"`
	Max         float64 `json:"max_us"`
	// Samples is how many arrivals were timed; Unmatched sampled arrivals
	// whose marker named no slot sent in this trial (a late frame of an
	// earlier one); Lost records the ring buffer had no room for.
	Samples   int     `json:"samples"`
	Unmatched int     `json:"unmatched,omitempty"`
	Lost      uint64  `json:"stamps_lost,omitempty"`
	LossPct   float64 `json:"loss_pct"`
	// The trial's tail evidence (diag.go): run-queue wait of the bench
	// process's threads (all, and the largest single thread's), GC
	// cycles and pauses, goroutine scheduling latency, live heap. Load
	// is the host's 1-minute load average at the end of the trial.
	tailDiag
	Load float64 `json:"load_avg"`
}

// percentiles returns the nearest-rank p-quantiles of v (sorted in place).
func percentiles(v []float64, ps ...float64) []float64 {
	slices.Sort(v)
	out := make([]float64, len(ps))
	if len(v) == 0 {
		return out
	}
	for i, p := range ps {
		// Nearest rank: the smallest value with at least p of the
		// sample at or below it.
		k := int(math.Ceil(p*float64(len(v)))) - 1
		out[i] = v[min(max(k, 0), len(v)-1)]
	}
	return out
}

// sampleMask is 2^k−1 for the least k with expected/2^k ≤ latencySamples.
func sampleMask(expected float64) uint64 {
	per := uint64(math.Ceil(expected / latencySamples))
	if per <= 1 {
		return 0
	}
	return 1<<bits.Len64(per-1) - 1
}

// stampDecoder reads the generator's marker out of a stamp: from the
// cleartext, or from inside an ESP-in-UDP packet opened with the test
// SAs (inbound SPIs: the phones' seal; outbound: the gateway's).
type stampDecoder struct {
	sas map[uint32]*esp.Transform
}

func (d *stampDecoder) lookup(spi uint32) *esp.Transform {
	if s, ok := d.sas[spi]; ok {
		return s
	}
	var dir byte
	var i int
	switch {
	case spi >= pktgen.InSPIBase && spi < pktgen.InSPIBase+pktgen.MaxSAs:
		dir, i = 'i', int(spi-pktgen.InSPIBase)
	case spi >= pktgen.OutSPIBase && spi < pktgen.OutSPIBase+pktgen.MaxSAs:
		dir, i = 'o', int(spi-pktgen.OutSPIBase)
	default:
		return nil
	}
	key, err := pktgen.KeyBytes(dir, i)
	if err != nil {
		return nil
	}
	// No replay window: the sample is a subset, read out of order.
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
	if err != nil {
		return nil
	}
	if d.sas == nil {
		d.sas = map[uint32]*esp.Transform{}
	}
	d.sas[spi] = s
	return s
}

// serial returns the marker's serial of a stamped IPv4 packet.
func (d *stampDecoder) serial(st gen.Stamp, isESP bool) (uint64, bool) {
	ip := st.Data
	if isESP {
		if len(ip) < st.Len {
			return 0, false // truncated: cannot authenticate
		}
		p, err := esp.OpenPacket(ip[:st.Len], d.lookup)
		if err != nil {
			return 0, false
		}
		ip = p.IP
	}
	if len(ip) < 28+gen.MarkerLen || ip[0] != 0x45 || ip[9] != 17 {
		return 0, false
	}
	_, serial, ok := gen.Marker(ip[28:])
	return serial, ok
}

// latency measures c's scenario at each of LatencyFractions of res.NDR
// on the main topology (the reflect ceilings' own rows).
func (r *runner) latency(res *Result, fromCore, farESP bool, n int, sz gen.Sizes, c *gen.Counter) error {
	if res.NDR <= 0 {
		return nil
	}
	for _, f := range LatencyFractions {
		l, err := r.latencyAt(r.tp, res.Name, fromCore, farESP, n, sz, c, f, res.NDR, res.SenderBound)
		if err != nil {
			return err
		}
		res.Latency = append(res.Latency, l)
	}
	return nil
}

// latencyAt is one latency trial: f × ndr offered on tp, paced from the
// core (fromCore) or the phone over flows n, the far end counted and
// stamped by c, which receives ESP when farESP.
func (r *runner) latencyAt(tp *topo, name string, fromCore, farESP bool, n int, sz gen.Sizes, c *gen.Counter, f, ndr float64, senderBound bool) (Latency, error) {
	stampLen := 28 + gen.MarkerLen
	if farESP {
		stampLen = gen.StampMax
	}
	var dec stampDecoder
	if err := r.ctx.Err(); err != nil {
		return Latency{}, err
	}
	rate := f * ndr
	d := r.o.Goals()[0].FinalTrial
	// Empty the ring of anything a previous trial left.
	if _, _, err := c.ReadStamps(func(gen.Stamp) {}); err != nil {
		return Latency{}, err
	}
	if err := c.StartStamps(sampleMask(rate*d.Seconds()), stampLen); err != nil {
		return Latency{}, err
	}
	_, lost0, err := c.ReadStamps(func(gen.Stamp) {})
	if err != nil {
		return Latency{}, err
	}
	var base uint64
	var sendNs []int64
	diag := takeDiag()
	offered, loss, _, err := r.pacedTrialKeep(tp, fromCore, n, sz, rate, d, counterOf(c), func(s *pktgen.Sender) {
		base, sendNs = s.SendTimes()
	})
	td := diag.since()
	if serr := c.StopStamps(); err == nil {
		err = serr
	}
	if err != nil {
		return Latency{}, fmt.Errorf("%s: latency at %.0f%% of NDR: %w", name, 100*f, err)
	}
	l := Latency{OfNDR: f, Rate: offered, SenderBound: senderBound, LossPct: 100 * loss, tailDiag: td, Load: loadAvg()}
	var us []float64
	_, lost, err := c.ReadStamps(func(st gen.Stamp) {
		serial, ok := dec.serial(st, farESP)
		slot := serial - base
		if !ok || serial < base || slot >= uint64(len(sendNs)) || sendNs[slot] == 0 {
			l.Unmatched++
			return
		}
		us = append(us, float64(int64(st.Ns)-sendNs[slot])/1e3)
	})
	if err != nil {
		return Latency{}, err
	}
	l.Lost = lost - lost0
	l.Samples = len(us)
	if len(us) == 0 {
		return Latency{}, fmt.Errorf("%s: latency at %.0f%% of NDR: no sampled arrival matched a send (%d unmatched)", name, 100*f, l.Unmatched)
	}
	q := percentiles(us, 0.5, 0.99, 0.999, 1)
	l.P50, l.P99, l.P999, l.Max = q[0], q[1], q[2], q[3]
	r.logf("  %s: latency at %.0f%% of NDR (%.0f pps offered, loss %.3f%%): p50 %.1f µs, p99 %.1f µs, p99.9 %.1f µs, max %.1f µs over %d samples; run-queue wait %.1f ms (largest thread %.1f ms), GC %d cycles %.2f ms paused (max %.0f µs), goroutine sched p99 %.0f µs, heap %.2f GiB, load %.1f",
		name, 100*f, offered, 100*loss, l.P50, l.P99, l.P999, l.Max, l.Samples, td.RunqWaitMs, td.MaxThreadWaitMs, td.GCCycles, td.GCPauseMs, td.GCPauseMaxUs, td.SchedLatP99Us, td.HeapLiveGiB, l.Load)
	return l, nil
}
