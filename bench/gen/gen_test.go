package gen_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/lab/netns"
)

// pair is gen end a ─ receiving end b, in two namespaces.
type pair struct {
	a, b           *netns.NS
	aIf, bIf       string
	aIndex, bIndex int
	aMAC, bMAC     net.HardwareAddr
}

func newPair(t *testing.T) *pair { return newPairTB(t) }

func newPairTB(t testing.TB) *pair {
	t.Helper()
	p := &pair{a: netns.ForTest(t, "xga"), b: netns.ForTest(t, "xgb")}
	p.aIf, p.bIf = netns.VethForTest(t, p.a, p.b)
	p.aIndex, p.aMAC = ifInfo(t, p.a, p.aIf)
	p.bIndex, p.bMAC = ifInfo(t, p.b, p.bIf)
	return p
}

func ifInfo(t testing.TB, ns *netns.NS, name string) (int, net.HardwareAddr) {
	t.Helper()
	var i *net.Interface
	if err := ns.Do(func() (err error) {
		i, err = net.InterfaceByName(name)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return i.Index, i.HardwareAddr
}

// attachB attaches c's program to b's end: XDP_TX from a needs an XDP
// program on its peer, and the counter passes what it does not count.
func (p *pair) attachB(t testing.TB, c *gen.Counter) {
	t.Helper()
	if err := p.b.Do(func() error {
		l, err := link.AttachXDP(link.XDPOptions{Program: c.Prog, Interface: p.bIndex, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach xdp to %s: %w", p.bIf, err)
		}
		t.Cleanup(func() { l.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func newGen(t *testing.T, p *pair, ring int) *gen.Gen {
	t.Helper()
	g, err := gen.New(gen.Options{Ifindex: p.aIndex, Ring: ring})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

func send(t *testing.T, p *pair, g *gen.Gen) int {
	t.Helper()
	var n int
	if err := p.a.Do(func() (err error) {
		n, _, err = g.SendPinned(0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n != g.Ring() {
		t.Fatalf("sent %d frames, want the ring's %d", n, g.Ring())
	}
	return n
}

// capture opens an AF_PACKET socket on b's end with room for many frames.
func capture(t *testing.T, p *pair) int {
	t.Helper()
	var fd int
	if err := p.b.Do(func() (err error) {
		proto := int(htons(unix.ETH_P_ALL))
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: p.bIndex})
	}); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(2 * time.Second))
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// frames reads n incoming IPv4/UDP frames to port 4500 from fd, skipping
// the kernel's own chatter (IPv6 neighbour discovery).
func frames(t *testing.T, fd, n int) [][]byte {
	t.Helper()
	var out [][]byte
	buf := make([]byte, 4096)
	for len(out) < n {
		m, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatalf("captured %d of %d frames: %v", len(out), n, err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		f := buf[:m]
		if m < 42 || binary.BigEndian.Uint16(f[12:]) != 0x0800 || f[23] != 17 || binary.BigEndian.Uint16(f[36:]) != 4500 {
			continue
		}
		out = append(out, append([]byte(nil), f...))
	}
	return out
}

type saPair struct{ tx, rx *esp.Transform }

func mkSAs(t *testing.T, n int) []saPair {
	t.Helper()
	props := []esp.Proposal{esp.AES128GCM16, esp.ChaCha20Poly1305, esp.AES128SHA1}
	var out []saPair
	for i := range n {
		prop := props[i%len(props)]
		var enc, auth []byte
		switch prop {
		case esp.AES128GCM16:
			enc = bytes.Repeat([]byte{byte(i + 1)}, 20)
		case esp.ChaCha20Poly1305:
			enc = bytes.Repeat([]byte{byte(i + 1)}, 36)
		default:
			enc, auth = bytes.Repeat([]byte{byte(i + 1)}, 16), bytes.Repeat([]byte{byte(i + 0x41)}, 20)
		}
		mk := func(window int) *esp.Transform {
			s, err := esp.NewTransform(esp.Config{SPI: 0x5000 + uint32(i), Proposal: prop, EncKey: enc, AuthKey: auth, ReplayWindow: window, Mode: esp.ModeTunnel})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		out = append(out, saPair{tx: mk(0), rx: mk(1024)})
	}
	return out
}

// The generator's ESP frames, captured at the far end, are the ring's
// frames byte for byte and in slot order; each opens under the receiving
// SA (whose replay window rejects any repeat), carries the flow and size
// its slot says, and per SA the sequence numbers rise by exactly one from
// frame to frame across two refills.
func TestESPFramesOpenInOrderAcrossRefills(t *testing.T) {
	p := newPair(t)
	pass, err := gen.NewCounter(9) // counts nothing here: passes everything to the stack
	if err != nil {
		t.Fatal(err)
	}
	defer pass.Close()
	p.attachB(t, pass)
	fd := capture(t, p)

	const ring = 600
	g := newGen(t, p, ring)
	sas := mkSAs(t, 3)
	var flows []gen.Flow
	for i, s := range sas {
		flows = append(flows, gen.Flow{
			SA:    s.tx,
			Outer: esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("192.0.2.1"), Encap: true, SrcPort: 4500, DstPort: 4500},
			Src:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(i + 1)}), 5060),
			Dst:   netip.MustParseAddrPort("10.0.0.1:5060"),
		})
	}
	sizes, err := gen.Mix([]int{200, 1400, 64}, []int{2, 1, 1})
	if err != nil {
		t.Fatal(err)
	}
	l2 := gen.L2{Src: p.aMAC, Dst: p.bMAC}
	if err := g.LoadESP(l2, flows, sizes); err != nil {
		t.Fatal(err)
	}

	lastSeq := make(map[uint32]uint32)
	serials := make(map[uint64]bool)
	for round := range 2 {
		want := make([][]byte, ring)
		for i := range want {
			want[i] = g.Frame(i)
		}
		send(t, p, g)
		if round == 0 {
			// The ring was sent: sending it again would replay it.
			if err := p.a.Do(func() error { _, _, err := g.Send(); return err }); !errors.Is(err, gen.ErrStale) {
				t.Fatalf("second Send without Refill: %v, want ErrStale", err)
			}
		}
		got := frames(t, fd, ring)
		for i, f := range got {
			if !bytes.Equal(f, want[i]) {
				t.Fatalf("round %d frame %d differs from slot %d\n got %x\nwant %x", round, i, i, f, want[i])
			}
			if !bytes.Equal(f[0:6], p.bMAC) || !bytes.Equal(f[6:12], p.aMAC) {
				t.Fatalf("frame %d L2 %x", i, f[:12])
			}
			spi := binary.BigEndian.Uint32(f[42:])
			seq := binary.BigEndian.Uint32(f[46:])
			fi := i % len(flows)
			if spi != sas[fi].rx.SPI() {
				t.Fatalf("slot %d has SPI 0x%x, want flow %d's 0x%x", i, spi, fi, sas[fi].rx.SPI())
			}
			if seq != lastSeq[spi]+1 {
				t.Fatalf("round %d slot %d SPI 0x%x: seq %d after %d", round, i, spi, seq, lastSeq[spi])
			}
			lastSeq[spi] = seq
			pkt, err := sas[fi].rx.OpenPacket(f[14:])
			if err != nil {
				t.Fatalf("round %d slot %d: open: %v", round, i, err)
			}
			in := pkt.IP
			if len(in) != sizes.At(i, len(flows)) {
				t.Fatalf("slot %d: inner %d bytes, want %d", i, len(in), sizes.At(i, len(flows)))
			}
			flow, serial, ok := gen.Marker(in[28:])
			if !ok || flow != uint32(fi) || serials[serial] {
				t.Fatalf("slot %d: marker flow %d serial %d ok %v (repeat %v)", i, flow, serial, ok, serials[serial])
			}
			serials[serial] = true
			if src := netip.AddrFrom4([4]byte(in[12:16])); src != flows[fi].Src.Addr() {
				t.Fatalf("slot %d: inner source %v", i, src)
			}
		}
		if err := g.Refill(); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range sas {
		if want := uint32(2 * ring / len(sas)); lastSeq[s.rx.SPI()] != want {
			t.Fatalf("SPI 0x%x ended at seq %d, want %d", s.rx.SPI(), lastSeq[s.rx.SPI()], want)
		}
	}
}

// Cleartext frames may be replayed: two Sends without Refill deliver the
// ring twice, and the far-end counter counts exactly those frames and
// bytes while passing the kernel's own traffic.
func TestClearFramesCountedAtFarEnd(t *testing.T) {
	p := newPair(t)
	cnt, err := gen.NewCounter(5060)
	if err != nil {
		t.Fatal(err)
	}
	defer cnt.Close()
	p.attachB(t, cnt)
	const ring = 4096
	g := newGen(t, p, ring)
	var flows []gen.Flow
	for i := range 100 {
		flows = append(flows, gen.Flow{
			Src: netip.MustParseAddrPort("10.0.0.1:5060"),
			Dst: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, byte(i >> 8), byte(i)}), 5060),
		})
	}
	if err := g.LoadClear(gen.L2{Src: p.aMAC, Dst: p.bMAC}, flows, gen.IMIX()); err != nil {
		t.Fatal(err)
	}
	var wantBytes uint64
	for i := range ring {
		f := g.Frame(i)
		wantBytes += uint64(len(f))
		if n := gen.IMIX().At(i, len(flows)); len(f) != 14+n {
			t.Fatalf("slot %d: %d-byte frame, want %d", i, len(f), 14+n)
		}
	}
	send(t, p, g)
	send(t, p, g)
	var pk, by uint64
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if pk, by, err = cnt.Read(); err != nil {
			t.Fatal(err)
		}
		if pk >= 2*ring {
			break
		}
	}
	if pk != 2*ring || by != 2*wantBytes {
		t.Fatalf("counted %d frames, %d bytes; want %d, %d", pk, by, 2*ring, 2*wantBytes)
	}
}

// A frame that does not fit is refused at load, naming the slot.
func TestLoadRefusesOversizedFrames(t *testing.T) {
	p := newPair(t)
	g, err := gen.New(gen.Options{Ifindex: p.aIndex, Ring: 4, MaxFrame: 512})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	sas := mkSAs(t, 1)
	flows := []gen.Flow{{SA: sas[0].tx, Outer: esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("192.0.2.1"), Encap: true, SrcPort: 4500, DstPort: 4500},
		Src: netip.MustParseAddrPort("10.99.0.1:5060"), Dst: netip.MustParseAddrPort("10.0.0.1:5060")}}
	if err := g.LoadESP(gen.L2{Src: p.aMAC, Dst: p.bMAC}, flows, gen.Fixed(500)); err == nil {
		t.Fatal("a 500-byte inner packet fit a 512-byte frame with ESP and outer headers")
	}
	if err := g.LoadESP(gen.L2{Src: p.aMAC, Dst: p.bMAC}, flows, gen.Fixed(20)); err == nil {
		t.Fatal("a 20-byte packet was accepted below the minimum")
	}
}

// IMIX is 7:4:1 and spreads the sizes instead of sending them in runs.
func TestIMIXPattern(t *testing.T) {
	p := gen.IMIX().Pattern()
	counts := map[int]int{}
	run, longest := 0, 0
	for i, n := range p {
		counts[n]++
		if i > 0 && p[i-1] == n {
			run++
		} else {
			run = 1
		}
		longest = max(longest, run)
	}
	if len(p) != 12 || counts[64] != 7 || counts[570] != 4 || counts[1400] != 1 {
		t.Fatalf("pattern %v", p)
	}
	if longest > 2 {
		t.Fatalf("pattern %v has a run of %d", p, longest)
	}
	if _, err := gen.Mix([]int{1, 2}, []int{1}); err == nil {
		t.Fatal("mismatched mix accepted")
	}
}

// BenchmarkSend is the generator's own rate into a counting XDP_DROP peer,
// pinned to CPU 0: the most any measured path can be offered.
func BenchmarkSend(b *testing.B) {
	for _, size := range []int{64, 200, 1400} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			p := newPairTB(b)
			cnt, err := gen.NewCounter(5060)
			if err != nil {
				b.Fatal(err)
			}
			defer cnt.Close()
			p.attachB(b, cnt)
			g, err := gen.New(gen.Options{Ifindex: p.aIndex})
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			flows := []gen.Flow{{Src: netip.MustParseAddrPort("10.0.0.1:5060"), Dst: netip.MustParseAddrPort("10.99.0.1:5060")}}
			if err := g.LoadClear(gen.L2{Src: p.aMAC, Dst: p.bMAC}, flows, gen.Fixed(size)); err != nil {
				b.Fatal(err)
			}
			var sent int
			var el time.Duration
			b.ResetTimer()
			for range b.N {
				if err := p.a.Do(func() error {
					n, e, err := g.SendPinned(0)
					sent += n
					el += e
					return err
				}); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			got, _, err := cnt.Read()
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(sent)/el.Seconds(), "offered_pps")
			b.ReportMetric(100*(1-float64(got)/float64(sent)), "loss%")
		})
	}
}

// A stamping counter samples 1 in 4 arrivals while on, each with a
// CLOCK_MONOTONIC time inside the send and the packet's marker, whose
// serial names its slot; off, it only counts.
func TestStampCounterSamplesArrivals(t *testing.T) {
	p := newPair(t)
	cnt, err := gen.NewStampCounter(5060, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer cnt.Close()
	p.attachB(t, cnt)
	const ring = 1024
	g := newGen(t, p, ring)
	flows := []gen.Flow{{Src: netip.MustParseAddrPort("10.0.0.1:5060"), Dst: netip.MustParseAddrPort("10.99.0.1:5060")}}
	if err := g.LoadClear(gen.L2{Src: p.aMAC, Dst: p.bMAC}, flows, gen.Fixed(200)); err != nil {
		t.Fatal(err)
	}
	if err := cnt.StartStamps(3, 28+gen.MarkerLen); err != nil {
		t.Fatal(err)
	}
	mono := func() uint64 {
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		return uint64(ts.Nano())
	}
	t0 := mono()
	send(t, p, g)
	t1 := mono()
	if err := cnt.StopStamps(); err != nil {
		t.Fatal(err)
	}
	send(t, p, g) // not sampled
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if pk, _, _ := cnt.Read(); pk >= 2*ring {
			break
		}
	}
	var serials []uint64
	var last uint64
	n, lost, err := cnt.ReadStamps(func(s gen.Stamp) {
		if s.Ns < t0 || s.Ns > t1 || s.Ns < last {
			t.Errorf("stamp at %d ns outside the send [%d, %d] or before the previous %d", s.Ns, t0, t1, last)
		}
		last = s.Ns
		if s.Len != 200 || len(s.Data) != 28+gen.MarkerLen {
			t.Errorf("stamp of a %d-byte packet carries %d bytes, want 200 and %d", s.Len, len(s.Data), 28+gen.MarkerLen)
		}
		_, serial, ok := gen.Marker(s.Data[28:])
		if !ok {
			t.Errorf("no marker in % x", s.Data)
		}
		serials = append(serials, serial)
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != ring/4 || lost != 0 {
		t.Fatalf("%d stamps (%d lost), want %d", n, lost, ring/4)
	}
	for i, s := range serials {
		if want := g.SlotSerial(4 * i); s != want {
			t.Fatalf("stamp %d carries serial %d, want slot %d's %d", i, s, 4*i, want)
		}
	}
}
