// Package xdptest holds the XDP programs of the tests and benchmarks, in C
// (progs.c) built by bpf2go like the product's (bpf/): the AF_XDP steering
// program the xsk tests use (lab/xsktest.NewSteer) and the far-end counter
// of the benchmarks (bench/gen.NewCounter). Programs that are deliberately
// minimal (a bare XDP_PASS or XDP_DROP) stay as two instructions of Go asm
// where they are used.
//
// It loads programs; it must not attach them or create namespaces: its
// callers do, inside namespaces they own.
package xdptest

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package xdptest progs progs.c

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// spec returns the programs' collection with the configuration set.
func spec(port uint16, workers uint32) (*ebpf.CollectionSpec, error) {
	s, err := loadProgs()
	if err != nil {
		return nil, fmt.Errorf("xdptest: %w", err)
	}
	for name, v := range map[string]any{"port": port, "workers": workers} {
		if err := s.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("xdptest: set %s: %w", name, err)
		}
	}
	return s, nil
}

// Steer loads xsktest_steer for UDP destination port with workers sockets
// per queue and an XSK map of workers*queues entries.
func Steer(port uint16, workers, queues int) (prog *ebpf.Program, xsks *ebpf.Map, err error) {
	s, err := spec(port, uint32(workers))
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
	s, err := spec(port, 1)
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
