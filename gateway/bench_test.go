package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xesp/xesp/internal/pkt"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bench/benchnet"
	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/xsktest"
	"github.com/xesp/xesp/maps"
)

// CPU placement of the path benchmark. The generator's thread runs on
// genCPU, and with it, in softirq, the receiving veth's XDP program and
// the AF_XDP copy into the UMEM. Every other thread of the process — the
// worker, the manager, the resolver, the Go runtime and GC — is pinned to
// gwCPU, where the worker's transmit also runs the far end's counter
// (veth delivers to its peer's XDP in the sender's context).
const (
	genCPU = 0
	gwCPU  = 1

	benchPairs  = 64    // SA pairs (phones) in the path benchmark
	benchRing   = 32768 // frames per Send: each with its own sequence number
	roundsPerOp = 8     // Sends per benchmark op: ~262K frames per phase
	decapPort   = 5060  // inner UDP destination (the core's SIP port)
)

// benchTopo is bench/benchnet's phone ─ gw ─ core topology (the one the
// benchmark harness uses), removed when the benchmark ends.
type benchTopo struct{ *benchnet.Topo }

type benchEnd = benchnet.End

func newBenchTopo(tb testing.TB) *benchTopo {
	tb.Helper()
	n, err := benchnet.New("gb")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { n.Close() })
	return &benchTopo{n}
}

// start runs a gateway on the topology with the given extra config (an
// `sas:` block or nothing) and stops it when the benchmark ends.
func (tp *benchTopo) start(tb testing.TB, workers int, extra string) *Gateway {
	tb.Helper()
	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1]}
private: {interface: %s, next_hop_mac: "%s"}
workers: %d
state_dir: %s
%s`, tp.Pub.Name, tp.Priv.Name, tp.Co.MAC, workers, tb.TempDir(), extra)
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		tb.Fatal(err)
	}
	var g *Gateway
	if err := tp.GW.Do(func() (err error) {
		g, err = Start(context.Background(), cfg, Options{NoPin: true})
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := g.Stop(false); err != nil {
			tb.Errorf("stop gateway: %v", err)
		}
	})
	return g
}

// attachXDP attaches prog to e in driver mode; the returned func detaches.
func attachXDP(tb testing.TB, e benchEnd, prog *ebpf.Program) func() {
	tb.Helper()
	l, err := benchnet.Attach(e, prog)
	if err != nil {
		tb.Fatal(err)
	}
	var once sync.Once
	detach := func() { once.Do(func() { l.Close() }) }
	tb.Cleanup(detach)
	return detach
}

// phase is what one measured phase sent and what arrived at its far end.
type phase struct {
	offered, delivered uint64
	// send is the time the generator spent sending; busy runs from each
	// Send's start to the last frame counted at the far end.
	send, busy time.Duration
}

func (p phase) offeredPPS() float64   { return float64(p.offered) / p.send.Seconds() }
func (p phase) deliveredPPS() float64 { return float64(p.delivered) / p.busy.Seconds() }
func (p phase) loss() float64 {
	if p.offered == 0 {
		return 0
	}
	return 100 * (1 - float64(p.delivered)/float64(p.offered))
}

func (p phase) report(b *testing.B) {
	b.ReportMetric(p.offeredPPS(), "offered_pps")
	b.ReportMetric(p.deliveredPPS(), "delivered_pps")
	b.ReportMetric(p.loss(), "loss%")
	// ns/op is meaningless here: an op is a ring of sends plus refills.
	b.ReportMetric(0, "ns/op")
}

// run sends rounds rings from g (in ns, the thread pinned to genCPU) and
// after each waits until count, the far end's cumulative counter, stops
// moving. ESP rings are refilled before every Send, outside the timing.
func run(b *testing.B, ns *netns.NS, g *gen.Gen, isESP bool, rounds int, count func() (uint64, error)) phase {
	b.Helper()
	var p phase
	for range rounds {
		if isESP {
			if err := g.Refill(); err != nil {
				b.Fatal(err)
			}
		}
		before, err := count()
		if err != nil {
			b.Fatal(err)
		}
		if err := ns.Do(func() error {
			restore, err := gen.PinThread(genCPU)
			if err != nil {
				return err
			}
			defer restore()
			t0 := time.Now()
			n, el, err := g.Send()
			if err != nil {
				return err
			}
			// Drain: the worker may still be working through its rings.
			last, tLast := before, t0.Add(el)
			for {
				c, err := count()
				if err != nil {
					return err
				}
				now := time.Now()
				if c != last {
					last, tLast = c, now
				}
				if c-before >= uint64(n) || now.Sub(tLast) > 20*time.Millisecond {
					break
				}
				time.Sleep(200 * time.Microsecond)
			}
			p.offered += uint64(n)
			p.delivered += last - before
			p.send += el
			p.busy += max(tLast.Sub(t0), el)
			return nil
		}); err != nil {
			b.Fatal(err)
		}
	}
	return p
}

// afxdpReader is the AF_XDP receive-only ceiling: one socket on the
// link's queue 0 behind a steering program for port, a loop on gwCPU that
// takes frames and gives them straight back to the fill ring.
type afxdpReader struct {
	u        *xsk.UMEM
	s        *xsk.Socket
	st       *xsktest.Steer
	detach   func()
	stop     atomic.Bool
	received atomic.Uint64
	wg       sync.WaitGroup
}

func startReader(b *testing.B, e benchEnd, port uint16) *afxdpReader {
	b.Helper()
	// The gateway's own UMEM and ring sizes (config defaults), so the
	// ceiling and xesp absorb bursts alike.
	d := config.Defaults().UMEM
	u, err := xsk.New(xsk.Config{FrameSize: uint32(d.FrameSize), FrameCount: uint32(d.Frames),
		FillSize: uint32(d.FillRing), CompletionSize: uint32(d.CompletionRing), RxSize: uint32(d.RXRing), TxSize: uint32(d.TXRing)})
	if err != nil {
		b.Fatal(err)
	}
	r := &afxdpReader{u: u}
	if r.st, err = xsktest.NewSteer(port, 1, 1); err != nil {
		u.Close()
		b.Fatal(err)
	}
	if err := e.NS.Do(func() (err error) { r.s, err = u.Open(e.Index, 0); return err }); err != nil {
		r.close()
		b.Fatal(err)
	}
	if err := r.st.Set(0, 0, r.s.FD()); err != nil {
		r.close()
		b.Fatal(err)
	}
	r.detach = attachXDP(b, e, r.st.Prog)
	p := u.NewPool()
	if _, err := r.s.Refill(p, 0); err != nil {
		r.close()
		b.Fatal(err)
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if _, err := gen.PinThread(gwCPU); err != nil {
			b.Error(err)
			return
		}
		batch := make([]xsk.Desc, 64)
		for !r.stop.Load() {
			n := r.s.Receive(batch)
			if n > 0 {
				r.received.Add(uint64(n))
				p.PutDescs(batch[:n])
			}
			r.s.Refill(p, 0)
		}
		p.Close()
	}()
	return r
}

func (r *afxdpReader) count() (uint64, error) { return r.received.Load(), nil }

// close stops the loop and frees the socket so the gateway can bind the
// same queue: the XSK map entry holds the socket until deleted.
func (r *afxdpReader) close() {
	r.stop.Store(true)
	r.wg.Wait()
	if r.detach != nil {
		r.detach()
	}
	if r.s != nil {
		r.st.Clear(0, 0)
		r.s.Close()
	}
	r.st.Close()
	r.u.Close()
}

// benchKey derives a distinct 20-byte aes128gcm16 key||salt per SA.
func benchKey(dir byte, i int) string {
	return fmt.Sprintf("%02x%030x%08x", dir, i+1, 0x5a17_0000+i)
}

func benchInner(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 99, byte(i >> 8), byte(i)})
}

// benchSAs is the config block of the path benchmark's SA pairs.
func benchSAs(n int) string {
	var sb strings.Builder
	sb.WriteString("sas:\n")
	for i := range n {
		for _, d := range []struct {
			dir  string
			spi  int
			kind byte
		}{{"in", 0x10000 + i, 'i'}, {"out", 0x20000 + i, 'o'}} {
			fmt.Fprintf(&sb, "  - {spi: %d, direction: %s, mode: tunnel, proposal: aes128gcm16, enc_key: %s, local: 192.0.2.1, peer: 192.0.2.10, encap: {}, inner: {local: 10.0.0.0/24, peer: %s/32}}\n",
				d.spi, d.dir, benchKey(d.kind, i), benchInner(i))
		}
	}
	return sb.String()
}

// BenchmarkGatewayPath measures, in one run on one topology, the ceilings
// of the gateway's links and xesp's decap and encap through them, with the
// live-frames generator (bench/gen) pinned to CPU 0 and the whole gateway
// process pinned to CPU 1, 1 worker, 64 SA pairs. Sizes are inner IP
// packet bytes (200 and 1400); decap frames carry ESP-in-UDP around them,
// encap frames are the cleartext packets.
//
//	ceiling/xdp_drop/{public,private}/N: XDP counter/dropper on the gateway's link
//	ceiling/afxdp_rx/{public,private}/N: AF_XDP receive-only on the same link
//	xesp/decap/N: phone → gw → core, counted by an XDP counter on the core's veth
//	xesp/encap/N: core → gw → phone, counted on the phone's veth
//
// Every phase reports offered and delivered packets/s and loss; xesp
// phases add the ratio of delivered packets/s to both ceilings of the link
// they arrive on. The public ceilings use the decap phase's ESP frames,
// the private ones the encap phase's cleartext frames.
func BenchmarkGatewayPath(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs 2 CPUs to pin generator and gateway apart")
	}
	tp := newBenchTopo(b)
	unpin, err := benchnet.PinProcess(gwCPU)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(unpin)

	// The phones' sides of the inbound SAs seal the decap traffic.
	outer := esp.Outer{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("192.0.2.1"), Encap: true, SrcPort: 4500, DstPort: 4500}
	var espFlows, clearFlows []gen.Flow
	for i := range benchPairs {
		k, _ := hexBytes(benchKey('i', i))
		s, err := esp.NewTransform(esp.Config{SPI: uint32(0x10000 + i), Proposal: esp.AES128GCM16, EncKey: k, Mode: esp.ModeTunnel})
		if err != nil {
			b.Fatal(err)
		}
		espFlows = append(espFlows, gen.Flow{SA: s, Outer: outer,
			Src: netip.AddrPortFrom(benchInner(i), decapPort), Dst: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), decapPort)})
		clearFlows = append(clearFlows, gen.Flow{
			Src: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), decapPort), Dst: netip.AddrPortFrom(benchInner(i), decapPort)})
	}
	newGen := func(e benchEnd) *gen.Gen {
		var g *gen.Gen
		if err := e.NS.Do(func() (err error) {
			g, err = gen.New(gen.Options{Ifindex: e.Index, Ring: benchRing})
			return err
		}); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { g.Close() })
		return g
	}
	phoneGen, coreGen := newGen(tp.Ph), newGen(tp.Co)
	sizes := []int{200, 1400}
	load := func(size int) {
		if err := phoneGen.LoadESP(gen.L2{Src: tp.Ph.MAC, Dst: tp.Pub.MAC}, espFlows, gen.Fixed(size)); err != nil {
			b.Fatal(err)
		}
		if err := coreGen.LoadClear(gen.L2{Src: tp.Co.MAC, Dst: tp.Priv.MAC}, clearFlows, gen.Fixed(size)); err != nil {
			b.Fatal(err)
		}
		b.Logf("%d B inner: decap frame %d B, encap frame %d B", size, len(phoneGen.Frame(0)), len(coreGen.Frame(0)))
	}

	type ceilingKey struct {
		kind, link string
		size       int
	}
	ceilings := map[ceilingKey]float64{}
	for _, size := range sizes {
		load(size)
		for _, l := range []struct {
			name  string
			e     benchEnd
			ns    *netns.NS
			g     *gen.Gen
			port  uint16
			isESP bool
		}{{"public", tp.Pub, tp.Phone, phoneGen, esp.NATTPort, true}, {"private", tp.Priv, tp.Core, coreGen, decapPort, false}} {
			b.Run(fmt.Sprintf("ceiling/xdp_drop/%s/%d", l.name, size), func(b *testing.B) {
				c, err := gen.NewCounter(l.port)
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				detach := attachXDP(b, l.e, c.Prog)
				defer detach()
				p := run(b, l.ns, l.g, l.isESP, roundsPerOp*b.N, func() (uint64, error) { n, _, err := c.Read(); return n, err })
				p.report(b)
				ceilings[ceilingKey{"xdp_drop", l.name, size}] = p.deliveredPPS()
			})
			b.Run(fmt.Sprintf("ceiling/afxdp_rx/%s/%d", l.name, size), func(b *testing.B) {
				r := startReader(b, l.e, l.port)
				defer r.close()
				p := run(b, l.ns, l.g, l.isESP, roundsPerOp*b.N, r.count)
				st, _ := r.s.Stats()
				b.Logf("afxdp_rx %s %d: %+v", l.name, size, st)
				p.report(b)
				ceilings[ceilingKey{"afxdp_rx", l.name, size}] = p.deliveredPPS()
			})
		}
	}

	g := tp.start(b, 1, benchSAs(benchPairs))
	decapCount, err := gen.NewCounter(decapPort)
	if err != nil {
		b.Fatal(err)
	}
	defer decapCount.Close()
	attachXDP(b, tp.Co, decapCount.Prog)
	encapCount, err := gen.NewCounter(esp.NATTPort)
	if err != nil {
		b.Fatal(err)
	}
	defer encapCount.Close()
	attachXDP(b, tp.Ph, encapCount.Prog)
	read := func(c *gen.Counter) func() (uint64, error) {
		return func() (uint64, error) { n, _, err := c.Read(); return n, err }
	}
	ratios := func(b *testing.B, p phase, link string, size int) {
		for _, kind := range []string{"afxdp_rx", "xdp_drop"} {
			if c := ceilings[ceilingKey{kind, link, size}]; c > 0 {
				b.ReportMetric(p.deliveredPPS()/c, "ratio_"+kind)
			}
		}
	}
	for _, size := range sizes {
		load(size)
		// Decap first: its authenticated packets teach the outbound SAs'
		// bindings the phone's MAC, which encap then uses.
		b.Run(fmt.Sprintf("xesp/decap/%d", size), func(b *testing.B) {
			before := snapshotWorkers(g)
			p := run(b, tp.Phone, phoneGen, true, roundsPerOp*b.N, read(decapCount))
			logWorkers(b, g, before)
			p.report(b)
			ratios(b, p, "public", size)
		})
		b.Run(fmt.Sprintf("xesp/encap/%d", size), func(b *testing.B) {
			before := snapshotWorkers(g)
			p := run(b, tp.Core, coreGen, false, roundsPerOp*b.N, read(encapCount))
			logWorkers(b, g, before)
			p.report(b)
			ratios(b, p, "private", size)
		})
	}
}

func hexBytes(s string) ([]byte, error) {
	out := make([]byte, len(s)/2)
	for i := range out {
		v, err := strconv.ParseUint(s[2*i:2*i+2], 16, 8)
		if err != nil {
			return nil, err
		}
		out[i] = byte(v)
	}
	return out, nil
}

// workerFigures is what the worker counted, to explain a phase's loss.
type workerFigures struct {
	decap, encap uint64
	drops        map[string]uint64
}

func snapshotWorkers(g *Gateway) workerFigures {
	f := workerFigures{drops: map[string]uint64{}}
	for _, w := range g.Workers {
		st := w.Stats()
		f.decap += st.Decap.Packets.Load()
		f.encap += st.Encap.Packets.Load()
		for dir, d := range map[string]*worker.DirStats{"decap": &st.Decap, "encap": &st.Encap} {
			for r := range d.Drops {
				if n := d.Drops[r].Load(); n > 0 {
					f.drops[dir+" "+worker.Drop(r).String()] += n
				}
			}
		}
	}
	return f
}

func logWorkers(b *testing.B, g *Gateway, before workerFigures) {
	now := snapshotWorkers(g)
	var drops []string
	for k, v := range now.drops {
		if d := v - before.drops[k]; d > 0 {
			drops = append(drops, fmt.Sprintf("%s %d", k, d))
		}
	}
	var rx []string
	for w, s := range g.Sockets {
		for i, sock := range s {
			if st, err := sock.Stats(); err == nil {
				rx = append(rx, fmt.Sprintf("w%d/%s %+v", w, [2]string{"pub", "priv"}[i], st))
			}
		}
	}
	b.Logf("worker forwarded decap %d encap %d; drops [%s]; sockets (cumulative) %s",
		now.decap-before.decap, now.encap-before.encap, strings.Join(drops, ", "), strings.Join(rx, "; "))
}

// BenchmarkLoadSAs loads 1,000,000 SA pairs (1,000,000 inbound in the SA
// map, 1,000,000 outbound in the policy trie) into a running gateway with
// one worker: SAD.AddAll, then the manager's mirroring into the worker
// and the BPF maps, timed apart; the Go heap each SA keeps; the kernel
// memory of the two maps. Then one packet each way for a random pair
// proves XDP steers with the full tables.
func BenchmarkLoadSAs(b *testing.B) {
	if testing.Short() {
		b.Skip("loads 2,000,000 SAs; skipped under -short")
	}
	pairs, err := pktgen.LoadPairs(1_000_000) // fewer for iterating on the heap figure
	if err != nil {
		b.Fatal(err)
	}
	tp := newBenchTopo(b)
	g := tp.start(b, 1, "")
	if g.Config.MaxSAs < pairs {
		b.Fatalf("max_sas %d < %d", g.Config.MaxSAs, pairs)
	}

	runtime.GC()
	var m0 runtime.MemStats
	runtime.ReadMemStats(&m0)

	sas := parsePairs(b, pairs)
	total := len(sas)

	b.ResetTimer()
	t0 := time.Now()
	if err := g.SAD.AddAll(sas); err != nil {
		b.Fatal(err)
	}
	tSAD := time.Since(t0)
	// The gateway's manager goroutine picks the change up (Sync must not
	// be called beside it). It counts an SA installed once its worker
	// holds it, and publishes to the BPF maps after that, policies first
	// and the inbound SA map last: the sync is over when the SA map holds
	// every inbound SA.
	t1 := time.Now()
	tInstall := waitLoaded(b, g, pairs, t1, 5*time.Minute)
	tSync := time.Since(t1)
	b.StopTimer()
	in, out := g.SAD.Len()
	if in != pairs || out != pairs {
		b.Fatalf("SAD holds %d in, %d out", in, out)
	}
	sas = nil
	// The heap the SAs hold, not what the state snapshot holds while it
	// journals the load (a feed overrun journals every SA) and compacts:
	// measured once a snapshot begun after the load is done.
	runtime.GC()
	var mLoad runtime.MemStats
	runtime.ReadMemStats(&mLoad)
	for p0, t2 := g.Persisted.Load(), time.Now(); g.Persisted.Load() < p0+2; time.Sleep(10 * time.Millisecond) {
		if time.Since(t2) > 5*time.Minute {
			b.Fatalf("no state snapshot completed in 5 minutes after the load")
		}
	}
	runtime.GC()
	var m1 runtime.MemStats
	runtime.ReadMemStats(&m1)
	b.Logf("heap in use right after the load %d MiB (snapshot of the load in progress), after its snapshot %d MiB", mLoad.HeapInuse>>20, m1.HeapInuse>>20)
	// XESP_HEAPPROFILE=file writes the heap profile at this point, with
	// every SA loaded: -memprofile is taken after the gateway stopped.
	if path := os.Getenv("XESP_HEAPPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}

	b.ReportMetric(float64(total)/tSAD.Seconds(), "sad_add_SAs/s")
	b.ReportMetric(float64(total)/tSync.Seconds(), "manager_sync_SAs/s")
	b.ReportMetric(float64(total)/(tSAD+tSync).Seconds(), "total_SAs/s")
	b.ReportMetric(float64(int64(m1.HeapInuse)-int64(m0.HeapInuse))/float64(total), "heap_B/SA")
	// The live bytes alone: heap_B/SA minus this is what half-empty spans
	// cost (garbage of a size class allocated in step with live objects
	// of that class; docs/architecture.md "Per-SA state").
	b.ReportMetric(float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc))/float64(total), "heap_live_B/SA")
	if os.Getenv("XESP_HEAPDEBUG") != "" {
		// Live objects per size class, the ones that add up per SA.
		for i := range m1.BySize {
			c1, c0 := m1.BySize[i], m0.BySize[i]
			live := int64(c1.Mallocs-c1.Frees) - int64(c0.Mallocs-c0.Frees)
			if live*int64(c1.Size) > int64(total)*2 {
				b.Logf("class %5d: live %9d objs %8.1f B/SA", c1.Size, live, float64(live*int64(c1.Size))/float64(total))
			}
		}
	}
	var kernel uint64
	for _, m := range []*ebpf.Map{g.Maps.SAs.Map(), g.Maps.Policies.Map()} {
		if info, err := m.Info(); err == nil {
			if ml, ok := info.Memlock(); ok {
				kernel += ml
			}
		}
	}
	b.ReportMetric(float64(kernel)/float64(pairs), "bpf_B/pair")
	b.ReportMetric(0, "ns/op")
	b.Logf("%d SAs: SAD.AddAll %v, manager sync %v (workers hold all after %v, then BPF maps); heap in use %d → %d MiB; SA map + policy trie memlock %d MiB",
		total, tSAD, tSync, tInstall, m0.HeapInuse>>20, m1.HeapInuse>>20, kernel>>20)

	// One packet each way for a random pair, through the full tables.
	r := rand.IntN(pairs)
	innerAddr := netip.AddrFrom4([4]byte{100, 64 + byte(r>>16), byte(r >> 8), byte(r)})
	kin, _ := hexBytes(benchKey('i', r))
	kout, _ := hexBytes(benchKey('o', r))
	phoneTx, err := esp.NewTransform(esp.Config{SPI: 0x1000000 + uint32(r), Proposal: esp.AES128GCM16, EncKey: kin, Mode: esp.ModeTunnel})
	if err != nil {
		b.Fatal(err)
	}
	phoneRx, err := esp.NewTransform(esp.Config{SPI: 0x2000000 + uint32(r), Proposal: esp.AES128GCM16, EncKey: kout, ReplayWindow: 64, Mode: esp.ModeTunnel})
	if err != nil {
		b.Fatal(err)
	}
	phone := udpSock(b, tp.Phone, "192.0.2.10:4500")
	core := udpSock(b, tp.Core, "10.0.0.1:5060")
	src := netip.AddrPortFrom(innerAddr, 5060)
	msg := []byte(fmt.Sprintf("REGISTER pair %d", r))
	buf := make([]byte, 2048)
	off := 64
	inner := pkt.UDP4(src, coreAddr, msg)
	copy(buf[off:], inner)
	start, end, err := phoneTx.Seal(buf, off, len(inner), esp.NextHeaderIPv4, 0)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := phone.WriteToUDP(buf[start:end], gwPublic); err != nil {
		b.Fatal(err)
	}
	core.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := core.ReadFromUDPAddrPort(buf)
	if err != nil || from != src || !bytes.Equal(buf[:n], msg) {
		dumpGateway(b, g)
		b.Fatalf("decap of pair %d: core got %q from %v (%v)", r, buf[:n], from, err)
	}
	reply := []byte(fmt.Sprintf("200 OK pair %d", r))
	if _, err := core.WriteToUDPAddrPort(reply, src); err != nil {
		b.Fatal(err)
	}
	phone.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err = phone.Read(buf)
	if err != nil {
		dumpGateway(b, g)
		b.Fatalf("encap of pair %d: nothing reached the phone: %v", r, err)
	}
	res, err := phoneRx.Open(buf[:n])
	if err != nil {
		b.Fatalf("encap of pair %d: phone cannot open SPI 0x%08x: %v", r, binary.BigEndian.Uint32(buf), err)
	}
	got := buf[res.Start:res.End]
	if len(got) < 28 || netip.AddrFrom4([4]byte(got[16:20])) != innerAddr || !bytes.Equal(got[28:], reply) {
		b.Fatalf("encap of pair %d: phone decrypted %x", r, got)
	}
}

// parsePairs parses pairs tunnel SA pairs, one phone each (inner
// 100.64.0.0/10 by index), keys from benchKey.
func parsePairs(b *testing.B, pairs int) []sa.SA {
	b.Helper()
	encap := &sa.EncapSpec{}
	sas := make([]sa.SA, 0, 2*pairs)
	for i := range pairs {
		inner := netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}).String() + "/32"
		for _, d := range []struct {
			dir  string
			spi  uint32
			kind byte
		}{{"in", 0x1000000 + uint32(i), 'i'}, {"out", 0x2000000 + uint32(i), 'o'}} {
			s, err := (&sa.Spec{SPI: sa.SPIOf(d.spi), Direction: d.dir, Mode: "tunnel", Proposal: "aes128gcm16",
				EncKey: benchKey(d.kind, i), Local: "192.0.2.1", Peer: "192.0.2.10", Encap: encap,
				Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: inner}}).Parse(sa.Options{})
			if err != nil {
				b.Fatal(err)
			}
			sas = append(sas, s)
		}
	}
	return sas
}

// waitLoaded returns once the manager installed every SA of the given
// pairs and the SA map holds every inbound one (it publishes the SA map
// last), with how long after t0 the workers held them all; b fails after
// limit.
func waitLoaded(b *testing.B, g *Gateway, pairs int, t0 time.Time, limit time.Duration) (installed time.Duration) {
	b.Helper()
	for g.Manager.Installed() < 2*pairs {
		if time.Since(t0) > limit {
			b.Fatalf("manager installed %d of %d SAs in %v", g.Manager.Installed(), 2*pairs, limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
	installed = time.Since(t0)
	keys, vals := make([]uint32, 1<<16), make([]bpf.SASteer, 1<<16)
	for {
		n, err := countSAMap(g.Maps.SAs.Map(), keys, vals)
		if err != nil {
			b.Fatal(err)
		}
		if n == pairs {
			return installed
		}
		if time.Since(t0) > limit {
			b.Fatalf("SA map holds %d of %d SAs after %v", n, pairs, limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// countSAMap counts the inbound SA map's entries with batch lookups.
func countSAMap(m *ebpf.Map, keys []uint32, vals []bpf.SASteer) (int, error) {
	var cur ebpf.MapBatchCursor
	total := 0
	for {
		n, err := m.BatchLookup(&cur, keys, vals, nil)
		total += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return total, fmt.Errorf("count SA map: %w", err)
		}
	}
}

// dumpGateway logs what XDP and the workers counted, for a failed probe.
func dumpGateway(tb testing.TB, g *Gateway) {
	var s maps.Snapshot
	if err := g.Maps.Counters.Read(&s); err == nil {
		for r := range s {
			if s[r].Packets > 0 {
				tb.Logf("xdp %s: %d", bpf.Reason(r), s[r].Packets)
			}
		}
	}
	f := snapshotWorkers(g)
	tb.Logf("workers: decap %d encap %d drops %v", f.decap, f.encap, f.drops)
}
