package maps

import (
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// Cores is the exact-match outbound map xesp_private reads before the
// policy trie: (core address, destination port) -> bpf.Policy, port 0
// for an SA without a peer port selector (xesp.h, docs/addressing.md);
// with core_cfg, the kinds of entries it holds.
type Cores struct {
	m, cfg *ebpf.Map
}

// NewCores wraps the cores and core_cfg maps.
func NewCores(m, cfg *ebpf.Map) (*Cores, error) {
	if err := check(m, "cores", ebpf.Hash, uint32(unsafe.Sizeof(bpf.CoreKey{})), uint32(unsafe.Sizeof(bpf.Policy{}))); err != nil {
		return nil, err
	}
	if err := check(cfg, "core_cfg", ebpf.Array, 4, uint32(unsafe.Sizeof(bpf.CoreCfg{}))); err != nil {
		return nil, err
	}
	return &Cores{m: m, cfg: cfg}, nil
}

// Kinds returns the bpf.CoreFlag* bits set: the lookups xesp_private makes.
func (c *Cores) Kinds() (uint32, error) {
	var v bpf.CoreCfg
	if err := c.cfg.Lookup(uint32(0), &v); err != nil {
		return 0, fmt.Errorf("core_cfg map: get: %w", err)
	}
	return v.Flags, nil
}

// SetKinds replaces the bpf.CoreFlag* bits.
func (c *Cores) SetKinds(flags uint32) error {
	if err := c.cfg.Put(uint32(0), bpf.CoreCfg{Flags: flags}); err != nil {
		return fmt.Errorf("core_cfg map: set: %w", err)
	}
	return nil
}

// Map returns the underlying map.
func (c *Cores) Map() *ebpf.Map { return c.m }

// CoreKey is the key of core address a and destination port (host
// order; 0: any port). IPv4 addresses are stored IPv4-mapped, as in the
// trie.
func CoreKey(a netip.Addr, port uint16) (bpf.CoreKey, error) {
	if !a.IsValid() {
		return bpf.CoreKey{}, fmt.Errorf("invalid core address %v", a)
	}
	k := bpf.CoreKey{Addr: a.As16()}
	// The C side compares the port as the packet carries it (network
	// order) through a __be16 that bpf2go types as a native uint16.
	*(*[2]byte)(unsafe.Pointer(&k.Port)) = [2]byte{byte(port >> 8), byte(port)}
	return k, nil
}

// Put inserts or replaces the entry for (a, port).
func (c *Cores) Put(a netip.Addr, port uint16, pol bpf.Policy) error {
	k, err := CoreKey(a, port)
	if err != nil {
		return fmt.Errorf("cores map: put: %w", err)
	}
	if err := c.m.Put(&k, &pol); err != nil {
		return fmt.Errorf("cores map: put %v port %d: %w", a, port, err)
	}
	return nil
}

// Delete removes the entry for (a, port).
func (c *Cores) Delete(a netip.Addr, port uint16) error {
	k, err := CoreKey(a, port)
	if err != nil {
		return fmt.Errorf("cores map: delete: %w", err)
	}
	if err := c.m.Delete(&k); err != nil {
		return fmt.Errorf("cores map: delete %v port %d: %w", a, port, err)
	}
	return nil
}

// Lookup returns the entry for exactly (a, port).
func (c *Cores) Lookup(a netip.Addr, port uint16) (bpf.Policy, error) {
	var pol bpf.Policy
	k, err := CoreKey(a, port)
	if err != nil {
		return pol, fmt.Errorf("cores map: lookup: %w", err)
	}
	if err := c.m.Lookup(&k, &pol); err != nil {
		return pol, fmt.Errorf("cores map: lookup %v port %d: %w", a, port, err)
	}
	return pol, nil
}

// Walk calls f for every core-address entry until f returns false, in
// batches (walkBatch).
func (c *Cores) Walk(f func(k *bpf.CoreKey, pol *bpf.Policy) bool) error {
	return walkBatch(c.m, "cores map", f)
}
