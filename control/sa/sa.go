// Package sa owns the one representation of an ESP security association
// that people and programs hand to xesp (docs/sa-format.md): the Spec as written
// in YAML or JSON, its validation into a typed SA, and the SA file reader.
//
// It decides what a valid SA is and says precisely why one is not; it holds
// no runtime state (bindings, counters, worker placement belong to the SAD)
// and does no packet work. Keys never leave this package in a printable
// form: SA's String, GoString, JSON and YAML forms are redacted.
package sa

import (
	"crypto/subtle"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/xesp/xesp/dataplane/esp"
)

// Direction says which way an SA protects traffic, seen from this gateway.
type Direction uint8

// The zero Direction is invalid so an unset field is caught.
const (
	DirInvalid Direction = iota
	In                   // peer -> gateway: decrypt, replay check, binding learning
	Out                  // gateway -> peer: encrypt, sequence numbers
)

func (d Direction) String() string {
	switch d {
	case In:
		return "in"
	case Out:
		return "out"
	}
	return fmt.Sprintf("direction(%d)", uint8(d))
}

// Mode is the ESP mode: tunnel carries a whole inner IP packet, transport
// only the upper-layer payload.
type Mode uint8

// The zero Mode is invalid so an unset field is caught.
const (
	ModeInvalid Mode = iota
	Tunnel
	Transport
)

func (m Mode) String() string {
	switch m {
	case Tunnel:
		return "tunnel"
	case Transport:
		return "transport"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// Secret is key material. It converts to []byte implicitly where a
// function takes []byte, but every printing or encoding path shows
// "[redacted]" so a log line or an API answer cannot leak it.
type Secret []byte

const redacted = "[redacted]"

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) Format(f fmt.State, _ rune)   { _, _ = f.Write([]byte(redacted)) }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Secret) MarshalYAML() (any, error)    { return redacted, nil }

// Encap is RFC 3948 UDP encapsulation: the ports on this side and the far
// side. The far side's port is the first NAT binding; NAT re-mapping
// changes the binding (held by the SAD), never this.
type Encap struct {
	LocalPort uint16
	PeerPort  uint16
}

// Lifetime holds the RFC 4301 soft and hard limits. Zero means no limit.
type Lifetime struct {
	SoftBytes, HardBytes     uint64
	SoftPackets, HardPackets uint64
	SoftSeconds, HardSeconds uint64
}

// SA is a validated security association. Values come only from
// Spec.Parse (or the file readers built on it), so every field holds
// together: key lengths match the proposal, addresses share a family,
// tunnel mode has selectors. Treat it as immutable: copies share the key
// slices.
type SA struct {
	Name      string // optional label, unique within a SAD when set
	Pair      string // optional explicit pairing label (see the SAD's pairing rule)
	SPI       uint32
	Direction Direction
	Mode      Mode
	Proposal  esp.Proposal
	EncKey    Secret // AEADs: key || 4-byte salt
	AuthKey   Secret // only for proposals with a separate integrity algorithm
	ESN       bool
	// ReplayWindow is the anti-replay window in packets for inbound SAs:
	// 32..4096, or 0 when anti-replay is disabled. Always 0 for outbound.
	ReplayWindow uint32
	Local, Peer  netip.Addr // outer addresses, same family, no zone
	Encap        *Encap     // nil: plain ESP (IP protocol 50)
	// InnerLocal and InnerPeer are the tunnel-mode selectors (canonical
	// prefixes of one family). Transport mode: InnerLocal is the one
	// core-side address (a /32 or /128) the phone's segments are
	// delivered to and replies must come from; InnerPeer is invalid.
	InnerLocal, InnerPeer netip.Prefix
	// Core is the phone's core address (docs/addressing.md): an address
	// on the private side, unique per phone, that stands for the phone
	// toward the SIP core. Decap rewrites the inner source InnerPeer's
	// address to it, encap finds the SA by it (exact match) and rewrites
	// it back. Invalid (zero) when the SA has none; when set, InnerPeer
	// is a single address of the same family. Both SAs of a pair (all
	// four of a sec-agree registration) name the same one. Transport
	// mode requires one (the SAD refuses the SA without): it is the
	// source of the phone's segments toward InnerLocal, and the address
	// replies are sealed for.
	Core     netip.Addr
	Lifetime Lifetime
	// Ports are the inner port selectors (RFC 4301 4.4.1.1); zero is any.
	// Inbound, the cleartext must come from Peer to Local; outbound, a
	// phone's cleartext is sealed with the outbound SA whose ports match
	// (the worker chooses among the SAs to one inner address).
	Ports Ports
	// DSCP is the fixed outer DSCP of an outbound SA when HasDSCP.
	DSCP    uint8
	HasDSCP bool
	// IdleTimeout is the inbound SA's idle timeout in seconds (0: the
	// gateway's idle.timeout).
	IdleTimeout uint64
}

// Equal says whether s and o are the same SA, every field and both keys
// alike (a nil and an empty key are the same key). It is reflect's deep
// equality without its cost: the gateway compares each of a million
// SAs with the config's to tell the API's apart, where DeepEqual's
// boxing of two 300-byte values took ~5 µs an SA.
// TestEqualSeesEveryField fails when a field is added and not here.
func (s *SA) Equal(o *SA) bool {
	return s.Name == o.Name && s.Pair == o.Pair && s.SPI == o.SPI &&
		s.Direction == o.Direction && s.Mode == o.Mode && s.Proposal == o.Proposal &&
		subtle.ConstantTimeCompare(s.EncKey, o.EncKey) == 1 &&
		subtle.ConstantTimeCompare(s.AuthKey, o.AuthKey) == 1 &&
		s.ESN == o.ESN && s.ReplayWindow == o.ReplayWindow &&
		s.Local == o.Local && s.Peer == o.Peer &&
		(s.Encap == nil) == (o.Encap == nil) && (s.Encap == nil || *s.Encap == *o.Encap) &&
		s.InnerLocal == o.InnerLocal && s.InnerPeer == o.InnerPeer && s.Core == o.Core &&
		s.Lifetime == o.Lifetime && s.Ports == o.Ports &&
		s.DSCP == o.DSCP && s.HasDSCP == o.HasDSCP && s.IdleTimeout == o.IdleTimeout
}

// Ports are inner UDP/TCP port selectors: Local on this side (the SIP
// core's), Peer on the phone's. Zero means any. Proto is the inner
// protocol selector (0: any).
type Ports struct {
	Local, Peer uint16
	Proto       uint8
}

var protoNames = map[string]uint8{"icmp": 1, "tcp": 6, "udp": 17, "ipv6-icmp": 58}

// ProtoName is how the SA format writes protocol p ("" for 0: any).
func ProtoName(p uint8) string {
	for n, v := range protoNames {
		if v == p {
			return n
		}
	}
	if p == 0 {
		return ""
	}
	return strconv.Itoa(int(p))
}

// ID is an SA's identity in a SAD. An inbound SA is found by the XDP
// program from its SPI alone, so inbound identity is (in, SPI). Outbound
// SPIs are chosen by the peers, and two phones behind one NAPT may pick
// the same SPI, so outbound identity adds the configured peer address and
// encapsulation port (0 for plain ESP).
type ID struct {
	Dir  Direction
	SPI  uint32
	Peer netip.AddrPort // zero for inbound
}

// ID returns the SA's identity.
func (s SA) ID() ID {
	id := ID{Dir: s.Direction, SPI: s.SPI}
	if s.Direction == Out {
		var port uint16
		if s.Encap != nil {
			port = s.Encap.PeerPort
		}
		id.Peer = netip.AddrPortFrom(s.Peer, port)
	}
	return id
}

func (id ID) String() string {
	if id.Dir == Out {
		return fmt.Sprintf("out 0x%08x to %s", id.SPI, id.Peer)
	}
	return fmt.Sprintf("%s 0x%08x", id.Dir, id.SPI)
}

// Label names the SA in messages: by name when it has one, else by SPI.
func (s SA) Label() string {
	if s.Name != "" {
		return fmt.Sprintf("sa %q", s.Name)
	}
	return fmt.Sprintf("sa 0x%08x", s.SPI)
}

// String summarises the SA without key material.
func (s SA) String() string {
	return fmt.Sprintf("%s %s %s %s %s->%s", s.Label(), s.Direction, s.Mode, s.Proposal, s.Local, s.Peer)
}

// GoString is redacted too, so %#v cannot print the keys.
func (s SA) GoString() string { return "sa.SA{" + s.String() + "}" }

// MarshalJSON encodes the public view: an SA never carries its keys out
// through the API.
func (s SA) MarshalJSON() ([]byte, error) { return jsonMarshal(s.Public()) }

// MarshalYAML encodes the public view, without keys.
func (s SA) MarshalYAML() (any, error) { return s.Public(), nil }

// Key is an ID in a compact, pointer-free form (24 bytes; an ID's
// netip.AddrPort holds a pointer): for maps and heaps that hold one per
// SA, which the garbage collector then does not scan, and which cost 16
// bytes less per entry. KeyOf and Key.ID convert losslessly (SA peers
// never carry an IPv6 zone).
type Key struct {
	addr [16]byte
	spi  uint32
	port uint16
	dir  Direction
	fam  uint8 // 0: no peer (inbound), 4 or 6
}

// Key returns id's compact form.
func (id ID) Key() Key {
	k := Key{spi: id.SPI, dir: id.Dir, port: id.Peer.Port()}
	if a := id.Peer.Addr(); a.IsValid() {
		k.addr = a.As16()
		k.fam = 6
		if a.Is4() {
			k.fam = 4
		}
	}
	return k
}

// ID returns the identity k stands for.
func (k Key) ID() ID {
	id := ID{Dir: k.dir, SPI: k.spi}
	switch k.fam {
	case 4:
		id.Peer = netip.AddrPortFrom(netip.AddrFrom16(k.addr).Unmap(), k.port)
	case 6:
		id.Peer = netip.AddrPortFrom(netip.AddrFrom16(k.addr), k.port)
	}
	return id
}
