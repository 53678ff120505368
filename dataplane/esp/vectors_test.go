package esp

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"testing"

	cksum "github.com/xesp/xesp/internal/pkt"
)

const vectorsFile = "testdata/published_vectors.json"

type vector struct {
	Name        string  `json:"name"`
	Enc         string  `json:"enc"`
	KeyBits     int     `json:"key_bits"`
	Auth        string  `json:"auth"`
	Keymat      string  `json:"keymat"`
	AuthKey     string  `json:"auth_key"`
	SPI         uint32  `json:"spi"`
	ESN         bool    `json:"esn"`
	Seq         uint32  `json:"seq"`
	SeqHi       *uint32 `json:"seq_hi"`
	IV          string  `json:"iv"`
	ESPPacket   string  `json:"esp_packet"`
	Plaintext   string  `json:"esp_plaintext"`
	PayloadData string  `json:"payload_data"`
	PadLen      int     `json:"pad_len"`
	NextHeader  uint8   `json:"next_header"`
	Mode        string  `json:"mode"`
	DefaultPad  bool    `json:"padding_is_rfc4303_default"`
	UDP4500     *string `json:"packet_udp4500"`
	IPESP       *string `json:"packet_ip_esp"`
}

func loadVectors(tb testing.TB) []vector {
	tb.Helper()
	raw, err := os.ReadFile(vectorsFile)
	if err != nil {
		tb.Fatalf("read vectors: %v", err)
	}
	var doc struct {
		Format  string   `json:"format"`
		Vectors []vector `json:"vectors"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		tb.Fatalf("parse %s: %v", vectorsFile, err)
	}
	if doc.Format != "esp-published-vectors/1" {
		tb.Fatalf("vectors format %q, want esp-published-vectors/1", doc.Format)
	}
	return doc.Vectors
}

func unhex(tb testing.TB, s string) []byte {
	tb.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		tb.Fatalf("hex %q: %v", s, err)
	}
	return b
}

func (v vector) proposal() (Proposal, error) {
	if v.Auth != "null" {
		return 0, fmt.Errorf("auth %q not in the vector set we know", v.Auth)
	}
	switch v.Enc {
	case "aes-gcm-16":
		return ParseProposal(fmt.Sprintf("aes%dgcm16", v.KeyBits))
	case "chacha20-poly1305":
		return ChaCha20Poly1305, nil
	case "aes-cbc":
		return ParseProposal(fmt.Sprintf("aes%d", v.KeyBits))
	}
	return 0, fmt.Errorf("enc %q unknown", v.Enc)
}

func (v vector) fullSeq() uint64 {
	if v.ESN && v.SeqHi != nil {
		return uint64(*v.SeqHi)<<32 | uint64(v.Seq)
	}
	return uint64(v.Seq)
}

// sa builds the receiving SA with its window placed just below the vector's
// sequence number, so the ESN inference yields the published high half.
func (v vector) sa(tb testing.TB) *Transform {
	tb.Helper()
	p, err := v.proposal()
	if err != nil {
		tb.Fatal(err)
	}
	mode := ModeTransport
	if v.Mode == "tunnel" || (v.Mode == "" && (v.NextHeader == 4 || v.NextHeader == 41)) {
		mode = ModeTunnel
	}
	sa, err := NewTransform(Config{Name: v.Name, SPI: v.SPI, Proposal: p, EncKey: unhex(tb, v.Keymat),
		AuthKey: unhex(tb, v.AuthKey), ESN: v.ESN, ReplayWindow: DefaultReplayWindow, Mode: mode})
	if err != nil {
		tb.Fatal(err)
	}
	if s := v.fullSeq(); s > 1 && sa.Replay().Size() > 0 {
		if err := sa.Replay().Import(ReplayState{Top: s - 1, Bitmap: make([]uint64, DefaultReplayWindow/64)}); err != nil {
			tb.Fatal(err)
		}
	}
	if s := v.fullSeq(); s > 1 && sa.Replay().Size() == 0 && v.ESN {
		tb.Fatalf("%s: ESN vector on an SA without a window cannot place its high half", v.Name)
	}
	return sa
}

func TestVectorsDrift(t *testing.T) {
	shared := "../../../shared/vectors/published_vectors.json"
	want, err := os.ReadFile(shared)
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("%s not present: nothing to compare the copy with", shared)
	}
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s differs from %s: copy it again and rerun", vectorsFile, shared)
	}
}

func TestVectors(t *testing.T) {
	vs := loadVectors(t)
	if len(vs) != 21 {
		t.Fatalf("%d vectors, want 21", len(vs))
	}
	for _, v := range vs {
		t.Run(v.Name, func(t *testing.T) {
			pkt := unhex(t, v.ESPPacket)
			plain := unhex(t, v.Plaintext)
			payload := unhex(t, v.PayloadData)
			sa := v.sa(t)
			hdr := sa.Headroom()

			// Open.
			work := bytes.Clone(pkt)
			res, err := sa.Open(work)
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			if res.Seq != v.fullSeq() {
				t.Errorf("seq %#x, want %#x", res.Seq, v.fullSeq())
			}
			if got := work[hdr : len(work)-int(sa.icv)]; !bytes.Equal(got, plain) {
				t.Errorf("plaintext\n got %x\nwant %x", got, plain)
			}
			if got := work[res.Start:res.End]; !bytes.Equal(got, payload) {
				t.Errorf("payload\n got %x\nwant %x", got, payload)
			}
			if res.NextHeader != v.NextHeader || int(res.PadLen) != v.PadLen {
				t.Errorf("nh %d pad %d, want %d %d", res.NextHeader, res.PadLen, v.NextHeader, v.PadLen)
			}
			// The same packet again is a replay (for SAs with a window).
			if sa.Replay().Size() > 0 {
				if _, err := sa.Open(bytes.Clone(pkt)); err != ErrReplay {
					t.Errorf("second open: %v, want replay", err)
				}
			}

			// Re-encrypt with the published IV: byte for byte.
			if !v.DefaultPad || sa.padLen(len(payload)) != v.PadLen {
				t.Fatalf("vector padding (%d) is not the minimal RFC 4303 padding (%d)", v.PadLen, sa.padLen(len(payload)))
			}
			buf := make([]byte, hdr+len(payload)+sa.Tailroom(len(payload), 0))
			copy(buf[hdr:], payload)
			start, end, err := sa.seal(buf, hdr, len(payload), v.NextHeader, 0, v.fullSeq(), unhex(t, v.IV))
			if err != nil {
				t.Fatalf("seal: %v", err)
			}
			if got := buf[start:end]; !bytes.Equal(got, pkt) {
				t.Errorf("re-encryption\n got %x\nwant %x", got, pkt)
			}

			// The outer wrappers parse and open through OpenPacket.
			for _, w := range []struct {
				name  string
				pkt   *string
				class Class
			}{{"packet_udp4500", v.UDP4500, ClassESPInUDP}, {"packet_ip_esp", v.IPESP, ClassESP}} {
				if w.pkt == nil {
					continue
				}
				whole := unhex(t, *w.pkt)
				sa := v.sa(t)
				p, err := OpenPacket(whole, func(spi uint32) *Transform {
					if spi == sa.SPI() {
						return sa
					}
					return nil
				})
				if err != nil {
					t.Fatalf("%s: %v", w.name, err)
				}
				if p.Class != w.class || p.SPI != v.SPI || p.Seq != v.fullSeq() {
					t.Errorf("%s: class %v spi %#x seq %#x", w.name, p.Class, p.SPI, p.Seq)
				}
				if !bytes.Equal(p.Payload, payload) {
					t.Errorf("%s: payload\n got %x\nwant %x", w.name, p.Payload, payload)
				}
				checkDelivered(t, sa.Mode(), p, payload)
			}
		})
	}
}

// checkDelivered asserts on the packet OpenPacket hands on: the inner packet
// in tunnel mode, a consistent rebuilt IPv4 packet in transport mode.
func checkDelivered(t *testing.T, mode Mode, p Packet, payload []byte) {
	t.Helper()
	if mode == ModeTunnel {
		if !bytes.Equal(p.IP, payload) {
			t.Errorf("tunnel IP != payload")
		}
		return
	}
	ip := p.IP
	hl := p.IPHeaderLen
	if len(ip) != hl+len(payload) || !bytes.Equal(ip[hl:], payload) {
		t.Fatalf("rebuilt packet %x does not end in the payload", ip)
	}
	if ip[0]>>4 == 4 {
		if int(binary.BigEndian.Uint16(ip[2:])) != len(ip) || ip[9] != p.NextHeader || cksum.Checksum(ip[:hl]) != 0 {
			t.Errorf("rebuilt IPv4 header wrong: %x", ip[:hl])
		}
	} else if int(binary.BigEndian.Uint16(ip[4:])) != len(ip)-40 {
		t.Errorf("rebuilt IPv6 payload length wrong: %x", ip[:hl])
	}
}
