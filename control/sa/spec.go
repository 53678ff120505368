package sa

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Spec is an SA as a person or a program writes it (docs/sa-format.md). Field
// names and their YAML/JSON tags are the format; Parse turns a Spec into an
// SA. Absent and zero differ where the format says so (replay_window,
// encap ports), hence the pointers.
type Spec struct {
	Name string `yaml:"name,omitempty" json:"name,omitempty"`
	// Pair groups SAs that must share a worker and a NAT binding when the
	// derived rule (same peer, encap port and inner peer) does not fit.
	Pair      string   `yaml:"pair,omitempty" json:"pair,omitempty"`
	SPI       SPIValue `yaml:"spi" json:"spi"`
	Direction string   `yaml:"direction" json:"direction"`
	Mode      string   `yaml:"mode" json:"mode"`
	Proposal  string   `yaml:"proposal" json:"proposal"`
	// Keys are hex (an optional 0x prefix is accepted, as ip xfrm prints
	// them); *_file names a file holding the hex, relative to the file
	// that names it. Exactly one of the two when the proposal takes the key.
	EncKey       string        `yaml:"enc_key,omitempty" json:"enc_key,omitempty"`
	EncKeyFile   string        `yaml:"enc_key_file,omitempty" json:"enc_key_file,omitempty"`
	AuthKey      string        `yaml:"auth_key,omitempty" json:"auth_key,omitempty"`
	AuthKeyFile  string        `yaml:"auth_key_file,omitempty" json:"auth_key_file,omitempty"`
	ESN          bool          `yaml:"esn,omitempty" json:"esn,omitempty"`
	ReplayWindow *uint32       `yaml:"replay_window,omitempty" json:"replay_window,omitempty"`
	Local        string        `yaml:"local" json:"local"`
	Peer         string        `yaml:"peer" json:"peer"`
	Encap        *EncapSpec    `yaml:"encap,omitempty" json:"encap,omitempty"`
	Inner        *InnerSpec    `yaml:"inner,omitempty" json:"inner,omitempty"`
	Lifetime     *LifetimeSpec `yaml:"lifetime,omitempty" json:"lifetime,omitempty"`
	// Ports narrows the SA to inner UDP/TCP ports (IMS sec-agree pairs
	// SAs by port); absent means any port.
	Ports *PortsSpec `yaml:"ports,omitempty" json:"ports,omitempty"`
	// DSCP, when set (0..63), is written into the outer header of the
	// packets an outbound SA seals instead of the inner DSCP (the
	// default copy of RFC 4301 5.1.2.1, or the config's tunnel.dscp).
	DSCP *uint8 `yaml:"dscp,omitempty" json:"dscp,omitempty"`
	// IdleTimeout (seconds) overrides the config's idle.timeout for an
	// inbound SA: no authenticated packet for this long raises an
	// sa_idle event. 0 or absent: the global setting.
	IdleTimeout uint64 `yaml:"idle_timeout,omitempty" json:"idle_timeout,omitempty"`
}

// PortsSpec is the ports block: the inner (cleartext) UDP/TCP port on
// this side (local: the SIP core's, e.g. the P-CSCF's protected port) and
// on the phone's side (peer). 0 or omitted means any.
type PortsSpec struct {
	Local uint16 `yaml:"local,omitempty" json:"local,omitempty"`
	Peer  uint16 `yaml:"peer,omitempty" json:"peer,omitempty"`
	// Protocol is the inner protocol selector (RFC 4301 4.4.1.1): udp,
	// tcp, icmp, ipv6-icmp or a number 1..255; omitted means any (with
	// ports: UDP or TCP).
	Protocol string `yaml:"protocol,omitempty" json:"protocol,omitempty"`
}

// EncapSpec is the encap block. Present means UDP encapsulation; an
// omitted port is 4500 (RFC 3948), so `encap: {}` is the common case.
type EncapSpec struct {
	LocalPort *uint16 `yaml:"local_port,omitempty" json:"local_port,omitempty"`
	PeerPort  *uint16 `yaml:"peer_port,omitempty" json:"peer_port,omitempty"`
}

// InnerSpec holds the tunnel-mode selectors as prefixes; a bare address
// means a host prefix (/32 or /128). Core, when set, is the phone's core
// address (docs/addressing.md): peer must then be a single address.
// Transport mode: local is the one core-side address the phone's
// segments go to, core the phone's core address, no peer.
type InnerSpec struct {
	Local string `yaml:"local" json:"local"`
	Peer  string `yaml:"peer,omitempty" json:"peer,omitempty"`
	Core  string `yaml:"core,omitempty" json:"core,omitempty"`
}

// LifetimeSpec is the lifetime block; omitted or 0 means no limit.
type LifetimeSpec struct {
	SoftBytes   uint64 `yaml:"soft_bytes,omitempty" json:"soft_bytes,omitempty"`
	HardBytes   uint64 `yaml:"hard_bytes,omitempty" json:"hard_bytes,omitempty"`
	SoftPackets uint64 `yaml:"soft_packets,omitempty" json:"soft_packets,omitempty"`
	HardPackets uint64 `yaml:"hard_packets,omitempty" json:"hard_packets,omitempty"`
	SoftSeconds uint64 `yaml:"soft_seconds,omitempty" json:"soft_seconds,omitempty"`
	HardSeconds uint64 `yaml:"hard_seconds,omitempty" json:"hard_seconds,omitempty"`
}

// SPIValue is the spi field as written: an integer or a "0x..." hex
// string, in YAML and JSON alike. Decoding never fails; what is not a
// valid number is kept and reported by Parse, where the error can name
// the SA.
type SPIValue struct {
	n   uint64
	raw string // set when what was written is not a number we accept
	set bool
}

// SPIOf is the SPIValue of n, for Specs built in Go.
func SPIOf(n uint32) SPIValue { return SPIValue{n: uint64(n), set: true} }

// Value returns the number, or an error saying why there is none.
func (v SPIValue) Value() (uint64, error) {
	switch {
	case !v.set:
		return 0, fmt.Errorf("required")
	case v.raw != "":
		return 0, fmt.Errorf("%s", v.raw)
	}
	return v.n, nil
}

// IsZero lets omitempty-aware encoders skip an unset SPI.
func (v SPIValue) IsZero() bool { return !v.set }

func (v SPIValue) String() string {
	if n, err := v.Value(); err == nil {
		return fmt.Sprintf("0x%08x", n)
	}
	return "invalid"
}

// parseSPIText reads an SPI written as text: "0x" hex, or plain decimal.
// Decimal with leading zeros is refused: YAML would read 00001001 as
// octal, and the writer almost certainly meant hex.
func parseSPIText(s string, quoted bool) SPIValue {
	t := strings.ReplaceAll(strings.TrimSpace(s), "_", "")
	if len(t) > 2 && (t[:2] == "0x" || t[:2] == "0X") {
		n, err := strconv.ParseUint(t[2:], 16, 64)
		if err != nil {
			return SPIValue{raw: fmt.Sprintf("%q is not a hex number", clip(s)), set: true}
		}
		return SPIValue{n: n, set: true}
	}
	if quoted {
		return SPIValue{raw: fmt.Sprintf("%q: a string must be hex with a 0x prefix (or write a plain integer)", clip(s)), set: true}
	}
	if len(t) > 1 && t[0] == '0' {
		return SPIValue{raw: fmt.Sprintf("%s has a leading zero: write 0x%s for hex", clip(s), clip(t[1:])), set: true}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return SPIValue{raw: fmt.Sprintf("%q is not an integer or a 0x hex string", clip(s)), set: true}
	}
	return SPIValue{n: n, set: true}
}

// clip keeps error messages short when the input is garbage.
func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// UnmarshalYAML accepts an integer scalar or a hex string scalar.
func (v *SPIValue) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		*v = SPIValue{raw: "must be an integer or a 0x hex string", set: true}
		return nil
	}
	switch n.ShortTag() {
	case "!!null":
		*v = SPIValue{}
	case "!!int":
		*v = parseSPIText(n.Value, false)
	case "!!str":
		*v = parseSPIText(n.Value, true)
	default:
		*v = SPIValue{raw: fmt.Sprintf("%q is not an integer or a 0x hex string", clip(n.Value)), set: true}
	}
	return nil
}

// UnmarshalJSON accepts a JSON number or a hex string.
func (v *SPIValue) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case string(b) == "null":
		*v = SPIValue{}
	case len(b) > 0 && (b[0] == '[' || b[0] == '{'):
		*v = SPIValue{raw: "must be an integer or a 0x hex string", set: true}
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			*v = SPIValue{raw: "invalid JSON string", set: true}
			return nil
		}
		*v = parseSPIText(s, true)
	default:
		*v = parseSPIText(string(b), false)
	}
	return nil
}

// MarshalJSON writes the SPI as a 0x%08x string, the form operators read.
func (v SPIValue) MarshalJSON() ([]byte, error) {
	if !v.set {
		return []byte("null"), nil
	}
	if v.raw != "" {
		return nil, fmt.Errorf("spi: %s", v.raw)
	}
	return []byte(`"` + v.String() + `"`), nil
}

// MarshalYAML writes the SPI as a 0x%08x string.
func (v SPIValue) MarshalYAML() (any, error) {
	if !v.set {
		return nil, nil
	}
	if v.raw != "" {
		return nil, fmt.Errorf("spi: %s", v.raw)
	}
	return v.String(), nil
}

// WithKeys returns the SA as a Spec with its keys inline, in hex: how an
// SA travels to the control API or to etcd, which read no key files. It is
// the one place keys are turned back into text; never log its result.
func (s *SA) WithKeys() Spec {
	sp := s.Public()
	if len(s.EncKey) > 0 {
		sp.EncKey = hex.EncodeToString(s.EncKey)
	}
	if len(s.AuthKey) > 0 {
		sp.AuthKey = hex.EncodeToString(s.AuthKey)
	}
	return sp
}

// Public returns the SA as a Spec without key material: the view the API
// and `sa list` show.
func (s *SA) Public() Spec {
	sp := Spec{
		Name:      s.Name,
		Pair:      s.Pair,
		SPI:       SPIOf(s.SPI),
		Direction: s.Direction.String(),
		Mode:      s.Mode.String(),
		Proposal:  s.Proposal.String(),
		ESN:       s.ESN,
		Local:     s.Local.String(),
		Peer:      s.Peer.String(),
	}
	if s.Direction == In {
		w := s.ReplayWindow
		sp.ReplayWindow = &w
	}
	if s.Encap != nil {
		lp, pp := s.Encap.LocalPort, s.Encap.PeerPort
		sp.Encap = &EncapSpec{LocalPort: &lp, PeerPort: &pp}
	}
	if s.InnerLocal.IsValid() || s.Core.IsValid() {
		sp.Inner = &InnerSpec{}
		if s.InnerLocal.IsValid() {
			sp.Inner.Local = s.InnerLocal.String()
		}
		if s.InnerPeer.IsValid() { // none in transport mode
			sp.Inner.Peer = s.InnerPeer.String()
		}
		if s.Core.IsValid() {
			sp.Inner.Core = s.Core.String()
		}
	}
	if s.Ports != (Ports{}) {
		sp.Ports = &PortsSpec{Local: s.Ports.Local, Peer: s.Ports.Peer, Protocol: ProtoName(s.Ports.Proto)}
	}
	if s.HasDSCP {
		d := s.DSCP
		sp.DSCP = &d
	}
	sp.IdleTimeout = s.IdleTimeout
	if s.Lifetime != (Lifetime{}) {
		l := s.Lifetime
		sp.Lifetime = &LifetimeSpec{
			SoftBytes: l.SoftBytes, HardBytes: l.HardBytes,
			SoftPackets: l.SoftPackets, HardPackets: l.HardPackets,
			SoftSeconds: l.SoftSeconds, HardSeconds: l.HardSeconds,
		}
	}
	return sp
}

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }
