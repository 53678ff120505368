package worker

import (
	"net/netip"
	"sync/atomic"

	"github.com/xesp/xesp/dataplane/esp"
)

// Direction of an SA, seen from the gateway.
type Direction uint8

const (
	Inbound  Direction = iota // public → private: open
	Outbound                  // private → public: seal
)

// Slot is one SA as its worker holds it. After Install the worker owns
// SA; the manager only reads Counters and Binding.
//
// Fields are ordered by use: what every packet reads (direction, SA,
// counters, binding, selectors) comes first, so a packet touches the
// slot's first cache lines; NewSlot puts the Transform right behind, in
// the same allocation. What the SAs of a gateway share (its address, the
// core network, lifetimes) lives once in a Scope the slot points to: a
// million-SA gateway holds a handful of Scopes, not a million copies.
type Slot struct {
	SA  *esp.Transform
	Dir Direction
	// Transport marks a transport-mode SA (transport.go): the phone's
	// segments, sent to the gateway's public address, are re-addressed
	// from Core to the Scope's Dest (inbound), and the core's packets to
	// Core are re-addressed from the Scope's Local to the binding and
	// sealed without their IP header (outbound). Core is required.
	Transport bool
	// Proto is the inner protocol selector (0: any).
	Proto uint8
	// DSCP, when FixDSCP is set, is written into the outer header of
	// sealed packets instead of the inner packet's DSCP.
	DSCP    uint8
	FixDSCP bool
	// marks: markDirty, its replay window (inbound) or counters may have changed
	// since the last Dirty export, the entry is on the worker's dirty
	// list; markListed, the entry is on the worker's cipher wheel
	// (idle.go). Worker thread only.
	marks uint8
	// ipBits is InnerPeer's length plus one (0: none); fams says the
	// families of InnerPeer (famPeer4) and Core (famCore4, famCore6).
	ipBits, fams uint8
	// LocalPort is the UDP source port of outbound packets (RFC 3948); 0
	// means plain ESP.
	LocalPort uint16
	// PortLocal and PortPeer are the inner UDP/TCP port selectors (0:
	// any): inbound, cleartext must go from PortPeer to PortLocal;
	// outbound, an entry with PortLocal set serves only cleartext from
	// that port, and the worker hands other ports to the outbound entry
	// with the same InnerPeer whose ports match (IMS sec-agree gives a
	// phone two outbound SAs, told apart by port).
	PortLocal, PortPeer uint16
	maxOverhead         uint16 // bound on what sealing adds (0: not computed yet), see overheadBound
	index               uint32 // slot in the worker's table, set by Install
	used                uint32 // the worker's idle clock at the last packet (idle.go)

	Counters Counters
	// Binding is shared by the SAs of one pair group on this worker: what
	// the inbound SA learns, the outbound SA uses.
	Binding *Binding
	// scope is the SA's shared part (SetScope); nil reads as the zero
	// Scope.
	scope *Scope

	// innerPeer and core are InnerPeer's address and Core (SetSelectors),
	// 16 bytes each (As16) where netip's forms take 32 and 24.
	innerPeer, core [16]byte

	// Limit is, for outbound SAs, the first sequence number the worker
	// may not send: everything below it is durably reserved (seqstore),
	// so a restart can never reuse a GCM/ChaCha IV. Zero means no
	// reservation is kept (no state directory). ExtendAt is where the
	// worker asks the manager for the next block, well before Limit.
	Limit, ExtendAt atomic.Uint64
	asked           uint64 // the Limit an extension was last requested for
}

// Scope is the part of a Slot that the SAs of a gateway have in common,
// held once per distinct value (SetScope interns it) and never modified.
type Scope struct {
	// InnerLocal is the core side of the selectors: inbound, the prefix
	// inner destinations must fall in; outbound, the prefix cleartext
	// sources must fall in. Invalid (zero) disables the check.
	InnerLocal netip.Prefix
	// Local is the outer source address of outbound packets.
	Local netip.Addr
	// Dest is a transport-mode inbound SA's core-side host (inner.local,
	// one address, e.g. the P-CSCF).
	Dest netip.Addr
	// HardPackets and HardBytes are the SA's hard lifetime (0: none). The
	// worker checks them per packet, so the SA never carries a packet
	// past its hard packet limit, nor starts one once its byte count
	// reached the hard byte limit (the packet that crosses it passes:
	// its size is known only after it was processed); the lifetime
	// package removes the SA and raises the event within its interval.
	HardPackets, HardBytes uint64
}

var noScope Scope

// SetScope gives the slot its shared part, interned: slots with equal
// Scopes point at one copy. Before Install only.
func (e *Slot) SetScope(s Scope) { e.scope = intern(s) }

// Scope returns the slot's shared part; it must not be modified.
func (e *Slot) Scope() *Scope {
	if e.scope == nil {
		return &noScope
	}
	return e.scope
}

// Slot.marks and Slot.fams bits.
const (
	markDirty = 1 << iota
	markListed
)

const (
	famPeer4 = 1 << iota
	famCore4
	famCore6
)

// SetSelectors sets the phone's side of the SA's selectors and its core
// address (InnerPeer, Core; zones are not kept). Before Install only.
func (e *Slot) SetSelectors(innerPeer netip.Prefix, core netip.Addr) {
	e.ipBits, e.fams, e.innerPeer, e.core = 0, 0, [16]byte{}, [16]byte{}
	if innerPeer.IsValid() {
		e.ipBits, e.innerPeer = uint8(innerPeer.Bits()+1), innerPeer.Addr().As16()
		if innerPeer.Addr().Is4() {
			e.fams |= famPeer4
		}
	}
	switch {
	case core.Is4():
		e.fams |= famCore4
	case core.IsValid():
		e.fams |= famCore6
	}
	if core.IsValid() {
		e.core = core.As16()
	}
}

// InnerPeer is the phone's side of the SA's selectors (RFC 4301 5.2):
// inbound, the prefix inner source addresses must fall in, so one phone
// cannot inject packets that claim another's address; outbound, the
// prefix the cleartext destination must fall in, so a frame XDP steered
// to a slot just before it was reused for another phone's SA is dropped,
// never sealed for that phone. Invalid (zero) disables the check.
func (e *Slot) InnerPeer() netip.Prefix {
	if e.ipBits == 0 {
		return netip.Prefix{}
	}
	a := netip.AddrFrom16(e.innerPeer)
	if e.fams&famPeer4 != 0 {
		a = netip.AddrFrom4([4]byte(e.innerPeer[12:]))
	}
	return netip.PrefixFrom(a, int(e.ipBits)-1)
}

// Core is the phone's core address (docs/addressing.md), invalid when it
// has none; the phone's own inner address is then InnerPeer's (a single
// address, sa.SA guarantees it; see inner). Inbound, after every check,
// the inner source becomes Core; outbound, the cleartext must be
// addressed to Core (not InnerPeer), and Core becomes the inner address
// before sealing. See xlate.go.
func (e *Slot) Core() netip.Addr {
	switch {
	case e.fams&famCore4 != 0:
		return netip.AddrFrom4([4]byte(e.core[12:]))
	case e.fams&famCore6 != 0:
		return netip.AddrFrom16(e.core)
	}
	return netip.Addr{}
}

// hasCore says whether the SA has a core address (Core is valid).
func (e *Slot) hasCore() bool { return e.fams&(famCore4|famCore6) != 0 }

// inner is the phone's own inner address, which the core address stands
// for (valid only when Core is): InnerPeer's one address.
func (e *Slot) inner() netip.Addr { return e.InnerPeer().Addr() }

// slotAndSA is a Slot and its Transform in one allocation (NewSlot): 288
// bytes with the replay window's words allocated apart, on the SA's first
// authenticated packet (esp.ReplayWindow), so an SA that never carried a
// packet keeps none.
type slotAndSA struct {
	Slot
	t esp.Transform
}

// NewSlot returns a Slot whose SA is built from c (esp.InitTransform) in
// the same allocation as the slot: one object per idle SA, its packet
// state in adjacent cache lines. The caller fills in the rest.
func NewSlot(c esp.Config) (*Slot, error) {
	x := new(slotAndSA)
	if err := esp.InitTransform(&x.t, c, nil); err != nil {
		return nil, err
	}
	x.SA = &x.t
	return &x.Slot, nil
}

// overheadBound is an upper bound on what sealing adds to any payload, the
// MTU check's fast path, computed once per entry.
func (e *Slot) overheadBound() int {
	if e.maxOverhead == 0 {
		e.maxOverhead = uint16(e.SA.Headroom() + e.SA.MaxTailroom())
	}
	return int(e.maxOverhead)
}

// expired says the SA reached a hard packet or byte lifetime and must not
// carry another packet (RFC 4301 4.4.2.1). Only the worker writes the
// counters, so its own loads are exact.
func (e *Slot) expired() bool {
	sc := e.Scope()
	return (sc.HardPackets != 0 && e.Counters.Packets.Load() >= sc.HardPackets) ||
		(sc.HardBytes != 0 && e.Counters.Bytes.Load() >= sc.HardBytes)
}

// Counters are one SA's figures, written by its worker, read by the API.
type Counters struct {
	Packets atomic.Uint64 // accepted (opened or sealed)
	Bytes   atomic.Uint64 // payload bytes of accepted packets
	Drops   atomic.Uint64 // packets for this SA that were dropped
	// Seq is the highest sequence number accepted (inbound) or the last
	// one sent (outbound): what the manager persists as a high-water mark.
	Seq atomic.Uint64
	// LastSeen is when (unix ns, batch time) the last authenticated packet
	// arrived on an inbound SA; 0 never. Idle-phone detection reads it.
	LastSeen atomic.Int64
}

// Peer is an SA pair's NAT binding: where the phone's packets come from,
// which is where replies must go.
type Peer struct {
	Addr netip.AddrPort // outer address and UDP port; port 0 for plain ESP
	// MAC is the Ethernet source of the last authenticated packet: the next
	// hop toward the peer (its NAPT or router). Zero until one arrived.
	MAC    [6]byte
	HasMAC bool
}

// Binding holds a Peer that its worker replaces (never mutates) on change,
// so readers on other goroutines always see a consistent value.
type Binding struct {
	v atomic.Pointer[Peer]
	// out is the first outbound entry installed with this binding: where
	// an ICMP error for the phone is sealed (pipeline.track). The SAs
	// sharing a binding live on one worker; only its thread uses out.
	out *Slot
}

// NewBinding starts a binding at the configured peer.
func NewBinding(p Peer) *Binding {
	b := &Binding{}
	b.v.Store(&p)
	return b
}

// Load returns the current peer.
func (b *Binding) Load() *Peer { return b.v.Load() }

// Set replaces the peer, e.g. when an operator moves a binding through the
// API. The worker's own learning may replace it again after the next
// authenticated packet from elsewhere.
func (b *Binding) Set(p Peer) { b.v.Store(&p) }

// Command installs (Entry != nil) or removes (Entry == nil) the SA at Index
// of a worker's table. Inherit makes an install that replaces an entry of
// the same SPI and direction continue its state (Inherit), applied on the
// worker's own thread so no packet is lost or raced. Done, when not nil,
// is closed once the worker has applied every command up to and including
// this one (for a Drain removal: once that removal is done).
type Command struct {
	Index   uint32
	Entry   *Slot
	Inherit bool
	// Drain makes a removal wait until the worker has taken every frame
	// that was already in its RX rings (and slow-path queue) when it
	// applied the command, so frames XDP steered to the slot before it
	// was unpublished are still processed by the SA, not dropped as
	// no_sa. The worker goes on with later commands and packets
	// meanwhile; Done (and Visit) come when the entry is gone. The sender
	// must unpublish the slot, let XDP runs in flight end, and not
	// reuse Index before Done.
	Drain bool
	// Visit, when set, is called on the worker's thread with its table
	// after the command's install or removal: the one safe moment to read
	// state only the worker writes (replay windows) without a race.
	Visit func(table []*Slot)
	// Dirty, when set, is called on the worker's thread (after Visit)
	// with its table and the slots of up to DirtyChunk inbound entries
	// whose replay windows may have changed since their last Dirty call:
	// installed since, or authenticated a packet since. Those leave the
	// dirty list; the rest wait for the next call. So a snapshot exports
	// what changed, never a sweep of every SA. The slice is valid only
	// during the call; a slot may have been emptied or reused since it
	// was listed (compare the entry).
	Dirty func(table []*Slot, slots []uint32)
	Done  chan struct{}
}

// DirtyChunk is the most slots one Command.Dirty call gets: ~0.5 ms of
// exports, so a snapshot never stalls the worker long enough to overflow
// its RX rings.
const DirtyChunk = 4096

// Inherit makes to, a rebuilt version of the SA from (e.g. new keys), go
// on where from stopped: its sequence counter (never rewound: that would
// reuse IVs), replay window and counters. from must not be in use by a
// worker while this runs.
func Inherit(to, from *Slot) {
	if next := from.SA.NextSeq(); next > to.SA.NextSeq() {
		to.SA.SetNextSeq(next)
	}
	if from.SA.Replay().Size() == to.SA.Replay().Size() {
		to.SA.Replay().Import(from.SA.Replay().Export())
	}
	to.Counters.Packets.Store(from.Counters.Packets.Load())
	to.Counters.Bytes.Store(from.Counters.Bytes.Load())
	to.Counters.Drops.Store(from.Counters.Drops.Load())
	to.Counters.Seq.Store(from.Counters.Seq.Load())
	to.Counters.LastSeen.Store(from.Counters.LastSeen.Load())
}

// SeqRequest asks the manager to reserve more sequence numbers for the
// outbound SA at Index.
type SeqRequest struct {
	Worker int
	Index  uint32
}

// BindingChange tells the manager that the SA at Index moved its binding.
type BindingChange struct {
	Worker int
	Index  uint32
	Peer   Peer
}

// markDirty puts e on the dirty list: once per entry between two exports,
// so the list is bounded by the table and a busy SA costs one branch per
// packet.
func (p *pipeline) markDirty(e *Slot) {
	e.marks |= markDirty
	p.dirty = append(p.dirty, e.index)
}

// takeDirty hands up to DirtyChunk dirty slots to f and takes them off
// the list. A listed slot whose entry was removed or replaced since is
// passed anyway (f compares entries); a replacement was listed on its
// own install.
func (p *pipeline) takeDirty(f func(table []*Slot, slots []uint32)) {
	n := min(len(p.dirty), DirtyChunk)
	slots := p.dirty[:n]
	for _, i := range slots {
		if int(i) < len(p.table) && p.table[i] != nil {
			p.table[i].marks &^= markDirty
		}
	}
	f(p.table, slots)
	rest := copy(p.dirty, p.dirty[n:])
	p.dirty = p.dirty[:rest]
}
