package manager

import (
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/sa"
)

// PruneStale removes from the BPF maps every inbound SA and outbound
// policy (trie or cores map entry) this manager has not published: what a previous process left in
// adopted (pinned) maps for SAs the new SA database does not hold, e.g.
// SAs that process got through its API. Left there, XDP would keep
// steering their packets to worker slots that are empty or hold another
// SA. Call it after the first Sync, before Run.
func (m *Manager) PruneStale() (sas, policies int, err error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var stale []uint32
	werr := m.o.Maps.SAs.Walk(func(spi uint32, _ bpf.SASteer) bool {
		if m.live.get(sa.ID{Dir: sa.In, SPI: spi}) == nil {
			stale = append(stale, spi)
		}
		return true
	})
	var errs []error
	if werr != nil {
		errs = append(errs, werr)
	}
	for _, spi := range stale {
		if err := m.o.Maps.SAs.Delete(spi); err != nil {
			errs = append(errs, err)
			continue
		}
		sas++
	}

	var staleKeys []bpf.PolicyKey
	perr := m.o.Maps.Policies.Walk(func(k *bpf.PolicyKey, _ *bpf.Policy) bool {
		a := netip.AddrFrom16(k.Addr)
		bits := int(k.Prefixlen)
		if a.Is4In6() && bits >= 96 {
			a, bits = a.Unmap(), bits-96
		}
		if p := netip.PrefixFrom(a, bits); !p.IsValid() || m.policies[prefixKey(p.Masked())] == nil {
			staleKeys = append(staleKeys, *k)
		}
		return true
	})
	if perr != nil {
		errs = append(errs, perr)
	}
	for i := range staleKeys {
		if err := m.o.Maps.Policies.Map().Delete(&staleKeys[i]); err != nil {
			errs = append(errs, fmt.Errorf("policy map: delete stale entry: %w", err))
			continue
		}
		policies++
	}
	// The cores map likewise: exact-match entries of core addresses.
	var staleCores []bpf.CoreKey
	cerr := m.o.Maps.Cores.Walk(func(ck *bpf.CoreKey, _ *bpf.Policy) bool {
		a := netip.AddrFrom16(ck.Addr).Unmap()
		port := uint16((*[2]byte)(unsafe.Pointer(&ck.Port))[0])<<8 | uint16((*[2]byte)(unsafe.Pointer(&ck.Port))[1])
		if m.policies[coreKey(a, port)] == nil {
			staleCores = append(staleCores, *ck)
		}
		return true
	})
	if cerr != nil {
		errs = append(errs, cerr)
	}
	for i := range staleCores {
		if err := m.o.Maps.Cores.Map().Delete(&staleCores[i]); err != nil {
			errs = append(errs, fmt.Errorf("cores map: delete stale entry: %w", err))
			continue
		}
		policies++
	}
	return sas, policies, errors.Join(errs...)
}
