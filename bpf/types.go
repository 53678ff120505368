package bpf

import (
	"encoding/binary"
	"net/netip"
)

// Short names for the types bpf2go generates from xesp.h. They are aliases,
// not copies: the layout still comes from the header alone.
type (
	SASteer   = XespXespSa
	Policy    = XespXespPolicy
	PolicyKey = XespXespPolicyKey
	CoreKey   = XespXespCoreKey
	CoreCfg   = XespXespCoreCfg
	Config    = XespXespConfig
	Counter   = XespXespCounter
	Meta      = XespXespMeta
	Reason    = XespXespReason
	MetaKind  = XespXespMetaKind
	// FloodSA, FloodSrcKey and FloodSrc are the flood-budget maps' types.
	FloodSA     = XespXespFloodSa
	FloodSrcKey = XespXespFloodSrcKey
	FloodSrc    = XespXespFloodSrc
	// BindingKey and Keepalive are the keepalives map's key and value.
	BindingKey = XespXespBindingKey
	Keepalive  = XespXespKeepalive
)

// Constants from xesp.h's enums under Go names.
const (
	MetaMagic   = uint8(XespXespMetaMagicXESP_META_MAGIC)
	MetaESPUDP  = XespXespMetaKindXESP_META_ESP_UDP
	MetaESP     = XespXespMetaKindXESP_META_ESP
	MetaClear   = XespXespMetaKindXESP_META_CLEAR
	SAFlagEncap = uint16(XespXespSaFlagXESP_SA_F_ENCAP)
	// CoreFlagPort and CoreFlagAny (core_cfg) turn on xesp_private's
	// exact-match lookups of (address, port) and (address, any port)
	// entries; CoreFlags is both.
	CoreFlagPort = uint32(XespXespCoreFlagXESP_CORE_F_PORT)
	CoreFlagAny  = uint32(XespXespCoreFlagXESP_CORE_F_ANY)
	CoreFlags    = CoreFlagPort | CoreFlagAny

	// MetaSize is sizeof(struct xesp_meta): the bytes before a redirected
	// frame's data that hold the metadata.
	MetaSize = 32

	// NumReasons is XESP_REASON_MAX, the size of the counters map.
	NumReasons = int(XespXespReasonXESP_REASON_MAX)
)

// Reasons under Go names, in enum order.
const (
	PassNotIP         = XespXespReasonXESP_PASS_NOT_IP
	PassOther         = XespXespReasonXESP_PASS_OTHER
	PassMalformed     = XespXespReasonXESP_PASS_MALFORMED
	PassIKE           = XespXespReasonXESP_PASS_IKE
	PassFragment      = XespXespReasonXESP_PASS_FRAGMENT
	DropKeepalive     = XespXespReasonXESP_DROP_KEEPALIVE
	DropRunt          = XespXespReasonXESP_DROP_RUNT
	DropBadUDPLen     = XespXespReasonXESP_DROP_BAD_UDP_LEN
	DropNoSA          = XespXespReasonXESP_DROP_NO_SA
	DropNoXSK         = XespXespReasonXESP_DROP_NO_XSK
	RedirectESPUDP    = XespXespReasonXESP_REDIRECT_ESP_UDP
	RedirectESP       = XespXespReasonXESP_REDIRECT_ESP
	Aborted           = XespXespReasonXESP_ABORTED
	DropFloodSA       = XespXespReasonXESP_DROP_FLOOD_SA
	DropFloodSrc      = XespXespReasonXESP_DROP_FLOOD_SRC
	PassOtherVLAN     = XespXespReasonXESP_PASS_OTHER_VLAN
	PrivPassNotIP     = XespXespReasonXESP_PRIV_PASS_NOT_IP
	PrivPassMalformed = XespXespReasonXESP_PRIV_PASS_MALFORMED
	PrivPassNoPolicy  = XespXespReasonXESP_PRIV_PASS_NO_POLICY
	PrivDropNoXSK     = XespXespReasonXESP_PRIV_DROP_NO_XSK
	PrivRedirect      = XespXespReasonXESP_PRIV_REDIRECT
	PrivAborted       = XespXespReasonXESP_PRIV_ABORTED
	// PrivRedirectCorePort and PrivRedirectCore are exact-match hits in
	// the cores map, with the destination port and with the any-port
	// entry; PrivRedirect is a trie hit.
	PrivRedirectCorePort = XespXespReasonXESP_PRIV_REDIRECT_CORE_PORT
	PrivRedirectCore     = XespXespReasonXESP_PRIV_REDIRECT_CORE
	PrivPassOtherVLAN    = XespXespReasonXESP_PRIV_PASS_OTHER_VLAN
)

// reasonNames are the enum names without the XESP_ prefix, lower case: the
// label values of the verdict metrics. TestReasonNamesMatchBTF keeps them
// in step with xesp.h.
var reasonNames = [...]string{
	PassNotIP:            "pass_not_ip",
	PassOther:            "pass_other",
	PassMalformed:        "pass_malformed",
	PassIKE:              "pass_ike",
	PassFragment:         "pass_fragment",
	DropKeepalive:        "drop_keepalive",
	DropRunt:             "drop_runt",
	DropBadUDPLen:        "drop_bad_udp_len",
	DropNoSA:             "drop_no_sa",
	DropNoXSK:            "drop_no_xsk",
	RedirectESPUDP:       "redirect_esp_udp",
	RedirectESP:          "redirect_esp",
	Aborted:              "aborted",
	DropFloodSA:          "drop_flood_sa",
	DropFloodSrc:         "drop_flood_src",
	PassOtherVLAN:        "pass_other_vlan",
	PrivPassNotIP:        "priv_pass_not_ip",
	PrivPassMalformed:    "priv_pass_malformed",
	PrivPassNoPolicy:     "priv_pass_no_policy",
	PrivDropNoXSK:        "priv_drop_no_xsk",
	PrivRedirect:         "priv_redirect",
	PrivAborted:          "priv_aborted",
	PrivRedirectCorePort: "priv_redirect_core_port",
	PrivRedirectCore:     "priv_redirect_core",
	PrivPassOtherVLAN:    "priv_pass_other_vlan",
}

// String returns the metric label of the reason, e.g. "drop_no_sa".
func (r XespXespReason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "reason_" + itoa(uint32(r))
}

// Private reports whether the reason belongs to xesp_private.
func (r XespXespReason) Private() bool {
	return r >= PrivPassNotIP && r < XespXespReasonXESP_REASON_MAX
}

func itoa(v uint32) string {
	var b [10]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			return string(b[i:])
		}
	}
}

// DecodeMeta reads the metadata the programs put in the MetaSize bytes
// before a redirected frame's data. ok is false when b is short or the
// magic is missing (headroom left over from something else).
func DecodeMeta(b []byte) (m Meta, ok bool) {
	if len(b) < MetaSize {
		return m, false
	}
	if _, err := binary.Decode(b[len(b)-MetaSize:], binary.NativeEndian, &m); err != nil {
		return m, false
	}
	return m, m.Magic == MetaMagic
}

// SrcPort is the outer UDP source port in host order (0 for plain ESP).
func (m XespXespMeta) SrcPort() uint16 { return ntohs(m.Sport) }

// SrcAddr is the outer source address of an ESP kind in its own family
// (IPv4 unmapped); the invalid Addr when Family is neither 4 nor 6.
func (m *XespXespMeta) SrcAddr() netip.Addr {
	switch m.Family {
	case 4:
		return netip.AddrFrom4([4]byte(m.Src[12:16]))
	case 6:
		return netip.AddrFrom16(m.Src)
	}
	return netip.Addr{}
}

// ntohs undoes the network order the C side stored through a native-order
// __u16 field.
func ntohs(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}
