package secagree

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/xesp/xesp/control/sa"
)

// Algorithm names as TS 33.203 registers them for alg and ealg.
const (
	AlgHMACSHA196 = "hmac-sha-1-96"
	AlgHMACMD596  = "hmac-md5-96"
	EalgAESCBC    = "aes-cbc"
	EalgDESEDE3   = "des-ede3-cbc"
	EalgNull      = "null"
)

// Policy is the P-CSCF's preference. Each list is in preference order,
// most preferred first; what a list does not name is refused.
type Policy struct {
	Algs  []string
	Ealgs []string
	Mods  []Mode
	// Q, when set (1..1000 thousandths), is written into the
	// Security-Server mechanism.
	Q int
	// TransRefused, when set, is why Mods lacks ModeTrans: the reason a
	// phone offering only mod=trans is given.
	TransRefused string
}

// DefaultPolicy prefers encryption and UDP encapsulation, and accepts only
// what the ESP engine runs. HMAC-SHA-1-96 ranks above HMAC-MD5-96; MD5 is
// accepted so phones that offer nothing else can register.
func DefaultPolicy() Policy {
	return Policy{
		Algs:  []string{AlgHMACSHA196, AlgHMACMD596},
		Ealgs: []string{EalgAESCBC, EalgNull},
		Mods:  []Mode{ModeUDPEncTun, ModeTun, ModeTrans},
	}
}

// Choose picks the ipsec-3gpp mechanism of a Security-Client offer that
// the policy accepts: the best by the policy's lists (mod first, then
// ealg, then alg), the phone's q (higher first; absent q ranks as 1, the
// SIP qvalue default) breaking ties, the offer's order breaking the rest.
// The error says, per offered ipsec-3gpp mechanism, why it was refused.
func Choose(offer []Mechanism, p Policy) (Mechanism, error) {
	type cand struct {
		m                  Mechanism
		mod, ealg, alg, ix int
		q                  int
	}
	var cs []cand
	var why []string
	for i := range offer {
		m := offer[i]
		if !m.IsIPsec3GPP() {
			continue
		}
		reason := ""
		mod := slices.Index(p.Mods, m.Mod.Effective())
		ealg := slices.Index(p.Ealgs, m.EffectiveEalg())
		alg := slices.Index(p.Algs, m.Alg)
		switch {
		case m.EffectiveProt() != "esp":
			reason = "prot=" + m.Prot + " is not supported (ESP only)"
		case mod < 0 && m.Mod.Effective() == ModeTrans && p.TransRefused != "":
			reason = "mod=trans is not accepted: " + p.TransRefused
		case mod < 0:
			reason = "mod=" + m.Mod.Effective().String() + " is not accepted"
		case ealg < 0:
			reason = "ealg=" + m.EffectiveEalg() + " is not accepted"
		case alg < 0:
			reason = "alg=" + m.Alg + " is not accepted"
		}
		if reason != "" {
			why = append(why, fmt.Sprintf("mechanism %d: %s", i+1, reason))
			continue
		}
		q := 1000
		if m.HasQ {
			q = m.Q
		}
		cs = append(cs, cand{m: m, mod: mod, ealg: ealg, alg: alg, ix: i, q: q})
	}
	if len(cs) == 0 {
		if len(why) == 0 {
			return Mechanism{}, errors.New("security-client: no ipsec-3gpp mechanism offered")
		}
		return Mechanism{}, fmt.Errorf("security-client: no acceptable ipsec-3gpp mechanism: %s", strings.Join(why, "; "))
	}
	sort.SliceStable(cs, func(i, j int) bool {
		a, b := cs[i], cs[j]
		if a.mod != b.mod {
			return a.mod < b.mod
		}
		if a.ealg != b.ealg {
			return a.ealg < b.ealg
		}
		if a.alg != b.alg {
			return a.alg < b.alg
		}
		if a.q != b.q {
			return a.q > b.q
		}
		return a.ix < b.ix
	})
	return cs[0].m, nil
}

// Server builds the Security-Server mechanism for a chosen offer: the
// same alg, ealg, prot and mod, with the P-CSCF's SPIs and ports.
func Server(chosen Mechanism, p Policy, spiC, spiS uint32, portC, portS uint16) Mechanism {
	m := Mechanism{
		Name: MechIPsec3GPP, Alg: chosen.Alg, Ealg: chosen.EffectiveEalg(), Prot: chosen.EffectiveProt(), Mod: chosen.Mod.Effective(),
		SPIC: spiC, SPIS: spiS, PortC: portC, PortS: portS, HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true,
	}
	if p.Q > 0 {
		m.Q, m.HasQ = min(p.Q, 1000), true
	}
	return m
}

// Keys is what TS 33.203 expands CK and IK to for one algorithm pair.
type Keys struct {
	Auth []byte // integrity key
	Enc  []byte // encryption key; nil for null
}

// ExpandKeys applies TS 33.203 Annex I: hmac-md5-96 takes IK (128 bit);
// hmac-sha-1-96 takes IK || 32 zero bits (160 bit); aes-cbc takes CK
// (AES-128); des-ede3-cbc takes CK1 || CK2 || CK1 with CK = CK1 || CK2;
// null takes nothing. CK and IK are 128 bit each (IMS AKA).
func ExpandKeys(alg, ealg string, ck, ik []byte) (Keys, error) {
	if len(ik) != 16 {
		return Keys{}, fmt.Errorf("ik: need 16 bytes (IMS AKA), got %d", len(ik))
	}
	var k Keys
	switch alg {
	case AlgHMACMD596:
		k.Auth = slices.Clone(ik)
	case AlgHMACSHA196:
		k.Auth = append(slices.Clone(ik), 0, 0, 0, 0)
	default:
		return Keys{}, fmt.Errorf("alg: %q has no TS 33.203 key expansion", clip(alg))
	}
	if ealg == "" {
		ealg = EalgNull
	}
	if ealg != EalgNull && len(ck) != 16 {
		return Keys{}, fmt.Errorf("ck: need 16 bytes (IMS AKA), got %d", len(ck))
	}
	switch ealg {
	case EalgNull:
	case EalgAESCBC:
		k.Enc = slices.Clone(ck)
	case EalgDESEDE3:
		k.Enc = make([]byte, 0, 24)
		k.Enc = append(k.Enc, ck...)
		k.Enc = append(k.Enc, ck[:8]...)
	default:
		return Keys{}, fmt.Errorf("ealg: %q has no TS 33.203 key expansion", clip(ealg))
	}
	return k, nil
}

// proposalFor maps a TS 33.203 algorithm pair to the ESP engine's
// proposal keyword, or says why the engine cannot run it.
func proposalFor(alg, ealg string) (string, error) {
	var aes, null string
	switch alg {
	case AlgHMACSHA196:
		aes, null = "aes128-sha1", "null-sha1"
	case AlgHMACMD596:
		aes, null = "aes128-md5", "null-md5"
	default:
		return "", fmt.Errorf("alg: %q is not supported", clip(alg))
	}
	switch ealg {
	case EalgAESCBC:
		return aes, nil
	case EalgNull, "":
		return null, nil
	case EalgDESEDE3:
		return "", fmt.Errorf("ealg: %s: the ESP engine has no 3DES", ealg)
	}
	return "", fmt.Errorf("ealg: %q is not supported", clip(ealg))
}

// Registration is everything one registration's SAs are derived from.
// Client is the phone's chosen Security-Client mechanism, Server what the
// P-CSCF answers (see Server).
type Registration struct {
	// Name labels the SAs (Name + ".in-s" etc.) and is their pair label,
	// so all four share one worker and one NAT binding.
	Name           string
	Client, Server Mechanism
	CK, IK         []byte
	// Local is the gateway's public address, UE the phone's address and
	// port as observed (after the NAPT): the first NAT binding.
	Local netip.Addr
	UE    netip.AddrPort
	// EncapPort is the gateway's NAT-T port (UDP-enc-tun); 0 means 4500.
	EncapPort uint16
	// UEInner and PCSCF are the tunnel-mode inner addresses: the phone's
	// own address and the P-CSCF's. Unused in transport mode.
	UEInner, PCSCF netip.Addr
	// Core, when valid, is the phone's core address (docs/addressing.md):
	// all four SAs carry it as inner.core (tunnel modes only).
	Core netip.Addr
	// Pair, when set, is the pair label instead of Name: the gateway
	// passes a label derived from the phone (PhoneLabel), or a
	// re-authentication's replaced set's label, so that the new set
	// shares the current set's worker and NAT binding (the worker picks
	// a phone's outbound SA by ports among the SAs of its own table).
	Pair string
}

// PhoneLabel is a pair label that is the same for every registration of
// one phone: derived from its observed address and port (its NAT
// mapping) and its inner address. SA sets with one label share a worker
// and the NAT binding, so a re-registration's new set and the current
// one are on one worker, which picks between them by ports.
func PhoneLabel(ue netip.AddrPort, inner netip.Addr) string {
	h := sha256.Sum256([]byte(ue.String() + "|" + inner.String()))
	return "ue-" + hex.EncodeToString(h[:8])
}

// DerivedSA is one SA of a registration with the protected ports it
// covers (also in the Spec's ports block, seen from the P-CSCF).
type DerivedSA struct {
	Spec sa.Spec
	// Role names the SA by the SPI it uses: "in-s" (P-CSCF's spi-s,
	// UE port-c -> P-CSCF port-s), "in-c" (P-CSCF's spi-c, UE port-s ->
	// P-CSCF port-c), "out-s" (UE's spi-s, P-CSCF port-c -> UE port-s),
	// "out-c" (UE's spi-c, P-CSCF port-s -> UE port-c).
	Role string
	// Src and Dst are the protected ports of the inner traffic.
	SrcPort, DstPort uint16
}

// MaxNameLen bounds a registration name so SA names stay within 64.
const MaxNameLen = 58

// Derive returns the four SAs of TS 33.203 7.1 as the P-CSCF side holds
// them, in the order in-s, in-c, out-s, out-c, each with its port
// selectors: XDP steers a phone's cleartext to one of its outbound SAs by
// inner address, and the worker moves it to the SA whose ports match.
// Every Spec is checked with sa.Spec.Parse before it is returned.
func Derive(r Registration) ([]DerivedSA, error) {
	c, s := &r.Client, &r.Server
	if !c.IsIPsec3GPP() || !s.IsIPsec3GPP() {
		return nil, errors.New("derive: both mechanisms must be ipsec-3gpp")
	}
	if c.Alg != s.Alg || c.EffectiveEalg() != s.EffectiveEalg() || c.Mod.Effective() != s.Mod.Effective() || c.EffectiveProt() != s.EffectiveProt() {
		return nil, fmt.Errorf("derive: client and server mechanisms disagree (%s vs %s)", clip(c.String()), clip(s.String()))
	}
	if s.EffectiveProt() != "esp" {
		return nil, errors.New("prot: only esp is supported")
	}
	if r.Name == "" || len(r.Name) > MaxNameLen {
		return nil, fmt.Errorf("registration: want 1..%d characters, got %d", MaxNameLen, len(r.Name))
	}
	prop, err := proposalFor(s.Alg, s.EffectiveEalg())
	if err != nil {
		return nil, err
	}
	keys, err := ExpandKeys(s.Alg, s.EffectiveEalg(), r.CK, r.IK)
	if err != nil {
		return nil, err
	}
	if !r.UE.IsValid() || r.UE.Port() == 0 {
		return nil, errors.New("ue: need the phone's observed address and port")
	}
	mod := s.Mod.Effective()
	tunnel := mod == ModeTun || mod == ModeUDPEncTun
	if tunnel && (!r.UEInner.IsValid() || !r.PCSCF.IsValid()) {
		return nil, fmt.Errorf("ue_inner, pcscf: mod=%s needs both inner addresses", mod)
	}
	if !tunnel && !r.PCSCF.IsValid() {
		// Transport mode through the gateway (docs/addressing.md): the
		// phone's segments are delivered to the P-CSCF's core-side
		// address from the phone's core address.
		return nil, fmt.Errorf("pcscf: mod=%s needs the P-CSCF's core-side address", mod)
	}
	encPort := r.EncapPort
	if encPort == 0 {
		encPort = sa.DefaultNATTPort
	}
	type def struct {
		role        string
		dir         string
		spi         uint32
		src, dst    uint16
		local, peer uint16 // the P-CSCF's port, the UE's port
	}
	defs := []def{
		{"in-s", "in", s.SPIS, c.PortC, s.PortS, s.PortS, c.PortC},
		{"in-c", "in", s.SPIC, c.PortS, s.PortC, s.PortC, c.PortS},
		{"out-s", "out", c.SPIS, s.PortC, c.PortS, s.PortC, c.PortS},
		{"out-c", "out", c.SPIC, s.PortS, c.PortC, s.PortS, c.PortC},
	}
	out := make([]DerivedSA, 0, len(defs))
	var errs []error
	for _, d := range defs {
		pair := r.Name
		if r.Pair != "" {
			pair = r.Pair
		}
		sp := sa.Spec{
			Name: r.Name + "." + d.role, Pair: pair, SPI: sa.SPIOf(d.spi), Direction: d.dir,
			Mode: "transport", Proposal: prop, AuthKey: hex.EncodeToString(keys.Auth),
			Local: r.Local.String(), Peer: r.UE.Addr().String(),
			Ports: &sa.PortsSpec{Local: d.local, Peer: d.peer},
		}
		if keys.Enc != nil {
			sp.EncKey = hex.EncodeToString(keys.Enc)
		}
		if tunnel {
			sp.Mode = "tunnel"
			sp.Inner = &sa.InnerSpec{
				Local: netip.PrefixFrom(r.PCSCF, r.PCSCF.BitLen()).String(),
				Peer:  netip.PrefixFrom(r.UEInner, r.UEInner.BitLen()).String(),
			}
			if r.Core.IsValid() {
				sp.Inner.Core = r.Core.String()
			}
		}
		if !tunnel {
			sp.Inner = &sa.InnerSpec{Local: r.PCSCF.String()}
			if r.Core.IsValid() {
				sp.Inner.Core = r.Core.String()
			}
		}
		if mod == ModeUDPEncTun {
			lp, pp := encPort, r.UE.Port()
			sp.Encap = &sa.EncapSpec{LocalPort: &lp, PeerPort: &pp}
		}
		if _, err := sp.Parse(sa.Options{}); err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, DerivedSA{Spec: sp, Role: d.role, SrcPort: d.src, DstPort: d.dst})
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}
