package gen

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/xesp/xesp/lab/xdptest"
)

// Counter is an XDP program for the far end of a measured path: it counts
// and drops IPv4 (IHL 5) UDP frames to one destination port, and passes
// everything else (ARP, IPv6 neighbour discovery) to the stack, so what
// it counts is exactly the generated traffic that arrived, without the
// receiving kernel's cost.
type Counter struct {
	Prog *ebpf.Program
	m    *ebpf.Map
	// st and rd: NewStampCounter's sampling switches and ring reader.
	st *xdptest.Stamped
	rd *ringbuf.Reader
}

// NewCounter loads a Counter for UDP destination port.
func NewCounter(port uint16) (*Counter, error) {
	prog, m, err := xdptest.Count(port)
	if err != nil {
		return nil, fmt.Errorf("gen: %w", err)
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
	if c.st != nil {
		c.rd.Close()
		return c.st.Close()
	}
	c.Prog.Close()
	return c.m.Close()
}
