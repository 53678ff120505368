package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/capture"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
)

// -update-decrypt makes TestDecryptRealCapture store its tcpdump captures in
// testdata/ and TestDecryptGolden rewrite the expected outputs.
var update = flag.Bool("update-decrypt", false, "rewrite testdata/ from a real capture (root) and the golden outputs")

// --- capture building -------------------------------------------------------

// linkCase is one capture encoding the tests write.
type linkCase struct {
	name   string
	lt     layers.LinkType
	pcapng bool
}

var linkCases = []linkCase{
	{"ethernet", capture.LinkEthernet, false},
	{"sll", capture.LinkSLL, false},
	{"sll2", capture.LinkSLL2, false},
	{"raw101", capture.LinkRaw, false},
	{"raw228", capture.LinkIPv4, false},
	{"pcapng-ethernet", capture.LinkEthernet, true},
	{"pcapng-sll2", capture.LinkSLL2, true},
}

// testFrame is one frame to write: an IP packet, or a non-IP frame (ARP)
// when ethertype says so.
type testFrame struct {
	ts        time.Time
	ethertype uint16
	payload   []byte
}

// linkFrame wraps payload in lt's link header.
func linkFrame(lt layers.LinkType, ethertype uint16, payload []byte) []byte {
	var h []byte
	switch lt {
	case capture.LinkEthernet:
		h = make([]byte, 14)
		copy(h, []byte{0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2})
		binary.BigEndian.PutUint16(h[12:], ethertype)
	case capture.LinkSLL:
		h = make([]byte, 16)
		binary.BigEndian.PutUint16(h[2:], 1) // ARPHRD_ETHER
		binary.BigEndian.PutUint16(h[4:], 6)
		binary.BigEndian.PutUint16(h[14:], ethertype)
	case capture.LinkSLL2:
		h = make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], ethertype)
		binary.BigEndian.PutUint32(h[4:], 7) // ifindex
		binary.BigEndian.PutUint16(h[8:], 1) // ARPHRD_ETHER
		h[11] = 6
	}
	return append(h, payload...)
}

func writeCapture(t *testing.T, path string, lc linkCase, frames []testFrame) {
	t.Helper()
	var buf bytes.Buffer
	var write func(ci gopacket.CaptureInfo, data []byte) error
	var flush func() error
	if lc.pcapng {
		w, err := pcapgo.NewNgWriter(&buf, lc.lt)
		if err != nil {
			t.Fatal(err)
		}
		write, flush = w.WritePacket, w.Flush
	} else {
		w := pcapgo.NewWriterNanos(&buf)
		if err := w.WriteFileHeader(65535, lc.lt); err != nil {
			t.Fatal(err)
		}
		write, flush = w.WritePacket, func() error { return nil }
	}
	for _, f := range frames {
		data := linkFrame(lc.lt, f.ethertype, f.payload)
		if err := write(gopacket.CaptureInfo{Timestamp: f.ts, CaptureLength: len(data), Length: len(data)}, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := flush(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// ip4 builds an IPv4 packet (no options, valid header checksum).
func ip4(proto byte, src, dst [4]byte, payload []byte) []byte {
	p := make([]byte, 20, 20+len(payload))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(20+len(payload)))
	p[6] = 0x40
	p[8], p[9] = 64, proto
	copy(p[12:], src[:])
	copy(p[16:], dst[:])
	binary.BigEndian.PutUint16(p[10:], pkt.Checksum(p))
	return append(p, payload...)
}

// udp4 builds IPv4+UDP with checksum 0 (allowed over IPv4).
func udp4(src, dst [4]byte, sport, dport uint16, payload []byte) []byte {
	u := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:], sport)
	binary.BigEndian.PutUint16(u[2:], dport)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	return ip4(17, src, dst, append(u, payload...))
}

func arpFrame() []byte {
	a := make([]byte, 28)
	copy(a, []byte{0, 1, 8, 0, 6, 4, 0, 1})
	return a
}

// --- running the command ----------------------------------------------------

type runResult struct {
	stdout, stderr string
	err            error
}

func runDecryptTest(args ...string) runResult {
	var o, e bytes.Buffer
	err := runDecrypt(args, &o, &e)
	return runResult{o.String(), e.String(), err}
}

// jsonRecord decodes --json lines strictly: an unknown or renamed field
// fails the test, so the format cannot drift unnoticed.
type jsonRecord struct {
	Index      int     `json:"index"`
	Time       string  `json:"time"`
	Src        string  `json:"src"`
	Dst        string  `json:"dst"`
	SrcPort    uint16  `json:"sport"`
	DstPort    uint16  `json:"dport"`
	Class      string  `json:"class"`
	SPI        *string `json:"spi"`
	Seq        *uint64 `json:"seq"`
	Verdict    string  `json:"verdict"`
	Reason     string  `json:"reason"`
	SA         string  `json:"sa"`
	Mode       string  `json:"mode"`
	NextHeader *uint8  `json:"next_header"`
	Payload    string  `json:"payload"`
	Inner      string  `json:"inner"`
}

func parseJSONLines(t *testing.T, out string) []jsonRecord {
	t.Helper()
	var recs []jsonRecord
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if line == "" {
			continue
		}
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		var r jsonRecord
		if err := dec.Decode(&r); err != nil {
			t.Fatalf("json line %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

// readOut returns the packets and timestamps of an --out pcap.
func readOut(t *testing.T, path string) ([][]byte, []time.Time) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := capture.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != capture.LinkRaw {
		t.Fatalf("--out link type %v, want raw IP", r.LinkType())
	}
	var pkts [][]byte
	var ts []time.Time
	for {
		p, err := r.Next()
		if errors.Is(err, io.EOF) {
			return pkts, ts
		}
		if err != nil {
			t.Fatal(err)
		}
		pkts = append(pkts, bytes.Clone(p.IP))
		ts = append(ts, p.Time)
	}
}

// expect is what one printed line must say.
type expect struct {
	frame   int // 1-based
	spi     string
	seq     *uint64
	verdict string
	reason  string
	payload []byte // accepted/dummy: the Payload Data
	inner   []byte // accepted: the delivered IP packet
	src     string
	dst     string
	sport   uint16
	dport   uint16
	ts      time.Time
}

func u64(v uint64) *uint64 { return &v }

// checkJSON compares every field of every record.
func checkJSON(t *testing.T, got []jsonRecord, want []expect) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d records, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		g := got[i]
		where := fmt.Sprintf("record %d (frame %d)", i, w.frame)
		if g.Index != w.frame || g.Verdict != w.verdict || g.Reason != w.reason {
			t.Errorf("%s: index %d verdict %q reason %q, want %d %q %q", where, g.Index, g.Verdict, g.Reason, w.frame, w.verdict, w.reason)
		}
		if (g.SPI == nil) != (w.spi == "") || g.SPI != nil && *g.SPI != w.spi {
			t.Errorf("%s: spi %v, want %q", where, g.SPI, w.spi)
		}
		if (g.Seq == nil) != (w.seq == nil) || g.Seq != nil && *g.Seq != *w.seq {
			t.Errorf("%s: seq %v, want %v", where, g.Seq, w.seq)
		}
		if g.Src != w.src || g.Dst != w.dst || g.SrcPort != w.sport || g.DstPort != w.dport {
			t.Errorf("%s: %s:%d > %s:%d, want %s:%d > %s:%d", where, g.Src, g.SrcPort, g.Dst, g.DstPort, w.src, w.sport, w.dst, w.dport)
		}
		if want := w.ts.UTC().Format(time.RFC3339Nano); g.Time != want {
			t.Errorf("%s: time %s, want %s", where, g.Time, want)
		}
		if g.Payload != hex.EncodeToString(w.payload) {
			t.Errorf("%s: payload\n got %s\nwant %x", where, g.Payload, w.payload)
		}
		if g.Inner != hex.EncodeToString(w.inner) {
			t.Errorf("%s: inner\n got %s\nwant %x", where, g.Inner, w.inner)
		}
	}
}

// checkText compares the fixed columns of every text line and, for accepted
// packets, the summary with the one derived from the inner packet.
func checkText(t *testing.T, out string, want []expect) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), out)
	}
	for i, w := range want {
		f := strings.Fields(lines[i])
		spi, seq, reason := "-", "-", "-"
		if w.spi != "" {
			spi = w.spi
		}
		if w.seq != nil {
			seq = fmt.Sprint(*w.seq)
		}
		if w.reason != "" {
			reason = w.reason
		}
		head := []string{fmt.Sprint(w.frame), spi, seq, w.verdict, reason}
		if len(f) < 6 || strings.Join(f[:5], " ") != strings.Join(head, " ") {
			t.Errorf("line %d: %q, want it to start with %q", i, lines[i], strings.Join(head, " "))
			continue
		}
		summary := strings.Join(f[5:], " ")
		if w.verdict == "accept" {
			if want := strings.Join(strings.Fields(summarizeIP(w.inner)), " "); summary != want {
				t.Errorf("line %d: summary %q, want %q", i, summary, want)
			}
		} else if !strings.HasPrefix(summary, "outer ") && w.verdict != "dummy" {
			t.Errorf("line %d: summary %q, want the outer addresses", i, summary)
		}
	}
}

// --- published vectors ------------------------------------------------------

type pubVector struct {
	Name        string  `json:"name"`
	Enc         string  `json:"enc"`
	KeyBits     int     `json:"key_bits"`
	Auth        string  `json:"auth"`
	Keymat      string  `json:"keymat"`
	SPI         uint32  `json:"spi"`
	ESN         bool    `json:"esn"`
	Seq         uint32  `json:"seq"`
	SeqHi       *uint32 `json:"seq_hi"`
	ESPPacket   string  `json:"esp_packet"`
	PayloadData string  `json:"payload_data"`
	NextHeader  uint8   `json:"next_header"`
	Mode        string  `json:"mode"`
	UDP4500     *string `json:"packet_udp4500"`
	IPESP       *string `json:"packet_ip_esp"`
}

func loadPubVectors(t *testing.T) []pubVector {
	t.Helper()
	raw, err := os.ReadFile("../../dataplane/esp/testdata/published_vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Vectors []pubVector `json:"vectors"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc.Vectors
}

func (v pubVector) proposal(t *testing.T) string {
	switch {
	case v.Auth != "null":
	case v.Enc == "aes-gcm-16":
		return fmt.Sprintf("aes%dgcm16", v.KeyBits)
	case v.Enc == "chacha20-poly1305":
		return "chacha20poly1305"
	case v.Enc == "aes-cbc":
		return fmt.Sprintf("aes%d", v.KeyBits)
	}
	t.Fatalf("%s: enc %q auth %q not mapped", v.Name, v.Enc, v.Auth)
	return ""
}

func (v pubVector) tunnel() bool {
	return v.Mode == "tunnel" || v.Mode == "" && (v.NextHeader == 4 || v.NextHeader == 41)
}

func (v pubVector) fullSeq() uint64 {
	if v.ESN && v.SeqHi != nil {
		return uint64(*v.SeqHi)<<32 | uint64(v.Seq)
	}
	return uint64(v.Seq)
}

func (v pubVector) integrity() bool { return v.Enc != "aes-cbc" }

// saSpec is the vector's inbound SA in the SA format.
func (v pubVector) saSpec(t *testing.T, name string) map[string]any {
	m := map[string]any{
		"name": name, "spi": v.SPI, "direction": "in", "proposal": v.proposal(t),
		"enc_key": v.Keymat, "esn": v.ESN, "local": "198.51.100.1", "peer": "192.0.2.101",
		"encap": map[string]any{},
	}
	if v.tunnel() {
		m["mode"] = "tunnel"
		m["inner"] = map[string]any{"local": "0.0.0.0/0", "peer": "0.0.0.0/0"}
	} else {
		m["mode"] = "transport"
	}
	return m
}

// writeSAFile writes specs as YAML or JSON (JSON is valid YAML, so one
// encoder serves both extensions while each parser is still exercised).
func writeSAFile(t *testing.T, path string, specs ...map[string]any) {
	t.Helper()
	b, err := json.MarshalIndent(map[string]any{"sas": specs}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

var (
	vecSrc = [4]byte{192, 0, 2, 101}
	vecDst = [4]byte{198, 51, 100, 1}
)

// vectorScenario is the capture built around one vector and what decrypt
// must say about each frame.
type vectorScenario struct {
	frames []testFrame
	want   []expect
	args   []string // extra flags
}

func buildVectorScenario(t *testing.T, i int, v pubVector, lc linkCase) vectorScenario {
	espPkt, _ := hex.DecodeString(v.ESPPacket)
	payload, _ := hex.DecodeString(v.PayloadData)
	base := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Hour)
	var s vectorScenario
	frame := 0
	add := func(ethertype uint16, p []byte, e *expect) {
		ts := base.Add(time.Duration(frame)*time.Millisecond + time.Duration(frame*7)*time.Nanosecond)
		if lc.pcapng {
			ts = ts.Truncate(time.Microsecond) // pcapgo's ng writer keeps microseconds
		}
		frame++
		s.frames = append(s.frames, testFrame{ts: ts, ethertype: ethertype, payload: p})
		if e != nil {
			e.frame, e.ts = frame, ts
			s.want = append(s.want, *e)
		}
	}
	spiHex := fmt.Sprintf("0x%08x", v.SPI)

	// Even vectors travel in the published UDP 4500 wrapper, odd ones in
	// plain ESP (IP protocol 50) built here, so both outer classes are run.
	plain := i%2 == 1
	outerHdr := ip4(50, vecSrc, vecDst, nil)
	var sport, dport uint16
	if !plain {
		whole, _ := hex.DecodeString(*v.UDP4500)
		hl := int(whole[0]&0x0f) * 4
		if hl != 20 || !bytes.Equal(whole[hl+8:], espPkt) {
			t.Fatalf("%s: packet_udp4500 is not IPv4/UDP around esp_packet", v.Name)
		}
		outerHdr = whole[:28]
		sport, dport = 4500, 4500
	}
	wrap := func(esp []byte) []byte {
		if plain {
			return ip4(50, vecSrc, vecDst, esp)
		}
		return append(bytes.Clone(outerHdr), esp...)
	}
	src := fmt.Sprintf("%d.%d.%d.%d", outerHdr[12], outerHdr[13], outerHdr[14], outerHdr[15])
	dst := fmt.Sprintf("%d.%d.%d.%d", outerHdr[16], outerHdr[17], outerHdr[18], outerHdr[19])

	if lc.lt != capture.LinkRaw && lc.lt != capture.LinkIPv4 {
		add(0x0806, arpFrame(), nil)
	}
	add(0x0800, udp4(vecSrc, vecDst, 5353, 53, []byte("not esp")), nil)
	add(0x0800, udp4(vecSrc, vecDst, 4500, 4500, []byte{0xff}), &expect{verdict: "keepalive", src: "192.0.2.101", dst: "198.51.100.1", sport: 4500, dport: 4500})
	add(0x0800, udp4(vecSrc, vecDst, 4500, 4500, append(make([]byte, 4), bytes.Repeat([]byte{0x21}, 28)...)), &expect{verdict: "ike", src: "192.0.2.101", dst: "198.51.100.1", sport: 4500, dport: 4500})

	inner := func(p []byte) []byte {
		if v.tunnel() {
			return p
		}
		// Transport mode delivers the outer IPv4 header (its ID, flags and
		// TTL kept) with length, protocol and checksum rewritten, in front
		// of the payload.
		h := bytes.Clone(outerHdr[:20])
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(p)))
		h[9], h[10], h[11] = v.NextHeader, 0, 0
		binary.BigEndian.PutUint16(h[10:], pkt.Checksum(h))
		return append(h, p...)
	}
	accepted := func(p []byte) *expect {
		return &expect{spi: spiHex, seq: u64(v.fullSeq()), verdict: "accept", payload: p, inner: inner(p), src: src, dst: dst, sport: sport, dport: dport}
	}
	if v.integrity() {
		bad := bytes.Clone(espPkt)
		bad[len(bad)-1] ^= 0x80
		add(0x0800, wrap(bad), &expect{spi: spiHex, seq: u64(v.fullSeq()), verdict: "drop", reason: "integ_error", src: src, dst: dst, sport: sport, dport: dport})
	} else {
		// Without integrity a forgery goes unnoticed: flipping a bit of
		// the CBC IV flips the same bit of the first plaintext byte.
		bad := bytes.Clone(espPkt)
		bad[8] ^= 0x01
		forged := bytes.Clone(payload)
		forged[0] ^= 0x01
		add(0x0800, wrap(bad), accepted(forged))
	}
	add(0x0800, wrap(espPkt), accepted(payload))
	if v.integrity() {
		add(0x0800, wrap(espPkt), &expect{spi: spiHex, seq: u64(v.fullSeq()), verdict: "drop", reason: "replay", src: src, dst: dst, sport: sport, dport: dport})
	} else {
		add(0x0800, wrap(espPkt), accepted(payload)) // anti-replay needs integrity (RFC 4303 3.4.3)
	}
	other := bytes.Clone(espPkt)
	binary.BigEndian.PutUint32(other, v.SPI^0x5a5a0000)
	add(0x0800, wrap(other), &expect{spi: fmt.Sprintf("0x%08x", v.SPI^0x5a5a0000), seq: u64(uint64(v.Seq)), verdict: "drop", reason: "no_sa", src: src, dst: dst, sport: sport, dport: dport})

	if v.ESN && v.fullSeq()>>32 != 0 {
		s.args = []string{"--window-top", fmt.Sprintf("0x%x=%d", v.SPI, v.fullSeq()-1)}
	}
	return s
}

func TestDecryptPublishedVectors(t *testing.T) {
	vs := loadPubVectors(t)
	ran := 0
	for i, v := range vs {
		if v.SPI == 0 {
			// The SA format refuses SPI 0 (reserved, RFC 4303 2.1; in UDP it
			// is the non-ESP marker), so no SA file can name this vector's
			// SA; the engine's own vector test opens it.
			continue
		}
		ran++
		lc := linkCases[i%len(linkCases)]
		t.Run(fmt.Sprintf("%02d-%s", i+1, lc.name), func(t *testing.T) {
			dir := t.TempDir()
			s := buildVectorScenario(t, i, v, lc)
			capPath := filepath.Join(dir, "in.pcap")
			writeCapture(t, capPath, lc, s.frames)
			saPath := filepath.Join(dir, []string{"sa.yaml", "sa.json"}[i%2])
			writeSAFile(t, saPath, v.saSpec(t, fmt.Sprintf("v%d", i+1)))
			outPath := filepath.Join(dir, "inner.pcap")

			r := runDecryptTest(append([]string{"--sa", saPath, "--json", "--out", outPath, capPath}, s.args...)...)
			if r.err != nil {
				t.Fatalf("decrypt: %v\n%s", r.err, r.stderr)
			}
			recs := parseJSONLines(t, r.stdout)
			checkJSON(t, recs, s.want)
			for _, rec := range recs {
				if rec.Verdict == "accept" && (rec.SA != fmt.Sprintf("v%d", i+1) || *rec.NextHeader != v.NextHeader) {
					t.Errorf("frame %d: sa %q next header %v", rec.Index, rec.SA, *rec.NextHeader)
				}
			}

			var wantPkts [][]byte
			var wantTS []time.Time
			for _, w := range s.want {
				if w.verdict == "accept" {
					wantPkts, wantTS = append(wantPkts, w.inner), append(wantTS, w.ts)
				}
			}
			pkts, ts := readOut(t, outPath)
			if len(pkts) != len(wantPkts) {
				t.Fatalf("--out has %d packets, want %d", len(pkts), len(wantPkts))
			}
			for k := range pkts {
				if !bytes.Equal(pkts[k], wantPkts[k]) || !ts[k].Equal(wantTS[k]) {
					t.Errorf("--out packet %d at %v\n got %x\nwant %x at %v", k, ts[k], pkts[k], wantPkts[k], wantTS[k])
				}
			}

			nonIP := 0
			if lc.lt != capture.LinkRaw && lc.lt != capture.LinkIPv4 {
				nonIP = 1
			}
			accepts, drops := 1, "drop 3 (no_sa 1, integ_error 1, replay 1)"
			if !v.integrity() {
				accepts, drops = 3, "drop 1 (no_sa 1)"
			}
			wantSum := fmt.Sprintf("6 ESP/NAT-T packets: accept %d, %s, dummy 0, keepalive 1, ike 1, skipped 1 not ESP, %d not IP; 1 inbound SAs\n", accepts, drops, nonIP)
			if r.stderr != wantSum {
				t.Errorf("stderr %q\nwant %q", r.stderr, wantSum)
			}

			// The text form, from a fresh run: same judgement, same order.
			r = runDecryptTest(append([]string{capPath, "--sa", saPath}, s.args...)...)
			if r.err != nil {
				t.Fatalf("decrypt (text): %v", r.err)
			}
			checkText(t, r.stdout, s.want)
		})
	}
	if ran != 20 {
		t.Fatalf("ran %d vectors, want 20 of the 21 published", ran)
	}
}

// An ESN SA past 2^32 cannot be judged from a fresh window: the inferred
// high half is 0, the ICV then covers the wrong bits and fails. This is
// why --window-top exists.
func TestDecryptESNNeedsWindowTop(t *testing.T) {
	for _, v := range loadPubVectors(t) {
		if !v.ESN || v.fullSeq()>>32 == 0 || v.Seq == 0 {
			continue
		}
		dir := t.TempDir()
		espPkt, _ := hex.DecodeString(v.ESPPacket)
		capPath := filepath.Join(dir, "c.pcap")
		ts := time.Unix(1_700_000_000, 0)
		writeCapture(t, capPath, linkCases[3], []testFrame{{ts: ts, payload: udp4(vecSrc, vecDst, 4500, 4500, espPkt)}})
		saPath := filepath.Join(dir, "sa.yaml")
		writeSAFile(t, saPath, v.saSpec(t, "esn"))

		r := runDecryptTest("--sa", saPath, "--json", capPath)
		if r.err != nil {
			t.Fatal(r.err)
		}
		recs := parseJSONLines(t, r.stdout)
		if len(recs) != 1 || recs[0].Verdict != "drop" || recs[0].Reason != "integ_error" || *recs[0].Seq != uint64(v.Seq) {
			t.Fatalf("%s without --window-top: %+v, want integ_error at seq %d", v.Name, recs, v.Seq)
		}
		r = runDecryptTest("--sa", saPath, "--json", "--window-top", fmt.Sprintf("%d=%d", v.SPI, v.fullSeq()-100), capPath)
		recs = parseJSONLines(t, r.stdout)
		if r.err != nil || len(recs) != 1 || recs[0].Verdict != "accept" || *recs[0].Seq != v.fullSeq() {
			t.Fatalf("%s with --window-top: %v %+v", v.Name, r.err, recs)
		}
		return
	}
	t.Fatal("no ESN vector above 2^32 with a nonzero low half")
}

// --- engine-sealed traffic: several SAs, IPv6, transport, dummy ----------------

// sealer seals packets with the esp engine for an SA also written to the SA
// file, so the test is the same as a phone's traffic reaching a gateway.
type sealer struct {
	sa  *esp.Transform
	out esp.Outer
}

func newSealer(t *testing.T, c esp.Config, o esp.Outer) *sealer {
	t.Helper()
	s, err := esp.NewTransform(c)
	if err != nil {
		t.Fatal(err)
	}
	return &sealer{sa: s, out: o}
}

func (s *sealer) seal(t *testing.T, payload []byte, nh uint8) []byte {
	t.Helper()
	buf := make([]byte, esp.OuterLen(&s.out)+s.sa.Headroom()+len(payload)+s.sa.Tailroom(len(payload), 0))
	pkt, err := s.sa.SealPacket(buf, payload, nh, &s.out)
	if err != nil {
		t.Fatal(err)
	}
	return pkt
}

func udpInner4(src, dst [4]byte, sport, dport uint16, n int) []byte {
	return udp4(src, dst, sport, dport, bytes.Repeat([]byte{'s'}, n))
}

func tcpSeg(sport, dport uint16, flags byte, data []byte) []byte {
	h := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint32(h[4:], 1000)
	h[12], h[13] = 5<<4, flags
	binary.BigEndian.PutUint16(h[14:], 65535)
	return append(h, data...)
}

// l4sum is the TCP/UDP checksum of seg (checksum field included as is)
// under an IPv4 pseudo header; a correct segment sums to 0.
func l4sum(src, dst [4]byte, proto byte, seg []byte) uint16 {
	ph := append(append(append([]byte{}, src[:]...), dst[:]...), 0, proto, byte(len(seg)>>8), byte(len(seg)))
	return pkt.Checksum(append(ph, seg...))
}

func TestDecryptSealedTraffic(t *testing.T) {
	dir := t.TempDir()
	gcmKey := "000102030405060708090a0b0c0d0e0fcafebabe"
	cbcKey, authKey := "00112233445566778899aabbccddeeff", "0102030405060708090a0b0c0d0e0f1011121314"
	writeSAFile(t, filepath.Join(dir, "sa.yaml"),
		map[string]any{"name": "ue1-in", "spi": "0x00001001", "direction": "in", "mode": "tunnel", "proposal": "aes128gcm16",
			"enc_key": gcmKey, "local": "2001:db8::20", "peer": "2001:db8::10", "encap": map[string]any{},
			"inner": map[string]any{"local": "0.0.0.0/0", "peer": "0.0.0.0/0"}},
		map[string]any{"name": "ue2-in", "spi": 0x2002, "direction": "in", "mode": "transport", "proposal": "aes128-sha1",
			"enc_key": cbcKey, "auth_key": authKey, "local": "198.51.100.20", "peer": "192.0.2.10", "encap": map[string]any{}, "replay_window": 32},
		// An outbound SA: decrypt must not use it, so its SPI is unknown.
		map[string]any{"name": "ue1-out", "spi": 0x3003, "direction": "out", "mode": "tunnel", "proposal": "aes128gcm16",
			"enc_key": gcmKey, "local": "2001:db8::20", "peer": "2001:db8::10", "encap": map[string]any{},
			"inner": map[string]any{"local": "0.0.0.0/0", "peer": "0.0.0.0/0"}},
	)
	gk, _ := hex.DecodeString(gcmKey)
	ck, _ := hex.DecodeString(cbcKey)
	ak, _ := hex.DecodeString(authKey)
	o6 := esp.Outer{Src: netip.MustParseAddr("2001:db8::10"), Dst: netip.MustParseAddr("2001:db8::20"), Encap: true, SrcPort: 4500, DstPort: 4500}
	o4 := esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.20"), Encap: true, SrcPort: 61000, DstPort: 4500}
	ue1 := newSealer(t, esp.Config{SPI: 0x1001, Proposal: esp.AES128GCM16, EncKey: gk, ReplayWindow: 1024, Mode: esp.ModeTunnel}, o6)
	ue2 := newSealer(t, esp.Config{SPI: 0x2002, Proposal: esp.AES128SHA1, EncKey: ck, AuthKey: ak, ReplayWindow: 32, Mode: esp.ModeTransport}, o4)
	ue3 := newSealer(t, esp.Config{SPI: 0x3003, Proposal: esp.AES128GCM16, EncKey: gk, Mode: esp.ModeTunnel}, o6)

	ueA, core := [4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}
	sip := udpInner4(ueA, core, 5060, 5060, 412)
	syn := ip4(6, ueA, core, tcpSeg(40000, 5060, 0x02, nil))
	echo := ip4(1, ueA, core, append([]byte{8, 0, 0, 0, 0, 7, 0, 3}, make([]byte, 56)...))
	v6 := make([]byte, 40, 148)
	v6[0], v6[6], v6[7] = 0x60, 17, 64
	copy(v6[8:], netip.MustParseAddr("2001:db8:99::1").AsSlice())
	copy(v6[24:], netip.MustParseAddr("2001:db8::1").AsSlice())
	u := make([]byte, 108)
	binary.BigEndian.PutUint16(u[0:], 5060)
	binary.BigEndian.PutUint16(u[2:], 5060)
	binary.BigEndian.PutUint16(u[4:], 108)
	v6 = append(v6, u...)
	binary.BigEndian.PutUint16(v6[4:], 108)
	// The phone's TCP checksum covers its private address (10.0.0.5);
	// the gateway sees the NAT's, so transport mode must recompute it.
	seg := tcpSeg(40001, 5061, 0x18, []byte("INVIT"))
	binary.BigEndian.PutUint16(seg[16:], l4sum([4]byte{10, 0, 0, 5}, [4]byte{198, 51, 100, 20}, 6, seg))

	s1 := ue1.seal(t, sip, 4)  // 1
	s2 := ue1.seal(t, syn, 4)  // 2
	s3 := ue1.seal(t, echo, 4) // 3
	s4 := ue1.seal(t, v6, 41)  // 4
	s5 := ue1.seal(t, []byte{1, 2, 3, 4}, 59)
	t1 := ue2.seal(t, seg, 6)
	var t2 []byte
	for range 40 { // slide ue2's 32-packet window past t1
		t2 = ue2.seal(t, seg, 6)
	}
	x1 := ue3.seal(t, sip, 4)

	base := time.Date(2026, 3, 2, 9, 0, 0, 123456789, time.UTC)
	var frames []testFrame
	for i, p := range [][]byte{s2, t2, s1, s3, s2, x1, s4, s5, t1, t2} {
		et := uint16(0x0800)
		if p[0]>>4 == 6 {
			et = 0x86dd
		}
		frames = append(frames, testFrame{ts: base.Add(time.Duration(i) * time.Second), ethertype: et, payload: p})
	}
	capPath := filepath.Join(dir, "c.pcap")
	writeCapture(t, capPath, linkCases[0], frames)

	r := runDecryptTest("--sa", filepath.Join(dir, "sa.yaml"), capPath, "--out", filepath.Join(dir, "o.pcap"))
	if r.err != nil {
		t.Fatal(r.err)
	}
	want := `     1  0x00001001           2  accept     -            10.99.0.1:40000 > 10.0.0.1:5060 TCP [S] 0B
     2  0x00002002          41  accept     -            192.0.2.10:40001 > 198.51.100.20:5061 TCP [P.] 5B
     3  0x00001001           1  accept     -            10.99.0.1:5060 > 10.0.0.1:5060 UDP 412B
     4  0x00001001           3  accept     -            10.99.0.1 > 10.0.0.1 ICMP echo request id 7 seq 3, len 84
     5  0x00001001           2  drop       replay       outer [2001:db8::10]:4500 > [2001:db8::20]:4500
     6  0x00003003           1  drop       no_sa        outer [2001:db8::10]:4500 > [2001:db8::20]:4500
     7  0x00001001           4  accept     -            [2001:db8:99::1]:5060 > [2001:db8::1]:5060 IPv6 UDP 100B
     8  0x00001001           5  dummy      -            next header 59, 4B, outer [2001:db8::10]:4500 > [2001:db8::20]:4500
     9  0x00002002           1  drop       replay_old   outer 192.0.2.10:61000 > 198.51.100.20:4500
    10  0x00002002          41  drop       replay       outer 192.0.2.10:61000 > 198.51.100.20:4500
`
	if r.stdout != want {
		t.Errorf("stdout\n%s\nwant\n%s", r.stdout, want)
	}
	wantSum := "10 ESP/NAT-T packets: accept 5, drop 4 (no_sa 1, replay 2, replay_old 1), dummy 1, keepalive 0, ike 0, skipped 0 not ESP, 0 not IP; 2 inbound SAs (1 outbound ignored)\n"
	if r.stderr != wantSum {
		t.Errorf("stderr %q\nwant %q", r.stderr, wantSum)
	}

	pkts, _ := readOut(t, filepath.Join(dir, "o.pcap"))
	if len(pkts) != 5 {
		t.Fatalf("--out has %d packets, want 5", len(pkts))
	}
	for i, w := range [][]byte{syn, nil, sip, echo, v6} {
		if w != nil && !bytes.Equal(pkts[i], w) {
			t.Errorf("--out packet %d\n got %x\nwant %x", i, pkts[i], w)
		}
	}
	// The transport packet: the outer IPv4 header rebuilt around the
	// segment, whose checksum is now right for the addresses seen.
	tp := pkts[1]
	gotSeg := tp[20:]
	if tp[9] != 6 || int(binary.BigEndian.Uint16(tp[2:])) != len(tp) || pkt.Checksum(tp[:20]) != 0 ||
		!bytes.Equal(gotSeg[:16], seg[:16]) || !bytes.Equal(gotSeg[18:], seg[18:]) {
		t.Fatalf("transport packet %x", tp)
	}
	if l4sum([4]byte{192, 0, 2, 10}, [4]byte{198, 51, 100, 20}, 6, gotSeg) != 0 {
		t.Errorf("transport TCP checksum %x not fixed for the outer addresses", gotSeg[16:18])
	}

	// JSON of the dummy: payload is there, inner is not.
	r = runDecryptTest("--json", "--sa", filepath.Join(dir, "sa.yaml"), capPath)
	recs := parseJSONLines(t, r.stdout)
	if d := recs[7]; d.Verdict != "dummy" || d.Payload != "01020304" || d.Inner != "" || *d.NextHeader != 59 || d.Src != "2001:db8::10" {
		t.Errorf("dummy record %+v", d)
	}
}

// Another NAT-T port: unknown to the parser without --natt-port, judged
// like 4500 with it.
func TestDecryptNATTPort(t *testing.T) {
	dir := t.TempDir()
	key := "000102030405060708090a0b0c0d0e0fcafebabe"
	writeSAFile(t, filepath.Join(dir, "sa.json"), map[string]any{"spi": 0x4004, "direction": "in", "mode": "tunnel",
		"proposal": "aes128gcm16", "enc_key": key, "local": "198.51.100.20", "peer": "192.0.2.10",
		"encap": map[string]any{"local_port": 14500}, "inner": map[string]any{"local": "10.0.0.0/24", "peer": "10.99.0.1"}})
	k, _ := hex.DecodeString(key)
	ue := newSealer(t, esp.Config{SPI: 0x4004, Proposal: esp.AES128GCM16, EncKey: k, Mode: esp.ModeTunnel},
		esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.20"), Encap: true, SrcPort: 33000, DstPort: 14500})
	inner := udpInner4([4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}, 5060, 5060, 20)
	ts := time.Unix(1_772_000_000, 0)
	frames := []testFrame{
		{ts: ts, ethertype: 0x0800, payload: udp4([4]byte{192, 0, 2, 10}, [4]byte{198, 51, 100, 20}, 33000, 14500, []byte{0xff})},
		{ts: ts, ethertype: 0x0800, payload: ue.seal(t, inner, 4)},
	}
	capPath := filepath.Join(dir, "c.pcap")
	writeCapture(t, capPath, linkCases[1], frames)

	r := runDecryptTest("--sa", filepath.Join(dir, "sa.json"), capPath)
	if r.err != nil || r.stdout != "" || !strings.Contains(r.stderr, "skipped 2 not ESP") {
		t.Fatalf("without --natt-port: %v %q %q", r.err, r.stdout, r.stderr)
	}
	r = runDecryptTest("--sa", filepath.Join(dir, "sa.json"), "--natt-port", "14500", "--json", capPath)
	recs := parseJSONLines(t, r.stdout)
	if r.err != nil || len(recs) != 2 {
		t.Fatalf("with --natt-port: %v %+v", r.err, recs)
	}
	if recs[0].Verdict != "keepalive" || recs[1].Verdict != "accept" || recs[1].Inner != hex.EncodeToString(inner) ||
		recs[1].SrcPort != 33000 || recs[1].DstPort != 14500 {
		t.Errorf("records %+v", recs)
	}
}

// --- invocation and file errors ----------------------------------------------

func TestDecryptErrors(t *testing.T) {
	dir := t.TempDir()
	saPath := filepath.Join(dir, "sa.yaml")
	key := "000102030405060708090a0b0c0d0e0fcafebabe"
	spec := map[string]any{"name": "ue", "spi": 0x5005, "direction": "in", "mode": "tunnel", "proposal": "aes128gcm16",
		"enc_key": key, "local": "198.51.100.20", "peer": "192.0.2.10", "encap": map[string]any{},
		"inner": map[string]any{"local": "10.0.0.0/24", "peer": "10.99.0.1"}}
	writeSAFile(t, saPath, spec)
	k, _ := hex.DecodeString(key)
	ue := newSealer(t, esp.Config{SPI: 0x5005, Proposal: esp.AES128GCM16, EncKey: k, Mode: esp.ModeTunnel},
		esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.20"), Encap: true, SrcPort: 4500, DstPort: 4500})
	inner := udpInner4([4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}, 5060, 5060, 30)
	var frames []testFrame
	for i := range 3 {
		frames = append(frames, testFrame{ts: time.Unix(1_772_000_000+int64(i), 0), ethertype: 0x0800, payload: ue.seal(t, inner, 4)})
	}
	capPath := filepath.Join(dir, "c.pcap")
	writeCapture(t, capPath, linkCases[0], frames)

	onlyOut := filepath.Join(dir, "out.yaml")
	o := map[string]any{}
	for k, v := range spec {
		o[k] = v
	}
	o["direction"] = "out"
	writeSAFile(t, onlyOut, o)
	badKey := filepath.Join(dir, "bad.json")
	b := map[string]any{}
	for k, v := range spec {
		b[k] = v
	}
	b["enc_key"] = key[:32]
	writeSAFile(t, badKey, b)
	notCap := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notCap, []byte("this is not a capture file"), 0o644); err != nil {
		t.Fatal(err)
	}

	usage := []struct {
		name string
		args []string
		want string
	}{
		{"no sa", []string{capPath}, "--sa FILE is required"},
		{"no capture", []string{"--sa", saPath}, "exactly one capture file, got 0"},
		{"two captures", []string{"--sa", saPath, capPath, capPath}, "exactly one capture file, got 2"},
		{"bad flag", []string{"--sa", saPath, "--bogus", capPath}, "bogus"},
		{"natt port 0", []string{"--sa", saPath, "--natt-port", "0", capPath}, "--natt-port 0"},
		{"window-top syntax", []string{"--sa", saPath, "--window-top", "5005", capPath}, "want SPI=SEQ"},
		{"window-top unknown spi", []string{"--sa", saPath, "--window-top", "0x6006=5", capPath}, "no inbound SA with SPI 0x00006006"},
		{"window-top beyond 32 bits", []string{"--sa", saPath, "--window-top", "0x5005=0x100000000", capPath}, "exceeds 32 bits"},
	}
	for _, c := range usage {
		r := runDecryptTest(c.args...)
		if !errors.Is(r.err, errUsage) || !strings.Contains(r.err.Error(), c.want) {
			t.Errorf("%s: err %v, want a usage error containing %q", c.name, r.err, c.want)
		}
		if r.stdout != "" {
			t.Errorf("%s: printed %q", c.name, r.stdout)
		}
	}
	if r := runDecryptTest("-h"); !errors.Is(r.err, flag.ErrHelp) || !strings.Contains(r.stderr, "FRAME is the frame number counted from 1") {
		t.Errorf("-h: %v, help %q", r.err, r.stderr)
	}

	files := []struct {
		name string
		args []string
		want []string
	}{
		{"missing capture", []string{"--sa", saPath, filepath.Join(dir, "nope.pcap")}, []string{"nope.pcap"}},
		{"not a capture", []string{"--sa", saPath, notCap}, []string{notCap, "pcap header"}},
		{"missing sa file", []string{"--sa", filepath.Join(dir, "nope.yaml"), capPath}, []string{"nope.yaml"}},
		{"only outbound", []string{"--sa", onlyOut, capPath}, []string{onlyOut, `no SA with direction "in"`}},
		{"bad key", []string{"--sa", badKey, capPath}, []string{badKey, "enc_key", "needs 20 bytes"}},
	}
	for _, c := range files {
		r := runDecryptTest(c.args...)
		if r.err == nil || errors.Is(r.err, errUsage) {
			t.Errorf("%s: err %v, want a file error", c.name, r.err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(r.err.Error(), w) {
				t.Errorf("%s: %q does not name %q", c.name, r.err, w)
			}
		}
	}

	// A capture cut short inside its last frame (tcpdump killed): what
	// came before is printed and written, then the error names the frame.
	raw, err := os.ReadFile(capPath)
	if err != nil {
		t.Fatal(err)
	}
	cut := filepath.Join(dir, "cut.pcap")
	if err := os.WriteFile(cut, raw[:len(raw)-10], 0o644); err != nil {
		t.Fatal(err)
	}
	outPath := filepath.Join(dir, "cut-out.pcap")
	r := runDecryptTest("--sa", saPath, "--out", outPath, cut)
	if r.err == nil || errors.Is(r.err, errUsage) || !strings.Contains(r.err.Error(), cut+": frame 2") {
		t.Errorf("cut capture: %v, want an error naming %s and frame 2 (0-based position from the reader)", r.err, cut)
	}
	if n := strings.Count(r.stdout, " accept "); n != 2 {
		t.Errorf("cut capture: %d accepted lines before the error, want 2:\n%s", n, r.stdout)
	}
	if pkts, _ := readOut(t, outPath); len(pkts) != 2 || !bytes.Equal(pkts[1], inner) {
		t.Errorf("cut capture: --out has %d packets, want the 2 before the cut", len(pkts))
	}
}

// --- a real capture ---------------------------------------------------------------

// startTcpdump runs tcpdump inside ns writing to path and returns once it
// reports that it is listening; stop sends SIGINT and waits, so the file is
// complete.
func startTcpdump(t *testing.T, ns *netns.NS, iface, path string) (stop func()) {
	t.Helper()
	// -Z root: Debian's tcpdump otherwise drops to user tcpdump, which
	// cannot write into the test's private temporary directory.
	// --immediate-mode: with TPACKET_V3 libpcap otherwise hands packets
	// over in blocks retired by a 1 s timeout, and a SIGINT before that
	// loses them ("2 packets received by filter", 0 captured). -U flushes
	// the file per packet so the test can watch it fill.
	cmd := ns.Command("tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-Z", "root", "-w", path, "udp port 4500")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start tcpdump: %v", err)
	}
	var log bytes.Buffer
	listening := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
			if !once && strings.Contains(sc.Text(), "listening on") {
				once = true
				close(listening)
			}
		}
	}()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGINT)
		<-done
		_ = cmd.Wait()
	}
	t.Cleanup(stop)
	select {
	case <-listening:
	case <-done:
		t.Fatalf("tcpdump -i %s exited: %s", iface, log.String())
	case <-time.After(20 * time.Second):
		t.Fatalf("tcpdump -i %s not listening after 20s: %s", iface, log.String())
	}
	return stop
}

// waitFrames waits until tcpdump has written n frames to path.
func waitFrames(t *testing.T, path string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	got := 0
	for time.Now().Before(deadline) {
		got = countFrames(path)
		if got >= n {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: %d frames after 20s, want %d", path, got, n)
}

func countFrames(path string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	r, err := capture.NewReader(f)
	if err != nil {
		return 0
	}
	n := 0
	for {
		if _, err := r.Next(); err != nil {
			return n // EOF, or a record still being written
		}
		n++
	}
}

func TestDecryptRealCapture(t *testing.T) {
	if _, err := exec.LookPath("tcpdump"); err != nil {
		if testing.Short() {
			t.Skip("tcpdump not installed")
		}
		t.Fatal("tcpdump not installed (make deps installs it)")
	}
	ue := netns.ForTest(t, "xdcu")
	gw := netns.ForTest(t, "xdcg")
	va, vb := netns.VethForTest(t, ue, gw)
	ue.MustRun("ip", "addr", "add", "192.168.77.1/24", "dev", va)
	gw.MustRun("ip", "addr", "add", "192.168.77.2/24", "dev", vb)

	dir := t.TempDir()
	key := "4142434445464748494a4b4c4d4e4f50deadbeef"
	saPath := filepath.Join(dir, "sa.yaml")
	yamlSA := `sas:
  - name: phone-in
    spi: 0x0000c001
    direction: in
    mode: tunnel
    proposal: aes128gcm16
    enc_key: ` + key + `
    local: 192.168.77.2
    peer: 192.168.77.1
    encap: {}
    inner:
      local: 10.0.0.0/24
      peer: 10.99.0.1
`
	if err := os.WriteFile(saPath, []byte(yamlSA), 0o600); err != nil {
		t.Fatal(err)
	}
	k, _ := hex.DecodeString(key)
	out := esp.Outer{Src: netip.MustParseAddr("192.168.77.1"), Dst: netip.MustParseAddr("192.168.77.2"), Encap: true, SrcPort: 4500, DstPort: 4500}
	phone := newSealer(t, esp.Config{SPI: 0xc001, Proposal: esp.AES128GCM16, EncKey: k, Mode: esp.ModeTunnel}, out)

	ethPath, anyPath := filepath.Join(dir, "eth.pcap"), filepath.Join(dir, "any.pcap")
	stopEth := startTcpdump(t, gw, vb, ethPath)
	stopAny := startTcpdump(t, gw, "any", anyPath)

	// The gateway side: a bound socket, so the datagrams are consumed and
	// the test knows every one has passed the capture point.
	var rx *net.UDPConn
	if err := gw.Do(func() (err error) {
		rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 168, 77, 2), Port: 4500})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	var tx *net.UDPConn
	if err := ue.Do(func() (err error) {
		tx, err = net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 168, 77, 1), Port: 4500}, &net.UDPAddr{IP: net.IPv4(192, 168, 77, 2), Port: 4500})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer tx.Close()

	start := time.Now()
	var inners [][]byte
	var datagrams [][]byte
	datagrams = append(datagrams, []byte{0xff}, append(make([]byte, 4), bytes.Repeat([]byte{0x2a}, 40)...))
	for i := range 5 {
		in := udpInner4([4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}, 5060, 5060, 100+50*i)
		in[len(in)-1] = byte(i)
		inners = append(inners, in)
		pkt := phone.seal(t, in, 4)
		datagrams = append(datagrams, pkt[esp.OuterLen(&out):])
	}
	datagrams = append(datagrams, datagrams[3]) // the second ESP packet again: a replay
	for _, d := range datagrams {
		if _, err := tx.Write(d); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	buf := make([]byte, 2048)
	for i := range datagrams {
		_ = rx.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := rx.Read(buf)
		if err != nil {
			t.Fatalf("receive datagram %d: %v", i, err)
		}
		if !bytes.Equal(buf[:n], datagrams[i]) {
			t.Fatalf("datagram %d changed in transit", i)
		}
	}
	end := time.Now()
	waitFrames(t, ethPath, len(datagrams))
	waitFrames(t, anyPath, len(datagrams))
	stopEth()
	stopAny()

	for _, c := range []struct {
		path string
		lts  []layers.LinkType
	}{{ethPath, []layers.LinkType{capture.LinkEthernet}}, {anyPath, []layers.LinkType{capture.LinkSLL2, capture.LinkSLL}}} {
		f, err := os.Open(c.path)
		if err != nil {
			t.Fatal(err)
		}
		rd, err := capture.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		lt := rd.LinkType()
		f.Close()
		if lt != c.lts[0] && (len(c.lts) < 2 || lt != c.lts[1]) {
			t.Fatalf("%s: link type %v, want %v", c.path, lt, c.lts)
		}
		t.Logf("%s: link type %v", filepath.Base(c.path), lt)

		innerPath := c.path + ".inner.pcap"
		r := runDecryptTest("--sa", saPath, "--json", "--out", innerPath, c.path)
		if r.err != nil {
			t.Fatalf("%s: %v", c.path, r.err)
		}
		recs := parseJSONLines(t, r.stdout)
		if len(recs) != len(datagrams) {
			t.Fatalf("%s: %d records, want %d:\n%s\n%s", c.path, len(recs), len(datagrams), r.stdout, r.stderr)
		}
		verdicts := []string{"keepalive", "ike", "accept", "accept", "accept", "accept", "accept", "drop"}
		for i, rec := range recs {
			ts, err := time.Parse(time.RFC3339Nano, rec.Time)
			if err != nil || ts.Before(start.Add(-time.Second)) || ts.After(end.Add(time.Second)) {
				t.Errorf("%s: record %d time %s outside the run (%v..%v)", c.path, i, rec.Time, start, end)
			}
			if rec.Verdict != verdicts[i] || rec.Src != "192.168.77.1" || rec.Dst != "192.168.77.2" || rec.SrcPort != 4500 || rec.DstPort != 4500 {
				t.Errorf("%s: record %d %+v, want %s from 192.168.77.1:4500", c.path, i, rec, verdicts[i])
			}
			if rec.Verdict == "accept" {
				if *rec.Seq != uint64(i-1) || rec.Inner != hex.EncodeToString(inners[i-2]) || rec.Payload != rec.Inner {
					t.Errorf("%s: record %d seq %d inner %s, want seq %d %x", c.path, i, *rec.Seq, rec.Inner, i-1, inners[i-2])
				}
			}
		}
		if last := recs[len(recs)-1]; last.Reason != "replay" || *last.Seq != 2 || *last.SPI != "0x0000c001" {
			t.Errorf("%s: last record %+v, want a replay of seq 2", c.path, last)
		}
		pkts, _ := readOut(t, innerPath)
		if len(pkts) != len(inners) {
			t.Fatalf("%s: --out has %d packets, want %d", c.path, len(pkts), len(inners))
		}
		for i := range pkts {
			if !bytes.Equal(pkts[i], inners[i]) {
				t.Errorf("%s: --out packet %d\n got %x\nwant %x", c.path, i, pkts[i], inners[i])
			}
		}
	}
	if *update && !t.Failed() {
		for src, dst := range map[string]string{ethPath: "phone-eth.pcap", anyPath: "phone-any.pcap", saPath: "phone-sa.yaml"} {
			b, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join("testdata", dst), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestDecryptGolden pins the whole output, text and JSON, for captures
// tcpdump wrote in TestDecryptRealCapture (Ethernet and -i any), so the
// format cannot change unnoticed and the check runs without root.
func TestDecryptGolden(t *testing.T) {
	for _, name := range []string{"phone-eth", "phone-any"} {
		for _, mode := range []string{"txt", "json"} {
			args := []string{"--sa", "testdata/phone-sa.yaml", "testdata/" + name + ".pcap"}
			if mode == "json" {
				args = append(args, "--json")
			}
			r := runDecryptTest(args...)
			if r.err != nil {
				t.Fatalf("%s: %v", name, r.err)
			}
			got := r.stdout + "# stderr: " + r.stderr
			golden := filepath.Join("testdata", name+"."+mode)
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run TestDecryptRealCapture and this test with -update-decrypt as root)", err)
			}
			if got != string(want) {
				t.Errorf("%s differs:\n got:\n%s\nwant:\n%s", golden, got, want)
			}
		}
	}
}

// --- untrusted bytes ----------------------------------------------------------------

func TestSummarizeIP(t *testing.T) {
	a, b := [4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}
	frag := ip4(17, a, b, make([]byte, 16))
	binary.BigEndian.PutUint16(frag[6:], 0x2000|3) // MF, offset 24
	v6frag := make([]byte, 48)
	v6frag[0], v6frag[6] = 0x60, 44
	binary.BigEndian.PutUint16(v6frag[4:], 8)
	v6hop := make([]byte, 40+8+20)
	v6hop[0], v6hop[6] = 0x60, 0 // hop-by-hop, then TCP
	binary.BigEndian.PutUint16(v6hop[4:], 28)
	v6hop[40] = 6
	copy(v6hop[48:], tcpSeg(443, 50000, 0x12, nil))
	for _, c := range []struct {
		name string
		ip   []byte
		want string
	}{
		{"empty", nil, "empty"},
		{"short v4", []byte{0x45, 0, 0}, "IPv4 truncated 3B"},
		{"bad ihl", append([]byte{0x4f}, make([]byte, 19)...), "IPv4 bad header length 60"},
		{"not ip", []byte{0x10, 0}, "not IP (version 1), len 2"},
		{"udp", udpInner4(a, b, 5060, 5060, 412), "10.99.0.1:5060 > 10.0.0.1:5060 UDP 412B"},
		{"tcp syn-ack", ip4(6, a, b, tcpSeg(5060, 40000, 0x12, []byte("hi"))), "10.99.0.1:5060 > 10.0.0.1:40000 TCP [S.] 2B"},
		{"tcp fin", ip4(6, a, b, tcpSeg(1, 2, 0x11, nil)), "10.99.0.1:1 > 10.0.0.1:2 TCP [F.] 0B"},
		{"tcp truncated", ip4(6, a, b, make([]byte, 10)), "10.99.0.1 > 10.0.0.1 proto 6, len 30"},
		{"icmp reply", ip4(1, a, b, []byte{0, 0, 0, 0, 0, 9, 0, 1}), "10.99.0.1 > 10.0.0.1 ICMP echo reply id 9 seq 1, len 28"},
		{"icmp unreach", ip4(1, a, b, []byte{3, 3, 0, 0}), "10.99.0.1 > 10.0.0.1 ICMP type 3 code 3, len 24"},
		{"v4 fragment", frag, "10.99.0.1 > 10.0.0.1 proto 17 fragment offset 24, len 36"},
		{"gre", ip4(47, a, b, make([]byte, 4)), "10.99.0.1 > 10.0.0.1 proto 47, len 24"},
		{"v6 fragment", v6frag, ":: > :: IPv6 fragment, len 48"},
		{"v6 hop-by-hop tcp", v6hop, "[::]:443 > [::]:50000 IPv6 TCP [S.] 0B"},
		{"v6 short", []byte{0x60, 0, 0}, "IPv6 truncated 3B"},
	} {
		if got := summarizeIP(c.ip); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// FuzzDecryptJudge feeds arbitrary IP packets through the whole per-packet
// path (classification, open, summary) with real SAs: it must never panic,
// and what it reports must hold together.
func FuzzDecryptJudge(f *testing.F) {
	k, _ := hex.DecodeString("000102030405060708090a0b0c0d0e0fcafebabe")
	gcm, err := esp.NewTransform(esp.Config{SPI: 0x1001, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: 64, Mode: esp.ModeTransport})
	if err != nil {
		f.Fatal(err)
	}
	cbc, err := esp.NewTransform(esp.Config{SPI: 0x2002, Proposal: esp.AES128CBC, EncKey: k[:16], Mode: esp.ModeTunnel})
	if err != nil {
		f.Fatal(err)
	}
	sas := map[uint32]*esp.Transform{0x1001: gcm, 0x2002: cbc}
	lookup := func(spi uint32) *esp.Transform { return sas[spi] }
	o := esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.20"), Encap: true, SrcPort: 4500, DstPort: 4500}
	inner := udpInner4([4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}, 5060, 5060, 30)
	for _, s := range []*esp.Transform{gcm, cbc} {
		buf := make([]byte, 512)
		nh := uint8(17)
		payload := inner[20:]
		if s == cbc {
			nh, payload = 4, inner
		}
		p, err := s.SealPacket(buf, payload, nh, &o)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(bytes.Clone(p))
	}
	f.Add(udp4([4]byte{1, 2, 3, 4}, [4]byte{5, 6, 7, 8}, 4500, 4500, []byte{0xff}))
	f.Fuzz(func(t *testing.T, ip []byte) {
		st := decryptStats{verdicts: map[string]int{}, reasons: map[string]int{}, badIP: map[string]int{}}
		rec, in, ok := judge(capture.Packet{IP: ip}, bytes.Clone(ip), esp.NATTPort, lookup, nil, &st)
		if !ok {
			return
		}
		switch rec.Verdict {
		case "accept":
			if in == nil || rec.Inner != hex.EncodeToString(in) || rec.summary == "" || rec.Reason != "" {
				t.Fatalf("accept without a consistent inner packet: %+v", rec)
			}
		case "drop":
			if in != nil || rec.Reason == "" {
				t.Fatalf("drop %+v", rec)
			}
		case "dummy", "keepalive", "ike":
			if in != nil {
				t.Fatalf("%s with an inner packet", rec.Verdict)
			}
		default:
			t.Fatalf("verdict %q", rec.Verdict)
		}
		var b bytes.Buffer
		if err := writeDecryptLine(&b, &rec); err != nil || !strings.HasSuffix(b.String(), "\n") {
			t.Fatal(err)
		}
	})
}

// BenchmarkDecryptCapture runs the whole command over 10,000 AES-128-GCM
// ESP-in-UDP packets of 200-byte inner packets (text output discarded), to
// show what an operator waits for on a large capture.
func BenchmarkDecryptCapture(b *testing.B) {
	for _, jsonOut := range []bool{false, true} {
		b.Run(fmt.Sprintf("json=%v", jsonOut), func(b *testing.B) {
			dir := b.TempDir()
			key := "000102030405060708090a0b0c0d0e0fcafebabe"
			saPath := filepath.Join(dir, "sa.json")
			sa := map[string]any{"spi": 0x7007, "direction": "in", "mode": "tunnel", "proposal": "aes128gcm16",
				"enc_key": key, "local": "198.51.100.20", "peer": "192.0.2.10", "encap": map[string]any{},
				"inner": map[string]any{"local": "10.0.0.0/24", "peer": "10.99.0.1"}}
			raw, _ := json.Marshal(sa)
			if err := os.WriteFile(saPath, raw, 0o600); err != nil {
				b.Fatal(err)
			}
			k, _ := hex.DecodeString(key)
			s, err := esp.NewTransform(esp.Config{SPI: 0x7007, Proposal: esp.AES128GCM16, EncKey: k, Mode: esp.ModeTunnel})
			if err != nil {
				b.Fatal(err)
			}
			o := esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.20"), Encap: true, SrcPort: 4500, DstPort: 4500}
			inner := udpInner4([4]byte{10, 99, 0, 1}, [4]byte{10, 0, 0, 1}, 5060, 5060, 172)
			const n = 10000
			var pcap bytes.Buffer
			w := pcapgo.NewWriterNanos(&pcap)
			if err := w.WriteFileHeader(65535, capture.LinkRaw); err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 512)
			for i := range n {
				p, err := s.SealPacket(buf, inner, 4, &o)
				if err != nil {
					b.Fatal(err)
				}
				if err := w.WritePacket(gopacket.CaptureInfo{Timestamp: time.Unix(0, int64(i)), CaptureLength: len(p), Length: len(p)}, p); err != nil {
					b.Fatal(err)
				}
			}
			capPath := filepath.Join(dir, "c.pcap")
			if err := os.WriteFile(capPath, pcap.Bytes(), 0o644); err != nil {
				b.Fatal(err)
			}
			args := []string{"--sa", saPath, capPath}
			if jsonOut {
				args = append(args, "--json")
			}
			b.ResetTimer()
			for range b.N {
				if err := runDecrypt(args, io.Discard, io.Discard); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/packet")
		})
	}
}
