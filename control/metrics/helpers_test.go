package metrics_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

// serve runs metrics.ServeListener for src on 127.0.0.1:0 until the test
// ends and returns the /metrics URL. The cleanup checks that the server
// shut down cleanly when its context ended.
func serve(t testing.TB, src metrics.Sources) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- metrics.ServeListener(ctx, ln, metrics.Handler(metrics.New(src))) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("serve did not return after its context ended")
		}
	})
	return "http://" + ln.Addr().String() + "/metrics"
}

// scrape fetches url and parses the text exposition.
func scrape(t testing.TB, url string) (body []byte, mfs map[string]*dto.MetricFamily) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err = p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse exposition: %v\n%s", err, body)
	}
	return body, mfs
}

// labels is a label set written "k=v,k=v" for compact test tables.
func labels(s string) map[string]string {
	m := map[string]string{}
	if s == "" {
		return m
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

func matches(m *dto.Metric, want map[string]string) bool {
	if len(m.GetLabel()) != len(want) {
		return false
	}
	for _, lp := range m.GetLabel() {
		if v, ok := want[lp.GetName()]; !ok || v != lp.GetValue() {
			return false
		}
	}
	return true
}

// sample finds the one series of name with exactly the labels lbl.
func sample(t *testing.T, mfs map[string]*dto.MetricFamily, name, lbl string) *dto.Metric {
	t.Helper()
	mf := mfs[name]
	if mf == nil {
		t.Fatalf("no metric family %s", name)
	}
	want := labels(lbl)
	var found *dto.Metric
	for _, m := range mf.GetMetric() {
		if matches(m, want) {
			if found != nil {
				t.Fatalf("%s{%s}: two series", name, lbl)
			}
			found = m
		}
	}
	if found == nil {
		t.Fatalf("%s{%s}: no such series", name, lbl)
	}
	return found
}

func value(t *testing.T, mfs map[string]*dto.MetricFamily, name, lbl string) float64 {
	t.Helper()
	m := sample(t, mfs, name, lbl)
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	t.Fatalf("%s{%s} is neither counter nor gauge", name, lbl)
	return 0
}

// expect is one asserted sample.
type expect struct {
	name, labels string
	value        float64
}

func checkAll(t *testing.T, mfs map[string]*dto.MetricFamily, want []expect) {
	t.Helper()
	for _, e := range want {
		if got := value(t, mfs, e.name, e.labels); got != e.value {
			t.Errorf("%s{%s} = %v, want %v", e.name, e.labels, got, e.value)
		}
	}
}

// xespSeries counts the xesp_ series (a histogram is one series here).
func xespSeries(mfs map[string]*dto.MetricFamily) int {
	n := 0
	for name, mf := range mfs {
		if strings.HasPrefix(name, "xesp_") {
			n += len(mf.GetMetric())
		}
	}
	return n
}

// allowedLabels are the only label names an xesp_ series may carry. None
// of them can name an SA; per-SA figures belong to the API.
var allowedLabels = map[string]bool{
	"direction": true, "result": true, "reason": true, "program": true, "side": true,
	"queue": true, "worker": true, "ring": true, "place": true, "state": true, "version": true,
}

// checkCardinality fails on a label name outside allowedLabels and on any
// label with more distinct values than the largest fixed enumeration (the
// reason lists) or, for worker and queue, than maxIndex.
func checkCardinality(t *testing.T, mfs map[string]*dto.MetricFamily, maxIndex int) {
	t.Helper()
	limit := max(bpf.NumReasons, 32)
	for name, mf := range mfs {
		if !strings.HasPrefix(name, "xesp_") {
			continue
		}
		values := map[string]map[string]bool{}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if !allowedLabels[lp.GetName()] {
					t.Errorf("%s has label %q", name, lp.GetName())
				}
				if values[lp.GetName()] == nil {
					values[lp.GetName()] = map[string]bool{}
				}
				values[lp.GetName()][lp.GetValue()] = true
			}
		}
		for l, vs := range values {
			n := limit
			if l == "worker" || l == "queue" {
				n = maxIndex
			}
			if len(vs) > n {
				t.Errorf("%s label %s has %d values (limit %d): %v", name, l, len(vs), n, keys(vs))
			}
		}
	}
}

func keys(m map[string]bool) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	sort.Strings(s)
	return s
}

// loadXDP loads the real xesp programs with a small SA map and returns
// them with their typed maps.
func loadXDP(t testing.TB) (*bpf.XespObjects, *maps.Set) {
	t.Helper()
	netns.RequireRoot(t)
	spec, err := bpf.LoadXesp()
	if err != nil {
		t.Fatal(err)
	}
	spec.Maps[bpf.XespMapSas].MaxEntries = 1024
	var objs bpf.XespObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("load xesp programs: %+v", ve)
		}
		t.Fatalf("load xesp programs: %v", err)
	}
	// Close errors are ignored: a test may close the counters map early.
	t.Cleanup(func() { _ = objs.Close() })
	set, err := maps.New(&objs.XespMaps)
	if err != nil {
		t.Fatal(err)
	}
	if err := set.Config.Set(bpf.Config{Workers: 1}); err != nil {
		t.Fatal(err)
	}
	return &objs, set
}

// runXDP feeds frame to prog n times with BPF_PROG_TEST_RUN and checks the
// verdict each time.
func runXDP(t testing.TB, prog *ebpf.Program, frame []byte, n int, verdict uint32) {
	t.Helper()
	for range n {
		ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)})
		if err != nil {
			t.Fatalf("prog run: %v", err)
		}
		if ret != verdict {
			t.Fatalf("verdict %d, want %d", ret, verdict)
		}
	}
}

// attachXDP puts prog on ifname inside ns in driver mode until the test
// ends.
func attachXDP(t testing.TB, ns *netns.NS, ifindex int, prog *ebpf.Program) {
	t.Helper()
	if err := ns.Do(func() error {
		l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach xdp to ifindex %d: %w", ifindex, err)
		}
		t.Cleanup(func() { l.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// ifaceIn returns the index and MAC of name inside ns.
func ifaceIn(t testing.TB, ns *netns.NS, name string) (int, net.HardwareAddr) {
	t.Helper()
	var idx int
	var mac net.HardwareAddr
	if err := ns.Do(func() error {
		i, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		idx, mac = i.Index, i.HardwareAddr
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return idx, mac
}
