package manager

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/worker"
)

// flakyStore is a real seqstore whose Reserve can be made to fail as a
// shared store out of reach does, or as a fenced one does.
type flakyStore struct {
	*seqstore.Store
	down, fenced atomic.Bool
	calls        atomic.Int32
}

func (s *flakyStore) Reserve(b []seqstore.Reservation) error {
	s.calls.Add(1)
	switch {
	case s.fenced.Load():
		return seqstore.ErrFenced
	case s.down.Load():
		return errors.New("etcd unreachable")
	}
	return s.Store.Reserve(b)
}

// A failed extension is retried until the store takes it (a worker asks
// only once per block); a fenced one is not retried.
func TestExtensionRetried(t *testing.T) {
	f := newFixture(t, 1, "")
	st, err := seqstore.Open(t.TempDir(), seqstore.Options{Block: 1000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	fs := &flakyStore{Store: st}
	reqs := make(chan worker.SeqRequest)
	retry := make(chan time.Time)
	m, err := New(Options{SAD: f.d, Maps: f.maps, Workers: f.w, Events: make(chan worker.BindingChange), Seq: fs, SeqRequests: reqs, Retry: retry})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	out := mkSA("out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	if _, err := f.d.Add(out); err != nil {
		t.Fatal(err)
	}
	if err := m.WaitVersion(ctx, f.d.Version()); err != nil {
		t.Fatal(err)
	}
	e, _ := f.d.Get(out.ID())
	we := f.w.entry(0, e.Index)
	if we.Limit.Load() != 1001 {
		t.Fatalf("limit %d after install, want 1001", we.Limit.Load())
	}

	fs.down.Store(true)
	we.Counters.Seq.Store(600)
	// Run is one loop: once it has taken a send, whatever it took before
	// has been handled.
	before := fs.calls.Load()
	reqs <- worker.SeqRequest{Worker: 0, Index: e.Index}
	retry <- time.Time{}
	retry <- time.Time{}
	retry <- time.Time{} // the request and (at least) two retries done
	if n := fs.calls.Load() - before; we.Limit.Load() != 1001 || n < 3 {
		t.Fatalf("store down: limit %d after %d calls, want 1001 after the first try and two retries", we.Limit.Load(), n)
	}
	fs.down.Store(false)
	retry <- time.Time{}
	retry <- time.Time{} // the first retry with the store back done
	if we.Limit.Load() != 2001 {
		t.Fatalf("limit %d: the extension was not retried once the store was back", we.Limit.Load())
	}

	fs.fenced.Store(true)
	we.Counters.Seq.Store(1600)
	before = fs.calls.Load()
	reqs <- worker.SeqRequest{Worker: 0, Index: e.Index}
	for range 3 {
		retry <- time.Time{}
	}
	if n := fs.calls.Load() - before; n != 1 || we.Limit.Load() != 2001 {
		t.Fatalf("fenced: %d calls, limit %d; want one call and no new limit", n, we.Limit.Load())
	}
}

// An SA whose first reservation fails (the shared store out of reach) is
// not left in the SAD but off the data path: it is installed once the
// store takes reservations again.
func TestInstallRetriedAfterReserveFailure(t *testing.T) {
	f := newFixture(t, 1, "")
	st, err := seqstore.Open(t.TempDir(), seqstore.Options{Block: 1000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	fs := &flakyStore{Store: st}
	fs.down.Store(true)
	retry := make(chan time.Time)
	m, err := New(Options{SAD: f.d, Maps: f.maps, Workers: f.w, Events: make(chan worker.BindingChange), Seq: fs,
		SeqRequests: make(chan worker.SeqRequest), Retry: retry, Log: slog.New(slog.NewTextHandler(tlog{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	in, out := mkSA("in", 0x1001, sa.In, "10.99.0.1/32", 1), mkSA("out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	if _, err := f.d.Add(in); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.Add(out); err != nil {
		t.Fatal(err)
	}
	if err := m.WaitVersion(ctx, f.d.Version()); err != nil {
		t.Fatal(err)
	}
	e, _ := f.d.Get(out.ID())
	if we := f.w.entry(0, e.Index); we != nil {
		t.Fatal("outbound SA installed without a reservation")
	}
	before := fs.calls.Load()
	retry <- time.Time{}
	retry <- time.Time{} // a retry while still down done
	if fs.calls.Load() == before {
		t.Fatal("no reservation retried while the store was down")
	}
	if we := f.w.entry(0, e.Index); we != nil {
		t.Fatal("outbound SA installed while the store was still down")
	}
	fs.down.Store(false)
	retry <- time.Time{}
	retry <- time.Time{} // the first retry with the store back done
	if we := f.w.entry(0, e.Index); we == nil || we.Limit.Load() != 1001 {
		t.Fatal("outbound SA not installed after the store came back")
	}
	ie, _ := f.d.Get(in.ID())
	if f.w.entry(0, ie.Index) == nil {
		t.Fatal("inbound SA of the failed batch not installed")
	}
	if _, ok := m.Counters(out.ID()); !ok {
		t.Fatal("manager does not report the SA as live")
	}
}

type tlog struct{ t *testing.T }

func (l tlog) Write(p []byte) (int, error) { l.t.Log(string(p)); return len(p), nil }
