package worker

import (
	"encoding/binary"
	"net/netip"

	cksum "github.com/xesp/xesp/internal/pkt"
)

// What the gateway does as an IP router between the phones' tunnels and
// the core, apart from the ESP work: RFC 4301 selectors both ways, the
// tunnel's DSCP/ECN (RFC 4301 5.1.2.1, RFC 6040 normal mode), the inner
// TTL/hop limit, and the ICMP errors a router owes the sender (Time
// Exceeded, Fragmentation Needed / Packet Too Big), rate-limited. Each is
// a small function over the phone's real inner addresses, so the core-
// address rewrite (issue 12) can sit between them and the ESP engine.

// ipProto is the protocol of an IPv4 packet or the first next header of an
// IPv6 one (extension headers are not walked: a selector naming UDP or
// TCP then does not match, which drops rather than guesses).
func ipProto(ip []byte) uint8 {
	if ip[0]>>4 == 4 {
		return ip[9]
	}
	return ip[6]
}

// l4Match applies the protocol and port selectors to ip, sent from the
// srcSel port to the dstSel port (0: any).
func (e *Slot) l4Match(ip []byte, srcSel, dstSel uint16) bool {
	if e.Proto == 0 && srcSel == 0 && dstSel == 0 {
		return true
	}
	if e.Proto != 0 && ipProto(ip) != e.Proto {
		return false
	}
	return srcSel == 0 && dstSel == 0 || portsMatch(ip, srcSel, dstSel)
}

// inSelectors says whether a decrypted inner packet may leave an inbound
// SA (RFC 4301 5.2 step 4): from the phone's side (InnerPeer, PortPeer)
// to this side (InnerLocal, PortLocal), of the SA's protocol. Otherwise an
// authenticated phone could reach any host on the core side, or claim
// another phone's address.
func (e *Slot) inSelectors(ip []byte) bool {
	if e.ipBits != 0 && !within(ip, false, &e.innerPeer, e.fams&famPeer4 != 0, int(e.ipBits)-1) {
		return false
	}
	if il := &e.Scope().InnerLocal; il.IsValid() && !il.Contains(dstAddr(ip)) {
		return false
	}
	return e.l4Match(ip, e.PortPeer, e.PortLocal)
}

// outSelectors says whether cleartext from the core may be sealed with an
// outbound SA (RFC 4301 5.1): from InnerLocal/PortLocal to the phone's
// core address (selKey; its InnerPeer when the SA has none)/PortPeer, of
// the SA's protocol. It runs before xlateOut: the core addresses the
// phone by its core address.
func (e *Slot) outSelectors(ip []byte) bool {
	switch {
	case e.fams&famCore4 != 0:
		if !within(ip, true, &e.core, true, 32) {
			return false
		}
	case e.fams&famCore6 != 0:
		if !within(ip, true, &e.core, false, 128) {
			return false
		}
	case e.ipBits != 0:
		if !within(ip, true, &e.innerPeer, e.fams&famPeer4 != 0, int(e.ipBits)-1) {
			return false
		}
	}
	if il := &e.Scope().InnerLocal; il.IsValid() && !il.Contains(srcAddr(ip)) {
		return false
	}
	return e.l4Match(ip, e.PortLocal, e.PortPeer)
}

// ECN codepoints (RFC 3168).
const (
	ecnNotECT = 0
	ecnECT1   = 1
	ecnECT0   = 2
	ecnCE     = 3
)

// tosOf is an IP packet's TOS byte (IPv4) or Traffic Class (IPv6).
func tosOf(ip []byte) uint8 {
	if ip[0]>>4 == 4 {
		return ip[1]
	}
	return ip[0]<<4 | ip[1]>>4
}

// setTOS rewrites the TOS/Traffic Class, fixing the IPv4 header checksum
// incrementally (RFC 1624).
func setTOS(ip []byte, tos uint8) {
	if ip[0]>>4 == 4 {
		old := [2]byte{ip[0], ip[1]}
		ip[1] = tos
		binary.BigEndian.PutUint16(ip[10:], cksum.Update(binary.BigEndian.Uint16(ip[10:]), old[:], ip[0:2]))
		return
	}
	ip[0] = 0x60 | tos>>4
	ip[1] = tos<<4 | ip[1]&0x0f
}

// decapECN combines the outer ECN field into the inner one (RFC 6040 4.2,
// normal mode): CE over ECT becomes CE, ECT(1) over ECT(0) becomes ECT(1),
// and CE over Not-ECT cannot be signalled to an endpoint that does not
// speak ECN, so the packet is dropped (ok false).
func decapECN(outer, inner uint8) (uint8, bool) {
	o, i := outer&3, inner&3
	switch {
	case o == ecnCE && i == ecnNotECT:
		return inner, false
	case o == ecnCE:
		return inner | ecnCE, true
	case o == ecnECT1 && i == ecnECT0:
		return inner&^3 | ecnECT1, true
	}
	return inner, true
}

// outerTOS is the outer TOS/Traffic Class for an inner one sealed with
// e: the SA's fixed DSCP, else the gateway's, else the inner DSCP copied
// (RFC 4301 5.1.2.1, the default); the inner ECN field is always copied
// (RFC 6040 4.1 normal mode).
func (p *pipeline) outerTOS(e *Slot, inner uint8) uint8 {
	switch {
	case e.FixDSCP:
		return e.DSCP<<2 | inner&3
	case p.fixDSCP:
		return p.dscp<<2 | inner&3
	}
	return inner
}

// decTTL decrements the TTL/hop limit of a packet being forwarded, fixing
// the IPv4 checksum incrementally; false when it is 1 or 0 and the packet
// must not be forwarded (RFC 1812 5.3.1, RFC 8200 3).
func decTTL(ip []byte) bool {
	if ip[0]>>4 == 4 {
		if ip[8] <= 1 {
			return false
		}
		old := [2]byte{ip[8], ip[9]}
		ip[8]--
		binary.BigEndian.PutUint16(ip[10:], cksum.Update(binary.BigEndian.Uint16(ip[10:]), old[:], ip[8:10]))
		return true
	}
	if ip[7] <= 1 {
		return false
	}
	ip[7]--
	return true
}

// ICMP errors the gateway sends.
type icmpKind uint8

const (
	icmpTimeExceeded icmpKind = iota // TTL/hop limit reached 1 here
	icmpTooBig                       // IPv4 Fragmentation Needed (DF) / IPv6 Packet Too Big
	numICMPKinds
)

var icmpKindNames = [numICMPKinds]string{"time_exceeded", "too_big"}

// String is the metric label.
func (k icmpKind) String() string { return icmpKindNames[k] }

// icmpLen is the length of the ICMP error about orig that putICMP writes:
// the IP and ICMP headers and as much of orig as RFC 1812 4.3.2.3 (576
// bytes in all) or RFC 4443 2.4 (1280) allows.
func icmpLen(orig []byte) int {
	if orig[0]>>4 == 4 {
		return 28 + min(len(orig), 576-28)
	}
	return 48 + min(len(orig), 1280-48)
}

// putICMP writes, at dst, an ICMP (IPv4) or ICMPv6 error of kind about
// orig (an IP packet from its header on) from src to orig's source, and
// returns its length (icmpLen). dst may overlap orig if it starts at or
// before it. mtu is the MTU a too_big error reports.
func putICMP(dst []byte, src netip.Addr, orig []byte, kind icmpKind, mtu int) int {
	v4 := orig[0]>>4 == 4
	hl := 48
	if v4 {
		hl = 28
	}
	n := icmpLen(orig)
	copy(dst[hl:n], orig) // first: dst may overlap orig
	to := srcAddr(orig)
	h, m := dst[:hl-8], dst[hl-8:n]
	var typ, code uint8
	var info uint32
	switch {
	case v4 && kind == icmpTimeExceeded:
		typ = 11
	case v4:
		typ, code, info = 3, 4, uint32(mtu&0xffff) // Fragmentation Needed and DF set
	case kind == icmpTimeExceeded:
		typ = 3
	default:
		typ, info = 2, uint32(mtu)
	}
	m[0], m[1], m[2], m[3] = typ, code, 0, 0
	binary.BigEndian.PutUint32(m[4:], info)
	if v4 {
		h[0], h[1] = 0x45, 0xc0 // CS6, as routers mark their own control traffic
		binary.BigEndian.PutUint16(h[2:], uint16(n))
		h[4], h[5], h[6], h[7] = 0, 0, 0, 0
		h[8], h[9], h[10], h[11] = 64, 1, 0, 0
		a, b := src.As4(), to.As4()
		copy(h[12:16], a[:])
		copy(h[16:20], b[:])
		binary.BigEndian.PutUint16(h[10:], cksum.Checksum(h))
		binary.BigEndian.PutUint16(m[2:], cksum.Checksum(m))
		return n
	}
	h[0], h[1], h[2], h[3] = 0x6c, 0, 0, 0 // traffic class CS6
	binary.BigEndian.PutUint16(h[4:], uint16(n-40))
	h[6], h[7] = 58, 64
	a, b := src.As16(), to.As16()
	copy(h[8:24], a[:])
	copy(h[24:40], b[:])
	acc := cksum.Sum(h[8:40], 0) + uint64(n-40) + 58
	binary.BigEndian.PutUint16(m[2:], ^cksum.Fold(cksum.Sum(m, acc)))
	return n
}

// limiter is a token bucket in integer nanoseconds: one ICMP error per
// interval on average, at most burst back to back. RFC 1812 4.3.2.8 and
// RFC 4443 2.4(f) require the limit so a flood of bad packets cannot turn
// the gateway into an amplifier.
type limiter struct {
	interval int64 // ns per token; 0: no ICMP at all
	burst    int64 // tokens the bucket holds
	credit   int64 // ns of accumulated credit
	last     int64
}

func newLimiter(perSecond int) limiter {
	if perSecond <= 0 {
		return limiter{}
	}
	iv := int64(1e9) / int64(perSecond)
	return limiter{interval: iv, burst: int64(max(perSecond/10, 1)), credit: iv * int64(max(perSecond/10, 1))}
}

func (l *limiter) allow(now int64) bool {
	if l.interval == 0 {
		return false
	}
	if l.last != 0 {
		l.credit = min(l.credit+now-l.last, l.burst*l.interval)
	}
	l.last = now
	if l.credit < l.interval {
		return false
	}
	l.credit -= l.interval
	return true
}

// icmpSource is the gateway's address the ICMP error about orig comes
// from: the private side's address of orig's family, preferring one in
// the SA's local selector so the phone's inbound SA accepts it.
func (p *pipeline) icmpSource(orig []byte, local netip.Prefix) (netip.Addr, bool) {
	v4 := orig[0]>>4 == 4
	var any netip.Addr
	for _, a := range p.privAddrs {
		if a.Is4() != v4 {
			continue
		}
		if local.IsValid() && local.Contains(a) {
			return a, true
		}
		if !any.IsValid() {
			any = a
		}
	}
	return any, any.IsValid()
}

// ttlLeft says whether a packet may be forwarded: its TTL/hop limit is
// above 1.
func ttlLeft(ip []byte) bool {
	if ip[0]>>4 == 4 {
		return ip[8] > 1
	}
	return ip[7] > 1
}

// icmpAbout says whether an ICMP error may be sent about ip (RFC 1812
// 4.3.2.7, RFC 4443 2.4(e)): never about an ICMP error, a non-first
// fragment, or a packet from or to a multicast, broadcast or unspecified
// address, so errors cannot breed errors or storms.
func icmpAbout(ip []byte) bool {
	src, dst := srcAddr(ip), dstAddr(ip)
	if !src.IsValid() || src.IsUnspecified() || src.IsMulticast() || dst.IsMulticast() {
		return false
	}
	if ip[0]>>4 == 4 {
		hl := int(ip[0]&0x0f) * 4
		if binary.BigEndian.Uint16(ip[6:])&0x1fff != 0 || dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return false
		}
		if ip[9] == 1 && len(ip) > hl {
			switch ip[hl] { // ICMP error types
			case 3, 4, 5, 11, 12:
				return false
			}
		}
		return true
	}
	return !(ip[6] == 58 && len(ip) > 40 && ip[40] < 128)
}

// maxInner is the largest inner packet that, sealed with sa behind an
// outer header of ol bytes, fits mtu: what a Packet Too Big reports and
// the size pre-fragmentation cuts to.
func maxInner(sa interface{ Overhead(n, tfc int) int }, ol, mtu int) int {
	n := mtu - ol - sa.Overhead(0, 0)
	for n > 0 && ol+n+sa.Overhead(n, 0) > mtu {
		n--
	}
	for ol+n+1+sa.Overhead(n+1, 0) <= mtu {
		n++
	}
	return n
}

// within says whether the source (dst false) or destination address of
// the IP packet ip lies in the prefix of bits bits at sel (As16 form; v4:
// an IPv4 prefix): netip.Prefix.Contains of srcAddr/dstAddr on the slot's
// compact selector bytes, without building either netip value per
// packet. An address of the other family, or a packet too short to hold
// one, is not within.
func within(ip []byte, dst bool, sel *[16]byte, v4 bool, bits int) bool {
	if len(ip) == 0 {
		return false
	}
	switch ip[0] >> 4 {
	case 4:
		if !v4 || len(ip) < 20 {
			return false
		}
		if bits <= 0 {
			return true // a /0 holds every IPv4 address
		}
		off := 12
		if dst {
			off = 16
		}
		d := binary.BigEndian.Uint32(ip[off:]) ^ binary.BigEndian.Uint32(sel[12:])
		return d>>(32-bits) == 0
	case 6:
		if v4 || len(ip) < 40 {
			return false
		}
		off := 8
		if dst {
			off = 24
		}
		hi := binary.BigEndian.Uint64(ip[off:]) ^ binary.BigEndian.Uint64(sel[:8])
		lo := binary.BigEndian.Uint64(ip[off+8:]) ^ binary.BigEndian.Uint64(sel[8:])
		switch {
		case bits <= 0:
			return true
		case bits <= 64:
			return hi>>(64-bits) == 0
		}
		return hi == 0 && lo>>(128-bits) == 0
	}
	return false
}
