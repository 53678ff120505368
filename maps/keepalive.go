package maps

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// Keepalives is the keepalives map: the NAT bindings the manager
// registers, where XDP counts and stamps each binding's NAT-keepalives.
type Keepalives struct {
	m *ebpf.Map
}

// NewKeepalives wraps the keepalives map.
func NewKeepalives(m *ebpf.Map) (*Keepalives, error) {
	if err := check(m, "keepalives", ebpf.Hash, 20, 16); err != nil {
		return nil, err
	}
	return &Keepalives{m: m}, nil
}

// BindingKey is ap as the map's key: IPv4 as ::ffff:a.b.c.d, the port in
// network order (as XDP reads it from the UDP header).
func BindingKey(ap netip.AddrPort) bpf.BindingKey {
	a := ap.Addr().As16()
	p := ap.Port()
	return bpf.BindingKey{Addr: a, Port: p>>8 | p<<8}
}

// Add registers a binding; one already there keeps its figures.
func (k *Keepalives) Add(ap netip.AddrPort) error {
	key := BindingKey(ap)
	err := k.m.Update(&key, &bpf.Keepalive{}, ebpf.UpdateNoExist)
	if err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("keepalives: add %s: %w", ap, err)
	}
	return nil
}

// Delete forgets a binding; an absent one is no error.
func (k *Keepalives) Delete(ap netip.AddrPort) error {
	key := BindingKey(ap)
	if err := k.m.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("keepalives: delete %s: %w", ap, err)
	}
	return nil
}

// Lookup returns a binding's keepalive figures; false when it is not
// registered.
func (k *Keepalives) Lookup(ap netip.AddrPort) (bpf.Keepalive, bool) {
	key := BindingKey(ap)
	var v bpf.Keepalive
	if err := k.m.Lookup(&key, &v); err != nil {
		return v, false
	}
	return v, true
}

// Len counts the registered bindings (tests, diagnostics).
func (k *Keepalives) Len() int {
	n := 0
	var key bpf.BindingKey
	var v bpf.Keepalive
	it := k.m.Iterate()
	for it.Next(&key, &v) {
		n++
	}
	return n
}
