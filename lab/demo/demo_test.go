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
	"github.com/xesp/xesp/lab/topo"
)

// The demo is the product's seed scenario end to end: it must succeed, and
// its table must show phones behind several NAPTs sharing inner addresses
// (and SIP port 5060), each with its own core address and NAPT mapping,
// every phone registered with kamailio and answering the core's OPTIONS
// itself, and the phones' own counters measuring no misdelivery.
func TestDemo(t *testing.T) {
	netns.RequireRoot(t)
	var out bytes.Buffer
	prefix := netns.UniqueName("demo") + "-"
	if err := Run(context.Background(), Options{NAPTs: 3, Phones: 2, Out: &out, Prefix: prefix}); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	rows := regexp.MustCompile(`(?m)^(ue\d+)\s+(\d)\s+(192\.168\.1\.\d+)\s+(100\.64\.\d+\.\d+)\s+(198\.51\.100\.\d+:\d+)\s+0x[0-9a-f]+/0x[0-9a-f]+\s+yes\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+)/(\d+)$`).FindAllStringSubmatch(text, -1)
	if len(rows) != 6 {
		t.Fatalf("want 6 registered phones in the table:\n%s", text)
	}
	inner, cores, mappings, napts := map[string]int{}, map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, r := range rows {
		napts[r[2]] = true
		inner[r[3]]++
		cores[r[4]] = true
		mappings[r[5]] = true
		n := make([]int, 7)
		for i := range n {
			n[i], _ = strconv.Atoi(r[6+i])
		}
		optOK, optSent, gwIn, gwOut := n[0], n[1], n[2], n[3]
		// The phone's REGISTER and its answer to the core's OPTIONS in,
		// kamailio's 200 and the core's OPTIONS out; nothing measured
		// as misdelivered at the phone.
		if optOK != 1 || optSent != 1 || gwIn < 2 || gwIn != gwOut || n[4]+n[5]+n[6] != 0 {
			t.Fatalf("phone %s: %v\n%s", r[1], r[6:], text)
		}
	}
	if len(napts) != 3 || inner["192.168.1.10"] != 3 || inner["192.168.1.11"] != 3 || len(cores) != 6 || len(mappings) != 6 {
		t.Fatalf("NAPTs %v, inner addresses %v, %d core addresses, %d mappings:\n%s", napts, inner, len(cores), len(mappings), text)
	}
	for _, want := range []string{
		"phones sharing an inner address and SIP port 5060: 192.168.1.10 ×3, 192.168.1.11 ×3",
		"delivered to the wrong phone, measured at the phones: 0 (0 ESP under another phone's SPI, 0 for another inner address/port, 0 SIP messages for another phone)",
		"core OPTIONS answered by another phone than the one addressed: 0",
		"kamailio saw the REGISTER of 6 of 6 phones from its own core address", "topology removed"} {
		if !strings.Contains(text, want) {
			t.Fatalf("missing %q:\n%s", want, text)
		}
	}
	noneLeft(t, prefix)
}

// The demo with transport-mode SAs: two phones behind NAPTs
// (UDP-encapsulated transport) and one without a NAPT (plain ESP
// transport) register and answer the core's OPTIONS, nothing misdelivered.
func TestDemoTransport(t *testing.T) {
	netns.RequireRoot(t)
	var out bytes.Buffer
	prefix := netns.UniqueName("demo") + "-"
	if err := Run(context.Background(), Options{NAPTs: 2, Phones: 1, Direct: 1, Transport: true, Out: &out, Prefix: prefix}); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	rows := regexp.MustCompile(`(?m)^(ue\d+)\s+(\d|none)\s+(192\.168\.[12]\.\d+)\s+(100\.64\.\d+\.\d+)\s+(198\.51\.100\.\d+:\d+)\s+0x[0-9a-f]+/0x[0-9a-f]+\s+yes\s+1/1\s+(\d+)/(\d+)\s+0/0/0$`).FindAllStringSubmatch(text, -1)
	if len(rows) != 3 || rows[2][2] != "none" || !strings.HasSuffix(rows[2][5], ":0") {
		t.Fatalf("want 3 registered phones, the third without a NAPT (binding port 0):\n%s", text)
	}
	for _, want := range []string{"ESP transport mode; 1 phones on the public segment without a NAPT",
		"delivered to the wrong phone, measured at the phones: 0", "kamailio saw the REGISTER of 3 of 3 phones from its own core address"} {
		if !strings.Contains(text, want) {
			t.Fatalf("missing %q:\n%s", want, text)
		}
	}
	noneLeft(t, prefix)
}

// Without core addresses, phones behind two NAPTs sharing 192.168.1.10
// are ambiguous toward the core: the gateway refuses the configuration,
// naming both SAs, and the demo removes what it built.
func TestDemoWithoutCoreAddressesRefused(t *testing.T) {
	netns.RequireRoot(t)
	var out bytes.Buffer
	prefix := netns.UniqueName("demo") + "-"
	err := Run(context.Background(), Options{NAPTs: 2, Phones: 1, Core: topo.CoreNone, Out: &out, Prefix: prefix})
	if err == nil || !strings.Contains(err.Error(), `"ue2-out": selectors overlap sas[1] "ue1-out"`) {
		t.Fatalf("demo without core addresses: %v\n%s", err, out.String())
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
	w := &signalWriter{s: "the core sends OPTIONS", hit: make(chan struct{})}
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
		done <- Run(ctx, Options{NAPTs: 2, Phones: 2, Hold: 10 * time.Minute, Out: w, Prefix: prefix, Metrics: "127.0.0.1:0"})
	}()
	select {
	case err := <-done:
		text := w.String()
		if err != nil {
			t.Fatalf("demo: %v\n%s", err, text)
		}
		for _, want := range []string{"interrupted: tearing down", "delivered to the wrong phone, measured at the phones: 0 (", "topology removed"} {
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
