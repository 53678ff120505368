package worker

import (
	"encoding/binary"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	cksum "github.com/xesp/xesp/internal/pkt"
)

// Transport-mode SAs through the gateway (docs/addressing.md, "Transport
// mode"). The phone talks to the gateway's public address; the gateway is
// the IPsec endpoint and re-addresses the segment between the phone's
// core address and one core-side host (the SA's inner.local, e.g. the
// P-CSCF), keeping the ports:
//
//   - decap: the ESP engine rebuilt the packet from the outer header (phone's
//     NAT'd address -> gateway public address) and recomputed its UDP/TCP
//     checksum over that pseudo-header (RFC 3948 3.1.2); transportIn
//     re-addresses it Core -> Dest with incremental (RFC 1624) fixes.
//   - encap: the core sends to the core address; transportOut re-addresses
//     the packet to gateway public address -> current NAT binding (fixing
//     the checksum for that pseudo-header, the one the phone's stack checks
//     without a NAT; behind one it applies RFC 3948 3.1.2 itself), strips
//     the IP header and seals the segment with Next Header = its protocol.

// transportInPorts is the inbound selector check of a transport-mode SA:
// its addresses are the outer ones, which the SPI lookup and the binding
// stand for, so only the protocol and ports are left to check.
func (e *Slot) transportInPorts(ip []byte) bool {
	return e.l4Match(ip, e.PortPeer, e.PortLocal)
}

// transportIn re-addresses the rebuilt packet ip from the phone's core
// address to the SA's core-side host and gives it a fresh TTL: the
// gateway is the transport endpoint and originates the packet toward the
// core (the access network's hop count is not the core's business).
func (p *pipeline) transportIn(e *Slot, ip []byte) Drop {
	if !e.hasCore() || !e.Scope().Dest.IsValid() {
		return DropXlate // refused at config time; never forward half-addressed
	}
	if !rewriteAddr(ip, true, e.Core()) || !rewriteAddr(ip, false, e.Scope().Dest) {
		return DropXlate
	}
	setTTL(ip, p.ttl())
	return 0
}

func (p *pipeline) ttl() uint8 {
	if p.outerTTL != 0 {
		return p.outerTTL
	}
	return esp.DefaultOuterTTL
}

// setTTL writes an IPv4 TTL (fixing the header checksum) or IPv6 hop limit.
func setTTL(ip []byte, ttl uint8) {
	if ip[0]>>4 == 6 {
		ip[7] = ttl
		return
	}
	if ip[8] == ttl {
		return
	}
	old := [2]byte{ip[8], ip[9]}
	ip[8] = ttl
	binary.BigEndian.PutUint16(ip[10:], cksum.Update(binary.BigEndian.Uint16(ip[10:]), old[:], ip[8:10]))
}

// transportHeader returns the length of ip's header when what follows it
// is a whole upper-layer segment that transport mode can carry: not a
// fragment, no IPv6 extension header in front of it.
func transportHeader(ip []byte) (int, bool) {
	if ip[0]>>4 == 4 {
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 { // MF or an offset
			return 0, false
		}
		return int(ip[0]&0x0f) * 4, true
	}
	switch ip[6] {
	case 0, 43, 44, 50, 51, 60, 135, 139, 140:
		return 0, false
	}
	return 40, true
}

// transportOut seals the core's packet ip (frame[l3:l3+len(ip)], already
// through outSelect) for a transport-mode SA: the MTU check, then the
// re-addressing to the outer pseudo-header, then the ESP seal of the
// segment alone. off is where d's Ethernet header starts (ICMP errors
// to the core go back to its MAC).
func (p *pipeline) transportOut(e *Slot, d xsk.Desc, frame []byte, off, l3 int, ip []byte) (xsk.Desc, Drop) {
	hl, ok := transportHeader(ip)
	if !ok {
		e.Counters.Drops.Add(1)
		if ip[0]>>4 == 6 && ip[6] != 44 {
			return d, DropXlate // extension headers hide the checksum
		}
		return d, DropFragment
	}
	n := len(ip)
	seg := n - hl
	if mtu := p.frag.mtu; mtu > 0 {
		ol := 20
		if !e.Scope().Local.Is4() {
			ol = 40
		}
		if e.LocalPort != 0 {
			ol += 8
		}
		if ol+seg+e.SA.Overhead(seg, 0) > mtu && (ip[0]>>4 == 6 || ip[6]&0x40 != 0) {
			// DF or IPv6: the sender makes it smaller. The inner MTU
			// that fits counts the IP header it sends and we strip.
			e.Counters.Drops.Add(1)
			if p.icmpToCore(e, d, frame, off, l3, ip, icmpTooBig, maxInner(e.SA, ol, mtu)+hl) {
				p.stats.Encap.Drops[DropTooBig].Add(1)
				return d, held
			}
			return d, DropTooBig
		}
		// Without DF the outer packet is fragmented (emitPublic): a
		// transport segment cannot be split before sealing.
	}
	tos := p.outerTOS(e, tosOf(ip))
	peer := e.Binding.Load()
	dst := peer.Addr.Addr()
	if !rewriteAddr(ip, true, e.Scope().Local) || !rewriteAddr(ip, false, dst) {
		e.Counters.Drops.Add(1)
		return d, DropXlate
	}
	return p.sealWith(e, peer, d, frame, l3+hl, seg, ipProto(ip), tos)
}
