// Package pkt owns the Internet checksum for the whole tree (RFC 1071
// sums, RFC 1624 incremental updates), the data path's included
// (dataplane/esp, dataplane/worker), and builds small IP packets with
// correct checksums for the demo, the tools and tests. Sum, Fold and
// Update are on the worker's data path: they must stay allocation-free.
// It must not grow anything else the data path would link.
package pkt

import (
	"encoding/binary"
	"net/netip"
)

// UDP4 returns an IPv4/UDP packet from src to dst carrying payload, with
// valid header and UDP checksums.
func UDP4(src, dst netip.AddrPort, payload []byte) []byte {
	p := make([]byte, 28+len(payload))
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[10:], ^Fold(Sum(p[:20], 0)))
	u := p[20:]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	copy(u[8:], payload)
	ck := ^Fold(Sum(u, Sum(p[12:20], 17+uint64(len(u)))))
	if ck == 0 {
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], ck)
	return p
}

// UDP4Parse returns the addresses and payload of an IPv4/UDP packet.
func UDP4Parse(p []byte) (src, dst netip.AddrPort, payload []byte, ok bool) {
	if len(p) < 28 || p[0]>>4 != 4 || p[9] != 17 {
		return src, dst, nil, false
	}
	ihl := int(p[0]&0x0f) * 4
	tot := int(binary.BigEndian.Uint16(p[2:]))
	if ihl < 20 || tot > len(p) || tot < ihl+8 {
		return src, dst, nil, false
	}
	u := p[ihl:tot]
	src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[12:16])), binary.BigEndian.Uint16(u[0:]))
	dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), binary.BigEndian.Uint16(u[2:]))
	return src, dst, u[8:], true
}

// Sum adds b to a ones'-complement accumulator as big-endian 16-bit words
// (an odd last byte padded with zero), for Internet checksums (RFC 1071).
// It adds eight bytes at a time: a 64-bit accumulator takes the two 32-bit
// halves without overflow for any packet size, and Fold reduces it (the
// sum of 32-bit words is congruent to that of 16-bit ones mod 0xffff).
func Sum(b []byte, acc uint64) uint64 {
	for len(b) >= 8 {
		v := binary.BigEndian.Uint64(b)
		acc += v >> 32
		acc += v & 0xffffffff
		b = b[8:]
	}
	for len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

// Fold reduces an accumulator to 16 bits with end-around carry; the
// checksum is ^Fold(...).
func Fold(acc uint64) uint16 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}

// Update returns the checksum field value check (as stored in a header)
// after the bytes old were replaced by new, by RFC 1624 eqn. 3:
// HC' = ~(~HC + ~m + m'). old and new have the same even length and sit
// at an even offset of the checksummed data (addresses do). It allocates
// nothing: the worker calls it per packet.
func Update(check uint16, old, new []byte) uint16 {
	s := uint64(^check)
	for i := 0; i+1 < len(old) && i+1 < len(new); i += 2 {
		s += uint64(^(uint16(old[i])<<8 | uint16(old[i+1])))
		s += uint64(uint16(new[i])<<8 | uint16(new[i+1]))
	}
	return ^Fold(s)
}

// Checksum is the Internet checksum of b: what goes in a header's
// checksum field (zeroed first), and 0 over a header whose field is right.
func Checksum(b []byte) uint16 { return ^Fold(Sum(b, 0)) }
