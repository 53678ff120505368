package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// Policies is the outbound policy LPM trie: inner destination prefix ->
// bpf.Policy. IPv4 prefixes are stored IPv4-mapped with prefixlen + 96, so
// one trie serves both families (xesp.h).
type Policies struct {
	m *ebpf.Map
}

// NewPolicies wraps the policies map.
func NewPolicies(m *ebpf.Map) (*Policies, error) {
	if err := check(m, "policies", ebpf.LPMTrie, uint32(unsafe.Sizeof(bpf.PolicyKey{})), uint32(unsafe.Sizeof(bpf.Policy{}))); err != nil {
		return nil, err
	}
	return &Policies{m: m}, nil
}

// Map returns the underlying map.
func (p *Policies) Map() *ebpf.Map { return p.m }

// PolicyKey is the trie key of prefix (host bits cleared).
func PolicyKey(prefix netip.Prefix) (bpf.PolicyKey, error) {
	if !prefix.IsValid() {
		return bpf.PolicyKey{}, fmt.Errorf("invalid prefix %v", prefix)
	}
	prefix = prefix.Masked()
	addr := prefix.Addr()
	bits := prefix.Bits()
	if addr.Is4() {
		bits += 96
	}
	// Mapped IPv6 addresses are the same destinations as IPv4 ones and
	// already have the right prefix length.
	return bpf.PolicyKey{Prefixlen: uint32(bits), Addr: addr.As16()}, nil
}

// Put inserts or replaces the policy for prefix.
func (p *Policies) Put(prefix netip.Prefix, pol bpf.Policy) error {
	k, err := PolicyKey(prefix)
	if err != nil {
		return fmt.Errorf("policy map: put: %w", err)
	}
	if err := p.m.Put(&k, &pol); err != nil {
		return fmt.Errorf("policy map: put %v: %w", prefix, err)
	}
	return nil
}

// PutBatch inserts or replaces prefixes[i] -> pols[i] with batch
// syscalls (the LPM trie takes BPF_MAP_UPDATE_BATCH since Linux 5.x),
// falling back to one update per entry where batches are not supported:
// one syscall per policy was most of a million-SA load's map time.
func (p *Policies) PutBatch(prefixes []netip.Prefix, pols []bpf.Policy) error {
	if len(prefixes) != len(pols) {
		return fmt.Errorf("policy map: put batch: %d prefixes, %d policies", len(prefixes), len(pols))
	}
	keys := make([]bpf.PolicyKey, len(prefixes))
	for i, pr := range prefixes {
		k, err := PolicyKey(pr)
		if err != nil {
			return fmt.Errorf("policy map: put batch: %w", err)
		}
		keys[i] = k
	}
	for lo := 0; lo < len(keys); lo += batchChunk {
		hi := min(lo+batchChunk, len(keys))
		_, err := p.m.BatchUpdate(keys[lo:hi], pols[lo:hi], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := lo; i < hi; i++ {
				if err := p.Put(prefixes[i], pols[i]); err != nil {
					return err
				}
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("policy map: put batch [%d,%d): %w", lo, hi, err)
		}
	}
	return nil
}

// Delete removes the policy for exactly prefix.
func (p *Policies) Delete(prefix netip.Prefix) error {
	k, err := PolicyKey(prefix)
	if err != nil {
		return fmt.Errorf("policy map: delete: %w", err)
	}
	if err := p.m.Delete(&k); err != nil {
		return fmt.Errorf("policy map: delete %v: %w", prefix, err)
	}
	return nil
}

// Lookup returns the policy of the longest prefix containing addr, as the
// XDP program would find it.
func (p *Policies) Lookup(addr netip.Addr) (bpf.Policy, error) {
	var pol bpf.Policy
	k, err := PolicyKey(netip.PrefixFrom(addr, addr.BitLen()))
	if err != nil {
		return pol, fmt.Errorf("policy map: lookup: %w", err)
	}
	if err := p.m.Lookup(&k, &pol); err != nil {
		return pol, fmt.Errorf("policy map: lookup %v: %w", addr, err)
	}
	return pol, nil
}

// Walk calls f for every trie entry (key as stored: IPv4 mapped, prefix
// length + 96) until f returns false, in batches (walkBatch). Entries
// changed during the walk may be seen or missed.
func (p *Policies) Walk(f func(k *bpf.PolicyKey, pol *bpf.Policy) bool) error {
	return walkBatch(p.m, "policy map", f)
}
