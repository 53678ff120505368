package bpf_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

func TestPrivateFixtures(t *testing.T) {
	objs, set := loadObjects(t, 16)
	ns := netns.ForTest(t, "xbpv")
	if err := set.Config.Set(bpf.Config{Workers: 2}); err != nil {
		t.Fatal(err)
	}
	for p, pol := range map[string]bpf.Policy{
		"10.99.0.0/24":       {SaIndex: 5, Worker: 0},
		"10.99.0.7/32":       {SaIndex: 6, Worker: 0}, // longer prefix wins
		"10.98.0.0/16":       {SaIndex: 4, Worker: 1}, // worker 1: slot empty
		"2001:db8:99::/64":   {SaIndex: 15, Worker: 0},
		"2001:db8:ffff::/48": {SaIndex: 16, Worker: 0},
	} {
		if err := set.Policies.Put(netip.MustParsePrefix(p), pol); err != nil {
			t.Fatal(err)
		}
	}
	if err := set.XSKPrivate.Set(maps.Index(0, 2, 0), xskSocket(t, ns, "lo", 0)); err != nil {
		t.Fatal(err)
	}

	to4 := func(dst string, vlan bool) []byte {
		i := ip4(layers.IPProtocolUDP)
		i.SrcIP, i.DstIP = net.ParseIP("10.0.0.5").To4(), net.ParseIP(dst).To4()
		u := udp(i, 5060, 5060)
		pl := gopacket.Payload("INVITE sip:ue1 SIP/2.0\r\n")
		if vlan {
			return serialize(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{VLANIdentifier: 7, Type: layers.EthernetTypeIPv4}, i, u, pl)
		}
		return serialize(t, eth(layers.EthernetTypeIPv4), i, u, pl)
	}
	to6 := func(dst string) []byte {
		i := ip6(layers.IPProtocolUDP)
		i.DstIP = net.ParseIP(dst)
		return serialize(t, eth(layers.EthernetTypeIPv6), i, udp(i, 5060, 5060), gopacket.Payload("SIP/2.0 200 OK\r\n"))
	}
	arp := serialize(t, eth(layers.EthernetTypeARP), &layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4,
		HwAddressSize: 6, ProtAddressSize: 4, Operation: 1, SourceHwAddress: macA, SourceProtAddress: ipA4,
		DstHwAddress: make([]byte, 6), DstProtAddress: ipB4})
	v4 := to4("10.99.0.1", false)
	v6 := to6("2001:db8:99::1")
	bad := append([]byte(nil), v4...)
	bad[14] = 0x43

	runTable(t, objs.XespPrivate, set, []fixture{
		{name: "v4-hit", in: v4, verdict: xdpRedirect, meta: meta(bpf.MetaClear, 5, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "v4-longest-prefix", in: to4("10.99.0.7", false), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 6, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "v4-802.1q-hit", in: to4("10.99.0.200", true), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 5, 0, 0, 18), reason: bpf.PrivRedirect},
		{name: "v6-hit", in: v6, verdict: xdpRedirect, meta: meta(bpf.MetaClear, 15, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "v6-hit-48", in: to6("2001:db8:ffff:1::9"), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 16, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "v4-slot-empty", in: to4("10.98.3.4", false), verdict: xdpDrop, meta: meta(bpf.MetaClear, 4, 1, 0, 14), reason: bpf.PrivDropNoXSK},
		{name: "v4-miss", in: to4("10.100.0.1", false), verdict: xdpPass, reason: bpf.PrivPassNoPolicy},
		// IPv4 policies are stored IPv4-mapped, so an IPv6 packet to the
		// mapped form of a policy address matches it. Such packets do not
		// occur on the wire (RFC 4291 2.5.5.2); pinned so a change shows.
		{name: "v6-mapped-matches-v4-policy", in: to6("::ffff:10.99.0.1"), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 5, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "v6-miss", in: to6("2001:db8:98::1"), verdict: xdpPass, reason: bpf.PrivPassNoPolicy},
		{name: "arp", in: arp, verdict: xdpPass, reason: bpf.PrivPassNotIP},
		{name: "trunc-ipv4", in: v4[:14+19], verdict: xdpPass, reason: bpf.PrivPassMalformed},
		{name: "trunc-ipv6", in: v6[:14+39], verdict: xdpPass, reason: bpf.PrivPassMalformed},
		{name: "trunc-vlan", in: to4("10.99.0.1", true)[:17], verdict: xdpPass, reason: bpf.PrivPassMalformed},
		{name: "bad-ihl", in: bad, verdict: xdpPass, reason: bpf.PrivPassMalformed},
	})
}

// The exact-match step in front of the trie: two phones share inner
// address 192.168.1.10 (one trie entry could serve only one of them), and
// each is reached by its own core address; a phone's SAs differ by
// destination port, with an any-port entry beside them.
func TestPrivateCoreFixtures(t *testing.T) {
	objs, set := loadObjects(t, 16)
	ns := netns.ForTest(t, "xbpc")
	if err := set.Config.Set(bpf.Config{Workers: 2}); err != nil {
		t.Fatal(err)
	}
	if err := set.Cores.SetKinds(bpf.CoreFlags); err != nil {
		t.Fatal(err)
	}
	for p, pol := range map[string]bpf.Policy{
		"192.168.1.10/32":  {SaIndex: 1, Worker: 0}, // an SA without a core address
		"100.64.0.0/10":    {SaIndex: 2, Worker: 0}, // a trie prefix covering the pool
		"2001:db8:99::/64": {SaIndex: 3, Worker: 0},
	} {
		if err := set.Policies.Put(netip.MustParsePrefix(p), pol); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		addr string
		port uint16
		pol  bpf.Policy
	}{
		{"100.64.0.1", 5060, bpf.Policy{SaIndex: 10, Worker: 0}}, // phone A, server port
		{"100.64.0.1", 5062, bpf.Policy{SaIndex: 11, Worker: 0}}, // phone A, client port
		{"100.64.0.2", 5060, bpf.Policy{SaIndex: 20, Worker: 0}}, // phone B, same ports
		{"100.64.0.2", 5062, bpf.Policy{SaIndex: 21, Worker: 0}},
		{"100.64.0.3", 0, bpf.Policy{SaIndex: 30, Worker: 0}}, // phone C, any port
		{"100.64.0.3", 5060, bpf.Policy{SaIndex: 31, Worker: 0}},
		{"100.64.0.4", 0, bpf.Policy{SaIndex: 40, Worker: 1}}, // worker 1: slot empty
		{"2001:db8:99::5", 5060, bpf.Policy{SaIndex: 50, Worker: 0}},
	} {
		if err := set.Cores.Put(netip.MustParseAddr(c.addr), c.port, c.pol); err != nil {
			t.Fatal(err)
		}
	}
	if err := set.XSKPrivate.Set(maps.Index(0, 2, 0), xskSocket(t, ns, "lo", 0)); err != nil {
		t.Fatal(err)
	}
	udp4 := func(dst string, dport uint16) []byte {
		i := ip4(layers.IPProtocolUDP)
		i.SrcIP, i.DstIP = net.ParseIP("10.0.0.5").To4(), net.ParseIP(dst).To4()
		return serialize(t, eth(layers.EthernetTypeIPv4), i, udp(i, 5064, dport), gopacket.Payload("OPTIONS sip:ue SIP/2.0\r\n"))
	}
	tcp4 := func(dst string, dport uint16) []byte {
		i := ip4(layers.IPProtocolTCP)
		i.SrcIP, i.DstIP = net.ParseIP("10.0.0.5").To4(), net.ParseIP(dst).To4()
		tc := &layers.TCP{SrcPort: 5064, DstPort: layers.TCPPort(dport), Seq: 1, SYN: true, Window: 1000}
		tc.SetNetworkLayerForChecksum(i)
		return serialize(t, eth(layers.EthernetTypeIPv4), i, tc)
	}
	icmp4 := func(dst string) []byte {
		i := ip4(layers.IPProtocolICMPv4)
		i.SrcIP, i.DstIP = net.ParseIP("10.0.0.5").To4(), net.ParseIP(dst).To4()
		return serialize(t, eth(layers.EthernetTypeIPv4), i, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0)}, gopacket.Payload("ping"))
	}
	frag4 := func(dst string) []byte {
		i := ip4(layers.IPProtocolUDP)
		i.SrcIP, i.DstIP = net.ParseIP("10.0.0.5").To4(), net.ParseIP(dst).To4()
		i.FragOffset = 100 // a later fragment: its first bytes are data, not ports
		return serialize(t, eth(layers.EthernetTypeIPv4), i, gopacket.Payload([]byte{0x13, 0xc4, 0x13, 0xc4, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}))
	}
	udp6 := func(dst string, dport uint16) []byte {
		i := ip6(layers.IPProtocolUDP)
		i.DstIP = net.ParseIP(dst)
		return serialize(t, eth(layers.EthernetTypeIPv6), i, udp(i, 5064, dport), gopacket.Payload("SIP/2.0 200 OK\r\n"))
	}
	runTable(t, objs.XespPrivate, set, []fixture{
		// Same inner address, same ports: only the core address tells
		// phone A from phone B.
		{name: "phone-a-server-port", in: udp4("100.64.0.1", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 10, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "phone-a-client-port", in: udp4("100.64.0.1", 5062), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 11, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "phone-b-server-port", in: udp4("100.64.0.2", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 20, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "phone-b-client-port", in: udp4("100.64.0.2", 5062), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 21, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "phone-b-tcp", in: tcp4("100.64.0.2", 5062), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 21, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		// A port phone A has no SA for, no any-port entry: the trie's
		// covering prefix decides (the worker's selector check then drops
		// what its SA does not match).
		{name: "phone-a-other-port-falls-to-trie", in: udp4("100.64.0.1", 9999), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 2, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "phone-c-port-entry-first", in: udp4("100.64.0.3", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 31, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "phone-c-any-port", in: udp4("100.64.0.3", 7000), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 30, 0, 0, 14), reason: bpf.PrivRedirectCore},
		{name: "phone-c-icmp-any-port", in: icmp4("100.64.0.3"), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 30, 0, 0, 14), reason: bpf.PrivRedirectCore},
		{name: "phone-c-later-fragment-no-ports", in: frag4("100.64.0.3"), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 30, 0, 0, 14), reason: bpf.PrivRedirectCore},
		{name: "phone-a-later-fragment-falls-to-trie", in: frag4("100.64.0.1"), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 2, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "core-slot-empty", in: udp4("100.64.0.4", 5060), verdict: xdpDrop, meta: meta(bpf.MetaClear, 40, 1, 0, 14), reason: bpf.PrivDropNoXSK},
		// The shared inner address itself still goes through the trie.
		{name: "inner-address-trie", in: udp4("192.168.1.10", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 1, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "v6-exact-beats-prefix", in: udp6("2001:db8:99::5", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 50, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "v6-other-port-prefix", in: udp6("2001:db8:99::5", 5061), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 3, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "miss", in: udp4("100.128.0.1", 5060), verdict: xdpPass, reason: bpf.PrivPassNoPolicy},
	})
	// Without core_cfg flags the exact-match step is skipped: the trie
	// alone decides, at the trie-only cost.
	if err := set.Cores.SetKinds(0); err != nil {
		t.Fatal(err)
	}
	runTable(t, objs.XespPrivate, set, []fixture{
		{name: "flag-off-core-ignored", in: udp4("100.64.0.1", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 2, 0, 0, 14), reason: bpf.PrivRedirect},
		{name: "flag-off-miss", in: udp4("100.128.0.1", 5060), verdict: xdpPass, reason: bpf.PrivPassNoPolicy},
	})
	// One kind on: only that lookup is made.
	if err := set.Cores.SetKinds(bpf.CoreFlagPort); err != nil {
		t.Fatal(err)
	}
	runTable(t, objs.XespPrivate, set, []fixture{
		{name: "port-only-port-hit", in: udp4("100.64.0.3", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 31, 0, 0, 14), reason: bpf.PrivRedirectCorePort},
		{name: "port-only-any-entry-skipped", in: udp4("100.64.0.3", 7000), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 2, 0, 0, 14), reason: bpf.PrivRedirect},
	})
	if err := set.Cores.SetKinds(bpf.CoreFlagAny); err != nil {
		t.Fatal(err)
	}
	runTable(t, objs.XespPrivate, set, []fixture{
		{name: "any-only-port-entry-skipped", in: udp4("100.64.0.3", 5060), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 30, 0, 0, 14), reason: bpf.PrivRedirectCore},
		{name: "any-only-any-hit", in: icmp4("100.64.0.3"), verdict: xdpRedirect, meta: meta(bpf.MetaClear, 30, 0, 0, 14), reason: bpf.PrivRedirectCore},
	})
}
