package bpf_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

// fixture is one row of a Katran-style table: a frame in, and everything
// observable about what the program did with it.
type fixture struct {
	name    string
	in      []byte
	ctx     xdpMD
	verdict uint32
	out     []byte    // expected frame; nil: unchanged
	meta    *bpf.Meta // expected metadata; nil: none in front of the frame
	reason  bpf.Reason
}

// runTable runs every fixture and checks verdict, bytes, metadata, and that
// exactly the fixture's reason counted one packet of len(in) bytes.
func runTable(t *testing.T, prog *ebpf.Program, set *maps.Set, table []fixture) {
	t.Helper()
	runTableIn(t, nil, prog, set, table)
}

// runTableIn is runTable with each program run inside ns (test_run
// resolves ingress_ifindex in the calling thread's namespace, and every
// subtest runs on its own goroutine).
func runTableIn(t *testing.T, ns *netns.NS, prog *ebpf.Program, set *maps.Set, table []fixture) {
	t.Helper()
	var before, after maps.Snapshot
	for _, f := range table {
		t.Run(f.name, func(t *testing.T) {
			if err := set.Counters.Read(&before); err != nil {
				t.Fatal(err)
			}
			var verdict uint32
			var out, meta []byte
			if ns == nil {
				verdict, out, meta = run(t, prog, f.in, f.ctx)
			} else if err := ns.Do(func() error {
				verdict, out, meta = run(t, prog, f.in, f.ctx)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if err := set.Counters.Read(&after); err != nil {
				t.Fatal(err)
			}
			if verdict != f.verdict {
				t.Errorf("verdict %s, want %s", verdictName(verdict), verdictName(f.verdict))
			}
			want := f.out
			if want == nil {
				want = f.in
			}
			if !bytes.Equal(out, want) {
				t.Errorf("output frame differs\n got %x\nwant %x", out, want)
			}
			if f.meta == nil {
				if len(meta) != 0 {
					t.Errorf("unexpected metadata %x", meta)
				}
			} else {
				got, ok := bpf.DecodeMeta(meta)
				if len(meta) != bpf.MetaSize || !ok {
					t.Errorf("metadata %x (%d bytes), want %d bytes with magic", meta, len(meta), bpf.MetaSize)
				} else if wantMeta := withParse(t, *f.meta, want); got != wantMeta {
					t.Errorf("metadata %+v, want %+v", got, wantMeta)
				}
			}
			delta := after.Sub(&before)
			for r, c := range delta {
				want := bpf.Counter{}
				if bpf.Reason(r) == f.reason {
					want = bpf.Counter{Packets: 1, Bytes: uint64(len(f.in))}
				}
				if c != want {
					t.Errorf("counter %s: %+v, want %+v", bpf.Reason(r), c, want)
				}
			}
		})
	}
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// meta is a fixture's expected metadata as far as the steering decides
// it; runTableIn completes it from the frame with withParse.
func meta(kind bpf.MetaKind, sa uint32, worker uint8, sport, l3 uint16) *bpf.Meta {
	return &bpf.Meta{SaIndex: sa, Worker: worker, Sport: htons(sport), L3Off: l3, Kind: uint8(kind), Magic: bpf.MetaMagic}
}

// withParse completes m with what gopacket, a parser independent of the
// program's, reads from the frame as redirected: the family, where the IP
// header ends, the IP length and, for the ESP kinds, the outer source.
func withParse(t *testing.T, m bpf.Meta, frame []byte) bpf.Meta {
	t.Helper()
	p := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	switch ip := p.NetworkLayer().(type) {
	case *layers.IPv4:
		m.Family = 4
		m.L4Off = m.L3Off + uint16(ip.IHL)*4
		m.L3Len = ip.Length
		if m.Kind != uint8(bpf.MetaClear) {
			m.Src = netip.AddrFrom4([4]byte(ip.SrcIP.To4())).As16()
		}
	case *layers.IPv6:
		m.Family = 6
		m.L4Off = m.L3Off + 40
		m.L3Len = 40 + ip.Length
		if m.Kind != uint8(bpf.MetaClear) {
			m.Src = [16]byte(ip.SrcIP.To16())
		}
	default:
		t.Fatalf("gopacket finds no IP header in %x", frame)
	}
	return m
}

const (
	spiW0      = 0x00001001 // worker 0: socket present
	spiW1      = 0x00002002 // worker 1: slot empty
	spiW5      = 0x00003003 // worker 5 >= workers: out of range
	spiUnknown = 0x0badc0de
	natt       = 4500
	phonePort  = 31000
)

// publicSetup loads the programs with two workers per queue, a socket at
// slot 0 only, and three SAs.
func publicSetup(t *testing.T) (*bpf.XespObjects, *maps.Set, *netns.NS) {
	objs, set := loadObjects(t, 1024)
	ns := netns.ForTest(t, "xbpf")
	if err := set.Config.Set(bpf.Config{Workers: 2}); err != nil { // natt_port 0: default 4500
		t.Fatal(err)
	}
	for spi, sa := range map[uint32]bpf.SASteer{
		spiW0: {SaIndex: 7, Worker: 0, Flags: bpf.SAFlagEncap},
		spiW1: {SaIndex: 8, Worker: 1},
		spiW5: {SaIndex: 9, Worker: 5},
	} {
		if err := set.SAs.Put(spi, sa); err != nil {
			t.Fatal(err)
		}
	}
	if err := set.XSKPublic.Set(maps.Index(0, 2, 0), xskSocket(t, ns, "lo", 0)); err != nil {
		t.Fatal(err)
	}
	return objs, set, ns
}

func TestPublicFixtures(t *testing.T) {
	objs, set, _ := publicSetup(t)

	// UDP-encapsulated ESP and the frames the strip must produce, built
	// separately (gopacket computes the IPv4 checksum of the expected frame).
	esp := espBody(spiW0, 1, 48)
	i4 := ip4(layers.IPProtocolUDP)
	espV4 := serialize(t, eth(layers.EthernetTypeIPv4), i4, udp(i4, phonePort, natt), esp)
	espV4Want := serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), esp)

	i6 := ip6(layers.IPProtocolUDP)
	espV6 := serialize(t, eth(layers.EthernetTypeIPv6), i6, udp(i6, phonePort, natt), esp)
	espV6Want := serialize(t, eth(layers.EthernetTypeIPv6), ip6(layers.IPProtocolESP), esp)

	dot1q := &layers.Dot1Q{VLANIdentifier: 100, Type: layers.EthernetTypeIPv4}
	i4 = ip4(layers.IPProtocolUDP)
	espVLAN := serialize(t, eth(layers.EthernetTypeDot1Q), dot1q, i4, udp(i4, phonePort, natt), esp)
	espVLANWant := serialize(t, eth(layers.EthernetTypeDot1Q), dot1q, ip4(layers.IPProtocolESP), esp)

	dot1ad := &layers.Dot1Q{VLANIdentifier: 200, Type: layers.EthernetTypeIPv6}
	i6 = ip6(layers.IPProtocolUDP)
	espQinQ6 := serialize(t, eth(layers.EthernetTypeQinQ), dot1ad, i6, udp(i6, phonePort, natt), esp)
	espQinQ6Want := serialize(t, eth(layers.EthernetTypeQinQ), dot1ad, ip6(layers.IPProtocolESP), esp)

	// IHL 6 (router alert) and IHL 15 (40 option bytes) behind a tag: the
	// largest header the strip moves.
	ra := layers.IPv4Option{OptionType: 0x94, OptionLength: 4, OptionData: []byte{0, 0}}
	i4 = ip4(layers.IPProtocolUDP, ra)
	espOpt := serialize(t, eth(layers.EthernetTypeIPv4), i4, udp(i4, phonePort, natt), esp)
	espOptWant := serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP, ra), esp)
	big := layers.IPv4Option{OptionType: 0x07, OptionLength: 39, OptionData: append([]byte{4}, make([]byte, 36)...)}
	eol := layers.IPv4Option{OptionType: 0}
	i4 = ip4(layers.IPProtocolUDP, big, eol)
	espMax := serialize(t, eth(layers.EthernetTypeDot1Q), dot1q, i4, udp(i4, phonePort, natt), esp)
	espMaxWant := serialize(t, eth(layers.EthernetTypeDot1Q), dot1q, ip4(layers.IPProtocolESP, big, eol), esp)
	if ihl := espMax[18] & 0x0f; ihl != 15 {
		t.Fatalf("fixture espMax has IHL %d, want 15", ihl)
	}

	udp4 := func(sport, dport uint16, payload []byte) []byte {
		i := ip4(layers.IPProtocolUDP)
		return serialize(t, eth(layers.EthernetTypeIPv4), i, udp(i, sport, dport), gopacket.Payload(payload))
	}
	udp6 := func(sport, dport uint16, payload []byte) []byte {
		i := ip6(layers.IPProtocolUDP)
		return serialize(t, eth(layers.EthernetTypeIPv6), i, udp(i, sport, dport), gopacket.Payload(payload))
	}
	keepalive := udp4(phonePort, natt, []byte{0xff})
	// Real links pad short frames to 60 bytes; the UDP length, not the
	// frame, delimits the payload.
	keepalivePadded := append(append([]byte(nil), keepalive...), make([]byte, 60-len(keepalive))...)
	ike := udp4(phonePort, natt, append(make([]byte, 4), bytes.Repeat([]byte{0x21}, 28)...))

	plain4 := serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), esp)
	plain6 := serialize(t, eth(layers.EthernetTypeIPv6), ip6(layers.IPProtocolESP), esp)

	frag := func(flags layers.IPv4Flag, off uint16, payload []byte) []byte {
		i := ip4(layers.IPProtocolUDP)
		i.Flags, i.FragOffset = flags, off
		return serialize(t, eth(layers.EthernetTypeIPv4), i, gopacket.Payload(payload))
	}
	firstFrag := frag(layers.IPv4MoreFragments, 0, espV4[34:])
	laterFrag := frag(0, 185, bytes.Repeat([]byte{0x55}, 40))
	frag6 := serialize(t, eth(layers.EthernetTypeIPv6), ip6(layers.IPProtocolIPv6Fragment),
		gopacket.Payload(append([]byte{17, 0, 0, 1, 0, 0, 0, 42}, espV6[54:]...)))
	hbh6 := serialize(t, eth(layers.EthernetTypeIPv6), ip6(layers.IPProtocolIPv6HopByHop),
		gopacket.Payload(append([]byte{17, 0, 1, 4, 0, 0, 0, 0}, espV6[54:]...)))

	tcp := func() []byte {
		i := ip4(layers.IPProtocolTCP)
		tc := &layers.TCP{SrcPort: 40000, DstPort: 22, Seq: 1, SYN: true, Window: 1000}
		tc.SetNetworkLayerForChecksum(i)
		return serialize(t, eth(layers.EthernetTypeIPv4), i, tc)
	}()
	arp := serialize(t, eth(layers.EthernetTypeARP), &layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4,
		HwAddressSize: 6, ProtAddressSize: 4, Operation: 1, SourceHwAddress: macA, SourceProtAddress: ipA4,
		DstHwAddress: make([]byte, 6), DstProtAddress: ipB4})

	// patch returns a copy of b with f applied (for fields gopacket would
	// fix up).
	patch := func(b []byte, f func(b []byte)) []byte {
		c := append([]byte(nil), b...)
		f(c)
		return c
	}
	udpLen := func(n uint16) func([]byte) {
		return func(b []byte) { binary.BigEndian.PutUint16(b[14+20+4:], n) }
	}
	// A UDP header one byte short with an IPv4 total length that agrees,
	// so it is the UDP parse that fails.
	udpShort := serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolUDP), gopacket.Payload(espV4[34:41]))

	spiPayload := func(spi uint32, n int) []byte {
		b := make([]byte, n)
		binary.BigEndian.PutUint32(b, spi)
		return b
	}

	table := []fixture{
		{name: "esp-udp-v4", in: espV4, verdict: xdpRedirect, out: espV4Want, meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 14), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-v6", in: espV6, verdict: xdpRedirect, out: espV6Want, meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 14), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-v4-802.1q", in: espVLAN, verdict: xdpRedirect, out: espVLANWant, meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 18), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-v6-802.1ad", in: espQinQ6, verdict: xdpRedirect, out: espQinQ6Want, meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 18), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-v4-options", in: espOpt, verdict: xdpRedirect, out: espOptWant, meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 14), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-v4-ihl15-vlan", in: espMax, verdict: xdpRedirect, out: espMaxWant, meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 18), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-min-16", in: udp4(phonePort, natt, spiPayload(spiW0, 16)), verdict: xdpRedirect,
			out:  serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), gopacket.Payload(spiPayload(spiW0, 16))),
			meta: meta(bpf.MetaESPUDP, 7, 0, phonePort, 14), reason: bpf.RedirectESPUDP},
		{name: "esp-udp-slot-empty", in: udp4(phonePort, natt, spiPayload(spiW1, 40)), verdict: xdpDrop, reason: bpf.DropNoXSK,
			// The strip happened before the redirect failed: what the
			// kernel drops is the stripped frame.
			out:  serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), gopacket.Payload(spiPayload(spiW1, 40))),
			meta: meta(bpf.MetaESPUDP, 8, 1, phonePort, 14)},
		{name: "esp-udp-worker-out-of-range", in: udp4(phonePort, natt, spiPayload(spiW5, 40)), verdict: xdpDrop, reason: bpf.DropNoXSK,
			out:  serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), gopacket.Payload(spiPayload(spiW5, 40))),
			meta: meta(bpf.MetaESPUDP, 9, 5, phonePort, 14)},
		{name: "plain-esp-v4", in: plain4, verdict: xdpRedirect, meta: meta(bpf.MetaESP, 7, 0, 0, 14), reason: bpf.RedirectESP},
		{name: "plain-esp-v6", in: plain6, verdict: xdpRedirect, meta: meta(bpf.MetaESP, 7, 0, 0, 14), reason: bpf.RedirectESP},
		{name: "plain-esp-unknown-spi", in: serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), espBody(spiUnknown, 1, 48)), verdict: xdpDrop, reason: bpf.DropNoSA},
		{name: "plain-esp-runt", in: serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), gopacket.Payload(spiPayload(spiW0, 15))), verdict: xdpDrop, reason: bpf.DropRunt},
		{name: "keepalive-v4", in: keepalive, verdict: xdpDrop, reason: bpf.DropKeepalive},
		{name: "keepalive-v4-padded", in: keepalivePadded, verdict: xdpDrop, reason: bpf.DropKeepalive},
		{name: "keepalive-v6", in: udp6(phonePort, natt, []byte{0xff}), verdict: xdpDrop, reason: bpf.DropKeepalive},
		{name: "one-byte-not-ff", in: udp4(phonePort, natt, []byte{0xfe}), verdict: xdpDrop, reason: bpf.DropRunt},
		{name: "ike-marker", in: ike, verdict: xdpPass, reason: bpf.PassIKE},
		{name: "ike-marker-v6", in: udp6(phonePort, natt, make([]byte, 40)), verdict: xdpPass, reason: bpf.PassIKE},
		{name: "ike-marker-only", in: udp4(phonePort, natt, make([]byte, 4)), verdict: xdpPass, reason: bpf.PassIKE},
		{name: "runt-3", in: udp4(phonePort, natt, []byte{1, 2, 3}), verdict: xdpDrop, reason: bpf.DropRunt},
		{name: "runt-15", in: udp4(phonePort, natt, spiPayload(spiW0, 15)), verdict: xdpDrop, reason: bpf.DropRunt},
		{name: "udp-empty", in: udp4(phonePort, natt, nil), verdict: xdpDrop, reason: bpf.DropRunt},
		{name: "unknown-spi-v4", in: udp4(phonePort, natt, spiPayload(spiUnknown, 40)), verdict: xdpDrop, reason: bpf.DropNoSA},
		{name: "unknown-spi-v6", in: udp6(phonePort, natt, spiPayload(spiUnknown, 40)), verdict: xdpDrop, reason: bpf.DropNoSA},
		{name: "udp-other-port", in: udp4(phonePort, 5060, spiPayload(spiW0, 40)), verdict: xdpPass, reason: bpf.PassOther},
		{name: "udp-4500-as-source-only", in: udp4(natt, 5060, spiPayload(spiW0, 40)), verdict: xdpPass, reason: bpf.PassOther},
		{name: "udp-500-ike", in: udp4(500, 500, bytes.Repeat([]byte{0x21}, 28)), verdict: xdpPass, reason: bpf.PassOther},
		{name: "tcp", in: tcp, verdict: xdpPass, reason: bpf.PassOther},
		{name: "arp", in: arp, verdict: xdpPass, reason: bpf.PassNotIP},
		{name: "ipv4-first-fragment", in: firstFrag, verdict: xdpPass, reason: bpf.PassFragment},
		{name: "ipv4-later-fragment", in: laterFrag, verdict: xdpPass, reason: bpf.PassFragment},
		{name: "ipv6-fragment", in: frag6, verdict: xdpPass, reason: bpf.PassFragment},
		{name: "ipv6-hop-by-hop", in: hbh6, verdict: xdpPass, reason: bpf.PassOther},
		{name: "udp-len-beyond-packet", in: patch(espV4, udpLen(200)), verdict: xdpDrop, reason: bpf.DropBadUDPLen},
		{name: "udp-len-below-header", in: patch(espV4, udpLen(7)), verdict: xdpDrop, reason: bpf.DropBadUDPLen},
		{name: "trunc-vlan", in: espVLAN[:17], verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "trunc-ipv4", in: espV4[:14+19], verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "trunc-ipv4-options", in: espOpt[:14+23], verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "trunc-ipv4-total-length", in: espV4[:len(espV4)-1], verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "trunc-ipv6", in: espV6[:14+39], verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "trunc-ipv6-payload", in: espV6[:len(espV6)-1], verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "trunc-udp", in: udpShort, verdict: xdpPass, reason: bpf.PassMalformed},
		// Same, with Ethernet padding that would complete a UDP header if
		// the program trusted data_end instead of the IP length.
		{name: "trunc-udp-padded", in: append(append([]byte(nil), udpShort...), make([]byte, 60-len(udpShort))...), verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "bad-ihl-4", in: patch(espV4, func(b []byte) { b[14] = 0x44 }), verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "bad-ihl-15-short", in: patch(espV4[:14+40], func(b []byte) { b[14] = 0x4f; binary.BigEndian.PutUint16(b[16:], 40) }), verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "bad-version", in: patch(espV4, func(b []byte) { b[14] = 0x65 }), verdict: xdpPass, reason: bpf.PassMalformed},
		{name: "bad-ipv4-total-length", in: patch(espV4, func(b []byte) { binary.BigEndian.PutUint16(b[16:], 19) }), verdict: xdpPass, reason: bpf.PassMalformed},
	}
	runTable(t, objs.XespPublic, set, table)

	// The strip output must carry a valid IPv4 header checksum (the table
	// compares bytes with gopacket's; this states the property itself).
	for _, f := range table {
		if f.reason != bpf.RedirectESPUDP || f.out == nil || f.out[12] == 0x86 || f.out[16] == 0x86 {
			continue
		}
		l3 := int(f.meta.L3Off)
		h := f.out[l3 : l3+int(f.out[l3]&0x0f)*4]
		if pkt.Checksum(h) != 0 || h[9] != 50 {
			t.Errorf("%s: stripped IPv4 header %x: checksum or protocol wrong", f.name, h)
		}
	}
}

// TestPublicEthernetTruncated: BPF_PROG_TEST_RUN refuses XDP input shorter
// than an Ethernet header, so that case never reaches the program here; in
// the data path the driver never delivers one either.
func TestPublicEthernetTruncated(t *testing.T) {
	objs, _ := loadObjects(t, 16)
	_, err := objs.XespPublic.Run(&ebpf.RunOptions{Data: make([]byte, 13)})
	if err == nil {
		t.Fatal("13-byte frame accepted by BPF_PROG_TEST_RUN; add it to the fixture table")
	}
}

// TestPublicNATTPort: the NAT-T port comes from the config map.
func TestPublicNATTPort(t *testing.T) {
	objs, set := loadObjects(t, 16)
	if err := set.Config.Set(bpf.Config{NattPort: 4501}); err != nil {
		t.Fatal(err)
	}
	ka := func(port uint16) []byte {
		i := ip4(layers.IPProtocolUDP)
		return serialize(t, eth(layers.EthernetTypeIPv4), i, udp(i, phonePort, port), gopacket.Payload{0xff})
	}
	runTable(t, objs.XespPublic, set, []fixture{
		{name: "keepalive-on-4501", in: ka(4501), verdict: xdpDrop, reason: bpf.DropKeepalive},
		{name: "keepalive-on-4500-is-other", in: ka(4500), verdict: xdpPass, reason: bpf.PassOther},
	})
}

// TestPublicSteering: the slot is rx_queue * workers + worker. Runs inside a
// namespace whose veth has four RX queues, since test_run only accepts an
// rx_queue_index that the ingress device has.
func TestPublicSteering(t *testing.T) {
	objs, set := loadObjects(t, 16)
	ns := netns.ForTest(t, "xbps")
	dev, peer := netns.UniqueName("xsa"), netns.UniqueName("xsb")
	if _, err := ns.Run("ip", "link", "add", dev, "numrxqueues", "4", "numtxqueues", "4", "type", "veth", "peer", "name", peer, "numrxqueues", "4", "numtxqueues", "4"); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dev, peer} {
		if _, err := ns.Run("ip", "link", "set", d, "up"); err != nil {
			t.Fatal(err)
		}
	}
	const workers = 4
	if err := set.Config.Set(bpf.Config{Workers: workers}); err != nil {
		t.Fatal(err)
	}
	if err := set.SAs.Put(spiW0, bpf.SASteer{SaIndex: 77, Worker: 3}); err != nil {
		t.Fatal(err)
	}
	// One socket, at queue 1 worker 3 = slot 7.
	if err := set.XSKPublic.Set(maps.Index(1, workers, 3), xskSocket(t, ns, "lo", 0)); err != nil {
		t.Fatal(err)
	}
	i4 := ip4(layers.IPProtocolUDP)
	pkt := serialize(t, eth(layers.EthernetTypeIPv4), i4, udp(i4, phonePort, natt), espBody(spiW0, 9, 32))
	stripped := serialize(t, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), espBody(spiW0, 9, 32))
	var ifindex uint32
	if out, err := ns.Run("cat", "/sys/class/net/"+dev+"/ifindex"); err != nil {
		t.Fatal(err)
	} else if _, err := fmt.Sscan(string(out), &ifindex); err != nil {
		t.Fatal(err)
	}
	runTableIn(t, ns, objs.XespPublic, set, []fixture{
		{name: "queue1-worker3-slot7", in: pkt, ctx: xdpMD{IngressIfindex: ifindex, RxQueueIndex: 1}, verdict: xdpRedirect,
			out: stripped, meta: meta(bpf.MetaESPUDP, 77, 3, phonePort, 14), reason: bpf.RedirectESPUDP},
		{name: "queue0-worker3-slot3-empty", in: pkt, ctx: xdpMD{IngressIfindex: ifindex, RxQueueIndex: 0}, verdict: xdpDrop,
			out: stripped, meta: meta(bpf.MetaESPUDP, 77, 3, phonePort, 14), reason: bpf.DropNoXSK},
		{name: "queue2-worker3-slot11-empty", in: pkt, ctx: xdpMD{IngressIfindex: ifindex, RxQueueIndex: 2}, verdict: xdpDrop,
			out: stripped, meta: meta(bpf.MetaESPUDP, 77, 3, phonePort, 14), reason: bpf.DropNoXSK},
	})
}

// A NAT-keepalive from a registered binding is counted and stamped in the
// keepalives map (idle-phone detection); one from an unknown source or
// port only hits the verdict counter and creates nothing. Both are
// dropped: a keepalive never reaches the workers, so it never moves a
// binding.
func TestPublicKeepaliveStampsBinding(t *testing.T) {
	objs, set, _ := publicSetup(t)
	phone := netip.AddrPortFrom(netip.AddrFrom4([4]byte(ipA4)), phonePort)
	phone6 := netip.AddrPortFrom(netip.AddrFrom16([16]byte(ipA6.To16())), phonePort)
	for _, b := range []netip.AddrPort{phone, phone6} {
		if err := set.Keepalives.Add(b); err != nil {
			t.Fatal(err)
		}
	}
	ka := func(ip gopacket.NetworkLayer, et layers.EthernetType, sport uint16) []byte {
		return serialize(t, eth(et), ip.(gopacket.SerializableLayer), udp(ip, sport, natt), gopacket.Payload{0xff})
	}
	for i, c := range []struct {
		pkt  []byte
		want netip.AddrPort
	}{
		{ka(ip4(layers.IPProtocolUDP), layers.EthernetTypeIPv4, phonePort), phone},
		{ka(ip4(layers.IPProtocolUDP), layers.EthernetTypeIPv4, phonePort), phone},
		{ka(ip6(layers.IPProtocolUDP), layers.EthernetTypeIPv6, phonePort), phone6},
		{ka(ip4(layers.IPProtocolUDP), layers.EthernetTypeIPv4, phonePort+1), netip.AddrPort{}},
	} {
		if v, _, _ := run(t, objs.XespPublic, c.pkt, xdpMD{}); v != xdpDrop {
			t.Fatalf("keepalive %d: verdict %s", i, verdictName(v))
		}
	}
	if v, ok := set.Keepalives.Lookup(phone); !ok || v.Packets != 2 || v.LastNs == 0 {
		t.Fatalf("v4 binding: %+v %v, want 2 stamped keepalives", v, ok)
	}
	if v, ok := set.Keepalives.Lookup(phone6); !ok || v.Packets != 1 {
		t.Fatalf("v6 binding: %+v %v", v, ok)
	}
	if n := set.Keepalives.Len(); n != 2 {
		t.Fatalf("%d bindings in the map, want the 2 registered", n)
	}
}

// A side configured with a VLAN takes only frames tagged with it (802.1Q
// or 802.1ad); untagged frames and other VLANs go to the kernel, counted
// as other_vlan. The private side alike.
func TestVLANFilter(t *testing.T) {
	objs, set, _ := publicSetup(t)
	if err := set.Config.Set(bpf.Config{Workers: 2, PublicVlan: 100, PrivateVlan: 200}); err != nil {
		t.Fatal(err)
	}
	esp := espBody(spiW0, 1, 48)
	tagged := func(et layers.EthernetType, vid uint16, inner layers.EthernetType, ls ...gopacket.SerializableLayer) []byte {
		if et == 0 {
			return serialize(t, append([]gopacket.SerializableLayer{eth(inner)}, ls...)...)
		}
		return serialize(t, append([]gopacket.SerializableLayer{eth(et), &layers.Dot1Q{VLANIdentifier: vid, Type: inner}}, ls...)...)
	}
	frame := func(et layers.EthernetType, vid uint16) []byte {
		i4 := ip4(layers.IPProtocolUDP)
		return tagged(et, vid, layers.EthernetTypeIPv4, i4, udp(i4, phonePort, natt), esp)
	}
	for _, c := range []struct {
		name   string
		in     []byte
		reason bpf.Reason
	}{
		{"802.1Q 100", frame(layers.EthernetTypeDot1Q, 100), bpf.RedirectESPUDP},
		{"802.1ad 100", frame(layers.EthernetTypeQinQ, 100), bpf.RedirectESPUDP},
		{"802.1Q 101", frame(layers.EthernetTypeDot1Q, 101), bpf.PassOtherVLAN},
		{"untagged", frame(0, 0), bpf.PassOtherVLAN},
	} {
		before := xdpReason(t, set, c.reason)
		run(t, objs.XespPublic, c.in, xdpMD{})
		if xdpReason(t, set, c.reason) != before+1 {
			t.Errorf("public %s: not counted as %s", c.name, c.reason)
		}
	}
	i4 := ip4(layers.IPProtocolUDP)
	for _, c := range []struct {
		name string
		in   []byte
	}{
		{"private untagged", tagged(0, 0, layers.EthernetTypeIPv4, i4, udp(i4, 5060, 5060), gopacket.Payload("sip"))},
		{"private VLAN 100", tagged(layers.EthernetTypeDot1Q, 100, layers.EthernetTypeIPv4, i4, udp(i4, 5060, 5060), gopacket.Payload("sip"))},
	} {
		before := xdpReason(t, set, bpf.PrivPassOtherVLAN)
		if v, _, _ := run(t, objs.XespPrivate, c.in, xdpMD{}); v != xdpPass || xdpReason(t, set, bpf.PrivPassOtherVLAN) != before+1 {
			t.Errorf("%s: verdict %s, not counted as priv_pass_other_vlan", c.name, verdictName(v))
		}
	}
}

func xdpReason(t *testing.T, set *maps.Set, r bpf.Reason) uint64 {
	t.Helper()
	var s maps.Snapshot
	if err := set.Counters.Read(&s); err != nil {
		t.Fatal(err)
	}
	return s[r].Packets
}
