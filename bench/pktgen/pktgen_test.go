package pktgen

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/lab/netns"
)

// The gateway's side of the pairs (SASpecs, through the SA file format
// `xesp-lab pktgen -sa-file` writes) opens what Flows seals, and the SPIs,
// inner addresses and sizes are the ones asked for.
func TestGatewaySideOpensGeneratedESP(t *testing.T) {
	nw := DefaultNet()
	const n = 5
	specs, err := SASpecs(n, nw)
	if err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(specs)
	if err != nil {
		t.Fatal(err)
	}
	sas, err := sa.ParseBytes(data, sa.JSON, sa.Options{})
	if err != nil {
		t.Fatalf("gateway SA file does not parse: %v\n%s", err, data)
	}
	if len(sas) != 2*n {
		t.Fatalf("%d SAs, want %d", len(sas), 2*n)
	}
	flows, err := Flows(n, nw)
	if err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 20)
	for i, f := range flows {
		if err := unhex(key, Key('i', i)); err != nil {
			t.Fatal(err)
		}
		rx, err := esp.NewTransform(esp.Config{SPI: InSPIBase + uint32(i), Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel, ReplayWindow: 64})
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		p, err := f.SA.SealPacket(buf, udp4(t, f), esp.NextHeaderIPv4, &f.Outer)
		if err != nil {
			t.Fatal(err)
		}
		got, err := rx.OpenPacket(p)
		if err != nil {
			t.Fatalf("pair %d: gateway side cannot open: %v", i, err)
		}
		if src := got.IP[12:16]; [4]byte(src) != Inner(i).As4() {
			t.Fatalf("pair %d: inner source %v, want %v", i, net.IP(src), Inner(i))
		}
	}
	if Inner(70000).String() != "100.65.17.112" {
		t.Fatalf("Inner(70000) = %v", Inner(70000))
	}
	if _, err := SASpecs(MaxSAs+1, nw); err == nil {
		t.Fatal("SASpecs accepted more than MaxSAs")
	}
}

func udp4(t *testing.T, f gen.Flow) []byte {
	t.Helper()
	p := make([]byte, 28+4)
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := f.Src.Addr().As4(), f.Dst.Addr().As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	return p
}

func TestParseSizes(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []int
	}{
		{"200", []int{200}},
		{"IMIX", gen.IMIX().Pattern()},
		{"sip", SIP().Pattern()},
		{"100,300", []int{100, 300}},
		{"100,300:1,3", []int{300, 100, 300, 300}},
	} {
		s, err := ParseSizes(c.in)
		if err != nil {
			t.Fatalf("%q: %v", c.in, err)
		}
		got := s.Pattern()
		if len(got) != len(c.want) {
			t.Fatalf("%q: %v, want %v", c.in, got, c.want)
		}
		hist := map[int]int{}
		for i := range got {
			hist[got[i]]++
			hist[c.want[i]]--
		}
		for k, v := range hist {
			if v != 0 {
				t.Fatalf("%q: %v, want the sizes of %v (size %d off by %d)", c.in, got, c.want, k, v)
			}
		}
	}
	for _, bad := range []string{"", "abc", "20", "1500", "100,200:1", "100:0"} {
		if _, err := ParseSizes(bad); err == nil {
			t.Fatalf("%q accepted", bad)
		}
	}
}

// A count is met exactly, also when it is not a multiple of the ring and
// spans refills, and a far-end XDP counter sees every frame; with more
// flows than ring slots the refills move on to the next flows. Both
// engines: live frames and AF_XDP TX.
func TestSenderSendsCountAcrossFlows(t *testing.T) {
	a, b := netns.ForTest(t, "pga"), netns.ForTest(t, "pgb")
	aIdx, aMAC, bMAC, c := counterLink(t, a, b)
	const nflows, ring, count = 300, 128, 1000
	flows, err := Flows(nflows, DefaultNet())
	if err != nil {
		t.Fatal(err)
	}
	var before uint64
	for _, engine := range []string{EngineLive, EngineAFXDP} {
		var res Result
		var s *Sender
		if err := a.Do(func() (err error) {
			s, err = New(Options{Ifindex: aIdx, Src: aMAC, Dst: bMAC, Flows: flows, Sizes: gen.IMIX(), CPU: -1, Ring: ring, Engine: engine})
			if err != nil {
				return err
			}
			res, err = s.Run(context.Background(), count, 0)
			return err
		}); err != nil {
			t.Fatalf("%s: %v", engine, err)
		}
		defer s.Close()
		if res.Sent != count {
			t.Fatalf("%s: sent %d, want %d", engine, res.Sent, count)
		}
		deadline := time.Now().Add(10 * time.Second)
		var got uint64
		for time.Now().Before(deadline) {
			if got, _, err = c.Read(); err != nil {
				t.Fatal(err)
			}
			if got-before >= count {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if got-before != count {
			t.Fatalf("%s: far end counted %d, want %d", engine, got-before, count)
		}
		before = got
		// 1000 frames = 7 full rings + 104, and 8 fills happened (the
		// last after the partial send): the ring now holds frames
		// 1024..1151, so slot 0 is flow 1024 % 300 = 124.
		f := s.Gen().Frame(0)
		if spi := binary.BigEndian.Uint32(f[42:]); spi != InSPIBase+124 {
			t.Fatalf("%s: after 8 fills slot 0 has SPI 0x%x, want 0x%x", engine, spi, InSPIBase+124)
		}
	}
	if _, err := (&Sender{}).Run(context.Background(), 0, 0); err == nil {
		t.Fatal("Run without a limit accepted")
	}
}

// A paced live-frames run (RunPaced with the live engine) delivers every
// frame of the ring, records each slot's send time in order, and spaces
// them by the schedule: the median gap between consecutive send times is
// the rate's interval (the program spins to each due time; a late slot
// moves the schedule instead of bursting, so no gap is negative). The
// ring starts at FirstFlow.
func TestRunPacedLive(t *testing.T) {
	a, b := netns.ForTest(t, "pla"), netns.ForTest(t, "plb")
	aIdx, aMAC, bMAC, c := counterLink(t, a, b)
	const nflows, ring, rate = 50, 2000, 20000.0
	flows, err := Flows(nflows, DefaultNet())
	if err != nil {
		t.Fatal(err)
	}
	var res Result
	var ns []int64
	var first []byte
	if err := a.Do(func() error {
		s, err := New(Options{Ifindex: aIdx, Src: aMAC, Dst: bMAC, Flows: flows, Sizes: gen.Fixed(200), CPU: -1, Ring: ring, Rate: rate,
			Engine: EngineLive, SendTimes: true, FirstFlow: 7, RealTime: true})
		if err != nil {
			return err
		}
		defer s.Close()
		first = s.Gen().Frame(0)
		res, err = s.RunPaced(context.Background())
		_, ns = s.SendTimes()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if spi := binary.BigEndian.Uint32(first[42:]); spi != InSPIBase+7 {
		t.Fatalf("FirstFlow 7: slot 0 has SPI 0x%x", spi)
	}
	if res.Sent != ring {
		t.Fatalf("sent %d of %d", res.Sent, ring)
	}
	deadline := time.Now().Add(10 * time.Second)
	var got uint64
	for time.Now().Before(deadline) && got < ring {
		if got, _, err = c.Read(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got != ring {
		t.Fatalf("far end counted %d of %d", got, ring)
	}
	gaps := make([]float64, 0, ring-1)
	for i := 1; i < ring; i++ {
		if ns[i] == 0 || ns[i] < ns[i-1] {
			t.Fatalf("slot %d: send time %d after %d", i, ns[i], ns[i-1])
		}
		gaps = append(gaps, float64(ns[i]-ns[i-1]))
	}
	slices.Sort(gaps)
	if med, want := gaps[len(gaps)/2], 1e9/rate; med < 0.9*want || med > 1.1*want {
		t.Fatalf("median gap %.0f ns, want %.0f ± 10%%", med, want)
	}
}

// counterLink joins a and b by a veth pair, attaches a UDP-4500 frame
// counter to b's end, and returns a's ifindex, both MACs and the counter.
func counterLink(t *testing.T, a, b *netns.NS) (int, net.HardwareAddr, net.HardwareAddr, *gen.Counter) {
	t.Helper()
	aIf, bIf := netns.VethForTest(t, a, b)
	var aIdx, bIdx int
	var aMAC, bMAC net.HardwareAddr
	for _, e := range []struct {
		ns  *netns.NS
		dev string
		idx *int
		mac *net.HardwareAddr
	}{{a, aIf, &aIdx, &aMAC}, {b, bIf, &bIdx, &bMAC}} {
		if err := e.ns.Do(func() error {
			i, err := net.InterfaceByName(e.dev)
			if err != nil {
				return err
			}
			*e.idx, *e.mac = i.Index, i.HardwareAddr
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	c, err := gen.NewCounter(esp.NATTPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := b.Do(func() error {
		l, err := link.AttachXDP(link.XDPOptions{Program: c.Prog, Interface: bIdx, Flags: link.XDPDriverMode})
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return aIdx, aMAC, bMAC, c
}
