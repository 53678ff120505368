package worker

import (
	"encoding/binary"
	"net/netip"
	"time"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/flood"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// Neighbors resolves next-hop MACs without blocking (neigh.Resolver).
type Neighbors interface {
	Lookup(dst netip.Addr) ([6]byte, bool)
	Request(dst netip.Addr)
}

const ethLen = 14

// pipeline is the per-batch packet work of a worker, separate from the
// socket loop so it can be tested on frames built in memory.
type pipeline struct {
	// mem is the UMEM the frames live in. A UMEM is plain anonymous
	// memory until a socket registers it, so unit tests build frames in
	// one without root; a concrete type keeps Frame and Meta inlinable.
	mem        *xsk.UMEM
	table      []*Slot
	idle       idler    // built ciphers and their idle release (idle.go)
	touched    uintptr  // touchBatch's result, kept so its loads stay
	dirty      []uint32 // slots of inbound entries with dirty set
	nb         Neighbors
	pubMAC     [6]byte // source MAC of frames sent on the public side
	privMAC    [6]byte
	stats      *Stats
	id         int
	bindEvents chan<- BindingChange
	// seqRequests asks the manager for more reserved sequence numbers.
	seqRequests chan<- SeqRequest

	parked []parkedFrame
	now    int64 // unix ns of the current batch, set when first needed

	// nbDst and nbMAC remember the last resolved next hop within one
	// batch: a batch mostly goes to a handful of hosts (the SIP core), and
	// the resolver's hashed lookup was a visible share of the per-packet
	// cost. Cleared at every batch so a changed neighbour is seen within
	// one batch, as before.
	nbDst netip.Addr
	nbMAC [6]byte

	pk esp.Packet // decapOne's opened packet, filled in place (no 200-byte copies)

	frag       fragmenter // outer IPv4 fragmentation toward the public side
	privateMTU int        // largest IP packet the private link takes; 0: unchecked

	// byPorts finds the outbound entry with port selectors for a
	// phone's inner prefix and the cleartext's ports (see Entry.PortLocal).
	byPorts map[portKey]*Slot

	// flood charges failed authentications to the flood budgets XDP
	// enforces (nil: none).
	flood *flood.Guard

	privAddrs []netip.Addr // the private side's addresses: ICMP errors come from them
	outerTTL  uint8        // outer TTL/hop limit (0: esp.DefaultOuterTTL)
	dscp      uint8        // outer DSCP for SAs without their own, if fixDSCP
	fixDSCP   bool
	icmp      limiter      // ICMP errors, all kinds, this worker
	clock     func() int64 // unix ns (time.Now; tests set their own)

	// pubTag and privTag are the 802.1Q/802.1ad tag (TPID<<16 | VID)
	// frames leaving each side carry; 0: untagged.
	pubTag, privTag uint32

	// toPub are sealed frames a batch made besides its own output (ICMP
	// errors to phones, inner fragments after the first); back are ICMP
	// errors to the core, leaving by the private side. The worker
	// transmits both after each batch.
	toPub, back []xsk.Desc
}

// nowNS is the batch's time, read once per batch when first needed.
func (p *pipeline) nowNS() int64 {
	if p.now == 0 {
		if p.clock != nil {
			p.now = p.clock()
		} else {
			p.now = time.Now().UnixNano()
		}
	}
	return p.now
}

type portKey struct {
	peer        netip.Prefix
	local, port uint16 // local port, peer port (0: any)
}

// track keeps byPorts and the bindings' outbound entries (Binding.out,
// which finds a phone's outbound entry from its inbound one) in step with
// the table: old leaves, e arrives.
func (p *pipeline) track(old, e *Slot) {
	if old != nil && old != e && old.SA != nil {
		old.SA.Wipe() // out of the data path: its keys go
	}
	if old != nil && old.Dir == Outbound && old.Binding != nil && old.Binding.out == old {
		old.Binding.out = nil
	}
	if e != nil && e.Dir == Outbound && e.Binding != nil && e.Binding.out == nil {
		e.Binding.out = e
	}
	if old != nil && old.Dir == Outbound && (old.PortLocal != 0 || old.PortPeer != 0) {
		k := portKey{old.selKey(), old.PortLocal, old.PortPeer}
		if p.byPorts[k] == old {
			delete(p.byPorts, k)
		}
	}
	if e != nil && e.Dir == Outbound && (e.PortLocal != 0 || e.PortPeer != 0) {
		if p.byPorts == nil {
			p.byPorts = make(map[portKey]*Slot)
		}
		p.byPorts[portKey{e.selKey(), e.PortLocal, e.PortPeer}] = e
	}
}

// l4Ports returns the UDP/TCP ports of an unfragmented (or first-fragment)
// IPv4 packet, or of an IPv6 packet whose first next header is UDP/TCP.
func l4Ports(ip []byte) (src, dst uint16, ok bool) {
	var proto byte
	var l4 int
	switch {
	case len(ip) >= 20 && ip[0]>>4 == 4:
		if binary.BigEndian.Uint16(ip[6:])&0x1fff != 0 {
			return 0, 0, false
		}
		proto, l4 = ip[9], int(ip[0]&0x0f)*4
	case len(ip) >= 40 && ip[0]>>4 == 6:
		proto, l4 = ip[6], 40
	default:
		return 0, 0, false
	}
	if proto != 17 && proto != 6 || l4 < 20 || len(ip) < l4+4 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint16(ip[l4:]), binary.BigEndian.Uint16(ip[l4+2:]), true
}

// portsMatch applies port selectors to a packet from src to dst port.
func portsMatch(ip []byte, srcSel, dstSel uint16) bool {
	sp, dp, ok := l4Ports(ip)
	return ok && (srcSel == 0 || sp == srcSel) && (dstSel == 0 || dp == dstSel)
}

// emitPublic queues a sealed frame for the public TX ring, fragmenting
// the outer IPv4 packet when it exceeds the public MTU.
func (p *pipeline) emitPublic(d xsk.Desc, tx []xsk.Desc, drop []uint64) ([]xsk.Desc, []uint64) {
	if p.frag.mtu == 0 || int(d.Len) <= p.frag.mtu+p.frag.l2() {
		return append(tx, d), drop
	}
	if out, ok := p.frag.fragment4(d, tx); ok {
		return out, drop
	}
	p.stats.Encap.Drops[DropOversized].Add(1)
	return tx, append(drop, d.Addr)
}

// meta returns the xesp metadata in front of a received frame, or nil
// when there is none of this layout version, or when it names another
// worker (a steering fault: the slot index is this worker's table only).
// The layout is bpf2go's type for struct xesp_meta; the kernel writes it
// 4-byte aligned right before the packet. See "The XDP-to-worker
// hand-off" in docs/architecture.md for what is trusted and why.
func (p *pipeline) meta(addr uint64) *bpf.Meta {
	b := p.mem.Meta(addr, bpf.MetaSize)
	if b == nil {
		return nil
	}
	m := (*bpf.Meta)(unsafe.Pointer(&b[0]))
	if m.Magic != bpf.MetaMagic || m.Worker != uint8(p.id) {
		return nil
	}
	return m
}

// outerESP is the outer IP packet of a received ESP frame at off in frame
// (d.Len n bytes) as the metadata places it, and its header length, after
// the bounds checks that keep a wrong metadata field from reaching outside
// the packet or making the header say something else than XDP saw. ok
// false is DropBadMeta. What is not checked here, because XDP did:
// lengths against the frame, the transport header, fragments.
func outerESP(frame []byte, off, n int, m *bpf.Meta) (ip []byte, hl int, ok bool) {
	l3, end := int(m.L3Off), int(m.L3Off)+int(m.L3Len)
	hl = int(m.L4Off) - l3
	if l3 < ethLen || hl < 20 || hl+8 > int(m.L3Len) || end > n || off+end > len(frame) {
		return nil, 0, false
	}
	ip = frame[off+l3 : off+end]
	switch m.Family {
	case 4:
		ok = ip[0]>>4 == 4 && int(ip[0]&0x0f)*4 == hl
	case 6:
		ok = ip[0]>>4 == 6 && hl == 40
	}
	return ip, hl, ok
}

func (p *pipeline) entry(idx uint32, dir Direction) (*Slot, Drop) {
	if int(idx) >= len(p.table) || p.table[idx] == nil {
		return nil, Drop(esp.ReasonNoSA)
	}
	e := p.table[idx]
	if e.Dir != dir {
		return nil, DropWrongDir
	}
	return e, 0
}

// decap opens each received public-side frame. Frames to forward are
// appended to tx (for the private TX ring), the others to drop.
func (p *pipeline) decap(rx []xsk.Desc, tx []xsk.Desc, drop []uint64) ([]xsk.Desc, []uint64) {
	return p.batch(rx, tx, drop, &p.stats.Decap, Inbound)
}

// batch runs one direction's per-packet work over a batch: forwarded
// frames go to tx, dropped ones to drop, parked ones stay with the
// pipeline until their next hop resolves.
func (p *pipeline) batch(rx []xsk.Desc, tx []xsk.Desc, drop []uint64, st *DirStats, dir Direction) ([]xsk.Desc, []uint64) {
	p.now = 0
	p.nbDst = netip.Addr{}
	p.touchBatch(rx)
	for _, d := range rx {
		var out xsk.Desc
		var why Drop
		if dir == Inbound {
			out, why = p.decapOne(d)
		} else {
			out, why = p.encapOne(d)
		}
		switch {
		case why == held:
		case why != 0:
			st.Drops[why].Add(1)
			drop = append(drop, d.Addr)
		case dir == Inbound:
			tx = append(tx, out)
		default:
			tx, drop = p.emitPublic(out, tx, drop)
		}
	}
	st.Batches[batchBucket(len(rx))].Add(1)
	return tx, drop
}

func (p *pipeline) decapOne(d xsk.Desc) (xsk.Desc, Drop) {
	m := p.meta(d.Addr)
	if m == nil || (m.Kind != uint8(bpf.MetaESPUDP) && m.Kind != uint8(bpf.MetaESP)) {
		return d, DropBadMeta
	}
	e, why := p.entry(m.SaIndex, Inbound)
	if e == nil {
		return d, why
	}
	if e.expired() {
		e.Counters.Drops.Add(1)
		return d, DropLifetime
	}
	frame := p.mem.Frame(d.Addr)
	off := int(d.Addr - p.mem.FrameBase(d.Addr))
	outer, hl, ok := outerESP(frame, off, int(d.Len), m)
	if !ok {
		return d, DropBadMeta
	}
	// XDP does not verify the IPv4 header checksum (the kernel's IP input
	// would have): the outer source may become the SA's binding.
	if m.Family == 4 && pkt.Checksum(outer[:hl]) != 0 {
		e.Counters.Drops.Add(1)
		return d, Drop(esp.ReasonBadHeader)
	}
	outerTOS := tosOf(outer) // before Open: the outer header is intact
	pk := &p.pk
	p.touch(e)
	if err := e.SA.OpenESPTo(outer, hl, m.SrcAddr(), pk); err != nil {
		e.Counters.Drops.Add(1)
		r := esp.ReasonOf(err)
		if r == esp.ReasonIntegrity && p.flood != nil {
			p.authFailed(e, m)
		}
		return d, Drop(r)
	}
	// Open moved the replay window: the next snapshot exports it.
	if e.marks&markDirty == 0 {
		p.markDirty(e)
	}
	ip := pk.IP
	if !innerOK(ip) {
		e.Counters.Drops.Add(1)
		return d, Drop(esp.ReasonBadHeader)
	}
	if e.Transport && !e.transportInPorts(ip) || !e.Transport && !e.inSelectors(ip) {
		e.Counters.Drops.Add(1)
		return d, DropPolicy
	}
	// Authenticated, inside the replay window and within the SA's
	// selectors: only now may the binding follow the packet (RFC 3948
	// NAT re-mapping), and the phone counts as alive.
	p.learn(e, m, pk.Outer.Src, frame[off+6:off+12])
	e.Counters.LastSeen.Store(p.nowNS())
	if p.privateMTU > 0 && len(ip) > p.privateMTU {
		e.Counters.Drops.Add(1)
		return d, DropOversized
	}
	if e.Transport {
		// One IP header, the outer one: no ECN to combine, no hop
		// (transport.go).
		if why := p.transportIn(e, ip); why != 0 {
			e.Counters.Drops.Add(1)
			return d, why
		}
	} else if why := p.tunnelIn(e, d, frame, ip, outerTOS); why != 0 {
		return d, why
	}
	e.Counters.Packets.Add(1)
	e.Counters.Bytes.Add(uint64(len(pk.Payload)))
	e.Counters.Seq.Store(pk.Seq)

	start := len(frame) - cap(ip) // ip aliases frame
	l2 := putL2(frame, start, p.privMAC, p.privTag, etherType(ip))
	h := frame[l2:start]
	base := p.mem.FrameBase(d.Addr)
	out := xsk.Desc{Addr: base + uint64(l2), Len: uint32(start - l2 + len(ip))}
	dst := dstAddr(ip)
	mac, ok := p.lookup(dst)
	if !ok {
		return p.park(out, dst, toPrivate)
	}
	copy(h[0:6], mac[:])
	return out, 0
}

// tunnelIn is decap's router part for a tunnel-mode packet: RFC 6040
// ECN from the outer TOS, the TTL (ICMP Time Exceeded to the phone) and
// the core-address rewrite. Its drops are counted on e; held means the
// frame became an ICMP error.
func (p *pipeline) tunnelIn(e *Slot, d xsk.Desc, frame, ip []byte, outerTOS uint8) Drop {
	if tos := tosOf(ip); outerTOS&3 != 0 {
		nt, ok := decapECN(outerTOS, tos)
		if !ok {
			e.Counters.Drops.Add(1)
			return DropECN
		}
		if nt != tos {
			setTOS(ip, nt)
		}
	}
	if !decTTL(ip) {
		e.Counters.Drops.Add(1)
		if p.icmpToPhone(e, d, frame, ip) {
			p.stats.Decap.Drops[DropTTL].Add(1)
			return held
		}
		return DropTTL
	}
	// Every check above saw the phone's real inner addresses; only now
	// does its source become the core address (docs/addressing.md).
	if why := xlateIn(e, ip); why != 0 {
		e.Counters.Drops.Add(1)
		return why
	}
	return 0
}

// innerOK says ip is long enough for its IP header, so the router
// functions may read it.
func innerOK(ip []byte) bool {
	if len(ip) == 0 {
		return false
	}
	switch ip[0] >> 4 {
	case 4:
		return len(ip) >= 20 && int(ip[0]&0x0f)*4 >= 20 && int(ip[0]&0x0f)*4 <= len(ip)
	case 6:
		return len(ip) >= 40
	}
	return false
}

// icmpToPhone turns the frame holding the phone's inner packet ip into an
// ICMP Time Exceeded to the phone, sealed with its outbound SA (so it
// reaches the phone inside its tunnel) and queued for the public side.
// False: nothing was sent (rate limit, no outbound SA or address); the
// caller drops the frame.
func (p *pipeline) icmpToPhone(in *Slot, d xsk.Desc, frame, ip []byte) bool {
	if !icmpAbout(ip) {
		return false
	}
	var out *Slot
	if in.Binding != nil {
		out = in.Binding.out
	}
	if out == nil || out.expired() {
		p.stats.ICMPUnsent.Add(1)
		return false
	}
	src, ok := p.icmpSource(ip, out.Scope().InnerLocal)
	if !ok {
		p.stats.ICMPUnsent.Add(1)
		return false
	}
	if !p.icmp.allow(p.nowNS()) {
		p.stats.ICMPLimited.Add(1)
		return false
	}
	hl := 48
	if ip[0]>>4 == 4 {
		hl = 28
	}
	s := len(frame) - cap(ip) - hl
	n := putICMP(frame[s:], src, ip, icmpTimeExceeded, 0)
	o, why := p.seal(out, d, frame, s, n)
	switch why {
	case 0:
		p.toPub = append(p.toPub, o)
	case held:
	default:
		p.stats.ICMPUnsent.Add(1)
		return false
	}
	p.stats.ICMP[icmpTimeExceeded].Add(1)
	return true
}

// icmpToCore turns the frame holding the core's packet ip (at l3, the
// frame's Ethernet header at off) into an ICMP error of kind to its
// sender, addressed back to the MAC it came from, queued for the private
// side. False: nothing was sent; the caller drops the frame.
func (p *pipeline) icmpToCore(e *Slot, d xsk.Desc, frame []byte, off, l3 int, ip []byte, kind icmpKind, mtu int) bool {
	if !icmpAbout(ip) {
		return false
	}
	src, ok := p.icmpSource(ip, e.Scope().InnerLocal)
	if !ok {
		p.stats.ICMPUnsent.Add(1)
		return false
	}
	if !p.icmp.allow(p.nowNS()) {
		p.stats.ICMPLimited.Add(1)
		return false
	}
	var mac [6]byte
	copy(mac[:], frame[off+6:off+12]) // before the ICMP header overwrites it
	hl := 48
	if ip[0]>>4 == 4 {
		hl = 28
	}
	s := l3 - hl
	n := putICMP(frame[s:], src, ip, kind, mtu)
	l2 := putL2(frame, s, p.privMAC, p.privTag, etherType(frame[s:]))
	copy(frame[l2:l2+6], mac[:])
	p.back = append(p.back, xsk.Desc{Addr: p.mem.FrameBase(d.Addr) + uint64(l2), Len: uint32(s - l2 + n)})
	p.stats.ICMP[kind].Add(1)
	return true
}

// lookup is Neighbors.Lookup through the batch's one-entry memo. Only
// hits are remembered: a miss parks the frame and requests resolution.
func (p *pipeline) lookup(dst netip.Addr) ([6]byte, bool) {
	if dst == p.nbDst && dst.IsValid() {
		return p.nbMAC, true
	}
	mac, ok := p.nb.Lookup(dst)
	if ok {
		p.nbDst, p.nbMAC = dst, mac
	}
	return mac, ok
}

// learn moves the SA's binding to the packet's outer source if it
// differs. Called only for authenticated, in-window packets.
func (p *pipeline) learn(e *Slot, m *bpf.Meta, src netip.Addr, srcMAC []byte) {
	var port uint16
	if m.Kind == uint8(bpf.MetaESPUDP) {
		port = binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&m.Sport))[:])
	}
	cur := e.Binding.Load()
	ap := netip.AddrPortFrom(src, port)
	// A zero source MAC marks a slow-path packet: keep the MAC we have.
	known := string(srcMAC) != "\x00\x00\x00\x00\x00\x00"
	if cur.Addr == ap && (!known || cur.HasMAC && string(cur.MAC[:]) == string(srcMAC)) {
		return
	}
	np := &Peer{Addr: ap, HasMAC: known}
	if known {
		copy(np.MAC[:], srcMAC)
	}
	e.Binding.v.Store(np)
	if cur.Addr != ap {
		if p.flood != nil {
			// XDP must exempt the new binding from a spent budget.
			p.flood.Rebound(p.pk.SPI, ap)
		}
		p.stats.BindingChanges.Add(1)
		select {
		case p.bindEvents <- BindingChange{Worker: p.id, Index: e.index, Peer: *np}:
		default:
			p.stats.BindingEventsLost.Add(1)
		}
	}
}

// authFailed charges a packet that failed authentication to the flood
// budgets. The open parsed the outer header and SPI before the tag
// check failed; the UDP source port travels in the metadata.
func (p *pipeline) authFailed(e *Slot, m *bpf.Meta) {
	var port uint16
	if m.Kind == uint8(bpf.MetaESPUDP) {
		port = binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&m.Sport))[:])
	}
	p.flood.Failed(p.pk.SPI, e.Binding.Load().Addr, netip.AddrPortFrom(p.pk.Outer.Src, port))
}

// encap seals each received private-side frame toward its SA's binding.
func (p *pipeline) encap(rx []xsk.Desc, tx []xsk.Desc, drop []uint64) ([]xsk.Desc, []uint64) {
	return p.batch(rx, tx, drop, &p.stats.Encap, Outbound)
}

func (p *pipeline) encapOne(d xsk.Desc) (xsk.Desc, Drop) {
	m := p.meta(d.Addr)
	if m == nil || m.Kind != uint8(bpf.MetaClear) {
		return d, DropBadMeta
	}
	e, why := p.entry(m.SaIndex, Outbound)
	if e == nil {
		return d, why
	}
	if e.expired() {
		e.Counters.Drops.Add(1)
		return d, DropLifetime
	}
	frame := p.mem.Frame(d.Addr)
	off := int(d.Addr - p.mem.FrameBase(d.Addr))
	// The IP length is XDP's (l3_len, checked there against the frame):
	// no second parse of the header, only bounds and one compare with
	// the length field, since it is what gets sealed.
	l3, n := off+int(m.L3Off), int(m.L3Len)
	if m.L3Off < ethLen || int(m.L3Off)+n > int(d.Len) || l3+n > len(frame) {
		return d, DropBadMeta
	}
	ip := frame[l3 : l3+n]
	if n == 0 || ip[0]>>4 != m.Family || !lenIs(ip, n) {
		return d, DropBadMeta
	}
	if !innerOK(ip) {
		e.Counters.Drops.Add(1)
		return d, Drop(esp.ReasonBadHeader)
	}
	// Selectors on the destination as the core sent it: the phone's core
	// address when its SA has one (xlateOut below puts the phone's own
	// inner address in only just before sealing).
	sel, why := p.outSelect(e, ip)
	if sel == nil {
		e.Counters.Drops.Add(1)
		return d, why
	}
	e = sel
	if e.Transport {
		// The gateway is the packet's destination, not a router on its
		// way: no TTL to spend, no inner fragmentation (transport.go).
		return p.transportOut(e, d, frame, off, l3, ip)
	}
	if !ttlLeft(ip) {
		e.Counters.Drops.Add(1)
		if p.icmpToCore(e, d, frame, off, l3, ip, icmpTimeExceeded, 0) {
			p.stats.Encap.Drops[DropTTL].Add(1)
			return d, held
		}
		return d, DropTTL
	}
	frag := 0 // > 0: pre-fragment to this inner size before sealing
	if mtu := p.frag.mtu; mtu > 0 {
		ol := 20
		if !e.Scope().Local.Is4() {
			ol = 40
		}
		if e.LocalPort != 0 {
			ol += 8
		}
		if ol+n+e.overheadBound() > mtu && ol+n+e.SA.Overhead(n, 0) > mtu {
			fit := maxInner(e.SA, ol, mtu)
			if ip[0]>>4 == 6 || ip[6]&0x40 != 0 {
				// DF or IPv6: the sender must make it smaller (RFC 1191,
				// RFC 8201); tell it the inner MTU that fits.
				e.Counters.Drops.Add(1)
				if p.icmpToCore(e, d, frame, off, l3, ip, icmpTooBig, fit) {
					p.stats.Encap.Drops[DropTooBig].Add(1)
					return d, held
				}
				return d, DropTooBig
			}
			frag = fit
		}
	}
	decTTL(ip)
	// Last, after every check that quotes or answers the packet as the
	// core sent it: the core address becomes the phone's inner address.
	if why := xlateOut(e, ip); why != 0 {
		e.Counters.Drops.Add(1)
		return d, why
	}
	if frag > 0 {
		return p.prefragment(e, d, frame, l3, n, frag)
	}
	return p.seal(e, d, frame, l3, n)
}

// seal seals the cleartext IP packet frame[l3:l3+n] of d's frame with the
// outbound entry e and writes the outer and Ethernet headers: the frame
// to transmit on the public side, or held (parked for the next hop's MAC)
// or a drop.
func (p *pipeline) seal(e *Slot, d xsk.Desc, frame []byte, l3, n int) (xsk.Desc, Drop) {
	nh := uint8(esp.NextHeaderIPv4)
	if frame[l3]>>4 == 6 {
		nh = esp.NextHeaderIPv6
	}
	return p.sealWith(e, e.Binding.Load(), d, frame, l3, n, nh, p.outerTOS(e, tosOf(frame[l3:])))
}

// sealWith seals the payload frame[l3:l3+n] with Next Header nh toward
// peer, the outer header carrying tos: a tunnel-mode inner packet (seal)
// or a transport-mode segment (transportOut, which addressed its checksum
// to peer).
func (p *pipeline) sealWith(e *Slot, peer *Peer, d xsk.Desc, frame []byte, l3, n int, nh, tos uint8) (xsk.Desc, Drop) {
	if limit := e.Limit.Load(); limit != 0 {
		next := e.SA.NextSeq()
		if next >= e.ExtendAt.Load() && e.asked != limit {
			select {
			case p.seqRequests <- SeqRequest{Worker: p.id, Index: e.index}:
				e.asked = limit
			default: // asked again on the next packet
			}
		}
		if next >= limit {
			e.Counters.Drops.Add(1)
			return d, DropSeqUnreserved
		}
	}
	p.touch(e)
	start, end, err := e.SA.Seal(frame, l3, n, nh, 0)
	if err != nil {
		e.Counters.Drops.Add(1)
		return d, Drop(esp.ReasonOf(err))
	}
	o := esp.Outer{Src: e.Scope().Local, Dst: peer.Addr.Addr(), Encap: e.LocalPort != 0, SrcPort: e.LocalPort, DstPort: peer.Addr.Port(),
		TOS: tos, TTL: p.outerTTL}
	if o.Src.Is4() {
		o.ID = p.frag.nextIPID()
	}
	s, err := esp.PutOuter(frame, start, end, &o)
	if err != nil || s < ethLen+4 {
		e.Counters.Drops.Add(1)
		return d, Drop(esp.ReasonNoRoom)
	}
	e.Counters.Packets.Add(1)
	e.Counters.Bytes.Add(uint64(n))
	e.Counters.Seq.Store(e.SA.NextSeq() - 1)
	// Its counters moved: the next snapshot exports them.
	if e.marks&markDirty == 0 {
		p.markDirty(e)
	}
	l2 := putL2(frame, s, p.pubMAC, p.pubTag, etherType(frame[s:]))
	h := frame[l2:s]
	base := p.mem.FrameBase(d.Addr)
	out := xsk.Desc{Addr: base + uint64(l2), Len: uint32(end - l2)}
	if !peer.HasMAC {
		mac, ok := p.lookup(o.Dst)
		if !ok {
			return p.park(out, o.Dst, toPublic)
		}
		copy(h[0:6], mac[:])
		return out, 0
	}
	copy(h[0:6], peer.MAC[:])
	return out, 0
}

// lenIs says the IP header at ip[0] (version checked by the caller)
// claims n bytes: the metadata's length is the one sealed, and one that
// disagreed with the header would seal a packet cut short or padded.
func lenIs(ip []byte, n int) bool {
	if ip[0]>>4 == 4 {
		return n >= 20 && int(binary.BigEndian.Uint16(ip[2:])) == n
	}
	return n >= 40 && 40+int(binary.BigEndian.Uint16(ip[4:])) == n
}

func srcAddr(ip []byte) netip.Addr {
	if len(ip) >= 20 && ip[0]>>4 == 4 {
		return netip.AddrFrom4([4]byte(ip[12:16]))
	}
	if len(ip) >= 40 && ip[0]>>4 == 6 {
		return netip.AddrFrom16([16]byte(ip[8:24]))
	}
	return netip.Addr{}
}

func dstAddr(ip []byte) netip.Addr {
	if len(ip) >= 20 && ip[0]>>4 == 4 {
		return netip.AddrFrom4([4]byte(ip[16:20]))
	}
	if len(ip) >= 40 && ip[0]>>4 == 6 {
		return netip.AddrFrom16([16]byte(ip[24:40]))
	}
	return netip.Addr{}
}

// putL2 writes an Ethernet header from src, with the 802.1Q/802.1ad tag
// when tag is set (TPID<<16 | TCI), ending at l3, and returns where it
// starts; the caller writes the destination MAC there.
func putL2(frame []byte, l3 int, src [6]byte, tag uint32, etype uint16) int {
	n := ethLen
	if tag != 0 {
		n += 4
	}
	h := frame[l3-n : l3]
	copy(h[6:12], src[:])
	if tag != 0 {
		binary.BigEndian.PutUint32(h[12:], tag)
	}
	binary.BigEndian.PutUint16(h[n-2:], etype)
	return l3 - n
}

func etherType(ip []byte) uint16 {
	if len(ip) > 0 && ip[0]>>4 == 6 {
		return 0x86dd
	}
	return 0x0800
}
