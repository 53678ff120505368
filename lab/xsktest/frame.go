package xsktest

import (
	"encoding/binary"
	"github.com/xesp/xesp/internal/pkt"
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
	binary.BigEndian.PutUint16(ip[10:], ^pkt.Fold(pkt.Sum(ip, 0)))
	udp := p[20:]
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[8:], payload)
	pseudo := pkt.Sum(ip[12:20], 0) + 17 + uint64(len(udp))
	c := ^pkt.Fold(pkt.Sum(udp, pseudo))
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], c)
	return p
}
