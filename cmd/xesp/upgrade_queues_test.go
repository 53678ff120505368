package main

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/ue"
)

// The hitless upgrade on a multi-queue NIC: 4 RX queues on each side and
// 2 workers, so the running daemon hands over 16 AF_XDP sockets. Eight
// phones behind one address, each on its own port with its own SA pair,
// talk to eight core ports at 500 packets/s each way while the daemon
// hands over twice. The veths pick each flow's queue by its hash, as RSS
// does by ports: at least two queues of each side carry traffic after the
// upgrades. Every request reaches its core socket exactly once and every
// reply its phone, nothing is counted drop_no_xsk, every socket is served
// by the last daemon and its UMEM's books balance with no frame lost.
func TestRunDaemonUpgradeEveryQueue(t *testing.T) {
	const queues, phones, workers = 4, 8, 2
	const interval = 2 * time.Millisecond // per phone: 500 packets/s each way
	var sas strings.Builder
	for p := range phones {
		port := fmt.Sprintf("peer_port: %d", 4500+p)
		sas.WriteString(strings.Replace(saYAML(fmt.Sprintf("q%d-in", p), 0x1101+uint32(p), "in", phoneKey(runKeyIn, p), p+1), "peer_port: 4500", port, 1))
		sas.WriteString(strings.Replace(saYAML(fmt.Sprintf("q%d-out", p), 0x2101+uint32(p), "out", phoneKey(runKeyOut, p), p+1), "peer_port: 4500", port, 1))
	}
	d := newDaemonTopoQueues(t, queues, sas.String())
	d.sharedPins(t)
	cur := d.start(t)

	type flow struct {
		ph      *ue.Phone
		core    *countingCore
		sent    atomic.Int64
		mu      sync.Mutex
		replies map[int]int
	}
	flows := make([]*flow, phones)
	stopTx, stopRx := make(chan struct{}), make(chan struct{})
	var tx, rx sync.WaitGroup
	errs := make(chan error, phones)
	for p := range flows {
		f := &flow{replies: map[int]int{}, core: startCountingCoreOn(t, d.core, 5070+p),
			ph: d.newPhone(t, 4500+p, mustESP(t, 0x1101+uint32(p), phoneKey(runKeyIn, p), 0), mustESP(t, 0x2101+uint32(p), phoneKey(runKeyOut, p), 4096))}
		flows[p] = f
		inner := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(p + 1)}), 5060)
		core := netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(5070+p))
		tx.Add(1)
		go func() {
			defer tx.Done()
			tick := time.NewTicker(interval)
			defer tick.Stop()
			began := time.Now()
			for i := 0; ; {
				select {
				case <-stopTx:
					return
				case <-tick.C:
				}
				// Paced by the clock, not by ticks, which a loaded
				// machine skips.
				for due := int(time.Since(began) / interval); i < due; i++ {
					if err := f.ph.Send(pkt.UDP4(inner, core, fmt.Appendf(nil, "req %d", i))); err != nil {
						errs <- fmt.Errorf("phone %d: %w", p, err)
						return
					}
					f.sent.Add(1)
				}
			}
		}()
		rx.Add(1)
		go func() {
			defer rx.Done()
			buf := make([]byte, 2048)
			for {
				select {
				case <-stopRx:
					return
				default:
				}
				got, _, err := f.ph.Recv(buf, time.Now().Add(50*time.Millisecond))
				if err != nil {
					continue
				}
				var i int
				if _, _, payload, ok := pkt.UDP4Parse(got); ok {
					if _, err := fmt.Sscanf(string(payload), "200 OK for req %d", &i); err == nil {
						f.mu.Lock()
						f.replies[i]++
						f.mu.Unlock()
					}
				}
			}
		}()
	}
	var txStopped, rxStopped bool
	haltTx := func() {
		if !txStopped {
			txStopped = true
			close(stopTx)
			tx.Wait()
		}
	}
	haltRx := func() {
		if !rxStopped {
			rxStopped = true
			close(stopRx)
			rx.Wait()
		}
	}
	defer haltRx()
	defer haltTx()
	every := func(what string, cond func(f *flow) bool) {
		t.Helper()
		waitFor(t, what, 10*time.Second, func() bool {
			for _, f := range flows {
				if !cond(f) {
					return false
				}
			}
			return true
		})
	}
	every("100 requests from every phone at the core", func(f *flow) bool { return f.core.count() >= 100 })

	began := time.Now()
	cur = d.upgrade(t, cur)
	cur = d.upgrade(t, cur)
	took := time.Since(began)
	afterUpgrades := [2][]uint64{queueRedirects(t, d, d.pubIf, queues), queueRedirects(t, d, d.privIf, queues)}
	marks := make([]int, phones)
	for p, f := range flows {
		marks[p] = int(f.sent.Load())
	}
	every("100 more requests from every phone at the core after the upgrades", func(f *flow) bool {
		for p := range flows {
			if flows[p] == f {
				return f.core.count() >= marks[p]+100
			}
		}
		return false
	})
	// The senders stop first, so the last requests and their replies can
	// arrive; what is still missing after that is lost.
	haltTx()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	waitFor(t, "every request at its core and every reply at its phone", 5*time.Second, func() bool {
		for _, f := range flows {
			f.mu.Lock()
			n := len(f.replies)
			f.mu.Unlock()
			if f.core.count() < int(f.sent.Load()) || n < int(f.sent.Load()) {
				return false
			}
		}
		return true
	})
	haltRx()

	total := 0
	for p, f := range flows {
		sent := int(f.sent.Load())
		total += sent
		f.core.mu.Lock()
		atCore, dups := len(f.core.at), f.core.dups
		f.core.mu.Unlock()
		if atCore != sent || dups != 0 {
			t.Errorf("phone %d: %d of %d requests at the core, %d twice", p, atCore, sent, dups)
		}
		for i, n := range f.replies {
			if n != 1 || i >= sent {
				t.Errorf("phone %d: reply to req %d arrived %d times (%d sent)", p, i, n, sent)
			}
		}
		if len(f.replies) != sent {
			t.Errorf("phone %d: %d of %d replies", p, len(f.replies), sent)
		}
	}
	t.Logf("%d round trips by %d phones across two upgrades (the two took %v)", total, phones, took.Round(time.Millisecond))

	for side, dev := range []string{d.pubIf, d.privIf} {
		now := queueRedirects(t, d, dev, queues)
		used := 0
		for q := range now {
			if now[q] > afterUpgrades[side][q] {
				used++
			}
		}
		t.Logf("%s: XDP redirects per RX queue after the upgrades %v, at the end %v", dev, afterUpgrades[side], now)
		if used < 2 {
			t.Errorf("%s: %d RX queues carried traffic after the upgrades, want at least 2 (the test would not exercise the queues' hand-over)", dev, used)
		}
	}

	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"drop_no_xsk", "priv_drop_no_xsk"} {
		if st.XDP[r] != 0 {
			t.Errorf("xdp %s: %d, want 0", r, st.XDP[r])
		}
	}
	m := scrapeIn(t, d)
	if n := len(regexp.MustCompile(`(?m)^xesp_xsk_ring_entries\{.*ring="rx".*\}`).FindAllString(m, -1)); n != 2*queues*workers {
		t.Errorf("the last daemon reports %d AF_XDP sockets, want %d (every worker on every queue of each side)", n, 2*queues*workers)
	}
	if lost := regexp.MustCompile(`(?m)^xesp_umem_frames\{place="lost"\} (\S+)$`).FindStringSubmatch(m); lost == nil || lost[1] != "0" {
		t.Errorf("UMEM frames lost: %v, want 0", lost)
	}
	// The adopted sockets and rings close as the daemon's own would.
	cur.cmd.Process.Signal(syscall.SIGTERM)
	<-cur.exited
	if cur.err != nil {
		t.Fatalf("the last daemon's shutdown: %v\n%s", cur.err, cur.logs.String())
	}
}

// phoneKey is key (hex) with its first byte made unique to phone p: no two
// SAs of a test share a key.
func phoneKey(key string, p int) string {
	return fmt.Sprintf("%02x", 0xc0+p) + key[2:]
}

// queueRedirects reads dev's per-RX-queue XDP redirect counters (veth's
// ethtool statistics) in the gateway's namespace.
func queueRedirects(t *testing.T, d *daemonTopo, dev string, queues int) []uint64 {
	t.Helper()
	b, err := d.gw.Run("ethtool", "-S", dev)
	out := string(b)
	if err != nil {
		t.Fatalf("ethtool -S %s: %v", dev, err)
	}
	n := make([]uint64, queues)
	for q := range n {
		m := regexp.MustCompile(fmt.Sprintf(`(?m)^\s*rx_queue_%d_xdp_redirect: (\d+)$`, q)).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("ethtool -S %s has no rx_queue_%d_xdp_redirect:\n%s", dev, q, out)
		}
		n[q], _ = strconv.ParseUint(m[1], 10, 64)
	}
	return n
}
