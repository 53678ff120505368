package maps

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// Barrier waits for the BPF programs running on any CPU to finish: after
// Wait returns, no XDP run that started before the call is still going,
// so none can still act on a map value deleted before it. The kernel
// gives this for updates of map-in-map types: it calls synchronize_rcu()
// before returning, because a program may still hold the inner map it
// looked up (kernel/bpf/syscall.c, maybe_wait_bpf_programs). XDP runs
// inside the NAPI poll with bottom halves off, an RCU read-side section,
// and AF_XDP redirects are flushed before that poll ends, so after Wait
// every frame an earlier XDP run redirected is in its socket's RX ring.
type Barrier struct {
	outer, inner *ebpf.Map
}

// NewBarrier creates the two small maps a Barrier updates.
func NewBarrier() (*Barrier, error) {
	innerSpec := &ebpf.MapSpec{Name: "xesp_rcu_inner", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	inner, err := ebpf.NewMap(innerSpec)
	if err != nil {
		return nil, fmt.Errorf("create barrier inner map: %w", err)
	}
	outer, err := ebpf.NewMap(&ebpf.MapSpec{Name: "xesp_rcu", Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 1, InnerMap: innerSpec})
	if err != nil {
		inner.Close()
		return nil, fmt.Errorf("create barrier map: %w", err)
	}
	return &Barrier{outer: outer, inner: inner}, nil
}

// Wait returns after an RCU grace period.
func (b *Barrier) Wait() error {
	if err := b.outer.Put(uint32(0), b.inner); err != nil {
		return fmt.Errorf("wait for running BPF programs: %w", err)
	}
	return nil
}

// Close releases the maps.
func (b *Barrier) Close() error {
	b.outer.Close()
	return b.inner.Close()
}
