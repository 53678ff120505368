package gen

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// Counter is an XDP program for the far end of a measured path: it counts
// and drops IPv4 (IHL 5) UDP frames to one destination port, and passes
// everything else (ARP, IPv6 neighbour discovery) to the stack, so what
// it counts is exactly the generated traffic that arrived, without the
// receiving kernel's cost.
type Counter struct {
	Prog *ebpf.Program
	m    *ebpf.Map
}

// NewCounter loads a Counter for UDP destination port.
func NewCounter(port uint16) (*Counter, error) {
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "xgen_count", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("gen: create counter map: %w", err)
	}
	// A little-endian u16 load of the big-endian port field.
	var be [2]byte
	binary.BigEndian.PutUint16(be[:], port)
	portLE := int32(binary.LittleEndian.Uint16(be[:]))
	const (
		ctxData    = 0
		ctxDataEnd = 4
		xdpDrop    = 1
		xdpPass    = 2
	)
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, ctxData, asm.Word),
		asm.LoadMem(asm.R3, asm.R1, ctxDataEnd, asm.Word),
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 38), // Ethernet 14 + IPv4 20 + UDP ports 4
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 12, asm.Half),
		asm.JNE.Imm(asm.R0, 0x0008, "pass"), // ETH_P_IP as loaded
		asm.LoadMem(asm.R0, asm.R2, 14, asm.Byte),
		asm.JNE.Imm(asm.R0, 0x45, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 23, asm.Byte),
		asm.JNE.Imm(asm.R0, 17, "pass"),
		asm.LoadMem(asm.R0, asm.R2, 36, asm.Half),
		asm.JNE.Imm(asm.R0, portLE, "pass"),
		asm.Mov.Reg(asm.R6, asm.R3),
		asm.Sub.Reg(asm.R6, asm.R2), // frame length
		asm.StoreImm(asm.R10, -4, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		asm.StoreMem(asm.R0, 0, asm.R1, asm.DWord),
		asm.LoadMem(asm.R1, asm.R0, 8, asm.DWord),
		asm.Add.Reg(asm.R1, asm.R6),
		asm.StoreMem(asm.R0, 8, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, xdpDrop).WithSymbol("drop"),
		asm.Return(),
		asm.Mov.Imm(asm.R0, xdpPass).WithSymbol("pass"),
		asm.Return(),
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "xgen_count", Type: ebpf.XDP, License: "GPL", Instructions: insns,
	})
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("gen: load counter program: %w", err)
	}
	return &Counter{Prog: prog, m: m}, nil
}

// Read returns the frames and bytes (Ethernet header included) counted
// so far, summed over CPUs.
func (c *Counter) Read() (packets, bytes uint64, err error) {
	var per [][16]byte
	if err := c.m.Lookup(uint32(0), &per); err != nil {
		return 0, 0, fmt.Errorf("gen: read counter: %w", err)
	}
	for _, v := range per {
		packets += binary.NativeEndian.Uint64(v[0:])
		bytes += binary.NativeEndian.Uint64(v[8:])
	}
	return packets, bytes, nil
}

// Close unloads the program and its map (a link attached with it keeps
// its own reference until closed).
func (c *Counter) Close() error {
	c.Prog.Close()
	return c.m.Close()
}
