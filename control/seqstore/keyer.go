package seqstore

import (
	"errors"
	"net/netip"
)

// Keyer derives record keys (KeyFor) under a secret kept elsewhere, for
// stores other than the local log that must name SAs exactly as it does,
// such as a fleet-wide one whose secret all gateways share.
type Keyer struct{ s Store }

// NewKeyer returns a Keyer for secret (32 random bytes, made once per
// store and never changed: a new secret restarts every SA at 1).
func NewKeyer(secret []byte) *Keyer {
	return &Keyer{s: Store{macs: newMACPool(secret)}}
}

// KeyFor is Store.KeyFor under the Keyer's secret.
func (k *Keyer) KeyFor(dir string, spi uint32, peer netip.AddrPort, proposal string, encKey, authKey []byte) Key {
	return k.s.KeyFor(dir, spi, peer, proposal, encKey, authKey)
}

// ErrFenced is what a shared store (one several gateways reserve in)
// returns when the range asked for is no longer this gateway's to take:
// another gateway reserved past the mark this one built on. Retrying the
// same reservation cannot succeed; the SA must be installed afresh.
var ErrFenced = errors.New("sequence mark moved by another gateway")
