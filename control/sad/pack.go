package sad

import (
	"net/netip"
	"unsafe"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
)

// packed is an SA as the SAD stores it: 120 bytes instead of sa.SA's
// 328, with five pointers instead of ten (the garbage collector marks
// every entry's pointers on every cycle). Addresses are 16 bytes and a
// family each (netip.Addr is 24 with a pointer); the outer local address
// and the inner local prefix, which most SAs share (the gateway's
// address, the core network), are interned (sh); the fields most SAs
// leave unset live behind x, nil when they all are. pack and unpack
// convert losslessly for every SA check accepts (no IPv6 zones).
type packed struct {
	name string
	// encKey points at the SA's key (shared with the SA given to Add and
	// the Records handed out), whose length its proposal fixes (sa.Parse
	// checks it): 8 bytes where a slice header takes 24. A key of
	// another length, or empty but not nil, is kept in x (key).
	encKey *byte
	x      *rare
	sh     *shared
	// encap is the SA's own (immutable) Encap, or one shared copy of the
	// usual 4500/4500: Records handed out point at it, so a Get
	// allocates nothing (the slow path looks SAs up per packet).
	encap *sa.Encap
	// Outer peer, inner peer prefix, core.
	peer, innerPeer, core [16]byte
	spi, replay           uint32
	portLocal, portPeer   uint16
	innerPeerBits         uint8 // prefix length plus one (0: no prefix)
	dir                   sa.Direction
	mode                  sa.Mode
	proposal              esp.Proposal
	proto, dscp           uint8
	flags                 uint8
	fams                  uint16 // 2 bits per address: famNone, fam4, fam6
}

// shared holds the fields many SAs have in common; a SAD keeps one per
// distinct value (SAD.adopt), counted.
type shared struct {
	sharedVal
	refs int
}

type sharedVal struct {
	local, innerLocal [16]byte
	innerLocalBits    uint8 // prefix length plus one (0: no prefix)
	fams              uint16
}

// rare holds the SA fields that are usually unset.
type rare struct {
	pair     string
	authKey  sa.Secret
	lifetime sa.Lifetime
	idle     uint64
	encKey   sa.Secret // when odd (see packed.encKey)
	oddKey   bool
}

const (
	flagESN = 1 << iota
	flagDSCP
)

// encapDefault is the Encap most SAs have (RFC 3948's port both ways).
var encapDefault = &sa.Encap{LocalPort: 4500, PeerPort: 4500}

const (
	famNone = iota
	fam4
	fam6
)

// Address slots in packed.fams (and the binding's in entry.bindFam).
const (
	slotLocal = iota
	slotPeer
	slotInnerLocal
	slotInnerPeer
	slotCore
)

func packAddr(a netip.Addr) ([16]byte, uint16) {
	switch {
	case !a.IsValid():
		return [16]byte{}, famNone
	case a.Is4():
		return a.As16(), fam4
	}
	return a.As16(), fam6
}

func unpackAddr(b [16]byte, fam uint16) netip.Addr {
	switch fam {
	case fam4:
		return netip.AddrFrom16(b).Unmap()
	case fam6:
		return netip.AddrFrom16(b)
	}
	return netip.Addr{}
}

// hasZone says whether any of s's addresses carries an IPv6 zone, which
// the packed form does not keep (sa.Parse never produces one).
func hasZone(s *sa.SA) bool {
	return s.Local.Zone() != "" || s.Peer.Zone() != "" || s.Core.Zone() != ""
}

// pack returns s's packed form and its shared part, which adopt turns
// into p.sh.
func pack(s *sa.SA) (packed, sharedVal) {
	p := packed{
		name: s.Name, spi: s.SPI, replay: s.ReplayWindow,
		portLocal: s.Ports.Local, portPeer: s.Ports.Peer, proto: s.Ports.Proto, dscp: s.DSCP,
		dir: s.Direction, mode: s.Mode, proposal: s.Proposal,
	}
	oddKey := len(s.EncKey) != s.Proposal.EncKeyLen() || len(s.EncKey) == 0 && s.EncKey != nil
	if !oddKey && len(s.EncKey) > 0 {
		p.encKey = &s.EncKey[0]
	}
	var f uint16
	var sh sharedVal
	sh.local, f = packAddr(s.Local)
	sh.fams |= f << (2 * slotLocal)
	p.peer, f = packAddr(s.Peer)
	p.fams |= f << (2 * slotPeer)
	p.core, f = packAddr(s.Core)
	p.fams |= f << (2 * slotCore)
	if s.InnerLocal.IsValid() {
		sh.innerLocal, f = packAddr(s.InnerLocal.Addr())
		sh.fams |= f << (2 * slotInnerLocal)
		sh.innerLocalBits = uint8(s.InnerLocal.Bits() + 1)
	}
	if s.InnerPeer.IsValid() {
		p.innerPeer, f = packAddr(s.InnerPeer.Addr())
		p.fams |= f << (2 * slotInnerPeer)
		p.innerPeerBits = uint8(s.InnerPeer.Bits() + 1)
	}
	if s.ESN {
		p.flags |= flagESN
	}
	if s.HasDSCP {
		p.flags |= flagDSCP
	}
	if p.encap = s.Encap; p.encap != nil && *p.encap == *encapDefault {
		p.encap = encapDefault
	}
	if s.Pair != "" || s.AuthKey != nil || s.Lifetime != (sa.Lifetime{}) || s.IdleTimeout != 0 || oddKey {
		p.x = &rare{pair: s.Pair, authKey: s.AuthKey, lifetime: s.Lifetime, idle: s.IdleTimeout}
		if oddKey {
			p.x.encKey, p.x.oddKey = s.EncKey, true
		}
	}
	return p, sh
}

func (p *packed) fam(slot int) uint16 { return (p.fams | p.sh.fams) >> (2 * slot) & 3 }

// key is the SA's encryption key, the slice it was added with.
func (p *packed) key() sa.Secret {
	switch {
	case p.x != nil && p.x.oddKey:
		return p.x.encKey
	case p.encKey == nil:
		return nil
	}
	return unsafe.Slice(p.encKey, p.proposal.EncKeyLen())
}

func (p *packed) unpack() sa.SA {
	s := sa.SA{
		Name: p.name, SPI: p.spi, Direction: p.dir, Mode: p.mode, Proposal: p.proposal,
		EncKey: p.key(), ESN: p.flags&flagESN != 0, ReplayWindow: p.replay,
		Local: unpackAddr(p.sh.local, p.fam(slotLocal)), Peer: unpackAddr(p.peer, p.fam(slotPeer)),
		Core:  unpackAddr(p.core, p.fam(slotCore)),
		Ports: sa.Ports{Local: p.portLocal, Peer: p.portPeer, Proto: p.proto},
		DSCP:  p.dscp, HasDSCP: p.flags&flagDSCP != 0,
	}
	if sh := p.sh; sh.innerLocalBits != 0 {
		s.InnerLocal = netip.PrefixFrom(unpackAddr(sh.innerLocal, p.fam(slotInnerLocal)), int(sh.innerLocalBits)-1)
	}
	if p.innerPeerBits != 0 {
		s.InnerPeer = netip.PrefixFrom(unpackAddr(p.innerPeer, p.fam(slotInnerPeer)), int(p.innerPeerBits)-1)
	}
	s.Encap = p.encap
	if x := p.x; x != nil {
		s.Pair, s.AuthKey, s.Lifetime, s.IdleTimeout = x.pair, x.authKey, x.lifetime, x.idle
	}
	return s
}

// id is the SA's identity (sa.SA.ID) without unpacking it.
func (p *packed) id() sa.ID {
	id := sa.ID{Dir: p.dir, SPI: p.spi}
	if p.dir == sa.Out {
		id.Peer = netip.AddrPortFrom(unpackAddr(p.peer, p.fam(slotPeer)), p.peerPort())
	}
	return id
}

func (p *packed) peerPort() uint16 {
	if p.encap != nil {
		return p.encap.PeerPort
	}
	return 0
}

// label is sa.SA.Label.
func (p *packed) label() string { return (&sa.SA{Name: p.name, SPI: p.spi}).Label() }

// adopt points p at the SAD's copy of its shared fields v, counting the
// reference (the SAD's write lock is held); only a new value allocates.
func (d *SAD) adopt(p *packed, v sharedVal) {
	if sh, ok := d.shared[v]; ok {
		sh.refs++
		p.sh = sh
		return
	}
	p.sh = &shared{sharedVal: v, refs: 1}
	d.shared[v] = p.sh
}

// release drops p's reference to its shared fields.
func (d *SAD) release(p *packed) {
	if p.sh.refs--; p.sh.refs == 0 {
		delete(d.shared, p.sh.sharedVal)
	}
}
