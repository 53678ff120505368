package ue

import (
	"bytes"
	"encoding/binary"
)

// SIPClaim returns a TunnelConfig.Claim / Phone.Expect claim for a phone
// whose SIP user is user: a SIP request over UDP must carry the user in
// its Request-URI (the core reaches a registered phone at its Contact),
// a response in its To URI (the phone's own AOR in what it sent). Packets
// that are not SIP over UDP are not judged. This is the only way a phone
// can tell a misdelivery when phones behind different NAPTs share inner
// addresses and SIP ports: the packet looks addressed to it.
func SIPClaim(user string) func(inner []byte) bool {
	want := []byte(user)
	return func(p []byte) bool {
		payload := udpPayload(p)
		if payload == nil {
			return true
		}
		first, rest, _ := bytes.Cut(payload, []byte("\r\n"))
		var uri []byte
		switch {
		case bytes.HasPrefix(first, []byte("SIP/2.0 ")):
			uri = header(rest, "to", "t")
		case bytes.HasSuffix(first, []byte(" SIP/2.0")):
			f := bytes.Fields(first)
			if len(f) == 3 {
				uri = f[1]
			}
		default:
			return true // not SIP
		}
		return bytes.Equal(uriUser(uri), want)
	}
}

// udpPayload is the payload of an unfragmented IPv4 or IPv6 UDP packet;
// nil for anything else.
func udpPayload(p []byte) []byte {
	var l4 []byte
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		ihl := int(p[0]&0x0f) * 4
		if p[9] != 17 || ihl < 20 || len(p) < ihl+8 || binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 {
			return nil
		}
		l4 = p[ihl:]
	case len(p) >= 48 && p[0]>>4 == 6 && p[6] == 17:
		l4 = p[40:]
	default:
		return nil
	}
	return l4[8:]
}

// header returns the value of the first header named long or short
// (compact form), case-insensitively.
func header(h []byte, long, short string) []byte {
	for len(h) > 0 {
		var line []byte
		line, h, _ = bytes.Cut(h, []byte("\r\n"))
		if len(line) == 0 {
			return nil
		}
		name, val, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		name = bytes.TrimSpace(name)
		if bytes.EqualFold(name, []byte(long)) || bytes.EqualFold(name, []byte(short)) {
			return bytes.TrimSpace(val)
		}
	}
	return nil
}

// uriUser is the user part of the first sip: or sips: URI in v.
func uriUser(v []byte) []byte {
	i := bytes.Index(v, []byte("sip:"))
	if j := bytes.Index(v, []byte("sips:")); j >= 0 && (i < 0 || j < i) {
		i = j + 1
	}
	if i < 0 {
		return nil
	}
	u := v[i+4:]
	at := bytes.IndexByte(u, '@')
	if at < 0 || bytes.ContainsAny(u[:at], ">;") {
		return nil
	}
	return u[:at]
}
