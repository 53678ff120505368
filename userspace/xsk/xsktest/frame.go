package xsktest

import (
	"encoding/binary"
	"net"
)

// UDPFrame builds an Ethernet/IPv4/UDP frame with valid IP and UDP
// checksums (IHL 5, TTL 64, DF clear, ID 0).
func UDPFrame(dst, src net.HardwareAddr, srcIP, dstIP net.IP, sport, dport uint16, payload []byte) []byte {
	b := make([]byte, 14)
	copy(b[0:6], dst)
	copy(b[6:12], src)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	return append(b, IPv4UDP(srcIP, dstIP, sport, dport, payload)...)
}

// IPv4UDP builds an IPv4/UDP packet with valid checksums.
func IPv4UDP(srcIP, dstIP net.IP, sport, dport uint16, payload []byte) []byte {
	p := make([]byte, 28+len(payload))
	ip := p[:20]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(len(p)))
	ip[8] = 64
	ip[9] = 17
	copy(ip[12:16], srcIP.To4())
	copy(ip[16:20], dstIP.To4())
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum(ip, 0)))
	udp := p[20:]
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[8:], payload)
	pseudo := sum(ip[12:20], 0) + 17 + uint32(len(udp))
	c := ^fold(sum(udp, pseudo))
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], c)
	return p
}

func sum(b []byte, s uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}
