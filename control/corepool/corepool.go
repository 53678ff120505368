// Package corepool hands out core addresses (docs/addressing.md) from the
// configured core_pool prefix: one per phone, for SAs and sec-agree
// registrations that do not name one.
//
// It owns only the walk through the prefix; which addresses are taken is
// the caller's answer (the SA database, or a config being loaded), so the
// pool keeps no copy of that state and cannot drift from it. It is not
// safe for concurrent use: callers serialise allocation with the add that
// makes the address taken.
package corepool

import (
	"errors"
	"fmt"
	"net/netip"
)

// ErrExhausted means every usable address of the pool is taken.
var ErrExhausted = errors.New("core_pool exhausted")

// Pool allocates addresses from a prefix.
type Pool struct {
	prefix netip.Prefix
	next   netip.Addr // where the next search starts
}

// New returns a pool over prefix. IPv4 pools skip the network and
// broadcast addresses of prefixes shorter than /31.
func New(prefix netip.Prefix) (*Pool, error) {
	if !prefix.IsValid() || prefix.Masked() != prefix {
		return nil, fmt.Errorf("core_pool: %s is not a canonical prefix", prefix)
	}
	if prefix.Addr().Is4In6() {
		return nil, fmt.Errorf("core_pool: %s: write IPv4 prefixes as a.b.c.d/n", prefix)
	}
	return &Pool{prefix: prefix, next: first(prefix)}, nil
}

// Prefix is the pool's prefix.
func (p *Pool) Prefix() netip.Prefix { return p.prefix }

// Contains says whether a is in the pool's prefix.
func (p *Pool) Contains(a netip.Addr) bool { return p.prefix.Contains(a) }

func first(prefix netip.Prefix) netip.Addr {
	a := prefix.Addr()
	if a.Is4() && prefix.Bits() < 31 {
		a = a.Next() // skip the network address
	}
	return a
}

func (p *Pool) usable(a netip.Addr) bool {
	if !a.IsValid() || !p.prefix.Contains(a) {
		return false
	}
	if a.Is4() && p.prefix.Bits() < 31 {
		// The broadcast address: the next one leaves the prefix.
		if n := a.Next(); !p.prefix.Contains(n) {
			return false
		}
	}
	return true
}

// Next returns the first address after the previous allocation that
// taken does not report, wrapping around once. Walking on instead of
// restarting at the bottom keeps an address just released (a deleted
// registration) unused for as long as possible, so a late packet for the
// old phone cannot reach a new one. Sizes: a pool of n addresses serves
// n phones; the search costs the run of taken addresses it crosses.
func (p *Pool) Next(taken func(netip.Addr) bool) (netip.Addr, error) {
	start := p.next
	a := start
	for {
		if p.usable(a) && !taken(a) {
			p.next = a.Next()
			if !p.usable(p.next) {
				p.next = first(p.prefix)
			}
			return a, nil
		}
		a = a.Next()
		if !p.usable(a) {
			a = first(p.prefix)
		}
		if a == start {
			return netip.Addr{}, fmt.Errorf("%w: every address of %s is taken", ErrExhausted, p.prefix)
		}
	}
}

// FromMiddle makes the next search start in the middle of the prefix.
// The daemon allocates at run time (API, sec-agree) from the middle and
// the config loader from the bottom: config SAs are allocated afresh at
// every start, in file order, and must not land on an address a stored
// API SA already holds.
func (p *Pool) FromMiddle() *Pool {
	a := p.prefix.Addr()
	b := a.AsSlice()
	bit := p.prefix.Bits() // the first host bit
	if bit < len(b)*8 {
		b[bit/8] |= 0x80 >> (bit % 8)
		a, _ = netip.AddrFromSlice(b)
		if p.usable(a) {
			p.next = a
		}
	}
	return p
}
