package sa

import (
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/xesp/xesp/internal/safefile"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/xesp/xesp/dataplane/esp"
)

// DefaultReplayWindow applies when an inbound SA omits replay_window.
const DefaultReplayWindow = 1024

// Replay window bounds for an enabled window, in packets. 32 is RFC 4303's
// minimum; 4096 bounds the per-SA bitmap a worker keeps.
const (
	MinReplayWindow = 32
	MaxReplayWindow = 4096
)

// DefaultNATTPort is the RFC 3948 port an omitted encap port stands for.
const DefaultNATTPort = 4500

// maxKeyFile bounds what a key file may hold: the longest key is 36
// bytes, 72 hex digits; the rest is room for whitespace and a prefix.
const maxKeyFile = 4096

// Options changes what Parse accepts.
type Options struct {
	// AllowNoIntegrity accepts the AES-CBC proposals without integrity
	// (aes128, aes192, aes256). Only the offline decrypt tool sets it:
	// a gateway must never accept unauthenticated ESP.
	AllowNoIntegrity bool
	// KeyFileDir is the directory enc_key_file and auth_key_file are
	// relative to. Empty refuses key files altogether, so an API request
	// cannot make the daemon read files.
	KeyFileDir string
	// Label overrides how errors name the SA's position, e.g. "sas[2]"
	// in a config file; the name (or SPI) is appended when known.
	Label string
}

// FieldError is one reason an SA is invalid.
type FieldError struct {
	SA     string // how the SA is named: `sa "ue1-in"`, `sa 0x00001001`, `sas[3]`
	Field  string // dotted path inside the SA, e.g. "encap.local_port"
	Reason string
}

func (e *FieldError) Error() string {
	if e.Field == "" {
		return e.SA + ": " + e.Reason
	}
	return e.SA + ": " + e.Field + ": " + e.Reason
}

// validator collects every problem of one Spec rather than stopping at the
// first, so an operator fixes a file in one pass. The SA's label is made
// at the first problem: a valid SA (a million of them in a big file)
// needs none.
type validator struct {
	sp    *Spec
	pos   string
	label string
	errs  []error
}

func (v *validator) add(field, format string, args ...any) {
	if v.label == "" {
		v.label = labelFor(v.sp, v.pos)
	}
	v.errs = append(v.errs, &FieldError{SA: v.label, Field: field, Reason: fmt.Sprintf(format, args...)})
}

// labelFor names an SA in errors: by name, else by SPI, else by position.
func labelFor(sp *Spec, pos string) string {
	var who string
	if sp.Name != "" {
		who = fmt.Sprintf("%q", clip(sp.Name))
	} else if n, err := sp.SPI.Value(); err == nil && n <= 0xffffffff {
		who = fmt.Sprintf("0x%08x", n)
	}
	switch {
	case pos != "" && who != "":
		return pos + " " + who
	case pos != "":
		return pos
	case who != "":
		return "sa " + who
	}
	return "sa"
}

// Parse validates the Spec and returns the typed SA. The error joins one
// *FieldError per problem found.
func (sp *Spec) Parse(opts Options) (SA, error) {
	v := validator{sp: sp, pos: opts.Label}
	s := SA{Name: sp.Name, Pair: sp.Pair, ESN: sp.ESN}

	if sp.Name != "" && !ValidName(sp.Name) {
		v.add("name", "%q: use 1..64 of A-Z a-z 0-9 . _ - starting with a letter", clip(sp.Name))
	}
	if sp.Pair != "" && !ValidName(sp.Pair) {
		v.add("pair", "%q: use 1..64 of A-Z a-z 0-9 . _ - starting with a letter", clip(sp.Pair))
	}

	if n, err := sp.SPI.Value(); err != nil {
		v.add("spi", "%v", err)
	} else {
		switch {
		case n > 0xffffffff:
			v.add("spi", "%d does not fit in 32 bits", n)
		case n == 0:
			v.add("spi", "0 is reserved (RFC 4303 2.1)")
		case n < 256:
			v.add("spi", "%d is in the reserved range 1..255 (RFC 4303 2.1)", n)
		default:
			s.SPI = uint32(n)
		}
	}

	switch strings.ToLower(sp.Direction) {
	case "in":
		s.Direction = In
	case "out":
		s.Direction = Out
	case "":
		v.add("direction", "required (in or out)")
	default:
		v.add("direction", "%q: must be in or out", clip(sp.Direction))
	}

	switch strings.ToLower(sp.Mode) {
	case "tunnel":
		s.Mode = Tunnel
	case "transport":
		s.Mode = Transport
	case "":
		v.add("mode", "required (tunnel or transport)")
	default:
		v.add("mode", "%q: must be tunnel or transport", clip(sp.Mode))
	}

	if sp.Proposal == "" {
		v.add("proposal", "required (e.g. aes128gcm16)")
	} else if p, err := esp.ParseProposal(sp.Proposal); err != nil {
		v.add("proposal", "%v", err)
	} else if !p.HasIntegrity() && !opts.AllowNoIntegrity {
		v.add("proposal", "%s has no integrity protection; only the offline decrypt tool accepts it", p)
	} else {
		s.Proposal = p
	}
	v.keys(sp, &s, opts)

	v.replay(sp, &s)
	v.addresses(sp, &s)
	v.encap(sp, &s)
	v.inner(sp, &s)
	v.lifetime(sp, &s)
	if sp.Ports != nil {
		s.Ports = Ports{Local: sp.Ports.Local, Peer: sp.Ports.Peer}
		if p := strings.ToLower(sp.Ports.Protocol); p != "" {
			if n, ok := protoNames[p]; ok {
				s.Ports.Proto = n
			} else if n, err := strconv.ParseUint(p, 10, 8); err == nil && n > 0 {
				s.Ports.Proto = uint8(n)
			} else {
				v.add("ports.protocol", "%q: want udp, tcp, icmp, ipv6-icmp or a number 1..255", clip(sp.Ports.Protocol))
			}
		}
		if (s.Ports.Local != 0 || s.Ports.Peer != 0) && s.Ports.Proto != 0 && s.Ports.Proto != 6 && s.Ports.Proto != 17 {
			v.add("ports.protocol", "%s has no ports: ports.local and ports.peer need udp or tcp", ProtoName(s.Ports.Proto))
		}
	}
	if sp.DSCP != nil {
		if *sp.DSCP > 63 {
			v.add("dscp", "%d: want 0..63", *sp.DSCP)
		} else {
			s.DSCP, s.HasDSCP = *sp.DSCP, true
		}
	}
	s.IdleTimeout = sp.IdleTimeout

	if len(v.errs) > 0 {
		return SA{}, errors.Join(v.errs...)
	}
	return s, nil
}

// MaxNameLen bounds an SA's name and pair label.
const MaxNameLen = 64

// ValidName is the SA format's rule for names and pair labels, the one
// place it is written: 1..MaxNameLen of A-Z a-z 0-9 . _ -, starting with a
// letter, so a name never looks like an in:/out: reference. The API checks
// references and sec-agree registration names with it too.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case i > 0 && (c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// keys decodes both keys into one allocation: at a million SAs the
// allocation count matters more than the bytes.
func (v *validator) keys(sp *Spec, s *SA, opts Options) {
	p := s.Proposal
	if p == esp.ProposalInvalid {
		// Still check what can be checked without knowing lengths.
		v.key(nil, "enc_key", sp.EncKey, sp.EncKeyFile, -1, p, opts)
		v.key(nil, "auth_key", sp.AuthKey, sp.AuthKeyFile, -1, p, opts)
		return
	}
	// Decoded on the stack first (cleared below), then into the SA's
	// one allocation.
	var encTmp, authTmp [64]byte
	defer clear(authTmp[:])
	defer clear(encTmp[:])
	enc := v.key(encTmp[:], "enc_key", sp.EncKey, sp.EncKeyFile, p.EncKeyLen(), p, opts)
	auth := v.key(authTmp[:], "auth_key", sp.AuthKey, sp.AuthKeyFile, p.AuthKeyLen(), p, opts)
	if enc == nil && p.EncKeyLen() > 0 || auth == nil && p.AuthKeyLen() > 0 {
		return
	}
	buf := make([]byte, len(enc)+len(auth))
	copy(buf, enc)
	copy(buf[len(enc):], auth)
	clear(enc)
	clear(auth)
	if len(enc) > 0 {
		s.EncKey = Secret(buf[:len(enc):len(enc)])
	}
	if len(auth) > 0 {
		s.AuthKey = Secret(buf[len(enc):])
	}
}

// key returns the decoded key, or nil after recording why there is none;
// it decodes into tmp when the key fits (the caller clears it). want < 0
// means the length is unknown (invalid proposal). Messages never quote
// key material.
func (v *validator) key(tmp []byte, field, inline, file string, want int, p esp.Proposal, opts Options) []byte {
	if inline != "" && file != "" {
		v.add(field, "give %s or %s_file, not both", field, field)
		return nil
	}
	if want == 0 {
		if inline != "" || file != "" {
			v.add(field, "%s takes no %s", p, field)
		}
		return nil
	}
	text, src := inline, field
	if file != "" {
		src = field + "_file"
		if opts.KeyFileDir == "" {
			v.add(src, "key files are not accepted here; give the key inline")
			return nil
		}
		b, err := readKeyFile(opts.KeyFileDir, file)
		if err != nil {
			v.add(src, "%v", err)
			return nil
		}
		text = string(b)
		clear(b)
	}
	if text == "" {
		if want > 0 {
			v.add(field, "required: %s needs %s", p, describeLen(p, field, want))
		}
		return nil
	}
	text = strings.TrimSpace(text)
	if len(text) > 2 && (text[:2] == "0x" || text[:2] == "0X") {
		text = text[2:]
	}
	var key []byte
	if n := hex.DecodedLen(len(text)); n <= len(tmp) {
		key = tmp[:n]
	} else {
		key = make([]byte, n)
	}
	if _, err := hex.Decode(key, []byte(text)); err != nil {
		var ie hex.InvalidByteError
		if errors.As(err, &ie) {
			v.add(src, "not hex: invalid character at offset %d", strings.IndexByte(text, byte(ie)))
		} else {
			v.add(src, "not hex: odd number of digits")
		}
		return nil
	}
	if want >= 0 && len(key) != want {
		v.add(field, "%s needs %s, got %d", p, describeLen(p, field, want), len(key))
		return nil
	}
	return key
}

func describeLen(p esp.Proposal, field string, n int) string {
	if p.AEAD() && field == "enc_key" {
		return fmt.Sprintf("%d bytes (%d key + 4 salt)", n, n-4)
	}
	return fmt.Sprintf("%d bytes", n)
}

func readKeyFile(dir, name string) ([]byte, error) {
	path := name
	if !filepath.IsAbs(path) {
		path = filepath.Join(dir, path)
	}
	b, err := safefile.Read(path, maxKeyFile)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	return b, nil
}

func (v *validator) replay(sp *Spec, s *SA) {
	if sp.ReplayWindow == nil {
		if s.Direction == In {
			s.ReplayWindow = DefaultReplayWindow
		}
		return
	}
	w := *sp.ReplayWindow
	switch {
	case s.Direction == Out:
		v.add("replay_window", "only inbound SAs have a replay window")
	case w != 0 && (w < MinReplayWindow || w > MaxReplayWindow):
		v.add("replay_window", "must be %d..%d, or 0 to disable anti-replay; got %d", MinReplayWindow, MaxReplayWindow, w)
	default:
		s.ReplayWindow = w
	}
}

func parseOuter(v *validator, field, text string) netip.Addr {
	if text == "" {
		v.add(field, "required")
		return netip.Addr{}
	}
	a, err := netip.ParseAddr(text)
	switch {
	case err != nil:
		v.add(field, "%q is not an IP address", clip(text))
	case a.Zone() != "":
		v.add(field, "%s: zones are not supported", a)
	case a.Is4In6():
		v.add(field, "%s: write IPv4 addresses as a.b.c.d", a)
	case a.IsUnspecified() || a.IsMulticast() || a.Is4() && a.As4() == [4]byte{255, 255, 255, 255}:
		v.add(field, "%s is not a unicast address", a)
	default:
		return a
	}
	return netip.Addr{}
}

func (v *validator) addresses(sp *Spec, s *SA) {
	s.Local = parseOuter(v, "local", sp.Local)
	s.Peer = parseOuter(v, "peer", sp.Peer)
	if s.Local.IsValid() && s.Peer.IsValid() && s.Local.Is4() != s.Peer.Is4() {
		v.add("peer", "%s and local %s are of different address families", s.Peer, s.Local)
		s.Peer = netip.Addr{}
	}
}

func (v *validator) encap(sp *Spec, s *SA) {
	if sp.Encap == nil {
		return
	}
	e := Encap{LocalPort: DefaultNATTPort, PeerPort: DefaultNATTPort}
	if p := sp.Encap.LocalPort; p != nil {
		if *p == 0 {
			v.add("encap.local_port", "must be 1..65535")
		}
		e.LocalPort = *p
	}
	if p := sp.Encap.PeerPort; p != nil {
		if *p == 0 {
			v.add("encap.peer_port", "must be 1..65535")
		}
		e.PeerPort = *p
	}
	s.Encap = &e
}

func parseInner(v *validator, field, text string) netip.Prefix {
	if text == "" {
		v.add(field, "required in tunnel mode")
		return netip.Prefix{}
	}
	var p netip.Prefix
	if strings.Contains(text, "/") {
		var err error
		p, err = netip.ParsePrefix(text)
		if err != nil {
			v.add(field, "%q is not a prefix (a.b.c.d/n, x::/n or a bare address)", clip(text))
			return netip.Prefix{}
		}
	} else {
		a, err := netip.ParseAddr(text)
		if err != nil || a.Zone() != "" {
			v.add(field, "%q is not a prefix (a.b.c.d/n, x::/n or a bare address)", clip(text))
			return netip.Prefix{}
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is4In6() {
		v.add(field, "%s: write IPv4 prefixes as a.b.c.d/n", p)
		return netip.Prefix{}
	}
	if m := p.Masked(); m != p {
		v.add(field, "%s has host bits set; did you mean %s?", p, m)
		return netip.Prefix{}
	}
	return p
}

func (v *validator) inner(sp *Spec, s *SA) {
	switch s.Mode {
	case Transport:
		v.transportInner(sp, s)
	case Tunnel:
		if sp.Inner == nil {
			v.add("inner", "required in tunnel mode (inner.local and inner.peer prefixes)")
			return
		}
		s.InnerLocal = parseInner(v, "inner.local", sp.Inner.Local)
		s.InnerPeer = parseInner(v, "inner.peer", sp.Inner.Peer)
		if s.InnerLocal.IsValid() && s.InnerPeer.IsValid() && s.InnerLocal.Addr().Is4() != s.InnerPeer.Addr().Is4() {
			v.add("inner.peer", "%s and inner.local %s are of different address families", s.InnerPeer, s.InnerLocal)
		}
		if sp.Inner.Core != "" {
			v.core(sp.Inner.Core, s)
		}
	}
}

// transportInner reads a transport-mode SA's core side
// (docs/addressing.md, "Transport mode"): inner.local is the one core-side
// host the phone's segments are delivered to (the P-CSCF), inner.core the
// phone's core address. Both are optional here (core_pool may allocate
// the core address; the offline decrypt tool needs neither); the SAD
// refuses a transport SA without both. Both are of the outer
// addresses' family: the gateway re-addresses one IP header, it does not
// translate between families. inner.peer has no meaning: the phone's
// address is the outer one, and it moves with the NAT binding.
func (v *validator) transportInner(sp *Spec, s *SA) {
	if sp.Inner == nil {
		return // the SAD refuses it: parse-only tools (decrypt) need none
	}
	if sp.Inner.Peer != "" {
		v.add("inner.peer", "not used in transport mode (the phone's address is peer, and its NAT binding); remove it")
	}
	if sp.Inner.Local != "" {
		s.InnerLocal = parseInner(v, "inner.local", sp.Inner.Local)
	}
	if s.InnerLocal.IsValid() && !s.InnerLocal.IsSingleIP() {
		v.add("inner.local", "%s: transport mode delivers to one address (/%d), not a prefix", s.InnerLocal, s.InnerLocal.Addr().BitLen())
		s.InnerLocal = netip.Prefix{}
	}
	if s.InnerLocal.IsValid() && s.Local.IsValid() && s.InnerLocal.Addr().Is4() != s.Local.Is4() {
		v.add("inner.local", "%s and local %s are of different address families (transport mode re-addresses one IP header)", s.InnerLocal.Addr(), s.Local)
	}
	if sp.Inner.Core == "" {
		return
	}
	a, ok := v.coreAddr(sp.Inner.Core)
	if !ok {
		return
	}
	if s.Local.IsValid() && a.Is4() != s.Local.Is4() {
		v.add("inner.core", "%s and local %s are of different address families (transport mode re-addresses one IP header)", a, s.Local)
		return
	}
	s.Core = a
}

// coreAddr parses inner.core: one unicast address.
func (v *validator) coreAddr(text string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(text)
	switch {
	case err != nil:
		v.add("inner.core", "%q is not an IP address (write one address, no prefix length)", clip(text))
		return a, false
	case a.Zone() != "":
		v.add("inner.core", "%s: zones are not supported", a)
		return a, false
	case a.Is4In6():
		v.add("inner.core", "%s: write IPv4 addresses as a.b.c.d", a)
		return a, false
	case a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() || a.Is4() && a.As4() == [4]byte{255, 255, 255, 255}:
		v.add("inner.core", "%s is not a unicast address", a)
		return a, false
	}
	return a, true
}

// core validates inner.core: one unicast address of inner.peer's family,
// and inner.peer a single address, since the core address stands for
// exactly one phone address (the worker rewrites one to the other).
func (v *validator) core(text string, s *SA) {
	a, ok := v.coreAddr(text)
	if !ok {
		return
	}
	if !s.InnerPeer.IsValid() {
		return // inner.peer's own error says why
	}
	if a.Is4() != s.InnerPeer.Addr().Is4() {
		v.add("inner.core", "%s and inner.peer %s are of different address families", a, s.InnerPeer)
		return
	}
	if !s.InnerPeer.IsSingleIP() {
		v.add("inner.peer", "%s: with inner.core, inner.peer must be the phone's one address (/%d)", s.InnerPeer, s.InnerPeer.Addr().BitLen())
		return
	}
	s.Core = a
}

func (v *validator) lifetime(sp *Spec, s *SA) {
	l := sp.Lifetime
	if l == nil {
		return
	}
	check := func(what string, soft, hard uint64) {
		if soft != 0 && hard != 0 && soft > hard {
			v.add("lifetime.soft_"+what, "%d exceeds hard_%s %d", soft, what, hard)
		}
	}
	check("bytes", l.SoftBytes, l.HardBytes)
	check("packets", l.SoftPackets, l.HardPackets)
	check("seconds", l.SoftSeconds, l.HardSeconds)
	s.Lifetime = Lifetime{
		SoftBytes: l.SoftBytes, HardBytes: l.HardBytes,
		SoftPackets: l.SoftPackets, HardPackets: l.HardPackets,
		SoftSeconds: l.SoftSeconds, HardSeconds: l.HardSeconds,
	}
}
