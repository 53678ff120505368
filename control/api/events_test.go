package api

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// waitSignal tells when the server starts waiting for an event, so the
// test raises the event only then (no sleep guessing when that is).
type waitSignal struct {
	EventSource
	entered chan struct{}
}

func (w waitSignal) Wait(ctx context.Context, since uint64) error {
	select {
	case w.entered <- struct{}{}:
	default:
	}
	return w.EventSource.Wait(ctx, since)
}

// GET /v1/events serves the lifetime enforcer's events in order, waits
// for the next one when asked, and rejects bad parameters with a 400 that
// names them.
func TestLifetimeEvents(t *testing.T) {
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	sas, err := sa.ParseBytes([]byte(`
- {name: ue1-in, spi: 0x1001, direction: in, mode: tunnel, proposal: aes128gcm16, enc_key: 000102030405060708090a0b0c0d0e0f10111213,
   local: 192.0.2.1, peer: 192.0.2.10, inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}, lifetime: {soft_packets: 100}}
`), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddAll(sas); err != nil {
		t.Fatal(err)
	}
	lt, err := lifetime.New(lifetime.Options{SAD: d, Usage: func(id sa.ID) (lifetime.Usage, bool) {
		c, ok := countersOf(id) // 0x1001 packets
		return lifetime.Usage{Packets: c.Packets}, ok
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortDir(t), "api.sock")
	src := waitSignal{EventSource: lt, entered: make(chan struct{}, 1)}
	s, err := New(Options{SAD: d, DataPath: &fakeDP{}, Events: src, API: config.API{Unix: sock}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	var c *Client
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err = NewClient("unix:"+sock, ""); err == nil {
			if _, err = c.Health(ctx); err == nil || IsStatus(err, http.StatusServiceUnavailable) {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not come up: %v", err)
		}
	}
	defer c.Close()

	// A waiting reader is woken by the event: it asks to wait the
	// longest allowed but gives up well before, so a reader that is only
	// answered when its wait runs out fails the test.
	got := make(chan Events, 1)
	go func() {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		evs, err := c.Events(rctx, 0, MaxEventWait)
		if err != nil {
			t.Errorf("the waiting reader was not woken by the event: %v", err)
		}
		got <- evs
	}()
	<-src.entered // the server is in Wait
	lt.Check()
	evs := <-got
	if len(evs.Items) != 1 || evs.Next != 1 {
		t.Fatalf("events: %+v", evs)
	}
	if e := evs.Items[0]; e.SA != "in:0x00001001" || e.Name != "ue1-in" || e.Kind != "soft" || e.Limit != "packets" || e.Value != 0x1001 || e.Threshold != 100 {
		t.Fatalf("event %+v", e)
	}
	if v, _ := c.Get(ctx, "ue1-in"); v.State != "soft-expired" {
		t.Fatalf("SA state %q, want soft-expired", v.State)
	}
	start := time.Now()
	evs, err = c.Events(ctx, 1, 100*time.Millisecond)
	if err != nil || len(evs.Items) != 0 || evs.Next != 1 || time.Since(start) < 100*time.Millisecond {
		t.Fatalf("events after the last: %+v, %v", evs, err)
	}

	h := s.Handler()
	for _, tc := range []struct{ method, query, want string }{
		{"GET", "?since=x", "since"},
		{"GET", "?wait=forever", "wait"},
		{"GET", "?wait=1h", "wait"},
		{"POST", "", "method POST not allowed"},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(tc.method, "/v1/events"+tc.query, nil))
		if rec.Code/100 != 4 || !strings.Contains(rec.Body.String(), tc.want) {
			t.Errorf("%s /v1/events%s: %d %s", tc.method, tc.query, rec.Code, rec.Body)
		}
	}
}
