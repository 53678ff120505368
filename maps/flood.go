package maps

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// Flood is the flood-budget maps (bpf/xesp.h "Flood budgets"): the
// workers' spent budgets per SA and per foreign source, and what
// xesp_public dropped for them per SA. It implements flood.Publisher.
type Flood struct {
	sas, srcs, drops *ebpf.Map
}

// NewFlood wraps flood_sas, flood_srcs and flood_drops.
func NewFlood(sas, srcs, drops *ebpf.Map) (*Flood, error) {
	if err := check(sas, "flood_sas", ebpf.LRUHash, 4, uint32(unsafe.Sizeof(bpf.FloodSA{}))); err != nil {
		return nil, err
	}
	if err := check(srcs, "flood_srcs", ebpf.LRUHash, uint32(unsafe.Sizeof(bpf.FloodSrcKey{})), uint32(unsafe.Sizeof(bpf.FloodSrc{}))); err != nil {
		return nil, err
	}
	if err := check(drops, "flood_drops", ebpf.Hash, 4, 8); err != nil {
		return nil, err
	}
	return &Flood{sas: sas, srcs: srcs, drops: drops}, nil
}

// PutSA publishes SA spi's spent budget and current binding.
func (f *Flood) PutSA(spi uint32, v *bpf.FloodSA) error {
	if err := f.sas.Update(spi, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("flood_sas: put 0x%08x: %w", spi, err)
	}
	return nil
}

// PutSrc publishes a foreign source's spent budget.
func (f *Flood) PutSrc(k *bpf.FloodSrcKey, v *bpf.FloodSrc) error {
	if err := f.srcs.Update(k, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("flood_srcs: put: %w", err)
	}
	return nil
}

// LookupSA returns what XDP holds for SA spi.
func (f *Flood) LookupSA(spi uint32) (bpf.FloodSA, error) {
	var v bpf.FloodSA
	err := f.sas.Lookup(spi, &v)
	return v, err
}

// Drops returns the packets XDP dropped for SA spi's budgets (0 if none).
func (f *Flood) Drops(spi uint32) (uint64, error) {
	var n uint64
	if err := f.drops.Lookup(spi, &n); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, fmt.Errorf("flood_drops: 0x%08x: %w", spi, err)
	}
	return n, nil
}

// AllDrops calls fn for every SA XDP dropped packets for, by SPI.
func (f *Flood) AllDrops(fn func(spi uint32, drops uint64)) error {
	var spi uint32
	var n uint64
	it := f.drops.Iterate()
	for it.Next(&spi, &n) {
		fn(spi, n)
	}
	return it.Err()
}
