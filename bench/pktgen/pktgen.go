// Package pktgen drives bench/gen for a run: a deterministic SA set of 1
// to 1,000,000 pairs whose keys both the generator and the gateway under
// test derive (SASpecs gives the gateway's side), a size mix by name, and
// a send loop for a count or a duration at full speed or a target rate.
// `xesp-lab pktgen` and the bench harness use it.
//
// Rate: a live-frames run cannot be paced inside the kernel, so a target
// rate is met in chunks — a run of a ring's frames, then a sleep until
// the chunk's share of the schedule has passed. A live-frames run costs a
// fixed 20–40 ms on this kernel (6.18) however few frames it carries, so
// live chunks hold 100 ms of traffic and leave as one burst; AF_XDP
// chunks hold 2 ms, smooth at the scale a receiver's rings see. The
// fixed cost also caps the live engine's rate at about a ring per run
// (~1 Mpps with the default ring) in bursts of ~6 Mpps.
//
// ESP rings must be resealed (Refill) between runs because every frame
// carries a fresh sequence number; Refill happens outside the timed sends
// but inside the run's wall time, so Result reports both the rate while
// sending (WirePPS) and the average over the run (PPS).
package pktgen

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/procs"
)

// MaxSAs is the largest SA set: inner addresses come from 100.64.0.0/10.
const MaxSAs = 1_000_000

// SPI bases of the SA set: pair i is inbound (phone → gateway) SPI
// InSPIBase+i and outbound SPI OutSPIBase+i.
const (
	InSPIBase  = 0x1000000
	OutSPIBase = 0x2000000
)

// Key is pair i's 20-byte aes128gcm16 key||salt for direction 'i' (the
// inbound SA) or 'o' (outbound), as hex. Deterministic, so a gateway
// configured from SASpecs and a generator built by Flows agree without
// exchanging keys. Test keys only: never use them for real traffic.
func Key(dir byte, i int) string {
	return fmt.Sprintf("%02x%030x%08x", dir, i+1, 0x5a17_0000+i)
}

// KeyBytes is Key as bytes.
func KeyBytes(dir byte, i int) ([]byte, error) {
	k := make([]byte, 20)
	return k, unhex(k, Key(dir, i))
}

// Inner is pair i's inner (phone) address: 100.64.0.0/10 + i.
func Inner(i int) netip.Addr {
	v := uint32(100)<<24 | uint32(64)<<16 + uint32(i)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Net describes the addresses of the phones' and the gateway's sides.
type Net struct {
	Phone, Gateway netip.Addr // outer (public) addresses
	PhonePort      uint16     // the phones' outer UDP port (the gateway's is 4500)
	Core           netip.AddrPort
	CoreNet        netip.Prefix // the inner SAs' local selector
	InnerPort      uint16       // the phones' inner UDP port
}

// DefaultNet is the bench topology's addressing.
func DefaultNet() Net {
	return Net{
		Phone: netip.MustParseAddr("192.0.2.10"), Gateway: netip.MustParseAddr("192.0.2.1"), PhonePort: esp.NATTPort,
		Core: netip.MustParseAddrPort("10.0.0.1:5060"), CoreNet: netip.MustParsePrefix("10.0.0.0/24"), InnerPort: 5060,
	}
}

func checkN(n int) error {
	if n < 1 || n > MaxSAs {
		return fmt.Errorf("pktgen: %d SAs outside 1..%d", n, MaxSAs)
	}
	return nil
}

// SASpecs is the gateway's side of n pairs (inbound SPI InSPIBase+i,
// outbound OutSPIBase+i), in the SA format.
func SASpecs(n int, nw Net) ([]sa.Spec, error) {
	return SASpecsRange(0, n, nw)
}

// SASpecsRange is SASpecs' pairs from..to-1, for a caller that loads a
// large set in chunks (and can stop between them).
func SASpecsRange(from, to int, nw Net) ([]sa.Spec, error) {
	if err := checkN(to); err != nil {
		return nil, err
	}
	if from < 0 || from > to {
		return nil, fmt.Errorf("pktgen: SAs %d..%d", from, to)
	}
	port := nw.PhonePort
	specs := make([]sa.Spec, 0, 2*(to-from))
	for i := from; i < to; i++ {
		peer := netip.PrefixFrom(Inner(i), 32).String()
		for _, d := range []struct {
			dir  string
			spi  uint32
			kind byte
		}{{"in", InSPIBase + uint32(i), 'i'}, {"out", OutSPIBase + uint32(i), 'o'}} {
			specs = append(specs, sa.Spec{SPI: sa.SPIOf(d.spi), Direction: d.dir, Mode: "tunnel", Proposal: "aes128gcm16",
				EncKey: Key(d.kind, i), Local: nw.Gateway.String(), Peer: nw.Phone.String(),
				Encap: &sa.EncapSpec{PeerPort: &port}, Inner: &sa.InnerSpec{Local: nw.CoreNet.String(), Peer: peer}})
		}
	}
	return specs, nil
}

// SAs parses SASpecs for a SAD.
func SAs(n int, nw Net) ([]sa.SA, error) {
	return SAsRange(0, n, nw)
}

// SAsRange parses SASpecsRange for a SAD.
func SAsRange(from, to int, nw Net) ([]sa.SA, error) {
	specs, err := SASpecsRange(from, to, nw)
	if err != nil {
		return nil, err
	}
	out := make([]sa.SA, len(specs))
	for i := range specs {
		if out[i], err = specs[i].Parse(sa.Options{}); err != nil {
			return nil, fmt.Errorf("pktgen: SA %d: %w", 2*from+i, err)
		}
	}
	return out, nil
}

// Flows is the phones' side of n pairs for the decap direction: flow i
// seals inner packets from Inner(i) to the core under pair i's inbound
// SA. The SAs start at sequence number 1.
func Flows(n int, nw Net) ([]gen.Flow, error) {
	if err := checkN(n); err != nil {
		return nil, err
	}
	return FlowsRange(0, n, nw)
}

// FlowsRange is Flows' pairs from..to-1, for a caller that builds a
// large set in chunks (and can stop between them).
func FlowsRange(from, to int, nw Net) ([]gen.Flow, error) {
	if from < 0 || from > to {
		return nil, fmt.Errorf("pktgen: flows %d..%d", from, to)
	}
	if err := checkN(to); err != nil {
		return nil, err
	}
	n := to - from
	outer := esp.Outer{Src: nw.Phone, Dst: nw.Gateway, Encap: true, SrcPort: nw.PhonePort, DstPort: esp.NATTPort}
	flows := make([]gen.Flow, n)
	key := make([]byte, 20)
	for j := range n {
		i := from + j
		if err := unhex(key, Key('i', i)); err != nil {
			return nil, err
		}
		s, err := esp.NewTransform(esp.Config{SPI: InSPIBase + uint32(i), Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
		if err != nil {
			return nil, fmt.Errorf("pktgen: SA %d: %w", i, err)
		}
		flows[j] = gen.Flow{SA: s, Outer: outer, Src: netip.AddrPortFrom(Inner(i), nw.InnerPort), Dst: nw.Core}
	}
	return flows, nil
}

// ClearFlows is the core's side of n pairs for the encap direction:
// cleartext from the core to Inner(i).
func ClearFlows(n int, nw Net) ([]gen.Flow, error) {
	if err := checkN(n); err != nil {
		return nil, err
	}
	flows := make([]gen.Flow, n)
	for i := range n {
		flows[i] = gen.Flow{Src: nw.Core, Dst: netip.AddrPortFrom(Inner(i), nw.InnerPort)}
	}
	return flows, nil
}

func unhex(dst []byte, s string) error {
	if len(s) != 2*len(dst) {
		return fmt.Errorf("pktgen: key %q: want %d hex digits", s, 2*len(dst))
	}
	for i := range dst {
		v, err := strconv.ParseUint(s[2*i:2*i+2], 16, 8)
		if err != nil {
			return fmt.Errorf("pktgen: key %q: %w", s, err)
		}
		dst[i] = byte(v)
	}
	return nil
}

// SIP is a SIP-signalling-like mix of inner packet sizes: provisional
// responses and ACK/BYE (~360 B), OPTIONS keepalives and small final
// responses (~520 B), REGISTER and 200 OK with SDP (~900 B), INVITE with
// SDP and IMS headers (~1300 B), weighted 3:4:2:1 as a registration-heavy
// edge sees them.
func SIP() gen.Sizes {
	s, _ := gen.Mix([]int{360, 520, 900, 1300}, []int{3, 4, 2, 1})
	return s
}

// ParseSizes reads a size mix: "imix", "sip", one size ("200"), or sizes
// with weights ("64,570,1400:7,4,1").
func ParseSizes(s string) (gen.Sizes, error) {
	switch strings.ToLower(s) {
	case "imix":
		return gen.IMIX(), nil
	case "sip":
		return SIP(), nil
	}
	lens, weights, hasW := strings.Cut(s, ":")
	ls, err := ints(lens)
	if err != nil {
		return gen.Sizes{}, fmt.Errorf("sizes %q: %w", s, err)
	}
	for _, n := range ls {
		if n < gen.MinSize || n > 1400 {
			return gen.Sizes{}, fmt.Errorf("sizes %q: %d outside %d..1400 (inner IP bytes; ESP-in-UDP around 1400 still fits a 1500 MTU)", s, n, gen.MinSize)
		}
	}
	if !hasW {
		if len(ls) == 1 {
			return gen.Fixed(ls[0]), nil
		}
		weights = strings.Repeat("1,", len(ls)-1) + "1"
	}
	ws, err := ints(weights)
	if err != nil {
		return gen.Sizes{}, fmt.Errorf("sizes %q: weights: %w", s, err)
	}
	sz, err := gen.Mix(ls, ws)
	if err != nil {
		return gen.Sizes{}, fmt.Errorf("sizes %q: %w", s, err)
	}
	return sz, nil
}

func ints(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("%q is not a number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// Options configure a Sender.
type Options struct {
	// Ifindex is the device to send from, in the namespace of the
	// goroutine that calls Run.
	Ifindex int
	// Src and Dst are the frames' MAC addresses (Dst: the gateway's).
	Src, Dst net.HardwareAddr
	// Clear sends cleartext (encap direction) instead of ESP.
	Clear bool
	// Flows: Flows or ClearFlows output (see Clear).
	Flows []gen.Flow
	Sizes gen.Sizes
	// Rate is the target packets/s; 0 sends at full speed.
	Rate float64
	// CPU pins the sending thread (-1: no pinning).
	CPU int
	// Ring is the precomputed ring size (0: gen.DefaultRing, or 2 ms of
	// traffic at Rate, at least 64).
	Ring int
	// Engine is EngineLive (default) or EngineAFXDP.
	Engine string
	// MaxFrame bounds the frames (0: gen's default, a full MTU); a large
	// ring of small frames needs less kernel memory with less.
	MaxFrame int
	// RealTime runs a paced live-frames run's thread under SCHED_FIFO
	// (priority 1) for the run: the program spins on its clock between
	// frames, so under the CFS the thread is a CPU hog that a shared
	// host's other tasks preempt at every kernel batch, and the schedule
	// slips with its CPU share (measured: a 5 kpps trial offered 2 kpps
	// at load 7). Test equipment keeps its CPU; the kernel's RT
	// throttling (sched_rt_runtime_us, 95%) still bounds it.
	RealTime bool
	// FirstFlow is the frame the ring starts at (gen.Gen.SetFirst):
	// slot i carries flow (FirstFlow+i) mod len(Flows).
	FirstFlow uint64
	// SendTimes records each slot's send time for RunPaced (SendNs), for
	// a latency receiver that reads the slot back from the payload's
	// marker serial (gen.Gen.SlotSerial).
	SendTimes bool
	// Ctx, when set, stops New's sealing of the ring once it ends
	// (gen.Options.Ctx).
	Ctx context.Context
}

// Sender is a loaded generator.
type Sender struct {
	o      Options
	g      *gen.Gen
	tx     *xskTX  // EngineAFXDP
	sendNs []int64 // Options.SendTimes: CLOCK_MONOTONIC ns per slot, 0 unsent
}

// New precomputes the first ring.
func New(o Options) (*Sender, error) {
	if len(o.Flows) == 0 {
		return nil, errors.New("pktgen: no flows")
	}
	if o.Rate < 0 {
		return nil, fmt.Errorf("pktgen: rate %v < 0", o.Rate)
	}
	if o.Engine == "" {
		o.Engine = EngineLive
	}
	if o.Engine != EngineLive && o.Engine != EngineAFXDP {
		return nil, fmt.Errorf("pktgen: engine %q (want %s or %s)", o.Engine, EngineLive, EngineAFXDP)
	}
	if o.Ring == 0 {
		o.Ring = gen.DefaultRing
		if o.Rate > 0 {
			// A live-frames run costs a fixed 20-40 ms on this kernel
			// whatever its length, so its chunks carry 100 ms of
			// traffic (sent as one burst); AF_XDP chunks carry 2 ms.
			per := 0.1
			if o.Engine == EngineAFXDP {
				per = 0.002
			}
			o.Ring = int(min(max(o.Rate*per, 64), gen.DefaultRing))
		}
	}
	g, err := gen.New(gen.Options{Ifindex: o.Ifindex, Ring: o.Ring, MaxFrame: o.MaxFrame, Ctx: o.Ctx})
	if err != nil {
		return nil, err
	}
	l2 := gen.L2{Src: o.Src, Dst: o.Dst}
	g.SetFirst(o.FirstFlow)
	if o.Clear {
		err = g.LoadClear(l2, o.Flows, o.Sizes)
	} else {
		err = g.LoadESP(l2, o.Flows, o.Sizes)
	}
	if err != nil {
		g.Close()
		return nil, err
	}
	s := &Sender{o: o, g: g}
	if o.SendTimes {
		s.sendNs = make([]int64, o.Ring)
	}
	if o.Engine == EngineAFXDP {
		if s.tx, err = newXSKTX(o.Ifindex); err != nil {
			g.Close()
			return nil, err
		}
	}
	return s, nil
}

// Gen is the underlying generator (for Frame inspection).
func (s *Sender) Gen() *gen.Gen { return s.g }

// SendNs is when slot i left (Options.SendTimes, AF_XDP engine), in
// CLOCK_MONOTONIC nanoseconds — the clock of bpf_ktime_get_ns — or 0 if
// it was not sent. On veth in copy mode the kernel moves a TX frame to the
// peer, through the peer's XDP program, inside the sender's sendto; a
// frame's time is interpolated between the start and the end of the
// sendto that took it: the middle of its share, by its position among the
// frames that call took.
func (s *Sender) SendNs(i int) int64 {
	if i < 0 || i >= len(s.sendNs) {
		return 0
	}
	return s.sendNs[i]
}

// SendTimes returns the serial number slot 0's marker carries (slot i
// carries base+i) and every slot's SendNs; the slice stays valid after
// Close.
func (s *Sender) SendTimes() (base uint64, ns []int64) {
	return s.g.SlotSerial(0), s.sendNs
}

// Result is what a Run sent.
type Result struct {
	Sent uint64
	// Elapsed is the run's wall time; Sending the part spent inside
	// live-frames runs.
	Elapsed, Sending time.Duration
}

// PPS is the average rate over the run, refills included.
func (r Result) PPS() float64 { return rate(r.Sent, r.Elapsed) }

// WirePPS is the rate while sending.
func (r Result) WirePPS() float64 { return rate(r.Sent, r.Sending) }

func rate(n uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// Run sends until count frames are sent (0: no limit) or duration has
// passed (0: no limit) or ctx ends; at least one limit must be set.
func (s *Sender) Run(ctx context.Context, count uint64, duration time.Duration) (Result, error) {
	if count == 0 && duration == 0 {
		return Result{}, errors.New("pktgen: set a count or a duration")
	}
	var res Result
	start := time.Now()
	for ctx.Err() == nil {
		if duration > 0 && time.Since(start) >= duration {
			break
		}
		n := s.o.Ring
		if count > 0 {
			if res.Sent >= count {
				break
			}
			n = int(min(uint64(n), count-res.Sent))
		}
		var (
			sent int
			el   time.Duration
			err  error
		)
		if s.o.CPU >= 0 {
			sent, el, err = s.sendPinned(n)
		} else {
			sent, el, err = s.sendN(n)
		}
		if err != nil {
			return res, err
		}
		res.Sent += uint64(sent)
		res.Sending += el
		// Reseal (ESP) before the next chunk; cleartext rings repeat.
		if !s.o.Clear {
			if err := s.g.Refill(); err != nil {
				return res, err
			}
		}
		if s.o.Rate > 0 {
			due := start.Add(time.Duration(float64(res.Sent) / s.o.Rate * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				select {
				case <-ctx.Done():
				case <-time.After(d):
				}
			}
		}
	}
	res.Elapsed = time.Since(start)
	return res, nil
}

// RunPaced sends the precomputed ring once (AF_XDP engine only), paced
// at Rate in chunks of 2 ms of traffic, with no resealing between chunks:
// the sender's whole per-frame cost is then one copy and its share of a
// sendto, so it can offer what a receiver on the other CPU takes. The
// caller sizes Ring to Rate × the trial's duration. The calling thread
// must be in the device's namespace.
//
// With the live engine, the ring leaves in one live-frames run paced
// inside the XDP program (gen.Gen.SendPaced: each frame when due, kernel
// batches of PacedBatch), an order of magnitude cheaper per frame than
// AF_XDP copy mode on veth; Elapsed is then from the first frame's send
// to the last's, by the program's clock, plus one interval.
func (s *Sender) RunPaced(ctx context.Context) (Result, error) {
	if s.o.Rate <= 0 {
		return Result{}, errors.New("pktgen: RunPaced needs a rate")
	}
	if s.tx == nil {
		return s.runPacedLive(ctx)
	}
	release, err := s.pin()
	if err != nil {
		return Result{}, err
	}
	defer release()
	s.g.MarkSent()
	chunk := int(max(s.o.Rate*0.002, 16))
	var res Result
	start := time.Now()
	for from := 0; from < s.o.Ring && ctx.Err() == nil; from += chunk {
		sent, el, err := s.tx.sendRange(s, from, min(s.o.Ring, from+chunk))
		res.Sent += uint64(sent)
		res.Sending += el
		if err != nil {
			return res, err
		}
		due := start.Add(time.Duration(float64(res.Sent) / s.o.Rate * float64(time.Second)))
		for time.Until(due) > 0 {
			// Sleep to within 100 µs, spin the rest: timer slack would
			// otherwise bunch chunks together.
			if d := time.Until(due); d > 200*time.Microsecond {
				time.Sleep(d - 100*time.Microsecond)
			}
		}
	}
	res.Elapsed = time.Since(start)
	return res, nil
}

// PacedBatch is the kernel batch of a paced live-frames run: frames
// leave (and the receiver's XDP program runs) every PacedBatch frames, so
// at 200 kpps a batch of 4 holds frames back at most 15 µs.
const PacedBatch = 4

func (s *Sender) runPacedLive(ctx context.Context) (Result, error) {
	release, err := s.pin()
	if err != nil {
		return Result{}, err
	}
	defer release()
	if s.o.RealTime {
		undo, err := realTime()
		if err != nil {
			return Result{}, err
		}
		defer undo()
	}
	t := time.Now()
	p, err := s.g.SendPaced(ctx, s.o.Ring, s.o.Rate, PacedBatch)
	if err != nil {
		return Result{}, err
	}
	res := Result{Sent: uint64(p.Sent), Sending: time.Since(t)}
	res.Elapsed = time.Duration(p.Last-p.First) + time.Duration(float64(time.Second)/s.o.Rate)
	if s.sendNs != nil {
		if err := s.g.SentNs(s.sendNs); err != nil {
			return res, err
		}
	}
	return res, nil
}

// realTime puts the calling thread (locked to it) under SCHED_FIFO
// priority 1 and returns the undo.
func realTime() (func(), error) {
	old, err := unix.SchedGetAttr(0, 0)
	if err != nil {
		return nil, fmt.Errorf("pktgen: sched_getattr: %w", err)
	}
	rt := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 1}
	if err := unix.SchedSetAttr(0, &rt, 0); err != nil {
		return nil, fmt.Errorf("pktgen: SCHED_FIFO for the paced sender: %w", err)
	}
	return func() { unix.SchedSetAttr(0, old, 0) }, nil
}

// pin locks the calling goroutine to its thread and the thread to
// Options.CPU, when one is set; release undoes both.
func (s *Sender) pin() (release func(), err error) {
	if s.o.CPU < 0 {
		return func() {}, nil
	}
	runtime.LockOSThread()
	restore, err := gen.PinThread(s.o.CPU)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	// Back from each send syscall the sender must not wait for a P
	// (internal/procs): a late sender is a lower offered rate.
	unreserve := procs.Reserve()
	return func() { unreserve(); restore(); runtime.UnlockOSThread() }, nil
}

func (s *Sender) sendPinned(n int) (int, time.Duration, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer procs.Reserve()() // see pin
	restore, err := gen.PinThread(s.o.CPU)
	if err != nil {
		return 0, 0, err
	}
	defer restore()
	return s.sendN(n)
}

func (s *Sender) sendN(n int) (int, time.Duration, error) {
	if s.tx == nil {
		return s.g.SendN(n)
	}
	s.g.MarkSent()
	return s.tx.send(s, n)
}

// Close frees the generator.
func (s *Sender) Close() error {
	if s.tx != nil {
		s.tx.close()
	}
	return s.g.Close()
}
