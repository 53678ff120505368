package capture

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// ipv4 returns a minimal IPv4 packet of total length n with recognisable
// bytes after the header.
func ipv4(n int) []byte {
	p := make([]byte, n)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(n))
	p[9] = 50
	for i := 20; i < n; i++ {
		p[i] = byte(i)
	}
	return p
}

func ipv6(payload int) []byte {
	p := make([]byte, 40+payload)
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:], uint16(payload))
	p[6] = 17
	for i := 40; i < len(p); i++ {
		p[i] = byte(i)
	}
	return p
}

func frame(lt layers.LinkType, ethertype uint16, ip []byte) []byte {
	switch lt {
	case LinkEthernet:
		h := make([]byte, 14)
		binary.BigEndian.PutUint16(h[12:], ethertype)
		return append(h, ip...)
	case LinkSLL:
		h := make([]byte, 16)
		binary.BigEndian.PutUint16(h[14:], ethertype)
		return append(h, ip...)
	case LinkSLL2:
		h := make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], ethertype)
		return append(h, ip...)
	}
	return append([]byte(nil), ip...)
}

func TestIPFromFrameEveryLinkType(t *testing.T) {
	v4, v6 := ipv4(60), ipv6(30)
	for _, lt := range []layers.LinkType{LinkEthernet, LinkSLL, LinkSLL2, LinkRaw, LinkIPv4, LinkIPv6} {
		for _, c := range []struct {
			et uint16
			ip []byte
		}{{0x0800, v4}, {0x86dd, v6}} {
			got, err := IPFromFrame(lt, frame(lt, c.et, c.ip))
			if err != nil {
				t.Fatalf("link %d ethertype %#x: %v", lt, c.et, err)
			}
			if !bytes.Equal(got, c.ip) {
				t.Fatalf("link %d ethertype %#x: got %x want %x", lt, c.et, got, c.ip)
			}
		}
	}
}

func TestIPFromFrameEthernetDetails(t *testing.T) {
	v4 := ipv4(28)
	// Ethernet pads short frames to 60 bytes: the IP length must trim it.
	padded := append(frame(LinkEthernet, 0x0800, v4), make([]byte, 18)...)
	if got, err := IPFromFrame(LinkEthernet, padded); err != nil || !bytes.Equal(got, v4) {
		t.Fatalf("padded frame: %x, %v", got, err)
	}
	// 802.1ad outer tag then 802.1Q inner tag.
	qinq := make([]byte, 12)
	qinq = binary.BigEndian.AppendUint16(qinq, 0x88a8)
	qinq = append(qinq, 0, 10)
	qinq = binary.BigEndian.AppendUint16(qinq, 0x8100)
	qinq = append(qinq, 0, 20)
	qinq = binary.BigEndian.AppendUint16(qinq, 0x0800)
	qinq = append(qinq, v4...)
	if got, err := IPFromFrame(LinkEthernet, qinq); err != nil || !bytes.Equal(got, v4) {
		t.Fatalf("QinQ frame: %x, %v", got, err)
	}
	arp := frame(LinkEthernet, 0x0806, make([]byte, 28))
	if _, err := IPFromFrame(LinkEthernet, arp); !errors.Is(err, ErrNotIP) {
		t.Fatalf("ARP: %v, want ErrNotIP", err)
	}
	if _, err := IPFromFrame(LinkEthernet, make([]byte, 13)); err == nil {
		t.Fatal("13-byte Ethernet frame accepted")
	}
	if _, err := IPFromFrame(LinkEthernet, frame(LinkEthernet, 0x0800, v4[:19])); err == nil {
		t.Fatal("19-byte IPv4 packet accepted")
	}
	if _, err := IPFromFrame(layers.LinkType(147), v4); err == nil {
		t.Fatal("unsupported link type accepted")
	}
}

// A pcap written with gopacket and a pcapng written with gopacket both read
// back, non-IP frames skipped but counted in Index.
func TestReaderPcapAndPcapng(t *testing.T) {
	ts := time.Unix(1700000000, 123456000).UTC()
	frames := [][]byte{
		frame(LinkEthernet, 0x0800, ipv4(40)),
		frame(LinkEthernet, 0x0806, make([]byte, 28)),
		frame(LinkEthernet, 0x86dd, ipv6(12)),
	}
	var pcap, ng bytes.Buffer
	pw := pcapgo.NewWriter(&pcap)
	if err := pw.WriteFileHeader(65535, LinkEthernet); err != nil {
		t.Fatal(err)
	}
	nw, err := pcapgo.NewNgWriter(&ng, LinkEthernet)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range frames {
		ci := gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(f), Length: len(f), InterfaceIndex: 0}
		if err := pw.WritePacket(ci, f); err != nil {
			t.Fatal(err)
		}
		if err := nw.WritePacket(ci, f); err != nil {
			t.Fatal(err)
		}
	}
	if err := nw.Flush(); err != nil {
		t.Fatal(err)
	}
	for name, buf := range map[string]*bytes.Buffer{"pcap": &pcap, "pcapng": &ng} {
		r, err := NewReader(bytes.NewReader(buf.Bytes()))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var idx []int
		for {
			p, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if !p.Time.Equal(ts) {
				t.Fatalf("%s: time %v want %v", name, p.Time, ts)
			}
			idx = append(idx, p.Index)
		}
		if len(idx) != 2 || idx[0] != 0 || idx[1] != 2 {
			t.Fatalf("%s: indexes %v, want [0 2]", name, idx)
		}
	}
}

func TestWriterRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	want := [][]byte{ipv4(33), ipv6(7)}
	for _, p := range want {
		if err := w.Write(time.Unix(1, 0), p); err != nil {
			t.Fatal(err)
		}
	}
	r, err := NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != LinkRaw {
		t.Fatalf("link type %d", r.LinkType())
	}
	for i, p := range want {
		got, err := r.Next()
		if err != nil || !bytes.Equal(got.IP, p) {
			t.Fatalf("packet %d: %x, %v", i, got.IP, err)
		}
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after last: %v", err)
	}
}
