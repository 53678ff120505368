package etcdsrc

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/lab/etcdtest"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// An SA in etcd whose outbound selectors overlap a loaded SA's is refused
// (counted and logged naming both SAs and the selector), and the rest keeps
// serving: the first SA stays, later good SAs load.
func TestOverlapRefused(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	put(t, cli, "gw1", spec("ue1-out", 0x2001, "out", k2, 1))
	d, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuf
	src, err := New(Options{Client: cli, Prefix: prefix, Node: "gw1", SAD: d, Retry: 100 * time.Millisecond,
		Timeout: 2 * time.Second, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { src.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-src.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("source never listed")
	}
	// Phone 2 behind another NAPT with phone 1's inner address.
	intruder := spec("ue2-out", 0x2002, "out", k2, 2)
	intruder.Inner.Peer = "10.99.0.1/32"
	rejected := src.Stats.Rejected.Load()
	put(t, cli, "gw1", intruder)
	eventually(t, "overlapping SA rejected", func() bool { return src.Stats.Rejected.Load() == rejected+1 })
	if got := names(d); strings.Join(got, " ") != "ue1-out" {
		t.Fatalf("SAD holds %v", got)
	}
	if l := logs.String(); !strings.Contains(l, `sa \"ue2-out\": selectors overlap sa \"ue1-out\"`) || !strings.Contains(l, "10.99.0.1/32") {
		t.Fatalf("log does not name both SAs and the selector:\n%s", l)
	}
	put(t, cli, "gw1", spec("ue3-out", 0x2003, "out", k2, 3))
	eventually(t, "a good SA after the refused one", has(d, "ue1-out", "ue3-out"))
}
