package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/ue"
)

// sharedPins points the topology's pin_dir at a bpffs the test mounts
// outside /sys: `ip netns exec` gives every daemon its own /sys, and with
// it a private bpffs, so pins in /sys/fs/bpf would not reach the next
// daemon as they do on a host. Unmounted at cleanup.
func (d *daemonTopo) sharedPins(t *testing.T) {
	t.Helper()
	dir := filepath.Join("/run", netns.UniqueName("xesp-bpffs-"))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Unmount(dir, unix.MNT_DETACH)
		os.Remove(dir)
	})
	b, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg := regexp.MustCompile(`(?m)^pin_dir: .*$`).ReplaceAllString(string(b), "pin_dir: "+filepath.Join(dir, "xesp"))
	if err := os.WriteFile(d.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// countingCore is the SIP stand-in of the upgrade tests (on port 5070,
// beside the topology's plain responder on 5060): it answers
// every "req N" with "200 OK for req N" and records when each N arrived.
type countingCore struct {
	mu   sync.Mutex
	at   map[int]time.Time
	dups int
}

func startCountingCore(t *testing.T, core *netns.NS) *countingCore {
	t.Helper()
	return startCountingCoreOn(t, core, 5070)
}

// startCountingCoreOn is startCountingCore on another port.
func startCountingCoreOn(t *testing.T, core *netns.NS, port int) *countingCore {
	t.Helper()
	var conn *net.UDPConn
	if err := core.Do(func() (err error) {
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	conn.SetReadBuffer(4 << 20)
	t.Cleanup(func() { conn.Close() })
	c := &countingCore{at: map[int]time.Time{}}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			var i int
			if _, err := fmt.Sscanf(string(buf[:n]), "req %d", &i); err == nil {
				c.mu.Lock()
				if _, dup := c.at[i]; dup {
					c.dups++
				} else {
					c.at[i] = time.Now()
				}
				c.mu.Unlock()
			}
			conn.WriteToUDPAddrPort(append([]byte("200 OK for "), buf[:n]...), from)
		}
	}()
	return c
}

func (c *countingCore) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.at)
}

// phoneTraffic sends "req N" from the phone at 4000 packets/s (paced
// every millisecond; the core's replies make as many the other way).
// The replies are counted from the capture of the phone's link, not from
// the phone's socket, whose buffer a burst may overflow.
type phoneTraffic struct {
	sent   atomic.Int64
	stopTx chan struct{}
	txDone chan error
	// The phone's socket is drained meanwhile; marker reports the
	// reply to a "marker" request (see flush).
	marker chan struct{}
	stopRx chan struct{}
	rxDone chan struct{}
	// atPhone counts replies the phone's socket delivered (for the
	// report: a burst can overflow that socket's buffer).
	atPhone atomic.Int64
}

func startPhoneTraffic(t *testing.T, ph *ue.Phone) *phoneTraffic {
	t.Helper()
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	core := netip.MustParseAddrPort("10.0.0.1:5070")
	p := &phoneTraffic{stopTx: make(chan struct{}), txDone: make(chan error, 1),
		marker: make(chan struct{}, 1), stopRx: make(chan struct{}), rxDone: make(chan struct{})}
	go func() {
		defer close(p.rxDone)
		buf := make([]byte, 4096)
		for {
			select {
			case <-p.stopRx:
				return
			default:
			}
			got, _, err := ph.Recv(buf, time.Now().Add(50*time.Millisecond))
			if err != nil {
				continue
			}
			_, _, payload, ok := pkt.UDP4Parse(got)
			switch {
			case ok && strings.HasPrefix(string(payload), "200 OK for marker"):
				select {
				case p.marker <- struct{}{}:
				default:
				}
			case ok && strings.HasPrefix(string(payload), "200 OK for req"):
				p.atPhone.Add(1)
			}
		}
	}()
	go func() {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		began := time.Now()
		for i := 0; ; {
			select {
			case <-p.stopTx:
				p.txDone <- nil
				return
			case <-tick.C:
			}
			// Paced by the clock, not by ticks, which a loaded machine
			// skips: 4 per elapsed millisecond.
			for due := int(time.Since(began) / (time.Millisecond / 4)); i < due; i++ {
				if err := ph.Send(pkt.UDP4(inner, core, []byte(fmt.Sprintf("req %d", i)))); err != nil {
					p.txDone <- err
					return
				}
				p.sent.Add(1)
			}
		}
	}()
	t.Cleanup(func() {
		select {
		case <-p.stopTx:
		default:
			close(p.stopTx)
		}
		close(p.stopRx)
		<-p.rxDone
	})
	return p
}

// flush sends "marker N" requests (after the traffic stopped) until the
// phone gets one's reply: replies leave the gateway in order, so every
// earlier reply is on the phone's link by then. It returns how many
// markers it sent.
func (p *phoneTraffic) flush(t *testing.T, ph *ue.Phone) int {
	t.Helper()
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	core := netip.MustParseAddrPort("10.0.0.1:5070")
	deadline := time.Now().Add(5 * time.Second)
	for n := 1; ; n++ {
		if err := ph.Send(pkt.UDP4(inner, core, []byte(fmt.Sprintf("marker %d", n)))); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.marker:
			return n
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no marker came back through the gateway")
		}
	}
}

// waitFor polls cond every 5 ms until it holds or the deadline passes.
func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// lossReport is what measureTransition found.
type lossReport struct {
	sent, atCore, replies int
	atPhoneSocket         int64
	gap                   time.Duration
	took                  time.Duration
	pps                   float64
}

// measureTransition runs the phone's traffic through the running daemon,
// calls transition (which must leave a new daemon serving), runs more
// traffic and reports what was lost each way and the longest silence at
// the core. From a capture of the phone's link it checks that the capture
// is complete, that every gateway packet opens with the phone's SA and
// that no (SPI, sequence number) pair repeats or goes backwards.
func measureTransition(t *testing.T, d *daemonTopo, transition func()) lossReport {
	t.Helper()
	core := startCountingCore(t, d.core)
	stopCapture := capturePhoneLink(t, d.phone)
	ph := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 4096))
	tr := startPhoneTraffic(t, ph)
	began := time.Now()
	waitFor(t, "1000 requests at the core before the transition", 10*time.Second, func() bool { return core.count() >= 1000 })
	start := time.Now()
	transition()
	took := time.Since(start)
	after := int(tr.sent.Load())
	waitFor(t, "1000 more requests at the core after the transition", 10*time.Second, func() bool { return core.count() >= after+1000 })
	close(tr.stopTx)
	if err := <-tr.txDone; err != nil {
		t.Fatal(err)
	}
	sent := int(tr.sent.Load())
	elapsed := time.Since(began)
	// The last requests and replies are in flight for a moment; whatever
	// is still missing after this is lost.
	waitFor(t, "the last request at the core", 3*time.Second, func() bool {
		core.mu.Lock()
		_, ok := core.at[sent-1]
		core.mu.Unlock()
		return ok
	})
	markers := tr.flush(t, ph)
	wire := stopCapture()

	core.mu.Lock()
	defer core.mu.Unlock()
	if core.dups != 0 {
		t.Fatalf("%d requests reached the core twice", core.dups)
	}
	var times []time.Time
	for _, at := range core.at {
		times = append(times, at)
	}
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	var gap time.Duration
	for i := 1; i < len(times); i++ {
		gap = max(gap, times[i].Sub(times[i-1]))
	}
	// Every reply the gateway put on the phone's link, opened with the
	// phone's inbound SA: each request's reply exactly once.
	in := mustESP(t, 0x2001, runKeyOut, 4096)
	replyOf := map[int]int{}
	for _, p := range wire {
		if p.src.Addr() != netip.MustParseAddr("192.0.2.1") || p.spi != 0x2001 {
			continue
		}
		res, err := in.Open(p.payload)
		if err != nil {
			t.Fatalf("gateway packet SPI %#x seq %d does not open: %v", p.spi, p.seq, err)
		}
		_, _, payload, ok := pkt.UDP4Parse(p.payload[res.Start:res.End])
		if ok && strings.HasPrefix(string(payload), "200 OK for marker") {
			continue
		}
		var i int
		if _, err := fmt.Sscanf(string(payload), "200 OK for req %d", &i); !ok || err != nil {
			t.Fatalf("gateway packet seq %d carries %q", p.seq, payload)
		}
		replyOf[i]++
	}
	for i, n := range replyOf {
		if n != 1 {
			t.Fatalf("reply to req %d on the wire %d times", i, n)
		}
	}
	replies := len(replyOf)

	// The capture sees both directions: it must have every request the
	// phone sent (else its figures mean nothing), and no (SPI, sequence
	// number) pair from the gateway twice (GCM IV reuse), across both
	// daemons.
	type pair struct{ spi, seq uint32 }
	fromGW := map[pair]int{}
	phoneSent := 0
	for _, p := range wire {
		switch {
		case p.src.Addr() == netip.MustParseAddr("192.0.2.10") && p.spi == 0x1001:
			phoneSent++
		case p.src.Addr() == netip.MustParseAddr("192.0.2.1"):
			fromGW[pair{p.spi, p.seq}]++
		}
	}
	if phoneSent != sent+markers {
		t.Fatalf("the capture holds %d of the %d packets the phone sent: its figures are incomplete", phoneSent, sent+markers)
	}
	for k, n := range fromGW {
		if n != 1 {
			t.Fatalf("the gateway sent SPI %#x sequence number %d %d times", k.spi, k.seq, n)
		}
	}
	// One worker serves the SA: on the wire its numbers only grow, also
	// from one daemon to the next.
	lastSeq := map[uint32]uint32{}
	for _, p := range wire {
		if p.src.Addr() != netip.MustParseAddr("192.0.2.1") {
			continue
		}
		if prev, ok := lastSeq[p.spi]; ok && p.seq <= prev {
			t.Fatalf("SPI %#x: sequence number %d on the wire after %d", p.spi, p.seq, prev)
		}
		lastSeq[p.spi] = p.seq
	}
	if len(fromGW) < replies {
		t.Fatalf("%d replies decrypted but only %d distinct ESP packets from the gateway captured", replies, len(fromGW))
	}
	return lossReport{sent: sent, atCore: len(times), replies: replies, atPhoneSocket: tr.atPhone.Load(), gap: gap, took: took, pps: float64(sent) / elapsed.Seconds()}
}

func (r lossReport) String() string {
	return fmt.Sprintf("%d requests at %.0f/s each way: %d lost phone→core, %d lost core→phone (%d of %d round trips; the phone's socket delivered %d replies); longest silence at the core %v; transition took %v",
		r.sent, r.pps, r.sent-r.atCore, r.atCore-r.replies, r.sent-r.replies, r.sent, r.atPhoneSocket, r.gap.Round(time.Millisecond), r.took.Round(time.Millisecond))
}

// upgrade starts `xesp run --upgrade-from` and waits until old has
// exited naming it and it answers on the API; it returns the new daemon.
func (d *daemonTopo) upgrade(t *testing.T, old *daemon) *daemon {
	t.Helper()
	nw := d.launch(t, "run", "--config", d.cfg, "--upgrade-from", filepath.Join(d.dir, "state", "upgrade.sock"))
	select {
	case <-old.exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("the old daemon did not exit after the hand-over:\n%s", old.logs.String())
	}
	if old.err != nil || !strings.Contains(old.logs.String(), fmt.Sprintf("handed over to the new daemon\" pid=%d", nw.cmd.Process.Pid)) {
		t.Fatalf("old daemon: %v\n%s", old.err, old.logs.String())
	}
	d.waitAPI(t, nw)
	if !strings.Contains(nw.logs.String(), fmt.Sprintf("upgraded_from=%d", old.cmd.Process.Pid)) {
		t.Fatalf("the new daemon's log does not name the old one (pid %d):\n%s", old.cmd.Process.Pid, nw.logs.String())
	}
	return nw
}

// Issue 18 item 5: `xesp run --upgrade-from state_dir/upgrade.sock`
// while a phone talks to the core at 4000 packets/s each way, twice in a
// row (the new daemon hands over again). Each new process takes the
// AF_XDP sockets, the UMEM, the locks and the replay windows over without
// unbinding; each old one exits 0 naming its successor. Every request
// reaches the core once and every reply reaches the phone (0 lost both
// ways), the gateway's sequence numbers only grow on the wire (no
// (SPI, sequence number) pair twice), and the last daemon is healthy,
// answers the CLI and stops cleanly.
func TestRunDaemonUpgradeHitless(t *testing.T) {
	d := newDaemonTopo(t)
	d.sharedPins(t)
	cur := d.start(t)
	upgrade := func() { cur = d.upgrade(t, cur) }
	r := measureTransition(t, d, func() { upgrade(); upgrade() })
	t.Logf("two upgrades: %v", r)
	if lost := r.sent - r.replies; lost != 0 {
		t.Errorf("%d of %d round trips lost across two upgrades, want 0", lost, r.sent)
	}
	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if h, err := c.Health(context.Background()); err != nil || !h.OK {
		t.Fatalf("health after the upgrades: %+v, %v", h, err)
	}
	out, err := xespCmd(d.gw, "stats", "--api", "unix:"+d.sock).CombinedOutput()
	if err != nil {
		t.Fatalf("xesp stats against the new daemon: %v\n%s", err, out)
	}
	if t.Failed() {
		t.Logf("stats of the last daemon:\n%s", out)
	}
	cur.cmd.Process.Signal(syscall.SIGTERM)
	<-cur.exited
	if cur.err != nil {
		t.Fatalf("the last daemon's shutdown: %v\n%s", cur.err, cur.logs.String())
	}
}

// The same measurement across today's stop-and-start (SIGTERM, then
// `xesp run --keep-pinned`), for comparison: the sockets close before the
// new ones can bind, and what arrives in between is lost. The gateway
// still never repeats an (SPI, sequence number) pair.
func TestRunDaemonRestartLossBaseline(t *testing.T) {
	d := newDaemonTopo(t)
	d.sharedPins(t)
	old := d.launch(t, "run", "--config", d.cfg, "--keep-pinned")
	d.waitAPI(t, old)
	r := measureTransition(t, d, func() {
		old.cmd.Process.Signal(syscall.SIGTERM)
		<-old.exited
		if old.err != nil {
			t.Fatalf("old daemon: %v\n%s", old.err, old.logs.String())
		}
		nw := d.launch(t, "run", "--config", d.cfg, "--keep-pinned")
		d.waitAPI(t, nw)
	})
	t.Logf("stop and start: %v", r)
	if r.replies >= r.sent {
		t.Errorf("a stop and start lost nothing: the baseline no longer measures a gap (%v)", r)
	}
}

// A successor whose configuration a hand-over cannot honour (another
// worker count) is refused before anything stops: it exits with one line
// naming the field, and the running daemon keeps forwarding.
func TestRunDaemonUpgradeRefusedKeepsRunning(t *testing.T) {
	d := newDaemonTopo(t)
	d.sharedPins(t)
	old := d.start(t)
	ph := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 4096))
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	talk(t, ph, inner, "OPTIONS before")

	b, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg3 := filepath.Join(d.dir, "three-workers.yaml")
	if err := os.WriteFile(cfg3, []byte(strings.Replace(string(b), "workers: 2", "workers: 3", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := xespCmd(d.gw, "run", "--config", cfg3, "--upgrade-from", filepath.Join(d.dir, "state", "upgrade.sock")).CombinedOutput()
	if err == nil {
		t.Fatalf("the mismatched successor started:\n%s", out)
	}
	if lines := strings.Split(strings.TrimSpace(string(out)), "\n"); len(lines) != 1 ||
		!strings.Contains(lines[0], "workers: 3 in the new daemon's config, 2 in the running daemon") {
		t.Fatalf("want one line naming workers, got:\n%s", out)
	}
	select {
	case <-old.exited:
		t.Fatalf("the running daemon exited: %v\n%s", old.err, old.logs.String())
	default:
	}
	talk(t, ph, inner, "OPTIONS after")
	if !strings.Contains(old.logs.String(), "upgrade request refused, still running") {
		t.Fatalf("the running daemon did not log the refusal:\n%s", old.logs.String())
	}
}

// A successor that fails after it took the data path over (here: its
// config names a private VLAN device that does not exist, found only
// when the data path is built) tells the old daemon, which stops with the
// XDP programs pinned instead of waiting or exiting 0; a plain start then
// serves again.
func TestRunDaemonUpgradeFailedSuccessor(t *testing.T) {
	d := newDaemonTopo(t)
	d.sharedPins(t)
	old := d.start(t)
	ph := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 4096))
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	talk(t, ph, inner, "OPTIONS before")

	b, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(b), "private: {interface: "+d.privIf+"}", "private: {interface: "+d.privIf+", vlan: 200, vlan_interface: nosuch0}", 1)
	if bad == string(b) {
		t.Fatal("config has no private line to change")
	}
	cfg2 := filepath.Join(d.dir, "bad-vlan.yaml")
	if err := os.WriteFile(cfg2, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := xespCmd(d.gw, "run", "--config", cfg2, "--upgrade-from", filepath.Join(d.dir, "state", "upgrade.sock")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "private.vlan_interface") {
		t.Fatalf("the successor: %v, want an error naming private.vlan_interface:\n%s", err, out)
	}
	select {
	case <-old.exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("the old daemon is still waiting:\n%s", old.logs.String())
	}
	if old.err == nil || !strings.Contains(old.logs.String(), "did not come up") || !strings.Contains(old.logs.String(), "nosuch0") {
		t.Fatalf("old daemon: %v, want an error naming the successor's failure\n%s", old.err, old.logs.String())
	}
	d.start(t)
	talk(t, ph, inner, "OPTIONS after")
	// The windows the old daemon saved when the hand-over failed hold:
	// sequence number 1 again (the phone's first packet, under its key)
	// is a replay to the next daemon.
	dup := mustESP(t, 0x1001, runKeyIn, 0)
	plain := pkt.UDP4(inner, netip.MustParseAddrPort("10.0.0.1:5060"), []byte("replayed"))
	buf := make([]byte, 64+len(plain)+64)
	copy(buf[64:], plain)
	start, end, err := dup.Seal(buf, 64, len(plain), esp.NextHeaderFor(plain), 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.phone.Do(func() error {
		c, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 10), Port: 4600}, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4500})
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(buf[start:end])
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "the replayed packet dropped as a replay", 5*time.Second, func() bool {
		st, err := c.Stats(context.Background())
		return err == nil && st.In.Drops["replay"]+st.In.Drops["replay_old"] == 1
	})
}
