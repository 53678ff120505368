package worker

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
)

// benchSACounts are the table sizes of the many-SA benchmarks: one SA (its
// state always in cache) and enough that the SAs' state is far larger
// than the last-level cache, each batch's 64 frames going to 64 different
// SAs round-robin, as a million phones' packets do.
var benchSACounts = []int{1, 200_000}

// benchKey is SA i's key || salt: every SA has its own cipher state.
func benchKey(i int) []byte {
	k := make([]byte, 20)
	binary.BigEndian.PutUint64(k, uint64(i)*0x9e3779b97f4a7c15+1)
	return k
}

// BenchmarkDecapSAs is BenchmarkDecapBatch over n SAs: per-packet decap
// work on 64-frame batches of 200-byte inner packets, frame i of batch k
// for SA (64k+i) mod n. Each SA's cipher is built before timing (they all
// carry traffic). Windows are off, as in BenchmarkDecapBatch, so the same
// sealed frames open again. Compare ns/op across n: the cost of the
// per-SA state falling out of cache.
func BenchmarkDecapSAs(b *testing.B) {
	for _, n := range benchSACounts {
		b.Run(fmt.Sprintf("sas=%d", n), func(b *testing.B) { benchDecapSAs(b, n) })
	}
}

func benchDecapSAs(b *testing.B, n int) {
	const batch, inner = 64, 200
	u, err := xsk.New(xsk.Config{FrameCount: 2 * batch, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64})
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	var st Stats
	nb := &mapNeighbors{}
	nm := map[[16]byte][6]byte{netip.MustParseAddr("10.0.0.1").As16(): {2, 0, 0, 0, 0, 1}}
	nb.m.Store(&nm)
	p := pipeline{mem: u, nb: nb, stats: &st,
		bindEvents: make(chan BindingChange, 1), seqRequests: make(chan SeqRequest)}
	src := netip.MustParseAddr("192.0.2.10")
	rxOff := uint64(u.RxOffset())
	saved := make([][]byte, n)
	scratch := make([]byte, 4096)
	for i := range n {
		c := esp.Config{SPI: 0x100000 + uint32(i), Proposal: esp.AES128GCM16, EncKey: benchKey(i), Mode: esp.ModeTunnel}
		phone, err := esp.NewTransform(c)
		if err != nil {
			b.Fatal(err)
		}
		e := newBenchSlot(b, c)
		e.Dir, e.index = Inbound, uint32(i)
		e.SetSelectors(netip.PrefixFrom(benchInner(i), 32), netip.Addr{})
		e.Binding = NewBinding(Peer{Addr: netip.AddrPortFrom(src, 4500), MAC: [6]byte{2, 0, 0, 0, 0, 2}, HasMAC: true})
		p.table = append(p.table, e)

		frame := scratch
		clear(frame)
		l3 := ethLen
		pay := l3 + 20 + phone.Headroom()
		ip := frame[pay : pay+inner]
		ip[0], ip[8], ip[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(ip[2:], inner)
		a := benchInner(i).As4()
		copy(ip[12:16], a[:])
		copy(ip[16:20], []byte{10, 0, 0, 1})
		binary.BigEndian.PutUint16(ip[20:], 5060)
		binary.BigEndian.PutUint16(ip[22:], 5060)
		start, end, err := phone.Seal(frame, pay, inner, esp.NextHeaderIPv4, 0)
		if err != nil {
			b.Fatal(err)
		}
		if s, err := esp.PutOuter(frame, start, end, &esp.Outer{Src: src, Dst: netip.MustParseAddr("192.0.2.1")}); err != nil || s != l3 {
			b.Fatalf("outer at %d: %v", s, err)
		}
		copy(frame[6:12], []byte{2, 0, 0, 0, 0, 2})
		saved[i] = append([]byte(nil), frame[:end]...)
	}
	rx := make([]xsk.Desc, batch)
	for i := range rx {
		rx[i] = xsk.Desc{Addr: uint64(i)*4096 + rxOff}
	}
	// Every frame has the same outer header: what XDP would write in
	// front of one (completeMeta) serves all, with each SA's slot.
	copy(u.Frame(rx[0].Addr)[rxOff:], saved[0])
	rx[0].Len = uint32(len(saved[0]))
	meta := func(d xsk.Desc) *bpf.Meta { return (*bpf.Meta)(unsafe.Pointer(&u.Meta(d.Addr, bpf.MetaSize)[0])) }
	*meta(rx[0]) = bpf.Meta{L3Off: ethLen, Kind: uint8(bpf.MetaESP)}
	completeMeta(u, rx[0])
	tmpl := *meta(rx[0])
	load := func(k int) {
		for i := range rx {
			s := (k*batch + i) % n
			copy(u.Frame(rx[i].Addr)[rxOff:], saved[s])
			rx[i].Len = uint32(len(saved[s]))
			m := meta(rx[i])
			*m = tmpl
			m.SaIndex = uint32(s)
		}
	}
	driveSAs(b, n, rx, inner, load, p.decap, "forwarded")
}

// BenchmarkEncapSAs is BenchmarkEncapBatch over n SAs, as
// BenchmarkDecapSAs: each frame's cleartext goes to the phone of its SA.
func BenchmarkEncapSAs(b *testing.B) {
	for _, n := range benchSACounts {
		b.Run(fmt.Sprintf("sas=%d", n), func(b *testing.B) { benchEncapSAs(b, n) })
	}
}

func benchEncapSAs(b *testing.B, n int) {
	const batch, inner = 64, 200
	u, err := xsk.New(xsk.Config{FrameCount: 2 * batch, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64})
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	var st Stats
	p := pipeline{mem: u, nb: &mapNeighbors{}, stats: &st,
		bindEvents: make(chan BindingChange, 1), seqRequests: make(chan SeqRequest)}
	rxOff := uint64(u.RxOffset())
	p.frag = fragmenter{mtu: 1500, mem: u, rxOff: rxOff, stride: 1}
	phone := netip.MustParseAddr("192.0.2.10")
	saved := make([][]byte, n)
	for i := range n {
		c := esp.Config{SPI: 0x200000 + uint32(i), Proposal: esp.AES128GCM16, EncKey: benchKey(i), Mode: esp.ModeTunnel}
		e := newBenchSlot(b, c)
		e.Dir, e.index = Outbound, uint32(i)
		e.LocalPort = 4500
		e.SetScope(Scope{Local: netip.MustParseAddr("192.0.2.1")})
		e.SetSelectors(netip.PrefixFrom(benchInner(i), 32), netip.Addr{})
		e.Binding = NewBinding(Peer{Addr: netip.AddrPortFrom(phone, 4500), MAC: [6]byte{2, 0, 0, 0, 0, 2}, HasMAC: true})
		p.table = append(p.table, e)

		frame := make([]byte, bpf.MetaSize+ethLen+inner)
		m := (*bpf.Meta)(unsafe.Pointer(&frame[0]))
		// What XDP writes for a cleartext IPv4 frame (completeMeta).
		*m = bpf.Meta{SaIndex: uint32(i), L3Off: ethLen, L4Off: ethLen + 20, L3Len: inner, Family: 4, Kind: uint8(bpf.MetaClear), Magic: bpf.MetaMagic}
		f := frame[bpf.MetaSize:]
		binary.BigEndian.PutUint16(f[12:], 0x0800)
		ip := f[ethLen:]
		ip[0], ip[8], ip[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(ip[2:], inner)
		copy(ip[12:16], []byte{10, 0, 0, 1})
		a := benchInner(i).As4()
		copy(ip[16:20], a[:])
		binary.BigEndian.PutUint16(ip[20:], 5060)
		binary.BigEndian.PutUint16(ip[22:], 5060)
		saved[i] = frame
	}
	rx := make([]xsk.Desc, batch)
	for i := range rx {
		rx[i] = xsk.Desc{Addr: uint64(i)*4096 + rxOff, Len: ethLen + inner}
	}
	load := func(k int) {
		for i := range rx {
			// Sealing writes the outer headers over the metadata in front.
			copy(u.Frame(rx[i].Addr)[rxOff-bpf.MetaSize:], saved[(k*batch+i)%n])
		}
	}
	driveSAs(b, n, rx, inner, load, p.encap, "sealed")
}

// cpuClock is the benchmark thread's CPU time: on a shared machine,
// wall-clock ns/op counts the time other processes held the CPU, CPU
// time only this thread's (cache pollution by others remains).
type cpuClock struct{ t0 int64 }

func startCPU() cpuClock {
	runtime.LockOSThread()
	return cpuClock{threadCPU()}
}

// report adds cpu_ns/op and unlocks the thread.
func (c cpuClock) report(b *testing.B) {
	b.StopTimer()
	d := threadCPU() - c.t0
	runtime.UnlockOSThread()
	if n := b.N / 64 * 64; n > 0 {
		b.ReportMetric(float64(d)/float64(n), "cpu_ns/op")
	}
}

func threadCPU() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}

// benchInner is SA i's phone's inner address.
func benchInner(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)})
}

// driveSAs runs one pass over all n SAs, so every SA carries a packet and
// its cipher is built, then times b.N packets: load(k) fills rx with
// round k's batch, run processes it, and every packet must come out (what
// says what that means in a failure).
func driveSAs(b *testing.B, n int, rx []xsk.Desc, inner int, load func(k int),
	run func(rx, tx []xsk.Desc, drop []uint64) ([]xsk.Desc, []uint64), what string) {
	b.Helper()
	batch := len(rx)
	tx := make([]xsk.Desc, 0, batch)
	drop := make([]uint64, 0, batch)
	for k := range (n + batch - 1) / batch {
		load(k)
		if tx, drop = run(rx, tx[:0], drop[:0]); len(tx) != batch {
			b.Fatalf("warm-up: %s %d of %d", what, len(tx), batch)
		}
	}
	runtime.GC()
	b.SetBytes(int64(inner))
	b.ReportAllocs()
	cpu := startCPU()
	var piped time.Duration
	b.ResetTimer()
	for k := range b.N / batch {
		load(k)
		t0 := time.Now()
		tx, drop = run(rx, tx[:0], drop[:0])
		piped += time.Since(t0)
		if len(tx) != batch {
			b.Fatalf("%s %d of %d (drops %d)", what, len(tx), batch, len(drop))
		}
	}
	cpu.report(b)
	// ns/op also counts load's copy of each SA's frame, which misses
	// the cache at many SAs as the per-SA state does; the worker's own
	// share is the pipeline's time alone.
	b.ReportMetric(float64(piped.Nanoseconds())/float64(b.N), "pipeline_ns/op")
}
