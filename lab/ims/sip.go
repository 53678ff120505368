package ims

import (
	"fmt"
	"strings"
)

// Msg is a parsed text SIP message: start line and headers by lower-case
// name, repeated headers joined with ", " (RFC 3261 7.3.1 list headers).
// Enough for the lab's REGISTER, OPTIONS and their responses; bodies are
// not used.
type Msg struct {
	Start string
	Hdr   map[string]string
}

// compact forms the lab's peers might use (RFC 3261 7.3.3).
var compact = map[string]string{"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length"}

// ParseMsg parses b; ok is false for anything but a SIP message.
func ParseMsg(b []byte) (Msg, bool) {
	head, _, _ := strings.Cut(string(b), "\r\n\r\n")
	lines := strings.Split(head, "\r\n")
	m := Msg{Start: lines[0], Hdr: map[string]string{}}
	for _, l := range lines[1:] {
		name, val, ok := strings.Cut(l, ":")
		if !ok {
			return m, false
		}
		k := strings.ToLower(strings.TrimSpace(name))
		if c, ok := compact[k]; ok {
			k = c
		}
		v := strings.TrimSpace(val)
		if old, dup := m.Hdr[k]; dup {
			v = old + ", " + v
		}
		m.Hdr[k] = v
	}
	return m, strings.Contains(m.Start, "SIP/2.0")
}

// IsRequest says whether m is a request (not a response).
func (m Msg) IsRequest() bool { return !strings.HasPrefix(m.Start, "SIP/2.0 ") }

// Method is a request's method.
func (m Msg) Method() string { meth, _, _ := strings.Cut(m.Start, " "); return meth }

// Status is a response's code, 0 for a request.
func (m Msg) Status() int {
	var c int
	if !m.IsRequest() {
		fmt.Sscanf(m.Start, "SIP/2.0 %d", &c)
	}
	return c
}

// Build returns a SIP message with the start line and headers given.
func Build(start string, hdrs ...string) []byte {
	return []byte(start + "\r\n" + strings.Join(hdrs, "\r\n") + "\r\nContent-Length: 0\r\n\r\n")
}

// Response answers req with status, copying Via, From, To (tag added),
// Call-ID and CSeq (RFC 3261 8.2.6), plus extra headers.
func Response(req Msg, status string, extra ...string) []byte {
	var vias []string
	for _, v := range splitList(req.Hdr["via"]) {
		vias = append(vias, "Via: "+v)
	}
	to := req.Hdr["to"]
	if !strings.Contains(to, ";tag=") {
		to += ";tag=" + fmt.Sprintf("%08x", hash32(req.Hdr["call-id"]+req.Hdr["cseq"]))
	}
	h := append(vias, "From: "+req.Hdr["from"], "To: "+to, "Call-ID: "+req.Hdr["call-id"], "CSeq: "+req.Hdr["cseq"])
	return Build("SIP/2.0 "+status, append(h, extra...)...)
}

// splitList splits a joined header list at commas outside quotes and <>.
func splitList(v string) []string {
	var out []string
	depth, quoted, start := 0, false, 0
	for i := 0; i < len(v); i++ {
		switch c := v[i]; {
		case c == '"':
			quoted = !quoted
		case quoted:
		case c == '<':
			depth++
		case c == '>':
			depth--
		case c == ',' && depth == 0:
			out = append(out, strings.TrimSpace(v[start:i]))
			start = i + 1
		}
	}
	if s := strings.TrimSpace(v[start:]); s != "" {
		out = append(out, s)
	}
	return out
}

// Param returns a parameter of a header value (name=value, separated by
// ';' or ','), quotes removed; "" when absent.
func Param(v, name string) string {
	for _, part := range strings.FieldsFunc(v, func(r rune) bool { return r == ';' || r == ',' }) {
		k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
		// "Digest username": the scheme precedes the first parameter.
		if f := strings.Fields(k); ok && len(f) > 0 && strings.EqualFold(f[len(f)-1], name) {
			return strings.Trim(strings.TrimSpace(val), `"`)
		}
	}
	return ""
}

func hash32(s string) uint32 {
	h := uint32(2166136261)
	for i := 0; i < len(s); i++ {
		h = (h ^ uint32(s[i])) * 16777619
	}
	return h
}
