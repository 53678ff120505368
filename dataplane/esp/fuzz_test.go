package esp

import (
	"encoding/binary"
	"testing"
)

// fuzzConfigs: the published vectors' SAs (so their packets seed deep
// paths) and one SA of every proposal with fixed keys.
func fuzzConfigs(tb testing.TB) []Config {
	var cs []Config
	for _, v := range loadVectors(tb) {
		p, err := v.proposal()
		if err != nil {
			tb.Fatal(err)
		}
		mode := ModeTransport
		if v.NextHeader == 4 || v.NextHeader == 41 {
			mode = ModeTunnel
		}
		cs = append(cs, Config{SPI: v.SPI, Proposal: p, EncKey: unhex(tb, v.Keymat), ESN: v.ESN, ReplayWindow: 64, Mode: mode})
	}
	for p := AES128GCM16; p < proposalCount; p++ {
		k := make([]byte, p.EncKeyLen())
		a := make([]byte, p.AuthKeyLen())
		for i := range k {
			k[i] = byte(i)
		}
		for i := range a {
			a[i] = byte(3 * i)
		}
		cs = append(cs, Config{SPI: 0x2000 + uint32(p), Proposal: p, EncKey: k, AuthKey: a, ESN: p%2 == 0, ReplayWindow: 64, Mode: Mode(1 + p%2)})
	}
	return cs
}

func checkReason(t *testing.T, err error) {
	t.Helper()
	if err != nil && ReasonOf(err) >= NumReasons {
		t.Fatalf("untyped error %T %v", err, err)
	}
}

// FuzzOpen: arbitrary bytes into Open never panic, only typed errors, and an
// accepted packet's bounds lie inside it.
func FuzzOpen(f *testing.F) {
	cs := fuzzConfigs(f)
	for i, v := range loadVectors(f) {
		f.Add(uint8(i), unhex(f, v.ESPPacket))
	}
	f.Add(uint8(len(cs)-1), make([]byte, 64))
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) {
		c := cs[int(sel)%len(cs)]
		sa, err := NewTransform(c)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) >= 4 && sel&0x80 == 0 {
			binary.BigEndian.PutUint32(data, c.SPI) // get past the SPI check
		}
		res, err := sa.Open(data)
		checkReason(t, err)
		if err == nil || err == ErrDummy {
			if res.Start < 0 || res.Start > res.End || res.End > len(data) {
				t.Fatalf("bounds %d..%d of %d", res.Start, res.End, len(data))
			}
		}
	})
}

// FuzzParseOuter: arbitrary bytes classify without panicking; ESP bounds lie
// inside the packet.
func FuzzParseOuter(f *testing.F) {
	for _, v := range loadVectors(f) {
		if v.UDP4500 != nil {
			f.Add(unhex(f, *v.UDP4500))
		}
		if v.IPESP != nil {
			f.Add(unhex(f, *v.IPESP))
		}
	}
	f.Add(ipv6(ProtoUDP, []byte{0, 0, 1, 4, 0, 0, 0, 0}, udp(4500, 4500, make([]byte, 30)), ue6, gw6))
	f.Add(ipv4(ProtoUDP, nil, udp(4500, 4500, []byte{0xff}), ue4, gw4))
	f.Fuzz(func(t *testing.T, pkt []byte) {
		p, err := ParseOuter(pkt)
		checkReason(t, err)
		if err == nil && (p.Class == ClassESP || p.Class == ClassESPInUDP) {
			if p.ESPStart < p.IPHeaderLen || p.ESPStart > p.ESPEnd || p.ESPEnd > len(pkt) || p.ESPEnd-p.ESPStart < 8 {
				t.Fatalf("ESP bounds %d..%d of %d", p.ESPStart, p.ESPEnd, len(pkt))
			}
		}
	})
}

// FuzzOpenPacket: whole outer packets through the convenience path,
// including the transport-mode rebuild.
func FuzzOpenPacket(f *testing.F) {
	cs := fuzzConfigs(f)
	for _, v := range loadVectors(f) {
		if v.UDP4500 != nil {
			f.Add(unhex(f, *v.UDP4500))
		}
		if v.IPESP != nil {
			f.Add(unhex(f, *v.IPESP))
		}
	}
	f.Fuzz(func(t *testing.T, pkt []byte) {
		sas := map[uint32]*Transform{}
		for _, c := range cs {
			if _, dup := sas[c.SPI]; dup {
				continue
			}
			sa, err := NewTransform(c)
			if err != nil {
				t.Fatal(err)
			}
			sas[c.SPI] = sa
		}
		p, err := OpenPacket(pkt, func(spi uint32) *Transform { return sas[spi] })
		checkReason(t, err)
		if err == nil && p.IP != nil && len(p.IP) < len(p.Payload) {
			t.Fatalf("delivered packet shorter than its payload")
		}
	})
}
