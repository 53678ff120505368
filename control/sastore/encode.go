package sastore

import (
	"encoding/hex"
	"encoding/json"
	"strconv"

	"github.com/xesp/xesp/control/sa"
)

// AppendSA appends s's entry (EncodeSA) to dst. It writes what
// json.Marshal writes for s.WithKeys(), byte for byte (TestAppendSAMatchesJSON),
// without reflection or the Spec's allocations: a store of a million SAs
// encodes each one at least once, and encoding was most of its cost.
func AppendSA(dst []byte, s *sa.SA) []byte {
	dst = append(dst, '{')
	if s.Name != "" {
		dst = appendString(append(dst, `"name":`...), s.Name)
		dst = append(dst, ',')
	}
	if s.Pair != "" {
		dst = appendString(append(dst, `"pair":`...), s.Pair)
		dst = append(dst, ',')
	}
	dst = append(dst, `"spi":"0x`...)
	dst = appendHex32(dst, s.SPI)
	dst = append(dst, `","direction":"`...)
	dst = append(dst, s.Direction.String()...)
	dst = append(dst, `","mode":"`...)
	dst = append(dst, s.Mode.String()...)
	dst = append(dst, `","proposal":"`...)
	dst = append(dst, s.Proposal.String()...)
	dst = append(dst, '"')
	if len(s.EncKey) > 0 {
		dst = append(dst, `,"enc_key":"`...)
		dst = hex.AppendEncode(dst, s.EncKey)
		dst = append(dst, '"')
	}
	if len(s.AuthKey) > 0 {
		dst = append(dst, `,"auth_key":"`...)
		dst = hex.AppendEncode(dst, s.AuthKey)
		dst = append(dst, '"')
	}
	if s.ESN {
		dst = append(dst, `,"esn":true`...)
	}
	if s.Direction == sa.In {
		dst = append(dst, `,"replay_window":`...)
		dst = strconv.AppendUint(dst, uint64(s.ReplayWindow), 10)
	}
	dst = append(dst, `,"local":"`...)
	dst = s.Local.AppendTo(dst)
	dst = append(dst, `","peer":"`...)
	dst = s.Peer.AppendTo(dst)
	dst = append(dst, '"')
	if s.Encap != nil {
		dst = append(dst, `,"encap":{"local_port":`...)
		dst = strconv.AppendUint(dst, uint64(s.Encap.LocalPort), 10)
		dst = append(dst, `,"peer_port":`...)
		dst = strconv.AppendUint(dst, uint64(s.Encap.PeerPort), 10)
		dst = append(dst, '}')
	}
	if s.InnerLocal.IsValid() || s.Core.IsValid() {
		dst = append(dst, `,"inner":{"local":"`...)
		if s.InnerLocal.IsValid() {
			dst = s.InnerLocal.AppendTo(dst)
		}
		dst = append(dst, '"')
		if s.InnerPeer.IsValid() {
			dst = append(dst, `,"peer":"`...)
			dst = s.InnerPeer.AppendTo(dst)
			dst = append(dst, '"')
		}
		if s.Core.IsValid() {
			dst = append(dst, `,"core":"`...)
			dst = s.Core.AppendTo(dst)
			dst = append(dst, '"')
		}
		dst = append(dst, '}')
	}
	if l := s.Lifetime; l != (sa.Lifetime{}) {
		dst = append(dst, `,"lifetime":{`...)
		n := len(dst)
		for _, f := range [...]struct {
			name string
			v    uint64
		}{{"soft_bytes", l.SoftBytes}, {"hard_bytes", l.HardBytes}, {"soft_packets", l.SoftPackets},
			{"hard_packets", l.HardPackets}, {"soft_seconds", l.SoftSeconds}, {"hard_seconds", l.HardSeconds}} {
			if f.v != 0 {
				dst = appendField(dst, n, f.name)
				dst = strconv.AppendUint(dst, f.v, 10)
			}
		}
		dst = append(dst, '}')
	}
	if p := s.Ports; p != (sa.Ports{}) {
		dst = append(dst, `,"ports":{`...)
		n := len(dst)
		if p.Local != 0 {
			dst = strconv.AppendUint(appendField(dst, n, "local"), uint64(p.Local), 10)
		}
		if p.Peer != 0 {
			dst = strconv.AppendUint(appendField(dst, n, "peer"), uint64(p.Peer), 10)
		}
		if name := sa.ProtoName(p.Proto); name != "" {
			dst = appendString(appendField(dst, n, "protocol"), name)
		}
		dst = append(dst, '}')
	}
	if s.HasDSCP {
		dst = append(dst, `,"dscp":`...)
		dst = strconv.AppendUint(dst, uint64(s.DSCP), 10)
	}
	if s.IdleTimeout != 0 {
		dst = append(dst, `,"idle_timeout":`...)
		dst = strconv.AppendUint(dst, s.IdleTimeout, 10)
	}
	return append(dst, '}')
}

// appendField appends `"name":`, after a comma unless it is the first
// field of the object that starts at start.
func appendField(dst []byte, start int, name string) []byte {
	if len(dst) > start {
		dst = append(dst, ',')
	}
	dst = append(dst, '"')
	dst = append(dst, name...)
	return append(dst, `":`...)
}

func appendHex32(dst []byte, v uint32) []byte {
	const digits = "0123456789abcdef"
	for sh := 28; sh >= 0; sh -= 4 {
		dst = append(dst, digits[v>>uint(sh)&0xf])
	}
	return dst
}

// appendString appends s as a JSON string the way encoding/json does:
// plain printable ASCII as is, anything else through json.Marshal (its
// HTML and Unicode escapes).
func appendString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, _ := json.Marshal(s)
			return append(dst, b...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}
