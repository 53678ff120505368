package pkt

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// gopacket, an independent decoder, agrees on every field and checksum.
func TestUDP4AgainstGopacket(t *testing.T) {
	src := netip.MustParseAddrPort("10.99.0.1:5060")
	dst := netip.MustParseAddrPort("10.0.0.1:5061")
	for _, payload := range [][]byte{nil, []byte("x"), []byte("REGISTER sip:a SIP/2.0\r\n\r\n")} {
		p := UDP4(src, dst, payload)
		g := gopacket.NewPacket(p, layers.LayerTypeIPv4, gopacket.Default)
		ip, _ := g.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		udp, _ := g.Layer(layers.LayerTypeUDP).(*layers.UDP)
		if ip == nil || udp == nil {
			t.Fatalf("gopacket cannot decode %x", p)
		}
		ck := ip.Checksum
		if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		buf := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, ip, udp, gopacket.Payload(payload)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf.Bytes(), p) || ip.Checksum != ck {
			t.Fatalf("recomputed\n%x\nbuilt\n%x", buf.Bytes(), p)
		}
		s, d, pl, ok := UDP4Parse(p)
		if !ok || s != src || d != dst || !bytes.Equal(pl, payload) {
			t.Fatalf("parse: %v %v %q %v", s, d, pl, ok)
		}
	}
	if _, _, _, ok := UDP4Parse(UDP4(src, dst, []byte("abc"))[:27]); ok {
		t.Fatal("truncated packet parsed")
	}
}
