// Package xsktest holds the kernel-side helpers that exercise the xsk
// package without the real xesp XDP programs: a steering program (C, in
// lab/xdptest), an XDP_DROP or XDP_PASS program of two instructions, and a traffic
// generator (livegen.go) that the benchmark harness reuses. Everything
// here needs root and runs inside namespaces the caller made; it never
// attaches to a link it was not given.
package xsktest

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/xesp/xesp/lab/xdptest"
)

// MetaMagic ends every metadata blob the steering program writes, so a
// reader tells metadata from leftover headroom bytes (META_MAGIC in
// lab/xdptest/progs.c).
const MetaMagic uint32 = 0xC3B2A1E5

// MetaLen is the size of the steering program's metadata blob:
//
//	[0:2] UDP source port as on the wire (big endian)
//	[2]   rx_queue_index
//	[3]   first UDP payload byte (the steering choice)
//	[4:8] MetaMagic, little endian
const MetaLen = 8

// Steer is an XDP program and its XSK map: IPv4/UDP packets (IHL 5) to
// Port are redirected to xsks[rx_queue_index*Workers + payload[0]%Workers]
// with a MetaLen-byte blob placed by bpf_xdp_adjust_meta; everything else
// passes to the stack.
type Steer struct {
	Prog    *ebpf.Program
	XSKs    *ebpf.Map
	Workers int
}

// NewSteer loads the program for UDP destination port and workers sockets
// per queue, with room for queues RX queues.
func NewSteer(port uint16, workers, queues int) (*Steer, error) {
	if workers < 1 || workers > 255 {
		return nil, fmt.Errorf("workers %d outside 1..255", workers)
	}
	prog, xsks, err := xdptest.Steer(port, workers, queues)
	if err != nil {
		return nil, err
	}
	return &Steer{Prog: prog, XSKs: xsks, Workers: workers}, nil
}

// Set puts socket fd at xsks[queue*Workers+worker].
func (s *Steer) Set(queue, worker, fd int) error {
	key := uint32(queue*s.Workers + worker)
	if err := s.XSKs.Put(key, uint32(fd)); err != nil {
		return fmt.Errorf("xskmap[%d] = fd %d: %w", key, fd, err)
	}
	return nil
}

// Clear removes xsks[queue*Workers+worker]. The map holds a reference to
// the socket: until the entry goes, a closed socket stays bound and its
// (device, queue) refuses a new UMEM with EBUSY.
func (s *Steer) Clear(queue, worker int) error {
	key := uint32(queue*s.Workers + worker)
	if err := s.XSKs.Delete(key); err != nil {
		return fmt.Errorf("delete xskmap[%d]: %w", key, err)
	}
	return nil
}

// Close unloads the program and map (links attached with it keep their
// own reference until closed).
func (s *Steer) Close() error {
	s.Prog.Close()
	return s.XSKs.Close()
}

// NewVerdict loads a program that returns verdict for every packet:
// XDP_DROP for the drop ceiling, XDP_PASS to give a veth peer the XDP
// program it needs to accept redirected or XDP_TX frames (docs/platform.md).
func NewVerdict(verdict int32) (*ebpf.Program, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "xsktest_verdict", Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, verdict), asm.Return()},
	})
	if err != nil {
		return nil, fmt.Errorf("load verdict %d program: %w", verdict, err)
	}
	return prog, nil
}

// NewCountingVerdict loads a program that counts every packet in a
// one-entry per-CPU array and returns verdict: the XDP_DROP ceiling
// counted where the packets end, not where they were offered.
func NewCountingVerdict(verdict int32) (*ebpf.Program, *ebpf.Map, error) {
	prog, m, err := xdptest.CountAll(uint32(verdict))
	if err != nil {
		return nil, nil, err
	}
	return prog, m, nil
}

// Count sums a NewCountingVerdict counter over CPUs.
func Count(m *ebpf.Map) (uint64, error) {
	var per []uint64
	if err := m.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read counter: %w", err)
	}
	var t uint64
	for _, v := range per {
		t += v
	}
	return t, nil
}
