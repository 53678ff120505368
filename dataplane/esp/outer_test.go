package esp

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"testing"

	cksum "github.com/xesp/xesp/internal/pkt"
)

// ipv4 builds an IPv4 packet with the given options and payload.
func ipv4(proto byte, opts, payload []byte, src, dst netip.Addr) []byte {
	hl := 20 + len(opts)
	b := make([]byte, hl+len(payload))
	b[0] = 0x40 | byte(hl/4)
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8], b[9] = 64, proto
	s, d := src.As4(), dst.As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	copy(b[20:], opts)
	binary.BigEndian.PutUint16(b[10:], cksum.Checksum(b[:hl]))
	copy(b[hl:], payload)
	return b
}

// ipv6 builds an IPv6 packet; ext is a chain of (next header, body) pairs
// of extension headers placed before the final protocol.
func ipv6(proto byte, ext []byte, payload []byte, src, dst netip.Addr) []byte {
	b := make([]byte, 40, 40+len(ext)+len(payload))
	b[0] = 0x60
	s, d := src.As16(), dst.As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	if len(ext) > 0 {
		b[6] = 60 // destination options
		ext = bytes.Clone(ext)
		ext[0] = proto
	} else {
		b[6] = proto
	}
	b = append(append(b, ext...), payload...)
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	return b
}

func udp(sp, dp uint16, payload []byte) []byte {
	b := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(b, sp)
	binary.BigEndian.PutUint16(b[2:], dp)
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
	copy(b[8:], payload)
	return b
}

func TestParseOuter(t *testing.T) {
	esp := append([]byte{0, 0, 0x10, 0x01, 0, 0, 0, 9}, make([]byte, 40)...)
	opts := []byte{1, 1, 1, 0} // NOP NOP NOP EOL
	dstOpts := []byte{0, 0, 1, 4, 0, 0, 0, 0}
	frag := ipv4(ProtoUDP, nil, udp(4500, 4500, esp), ue4, gw4)
	binary.BigEndian.PutUint16(frag[6:], 0x2000) // MF
	binary.BigEndian.PutUint16(frag[10:], 0)
	binary.BigEndian.PutUint16(frag[10:], cksum.Checksum(frag[:20]))
	badSum := ipv4(ProtoUDP, nil, udp(4500, 4500, esp), ue4, gw4)
	badSum[10] ^= 1
	padded := append(ipv4(ProtoESP, nil, esp, ue4, gw4), 0, 0, 0, 0, 0, 0) // Ethernet padding
	udpLong := ipv4(ProtoUDP, nil, udp(4500, 4500, esp), ue4, gw4)
	binary.BigEndian.PutUint16(udpLong[24:], 200)

	cases := []struct {
		name     string
		pkt      []byte
		class    Class
		err      error
		espStart int
		espLen   int
	}{
		{"v4 udp esp", ipv4(ProtoUDP, nil, udp(31000, 4500, esp), ue4, gw4), ClassESPInUDP, nil, 28, len(esp)},
		{"v4 options udp esp", ipv4(ProtoUDP, opts, udp(4500, 4500, esp), ue4, gw4), ClassESPInUDP, nil, 32, len(esp)},
		{"v4 plain esp", ipv4(ProtoESP, opts, esp, ue4, gw4), ClassESP, nil, 24, len(esp)},
		{"v4 link padding ignored", padded, ClassESP, nil, 20, len(esp)},
		{"v6 udp esp", ipv6(ProtoUDP, nil, udp(4500, 4500, esp), ue6, gw6), ClassESPInUDP, nil, 48, len(esp)},
		{"v6 dstopts plain esp", ipv6(ProtoESP, dstOpts, esp, ue6, gw6), ClassESP, nil, 48, len(esp)},
		{"v6 dstopts udp esp", ipv6(ProtoUDP, dstOpts, udp(4500, 4500, esp), ue6, gw6), ClassESPInUDP, nil, 56, len(esp)},
		{"keepalive", ipv4(ProtoUDP, nil, udp(31000, 4500, []byte{0xff}), ue4, gw4), ClassKeepalive, nil, 0, 0},
		{"ike", ipv4(ProtoUDP, nil, udp(4500, 4500, []byte{0, 0, 0, 0, 1, 2, 3, 4, 5}), ue4, gw4), ClassIKE, nil, 0, 0},
		{"udp other port", ipv4(ProtoUDP, nil, udp(5060, 5060, esp), ue4, gw4), ClassOther, nil, 0, 0},
		{"tcp", ipv4(ProtoTCP, nil, make([]byte, 20), ue4, gw4), ClassOther, nil, 0, 0},
		{"udp esp runt", ipv4(ProtoUDP, nil, udp(4500, 4500, []byte{1, 2, 3, 4, 5}), ue4, gw4), ClassESPInUDP, ErrRunt, 0, 0},
		{"fragment", frag, ClassOther, ErrFragment, 0, 0},
		{"v6 fragment", ipv6(44, nil, make([]byte, 16), ue6, gw6), ClassOther, ErrFragment, 0, 0},
		{"bad checksum", badSum, ClassOther, ErrBadHeader, 0, 0},
		{"udp length beyond packet", udpLong, ClassOther, ErrBadHeader, 0, 0},
		{"v4 truncated", ipv4(ProtoESP, nil, esp, ue4, gw4)[:50], ClassOther, ErrBadHeader, 0, 0},
		{"bad version", append([]byte{0x55}, make([]byte, 40)...), ClassOther, ErrBadVersion, 0, 0},
		{"empty", nil, ClassOther, ErrRunt, 0, 0},
	}
	for _, c := range cases {
		p, err := ParseOuter(c.pkt)
		if err != c.err || p.Class != c.class {
			t.Errorf("%s: class %v err %v, want %v %v", c.name, p.Class, err, c.class, c.err)
			continue
		}
		if err == nil && (c.class == ClassESP || c.class == ClassESPInUDP) {
			if p.ESPStart != c.espStart || p.ESPEnd-p.ESPStart != c.espLen || !bytes.Equal(c.pkt[p.ESPStart:p.ESPEnd], esp) {
				t.Errorf("%s: ESP bounds %d..%d", c.name, p.ESPStart, p.ESPEnd)
			}
			if !p.Outer.Src.IsValid() || (p.Outer.Src != ue4 && p.Outer.Src != ue6) {
				t.Errorf("%s: src %v", c.name, p.Outer.Src)
			}
		}
	}
	p, _ := ParseOuter(cases[0].pkt)
	if p.Outer != (Outer{Src: ue4, Dst: gw4, Encap: true, SrcPort: 31000, DstPort: 4500}) {
		t.Errorf("outer %+v", p.Outer)
	}
}

// TestPutOuter checks the headers against independent builders: IPv4 UDP
// checksum 0, IPv6 UDP checksum verifying.
func TestPutOuter(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	esp := randBytes(rng, 77)
	for _, o := range []Outer{
		{Src: ue4, Dst: gw4, Encap: true, SrcPort: 4500, DstPort: 31000},
		{Src: ue4, Dst: gw4},
		{Src: ue6, Dst: gw6, Encap: true, SrcPort: 4500, DstPort: 4500},
		{Src: ue6, Dst: gw6},
	} {
		buf := make([]byte, MaxOuterLen+len(esp))
		copy(buf[MaxOuterLen:], esp)
		s, err := PutOuter(buf, MaxOuterLen, len(buf), &o)
		if err != nil {
			t.Fatal(err)
		}
		got := buf[s:]
		var want []byte
		l4 := esp
		proto := byte(ProtoESP)
		if o.Encap {
			l4, proto = udp(o.SrcPort, o.DstPort, esp), ProtoUDP
		}
		if o.Src.Is4() {
			want = ipv4(proto, nil, l4, o.Src, o.Dst)
			want[6] = 0x40 // DF
			want[10], want[11] = 0, 0
			binary.BigEndian.PutUint16(want[10:], cksum.Checksum(want[:20]))
		} else {
			want = ipv6(proto, nil, l4, o.Src, o.Dst)
			want[7] = outerTTL
			if o.Encap {
				if transportChecksum(addrBytes(o.Src, o.Dst), ProtoUDP, got[40:]) != 0 {
					t.Fatalf("IPv6 UDP checksum does not verify")
				}
				copy(want[46:48], got[46:48])
			}
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%+v:\n got %x\nwant %x", o, got, want)
		}
		p, err := ParseOuter(got)
		if err != nil || p.Outer != o || !bytes.Equal(got[p.ESPStart:p.ESPEnd], esp) {
			t.Errorf("%+v: parse back: %v %+v", o, err, p)
		}
	}
	bad := Outer{Src: ue4, Dst: gw6}
	if _, err := PutOuter(make([]byte, 100), 48, 100, &bad); err != ErrInvalid {
		t.Errorf("family mismatch: %v", err)
	}
	o := Outer{Src: ue6, Dst: gw6, Encap: true}
	if _, err := PutOuter(make([]byte, 100), 47, 100, &o); err != ErrNoRoom {
		t.Errorf("short headroom: %v", err)
	}
}

// TestOpenPacketClasses: keepalive and IKE are classified, not opened; an
// unknown SPI is no_sa; a dummy is reported with its sequence number.
func TestOpenPacketClasses(t *testing.T) {
	rng := rand.New(rand.NewPCG(33, 34))
	out, in := pair(t, AES128GCM16, ModeTunnel, false, 64, rng)
	lookup := func(spi uint32) *Transform {
		if spi == in.SPI() {
			return in
		}
		return nil
	}
	ka := ipv4(ProtoUDP, nil, udp(31000, 4500, []byte{0xff}), ue4, gw4)
	if p, err := OpenPacket(ka, lookup); err != nil || p.Class != ClassKeepalive {
		t.Errorf("keepalive: %v %v", p.Class, err)
	}
	ike := ipv4(ProtoUDP, nil, udp(31000, 4500, make([]byte, 300)), ue4, gw4)
	if p, err := OpenPacket(ike, lookup); err != nil || p.Class != ClassIKE {
		t.Errorf("ike: %v %v", p.Class, err)
	}
	o := Outer{Src: ue4, Dst: gw4, Encap: true, SrcPort: 4500, DstPort: 4500}
	buf := make([]byte, 256)
	dummy, err := out.SealPacket(buf, []byte{1, 2, 3}, NextHeaderDummy, &o)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := OpenPacket(dummy, lookup); err != ErrDummy || p.Seq != 1 || p.Class != ClassESPInUDP {
		t.Errorf("dummy: %v seq %d", err, p.Seq)
	}
	other, _ := pair(t, AES256GCM16, ModeTunnel, false, 64, rng)
	pkt, _ := other.SealPacket(make([]byte, 256), innerIP(rng, false, 40), NextHeaderIPv4, &o)
	if p, err := OpenPacket(pkt, lookup); err != ErrNoSA || p.SPI != other.SPI() {
		t.Errorf("unknown SPI: %v %#x", err, p.SPI)
	}
	if _, err := in.OpenPacket(pkt); err != ErrNoSA {
		t.Errorf("SA.OpenPacket for another SPI: %v", err)
	}
}

// A non-zero ID makes a fragmentable outer IPv4 packet: DF clear, the ID
// in place, the header checksum still valid.
func TestPutOuterFragmentableID(t *testing.T) {
	buf := make([]byte, 100)
	o := Outer{Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("192.0.2.2"), Encap: true, SrcPort: 4500, DstPort: 4500, ID: 0xbeef}
	s, err := PutOuter(buf, MaxOuterLen, len(buf), &o)
	if err != nil {
		t.Fatal(err)
	}
	h := buf[s : s+20]
	if h[4] != 0xbe || h[5] != 0xef || h[6] != 0 || h[7] != 0 {
		t.Fatalf("id/flags %x", h[4:8])
	}
	if cksum.Checksum(h) != 0 {
		t.Fatalf("header checksum invalid: %x", h)
	}
}
