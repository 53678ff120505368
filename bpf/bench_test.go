package bpf_test

import (
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

// benchMode says how BPF_PROG_TEST_RUN repeats the program.
type benchMode int

const (
	// repeatLoop: one syscall, the kernel's repeat loop. Runs share one
	// frame, so only paths that leave the frame alone can use it.
	repeatLoop benchMode = iota
	// singleRuns: one syscall per packet with a fresh copy of the frame,
	// averaging the kernel's own per-run timer (syscall cost excluded,
	// one clock read included). Needed for the strip and metadata paths:
	// in a repeat loop the strip and adjust_meta compound (the 32-byte
	// metadata limit aborts the third run), and live-frames mode restores
	// the frame pointers but not the moved bytes.
	singleRuns
)

// benchProgram reports ns per packet and checks afterwards that every run
// took the path named by want: a benchmark of the wrong path would be a
// fake figure.
func benchProgram(b *testing.B, prog *ebpf.Program, set *maps.Set, pkt []byte, want bpf.Reason, wantVerdict uint32, mode benchMode) {
	var before, after maps.Snapshot
	if err := set.Counters.Read(&before); err != nil {
		b.Fatal(err)
	}
	var (
		per time.Duration
		ret uint32
		err error
	)
	b.ResetTimer()
	switch mode {
	case repeatLoop:
		ret, per, err = prog.Benchmark(pkt, b.N, b.ResetTimer)
	case singleRuns:
		var total time.Duration
		for i := 0; i < b.N && err == nil; i++ {
			var d time.Duration
			ret, d, err = prog.Benchmark(pkt, 1, nil)
			total += d
			if err == nil && ret != wantVerdict {
				break
			}
		}
		per = total / time.Duration(b.N)
	}
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	if ret != wantVerdict {
		b.Fatalf("verdict %s, want %s", verdictName(ret), verdictName(wantVerdict))
	}
	if err := set.Counters.Read(&after); err != nil {
		b.Fatal(err)
	}
	d := after.Sub(&before)
	if d[want].Packets < uint64(b.N) {
		for r, c := range d {
			if c.Packets != 0 {
				b.Logf("%s: %d", bpf.Reason(r), c.Packets)
			}
		}
		b.Fatalf("%s counted %d of %d runs", want, d[want].Packets, b.N)
	}
	b.ReportMetric(float64(per.Nanoseconds()), "ns/pkt")
}

// fillSAs puts n SAs with SPIs 0x100.. into the map in batches, all on
// worker 0.
func fillSAs(b *testing.B, set *maps.Set, n int) {
	spis := make([]uint32, n)
	sas := make([]bpf.SASteer, n)
	for i := range spis {
		spis[i] = uint32(0x100 + i)
		sas[i] = bpf.SASteer{SaIndex: uint32(i)}
	}
	if err := set.SAs.PutBatch(spis, sas); err != nil {
		b.Fatal(err)
	}
}

func espPacket(b *testing.B, spi uint32, size int) []byte {
	i := ip4(layers.IPProtocolUDP)
	return serialize(b, eth(layers.EthernetTypeIPv4), i, udp(i, phonePort, natt), espBody(spi, 1, size-14-20-8-8))
}

func BenchmarkPublic(b *testing.B) {
	objs, set := loadObjects(b, 1<<20)
	ns := netns.ForTest(b, "xbpb")
	if err := set.XSKPublic.Set(0, xskSocket(b, ns, "lo", 0)); err != nil {
		b.Fatal(err)
	}
	plain := func(spi uint32) []byte {
		body := espBody(spi, 1, 200-14-20-8)
		return serialize(b, eth(layers.EthernetTypeIPv4), ip4(layers.IPProtocolESP), body)
	}
	keepalive := func() []byte {
		i := ip4(layers.IPProtocolUDP)
		return serialize(b, eth(layers.EthernetTypeIPv4), i, udp(i, phonePort, natt), gopacket.Payload{0xff})
	}()

	b.Run("esp-udp-1sa", func(b *testing.B) {
		fillSAs(b, set, 1)
		benchProgram(b, objs.XespPublic, set, espPacket(b, 0x100, 200), bpf.RedirectESPUDP, xdpRedirect, singleRuns)
	})
	b.Run("plain-esp-1sa", func(b *testing.B) {
		benchProgram(b, objs.XespPublic, set, plain(0x100), bpf.RedirectESP, xdpRedirect, singleRuns)
	})
	b.Run("keepalive-drop", func(b *testing.B) {
		benchProgram(b, objs.XespPublic, set, keepalive, bpf.DropKeepalive, xdpDrop, repeatLoop)
	})
	b.Run("keepalive-drop-single", func(b *testing.B) {
		benchProgram(b, objs.XespPublic, set, keepalive, bpf.DropKeepalive, xdpDrop, singleRuns)
	})
	b.Run("esp-udp-1M-sa", func(b *testing.B) {
		fillSAs(b, set, 1_000_000)
		// A SPI in the middle of the range: lookups cost the same for any
		// key in a hash map, but this one is certainly among the million.
		benchProgram(b, objs.XespPublic, set, espPacket(b, 0x100+654321, 200), bpf.RedirectESPUDP, xdpRedirect, singleRuns)
	})
	b.Run("plain-esp-1M-sa", func(b *testing.B) {
		benchProgram(b, objs.XespPublic, set, plain(0x100+654321), bpf.RedirectESP, xdpRedirect, singleRuns)
	})
	b.Run("unknown-spi-1M-sa", func(b *testing.B) {
		benchProgram(b, objs.XespPublic, set, espPacket(b, 0x0badc0de, 200), bpf.DropNoSA, xdpDrop, repeatLoop)
	})
}
