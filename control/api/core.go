package api

import (
	"fmt"
	"net/netip"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// needsCore says whether an SA added without inner.core gets one from
// core_pool: tunnel mode with one phone address as inner.peer, or
// transport mode (which cannot work without one) of the pool's family.
func (s *Server) needsCore(x *sa.SA) bool {
	if s.pool == nil || x.Core.IsValid() {
		return false
	}
	v4 := s.pool.Prefix().Addr().Is4()
	if x.Mode == sa.Transport {
		return x.Local.Is4() == v4
	}
	return x.Mode == sa.Tunnel && x.InnerPeer.IsSingleIP() && x.InnerPeer.Addr().Is4() == v4
}

// addWithCore adds an SA from POST /v1/sas, giving it a core address
// when core_pool is set and it names none: its partner's (same peer,
// encap port and inner peer) when that already has one, so both SAs of a
// pair share it, else a fresh one.
func (s *Server) addWithCore(in sa.SA) (sad.Record, error) {
	if !s.needsCore(&in) {
		return s.sad.Add(in)
	}
	s.coreMu.Lock()
	defer s.coreMu.Unlock()
	core, err := s.coreFor(netip.AddrPortFrom(in.Peer, encapPort(&in)), in.InnerPeer, []sa.SA{in})
	if err != nil {
		return sad.Record{}, err
	}
	in.Core = core
	return s.sad.Add(in)
}

func encapPort(x *sa.SA) uint16 {
	if x.Encap != nil {
		return x.Encap.PeerPort
	}
	return 0
}

// coreFor returns the core address for the phone at peer with inner
// address inner whose new SAs are sas: the one its current SAs use when
// the new SAs' selectors do not overlap those (a re-registration keeps
// its address toward the core), else the next free one of the pool. So
// allocation never creates an ambiguous pair. Callers hold coreMu.
func (s *Server) coreFor(peer netip.AddrPort, inner netip.Prefix, sas []sa.SA) (netip.Addr, error) {
	if cur, ok := s.sad.CoreOf(peer, inner); ok && s.fits(cur, sas) {
		return cur, nil
	}
	for range 64 {
		a, err := s.pool.Next(s.sad.CoreInUse)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%w: %w", sad.ErrFull, err)
		}
		// A free pool address can still be inside another SA's selectors
		// (an operator's inner.peer prefix, say): skip those.
		if s.fits(a, sas) {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("core_pool %s: 64 free addresses in a row overlap other SAs' selectors: %w", s.pool.Prefix(), sad.ErrOverlap)
}

// fits says whether sas, given core address a, overlap no SA in the SAD.
func (s *Server) fits(a netip.Addr, sas []sa.SA) bool {
	for _, x := range sas {
		x.Core = a
		if s.sad.Overlap(&x) != nil {
			return false
		}
	}
	return true
}
