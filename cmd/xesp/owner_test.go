package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/ue"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
	"golang.org/x/sys/unix"
)

// stream sends numbered requests from p every interval until stop is
// called and counts the distinct replies. await blocks until n more
// replies than had arrived at its call have come (false after d without
// them); stop stops sending and returns sent and received once every
// reply has come back or 10 s passed without all of them.
func stream(t *testing.T, p *ue.Phone, inner netip.AddrPort, every time.Duration) (await func(n int, d time.Duration) bool, stop func() (sent, got int)) {
	t.Helper()
	var mu sync.Mutex
	replies := map[string]bool{}
	arrived := make(chan struct{}, 1)
	done := make(chan struct{})     // the receiver stops
	stopSend := make(chan struct{}) // the sender stops
	sentCh := make(chan int, 1)
	go func() {
		buf := make([]byte, 2048)
		for {
			in, _, err := p.Recv(buf, time.Now().Add(100*time.Millisecond))
			if err != nil {
				select {
				case <-done:
					return
				default:
					continue
				}
			}
			if _, _, payload, ok := pkt.UDP4Parse(in); ok {
				mu.Lock()
				replies[string(payload)] = true
				mu.Unlock()
				select {
				case arrived <- struct{}{}:
				default:
				}
			}
		}
	}()
	go func() {
		n := 0
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			select {
			case <-stopSend:
				sentCh <- n
				return
			case <-tk.C:
				p.Send(pkt.UDP4(inner, netip.MustParseAddrPort("10.0.0.1:5060"), fmt.Appendf(nil, "OPTIONS #%d", n)))
				n++
			}
		}
	}()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(replies)
	}
	// reach waits until want replies have arrived, false after d.
	reach := func(want int, d time.Duration) bool {
		timeout := time.NewTimer(d)
		defer timeout.Stop()
		for count() < want {
			select {
			case <-arrived:
			case <-timeout.C:
				return false
			}
		}
		return true
	}
	await = func(n int, d time.Duration) bool { return reach(count()+n, d) }
	return await, func() (int, int) {
		close(stopSend)
		n := <-sentCh
		reach(n, 10*time.Second) // the replies still in flight
		close(done)
		return n, count()
	}
}

// Issue 18: a second `xesp run` on the same state_dir, then on another
// state_dir but the same pin directory, while the first carries traffic.
// Each exits 1 with one line naming the running daemon's PID; the first
// loses nothing and stays healthy. Then the first daemon's socket is taken
// out of its XSK map behind its back: /v1/health must say broken.
func TestSecondDaemonLeavesRunningOneAlone(t *testing.T) {
	d := newDaemonTopo(t)
	// A bpffs both daemons see: under `ip netns exec` each process
	// would otherwise mount a private one at /sys/fs/bpf.
	bpffs := t.TempDir()
	if err := loader.EnsureBPFFS(bpffs); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH) })
	cfg, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	pinRoot := filepath.Join(bpffs, "xesp")
	cfg = []byte(strings.Replace(string(cfg), fmt.Sprintf("/sys/fs/bpf/xesp-test-%d", os.Getpid()), pinRoot, 1))
	if err := os.WriteFile(d.cfg, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	dm := d.start(t)
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	ph := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 4096))
	talk(t, ph, inner, "REGISTER")

	// The same pin directory, another state_dir (and API socket).
	other := filepath.Join(d.dir, "other.yaml")
	alt := strings.Replace(strings.Replace(string(cfg), filepath.Join(d.dir, "state"), filepath.Join(d.dir, "state2"), 1),
		d.sock, filepath.Join(d.dir, "api2.sock"), 1)
	if err := os.WriteFile(other, []byte(alt), 0o600); err != nil {
		t.Fatal(err)
	}

	await, stop := stream(t, ph, inner, 2*time.Millisecond)
	pid := fmt.Sprint(dm.cmd.Process.Pid)
	for _, c := range []struct{ cfg, what string }{{d.cfg, "state_dir"}, {other, "pin_dir"}} {
		out, err := xespCmd(d.gw, "run", "--config", c.cfg).CombinedOutput()
		msg := strings.TrimSpace(string(out))
		t.Logf("second daemon (%s): %s", c.what, msg)
		if err == nil || !strings.Contains(err.Error(), "exit status 1") {
			t.Fatalf("second daemon (%s) exited with %v, want status 1:\n%s", c.what, err, out)
		}
		if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, c.what) || !strings.Contains(msg, "pid "+pid) || strings.Contains(msg, "panic") {
			t.Fatalf("second daemon (%s) said %q, want one line naming %s and pid %s", c.what, msg, c.what, pid)
		}
	}
	// More traffic after the second daemons are gone: 100 replies past
	// those already in, however fast or slow the refused starts were.
	if !await(100, 10*time.Second) {
		t.Fatal("the running daemon stopped answering after the refused starts")
	}
	sent, got := stop()
	if sent < 100 || got != sent {
		t.Fatalf("the running daemon answered %d of %d requests across the second starts, want all", got, sent)
	}
	t.Logf("%d/%d requests answered across two refused second daemons", got, sent)

	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h, err := c.Health(context.Background())
	if err != nil || !h.OK {
		t.Fatalf("health after the refused starts: %+v, %v", h, err)
	}

	// Empty worker 0's public slot as a stray process could.
	set, err := maps.Open(filepath.Join(pinRoot, d.pubIf))
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	if err := set.XSKPublic.Delete(maps.Index(0, 2, 0)); err != nil {
		t.Fatal(err)
	}
	h, err = c.Health(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if h.OK || !strings.Contains(strings.Join(h.Problems, "\n"), "worker 0: public AF_XDP socket missing") {
		t.Fatalf("health with a socket gone from its XSK map: %+v, want not ok naming worker 0's public socket", h)
	}
}
