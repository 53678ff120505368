// Package capture reads packet captures (pcap and pcapng, as tcpdump,
// dumpcap and tshark write them) and hands back the IP packet inside each
// frame, whatever the link type. It writes raw-IP pcaps for decrypted
// output. It knows nothing about ESP.
package capture

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// Link types tcpdump writes that carry IP (LINKTYPE_* numbers from
// tcpdump.org/linktypes.html).
const (
	LinkEthernet = layers.LinkType(1)
	LinkRaw      = layers.LinkType(101)
	LinkSLL      = layers.LinkType(113)
	LinkIPv4     = layers.LinkType(228)
	LinkIPv6     = layers.LinkType(229)
	LinkSLL2     = layers.LinkTypeLinuxSLL2
)

// ErrNotIP is returned by IPFromFrame for frames that carry no IP packet
// (ARP, LLDP, ...). Callers skip such frames rather than fail.
var ErrNotIP = errors.New("frame carries no IP packet")

// Packet is one captured frame's IP packet.
type Packet struct {
	Index int       // 0-based position in the capture, counting every frame
	Time  time.Time // capture timestamp
	IP    []byte    // the IP packet; valid until the next call to Next
}

type packetSource interface {
	ReadPacketData() ([]byte, gopacket.CaptureInfo, error)
}

// Reader yields the IP packets of a capture in order.
type Reader struct {
	src      packetSource
	linkType func() layers.LinkType
	next     int
}

// NewReader detects pcap or pcapng from the file's magic number.
func NewReader(r io.Reader) (*Reader, error) {
	br := bufio.NewReader(r)
	magic, err := br.Peek(4)
	if err != nil {
		return nil, fmt.Errorf("read capture header: %w", err)
	}
	if bytes.Equal(magic, []byte{0x0a, 0x0d, 0x0d, 0x0a}) {
		ng, err := pcapgo.NewNgReader(br, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			return nil, fmt.Errorf("read pcapng header: %w", err)
		}
		return &Reader{src: ng, linkType: ng.LinkType}, nil
	}
	p, err := pcapgo.NewReader(br)
	if err != nil {
		return nil, fmt.Errorf("read pcap header: %w", err)
	}
	return &Reader{src: p, linkType: p.LinkType}, nil
}

// LinkType is the capture's link type.
func (r *Reader) LinkType() layers.LinkType { return r.linkType() }

// Next returns the next frame that carries IP; frames that do not are
// skipped but still counted in Index. It returns io.EOF at the end.
func (r *Reader) Next() (Packet, error) {
	for {
		data, ci, err := r.src.ReadPacketData()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return Packet{}, io.EOF
			}
			return Packet{}, fmt.Errorf("frame %d: %w", r.next, err)
		}
		idx := r.next
		r.next++
		ip, err := IPFromFrame(r.linkType(), data)
		if errors.Is(err, ErrNotIP) {
			continue
		}
		if err != nil {
			return Packet{}, fmt.Errorf("frame %d: %w", idx, err)
		}
		return Packet{Index: idx, Time: ci.Timestamp, IP: ip}, nil
	}
}

// IPFromFrame returns the IP packet carried by one frame of the given link
// type, trimmed of link-layer headers (and of Ethernet padding, using the IP
// length).
func IPFromFrame(lt layers.LinkType, frame []byte) ([]byte, error) {
	var ethertype uint16
	var ip []byte
	switch lt {
	case LinkEthernet:
		if len(frame) < 14 {
			return nil, fmt.Errorf("ethernet frame of %d bytes", len(frame))
		}
		ethertype, ip = binary.BigEndian.Uint16(frame[12:]), frame[14:]
		// Up to two VLAN tags (802.1ad outer, 802.1Q inner).
		for i := 0; i < 2 && (ethertype == 0x8100 || ethertype == 0x88a8); i++ {
			if len(ip) < 4 {
				return nil, fmt.Errorf("truncated VLAN tag")
			}
			ethertype, ip = binary.BigEndian.Uint16(ip[2:]), ip[4:]
		}
	case LinkSLL:
		if len(frame) < 16 {
			return nil, fmt.Errorf("linux cooked (SLL) frame of %d bytes", len(frame))
		}
		ethertype, ip = binary.BigEndian.Uint16(frame[14:]), frame[16:]
	case LinkSLL2:
		if len(frame) < 20 {
			return nil, fmt.Errorf("linux cooked v2 (SLL2) frame of %d bytes", len(frame))
		}
		ethertype, ip = binary.BigEndian.Uint16(frame[0:]), frame[20:]
	case LinkRaw, LinkIPv4, LinkIPv6:
		ip = frame
		if len(ip) == 0 {
			return nil, ErrNotIP
		}
		switch ip[0] >> 4 {
		case 4:
			ethertype = 0x0800
		case 6:
			ethertype = 0x86dd
		default:
			return nil, fmt.Errorf("raw frame with IP version %d", ip[0]>>4)
		}
	default:
		return nil, fmt.Errorf("link type %d (%s) is not supported: use Ethernet, Linux cooked (SLL, SLL2) or raw IP", int(lt), lt)
	}
	switch ethertype {
	case 0x0800:
		if len(ip) < 20 {
			return nil, fmt.Errorf("IPv4 packet of %d bytes", len(ip))
		}
		if tot := int(binary.BigEndian.Uint16(ip[2:])); tot >= 20 && tot < len(ip) {
			ip = ip[:tot]
		}
	case 0x86dd:
		if len(ip) < 40 {
			return nil, fmt.Errorf("IPv6 packet of %d bytes", len(ip))
		}
		if tot := 40 + int(binary.BigEndian.Uint16(ip[4:])); tot < len(ip) {
			ip = ip[:tot]
		}
	default:
		return nil, ErrNotIP
	}
	return ip, nil
}

// Writer writes IP packets to a raw-IP (LINKTYPE_RAW) pcap that tcpdump and
// Wireshark open directly.
type Writer struct {
	w *pcapgo.Writer
}

// NewWriter writes the pcap file header.
func NewWriter(w io.Writer) (*Writer, error) {
	pw := pcapgo.NewWriterNanos(w)
	if err := pw.WriteFileHeader(65535, LinkRaw); err != nil {
		return nil, fmt.Errorf("write pcap header: %w", err)
	}
	return &Writer{w: pw}, nil
}

// Write appends one IP packet.
func (w *Writer) Write(ts time.Time, ip []byte) error {
	return w.w.WritePacket(gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(ip), Length: len(ip)}, ip)
}
