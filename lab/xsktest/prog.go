// Package xsktest holds the kernel-side helpers that exercise the xsk
// package without the real xesp XDP programs: a steering program built
// with cilium/ebpf's asm (no clang), an XDP_DROP baseline, and a traffic
// generator (livegen.go) that the benchmark harness reuses. Everything
// here needs root and runs inside namespaces the caller made; it never
// attaches to a link it was not given.
package xsktest

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// MetaMagic ends every metadata blob the steering program writes, so a
// reader tells metadata from leftover headroom bytes.
const MetaMagic uint32 = 0xC3B2A1E5

// MetaLen is the size of the steering program's metadata blob:
//
//	[0:2] UDP source port as on the wire (big endian)
//	[2]   rx_queue_index
//	[3]   first UDP payload byte (the steering choice)
//	[4:8] MetaMagic, little endian
const MetaLen = 8

// magicImm is MetaMagic as the signed 32-bit immediate a BPF store takes.
var magicImm = func() int32 { m := MetaMagic; return int32(m) }()

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
	xsks, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "xsktest_xsks", Type: ebpf.XSKMap, KeySize: 4, ValueSize: 4,
		MaxEntries: uint32(workers * queues),
	})
	if err != nil {
		return nil, fmt.Errorf("create xskmap: %w", err)
	}
	// Ports compare as loaded: a little-endian u16 load of a big-endian field.
	var be [2]byte
	binary.BigEndian.PutUint16(be[:], port)
	portLE := int32(binary.LittleEndian.Uint16(be[:]))
	const (
		ctxData     = 0
		ctxDataEnd  = 4
		ctxDataMeta = 8
		ctxRxQueue  = 16
	)
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, ctxRxQueue, asm.Word),
		// Metadata first: the helper invalidates packet pointers.
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Imm(asm.R2, -MetaLen),
		asm.FnXdpAdjustMeta.Call(),
		asm.JNE.Imm(asm.R0, 0, "pass"),
		asm.LoadMem(asm.R2, asm.R6, ctxData, asm.Word),
		asm.LoadMem(asm.R3, asm.R6, ctxDataMeta, asm.Word),
		asm.LoadMem(asm.R4, asm.R6, ctxDataEnd, asm.Word),
		asm.Mov.Reg(asm.R5, asm.R3),
		asm.Add.Imm(asm.R5, MetaLen),
		asm.JGT.Reg(asm.R5, asm.R2, "pass"),
		asm.Mov.Reg(asm.R5, asm.R2),
		asm.Add.Imm(asm.R5, 43), // eth 14 + ip 20 + udp 8 + 1 payload byte
		asm.JGT.Reg(asm.R5, asm.R4, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 12, asm.Half),
		asm.JNE.Imm(asm.R0, 0x0008, "pass"), // ETH_P_IP as loaded
		asm.LoadMem(asm.R0, asm.R2, 14, asm.Byte),
		asm.JNE.Imm(asm.R0, 0x45, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 23, asm.Byte),
		asm.JNE.Imm(asm.R0, 17, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 36, asm.Half),
		asm.JNE.Imm(asm.R0, portLE, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 34, asm.Half),
		asm.StoreMem(asm.R3, 0, asm.R0, asm.Half),
		asm.StoreMem(asm.R3, 2, asm.R7, asm.Byte),
		asm.LoadMem(asm.R8, asm.R2, 42, asm.Byte),
		asm.StoreMem(asm.R3, 3, asm.R8, asm.Byte),
		asm.StoreImm(asm.R3, 4, int64(magicImm), asm.Word),
		asm.Mod.Imm(asm.R8, int32(workers)),
		asm.Mul.Imm(asm.R7, int32(workers)),
		asm.Add.Reg(asm.R7, asm.R8),
		asm.LoadMapPtr(asm.R1, xsks.FD()),
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Mov.Imm(asm.R3, 0), // no socket at the index: XDP_ABORTED, visible in xdp:xdp_exception
		asm.FnRedirectMap.Call(),
		asm.Return(),
		asm.Mov.Imm(asm.R0, 2).WithSymbol("pass"), // XDP_PASS
		asm.Return(),
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "xsktest_steer", Type: ebpf.XDP, License: "GPL", Instructions: insns,
	})
	if err != nil {
		xsks.Close()
		return nil, fmt.Errorf("load steering program: %w", err)
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
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "xsktest_count", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 1,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("create counter map: %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "xsktest_count", Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.R10, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.R10),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
			asm.Add.Imm(asm.R1, 1),
			asm.StoreMem(asm.R0, 0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, verdict).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		m.Close()
		return nil, nil, fmt.Errorf("load counting verdict %d program: %w", verdict, err)
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
