package maps

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// XSKs is one side's AF_XDP socket map (XSKMAP), indexed
// rx_queue * workers + worker (see Index).
type XSKs struct {
	m *ebpf.Map
}

// NewXSKs wraps xsks_public or xsks_private.
func NewXSKs(m *ebpf.Map) (*XSKs, error) {
	if err := check(m, "xsk", ebpf.XSKMap, 4, 4); err != nil {
		return nil, err
	}
	return &XSKs{m: m}, nil
}

// Map returns the underlying map.
func (x *XSKs) Map() *ebpf.Map { return x.m }

// Capacity is the number of slots (queues * workers must fit).
func (x *XSKs) Capacity() uint32 { return x.m.MaxEntries() }

// Index is the slot the XDP programs redirect to for a packet received on
// rxQueue and owned by worker, with workers sockets per queue.
func Index(rxQueue uint32, workers, worker uint16) uint32 {
	if workers == 0 {
		workers = 1
	}
	return rxQueue*uint32(workers) + uint32(worker)
}

// Set puts the AF_XDP socket fd at index. The kernel refuses sockets that
// are not yet bound with an RX ring.
func (x *XSKs) Set(index uint32, fd int) error {
	if err := x.m.Put(index, uint32(fd)); err != nil {
		return fmt.Errorf("xsk map %s: set slot %d to fd %d: %w", x.m, index, fd, err)
	}
	return nil
}

// Delete empties slot index; packets steered there are then dropped and
// counted as no_xsk. Emptying an empty slot succeeds (kernel behaviour).
func (x *XSKs) Delete(index uint32) error {
	if err := x.m.Delete(index); err != nil {
		return fmt.Errorf("xsk map %s: delete slot %d: %w", x.m, index, err)
	}
	return nil
}
