package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

// floodKey is the attacker's key under the victim's SPI: its packets are
// well-formed ESP with fresh sequence numbers that never authenticate.
const floodKey = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff00010203"

// verifyRate measures what one core spends to reject a forged packet:
// esp.Transform.Open of a 200-byte packet sealed under the wrong key, the work
// a worker does per flood packet that reaches it (a lower bound on its
// per-packet cost, which adds the AF_XDP rings).
func verifyRate(t *testing.T) float64 {
	good := mustSA(t, spiIn, keyIn, 65536)
	forger := mustSA(t, spiIn, floodKey, 0)
	forger.SetNextSeq(1 << 30)
	var pkts [][]byte
	for i := 0; i < 256; i++ {
		inner := pkt.UDP4(phoneInner, coreAddr, make([]byte, 160))
		buf := make([]byte, 64+len(inner)+64)
		copy(buf[64:], inner)
		s, e, err := forger.Seal(buf, 64, len(inner), esp.NextHeaderIPv4, 0)
		if err != nil {
			t.Fatal(err)
		}
		pkts = append(pkts, buf[s:e])
	}
	n := 0
	start := time.Now()
	for time.Since(start) < 100*time.Millisecond {
		for _, p := range pkts {
			if _, err := good.Open(p); err == nil {
				t.Fatal("a forged packet authenticated")
			}
			n++
		}
	}
	return float64(n) / time.Since(start).Seconds()
}

// phones adds n more phones' inbound SAs (ue2.., on the same worker as
// ue1 with one worker), sending from 192.0.2.10:4501...
func morePhones(n int) string {
	var b strings.Builder
	for i := 2; i < 2+n; i++ {
		fmt.Fprintf(&b, `  - {name: ue%d-in, spi: %d, direction: in, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
     local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: %d},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.%d/32}}
`, i, spiIn+i-1, keyIn, 4499+i, i)
	}
	return b.String()
}

// floodResult is what one flood run measured.
type floodResult struct {
	floodRate  float64 // forged packets/s sent
	integRate  float64 // forged packets/s the worker verified and rejected
	xdpDropped uint64
	flooded    uint64 // sent by the flooder
	// seen is the forged packets the gateway's XDP program saw: ESP it
	// redirected or flood-dropped, less the phones' packets. The rest
	// of flooded was lost on the way (veth rings) on a host whose sender
	// outruns the receiving CPU: not the gateway's to account for.
	seen      uint64
	ringLost  uint64 // redirected, but lost at a full XSK ring (any packet)
	integ     uint64
	delivered []float64 // per phone, ue1 first
	elapsed   time.Duration
}

// runFlood floods ue1's SPI with forged ESP from the spoofed source for
// dur while ue1..ue(1+others) each send 1000 packets/s, and measures.
func runFlood(t *testing.T, tp *topo, others int, dur time.Duration, during func()) floodResult {
	core := udpSock(t, tp.core, coreAddr.String())
	got := make([]atomic.Uint64, 1+others)
	go func() {
		buf := make([]byte, 2048)
		for {
			n, err := core.Read(buf)
			if err != nil {
				return
			}
			var who, seq int
			if _, err := fmt.Sscanf(string(buf[:n]), "ue%d #%d", &who, &seq); err == nil && who >= 1 && who <= 1+others {
				got[who-1].Add(1)
			}
		}
	}()
	type phone struct {
		conn *net.UDPConn
		sa   *esp.Transform
	}
	var phones []phone
	for i := 1; i <= 1+others; i++ {
		phones = append(phones, phone{udpSock(t, tp.phone, fmt.Sprintf("192.0.2.10:%d", 4499+i)), mustSA(t, uint32(spiIn+i-1), keyIn, 0)})
	}
	sent := make([]uint64, 1+others)
	send := func(i, n int) {
		p := phones[i]
		for k := 0; k < n; k++ {
			b := seal(t, p.sa, pkt.UDP4(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(i + 1)}), 5060), coreAddr,
				fmt.Appendf(nil, "ue%d #%d", i+1, sent[i])))
			if _, err := p.conn.WriteToUDP(b, gwPublic); err != nil {
				t.Error(err)
				return
			}
			sent[i]++
		}
	}
	for i := range phones {
		send(i, 1) // check the path before the flood
	}
	eventually(t, "the phones' first packets", func() bool {
		for i := range got {
			if got[i].Load() != 1 {
				return false
			}
		}
		return true
	})

	// The flood: live frames from the phone's link, the victim's SPI,
	// spoofed 203.0.113.66:4500, re-sent unchanged.
	forger := mustSA(t, spiIn, floodKey, 0)
	forger.SetNextSeq(1 << 30)
	var g *gen.Gen
	if err := tp.phone.Do(func() (err error) {
		g, err = gen.New(gen.Options{Ifindex: ifindexIn(t, tp, tp.phIf), Forged: true})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	flows := []gen.Flow{{SA: forger, Outer: esp.Outer{Src: netip.MustParseAddr("203.0.113.66"), Dst: netip.MustParseAddr("192.0.2.1"),
		Encap: true, SrcPort: 4500, DstPort: 4500}, Src: phoneInner, Dst: coreAddr}}
	if err := g.LoadESP(gen.L2{Src: macOf(t, tp.phone, tp.phIf), Dst: macOf(t, tp.gw, tp.pubIf)}, flows, gen.Fixed(200)); err != nil {
		t.Fatal(err)
	}
	st := tp.g.Workers[0].Stats()
	integBefore := st.Decap.Drops[esp.ReasonIntegrity].Load()
	xdpBefore := xdpCount(t, tp.g, bpf.DropFloodSA) + xdpCount(t, tp.g, bpf.DropFloodSrc)
	espBefore := xdpCount(t, tp.g, bpf.RedirectESPUDP)
	lostBefore := xskLost(t, tp.g)
	var flooded atomic.Uint64
	done := make(chan struct{})
	go func() {
		defer close(done)
		tp.phone.Do(func() error {
			for start := time.Now(); time.Since(start) < dur; {
				n, _, err := g.SendPinned(0)
				if err != nil {
					t.Error(err)
					return nil
				}
				flooded.Add(uint64(n))
			}
			return nil
		})
	}()
	start := time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	for time.Since(start) < dur {
		<-tick.C
		if during != nil && time.Since(start) > dur/2 {
			during()
			during = nil
		}
		var wg sync.WaitGroup
		for i := range phones {
			wg.Add(1)
			go func() { defer wg.Done(); send(i, 10) }() // 1000/s each
		}
		wg.Wait()
	}
	tick.Stop()
	<-done
	elapsed := time.Since(start)
	// What was sent is in flight for a moment at most: wait for all of it
	// or 2 s, then count.
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		all := true
		for i := range got {
			all = all && got[i].Load() >= sent[i]
		}
		if all {
			break
		}
	}
	r := floodResult{flooded: flooded.Load(), elapsed: elapsed,
		integ:      st.Decap.Drops[esp.ReasonIntegrity].Load() - integBefore,
		xdpDropped: xdpCount(t, tp.g, bpf.DropFloodSA) + xdpCount(t, tp.g, bpf.DropFloodSrc) - xdpBefore,
		ringLost:   xskLost(t, tp.g) - lostBefore}
	var legit uint64
	for i := range phones {
		legit += sent[i]
	}
	if atXDP := r.xdpDropped + xdpCount(t, tp.g, bpf.RedirectESPUDP) - espBefore; atXDP > legit {
		r.seen = atXDP - legit
	}
	r.floodRate = float64(r.flooded) / elapsed.Seconds()
	r.integRate = float64(r.integ) / elapsed.Seconds()
	for i := range phones {
		r.delivered = append(r.delivered, float64(got[i].Load())/float64(sent[i]))
	}
	t.Logf("flood %.0f pps, %d forged, %d seen by XDP: %d dropped in XDP, %d verified and rejected by the worker (%.0f/s), %d lost at full XSK rings; delivered %.3f",
		r.floodRate, r.flooded, r.seen, r.xdpDropped, r.integ, r.integRate, r.ringLost, r.delivered)
	return r
}

// Issue 18: one SA (ue1's) flooded with forged ESP (its SPI, fresh
// sequence numbers, the wrong key) from a spoofed source while three
// other phones on the same (only) worker and ue1 itself carry traffic.
// First with the budgets off, which measures the rate the worker verifies
// forged packets at when it does nothing else (the flood must be at least
// 1.5 times that: one generator core reaches about 2x here) and how the
// phones fare unprotected; then with the default
// budgets: the flood spends ue1's budget and the spoofed source's, XDP
// drops it (drop_flood_sa/src) before the worker, the worker verifies
// about the budget and no more, every phone gets ≥ 90 % through, ue1's
// binding stays put and ue1 itself is not starved; GET /v1/floods names
// ue1. After the flood a NAT re-mapping of ue1 (a new source port) moves
// the binding again.
func TestGatewayFloodBudget(t *testing.T) {
	const others = 3
	const dur = 2 * time.Second
	// The flood's generator runs in this process beside the worker it
	// floods: with one P (go test -cpu 1) the generator takes the
	// worker's CPU directly, which no attacker can, and the worker falls
	// so far behind that the budget is published late. Each needs a P.
	if p := runtime.GOMAXPROCS(0); p < 2 {
		runtime.GOMAXPROCS(2)
		t.Cleanup(func() { runtime.GOMAXPROCS(p) })
	}
	addSpoof := func(tp *topo) { tp.phone.MustRun("ip", "addr", "add", "203.0.113.66/24", "dev", tp.phIf) }
	// The flood must be one that starves the worker without budgets: in
	// the run with budgets off, the worker fell behind it and its RX ring
	// overflowed (at least 5% of what XDP saw lost at the full ring). Its
	// rate against the worker's verify rate varies with the host (1.3-2.4x
	// seen) and is reported, not judged. How the CPUs are shared at the
	// moment varies too (other test packages run beside this one), so a
	// run whose flood did not overflow the worker is measured again on
	// fresh topologies, up to three times, and only then reported; every
	// other check applies to every run.
	var (
		tp          *topo
		r           floodResult
		verify      float64
		src         metrics.Sources
		unprotected floodResult
		err         error
	)
	for attempt := 1; ; attempt++ {
		off := newTopoConfig(t, 1, Options{}, morePhones(others), func(c *config.Config) { c.Public.Flood.Disabled = true })
		addSpoof(off)
		unprotected = runFlood(t, off, others, dur, nil)
		if unprotected.xdpDropped != 0 {
			t.Fatalf("budgets off: XDP dropped %d", unprotected.xdpDropped)
		}
		verify = unprotected.integRate // the worker's verify rate for forged packets, flat out
		off.g.Stop(false)

		tp = newTopoConfig(t, 1, Options{}, morePhones(others), nil) // default budgets: 1000/s, burst 1000, per SA and per source
		addSpoof(tp)
		// Half-way through, the flood is on: the metrics count ue1 as an SA
		// under flood (a read of flood_drops that sees it grow).
		src, err = tp.g.MetricsSources("test")
		if err != nil {
			t.Fatal(err)
		}
		activeMid := -1
		r = runFlood(t, tp, others, dur, func() {
			// flood_drops grows in bursts (live-frames runs): poll until a
			// read sees it grow, while the flood lasts.
			for end := time.Now().Add(dur/2 - 100*time.Millisecond); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
				tp.g.pollFloods(time.Now())
				if activeMid, _ = src.Flood(); activeMid > 0 {
					break
				}
			}
		})
		if activeMid != 1 {
			t.Errorf("metrics during the flood: %d SAs under flood, want 1", activeMid)
		}
		t.Logf("flood %.0f pps = %.1fx the worker's verify rate (%.0f/s, budgets off; one core's bare GCM verify: %.0f/s); delivered without budgets %.3f, with %.3f",
			r.floodRate, r.floodRate/verify, verify, verifyRate(t), unprotected.delivered, r.delivered)
		for i, d := range r.delivered {
			if d < 0.9 {
				t.Errorf("ue%d: %.3f delivered under the flood, want ≥ 0.9", i+1, d)
			}
		}
		if unprotected.ringLost >= unprotected.seen/20 {
			break
		}
		if attempt == 3 {
			t.Errorf("without budgets the worker kept up with the flood (%d of %d lost at its full ring) in %d runs: not a flood that could starve it", unprotected.ringLost, unprotected.seen, attempt)
			break
		}
		t.Logf("run %d: without budgets the worker kept up with the flood (%d of %d lost at its full ring); measuring again", attempt, unprotected.ringLost, unprotected.seen)
		tp.g.Stop(false)
	}
	// The worker saw about the budget: burst 1000 plus 1000/s for the
	// SA, the source's the same; allow one more burst for the two
	// buckets filling independently.
	if limit := uint64(3000 + 1000*r.elapsed.Seconds()*1.5); r.integ > limit {
		t.Errorf("the worker verified %d forged packets in %v, the budget allows about %d", r.integ, r.elapsed, limit)
	}
	// Every forged packet that reached the gateway was dropped in XDP or
	// rejected by the worker (or lost at a full ring, which counts it):
	// none went through.
	if r.xdpDropped == 0 || r.xdpDropped+r.integ+r.ringLost < r.seen*99/100 {
		t.Errorf("XDP dropped %d, the worker rejected %d, full rings lost %d, of %d forged packets seen by XDP (%d sent)",
			r.xdpDropped, r.integ, r.ringLost, r.seen, r.flooded)
	}
	id := sa.ID{Dir: sa.In, SPI: spiIn}
	home := netip.MustParseAddrPort("192.0.2.10:4500")
	if e, _ := tp.g.SAD.Get(id); e.Binding != home {
		t.Fatalf("ue1's binding moved to %v under the flood", e.Binding)
	}
	if n := tp.g.Workers[0].Stats().BindingChanges.Load(); n != 0 {
		t.Fatalf("%d binding changes under the flood", n)
	}
	// The API names the SA under attack.
	tp.g.pollFloods(time.Now())
	dp, err := tp.g.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	if _, failures := src.Flood(); failures != tp.g.Workers[0].Stats().Decap.Drops[esp.ReasonIntegrity].Load() {
		t.Errorf("metrics: %d failures charged, want the worker's integ_error count %d", failures, tp.g.Workers[0].Stats().Decap.Drops[esp.ReasonIntegrity].Load())
	}
	fl := dp.(api.FloodReporter).Floods()
	if len(fl) != 1 || fl[0].Name != "ue1-in" || fl[0].XDPDrops != r.xdpDropped || fl[0].Binding != home.String() || fl[0].SA != "in:0x00001001" {
		t.Fatalf("floods %+v, want ue1-in with %d XDP drops and binding %v", fl, r.xdpDropped, home)
	}

	// After the flood the budgets refill: a NAT re-mapping of ue1 (new
	// source port) authenticates and moves the binding. Its packets are
	// dropped in XDP while the budgets are still spent (up to two bursts'
	// worth, 2 s at 1000/s); the phone keeps sending, as a phone does,
	// until one gets through.
	moved := udpSock(t, tp.phone, "192.0.2.10:61000")
	remapped := netip.MustParseAddrPort("192.0.2.10:61000")
	ue1 := mustSA(t, spiIn, keyIn, 0)
	ue1.SetNextSeq(1 << 20)
	remapStart := time.Now()
	for deadline := time.Now().Add(10 * time.Second); ; {
		b := seal(t, ue1, pkt.UDP4(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, 0, 1}), 5060), coreAddr, []byte("ue1 #moved")))
		if _, err := moved.WriteToUDP(b, gwPublic); err != nil {
			t.Fatal(err)
		}
		if e, _ := tp.g.SAD.Get(id); e.Binding == remapped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ue1's binding did not follow its NAT re-mapping after the flood")
		}
		waitBinding(tp.g, id, remapped, 100*time.Millisecond)
	}
	t.Logf("NAT re-mapping after the flood took effect after %v", time.Since(remapStart).Round(time.Millisecond))
}

// waitBinding returns once SA id's binding is want or after d.
func waitBinding(g *Gateway, id sa.ID, want netip.AddrPort, d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if e, _ := g.SAD.Get(id); e.Binding == want {
			return
		}
	}
}

// ifindexIn is ifname's index in tp's phone namespace.
func ifindexIn(t *testing.T, tp *topo, ifname string) int {
	t.Helper()
	var idx int
	if err := tp.phone.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err == nil {
			idx = ifi.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return idx
}

// xskLost is the packets the gateway's sockets lost to full RX rings or
// an empty fill ring.
func xskLost(t *testing.T, g *Gateway) uint64 {
	t.Helper()
	var n uint64
	for _, q := range g.RX {
		st, err := q.XSK.Stats()
		if err != nil {
			t.Fatal(err)
		}
		n += st.RxDropped + st.RxRingFull
	}
	return n
}
