package main

// xesp decrypt: the inbound ESP path on a capture file, for operators
// debugging a phone's traffic offline. It owns reading the SA file and the
// capture, judging each packet with the engine (dataplane/esp) exactly as a
// gateway worker would, and printing the outcome. It must not decide
// verdicts itself: every accept and drop reason comes from esp.OpenPacket.

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/capture"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "decrypt", Summary: "decrypt the ESP packets of a capture file with given SAs", Run: func(args []string) error {
		return runDecrypt(args, os.Stdout, os.Stderr)
	}})
}

const decryptHelp = `usage: xesp decrypt --sa FILE [--json] [--out inner.pcap] [--natt-port 4500] [--window-top SPI=SEQ]... CAPTURE

Feeds every ESP packet of CAPTURE (pcap or pcapng; Ethernet, Linux cooked
SLL/SLL2 or raw IP) in capture order through the gateway's inbound path with
the direction "in" SAs of FILE (SA format, YAML or JSON by extension). One SA
state per SPI lives for the whole run, so replays are judged across the file.
Proposals without integrity (aes128, aes192, aes256) are accepted here only.

One line per ESP, NAT-keepalive and IKE packet:
  FRAME SPI SEQ VERDICT REASON SUMMARY
FRAME is the frame number counted from 1, as Wireshark numbers frames (every
frame counts, IP or not). SEQ is the full sequence number (ESN high half
inferred) or the 32 bits on the wire when no SA judged it. VERDICT is accept,
drop, keepalive, ike or dummy; REASON names the drop (no_sa, integ_error,
replay, replay_old, padding, ...), "-" otherwise. SUMMARY describes the inner
packet of an accept (UDP/TCP sizes are payload bytes, others the IP length)
and the outer addresses otherwise. Frames that are not ESP-related are
skipped and counted in a summary line on stderr.

--json prints one object per line instead: index (frame number, from 1),
time, src, dst (outer addresses), sport, dport (0 for plain ESP), class,
spi ("0x%08x", null for keepalive/IKE), seq (null when unknown), verdict,
reason ("" unless dropped), sa (its name), mode, next_header, payload (hex of
the decrypted Payload Data: tunnel mode the inner IP packet, transport mode
the upper-layer segment as delivered, its TCP/UDP checksum fixed as RFC 3948
3.1.2 allows) and inner (hex of the IP packet delivered: tunnel mode the
inner packet, transport mode the rebuilt IP packet). --out writes those inner
packets to a raw-IP pcap with the original timestamps.

A capture that starts in the middle of an SA's life, past 2^32 packets of an
ESN SA, needs --window-top SPI=SEQ: the highest sequence number the receiver
had accepted before the capture began, from which the high half of later
sequence numbers is inferred (RFC 4303 Appendix A2).

Exit status: 0 when the capture was read (drops are results), 1 when a file
cannot be read or is invalid, 2 on usage errors.

flags:
`

// decryptOpts is the parsed command line.
type decryptOpts struct {
	saFile   string
	jsonOut  bool
	outFile  string
	nattPort uint16
	tops     map[uint32]uint64
	capture  string
}

func parseDecryptArgs(args []string, stderr io.Writer) (decryptOpts, error) {
	o := decryptOpts{tops: map[uint32]uint64{}}
	fs := flag.NewFlagSet("decrypt", flag.ContinueOnError)
	// The long help is for -h; a mistyped flag gets one line, from main.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&o.saFile, "sa", "", "SA file (.yaml, .yml or .json); its direction \"in\" SAs are used")
	fs.BoolVar(&o.jsonOut, "json", false, "one JSON object per line instead of text")
	fs.StringVar(&o.outFile, "out", "", "write the decrypted inner packets to this raw-IP pcap")
	port := fs.Uint("natt-port", esp.NATTPort, "UDP port taken as NAT-T (ESP-in-UDP, keepalives, IKE)")
	fs.Func("window-top", "start an SA's replay window as if sequence number SEQ had been received: `SPI=SEQ` (repeatable)", func(s string) error {
		spiText, seqText, ok := strings.Cut(s, "=")
		if !ok {
			return fmt.Errorf("%q: want SPI=SEQ", s)
		}
		spi, err := strconv.ParseUint(spiText, 0, 32)
		if err != nil {
			return fmt.Errorf("%q: SPI: %w", s, err)
		}
		seq, err := strconv.ParseUint(seqText, 0, 64)
		if err != nil {
			return fmt.Errorf("%q: SEQ: %w", s, err)
		}
		o.tops[uint32(spi)] = seq
		return nil
	})
	// The flag package stops at the first operand; operators put flags
	// after the capture name too, so parse again after each operand.
	var operands []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprint(stderr, decryptHelp)
				fs.SetOutput(stderr)
				fs.PrintDefaults()
				return o, err
			}
			return o, fmt.Errorf("%w: %v", errUsage, err)
		}
		if fs.NArg() == 0 {
			break
		}
		operands = append(operands, fs.Arg(0))
		args = fs.Args()[1:]
	}
	switch {
	case o.saFile == "":
		return o, fmt.Errorf("%w: --sa FILE is required", errUsage)
	case len(operands) != 1:
		return o, fmt.Errorf("%w: want exactly one capture file, got %d", errUsage, len(operands))
	case *port == 0 || *port > 0xffff:
		return o, fmt.Errorf("%w: --natt-port %d: must be 1..65535", errUsage, *port)
	}
	o.nattPort = uint16(*port)
	o.capture = operands[0]
	return o, nil
}

// loadInboundSAs builds one engine SA per inbound SPI of the file.
func loadInboundSAs(o decryptOpts) (map[uint32]*esp.Transform, map[uint32]string, int, error) {
	specs, err := sa.ParseFile(o.saFile, sa.Options{AllowNoIntegrity: true})
	if err != nil {
		return nil, nil, 0, err
	}
	sas := map[uint32]*esp.Transform{}
	names := map[uint32]string{} // the Transform keeps no label

	outbound := 0
	for _, s := range specs {
		if s.Direction != sa.In {
			outbound++
			continue
		}
		mode := esp.ModeTunnel
		if s.Mode == sa.Transport {
			mode = esp.ModeTransport
		}
		e, err := esp.NewTransform(esp.Config{Name: s.Name, SPI: s.SPI, Proposal: s.Proposal, EncKey: s.EncKey,
			AuthKey: s.AuthKey, ESN: s.ESN, ReplayWindow: int(s.ReplayWindow), Mode: mode})
		if err != nil {
			return nil, nil, 0, fmt.Errorf("%s: %w", o.saFile, err)
		}
		sas[s.SPI], names[s.SPI] = e, s.Name
	}
	if len(sas) == 0 {
		return nil, nil, 0, fmt.Errorf("%s: no SA with direction \"in\" (%d outbound SAs, which decrypt does not use)", o.saFile, outbound)
	}
	for spi, top := range o.tops {
		e, ok := sas[spi]
		if !ok {
			return nil, nil, 0, fmt.Errorf("%w: --window-top: no inbound SA with SPI 0x%08x in %s", errUsage, spi, o.saFile)
		}
		w := e.Replay()
		st := esp.ReplayState{Top: top, Bitmap: make([]uint64, (w.Size()+63)/64)}
		if err := w.Import(st); err != nil {
			return nil, nil, 0, fmt.Errorf("%w: --window-top 0x%08x=%d: %v", errUsage, spi, top, err)
		}
	}
	return sas, names, outbound, nil
}

// decryptRecord is one output line; the JSON names are the --json format.
type decryptRecord struct {
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
	SA         string  `json:"sa,omitempty"`
	Mode       string  `json:"mode,omitempty"`
	NextHeader *uint8  `json:"next_header,omitempty"`
	Payload    string  `json:"payload"`
	Inner      string  `json:"inner"`

	summary string
}

// decryptStats feeds the summary line.
type decryptStats struct {
	verdicts map[string]int
	reasons  map[string]int
	notESP   int
	notIP    int
	badIP    map[string]int // IP packets the outer parser refused before knowing whether they carry ESP
}

func runDecrypt(args []string, stdout, stderr io.Writer) error {
	o, err := parseDecryptArgs(args, stderr)
	if err != nil {
		return err
	}
	sas, names, outbound, err := loadInboundSAs(o)
	if err != nil {
		return err
	}
	f, err := os.Open(o.capture)
	if err != nil {
		return fmt.Errorf("open capture: %w", err)
	}
	defer f.Close()
	rd, err := capture.NewReader(f)
	if err != nil {
		return fmt.Errorf("%s: %w", o.capture, err)
	}
	var pw *capture.Writer
	var outF *os.File
	var outBuf *bufio.Writer
	if o.outFile != "" {
		if outF, err = os.Create(o.outFile); err != nil {
			return fmt.Errorf("create --out file: %w", err)
		}
		defer outF.Close() // a second Close after the checked one is harmless
		outBuf = bufio.NewWriter(outF)
		// On an early return, keep what was decrypted before the error.
		defer outBuf.Flush()
		if pw, err = capture.NewWriter(outBuf); err != nil {
			return fmt.Errorf("%s: %w", o.outFile, err)
		}
	}

	out := bufio.NewWriter(stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	st := decryptStats{verdicts: map[string]int{}, reasons: map[string]int{}, badIP: map[string]int{}}
	lookup := func(spi uint32) *esp.Transform { return sas[spi] }
	var scratch []byte
	lastIndex := -1
	for {
		pkt, err := rd.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			out.Flush()
			// The capture reader's message numbers frames from 0; say so,
			// since every line printed so far numbered them from 1.
			return fmt.Errorf("%s: %w (frame counted from 0; add 1 for the numbering above)", o.capture, err)
		}
		st.notIP += pkt.Index - lastIndex - 1
		lastIndex = pkt.Index

		scratch = append(scratch[:0], pkt.IP...)
		rec, inner, ok := judge(pkt, scratch, o.nattPort, lookup, names, &st)
		if !ok {
			continue
		}
		st.verdicts[rec.Verdict]++
		if rec.Reason != "" {
			st.reasons[rec.Reason]++
		}
		if o.jsonOut {
			err = enc.Encode(&rec)
		} else {
			err = writeDecryptLine(out, &rec)
		}
		if err != nil {
			return fmt.Errorf("write output: %w", err)
		}
		if pw != nil && inner != nil {
			if err := pw.Write(pkt.Time, inner); err != nil {
				return fmt.Errorf("%s: frame %d: %w", o.outFile, pkt.Index+1, err)
			}
		}
	}
	if err := out.Flush(); err != nil {
		return fmt.Errorf("write output: %w", err)
	}
	if outF != nil {
		// Checked here rather than deferred: a full disk must fail the run,
		// not leave a silently short pcap.
		if err := outBuf.Flush(); err != nil {
			return fmt.Errorf("%s: %w", o.outFile, err)
		}
		if err := outF.Close(); err != nil {
			return fmt.Errorf("%s: %w", o.outFile, err)
		}
	}
	fmt.Fprintln(stderr, st.summary(len(sas), outbound))
	return nil
}

// judge classifies one IP packet and, for ESP, opens work (a copy of the
// packet the engine may overwrite). It returns the record, the inner packet
// to write to --out (nil unless accepted), and false for packets that are
// not ESP-related.
func judge(pkt capture.Packet, work []byte, port uint16, lookup func(uint32) *esp.Transform, names map[uint32]string, st *decryptStats) (decryptRecord, []byte, bool) {
	rec := decryptRecord{Index: pkt.Index + 1, Time: pkt.Time.UTC().Format(time.RFC3339Nano)}
	parsed, perr := esp.ParseOuterPort(pkt.IP, port)
	if parsed.Class == esp.ClassOther {
		if perr != nil {
			st.badIP[esp.ReasonOf(perr).String()]++
		} else {
			st.notESP++
		}
		return rec, nil, false
	}
	outer := parsed.Outer
	rec.Src, rec.Dst = outer.Src.String(), outer.Dst.String()
	rec.SrcPort, rec.DstPort = outer.SrcPort, outer.DstPort
	rec.Class = parsed.Class.String()
	rec.summary = "outer " + endpoints(outer)
	switch parsed.Class {
	case esp.ClassKeepalive:
		rec.Verdict = "keepalive"
		return rec, nil, true
	case esp.ClassIKE:
		rec.Verdict = "ike"
		return rec, nil, true
	}
	if perr != nil { // ESP-in-UDP too short for an ESP header
		rec.Verdict, rec.Reason = "drop", esp.ReasonOf(perr).String()
		return rec, nil, true
	}
	wire := pkt.IP[parsed.ESPStart:parsed.ESPEnd]
	spi := fmt.Sprintf("0x%08x", binary.BigEndian.Uint32(wire))
	rec.SPI = &spi
	seq := uint64(binary.BigEndian.Uint32(wire[4:]))

	if outer.Encap && port != esp.NATTPort {
		// OpenPacket recognises NAT-T by port 4500 only. The ports are
		// covered by no ICV and a transport-mode rebuild drops the UDP
		// header, so naming the configured port 4500 in the scratch copy
		// lets the gateway's own open path judge the packet unchanged.
		u := work[parsed.IPHeaderLen:]
		if outer.SrcPort == port {
			binary.BigEndian.PutUint16(u[0:], esp.NATTPort)
		}
		if outer.DstPort == port {
			binary.BigEndian.PutUint16(u[2:], esp.NATTPort)
		}
	}
	p, err := esp.OpenPacket(work, lookup)
	if p.SA != nil {
		rec.SA, rec.Mode = names[p.SPI], p.SA.Mode().String()
	}
	if p.Seq != 0 {
		// The SA's replay window judged it: the full number, ESN high
		// half inferred. Otherwise (no SA, runt) the wire's 32 bits.
		seq = p.Seq
	}
	rec.Seq = &seq
	switch {
	case err == nil:
		rec.Verdict = "accept"
	case errors.Is(err, esp.ErrDummy):
		rec.Verdict = "dummy"
	default:
		rec.Verdict, rec.Reason = "drop", esp.ReasonOf(err).String()
		return rec, nil, true
	}
	nh := p.NextHeader
	rec.NextHeader = &nh
	rec.Payload = hex.EncodeToString(p.Payload)
	if rec.Verdict == "dummy" {
		rec.summary = fmt.Sprintf("next header 59, %dB, outer %s", len(p.Payload), endpoints(outer))
		return rec, nil, true
	}
	rec.Inner = hex.EncodeToString(p.IP)
	rec.summary = summarizeIP(p.IP)
	return rec, p.IP, true
}

func endpoints(o esp.Outer) string {
	if !o.Encap {
		return o.Src.String() + " > " + o.Dst.String()
	}
	return netip.AddrPortFrom(o.Src, o.SrcPort).String() + " > " + netip.AddrPortFrom(o.Dst, o.DstPort).String()
}

func writeDecryptLine(w io.Writer, r *decryptRecord) error {
	spi, seq, reason := "-", "-", "-"
	if r.SPI != nil {
		spi = *r.SPI
	}
	if r.Seq != nil {
		seq = strconv.FormatUint(*r.Seq, 10)
	}
	if r.Reason != "" {
		reason = r.Reason
	}
	_, err := fmt.Fprintf(w, "%6d  %-10s  %10s  %-9s  %-11s  %s\n", r.Index, spi, seq, r.Verdict, reason, r.summary)
	return err
}

func (s *decryptStats) summary(inbound, outbound int) string {
	var b strings.Builder
	total := 0
	for _, n := range s.verdicts {
		total += n
	}
	fmt.Fprintf(&b, "%d ESP/NAT-T packets:", total)
	for _, v := range []string{"accept", "drop", "dummy", "keepalive", "ike"} {
		fmt.Fprintf(&b, " %s %d", v, s.verdicts[v])
		if v == "drop" && len(s.reasons) > 0 {
			b.WriteString(" (" + countList(s.reasons) + ")")
		}
		b.WriteString(",")
	}
	fmt.Fprintf(&b, " skipped %d not ESP, %d not IP", s.notESP, s.notIP)
	if len(s.badIP) > 0 {
		b.WriteString(", malformed IP (" + countList(s.badIP) + ")")
	}
	fmt.Fprintf(&b, "; %d inbound SAs", inbound)
	if outbound > 0 {
		fmt.Fprintf(&b, " (%d outbound ignored)", outbound)
	}
	return b.String()
}

// countList renders "a 1, b 2" in esp.Reason order, so the line is stable.
func countList(m map[string]int) string {
	var parts []string
	for r := esp.ReasonNone; r < esp.NumReasons; r++ {
		if n := m[r.String()]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", r.String(), n))
		}
	}
	return strings.Join(parts, ", ")
}

// summarizeIP describes an IP packet in one tcpdump-like phrase. It reads
// untrusted decrypted bytes, so every offset is checked.
func summarizeIP(ip []byte) string {
	if len(ip) == 0 {
		return "empty"
	}
	var src, dst netip.Addr
	var proto byte
	var l4 []byte
	ver := ""
	switch ip[0] >> 4 {
	case 4:
		if len(ip) < 20 {
			return fmt.Sprintf("IPv4 truncated %dB", len(ip))
		}
		hl := int(ip[0]&0x0f) * 4
		if hl < 20 || hl > len(ip) {
			return fmt.Sprintf("IPv4 bad header length %d", hl)
		}
		src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		proto, l4 = ip[9], ip[hl:]
		if off := binary.BigEndian.Uint16(ip[6:]) & 0x1fff; off != 0 {
			return fmt.Sprintf("%s > %s proto %d fragment offset %d, len %d", src, dst, proto, int(off)*8, len(ip))
		}
	case 6:
		if len(ip) < 40 {
			return fmt.Sprintf("IPv6 truncated %dB", len(ip))
		}
		ver = "IPv6 "
		src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		proto, l4 = ip[6], ip[40:]
		for (proto == 0 || proto == 43 || proto == 60 || proto == 44) && len(l4) >= 8 {
			if proto == 44 {
				return fmt.Sprintf("%s > %s IPv6 fragment, len %d", src, dst, len(ip))
			}
			n := (int(l4[1]) + 1) * 8
			if n > len(l4) {
				break
			}
			proto, l4 = l4[0], l4[n:]
		}
	default:
		return fmt.Sprintf("not IP (version %d), len %d", ip[0]>>4, len(ip))
	}
	ports := func() (string, string) {
		sp, dp := binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		return netip.AddrPortFrom(src, sp).String(), netip.AddrPortFrom(dst, dp).String()
	}
	switch {
	case proto == esp.ProtoUDP && len(l4) >= 8:
		s, d := ports()
		return fmt.Sprintf("%s > %s %sUDP %dB", s, d, ver, len(l4)-8)
	case proto == esp.ProtoTCP && len(l4) >= 20:
		s, d := ports()
		doff := int(l4[12]>>4) * 4
		n := len(l4) - doff
		if n < 0 {
			n = 0
		}
		return fmt.Sprintf("%s > %s %sTCP [%s] %dB", s, d, ver, tcpFlags(l4[13]), n)
	case proto == 1 && len(l4) >= 4:
		return fmt.Sprintf("%s > %s %s, len %d", src, dst, icmpText("ICMP", l4, 8, 0), len(ip))
	case proto == esp.ProtoICMP6 && len(l4) >= 4:
		return fmt.Sprintf("%s > %s %s, len %d", src, dst, icmpText("ICMPv6", l4, 128, 129), len(ip))
	}
	return fmt.Sprintf("%s > %s %sproto %d, len %d", src, dst, ver, proto, len(ip))
}

// tcpFlags renders flags the way tcpdump does: S F R P U E W, "." for ACK.
func tcpFlags(f byte) string {
	var b []byte
	for _, x := range []struct {
		bit byte
		c   byte
	}{{0x02, 'S'}, {0x01, 'F'}, {0x04, 'R'}, {0x08, 'P'}, {0x20, 'U'}, {0x40, 'E'}, {0x80, 'W'}} {
		if f&x.bit != 0 {
			b = append(b, x.c)
		}
	}
	if f&0x10 != 0 {
		b = append(b, '.')
	}
	if len(b) == 0 {
		return "none"
	}
	return string(b)
}

func icmpText(name string, l4 []byte, echoReq, echoRep byte) string {
	typ, code := l4[0], l4[1]
	echo := ""
	switch typ {
	case echoReq:
		echo = "echo request"
	case echoRep:
		echo = "echo reply"
	}
	if echo != "" && len(l4) >= 8 {
		return fmt.Sprintf("%s %s id %d seq %d", name, echo, binary.BigEndian.Uint16(l4[4:]), binary.BigEndian.Uint16(l4[6:]))
	}
	return fmt.Sprintf("%s type %d code %d", name, typ, code)
}
