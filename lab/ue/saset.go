package ue

import (
	"errors"
	"fmt"

	"github.com/xesp/xesp/dataplane/esp"
)

// maxTailroom bounds what sealing appends to a payload under any proposal
// (padding to a 16-byte block, pad length, next header, a 16-byte ICV),
// so the TX buffer is planned once, before any SA exists.
const maxTailroom = 64

// saSet is the tunnel's SAs at one moment. It is never modified once
// published: a change builds a new set and swaps the pointer, so the
// packet loops read it with one atomic load and no lock.
type saSet struct {
	out *esp.Transform   // seals every TUN packet; nil: none yet
	in  []*esp.Transform // open the gateway's ESP, looked up by SPI
}

// lookupIn finds the inbound SA for spi. A phone holds one or two (two
// while a rekey overlaps), so a scan beats a map.
func (s *saSet) lookupIn(spi uint32) *esp.Transform {
	for _, sa := range s.in {
		if sa.SPI() == spi {
			return sa
		}
	}
	return nil
}

// Errors of the SA changes; the phone's API maps them to HTTP statuses.
var (
	ErrSAExists   = errors.New("an SA with this SPI and direction is already installed")
	ErrSANotFound = errors.New("no such SA")
	ErrSAMode     = errors.New("SA mode differs from the tunnel's")
)

// Mode is the ESP mode of every SA the tunnel holds.
func (t *Tunnel) Mode() esp.Mode { return t.mode }

// SAs returns the installed outbound SA (nil if none) and inbound SAs.
// The caller must not use them to seal or open: the tunnel's loops are
// their only writers.
func (t *Tunnel) SAs() (out *esp.Transform, in []*esp.Transform) {
	s := t.sas.Load()
	return s.out, s.in
}

// SetOut installs s as the outbound SA. An outbound SA already installed
// is replaced (a rekey): packets sealed from the next one on use s, none
// is lost or sealed twice. s must be new to the tunnel: installing an SA
// object or SPI that is current would restart its sequence counter, and
// under the same key that reuses GCM IVs.
func (t *Tunnel) SetOut(s *esp.Transform) (replaced *esp.Transform, err error) {
	if err := t.check(s); err != nil {
		return nil, err
	}
	t.sasMu.Lock()
	defer t.sasMu.Unlock()
	cur := t.sas.Load()
	if cur.out != nil && (cur.out == s || cur.out.SPI() == s.SPI()) {
		return nil, fmt.Errorf("outbound SPI 0x%08x: %w (delete it first, or rekey with a new SPI)", s.SPI(), ErrSAExists)
	}
	t.sas.Store(&saSet{out: s, in: cur.in})
	return cur.out, nil
}

// AddIn installs s as an inbound SA next to those already there: during a
// rekey the old inbound SA keeps opening until it is deleted.
func (t *Tunnel) AddIn(s *esp.Transform) error {
	if err := t.check(s); err != nil {
		return err
	}
	t.sasMu.Lock()
	defer t.sasMu.Unlock()
	cur := t.sas.Load()
	if cur.lookupIn(s.SPI()) != nil {
		return fmt.Errorf("inbound SPI 0x%08x: %w", s.SPI(), ErrSAExists)
	}
	in := make([]*esp.Transform, len(cur.in), len(cur.in)+1)
	copy(in, cur.in)
	t.sas.Store(&saSet{out: cur.out, in: append(in, s)})
	return nil
}

// DeleteOut removes the outbound SA if its SPI is spi; TUN packets are
// then dropped (no_sa) until another is set.
func (t *Tunnel) DeleteOut(spi uint32) (*esp.Transform, error) {
	t.sasMu.Lock()
	defer t.sasMu.Unlock()
	cur := t.sas.Load()
	if cur.out == nil || cur.out.SPI() != spi {
		return nil, fmt.Errorf("outbound SPI 0x%08x: %w", spi, ErrSANotFound)
	}
	t.sas.Store(&saSet{in: cur.in})
	return cur.out, nil
}

// DeleteIn removes the inbound SA with this SPI; ESP under it is then
// dropped (unknown_spi).
func (t *Tunnel) DeleteIn(spi uint32) (*esp.Transform, error) {
	t.sasMu.Lock()
	defer t.sasMu.Unlock()
	cur := t.sas.Load()
	gone := cur.lookupIn(spi)
	if gone == nil {
		return nil, fmt.Errorf("inbound SPI 0x%08x: %w", spi, ErrSANotFound)
	}
	in := make([]*esp.Transform, 0, len(cur.in))
	for _, s := range cur.in {
		if s != gone {
			in = append(in, s)
		}
	}
	t.sas.Store(&saSet{out: cur.out, in: in})
	return gone, nil
}

func (t *Tunnel) check(s *esp.Transform) error {
	if s == nil {
		return errors.New("tunnel: nil SA")
	}
	if s.Mode() != t.mode {
		return fmt.Errorf("SPI 0x%08x is %s mode, the tunnel %s mode: %w", s.SPI(), s.Mode(), t.mode, ErrSAMode)
	}
	return nil
}
