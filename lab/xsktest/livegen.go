package xsktest

import (
	"fmt"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/xesp/xesp/lab/xdptest"
	"golang.org/x/sys/unix"
)

// Generator sends copies of one Ethernet frame out of a device at line
// rate with BPF_PROG_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES):
// the kernel builds real xdp_frames from the input and a program that
// returns XDP_TX transmits them from the device given as ingress. No
// kernel pktgen is needed. On veth, the receiving side's XDP (and any
// AF_XDP copy into a UMEM) runs in the sender's softirq, so pin the
// generator to a CPU the receiver's worker does not use.
//
// The device's peer must have an XDP program attached, or XDP_TX frames
// vanish (docs/platform.md).
type Generator struct {
	prog    *ebpf.Program
	ifindex uint32
}

// GenOptions vary the frames the generator sends.
type GenOptions struct {
	// SpreadOffset and Spread, when Spread > 1, overwrite the byte at
	// SpreadOffset of every frame with a pseudo-random value below
	// Spread, so one run exercises several steering choices.
	SpreadOffset int
	Spread       int
}

// xdpMD is the kernel's struct xdp_md, the context of an XDP program
// run. For a test run the kernel wants DataEnd equal to the input length.
type xdpMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// NewGenerator loads the generator for the device ifindex, which must be
// resolvable in the namespace Send will run in.
func NewGenerator(ifindex int, o GenOptions) (*Generator, error) {
	prog, err := xdptest.Gen(o.Spread, o.SpreadOffset)
	if err != nil {
		return nil, err
	}
	return &Generator{prog: prog, ifindex: uint32(ifindex)}, nil
}

// Send transmits count copies of frame in one BPF_PROG_RUN, batch frames
// per kernel allocation round (0: the kernel's 64). It returns when the
// kernel has run the program count times; frames the receiver could not
// take are dropped by it, and show in its counters, not here. Call it on a
// thread inside the device's namespace (netns.NS.Do).
func (g *Generator) Send(frame []byte, count, batch uint32) error {
	_, err := g.prog.Run(&ebpf.RunOptions{
		Data:      frame,
		Context:   xdpMD{DataEnd: uint32(len(frame)), IngressIfindex: g.ifindex},
		Repeat:    count,
		BatchSize: batch,
		Flags:     unix.BPF_F_TEST_XDP_LIVE_FRAMES,
	})
	if err != nil {
		return fmt.Errorf("live-frames run of %d frames on ifindex %d: %w", count, g.ifindex, err)
	}
	return nil
}

// SendPinned is Send on CPU cpu. It locks the calling goroutine to its
// thread for the duration and restores the thread's affinity afterwards,
// so the namespace thread that netns.NS.Do lends comes back unchanged.
func (g *Generator) SendPinned(cpu int, frame []byte, count, batch uint32) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return fmt.Errorf("sched_getaffinity: %w", err)
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin generator to cpu %d: %w", cpu, err)
	}
	defer unix.SchedSetaffinity(0, &old)
	return g.Send(frame, count, batch)
}

// Close unloads the program.
func (g *Generator) Close() error { return g.prog.Close() }
