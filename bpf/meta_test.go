package bpf_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/xesp/xesp/bpf"
)

// TestMetaBytes pins the metadata layout byte for byte, one frame per
// classifier branch: what the worker reads in front of a redirected frame
// (docs/architecture.md, "The XDP-to-worker hand-off"). The fixture tables
// compare decoded structs; this states the wire layout itself, so a
// reordered or resized field fails here even if both sides were
// regenerated. Little-endian hosts (the __u32/__u16 fields are host order;
// sport is network order).
func TestMetaBytes(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("expected bytes are written for a little-endian host")
	}
	objs, _, _ := publicSetup(t)
	priv, set := loadObjects(t, 16)
	if err := set.Config.Set(bpf.Config{Workers: 2}); err != nil {
		t.Fatal(err)
	}
	for p, pol := range map[string]bpf.Policy{
		"10.99.0.0/24":     {SaIndex: 0x0105, Worker: 1},
		"2001:db8:99::/64": {SaIndex: 15, Worker: 0},
	} {
		if err := set.Policies.Put(netip.MustParsePrefix(p), pol); err != nil {
			t.Fatal(err)
		}
	}

	esp := espBody(spiW0, 1, 48)
	i4 := ip4(layers.IPProtocolUDP)
	espV4 := serialize(t, eth(layers.EthernetTypeIPv4), i4, udp(i4, phonePort, natt), esp)
	qinq := &layers.Dot1Q{VLANIdentifier: 200, Type: layers.EthernetTypeIPv6}
	i6 := ip6(layers.IPProtocolUDP)
	espV6QinQ := serialize(t, eth(layers.EthernetTypeQinQ), qinq, i6, udp(i6, phonePort, natt), esp)
	dot1q := &layers.Dot1Q{VLANIdentifier: 100, Type: layers.EthernetTypeIPv4}
	plain4VLAN := serialize(t, eth(layers.EthernetTypeDot1Q), dot1q, ip4(layers.IPProtocolESP), esp)
	plain6 := serialize(t, eth(layers.EthernetTypeIPv6), ip6(layers.IPProtocolESP), esp)
	i4 = ip4(layers.IPProtocolUDP)
	keepalive := serialize(t, eth(layers.EthernetTypeIPv4), i4, udp(i4, phonePort, natt), gopacket.Payload{0xff})
	i4 = ip4(layers.IPProtocolUDP)
	ike := serialize(t, eth(layers.EthernetTypeIPv4), i4, udp(i4, phonePort, natt), gopacket.Payload(make([]byte, 40)))

	sip := gopacket.Payload("INVITE sip:ue1 SIP/2.0\r\n") // 24 bytes
	c4 := ip4(layers.IPProtocolUDP)
	c4.SrcIP, c4.DstIP = net.ParseIP("10.0.0.5").To4(), net.ParseIP("10.99.0.1").To4()
	clear4VLAN := serialize(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{VLANIdentifier: 7, Type: layers.EthernetTypeIPv4}, c4, udp(c4, 5060, 5060), sip)
	c6 := ip6(layers.IPProtocolUDP)
	c6.DstIP = net.ParseIP("2001:db8:99::1")
	clear6 := serialize(t, eth(layers.EthernetTypeIPv6), c6, udp(c6, 5060, 5060), sip)

	// Fields in order: src[16] | sa_index | sport | l3_off | l4_off |
	// l3_len | worker family kind magic.
	const (
		srcA4 = "00000000000000000000ffffc000020a"           // ::ffff:192.0.2.10
		srcA6 = "20010db8" + "0000000000000000" + "0000000a" // 2001:db8::a
		none  = "00000000000000000000000000000000"
	)
	for _, c := range []struct {
		name string
		prog string
		in   []byte
		want string // "" for no metadata
	}{
		// ESP of 56 bytes (SPI, sequence number, 48 more): an 84-byte IP
		// packet, 76 after the strip; sport 31000 = 0x7918.
		{"esp-udp-v4", "public", espV4, srcA4 + "07000000" + "7918" + "0e00" + "2200" + "4c00" + "00" + "04" + "01" + "e6"},
		// 802.1ad tag: IP at 18, ESP at 58; 104 bytes, 96 after the strip.
		{"esp-udp-v6-802.1ad", "public", espV6QinQ, srcA6 + "07000000" + "7918" + "1200" + "3a00" + "6000" + "00" + "06" + "01" + "e6"},
		{"plain-esp-v4-802.1q", "public", plain4VLAN, srcA4 + "07000000" + "0000" + "1200" + "2600" + "4c00" + "00" + "04" + "02" + "e6"},
		{"plain-esp-v6", "public", plain6, srcA6 + "07000000" + "0000" + "0e00" + "3600" + "6000" + "00" + "06" + "02" + "e6"},
		{"keepalive", "public", keepalive, ""},
		{"non-esp-marker", "public", ike, ""},
		// 20+8+24 = 52 bytes; slot 0x105 on worker 1 (no socket: the
		// metadata is written before the redirect fails).
		{"clear-v4-802.1q", "private", clear4VLAN, none + "05010000" + "0000" + "1200" + "2600" + "3400" + "01" + "04" + "03" + "e6"},
		{"clear-v6", "private", clear6, none + "0f000000" + "0000" + "0e00" + "3600" + "4800" + "00" + "06" + "03" + "e6"},
	} {
		t.Run(c.name, func(t *testing.T) {
			prog := objs.XespPublic
			if c.prog == "private" {
				prog = priv.XespPrivate
			}
			_, _, meta := run(t, prog, c.in, xdpMD{})
			want, err := hex.DecodeString(strings.ReplaceAll(c.want, " ", ""))
			if err != nil || len(want) != 0 && len(want) != bpf.MetaSize {
				t.Fatalf("bad expectation %q (%d bytes): %v", c.want, len(want), err)
			}
			if !bytes.Equal(meta, want) {
				t.Errorf("metadata\n got %x\nwant %x", meta, want)
			}
		})
	}
}
