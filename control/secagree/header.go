package secagree

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// MechIPsec3GPP is the TS 33.203 mechanism name.
const MechIPsec3GPP = "ipsec-3gpp"

// Mode is the mod parameter of ipsec-3gpp.
type Mode uint8

// Modes. ModeUnset is an absent mod, which TS 33.203 reads as trans.
const (
	ModeUnset Mode = iota
	ModeTrans
	ModeTun
	ModeUDPEncTun // TISPAN: tunnel mode, UDP-encapsulated (RFC 3948)
)

var modeNames = [...]string{ModeUnset: "", ModeTrans: "trans", ModeTun: "tun", ModeUDPEncTun: "UDP-enc-tun"}

func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// Effective is the mode in force: an absent mod means trans.
func (m Mode) Effective() Mode {
	if m == ModeUnset {
		return ModeTrans
	}
	return m
}

// ParseMode reads a mod value, case-insensitively.
func ParseMode(s string) (Mode, error) {
	for m := ModeTrans; int(m) < len(modeNames); m++ {
		if strings.EqualFold(s, modeNames[m]) {
			return m, nil
		}
	}
	return ModeUnset, fmt.Errorf("%q: want trans, tun or UDP-enc-tun", clip(s))
}

// Param is a parameter this package does not interpret (an extension,
// d-alg, d-qop, d-ver...), kept so a produced header says what was parsed.
type Param struct {
	Name  string
	Value string // as written: a token, or a quoted string with its quotes
	Bare  bool   // no "=value" at all
}

// Mechanism is one sec-mechanism of a Security-Client, -Server or -Verify
// value. For ipsec-3gpp the known parameters are decoded into fields; a
// Has* flag says whether a parameter was present, since absent and zero
// differ (an absent ealg is null, an absent q is not q=0).
type Mechanism struct {
	Name string // mechanism name as written (compare with EqualFold)

	Q    int // thousandths: q=0.5 is 500
	HasQ bool

	Alg, Ealg string // as written; absent ealg: Ealg == "" (null)
	Prot      string // "esp" or "ah" in registered spelling; "" when absent
	Mod       Mode

	SPIC, SPIS   uint32
	PortC, PortS uint16
	// Has records which of spi-c, spi-s, port-c, port-s were present.
	HasSPIC, HasSPIS, HasPortC, HasPortS bool

	Extra []Param
}

// IsIPsec3GPP reports whether this is TS 33.203's mechanism.
func (m *Mechanism) IsIPsec3GPP() bool { return strings.EqualFold(m.Name, MechIPsec3GPP) }

// EffectiveEalg is ealg with the TS 33.203 default: absent means null.
func (m *Mechanism) EffectiveEalg() string {
	if m.Ealg == "" {
		return EalgNull
	}
	return m.Ealg
}

// EffectiveProt is prot with its default: absent means esp.
func (m *Mechanism) EffectiveProt() string {
	if m.Prot == "" {
		return "esp"
	}
	return m.Prot
}

// ParseError says where in a header value parsing failed.
type ParseError struct {
	Mechanism int    // 1-based position in the list; 0 when the list itself is broken
	Name      string // mechanism name when known
	Param     string // parameter name when the problem is one parameter
	Reason    string
}

func (e *ParseError) Error() string {
	var b strings.Builder
	if e.Mechanism > 0 {
		fmt.Fprintf(&b, "mechanism %d", e.Mechanism)
		if e.Name != "" {
			fmt.Fprintf(&b, " (%s)", clip(e.Name))
		}
		b.WriteString(": ")
	}
	if e.Param != "" {
		b.WriteString(e.Param + ": ")
	}
	b.WriteString(e.Reason)
	return b.String()
}

// Limits keep a hostile header from costing much.
const (
	maxValueLen   = 8 << 10
	maxMechanisms = 32
	maxParams     = 32
)

// Parse reads a Security-Client, Security-Server or Security-Verify header
// value (what follows the colon; several header lines joined with commas
// are one list). Every ipsec-3gpp mechanism must carry alg, spi-c, spi-s,
// port-c and port-s (TS 33.203 7.2); other mechanisms are kept with their
// parameters uninterpreted.
func Parse(value string) ([]Mechanism, error) {
	if len(value) > maxValueLen {
		return nil, &ParseError{Reason: fmt.Sprintf("value longer than %d bytes", maxValueLen)}
	}
	parts, err := split(value, ',')
	if err != nil {
		return nil, &ParseError{Reason: err.Error()}
	}
	if len(parts) > maxMechanisms {
		return nil, &ParseError{Reason: fmt.Sprintf("more than %d mechanisms", maxMechanisms)}
	}
	var out []Mechanism
	for i, p := range parts {
		if strings.TrimSpace(p) == "" {
			// RFC 3261 7.3.1 list syntax tolerates empty elements.
			continue
		}
		m, err := parseMechanism(p)
		if err != nil {
			err.Mechanism = i + 1
			return nil, err
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		return nil, &ParseError{Reason: "no mechanism"}
	}
	return out, nil
}

func parseMechanism(text string) (Mechanism, *ParseError) {
	var m Mechanism
	fields, err := split(text, ';')
	if err != nil {
		return m, &ParseError{Reason: err.Error()}
	}
	m.Name = trimLWS(fields[0])
	if !isToken(m.Name) {
		return m, &ParseError{Reason: fmt.Sprintf("mechanism name %q is not a token", clip(m.Name))}
	}
	if len(fields)-1 > maxParams {
		return m, &ParseError{Name: m.Name, Reason: fmt.Sprintf("more than %d parameters", maxParams)}
	}
	ipsec := m.IsIPsec3GPP()
	seen := map[string]bool{}
	for _, f := range fields[1:] {
		f = trimLWS(f)
		if f == "" {
			return m, &ParseError{Name: m.Name, Reason: "empty parameter (stray ';')"}
		}
		name, val, hasVal := strings.Cut(f, "=")
		name, val = trimLWS(name), trimLWS(val)
		if !isToken(name) {
			return m, &ParseError{Name: m.Name, Reason: fmt.Sprintf("parameter name %q is not a token", clip(name))}
		}
		key := strings.ToLower(name)
		if hasVal && !isToken(val) && !isQuoted(val) {
			return m, &ParseError{Name: m.Name, Param: key, Reason: fmt.Sprintf("value %q is neither a token nor a quoted string", clip(val))}
		}
		if seen[key] {
			return m, &ParseError{Name: m.Name, Param: key, Reason: "given twice"}
		}
		seen[key] = true
		perr := func(format string, args ...any) *ParseError {
			return &ParseError{Name: m.Name, Param: key, Reason: fmt.Sprintf(format, args...)}
		}
		if key == "q" {
			if !hasVal {
				return m, perr("needs a value")
			}
			q, err := parseQ(val)
			if err != nil {
				return m, perr("%v", err)
			}
			m.Q, m.HasQ = q, true
			continue
		}
		if !ipsec {
			m.Extra = append(m.Extra, Param{Name: name, Value: val, Bare: !hasVal})
			continue
		}
		known := true
		switch key {
		case "alg", "ealg", "prot", "mod", "spi-c", "spi-s", "port-c", "port-s":
			if !hasVal || val == "" {
				return m, perr("needs a value")
			}
		default:
			known = false
		}
		switch key {
		case "alg":
			m.Alg = val
		case "ealg":
			m.Ealg = val
		case "prot":
			switch strings.ToLower(val) {
			case "esp", "ah":
				m.Prot = strings.ToLower(val)
			default:
				return m, perr("%q: want esp or ah", clip(val))
			}
		case "mod":
			mod, err := ParseMode(val)
			if err != nil {
				return m, perr("%v", err)
			}
			m.Mod = mod
		case "spi-c", "spi-s":
			n, err := parseSPI(val)
			if err != nil {
				return m, perr("%v", err)
			}
			if key == "spi-c" {
				m.SPIC, m.HasSPIC = n, true
			} else {
				m.SPIS, m.HasSPIS = n, true
			}
		case "port-c", "port-s":
			n, err := parsePort(val)
			if err != nil {
				return m, perr("%v", err)
			}
			if key == "port-c" {
				m.PortC, m.HasPortC = n, true
			} else {
				m.PortS, m.HasPortS = n, true
			}
		}
		if !known {
			m.Extra = append(m.Extra, Param{Name: name, Value: val, Bare: !hasVal})
		}
	}
	if ipsec {
		for _, req := range []struct {
			name string
			ok   bool
		}{{"alg", m.Alg != ""}, {"spi-c", m.HasSPIC}, {"spi-s", m.HasSPIS}, {"port-c", m.HasPortC}, {"port-s", m.HasPortS}} {
			if !req.ok {
				return m, &ParseError{Name: m.Name, Param: req.name, Reason: "required for ipsec-3gpp (TS 33.203 7.2)"}
			}
		}
	}
	return m, nil
}

// parseSPI reads a decimal 32-bit SPI. Leading zeros are accepted (TS
// 24.229's examples write them); hex is not what the header carries.
func parseSPI(s string) (uint32, error) {
	if !allDigits(s) {
		return 0, fmt.Errorf("%q is not a decimal number", clip(s))
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%s does not fit in 32 bits", clip(s))
	}
	return uint32(n), nil
}

func parsePort(s string) (uint16, error) {
	if !allDigits(s) {
		return 0, fmt.Errorf("%q is not a decimal number", clip(s))
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%s: want a port 1..65535", clip(s))
	}
	return uint16(n), nil
}

// parseQ reads an RFC 3261 qvalue: "0" ["." 0*3DIGIT] / "1" ["." 0*3("0")].
func parseQ(s string) (int, error) {
	bad := fmt.Errorf("%q: want a qvalue 0..1 with at most 3 decimals", clip(s))
	if s == "" || (s[0] != '0' && s[0] != '1') {
		return 0, bad
	}
	whole := int(s[0] - '0')
	frac := 0
	if len(s) > 1 {
		if s[1] != '.' || len(s) > 5 || !allDigits(s[2:]) && len(s) > 2 {
			return 0, bad
		}
		digits := s[2:]
		for i := 0; i < 3; i++ {
			frac *= 10
			if i < len(digits) {
				frac += int(digits[i] - '0')
			}
		}
	}
	if whole == 1 && frac != 0 {
		return 0, bad
	}
	return whole*1000 + frac, nil
}

func formatQ(q int) string {
	if q >= 1000 {
		return "1"
	}
	s := strings.TrimRight(fmt.Sprintf("%03d", q), "0")
	if s == "" {
		return "0"
	}
	return "0." + s
}

// split cuts s at sep outside quoted strings.
func split(s string, sep byte) ([]string, error) {
	var out []string
	start, inQ := 0, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case inQ && c == '\\':
			i++
		case c == '"':
			inQ = !inQ
		case !inQ && c == sep:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	if inQ {
		return nil, errors.New("unterminated quoted string")
	}
	return append(out, s[start:]), nil
}

// trimLWS removes spaces, tabs and CRLF line folding around a field.
func trimLWS(s string) string { return strings.Trim(s, " \t\r\n") }

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// isToken is RFC 3261's token: alphanumerics and -.!%*_+`'~
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("-.!%*_+`'~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func isQuoted(s string) bool {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		switch s[i] {
		case '\\':
			i++
			if i >= len(s)-1 {
				return false
			}
		case '"', '\r', '\n':
			return false
		}
	}
	return true
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// String produces the mechanism as a header list element, in a canonical
// parameter order (q, prot, mod, ealg, alg, spi-c, spi-s, port-c, port-s,
// then the uninterpreted parameters as parsed). Parse reads it back to an
// equal Mechanism.
func (m *Mechanism) String() string {
	var b strings.Builder
	b.WriteString(m.Name)
	if m.HasQ {
		b.WriteString(";q=" + formatQ(m.Q))
	}
	if m.IsIPsec3GPP() {
		if m.Prot != "" {
			b.WriteString(";prot=" + m.Prot)
		}
		if m.Mod != ModeUnset {
			b.WriteString(";mod=" + m.Mod.String())
		}
		if m.Ealg != "" {
			b.WriteString(";ealg=" + m.Ealg)
		}
		if m.Alg != "" {
			b.WriteString(";alg=" + m.Alg)
		}
		if m.HasSPIC {
			b.WriteString(";spi-c=" + strconv.FormatUint(uint64(m.SPIC), 10))
		}
		if m.HasSPIS {
			b.WriteString(";spi-s=" + strconv.FormatUint(uint64(m.SPIS), 10))
		}
		if m.HasPortC {
			b.WriteString(";port-c=" + strconv.Itoa(int(m.PortC)))
		}
		if m.HasPortS {
			b.WriteString(";port-s=" + strconv.Itoa(int(m.PortS)))
		}
	}
	for _, p := range m.Extra {
		b.WriteString(";" + p.Name)
		if !p.Bare {
			b.WriteString("=" + p.Value)
		}
	}
	return b.String()
}

// Format produces a header value from mechanisms, comma-separated.
func Format(ms []Mechanism) string {
	parts := make([]string, len(ms))
	for i := range ms {
		parts[i] = ms[i].String()
	}
	return strings.Join(parts, ", ")
}

// Same reports whether a and b describe the same security mechanism
// (RFC 3329 2.3.1: the server compares Security-Verify with the
// Security-Server it sent): names and parameter names case-insensitively,
// the ipsec-3gpp values by meaning (an absent ealg equals ealg=null,
// absent prot equals esp, absent mod equals trans), extensions exactly.
func Same(a, b *Mechanism) bool {
	if !strings.EqualFold(a.Name, b.Name) || a.HasQ != b.HasQ || a.Q != b.Q {
		return false
	}
	if a.IsIPsec3GPP() {
		if a.Alg != b.Alg || a.EffectiveEalg() != b.EffectiveEalg() || a.EffectiveProt() != b.EffectiveProt() ||
			a.Mod.Effective() != b.Mod.Effective() ||
			a.HasSPIC != b.HasSPIC || a.SPIC != b.SPIC || a.HasSPIS != b.HasSPIS || a.SPIS != b.SPIS ||
			a.HasPortC != b.HasPortC || a.PortC != b.PortC || a.HasPortS != b.HasPortS || a.PortS != b.PortS {
			return false
		}
	}
	if len(a.Extra) != len(b.Extra) {
		return false
	}
	for i := range a.Extra {
		x, y := a.Extra[i], b.Extra[i]
		if !strings.EqualFold(x.Name, y.Name) || x.Value != y.Value || x.Bare != y.Bare {
			return false
		}
	}
	return true
}

// Verify checks a Security-Verify value against the Security-Server list
// the P-CSCF sent: the same mechanisms in the same order (RFC 3329 2.3.1;
// a mismatch means a downgrade attempt). The error says which differs.
func Verify(verify string, sent []Mechanism) error {
	got, err := Parse(verify)
	if err != nil {
		return fmt.Errorf("security-verify: %w", err)
	}
	if len(got) != len(sent) {
		return fmt.Errorf("security-verify: %d mechanisms, the security-server sent %d", len(got), len(sent))
	}
	for i := range got {
		if !Same(&got[i], &sent[i]) {
			return fmt.Errorf("security-verify: mechanism %d is %q, the security-server sent %q", i+1, clip(got[i].String()), clip(sent[i].String()))
		}
	}
	return nil
}
