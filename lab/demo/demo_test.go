package demo

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/lab/netns"
)

// The demo is the product's seed scenario end to end: it must succeed, and
// its table must show every phone registered with kamailio behind one
// NAPT address with a distinct port, every request answered, every
// answer opened by its own phone, and no reply at the wrong phone.
func TestDemo(t *testing.T) {
	netns.RequireRoot(t)
	var out bytes.Buffer
	prefix := netns.UniqueName("demo") + "-"
	if err := Run(context.Background(), Options{Phones: 4, Out: &out, Prefix: prefix}); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	rows := regexp.MustCompile(`(?m)^ue(\d+)\s+192\.168\.1\.\d+\s+(10\.99\.0\.\d+)\s+198\.51\.100\.2:(\d+)\s+0x[0-9a-f]+/0x[0-9a-f]+\s+yes\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+)/(\d+)$`).FindAllStringSubmatch(text, -1)
	if len(rows) != 4 {
		t.Fatalf("want 4 registered phones in the table:\n%s", text)
	}
	ports := map[string]bool{}
	for _, r := range rows {
		ports[r[3]] = true
		n := make([]int, 7)
		for i := range n {
			n[i], _ = strconv.Atoi(r[4+i])
		}
		optOK, optSent, gwIn, gwOut, sent, opened := n[0], n[1], n[2], n[3], n[4], n[5]
		// REGISTER and OPTIONS, each answered by kamailio (statelessly,
		// so a retransmission is answered too); every answer the gateway
		// sealed opened at this phone.
		if optOK != 1 || optSent != 1 || gwIn < 2 || gwIn != gwOut || opened != gwOut || sent < gwIn {
			t.Fatalf("phone %s: %v\n%s", r[1], r[4:], text)
		}
	}
	if len(ports) != 4 {
		t.Fatalf("phones share NAPT ports %v:\n%s", ports, text)
	}
	for _, want := range []string{"replies delivered to the wrong phone: 0", "kamailio logged a REGISTER from the inner address of 4 of 4 phones", "topology removed"} {
		if !strings.Contains(text, want) {
			t.Fatalf("missing %q:\n%s", want, text)
		}
	}
	noneLeft(t, prefix)
}

func noneLeft(t *testing.T, prefix string) {
	t.Helper()
	if out, _ := exec.Command("ip", "netns", "list").Output(); bytes.Contains(out, []byte(prefix)) {
		t.Fatalf("demo left namespaces behind:\n%s", out)
	}
}

// signalWriter collects output and closes hit when it first contains s.
type signalWriter struct {
	mu   sync.Mutex
	b    bytes.Buffer
	s    string
	hit  chan struct{}
	done bool
}

func (w *signalWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	if !w.done && strings.Contains(w.b.String(), w.s) {
		w.done = true
		close(w.hit)
	}
	return len(p), nil
}

func (w *signalWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// Ctrl-C while the phones keep sending: /metrics is up until then, the
// demo stops, prints its table and removes everything.
func TestDemoInterrupted(t *testing.T) {
	netns.RequireRoot(t)
	w := &signalWriter{s: "each phone runs sipsak", hit: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	metricsText := make(chan string, 1)
	go func() {
		<-w.hit
		time.Sleep(3 * time.Second)
		// /metrics is served while the demo runs.
		body := ""
		if m := regexp.MustCompile(`metrics: (http://\S+/metrics)`).FindStringSubmatch(w.String()); m != nil {
			if resp, err := http.Get(m[1]); err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				body = string(b)
			}
		}
		metricsText <- body
		cancel()
	}()
	done := make(chan error, 1)
	prefix := netns.UniqueName("demo") + "-"
	go func() {
		done <- Run(ctx, Options{Phones: 3, Hold: 10 * time.Minute, Out: w, Prefix: prefix, Metrics: "127.0.0.1:0"})
	}()
	select {
	case err := <-done:
		text := w.String()
		if err != nil {
			t.Fatalf("demo: %v\n%s", err, text)
		}
		for _, want := range []string{"interrupted: tearing down", "replies delivered to the wrong phone: 0", "topology removed"} {
			if !strings.Contains(text, want) {
				t.Fatalf("missing %q:\n%s", want, text)
			}
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("demo did not stop after the interrupt:\n%s", w.String())
	}
	// /metrics answered with the gateway's counters while the demo ran.
	if m := <-metricsText; !strings.Contains(m, "xesp_binding_changes_total") {
		t.Fatalf("/metrics while the demo ran:\n%.2000s", m)
	}
	noneLeft(t, prefix)
}
