package esp

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	cksum "github.com/xesp/xesp/internal/pkt"
)

// pair returns an outbound and an inbound SA with the same keys.
func pair(tb testing.TB, p Proposal, mode Mode, esn bool, window int, rng *rand.Rand) (*Transform, *Transform) {
	tb.Helper()
	c := Config{SPI: 0x1000 + uint32(p), Proposal: p, EncKey: randBytes(rng, p.EncKeyLen()),
		AuthKey: randBytes(rng, p.AuthKeyLen()), ESN: esn, ReplayWindow: window, Mode: mode}
	out, err := NewTransform(c)
	if err != nil {
		tb.Fatal(err)
	}
	in, err := NewTransform(c)
	if err != nil {
		tb.Fatal(err)
	}
	return out, in
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func allProposals() []Proposal {
	var ps []Proposal
	for p := AES128GCM16; p < proposalCount; p++ {
		ps = append(ps, p)
	}
	return ps
}

var (
	ue4  = netip.MustParseAddr("192.0.2.10")
	gw4  = netip.MustParseAddr("198.51.100.20")
	nat4 = netip.MustParseAddr("203.0.113.7")
	ue6  = netip.MustParseAddr("2001:db8::10")
	gw6  = netip.MustParseAddr("2001:db8:1::20")
	nat6 = netip.MustParseAddr("2001:db8:2::7")
)

// innerIP builds an IPv4 or IPv6 packet of exactly n bytes (n >= header)
// carrying UDP with a valid checksum when there is room for it.
func innerIP(rng *rand.Rand, v6 bool, n int) []byte {
	b := randBytes(rng, n)
	if !v6 {
		b[0], b[1] = 0x45, 0
		binary.BigEndian.PutUint16(b[2:], uint16(n))
		b[6], b[7], b[9] = 0, 0, ProtoUDP
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:], cksum.Checksum(b[:20]))
		return b
	}
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(n-40))
	b[6] = ProtoUDP
	return b
}

// udpSegment builds a UDP segment of n >= 8 bytes whose checksum is valid
// for the given addresses.
func udpSegment(rng *rand.Rand, n int, src, dst netip.Addr) []byte {
	b := randBytes(rng, n)
	binary.BigEndian.PutUint16(b[4:], uint16(n))
	b[6], b[7] = 0, 0
	ck := transportChecksum(addrBytes(src, dst), ProtoUDP, b)
	if ck == 0 {
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(b[6:], ck)
	return b
}

func addrBytes(src, dst netip.Addr) []byte {
	return append(src.AsSlice(), dst.AsSlice()...)
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{0, 1, 2, 3, 4, 5, 7, 8, 13, 15, 16, 17, 20, 31, 40, 41, 63, 64, 65, 200, 600, 1400, 1500, 4095, 8999, 9000}
	if testing.Short() {
		sizes = []int{0, 3, 41, 200, 1400, 9000}
	}
	cases := 0
	for _, p := range allProposals() {
		for _, mode := range []Mode{ModeTunnel, ModeTransport} {
			esn := p%2 == 0 // both ESN settings across the table
			out, in := pair(t, p, mode, esn, DefaultReplayWindow, rng)
			for _, n := range sizes {
				for _, v6out := range []bool{false, true} {
					for _, encap := range []bool{true, false} {
						v6in := rng.IntN(2) == 1
						o := Outer{Src: ue4, Dst: gw4, Encap: encap, SrcPort: 4500, DstPort: 4500}
						if v6out {
							o.Src, o.Dst = ue6, gw6
						}
						var payload []byte
						var nh uint8
						if mode == ModeTunnel {
							m := max(n, 20)
							if v6in {
								m = max(n, 40)
							}
							payload = innerIP(rng, v6in, m)
							nh = NextHeaderFor(payload)
						} else if n >= 8 {
							payload, nh = udpSegment(rng, n, o.Src, o.Dst), ProtoUDP
						} else {
							payload, nh = randBytes(rng, n), 253 // experimental protocol
						}
						roundTrip(t, out, in, payload, nh, &o)
						cases++
					}
				}
			}
		}
	}
	t.Logf("%d round trips", cases)
}

func roundTrip(t *testing.T, out, in *Transform, payload []byte, nh uint8, o *Outer) {
	t.Helper()
	name := fmt.Sprintf("%v/%v/n=%d/v6=%v/encap=%v", out.Proposal(), out.Mode(), len(payload), o.Src.Is6(), o.Encap)
	buf := make([]byte, MaxOuterLen+out.Headroom()+len(payload)+out.MaxTailroom()+16)
	wire, err := out.SealPacket(buf, payload, nh, o)
	if err != nil {
		t.Fatalf("%s: seal: %v", name, err)
	}
	espLen := len(payload) + out.Overhead(len(payload), 0)
	if len(wire) != OuterLen(o)+espLen {
		t.Fatalf("%s: wire length %d, want %d", name, len(wire), OuterLen(o)+espLen)
	}
	if out.info().cbc && (espLen-8-int(out.ivLen)-int(out.icv))%16 != 0 {
		t.Fatalf("%s: CBC ciphertext not block aligned", name)
	}
	if (espLen-int(out.icv))%4 != 0 {
		t.Fatalf("%s: ESP packet not 4-byte aligned before the ICV", name)
	}
	if out.Proposal().HasIntegrity() && len(payload) > 16 && bytes.Contains(wire, payload[:16]) && out.Proposal() != NullSHA1 && out.Proposal() != NullSHA256 && out.Proposal() != NullMD5 {
		t.Fatalf("%s: plaintext visible on the wire", name)
	}
	seq := out.NextSeq() - 1
	p, err := in.OpenPacket(wire)
	if err != nil {
		t.Fatalf("%s: open: %v", name, err)
	}
	wantClass := ClassESP
	if o.Encap {
		wantClass = ClassESPInUDP
	}
	if p.Class != wantClass || p.Seq != seq || p.NextHeader != nh || p.Outer.Src != o.Src || p.Outer.Dst != o.Dst {
		t.Fatalf("%s: class %v seq %d nh %d outer %+v", name, p.Class, p.Seq, p.NextHeader, p.Outer)
	}
	if !bytes.Equal(p.Payload, payload) {
		t.Fatalf("%s: payload differs", name)
	}
	if in.Mode() == ModeTransport {
		checkDelivered(t, ModeTransport, p, payload)
	} else if !bytes.Equal(p.IP, payload) {
		t.Fatalf("%s: inner packet differs", name)
	}
}

// TestTransportNAT: a NAPT rewrote the outer source address (and the IPv4
// header checksum), which the inner UDP checksum covered; after opening, the
// recomputed checksum must verify against the addresses the packet now has
// (RFC 3948 3.1.2).
func TestTransportNAT(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, v6 := range []bool{false, true} {
		out, in := pair(t, AES128GCM16, ModeTransport, false, 64, rng)
		o := Outer{Src: ue4, Dst: gw4, Encap: true, SrcPort: 4500, DstPort: 4500}
		natted := nat4
		if v6 {
			o.Src, o.Dst, natted = ue6, gw6, nat6
		}
		seg := udpSegment(rng, 300, o.Src, o.Dst)
		buf := make([]byte, 2048)
		wire, err := out.SealPacket(buf, seg, ProtoUDP, &o)
		if err != nil {
			t.Fatal(err)
		}
		// The NAPT: new source address and port.
		if v6 {
			a := natted.As16()
			copy(wire[8:24], a[:])
		} else {
			a := natted.As4()
			copy(wire[12:16], a[:])
			wire[10], wire[11] = 0, 0
			binary.BigEndian.PutUint16(wire[10:], cksum.Checksum(wire[:20]))
		}
		binary.BigEndian.PutUint16(wire[OuterLen(&o)-8:], 31000)
		p, err := in.OpenPacket(wire)
		if err != nil {
			t.Fatalf("v6=%v: %v", v6, err)
		}
		if p.Outer.Src != natted || p.Outer.SrcPort != 31000 {
			t.Fatalf("outer %+v", p.Outer)
		}
		ip := p.IP
		seg2 := ip[p.IPHeaderLen:]
		if transportChecksum(addrBytes(natted, o.Dst), ProtoUDP, seg2) != 0 {
			t.Fatalf("v6=%v: recomputed UDP checksum does not verify", v6)
		}
		if transportChecksum(addrBytes(o.Src, o.Dst), ProtoUDP, seg2) == 0 {
			t.Fatalf("v6=%v: checksum still matches the pre-NAT address", v6)
		}
		if !bytes.Equal(seg2[8:], seg[8:]) || !bytes.Equal(seg2[:6], seg[:6]) {
			t.Fatalf("v6=%v: UDP data changed", v6)
		}
		wantNH := byte(ProtoUDP)
		if v6 && ip[6] != wantNH || !v6 && ip[9] != wantNH {
			t.Fatalf("v6=%v: protocol not rewritten: %x", v6, ip[:20])
		}
	}
}

// TestTFC: TFC padding is sent, covered, and trimmed by the inner length.
func TestTFC(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, p := range []Proposal{AES128GCM16, AES256SHA256, AES128GCM8, NullSHA1} {
		out, in := pair(t, p, ModeTunnel, false, 64, rng)
		inner := innerIP(rng, false, 100)
		for _, tfc := range []int{0, 1, 7, 300} {
			hr := out.Headroom()
			buf := make([]byte, hr+len(inner)+out.Tailroom(len(inner), tfc))
			copy(buf[hr:], inner)
			s, e, err := out.Seal(buf, hr, len(inner), NextHeaderIPv4, tfc)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := e-s, len(inner)+out.Overhead(len(inner), tfc); got != want {
				t.Fatalf("%v tfc %d: length %d want %d", p, tfc, got, want)
			}
			res, err := in.Open(buf[s:e])
			if err != nil {
				t.Fatalf("%v tfc %d: %v", p, tfc, err)
			}
			if !bytes.Equal(buf[s+res.Start:s+res.End], inner) {
				t.Fatalf("%v tfc %d: inner differs after trimming", p, tfc)
			}
		}
	}
}

// TestTamper flips every byte of sealed packets; each flip must be caught
// (SPI: no_sa, elsewhere integ_error) and leave the SA able to accept the
// untouched packet afterwards.
func TestTamper(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, p := range allProposals() {
		if !p.HasIntegrity() {
			continue
		}
		for _, esn := range []bool{false, true} {
			out, in := pair(t, p, ModeTransport, esn, 128, rng)
			if err := out.SetNextSeq(1000); err != nil {
				t.Fatal(err)
			}
			payload := randBytes(rng, 45)
			hr := out.Headroom()
			buf := make([]byte, hr+len(payload)+out.MaxTailroom())
			copy(buf[hr:], payload)
			s, e, err := out.Seal(buf, hr, len(payload), 17, 0)
			if err != nil {
				t.Fatal(err)
			}
			pkt := buf[s:e]
			for i := range pkt {
				for _, flip := range []byte{0x01, 0x80, 0xff} {
					bad := bytes.Clone(pkt)
					bad[i] ^= flip
					_, err := in.Open(bad)
					want := ErrIntegrity
					if i < 4 {
						want = ErrNoSA
					}
					if err != want {
						t.Fatalf("%v esn=%v: byte %d ^%#x: %v, want %v", p, esn, i, flip, err, want)
					}
					if want == ErrIntegrity && !p.AEAD() && !bytes.Equal(bad[:i], pkt[:i]) {
						t.Fatalf("%v: failed open modified the packet", p)
					}
				}
			}
			// Truncations.
			for _, cut := range []int{1, 4, int(out.icv), len(pkt) - 1} {
				if cut >= len(pkt) {
					continue
				}
				_, err := in.Open(bytes.Clone(pkt[:len(pkt)-cut]))
				if err != ErrIntegrity && err != ErrRunt && err != ErrTruncated {
					t.Fatalf("%v: cut %d: %v", p, cut, err)
				}
			}
			if in.Replay().Top() != 0 {
				t.Fatalf("%v: rejected packets moved the window to %d", p, in.Replay().Top())
			}
			res, err := in.Open(bytes.Clone(pkt))
			if err != nil || res.Seq != 1000 {
				t.Fatalf("%v: untouched packet: %v seq %d", p, err, res.Seq)
			}
		}
	}
}

// sealRaw protects an arbitrary plaintext (payload and trailer as given),
// for packets Seal would never produce.
func sealRaw(t *testing.T, sa *Transform, plain []byte, seq uint64) []byte {
	t.Helper()
	hr := sa.Headroom()
	buf := make([]byte, hr+len(plain)+int(sa.icv)+8)
	copy(buf[hr:], plain)
	if err := sa.Warm(); err != nil { // seal's job, which this skips
		t.Fatal(err)
	}
	sa.protect(buf, 0, hr, hr+len(plain), seq, nil)
	return buf[:hr+len(plain)+int(sa.icv)]
}

// trailer appends RFC 4303 padding 1, 2, 3, ..., Pad Length and Next
// Header to payload for block size bs.
func trailer(payload []byte, nh uint8, bs int) []byte {
	b := bytes.Clone(payload)
	pad := (bs - (len(b)+2)%bs) % bs
	for i := 1; i <= pad; i++ {
		b = append(b, byte(i))
	}
	return append(b, byte(pad), nh)
}

func TestBadPaddingAndNextHeader(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	inner4 := innerIP(rng, false, 30)
	inner6 := innerIP(rng, true, 46)
	for _, p := range allProposals() {
		bs := p.BlockSize()
		// Empty payload: the padding is bs-2 bytes long (2 or 14).
		badByte := trailer(nil, 17, bs)
		badByte[1] = 9
		zeros := trailer(nil, 17, bs)
		clear(zeros[:bs-2])
		tooLong := trailer(nil, 17, bs)
		tooLong[bs-2] = byte(bs - 1)
		cases := []struct {
			name  string
			mode  Mode
			plain []byte
			want  error
		}{
			{"pad bytes not 1,2,3", ModeTransport, badByte, ErrPadding},
			{"pad bytes zero", ModeTransport, zeros, ErrPadding},
			{"pad length beyond payload", ModeTransport, tooLong, ErrPadding},
			{"tunnel nh 17", ModeTunnel, trailer(inner4, 17, bs), ErrNextHeader},
			{"tunnel nh 4 over IPv6", ModeTunnel, trailer(inner6, 4, bs), ErrNextHeader},
			{"tunnel nh 41 over IPv4", ModeTunnel, trailer(inner4, 41, bs), ErrNextHeader},
			{"tunnel inner length beyond payload", ModeTunnel, trailer(inner4[:24], 4, bs), ErrNextHeader},
			{"tunnel runt inner", ModeTunnel, trailer(inner4[:12], 4, bs), ErrNextHeader},
			{"transport nh 255", ModeTransport, trailer([]byte{9, 9}, 255, bs), ErrNextHeader},
			{"transport nh 0", ModeTransport, trailer([]byte{9, 9}, 0, bs), ErrNextHeader},
			{"dummy tunnel", ModeTunnel, trailer([]byte{7, 7}, 59, bs), ErrDummy},
			{"dummy transport", ModeTransport, trailer(nil, 59, bs), ErrDummy},
			{"good transport", ModeTransport, trailer([]byte{7, 7, 7}, 17, bs), nil},
			{"good tunnel", ModeTunnel, trailer(inner6, 41, bs), nil},
		}
		for i, c := range cases {
			out, in := pair(t, p, c.mode, false, 64, rng)
			pkt := sealRaw(t, out, c.plain, uint64(i+1))
			res, err := in.Open(pkt)
			if err != c.want {
				t.Fatalf("%v %s: %v, want %v", p, c.name, err, c.want)
			}
			if in.Replay().Size() > 0 && in.Replay().Top() != uint64(i+1) {
				t.Fatalf("%v %s: authenticated packet did not update the window", p, c.name)
			}
			if c.want == ErrDummy && (res.NextHeader != 59 || res.Seq != uint64(i+1)) {
				t.Fatalf("%v %s: dummy result %+v", p, c.name, res)
			}
		}
	}
}

func TestReasonsAllocFree(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	_, in := pair(t, AES128GCM16, ModeTunnel, false, 64, rng)
	junk := randBytes(rng, 100)
	binary.BigEndian.PutUint32(junk, in.SPI())
	binary.BigEndian.PutUint32(junk[4:], 5)
	var c Counters
	allocs := testing.AllocsPerRun(100, func() {
		_, err := in.Open(junk)
		c.Count(err)
	})
	if allocs != 0 {
		t.Fatalf("rejecting a packet allocated %v times", allocs)
	}
	if c[ReasonIntegrity] != 101 {
		t.Fatalf("counted %v", c)
	}
	for r := ReasonNone; r < NumReasons; r++ {
		if r.String() == "" || strings.Contains(r.String(), " ") || !strings.HasPrefix(r.Error(), "esp: ") {
			t.Errorf("reason %d: %q / %q", r, r.String(), r.Error())
		}
		if ReasonOf(fmt.Errorf("wrapped: %w", r)) != r {
			t.Errorf("ReasonOf does not unwrap %v", r)
		}
	}
	if ReasonIntegrity.String() != "integ_error" || ReasonReplay.String() != "replay" || ReasonRunt.String() != "runt" {
		t.Fatal("stable names changed")
	}
}

// TestGCM8Tag checks the full-tag recovery of gcm8.go against Go's GCM on
// random lengths, both ESN settings.
func TestGCM8Tag(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	for i := 0; i < 200; i++ {
		esn := i%2 == 1
		key := randBytes(rng, 20)
		sa, err := NewTransform(Config{SPI: 77, Proposal: AES128GCM8, EncKey: key, ESN: esn, ReplayWindow: 0, Mode: ModeTransport})
		if err != nil {
			t.Fatal(err)
		}
		n := 2 + 4*rng.IntN(100)
		seq := rng.Uint64()>>1 + 1
		if !esn {
			seq &= 0xffffffff
			seq |= 1
		}
		pkt := make([]byte, 16+n+16)
		binary.BigEndian.PutUint32(pkt, 77)
		binary.BigEndian.PutUint32(pkt[4:], uint32(seq))
		copy(pkt[8:16], randBytes(rng, 8))
		pt := randBytes(rng, n)
		b, _ := aes.NewCipher(key[:16])
		g, _ := cipher.NewGCM(b)
		nonce := append(bytes.Clone(key[16:]), pkt[8:16]...)
		aad := pkt[:8]
		if esn {
			aad = binary.BigEndian.AppendUint64(bytes.Clone(pkt[:4]), seq)
		}
		g.Seal(pkt[16:16], nonce, pt, aad)
		pkt = pkt[:16+n+8]
		bad := bytes.Clone(pkt)
		bad[len(bad)-1-rng.IntN(8)] ^= byte(1 + rng.IntN(255))
		if sa.openGCM8(bad, 16+n, seq) {
			t.Fatalf("case %d: forged tag accepted", i)
		}
		if !bytes.Equal(bad[:16+n], pkt[:16+n]) {
			t.Fatalf("case %d: rejected packet was modified", i)
		}
		if !sa.openGCM8(pkt, 16+n, seq) {
			t.Fatalf("case %d (n=%d esn=%v): valid truncated tag rejected", i, n, esn)
		}
		if !bytes.Equal(pkt[16:16+n], pt) {
			t.Fatalf("case %d: plaintext differs", i)
		}
	}
}

func TestConfigErrors(t *testing.T) {
	k := func(n int) []byte { return make([]byte, n) }
	cases := []struct {
		c    Config
		want string
	}{
		{Config{Name: "ue1-in", Proposal: AES128GCM16, EncKey: k(16), Mode: ModeTunnel}, `sa "ue1-in": enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 16`},
		{Config{SPI: 0x1001, Proposal: AES128SHA1, EncKey: k(16), AuthKey: k(16), Mode: ModeTunnel}, `sa "spi 0x00001001": auth_key: aes128-sha1 needs 20 bytes, got 16`},
		{Config{Proposal: AES128GCM16, EncKey: k(20), AuthKey: k(20), Mode: ModeTunnel}, `auth_key: aes128gcm16 takes no separate integrity key, got 20 bytes`},
		{Config{Proposal: NullSHA1, EncKey: k(16), AuthKey: k(20), Mode: ModeTunnel}, `enc_key: null-sha1 takes no encryption key, got 16 bytes`},
		{Config{Proposal: AES256SHA256, EncKey: k(16), AuthKey: k(32), Mode: ModeTunnel}, `enc_key: aes256-sha256 needs 32 bytes, got 16`},
		{Config{Proposal: AES128GCM16, EncKey: k(20), Mode: ModeTunnel, ReplayWindow: 31}, `replay_window: 31 out of range`},
		{Config{Proposal: AES128GCM16, EncKey: k(20), Mode: ModeTunnel, ReplayWindow: MaxReplayWindow + 1}, `replay_window: 65537 out of range`},
		{Config{Proposal: AES128GCM16, EncKey: k(20)}, `mode: must be tunnel or transport`},
		{Config{EncKey: k(20), Mode: ModeTunnel}, `proposal: not set`},
	}
	for _, c := range cases {
		_, err := NewTransform(c.c)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("got %v, want %q", err, c.want)
		}
	}
	for _, p := range allProposals() {
		if _, err := NewTransform(Config{Proposal: p, EncKey: k(p.EncKeyLen()), AuthKey: k(p.AuthKeyLen()), Mode: ModeTransport, ReplayWindow: 4096}); err != nil {
			t.Errorf("%v: %v", p, err)
		}
	}
}

func TestSealRoom(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	for _, p := range allProposals() {
		out, _ := pair(t, p, ModeTransport, false, 0, rng)
		n := 33
		hr, tr := out.Headroom(), out.Tailroom(n, 0)
		if tr > out.MaxTailroom() {
			t.Fatalf("%v: Tailroom %d > MaxTailroom %d", p, tr, out.MaxTailroom())
		}
		buf := make([]byte, hr+n+tr)
		if _, _, err := out.Seal(buf[:len(buf)-1], hr, n, 17, 0); err != ErrNoRoom {
			t.Fatalf("%v: one byte short of tailroom: %v", p, err)
		}
		if _, _, err := out.Seal(buf, hr-1, n, 17, 0); err != ErrNoRoom {
			t.Fatalf("%v: one byte short of headroom: %v", p, err)
		}
		if out.NextSeq() != 1 {
			t.Fatalf("%v: failed seals spent sequence numbers", p)
		}
		if _, _, err := out.Seal(buf, hr, n, 17, 0); err != nil {
			t.Fatalf("%v: exact room: %v", p, err)
		}
		if _, _, err := out.Seal(buf, hr, -1, 17, 0); err != ErrInvalid {
			t.Fatalf("%v: negative length: %v", p, err)
		}
	}
}

func TestSealAllocFree(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 18))
	for _, p := range allProposals() {
		out, in := pair(t, p, ModeTransport, true, 1024, rng)
		o := Outer{Src: ue6, Dst: gw6, Encap: true, SrcPort: 4500, DstPort: 4500}
		payload := randBytes(rng, 200)
		buf := make([]byte, 512)
		allocs := testing.AllocsPerRun(50, func() {
			wire, err := out.SealPacket(buf, payload, 17, &o)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := in.OpenPacket(wire); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%v: %v allocations per seal+open", p, allocs)
		}
	}
}

// TestIVDiscipline: AEAD IVs are the 64-bit sequence number; CBC IVs are
// E_K(seq || SPI || "xIV\0"), distinct per packet and unrelated to the
// counter's bytes.
func TestIVDiscipline(t *testing.T) {
	rng := rand.New(rand.NewPCG(51, 52))
	for _, p := range []Proposal{AES128GCM16, ChaCha20Poly1305, AES256GCM8, AES128SHA1, AES256CBC} {
		out, _ := pair(t, p, ModeTransport, true, 0, rng)
		_ = out.SetNextSeq(1<<32 + 5)
		seen := map[string]bool{}
		for i := 0; i < 100; i++ {
			seq := out.NextSeq()
			buf := make([]byte, 200)
			s, _, err := out.Seal(buf, out.Headroom(), 20, 17, 0)
			if err != nil {
				t.Fatal(err)
			}
			iv := buf[s+8 : s+out.Headroom()]
			if p.AEAD() {
				if binary.BigEndian.Uint64(iv) != seq {
					t.Fatalf("%v: IV %x for seq %#x", p, iv, seq)
				}
				continue
			}
			var want [16]byte
			binary.BigEndian.PutUint64(want[:], seq)
			binary.BigEndian.PutUint32(want[8:], out.SPI())
			copy(want[12:], "xIV\x00")
			out.ext.block.Encrypt(want[:], want[:])
			if !bytes.Equal(iv, want[:]) || seen[string(iv)] {
				t.Fatalf("%v: IV %x for seq %#x (repeat: %v)", p, iv, seq, seen[string(iv)])
			}
			seen[string(iv)] = true
		}
	}
}
