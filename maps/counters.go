package maps

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// Reason is why a packet got its verdict (enum xesp_reason); String gives
// the metric label.
type Reason = bpf.Reason

// Snapshot holds the counters summed over CPUs, indexed by Reason.
type Snapshot [bpf.NumReasons]bpf.Counter

// Sub returns s - prev per reason: the traffic between two reads.
func (s *Snapshot) Sub(prev *Snapshot) Snapshot {
	var d Snapshot
	for i := range s {
		d[i].Packets = s[i].Packets - prev[i].Packets
		d[i].Bytes = s[i].Bytes - prev[i].Bytes
	}
	return d
}

// Total is the sum over all reasons.
func (s *Snapshot) Total() bpf.Counter {
	var t bpf.Counter
	for _, c := range s {
		t.Packets += c.Packets
		t.Bytes += c.Bytes
	}
	return t
}

// Counters is the per-CPU verdict counter array.
type Counters struct {
	m      *ebpf.Map
	ncpu   int
	keys   []uint32      // 0..NumReasons-1, for one batch lookup
	perCPU []bpf.Counter // NumReasons * ncpu, reused by every Read
}

// NewCounters wraps the counters map.
func NewCounters(m *ebpf.Map) (*Counters, error) {
	if err := check(m, "counters", ebpf.PerCPUArray, 4, uint32(unsafe.Sizeof(bpf.Counter{}))); err != nil {
		return nil, err
	}
	if m.MaxEntries() != uint32(bpf.NumReasons) {
		return nil, fmt.Errorf("counters map: %d entries, the header has %d reasons", m.MaxEntries(), bpf.NumReasons)
	}
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("counters map: %w", err)
	}
	c := &Counters{m: m, ncpu: n, keys: make([]uint32, bpf.NumReasons), perCPU: make([]bpf.Counter, bpf.NumReasons*n)}
	for i := range c.keys {
		c.keys[i] = uint32(i)
	}
	return c, nil
}

// Read sums every reason's per-CPU counters into dst with one batch
// lookup. Not safe for concurrent use (it reuses one buffer).
func (c *Counters) Read(dst *Snapshot) error {
	var cursor ebpf.MapBatchCursor
	n, err := c.m.BatchLookup(&cursor, c.keys, c.perCPU, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("counters map: batch read: %w", err)
	}
	if n != len(dst) {
		return fmt.Errorf("counters map: batch read returned %d of %d reasons", n, len(dst))
	}
	for r := range dst {
		var sum bpf.Counter
		for _, v := range c.perCPU[r*c.ncpu : (r+1)*c.ncpu] {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		dst[r] = sum
	}
	return nil
}
