package esp

import (
	"encoding/binary"
	"net/netip"

	cksum "github.com/xesp/xesp/internal/pkt"
)

// Protocol numbers and ports of RFC 3948.
const (
	ProtoESP   = 50
	ProtoUDP   = 17
	ProtoTCP   = 6
	ProtoICMP6 = 58
	// NATTPort is the IKE/ESP-in-UDP port; ParseOuter takes UDP with this
	// source or destination port as RFC 3948 traffic.
	NATTPort = 4500
	// MaxOuterLen is the largest header PutOuter writes (IPv6 + UDP).
	MaxOuterLen = 48

	outerTTL = 64
)

// Outer is the outer addressing of an ESP packet: the SA's NAT binding when
// sending, what was found when receiving.
type Outer struct {
	Src, Dst netip.Addr
	// Encap selects (or reports) RFC 3948 UDP encapsulation with these
	// ports; without it the packet is plain IP protocol 50.
	Encap            bool
	SrcPort, DstPort uint16
	// ID, when non-zero, makes an outer IPv4 packet fragmentable: DF clear
	// and this IP ID, which the sender must keep unique per (source,
	// destination, protocol) for the reassembly lifetime (RFC 6864). Zero
	// sends an atomic datagram: DF set, ID 0. Not used for IPv6.
	ID uint16
	// TOS is the IPv4 TOS byte or IPv6 Traffic Class (DSCP and ECN) to
	// write; the tunnel's DSCP/ECN policy chooses it (RFC 4301 5.1.2.1,
	// RFC 6040).
	TOS uint8
	// TTL is the IPv4 TTL or IPv6 hop limit; 0 writes DefaultOuterTTL.
	TTL uint8
}

// DefaultOuterTTL is the outer TTL/hop limit when Outer.TTL is 0.
const DefaultOuterTTL = outerTTL

// OuterLen is the header length PutOuter writes for o: 20 (IPv4) or 40
// (IPv6), plus 8 with UDP encapsulation.
func OuterLen(o *Outer) int {
	n := 20
	if !o.Src.Is4() {
		n = 40
	}
	if o.Encap {
		n += 8
	}
	return n
}

// PutOuter writes the outer IP header (and UDP header when o.Encap) into the
// bytes before buf[start:end], which holds a sealed ESP packet, and returns
// the new start. IPv4: DF set and ID 0 (an atomic datagram, RFC 6864)
// unless o.ID asks for a fragmentable one; UDP checksum 0 (RFC 3948 2.1). IPv6: the UDP checksum is mandatory and is
// computed over the whole datagram.
func PutOuter(buf []byte, start, end int, o *Outer) (int, error) {
	v4 := o.Src.Is4()
	if v4 != o.Dst.Is4() || !o.Src.IsValid() || !o.Dst.IsValid() || o.Src.Is4In6() || o.Dst.Is4In6() {
		return 0, ReasonInvalid
	}
	hl := OuterLen(o)
	if start < hl || end < start || end > len(buf) {
		return 0, ReasonNoRoom
	}
	total := end - start + hl
	if total > 0xffff+40 || (v4 && total > 0xffff) {
		return 0, ReasonNoRoom
	}
	s := start - hl
	proto := byte(ProtoESP)
	ipLen := 20
	if !v4 {
		ipLen = 40
	}
	if o.Encap {
		proto = ProtoUDP
		u := buf[s+ipLen : start]
		binary.BigEndian.PutUint16(u[0:], o.SrcPort)
		binary.BigEndian.PutUint16(u[2:], o.DstPort)
		binary.BigEndian.PutUint16(u[4:], uint16(end-start+8))
		u[6], u[7] = 0, 0
	}
	ttl := o.TTL
	if ttl == 0 {
		ttl = outerTTL
	}
	h := buf[s : s+ipLen]
	if v4 {
		h[0], h[1] = 0x45, o.TOS
		binary.BigEndian.PutUint16(h[2:], uint16(total))
		if o.ID != 0 {
			binary.BigEndian.PutUint16(h[4:], o.ID)
			h[6], h[7] = 0, 0
		} else {
			h[4], h[5] = 0, 0
			h[6], h[7] = 0x40, 0 // DF
		}
		h[8], h[9] = ttl, proto
		h[10], h[11] = 0, 0
		a, b := o.Src.As4(), o.Dst.As4()
		copy(h[12:16], a[:])
		copy(h[16:20], b[:])
		binary.BigEndian.PutUint16(h[10:], cksum.Checksum(h))
		return s, nil
	}
	h[0], h[1], h[2], h[3] = 0x60|o.TOS>>4, o.TOS<<4, 0, 0
	binary.BigEndian.PutUint16(h[4:], uint16(total-40))
	h[6], h[7] = proto, ttl
	a, b := o.Src.As16(), o.Dst.As16()
	copy(h[8:24], a[:])
	copy(h[24:40], b[:])
	if o.Encap {
		ck := transportChecksum(h[8:40], ProtoUDP, buf[s+40:end])
		if ck == 0 {
			ck = 0xffff // 0 means "no checksum", which IPv6 forbids for UDP
		}
		binary.BigEndian.PutUint16(buf[s+46:], ck)
	}
	return s, nil
}

// Class is what ParseOuter found in an outer packet.
type Class uint8

// Classes.
const (
	ClassOther     Class = iota // not ESP-related (or malformed: see the error)
	ClassESP                    // plain ESP, IP protocol 50
	ClassESPInUDP               // UDP-encapsulated ESP (RFC 3948)
	ClassKeepalive              // NAT-keepalive: one byte 0xFF in UDP (RFC 3948 2.3)
	ClassIKE                    // non-ESP marker (four zero bytes): IKE, not ours
)

var classNames = [...]string{"other", "esp", "esp_in_udp", "keepalive", "ike"}

// String returns a stable name.
func (c Class) String() string {
	if int(c) < len(classNames) {
		return classNames[c]
	}
	return "unknown"
}

// Parsed is the outcome of ParseOuter. Offsets are into the parsed packet.
type Parsed struct {
	Class Class
	Outer Outer
	// IPHeaderLen covers the IP header with options or extension headers:
	// where the UDP header or the ESP packet starts.
	IPHeaderLen int
	// ESPStart and ESPEnd bound the ESP packet (SPI through ICV) for
	// ClassESP and ClassESPInUDP.
	ESPStart, ESPEnd int
	// nhOff is the byte holding the protocol/next header that leads to UDP
	// or ESP, which a transport-mode rebuild rewrites.
	nhOff int
}

// ParseOuter classifies a received IP packet (IPv4 with options, IPv6 with
// extension headers) as RFC 3948 describes. pkt may carry link-layer
// padding past the IP length; it is ignored. UDP to or from NATTPort is
// taken as NAT-T; use ParseOuterPort for another port. The UDP checksum is
// not verified (RFC 3948 2.1 lets receivers skip it, and the ESP ICV covers
// the payload).
func ParseOuter(pkt []byte) (Parsed, error) { return ParseOuterPort(pkt, NATTPort) }

// ParseOuterPort is ParseOuter with the NAT-T port given.
func ParseOuterPort(pkt []byte, port uint16) (Parsed, error) {
	var p Parsed
	if len(pkt) < 1 {
		return p, ReasonRunt
	}
	var proto byte
	var end int
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return p, ReasonRunt
		}
		ihl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:]))
		if ihl < 20 || total < ihl || total > len(pkt) {
			return p, ReasonBadHeader
		}
		if cksum.Checksum(pkt[:ihl]) != 0 {
			return p, ReasonBadHeader
		}
		p.Outer.Src = netip.AddrFrom4([4]byte(pkt[12:16]))
		p.Outer.Dst = netip.AddrFrom4([4]byte(pkt[16:20]))
		if binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 { // MF or offset
			return p, ReasonFragment
		}
		proto, p.IPHeaderLen, p.nhOff, end = pkt[9], ihl, 9, total
	case 6:
		if len(pkt) < 40 {
			return p, ReasonRunt
		}
		end = 40 + int(binary.BigEndian.Uint16(pkt[4:]))
		if end > len(pkt) {
			return p, ReasonBadHeader
		}
		p.Outer.Src = netip.AddrFrom16([16]byte(pkt[8:24]))
		p.Outer.Dst = netip.AddrFrom16([16]byte(pkt[24:40]))
		proto, p.nhOff = pkt[6], 6
		off := 40
	ext:
		for {
			switch proto {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if off+8 > end {
					return p, ReasonBadHeader
				}
				proto, p.nhOff = pkt[off], off
				off += (int(pkt[off+1]) + 1) * 8
			case 44:
				return p, ReasonFragment
			default:
				break ext
			}
		}
		if off > end {
			return p, ReasonBadHeader
		}
		p.IPHeaderLen = off
	default:
		return p, ReasonBadVersion
	}
	h := p.IPHeaderLen
	switch proto {
	case ProtoESP:
		p.Class, p.ESPStart, p.ESPEnd = ClassESP, h, end
		if end-h < 8 {
			return p, ReasonRunt
		}
		return p, nil
	case ProtoUDP:
		if end-h < 8 {
			return p, ReasonRunt
		}
		sp := binary.BigEndian.Uint16(pkt[h:])
		dp := binary.BigEndian.Uint16(pkt[h+2:])
		if sp != port && dp != port {
			return p, nil
		}
		ulen := int(binary.BigEndian.Uint16(pkt[h+4:]))
		if ulen < 8 || h+ulen > end {
			return p, ReasonBadHeader
		}
		p.Outer.Encap, p.Outer.SrcPort, p.Outer.DstPort = true, sp, dp
		pl := pkt[h+8 : h+ulen]
		switch {
		case len(pl) == 1 && pl[0] == 0xff:
			p.Class = ClassKeepalive
		case len(pl) >= 4 && binary.BigEndian.Uint32(pl) == 0:
			p.Class = ClassIKE
		case len(pl) < 8:
			p.Class = ClassESPInUDP
			return p, ReasonRunt
		default:
			p.Class, p.ESPStart, p.ESPEnd = ClassESPInUDP, h+8, h+ulen
		}
		return p, nil
	}
	return p, nil
}

// transportChecksum is the TCP/UDP/ICMPv6 checksum of seg with the
// pseudo-header of addrs (src||dst, 8 or 32 bytes), with seg's own checksum
// field taken as whatever it holds (callers zero it first).
func transportChecksum(addrs []byte, proto byte, seg []byte) uint16 {
	acc := cksum.Sum(addrs, 0)
	acc += uint64(proto) + uint64(len(seg))
	return ^cksum.Fold(cksum.Sum(seg, acc))
}
