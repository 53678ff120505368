package esp

import (
	"encoding/binary"
	"net/netip"

	cksum "github.com/xesp/xesp/internal/pkt"
)

// Packet is the outcome of OpenPacket. Slices alias the packet given.
type Packet struct {
	Parsed
	// SPI is the ESP packet's SPI (ESP classes only).
	SPI uint32
	// SA is the SA the lookup returned, nil when none.
	SA *Transform
	// Result of SA.Open, offsets into the whole packet.
	Result
	// Payload is the decrypted Payload Data: tunnel mode the inner IP
	// packet, transport mode the upper-layer segment.
	Payload []byte
	// IP is the packet to deliver: tunnel mode the inner packet (the same
	// bytes as Payload), transport mode the rebuilt IP packet.
	IP []byte
}

// OpenPacket parses a whole received outer IP packet, looks the SA up by
// SPI and opens it in place. Keepalives and IKE come back classified with a
// nil error and nothing opened; traffic that is not ESP comes back as
// ClassOther with a nil error. Drops return the Reason; ReasonDummy comes
// with a filled Packet.
//
// Transport mode: the outer IP header is moved up to the payload and its
// length, protocol/next header and (IPv4) checksum rewritten. The inner
// TCP/UDP (and ICMPv6) checksum is then recomputed over the new pseudo
// header, the fix RFC 3948 3.1.2 allows: the NAT between the peers changed
// the addresses it covered, and without NAT-OA from IKE we cannot adjust it
// incrementally. An IPv4 UDP checksum of 0 stays 0.
func OpenPacket(pkt []byte, lookup func(spi uint32) *Transform) (Packet, error) {
	return openPacket(pkt, lookup, nil)
}

// OpenPacket is the package function with this SA as the only one known: a
// packet for another SPI is ReasonNoSA.
func (sa *Transform) OpenPacket(pkt []byte) (Packet, error) {
	return openPacket(pkt, nil, sa)
}

// OpenPacketTo is OpenPacket filling *out, for the data path: Packet is
// ~200 bytes, and returning it by value copied it several times per packet
// (a visible share of the worker's non-crypto cost).
func (sa *Transform) OpenPacketTo(pkt []byte, out *Packet) error {
	return openPacketTo(out, pkt, nil, sa)
}

// OpenESPTo is OpenPacketTo for an outer packet the caller has parsed
// already, as XDP's metadata hands it to the worker: ip is the outer IP
// packet trimmed to its IP length, its header hdrLen bytes long (IPv4
// options included; IPv6 without extension headers) and directly followed
// by the ESP packet (no UDP header: XDP stripped it); src is its outer
// source. The header is not parsed or checked again: the caller vouches
// for it. out.Outer carries Src only.
func (sa *Transform) OpenESPTo(ip []byte, hdrLen int, src netip.Addr, out *Packet) error {
	*out = Packet{}
	if hdrLen < 20 || hdrLen+8 > len(ip) {
		return ReasonRunt
	}
	out.Class, out.Outer.Src = ClassESP, src
	out.IPHeaderLen, out.ESPStart, out.ESPEnd, out.nhOff = hdrLen, hdrLen, len(ip), 9
	if ip[0]>>4 == 6 {
		out.nhOff = 6
	}
	return openParsed(out, ip, nil, sa)
}

func openPacket(pkt []byte, lookup func(uint32) *Transform, only *Transform) (Packet, error) {
	var out Packet
	err := openPacketTo(&out, pkt, lookup, only)
	return out, err
}

func openPacketTo(out *Packet, pkt []byte, lookup func(uint32) *Transform, only *Transform) error {
	*out = Packet{}
	var err error
	out.Parsed, err = ParseOuter(pkt)
	if err != nil {
		return err
	}
	if out.Class != ClassESP && out.Class != ClassESPInUDP {
		return nil
	}
	return openParsed(out, pkt, lookup, only)
}

// openParsed is openPacketTo from the SPI on, out.Parsed filled.
func openParsed(out *Packet, pkt []byte, lookup func(uint32) *Transform, only *Transform) error {
	var err error
	esp := pkt[out.ESPStart:out.ESPEnd]
	out.SPI = binary.BigEndian.Uint32(esp)
	switch {
	case only != nil:
		if only.spi == out.SPI {
			out.SA = only
		}
	case lookup != nil:
		out.SA = lookup(out.SPI)
	}
	if out.SA == nil {
		return ReasonNoSA
	}
	out.Result, err = out.SA.Open(esp)
	out.Start += out.ESPStart
	out.End += out.ESPStart
	if err != nil && err != ReasonDummy {
		return err
	}
	out.Payload = pkt[out.Start:out.End]
	if err == ReasonDummy {
		return err
	}
	if out.SA.mode == ModeTunnel {
		out.IP = out.Payload
		return nil
	}
	out.IP = rebuildTransport(pkt, out)
	return nil
}

// rebuildTransport moves the outer IP header (options and extension headers
// included) in front of the payload, fixes its length, protocol and
// checksum, and recomputes the upper-layer checksum.
func rebuildTransport(pkt []byte, p *Packet) []byte {
	hl := p.IPHeaderLen
	s := p.Start - hl
	copy(pkt[s:p.Start], pkt[:hl])
	ip := pkt[s:p.End]
	seg := pkt[p.Start:p.End]
	var addrs []byte
	if ip[0]>>4 == 4 {
		binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
		ip[9] = p.NextHeader
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], cksum.Checksum(ip[:hl]))
		addrs = ip[12:20]
	} else {
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ip)-40))
		ip[p.nhOff] = p.NextHeader
		addrs = ip[8:40]
	}
	ckOff := -1
	switch p.NextHeader {
	case ProtoTCP:
		if len(seg) >= 20 {
			ckOff = 16
		}
	case ProtoUDP:
		if len(seg) >= 8 && (len(addrs) == 32 || binary.BigEndian.Uint16(seg[6:]) != 0) {
			ckOff = 6
		}
	case ProtoICMP6:
		if len(addrs) == 32 && len(seg) >= 4 {
			ckOff = 2
		}
	}
	if ckOff >= 0 {
		seg[ckOff], seg[ckOff+1] = 0, 0
		ck := transportChecksum(addrs, p.NextHeader, seg)
		if ck == 0 && p.NextHeader == ProtoUDP {
			ck = 0xffff
		}
		binary.BigEndian.PutUint16(seg[ckOff:], ck)
	}
	return ip
}

// SealPacket builds a whole outer packet in dst: o's IP (+UDP) header, the
// ESP packet sealing payload (copied in), and returns it as a slice of dst.
// dst needs OuterLen(o)+Headroom()+len(payload)+Tailroom(len(payload), 0)
// bytes. nextHeader is 4/41 in tunnel mode (see NextHeaderFor), the
// upper-layer protocol in transport mode.
func (sa *Transform) SealPacket(dst, payload []byte, nextHeader uint8, o *Outer) ([]byte, error) {
	if !o.Src.IsValid() || o.Src.Is4() != o.Dst.Is4() {
		return nil, ReasonInvalid // before Seal spends a sequence number
	}
	off := OuterLen(o) + sa.Headroom()
	if off+len(payload) > len(dst) {
		return nil, ReasonNoRoom
	}
	copy(dst[off:], payload)
	start, end, err := sa.Seal(dst, off, len(payload), nextHeader, 0)
	if err != nil {
		return nil, err
	}
	s, err := PutOuter(dst, start, end, o)
	if err != nil {
		return nil, err
	}
	return dst[s:end], nil
}

// NextHeaderFor returns the tunnel-mode Next Header for an inner IP packet
// (4 for IPv4, 41 for IPv6) or 0 when it is neither.
func NextHeaderFor(inner []byte) uint8 {
	if len(inner) == 0 {
		return 0
	}
	switch inner[0] >> 4 {
	case 4:
		return NextHeaderIPv4
	case 6:
		return NextHeaderIPv6
	}
	return 0
}
