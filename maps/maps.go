// Package maps gives typed access to xesp's BPF maps: inbound SAs, outbound
// policy, the two AF_XDP socket maps, the config and the verdict counters.
// Keys and values are the Go types bpf2go generates from bpf/xesp.h; no
// byte offsets are written by hand here.
//
// It is shared by the loader, the manager and the CLI. It reads and writes
// map contents only: it must not load programs, attach, pin or unpin
// anything.
package maps

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// ErrNotFound is returned (wrapped) by lookups of absent keys.
var ErrNotFound = ebpf.ErrKeyNotExist

// Set is every map of one loaded xesp instance.
type Set struct {
	SAs        *SAs
	Policies   *Policies
	Cores      *Cores
	XSKPublic  *XSKs // read by xesp_public
	XSKPrivate *XSKs // read by xesp_private
	Config     *Config
	Counters   *Counters
	Flood      *Flood // flood budgets (issue 18)
	// Keepalives is nil for pins of a version without the map (Open).
	Keepalives *Keepalives

	owned []*ebpf.Map // closed by Close when the Set opened them
}

// New wraps maps loaded by the loader. The Set does not own them.
func New(m *bpf.XespMaps) (*Set, error) {
	s, err := newSet(m.Sas, m.Policies, m.XsksPublic, m.XsksPrivate, m.Config, m.Counters, m.Cores, m.CoreCfg)
	if err != nil {
		return nil, err
	}
	if s.Flood, err = NewFlood(m.FloodSas, m.FloodSrcs, m.FloodDrops); err != nil {
		return nil, err
	}
	if s.Keepalives, err = NewKeepalives(m.Keepalives); err != nil {
		return nil, err
	}
	return s, nil
}

// Open opens the maps pinned in dir (the loader's per-instance directory)
// by their names in xesp.h. Close releases them; the pins stay.
func Open(dir string) (*Set, error) {
	names := []string{bpf.XespMapSas, bpf.XespMapPolicies, bpf.XespMapXsksPublic,
		bpf.XespMapXsksPrivate, bpf.XespMapConfig, bpf.XespMapCounters, bpf.XespMapCores, bpf.XespMapCoreCfg,
		bpf.XespMapFloodSas, bpf.XespMapFloodSrcs, bpf.XespMapFloodDrops}
	ms := make([]*ebpf.Map, 0, len(names))
	for _, n := range names {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, n), nil)
		if err != nil {
			for _, o := range ms {
				o.Close()
			}
			return nil, fmt.Errorf("open pinned map %s in %s: %w", n, dir, err)
		}
		ms = append(ms, m)
	}
	s, err := newSet(ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6], ms[7])
	if err == nil {
		s.Flood, err = NewFlood(ms[8], ms[9], ms[10])
	}
	if err != nil {
		for _, o := range ms {
			o.Close()
		}
		return nil, fmt.Errorf("pinned maps in %s: %w", dir, err)
	}
	s.owned = ms
	return s, nil
}

// Close closes the maps the Set opened itself (Open); for New it does
// nothing, the loader owns those.
func (s *Set) Close() error {
	var errs []error
	for _, m := range s.owned {
		errs = append(errs, m.Close())
	}
	s.owned = nil
	return errors.Join(errs...)
}

func newSet(sas, pol, xpub, xpriv, cfg, ctr, cores, coreCfg *ebpf.Map) (*Set, error) {
	s := &Set{}
	var err error
	if s.SAs, err = NewSAs(sas); err != nil {
		return nil, err
	}
	if s.Policies, err = NewPolicies(pol); err != nil {
		return nil, err
	}
	if s.Cores, err = NewCores(cores, coreCfg); err != nil {
		return nil, err
	}
	if s.XSKPublic, err = NewXSKs(xpub); err != nil {
		return nil, err
	}
	if s.XSKPrivate, err = NewXSKs(xpriv); err != nil {
		return nil, err
	}
	if s.Config, err = NewConfig(cfg); err != nil {
		return nil, err
	}
	if s.Counters, err = NewCounters(ctr); err != nil {
		return nil, err
	}
	return s, nil
}

// check refuses a map whose shape is not what the typed view assumes, so a
// wrong map (or a stale pin from another layout) fails early and loudly.
func check(m *ebpf.Map, what string, typ ebpf.MapType, key, value uint32) error {
	if m == nil {
		return fmt.Errorf("%s map: nil", what)
	}
	if m.Type() != typ || m.KeySize() != key || m.ValueSize() != value {
		return fmt.Errorf("%s map: is %s key %d value %d, want %s key %d value %d",
			what, m.Type(), m.KeySize(), m.ValueSize(), typ, key, value)
	}
	return nil
}
