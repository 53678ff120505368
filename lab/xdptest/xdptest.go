// Package xdptest holds the XDP programs of the tests and benchmarks, in C
// (progs.c) built by bpf2go like the product's (bpf/): the AF_XDP steering
// program the xsk tests use (lab/xsktest.NewSteer), the far-end counter of
// the benchmarks (bench/gen.NewCounter) and the live-frames senders of the
// traffic generator (bench/gen.New) and of the xsk tests
// (lab/xsktest.NewGenerator). Programs that are deliberately
// minimal (a bare XDP_PASS or XDP_DROP) stay as two instructions of Go asm
// where they are used.
//
// It loads programs; it must not attach them or create namespaces: its
// callers do, inside namespaces they own.
package xdptest

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package xdptest progs progs.c

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// spec returns the programs' collection with the configuration set.
func spec(vars map[string]any) (*ebpf.CollectionSpec, error) {
	s, err := loadProgs()
	if err != nil {
		return nil, fmt.Errorf("xdptest: %w", err)
	}
	for name, v := range vars {
		if err := s.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("xdptest: set %s: %w", name, err)
		}
	}
	return s, nil
}

// Steer loads xsktest_steer for UDP destination port with workers sockets
// per queue and an XSK map of workers*queues entries.
func Steer(port uint16, workers, queues int) (prog *ebpf.Program, xsks *ebpf.Map, err error) {
	s, err := spec(map[string]any{"port": port, "workers": uint32(workers)})
	if err != nil {
		return nil, nil, err
	}
	s.Maps["xsks"].MaxEntries = uint32(workers * queues)
	var o struct {
		Prog *ebpf.Program `ebpf:"xsktest_steer"`
		XSKs *ebpf.Map     `ebpf:"xsks"`
	}
	if err := s.LoadAndAssign(&o, nil); err != nil {
		return nil, nil, fmt.Errorf("xdptest: load steering program: %w", err)
	}
	return o.Prog, o.XSKs, nil
}

// Count loads xgen_count for UDP destination port and its per-CPU map of
// one {packets, bytes uint64} value.
func Count(port uint16) (prog *ebpf.Program, counts *ebpf.Map, err error) {
	s, err := spec(map[string]any{"port": port})
	if err != nil {
		return nil, nil, err
	}
	var o struct {
		Prog   *ebpf.Program `ebpf:"xgen_count"`
		Counts *ebpf.Map     `ebpf:"counts"`
	}
	if err := s.LoadAndAssign(&o, nil); err != nil {
		return nil, nil, fmt.Errorf("xdptest: load counter program: %w", err)
	}
	return o.Prog, o.Counts, nil
}

// Stamped is xgen_count loaded with a ring buffer of stamps for the
// latency receiver: Stamps gets {ts u64, IP length u32, pad u32, the
// first Len bytes of the IP packet} (StampHeader bytes, then the data) for
// each sampled frame while On is 1; Mask samples frames whose per-CPU
// count & Mask is 0; Lost counts records the ring had no room for.
type Stamped struct {
	Prog    *ebpf.Program  `ebpf:"xgen_count"`
	Counts  *ebpf.Map      `ebpf:"counts"`
	Stamps  *ebpf.Map      `ebpf:"stamps"`
	Scratch *ebpf.Map      `ebpf:"stamp_scratch"`
	On      *ebpf.Variable `ebpf:"stamp_on"`
	Mask    *ebpf.Variable `ebpf:"stamp_mask"`
	Len     *ebpf.Variable `ebpf:"stamp_len"`
	Lost    *ebpf.Variable `ebpf:"stamp_lost"`
}

// StampHeader is a stamp record's header; StampMax the most bytes of a
// packet a record carries.
const (
	StampHeader = 16
	StampMax    = 1536
)

// CountStamped loads xgen_count for UDP destination port with a stamps
// ring buffer of ringBytes (a power of two, at least a page).
func CountStamped(port uint16, ringBytes int) (*Stamped, error) {
	s, err := spec(map[string]any{"port": port})
	if err != nil {
		return nil, err
	}
	s.Maps["stamps"].MaxEntries = uint32(ringBytes)
	var st Stamped
	if err := s.LoadAndAssign(&st, nil); err != nil {
		return nil, fmt.Errorf("xdptest: load stamping counter (ring %d bytes): %w", ringBytes, err)
	}
	return &st, nil
}

// Close frees the program and its maps.
func (s *Stamped) Close() error {
	return errors.Join(s.Prog.Close(), s.Counts.Close(), s.Stamps.Close(), s.Scratch.Close())
}

// SlotHeader precedes each frame in a Send slot: the frame length (u32,
// native order) and 4 bytes of padding.
const SlotHeader = 8

// Sender is xgen_send and its maps: Frames is ARRAY slot →
// [SlotHeader + maxFrame]byte, Next the ARRAY[1] u64 of the next slot to
// send, Pace the ARRAY[1] {interval_ps, t0, last, late, first u64} of a
// paced run (see progs.c), Sent the ARRAY slot → u64 send time (ns,
// CLOCK_MONOTONIC) a paced run records, and Stop the ARRAY[1] u32 that,
// set, drops every remaining slot of a run.
type Sender struct {
	Prog                           *ebpf.Program
	Frames, Next, Pace, Sent, Stop *ebpf.Map
}

// Send loads xgen_send for a ring of ring slots of frames up to maxFrame
// bytes.
func Send(ring, maxFrame int) (*Sender, error) {
	s, err := spec(map[string]any{"ring": uint32(ring), "max_frame": uint32(maxFrame)})
	if err != nil {
		return nil, err
	}
	s.Maps["xgen_frames"].ValueSize = uint32(SlotHeader + maxFrame)
	s.Maps["xgen_frames"].MaxEntries = uint32(ring)
	s.Maps["xgen_sent"].MaxEntries = uint32(ring)
	var o struct {
		Prog   *ebpf.Program `ebpf:"xgen_send"`
		Frames *ebpf.Map     `ebpf:"xgen_frames"`
		Next   *ebpf.Map     `ebpf:"xgen_next"`
		Pace   *ebpf.Map     `ebpf:"xgen_pace"`
		Sent   *ebpf.Map     `ebpf:"xgen_sent"`
		Stop   *ebpf.Map     `ebpf:"xgen_stop"`
	}
	if err := s.LoadAndAssign(&o, nil); err != nil {
		return nil, fmt.Errorf("xdptest: load send program (%d slots of %d bytes): %w", ring, SlotHeader+maxFrame, err)
	}
	return &Sender{Prog: o.Prog, Frames: o.Frames, Next: o.Next, Pace: o.Pace, Sent: o.Sent, Stop: o.Stop}, nil
}

// Close frees the program and its maps.
func (s *Sender) Close() error {
	return errors.Join(s.Prog.Close(), s.Frames.Close(), s.Next.Close(), s.Pace.Close(), s.Sent.Close(), s.Stop.Close())
}

// Gen loads xsktest_gen: XDP_TX for every frame, after writing a random
// value below spread at byte spreadOffset when spread > 1.
func Gen(spread, spreadOffset int) (*ebpf.Program, error) {
	s, err := spec(map[string]any{"spread": uint32(max(spread, 0)), "spread_offset": uint32(max(spreadOffset, 0))})
	if err != nil {
		return nil, err
	}
	var o struct {
		Prog *ebpf.Program `ebpf:"xsktest_gen"`
	}
	if err := s.LoadAndAssign(&o, nil); err != nil {
		return nil, fmt.Errorf("xdptest: load generator program: %w", err)
	}
	return o.Prog, nil
}

// CountAll loads xsktest_count: every frame counted in a one-entry per-CPU
// u64 array, then verdict.
func CountAll(verdict uint32) (*ebpf.Program, *ebpf.Map, error) {
	s, err := spec(map[string]any{"verdict": verdict})
	if err != nil {
		return nil, nil, err
	}
	var o struct {
		Prog   *ebpf.Program `ebpf:"xsktest_count"`
		Counts *ebpf.Map     `ebpf:"xsktest_counts"`
	}
	if err := s.LoadAndAssign(&o, nil); err != nil {
		return nil, nil, fmt.Errorf("xdptest: load counting verdict %d program: %w", verdict, err)
	}
	return o.Prog, o.Counts, nil
}
