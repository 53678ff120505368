// Package gen is xesp's traffic generator: it precomputes a ring of valid
// Ethernet frames — really encrypted ESP-in-UDP under real SAs, or
// cleartext IPv4/UDP for the encap direction — stores them in a BPF array
// map, and sends them out of a device at line rate with BPF_PROG_RUN in
// XDP live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES). No kernel pktgen is
// needed (docs/platform.md). The benchmarks use it, and `xesp-lab pktgen` is meant
// to wrap it.
//
// Why a ring of precomputed frames: every ESP packet must carry a fresh
// sequence number (the receiver's replay window drops repeats) and with
// AES-GCM the IV is the sequence number, so a number cannot be rewritten
// without re-encrypting. So one Send transmits each of the Ring frames
// exactly once, in slot order, and Refill seals the next Ring sequence
// numbers (outside any measured window) before the next Send. Per SA the
// sequence numbers on the wire are strictly increasing and never repeat;
// Send refuses to transmit an ESP ring twice.
//
// Use:
//
//	g, _ := gen.New(gen.Options{Ifindex: ifindex})   // in the device's namespace
//	g.LoadESP(l2, flows, gen.Fixed(200))            // or LoadClear
//	for ... {
//		n, elapsed, _ := g.SendPinned(0)            // Ring frames, pinned to CPU 0
//		g.Refill()                                  // next sequence numbers
//	}
//	g.Close()
//
// On veth the receiver's XDP (and an AF_XDP copy into its UMEM) runs in
// the sender's softirq, on the generator's CPU: pin the generator away
// from the workers. The device's peer must have an XDP program attached,
// or XDP_TX frames vanish.
//
// The package does crypto through dataplane/esp and nothing else: it does
// not decide what a receiver does, it holds no SA database, and it never
// attaches a program to a link (NewCounter's caller attaches it).
package gen

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"runtime"
	"time"
	"unsafe"

	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/internal/procs"
	"github.com/xesp/xesp/lab/xdptest"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/dataplane/esp"
)

// Defaults for Options.
const (
	DefaultRing     = 32768
	DefaultMaxFrame = 1536 // a 1500-byte MTU frame (1514) fits
	// slotHeader precedes each frame in its map value: the frame length
	// (u32, host order) and 4 bytes of padding (the layout of xgen_send
	// in lab/xdptest/progs.c).
	slotHeader = xdptest.SlotHeader
)

// ErrStale is returned by Send when the ESP ring was already sent and not
// refilled since: sending it again would replay every sequence number.
var ErrStale = errors.New("gen: ESP ring already sent; Refill first")

// Options size a generator.
type Options struct {
	// Ifindex is the device frames leave through (XDP_TX), resolved in the
	// namespace of the thread that calls Send.
	Ifindex int
	// MaxFrame is the largest frame, Ethernet header included (default
	// DefaultMaxFrame, at most 3000: live frames live in one page).
	MaxFrame int
	// Ring is the number of distinct frames, and so the number one Send
	// transmits (default DefaultRing).
	Ring int
	// Batch is the kernel's live-frames batch size (0: its default, 64).
	Batch int
	// Forged marks an ESP ring that is never meant to authenticate (a
	// flood sealed under a wrong key): Send may transmit it again
	// unchanged, as an attacker would, without Refill. Never set it for
	// traffic a receiver must accept: repeats reuse sequence numbers.
	Forged bool
	// Ctx, when set, stops a fill (Load, Refill) between chunks of 4096
	// frames once it ends: sealing a million-frame ring takes seconds,
	// and the bench must stop within 2 s of a signal.
	Ctx context.Context
}

// L2 is the Ethernet header of every frame.
type L2 struct {
	Src, Dst net.HardwareAddr
}

// Flow is one stream in the ring. The n-th frame the generator builds
// (counting across refills) carries flow n % len(flows), so with more
// flows than Ring slots successive refills walk through all of them.
type Flow struct {
	// SA seals the flow's frames (LoadESP); it is the sender's side of the
	// SA, and the generator advances its sequence counter. Not used by
	// LoadClear. The caller must not use it concurrently with the
	// generator.
	SA *esp.Transform
	// Outer is the ESP packet's outer addressing (LoadESP only); with
	// Encap set it is RFC 3948 ESP-in-UDP.
	Outer esp.Outer
	// Src and Dst are the inner IPv4/UDP endpoints (LoadESP), or the
	// cleartext packet's (LoadClear).
	Src, Dst netip.AddrPort
}

// Sizes says how long each slot's IP packet is: for LoadESP the inner
// packet the receiver decrypts (the frame adds the ESP and outer
// overhead), for LoadClear the IP packet itself. The n-th frame built has
// size At(n, flows): every flow sees the whole mix over its successive
// packets, and with many flows one ring already holds the mix.
type Sizes struct {
	pattern []int
}

// Fixed is one size for every packet.
func Fixed(n int) Sizes { return Sizes{pattern: []int{n}} }

// Mix interleaves lens in proportion to weights (e.g. 7:4:1), spreading
// each size evenly over the pattern rather than in runs.
func Mix(lens, weights []int) (Sizes, error) {
	if len(lens) == 0 || len(lens) != len(weights) {
		return Sizes{}, fmt.Errorf("gen: mix needs one weight per size, got %d sizes and %d weights", len(lens), len(weights))
	}
	total := 0
	for _, w := range weights {
		if w <= 0 {
			return Sizes{}, fmt.Errorf("gen: mix weights must be positive, got %v", weights)
		}
		total += w
	}
	// Smooth weighted round robin (as nginx balances upstreams): each
	// step picks the size furthest behind its share.
	cur := make([]int, len(lens))
	p := make([]int, 0, total)
	for range total {
		best := 0
		for i := range lens {
			cur[i] += weights[i]
			if cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= total
		p = append(p, lens[best])
	}
	return Sizes{pattern: p}, nil
}

// IMIX is the 7:4:1 Internet mix of 64, 570 and 1400 bytes. The large
// size is 1400 rather than the classic 1518 so that an ESP-in-UDP frame
// around it still fits a 1500-byte MTU.
func IMIX() Sizes {
	s, _ := Mix([]int{64, 570, 1400}, []int{7, 4, 1})
	return s
}

// At is the size of the n-th frame built for flows flows: flow f's r-th
// frame (n = r*flows + f) takes pattern[(r+f) % len(pattern)], so each
// flow cycles through the pattern and, when flows outnumber a ring, the
// flows of one round already spread over it.
func (s Sizes) At(n, flows int) int {
	flows = max(flows, 1)
	return s.pattern[(n/flows+n%flows)%len(s.pattern)]
}

// Pattern returns the sizes in their order of use.
func (s Sizes) Pattern() []int { return append([]int(nil), s.pattern...) }

// Gen is a loaded generator. Not safe for concurrent use.
type Gen struct {
	o        Options
	send     *xdptest.Sender
	prog     *ebpf.Program
	frames   *ebpf.Map // ARRAY: slot → [len u32, pad, frame]
	counter  *ebpf.Map // ARRAY[1] u64: the next slot
	valSize  int
	host     []byte // Ring map values, as written to the map
	vals     any    // host as a []([valSize]byte), the shape BatchUpdate takes
	keys     []uint32
	template []byte

	l2     L2
	flows  []Flow
	sizes  Sizes
	esp    bool
	loaded bool
	stale  bool // ESP ring sent since the last fill
	serial uint64
	built  uint64 // frames built since the last Load (from first): slot i of this fill is frame built+i
	// first is where the next Load starts in its flows (SetFirst).
	first uint64
	// fillSerial is the serial before this fill: slot i's marker carries
	// fillSerial+i+1.
	fillSerial uint64
}

// xdpMD is the kernel's struct xdp_md, the context of a test run; the
// kernel wants DataEnd equal to the input length.
type xdpMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// New creates the maps and loads the sending program.
func New(o Options) (*Gen, error) {
	if o.Ring == 0 {
		o.Ring = DefaultRing
	}
	if o.MaxFrame == 0 {
		o.MaxFrame = DefaultMaxFrame
	}
	if o.Ifindex <= 0 {
		return nil, fmt.Errorf("gen: ifindex %d", o.Ifindex)
	}
	if o.Ring < 1 || o.Ring > 1<<20 {
		return nil, fmt.Errorf("gen: ring %d outside 1..%d", o.Ring, 1<<20)
	}
	if o.MaxFrame < 64 || o.MaxFrame > 3000 {
		return nil, fmt.Errorf("gen: max frame %d outside 64..3000", o.MaxFrame)
	}
	o.MaxFrame = (o.MaxFrame + 7) &^ 7
	g := &Gen{o: o, valSize: slotHeader + o.MaxFrame}
	var err error
	if g.send, err = xdptest.Send(o.Ring, o.MaxFrame); err != nil {
		return nil, fmt.Errorf("gen: %w", err)
	}
	g.prog, g.frames, g.counter = g.send.Prog, g.send.Frames, g.send.Next
	// One slice element per map value, so BatchUpdate writes the whole
	// ring in one syscall; host aliases it byte by byte.
	vals := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(g.valSize, reflect.TypeFor[byte]())), o.Ring, o.Ring)
	g.vals = vals.Interface()
	g.host = unsafe.Slice((*byte)(vals.UnsafePointer()), o.Ring*g.valSize)
	g.keys = make([]uint32, o.Ring)
	for i := range g.keys {
		g.keys[i] = uint32(i)
	}
	// Every live frame starts as this template and the program shrinks
	// it to the slot's length: bpf_xdp_adjust_tail may shrink freely but
	// grows only into tailroom.
	g.template = make([]byte, o.MaxFrame)
	return g, nil
}

// Ring is the number of frames one Send transmits.
func (g *Gen) Ring() int { return g.o.Ring }

// LoadESP fills the ring with ESP frames: slot i seals an inner IPv4/UDP
// packet of sizes.At(i) bytes from flows[i%len(flows)].Src to .Dst under
// that flow's SA, at the SA's next sequence number, inside the flow's
// outer header and l2. Each inner payload starts with a marker (see
// Marker) naming the flow and a serial number.
func (g *Gen) LoadESP(l2 L2, flows []Flow, sizes Sizes) error {
	for i, f := range flows {
		if f.SA == nil {
			return fmt.Errorf("gen: flow %d: no SA", i)
		}
		if !f.Outer.Src.IsValid() || !f.Outer.Dst.IsValid() {
			return fmt.Errorf("gen: flow %d: outer addresses unset", i)
		}
	}
	if err := g.set(l2, flows, sizes, true); err != nil {
		return err
	}
	return g.fill()
}

// LoadClear fills the ring with cleartext IPv4/UDP frames (the encap
// direction: what the core sends toward phones). Replaying them is
// harmless, so Send may repeat them without Refill.
func (g *Gen) LoadClear(l2 L2, flows []Flow, sizes Sizes) error {
	if err := g.set(l2, flows, sizes, false); err != nil {
		return err
	}
	return g.fill()
}

func (g *Gen) set(l2 L2, flows []Flow, sizes Sizes, isESP bool) error {
	if len(flows) == 0 {
		return errors.New("gen: no flows")
	}
	if len(sizes.pattern) == 0 {
		return errors.New("gen: no sizes")
	}
	if len(l2.Src) != 6 || len(l2.Dst) != 6 {
		return fmt.Errorf("gen: L2 needs two 6-byte MACs, got %v and %v", l2.Src, l2.Dst)
	}
	for i, f := range flows {
		if !f.Src.Addr().Is4() || !f.Dst.Addr().Is4() {
			return fmt.Errorf("gen: flow %d: inner endpoints must be IPv4, got %v → %v", i, f.Src, f.Dst)
		}
	}
	for _, n := range sizes.pattern {
		if n < MinSize {
			return fmt.Errorf("gen: size %d below the minimum %d (IPv4 + UDP + marker)", n, MinSize)
		}
	}
	g.l2, g.flows, g.sizes, g.esp = l2, flows, sizes, isESP
	g.loaded, g.built = false, g.first
	return nil
}

// SetFirst makes the next Load start at frame k of its sequence: the
// fill's slot i then carries flow (k+i) mod len(flows), with the size
// that frame has in the pattern. A caller that loads a flow set larger
// than one ring moves k on by the frames it sent, so successive loads
// visit every flow instead of the first ring's worth again.
func (g *Gen) SetFirst(k uint64) { g.first = k }

// Refill seals the next Ring sequence numbers into the ESP ring (and
// writes the cleartext ring again, which changes nothing on the wire).
func (g *Gen) Refill() error {
	if g.flows == nil {
		return errors.New("gen: nothing loaded")
	}
	return g.fill()
}

func (g *Gen) fill() error {
	g.fillSerial = g.serial
	for i := 0; i < g.o.Ring; i++ {
		if i%4096 == 0 && g.o.Ctx != nil {
			if err := g.o.Ctx.Err(); err != nil {
				g.loaded = false
				return err
			}
		}
		if err := g.build(i); err != nil {
			return err
		}
	}
	if _, err := g.frames.BatchUpdate(g.keys, g.vals, nil); err != nil {
		return fmt.Errorf("gen: write %d frames to the frame map: %w", g.o.Ring, err)
	}
	g.built += uint64(g.o.Ring)
	g.loaded, g.stale = true, false
	return nil
}

// MinSize is the smallest IP packet: IPv4 + UDP headers and the marker.
const MinSize = 28 + MarkerLen

// MarkerLen is the size of the marker that starts each UDP payload:
// "xgen", the flow index (u32) and a serial number (u64), big endian.
// The serial counts every packet the generator built, so two refills
// never carry the same payload either.
const MarkerLen = 16

// Marker parses a payload's marker.
func Marker(payload []byte) (flow uint32, serial uint64, ok bool) {
	if len(payload) < MarkerLen || string(payload[:4]) != "xgen" {
		return 0, 0, false
	}
	return binary.BigEndian.Uint32(payload[4:]), binary.BigEndian.Uint64(payload[8:]), true
}

func (g *Gen) build(i int) error {
	n := g.built + uint64(i)
	fi := int(n % uint64(len(g.flows)))
	f := &g.flows[fi]
	size := g.sizes.At(int(n%(1<<62)), len(g.flows))
	val := g.host[i*g.valSize : (i+1)*g.valSize]
	frame := val[slotHeader:]
	ip := 14
	if g.esp {
		ip = 14 + esp.OuterLen(&f.Outer) + f.SA.Headroom()
	}
	// gcm8 scratch needs 8 bytes past the ICV: keep a margin.
	if ip+size+16 > len(frame) {
		return fmt.Errorf("gen: slot %d: a %d-byte packet does not fit a %d-byte frame", i, size, g.o.MaxFrame)
	}
	g.serial++
	putUDP(frame[ip:ip+size], f.Src, f.Dst, uint32(fi), g.serial)
	end := ip + size
	ethType := uint16(0x0800)
	if g.esp {
		start, e, err := f.SA.Seal(frame, ip, size, esp.NextHeaderIPv4, 0)
		if err != nil {
			return fmt.Errorf("gen: slot %d: seal under SPI 0x%08x: %w", i, f.SA.SPI(), err)
		}
		s, err := esp.PutOuter(frame, start, e, &f.Outer)
		if err != nil {
			return fmt.Errorf("gen: slot %d: outer header: %w", i, err)
		}
		if s != 14 {
			return fmt.Errorf("gen: slot %d: outer header starts at %d, want 14", i, s)
		}
		if e+8 > len(frame) || e > g.o.MaxFrame {
			return fmt.Errorf("gen: slot %d: a %d-byte frame exceeds max frame %d", i, e, g.o.MaxFrame)
		}
		end = e
		if f.Outer.Src.Is6() {
			ethType = 0x86dd
		}
	}
	copy(frame[0:6], g.l2.Dst)
	copy(frame[6:12], g.l2.Src)
	binary.BigEndian.PutUint16(frame[12:], ethType)
	binary.NativeEndian.PutUint32(val[0:], uint32(end))
	return nil
}

// CopyFrame copies slot i into dst (at least MaxFrame bytes) and returns
// its length: for senders other than Send (AF_XDP TX), without
// allocating.
func (g *Gen) CopyFrame(dst []byte, i int) int {
	val := g.host[i*g.valSize : (i+1)*g.valSize]
	n := binary.NativeEndian.Uint32(val)
	return copy(dst, val[slotHeader:slotHeader+int(n)])
}

// SlotSerial is the serial number slot i's marker carries in the current
// fill (see Marker): a receiver that reads it back knows which slot, and
// so which send, the packet was.
func (g *Gen) SlotSerial(i int) uint64 { return g.fillSerial + uint64(i) + 1 }

// MarkSent records that the ESP ring went out by another sender, so Send
// refuses it until Refill, as after its own runs.
func (g *Gen) MarkSent() { g.stale = true }

// Frame returns a copy of slot i as the next Send transmits it.
func (g *Gen) Frame(i int) []byte {
	val := g.host[i*g.valSize : (i+1)*g.valSize]
	n := binary.NativeEndian.Uint32(val)
	return append([]byte(nil), val[slotHeader:slotHeader+int(n)]...)
}

// Send transmits the ring's frames once, slot 0 first, in one
// BPF_PROG_RUN, on the calling thread (which must be in the device's
// namespace). It returns how many frames the program handed to XDP_TX and
// the wall time the run took. Frames the receiver could not take are
// dropped there and show in its counters, not here.
func (g *Gen) Send() (sent int, elapsed time.Duration, err error) {
	return g.SendN(g.o.Ring)
}

// SendN is Send for the ring's first n frames only (1 ≤ n ≤ Ring), for a
// count or a rate that a whole ring would overshoot. The rest of an ESP
// ring is not sent: Refill seals past it, leaving a gap in each SA's
// sequence numbers, which a receiver's replay window accepts.
func (g *Gen) SendN(n int) (sent int, elapsed time.Duration, err error) {
	if n < 1 || n > g.o.Ring {
		return 0, 0, fmt.Errorf("gen: send %d frames from a ring of %d", n, g.o.Ring)
	}
	if !g.loaded {
		return 0, 0, errors.New("gen: nothing loaded")
	}
	if g.esp && g.stale && !g.o.Forged {
		return 0, 0, ErrStale
	}
	if err := g.counter.Put(uint32(0), uint64(0)); err != nil {
		return 0, 0, fmt.Errorf("gen: reset slot counter: %w", err)
	}
	g.stale = true
	start := time.Now()
	_, err = g.prog.Run(&ebpf.RunOptions{
		Data:      g.template,
		Context:   xdpMD{DataEnd: uint32(len(g.template)), IngressIfindex: uint32(g.o.Ifindex)},
		Repeat:    uint32(n),
		BatchSize: uint32(g.o.Batch),
		Flags:     unix.BPF_F_TEST_XDP_LIVE_FRAMES,
	})
	elapsed = time.Since(start)
	if err != nil {
		return 0, elapsed, fmt.Errorf("gen: live-frames run of %d frames on ifindex %d: %w", n, g.o.Ifindex, err)
	}
	var next uint64
	if err := g.counter.Lookup(uint32(0), &next); err != nil {
		return 0, elapsed, fmt.Errorf("gen: read slot counter: %w", err)
	}
	return int(min(next, uint64(n))), elapsed, nil
}

// pace is xgen_pace's value (lab/xdptest progs.c).
type pace struct {
	IntervalPs, T0, Last, Late, First uint64
}

// Paced is what a paced run sent: frames, and when the first and the
// last left (CLOCK_MONOTONIC ns, the program's own readings).
type Paced struct {
	Sent        int
	First, Last int64
	// Late counts the times a frame was more than 50 µs late (the
	// sending CPU was taken away) and the schedule moved rather than
	// catch up in a burst.
	Late int
}

// SendPaced transmits the ring's first n frames in one live-frames run
// paced inside the XDP program: slot i leaves no earlier than
// i/rate seconds after slot 0 (the program spins on its clock between
// frames, on the calling thread's CPU), in kernel batches of batch frames
// (1: each frame leaves, and the receiver's XDP runs, as soon as it is
// due). The run's fixed start-up cost (20–45 ms on this kernel) comes
// before slot 0 and is not part of the schedule. SentNs then gives each
// slot's send time.
//
// Why: the AF_XDP copy-mode sender pays an skb, a copy and the receiver's
// XDP and AF_XDP copy per frame in its sendto, which on the 2-vCPU VM caps
// it near 100–190 kpps, below what the gateway forwards; live frames
// reach the receiver as xdp_frames in bulk, an order of magnitude
// cheaper, and the in-program pacing makes them a schedule instead of a
// burst.
//
// Cancelling ctx stops the run within one clock check: the program drops
// every slot left.
func (g *Gen) SendPaced(ctx context.Context, n int, rate float64, batch int) (Paced, error) {
	if rate <= 0 {
		return Paced{}, fmt.Errorf("gen: paced run at %v pps", rate)
	}
	if n < 1 || n > g.o.Ring {
		return Paced{}, fmt.Errorf("gen: send %d frames from a ring of %d", n, g.o.Ring)
	}
	if !g.loaded {
		return Paced{}, errors.New("gen: nothing loaded")
	}
	if g.esp && g.stale && !g.o.Forged {
		return Paced{}, ErrStale
	}
	if err := g.send.Pace.Put(uint32(0), pace{IntervalPs: uint64(1e12 / rate)}); err != nil {
		return Paced{}, fmt.Errorf("gen: set pace: %w", err)
	}
	defer g.send.Pace.Put(uint32(0), pace{})
	if err := g.counter.Put(uint32(0), uint64(0)); err != nil {
		return Paced{}, fmt.Errorf("gen: reset slot counter: %w", err)
	}
	g.stale = true
	if err := g.send.Stop.Put(uint32(0), uint32(0)); err != nil {
		return Paced{}, fmt.Errorf("gen: clear stop: %w", err)
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			g.send.Stop.Put(uint32(0), uint32(1))
		case <-done:
		}
	}()
	_, err := g.prog.Run(&ebpf.RunOptions{
		Data:      g.template,
		Context:   xdpMD{DataEnd: uint32(len(g.template)), IngressIfindex: uint32(g.o.Ifindex)},
		Repeat:    uint32(n),
		BatchSize: uint32(batch),
		Flags:     unix.BPF_F_TEST_XDP_LIVE_FRAMES,
	})
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		return Paced{}, fmt.Errorf("gen: paced live-frames run of %d frames on ifindex %d: %w", n, g.o.Ifindex, err)
	}
	var next uint64
	if err := g.counter.Lookup(uint32(0), &next); err != nil {
		return Paced{}, fmt.Errorf("gen: read slot counter: %w", err)
	}
	var p pace
	if err := g.send.Pace.Lookup(uint32(0), &p); err != nil {
		return Paced{}, fmt.Errorf("gen: read pace: %w", err)
	}
	return Paced{Sent: int(min(next, uint64(n))), First: int64(p.First), Last: int64(p.Last), Late: int(p.Late)}, nil
}

// SentNs reads the send time of the ring's first n slots after SendPaced
// (ns, CLOCK_MONOTONIC; 0: not sent) into dst.
func (g *Gen) SentNs(dst []int64) error {
	keys := g.keys[:min(len(dst), len(g.keys))]
	vals := make([]uint64, len(keys))
	var cursor ebpf.MapBatchCursor
	if _, err := g.send.Sent.BatchLookup(&cursor, keys, vals, nil); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		// An ARRAY has every key: fall back to lookups one by one.
		for i, k := range keys {
			if err := g.send.Sent.Lookup(k, &vals[i]); err != nil {
				return fmt.Errorf("gen: read send time of slot %d: %w", k, err)
			}
		}
	}
	for i, v := range vals {
		dst[i] = int64(v)
	}
	return nil
}

// SendPinned is Send with the calling thread pinned to cpu for the run;
// the thread's previous affinity is restored afterwards.
func (g *Gen) SendPinned(cpu int) (int, time.Duration, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer procs.Reserve()() // back from each send, no wait for a P (internal/procs)
	restore, err := PinThread(cpu)
	if err != nil {
		return 0, 0, err
	}
	defer restore()
	return g.Send()
}

// PinThread pins the calling OS thread to cpu and returns a function that
// restores its previous affinity. The caller must hold
// runtime.LockOSThread until it has called restore.
func PinThread(cpu int) (restore func() error, err error) {
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return nil, fmt.Errorf("pin thread to cpu %d: %w", cpu, err)
	}
	return func() error { return unix.SchedSetaffinity(0, &old) }, nil
}

// Close unloads the program and frees the maps.
func (g *Gen) Close() error {
	if g.send == nil {
		return nil
	}
	return g.send.Close()
}

// putUDP writes an IPv4/UDP packet filling p (len(p) ≥ MinSize) with
// valid checksums, its payload the marker then zeros.
func putUDP(p []byte, src, dst netip.AddrPort, flow uint32, serial uint64) {
	clear(p)
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[10:], ^pkt.Fold(pkt.Sum(p[:20], 0)))
	u := p[20:]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(len(u)))
	copy(u[8:], "xgen")
	binary.BigEndian.PutUint32(u[12:], flow)
	binary.BigEndian.PutUint64(u[16:], serial)
	ck := ^pkt.Fold(pkt.Sum(u, pkt.Sum(p[12:20], 17+uint64(len(u)))))
	if ck == 0 {
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], ck)
}
