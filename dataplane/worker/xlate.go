package worker

import (
	"encoding/binary"
	"net/netip"

	"github.com/xesp/xesp/internal/pkt"
)

// Core-address translation and outbound SA selection (docs/addressing.md).
// Kept apart from the pipeline so the per-packet steps read as calls:
// decapOne calls xlateIn, encapOne calls outSelect then xlateOut.

// selKey is the destination part of an outbound entry's selectors as
// byPorts keys it: its core address when it has one (phones sharing an
// inner address differ there), else its inner peer prefix.
func (e *Slot) selKey() netip.Prefix {
	if c := e.Core(); c.IsValid() {
		return netip.PrefixFrom(c, c.BitLen())
	}
	return e.InnerPeer()
}

// outSelect checks the cleartext ip against the selectors of e, the
// outbound entry XDP steered it to (outSelectors: destination is the core
// address when e has one), and returns the entry that seals it: e
// itself, or another outbound entry of the same phone on this worker
// whose selectors match (XDP keys by destination port only; a phone's SA
// sets may differ by local port, e.g. a re-registration's new set beside
// the current one). Nothing is ever sealed with an SA whose selectors the
// packet does not match: DropPolicy.
func (p *pipeline) outSelect(e *Slot, ip []byte) (*Slot, Drop) {
	if e.outSelectors(ip) {
		return e, 0
	}
	key := e.selKey()
	if key.IsValid() && !key.Contains(dstAddr(ip)) {
		return nil, DropPolicy // every alternate shares e's destination
	}
	sp, dp, ok := l4Ports(ip)
	if !ok {
		return nil, DropPolicy
	}
	k := portKey{key, sp, dp}
	alt := p.byPorts[k]
	if alt == nil {
		k.port = 0
		alt = p.byPorts[k]
	}
	if alt == nil {
		k.local, k.port = 0, dp
		alt = p.byPorts[k]
	}
	if alt == nil || alt == e || !alt.outSelectors(ip) {
		return nil, DropPolicy
	}
	if alt.expired() {
		// The steered entry's lifetime was checked; the one that
		// seals must be within its own.
		return nil, DropLifetime
	}
	return alt, 0
}

// xlateIn rewrites the inner source of a decapsulated packet, the
// phone's own address, to its core address. Called only after the
// packet passed authentication, the replay check and the inbound
// selectors on its real addresses.
func xlateIn(e *Slot, ip []byte) Drop {
	if !e.hasCore() {
		return 0
	}
	if !rewriteAddr(ip, true, e.Core()) {
		return DropXlate
	}
	return 0
}

// xlateOut rewrites the destination of cleartext for a phone, its core
// address, back to the phone's inner address before sealing.
func xlateOut(e *Slot, ip []byte) Drop {
	if !e.hasCore() {
		return 0
	}
	if !rewriteAddr(ip, false, e.inner()) {
		return DropXlate
	}
	return 0
}

// rewriteAddr replaces the source (src) or destination address of the IP
// packet ip by to, of the same family, and fixes the IPv4 header checksum
// and the UDP, TCP (and ICMPv6) checksum, whose pseudo-header holds the
// address, incrementally (RFC 1624). It reports false when it cannot fix
// the transport checksum: IPv6 extension headers before it, or a
// transport header cut short. Allocation-free.
func rewriteAddr(ip []byte, src bool, to netip.Addr) bool {
	if len(ip) < 1 {
		return false
	}
	switch ip[0] >> 4 {
	case 4:
		if len(ip) < 20 || !to.Is4() {
			return false
		}
		off := 16
		if src {
			off = 12
		}
		var old [4]byte
		copy(old[:], ip[off:off+4])
		a := to.As4()
		if old == a {
			return true
		}
		copy(ip[off:off+4], a[:])
		binary.BigEndian.PutUint16(ip[10:], pkt.Update(binary.BigEndian.Uint16(ip[10:]), old[:], a[:]))
		if binary.BigEndian.Uint16(ip[6:])&0x1fff != 0 {
			return true // a later fragment: no transport header
		}
		return fixL4(ip, ip[9], int(ip[0]&0x0f)*4, old[:], a[:], false)
	case 6:
		if len(ip) < 40 || !to.Is6() {
			return false
		}
		off := 24
		if src {
			off = 8
		}
		var old [16]byte
		copy(old[:], ip[off:off+16])
		a := to.As16()
		if old == a {
			return true
		}
		copy(ip[off:off+16], a[:])
		switch ip[6] {
		case 0, 43, 44, 50, 51, 60, 135, 139, 140:
			// The checksummed header sits behind extension headers
			// (or is encrypted): not walked here.
			return false
		}
		return fixL4(ip, ip[6], 40, old[:], a[:], true)
	}
	return false
}

// fixL4 updates the transport checksum at l4 for an address change in
// the pseudo-header.
func fixL4(ip []byte, proto byte, l4 int, old, new []byte, v6 bool) bool {
	var at int
	switch {
	case proto == 17:
		at = l4 + 6
	case proto == 6:
		at = l4 + 16
	case proto == 58 && v6:
		at = l4 + 2
	default:
		return true // no pseudo-header checksum (ICMPv4, SCTP, ...)
	}
	if len(ip) < at+2 {
		return false
	}
	c := binary.BigEndian.Uint16(ip[at:])
	if proto == 17 && c == 0 && !v6 {
		return true // IPv4 UDP without a checksum stays without
	}
	c = pkt.Update(c, old, new)
	if proto == 17 && c == 0 {
		c = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	binary.BigEndian.PutUint16(ip[at:], c)
	return true
}
