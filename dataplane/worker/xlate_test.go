package worker

import (
	"bytes"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// build serializes IP packets with gopacket, which computes every
// checksum itself: the reference the incremental updates are held to.
func build(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func v4(src, dst string, proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Id: 0x1234, Protocol: proto, SrcIP: net.ParseIP(src).To4(), DstIP: net.ParseIP(dst).To4()}
}

func v6(src, dst string, nh layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: nh, SrcIP: net.ParseIP(src), DstIP: net.ParseIP(dst)}
}

// pkts returns the same packet from src to dst for each transport the
// translation must handle, built with correct checksums.
func pkts(t testing.TB, src, dst string, payload []byte) map[string][]byte {
	out := map[string][]byte{}
	sa := netip.MustParseAddr(src)
	pl := gopacket.Payload(payload)
	if sa.Is4() {
		i := v4(src, dst, layers.IPProtocolUDP)
		u := &layers.UDP{SrcPort: 5060, DstPort: 5062}
		u.SetNetworkLayerForChecksum(i)
		out["udp4"] = build(t, i, u, pl)
		i = v4(src, dst, layers.IPProtocolTCP)
		tc := &layers.TCP{SrcPort: 5060, DstPort: 5062, Seq: 77, ACK: true, Ack: 9, Window: 512}
		tc.SetNetworkLayerForChecksum(i)
		out["tcp4"] = build(t, i, tc, pl)
		i = v4(src, dst, layers.IPProtocolICMPv4)
		out["icmp4"] = build(t, i, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: 1, Seq: 2}, pl)
		return out
	}
	i := v6(src, dst, layers.IPProtocolUDP)
	u := &layers.UDP{SrcPort: 5060, DstPort: 5062}
	u.SetNetworkLayerForChecksum(i)
	out["udp6"] = build(t, i, u, pl)
	i = v6(src, dst, layers.IPProtocolTCP)
	tc := &layers.TCP{SrcPort: 5060, DstPort: 5062, Seq: 77, SYN: true, Window: 512}
	tc.SetNetworkLayerForChecksum(i)
	out["tcp6"] = build(t, i, tc, pl)
	i = v6(src, dst, layers.IPProtocolICMPv6)
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(128, 0)}
	ic.SetNetworkLayerForChecksum(i)
	out["icmp6"] = build(t, i, ic, pl)
	return out
}

// The incremental updates give byte for byte the packet gopacket builds
// from scratch with the new address: addresses, IPv4 header checksum and
// transport checksum, nothing else changed.
func TestRewriteAddrChecksums(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	rnd4 := func() string {
		return netip.AddrFrom4([4]byte{byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32())}).String()
	}
	rnd6 := func() string {
		var b [16]byte
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		b[0] = 0x20
		return netip.AddrFrom16(b).String()
	}
	type tc struct{ phone, core, peer string }
	cases := []tc{{"192.168.1.10", "100.64.0.1", "10.0.0.5"}, {"192.168.1.10", "100.127.255.254", "10.0.0.5"},
		{"fd00::10", "2001:db8:c0::1", "2001:db8::5"}}
	for range 300 {
		cases = append(cases, tc{rnd4(), rnd4(), rnd4()}, tc{rnd6(), rnd6(), rnd6()})
	}
	for _, c := range cases {
		payload := make([]byte, r.IntN(300)+1)
		for i := range payload {
			payload[i] = byte(r.Uint32())
		}
		// Decap: phone -> peer becomes core -> peer.
		from := pkts(t, c.phone, c.peer, payload)
		want := pkts(t, c.core, c.peer, payload)
		for name, p := range from {
			if !rewriteAddr(p, true, netip.MustParseAddr(c.core)) {
				t.Fatalf("%s %v: refused", name, c)
			}
			if !bytes.Equal(p, want[name]) {
				t.Fatalf("%s src %s->%s:\n got %x\nwant %x", name, c.phone, c.core, p, want[name])
			}
		}
		// Encap: peer -> core becomes peer -> phone.
		from = pkts(t, c.peer, c.core, payload)
		want = pkts(t, c.peer, c.phone, payload)
		for name, p := range from {
			if !rewriteAddr(p, false, netip.MustParseAddr(c.phone)) {
				t.Fatalf("%s %v: refused", name, c)
			}
			if !bytes.Equal(p, want[name]) {
				t.Fatalf("%s dst %s->%s:\n got %x\nwant %x", name, c.core, c.phone, p, want[name])
			}
		}
	}
}

// Special cases: an IPv4 UDP datagram without checksum keeps none; a
// later IPv4 fragment gets its header fixed and its data untouched; IPv6
// with an extension header first is refused (the caller drops as xlate);
// a UDP checksum that comes out zero is sent as 0xffff.
func TestRewriteAddrEdges(t *testing.T) {
	i := v4("192.168.1.10", "10.0.0.5", layers.IPProtocolUDP)
	u := &layers.UDP{SrcPort: 5060, DstPort: 5062}
	u.SetNetworkLayerForChecksum(i)
	p := build(t, i, u, gopacket.Payload("REGISTER"))
	p[26], p[27] = 0, 0 // no checksum
	if !rewriteAddr(p, true, netip.MustParseAddr("100.64.0.9")) || p[26] != 0 || p[27] != 0 {
		t.Fatalf("zero UDP checksum not kept: %x", p[26:28])
	}
	wi := v4("100.64.0.9", "10.0.0.5", layers.IPProtocolUDP)
	wu := &layers.UDP{SrcPort: 5060, DstPort: 5062}
	wu.SetNetworkLayerForChecksum(wi)
	want := build(t, wi, wu, gopacket.Payload("REGISTER"))
	if !bytes.Equal(p[:20], want[:20]) {
		t.Fatalf("header\n got %x\nwant %x", p[:20], want[:20])
	}

	fi := v4("192.168.1.10", "10.0.0.5", layers.IPProtocolUDP)
	fi.FragOffset = 100
	frag := build(t, fi, gopacket.Payload("0123456789abcdef"))
	fi2 := v4("100.64.0.9", "10.0.0.5", layers.IPProtocolUDP)
	fi2.FragOffset = 100
	wantFrag := build(t, fi2, gopacket.Payload("0123456789abcdef"))
	if !rewriteAddr(frag, true, netip.MustParseAddr("100.64.0.9")) || !bytes.Equal(frag, wantFrag) {
		t.Fatalf("later fragment\n got %x\nwant %x", frag, wantFrag)
	}

	hop := build(t, v6("fd00::10", "2001:db8::5", layers.IPProtocolIPv6HopByHop), gopacket.Payload(append([]byte{17, 0, 1, 4, 0, 0, 0, 0}, make([]byte, 16)...)))
	if rewriteAddr(hop, true, netip.MustParseAddr("2001:db8:c0::1")) {
		t.Fatal("IPv6 with a hop-by-hop header first: translated")
	}
	if rewriteAddr(p, true, netip.MustParseAddr("2001:db8:c0::1")) {
		t.Fatal("IPv4 packet given an IPv6 core address: translated")
	}
	if rewriteAddr(p[:10], true, netip.MustParseAddr("100.64.0.9")) {
		t.Fatal("truncated header: translated")
	}

	// Search a payload whose new UDP checksum is zero: it must read 0xffff.
	found := false
	for n := 0; n < 1<<16 && !found; n++ {
		pl := []byte{byte(n >> 8), byte(n)}
		i := v4("100.64.0.9", "10.0.0.5", layers.IPProtocolUDP)
		u := &layers.UDP{SrcPort: 5060, DstPort: 5062}
		u.SetNetworkLayerForChecksum(i)
		ref := build(t, i, u, gopacket.Payload(pl))
		if ref[26] != 0xff || ref[27] != 0xff {
			continue // gopacket writes a computed zero as 0xffff too
		}
		found = true
		i = v4("192.168.1.10", "10.0.0.5", layers.IPProtocolUDP)
		u = &layers.UDP{SrcPort: 5060, DstPort: 5062}
		u.SetNetworkLayerForChecksum(i)
		q := build(t, i, u, gopacket.Payload(pl))
		if !rewriteAddr(q, true, netip.MustParseAddr("100.64.0.9")) || q[26] != 0xff || q[27] != 0xff {
			t.Fatalf("computed zero checksum written as %x", q[26:28])
		}
	}
	if !found {
		t.Fatal("no payload with a zero checksum found")
	}
}

func TestRewriteAddrAllocs(t *testing.T) {
	ps := pkts(t, "192.168.1.10", "10.0.0.5", []byte("OPTIONS"))
	p6 := pkts(t, "fd00::10", "2001:db8::5", []byte("OPTIONS"))
	a, b := netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("192.168.1.10")
	a6, b6 := netip.MustParseAddr("2001:db8:c0::1"), netip.MustParseAddr("fd00::10")
	n := testing.AllocsPerRun(100, func() {
		rewriteAddr(ps["udp4"], true, a)
		rewriteAddr(ps["udp4"], true, b)
		rewriteAddr(p6["tcp6"], true, a6)
		rewriteAddr(p6["tcp6"], true, b6)
	})
	if n != 0 {
		t.Fatalf("%v allocations per translation", n)
	}
}

// outSelect: the steered entry when its selectors match; another entry
// of the same phone (same core address) whose ports match; never an entry
// whose selectors the packet does not match, and never another phone's.
func TestOutSelect(t *testing.T) {
	var p pipeline
	coreA, coreB := netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2")
	inner := netip.MustParsePrefix("192.168.1.10/32")
	mk := func(core netip.Addr, local, peer uint16) *Slot {
		return withSel(&Slot{Dir: Outbound, PortLocal: local, PortPeer: peer}, inner, core)
	}
	aOld := mk(coreA, 5063, 5060) // registration 1: pc 5063 -> us 5060
	aNew := mk(coreA, 5073, 5060) // re-registration: pc 5073 -> us 5060
	aCli := mk(coreA, 5065, 5062)
	bSrv := mk(coreB, 5063, 5060)
	for _, e := range []*Slot{aOld, aNew, aCli, bSrv} {
		p.track(nil, e)
	}
	udp := func(dst string, sport, dport uint16) []byte {
		i := v4("10.0.0.5", dst, layers.IPProtocolUDP)
		u := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
		u.SetNetworkLayerForChecksum(i)
		return build(t, i, u, gopacket.Payload("SIP/2.0 401"))
	}
	for _, c := range []struct {
		name   string
		steer  *Slot
		pkt    []byte
		want   *Slot
		reason Drop
	}{
		{"own", aNew, udp("100.64.0.1", 5073, 5060), aNew, 0},
		{"old-set-reply", aNew, udp("100.64.0.1", 5063, 5060), aOld, 0},
		{"client-port", aNew, udp("100.64.0.1", 5065, 5062), aCli, 0},
		{"other-phone-core", aNew, udp("100.64.0.2", 5063, 5060), nil, DropPolicy},
		{"inner-address-not-core", aNew, udp("192.168.1.10", 5073, 5060), nil, DropPolicy},
		{"no-sa-for-ports", aNew, udp("100.64.0.1", 5099, 5060), nil, DropPolicy},
		{"phone-b-own", bSrv, udp("100.64.0.2", 5063, 5060), bSrv, 0},
		{"phone-b-never-a", bSrv, udp("100.64.0.2", 5073, 5060), nil, DropPolicy},
	} {
		got, why := p.outSelect(c.steer, c.pkt)
		if got != c.want || why != c.reason {
			t.Errorf("%s: got %p %v, want %p %v", c.name, got, why, c.want, c.reason)
		}
	}
}
