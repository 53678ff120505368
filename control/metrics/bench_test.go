package metrics_test

import (
	"io"
	"net/http"
	"testing"

	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/netns"
)

// benchSources builds a 64-worker gateway's sources: real worker.Stats,
// the real XDP counters map, and a real AF_XDP socket per worker and side
// (64 sockets sharing queue 0 of each of two veths, one UMEM).
func benchSources(b *testing.B, workers int) metrics.Sources {
	_, set := loadXDP(b)
	gw := netns.ForTest(b, "xmetb-gw")
	peer := netns.ForTest(b, "xmetb-pe")
	_, gwPub := netns.VethForTest(b, peer, gw)
	_, gwPriv := netns.VethForTest(b, peer, gw)
	pubIdx, _ := ifaceIn(b, gw, gwPub)
	privIdx, _ := ifaceIn(b, gw, gwPriv)
	u, err := xsk.New(xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 64, TxSize: 64})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { u.Close() })
	src := metrics.Sources{Version: "bench", XDP: set.Counters, UMEM: u, SAs: func() []metrics.SACount {
		return []metrics.SACount{{Direction: "in", State: "active", Count: 500000}, {Direction: "out", State: "active", Count: 500000}}
	}}
	if err := gw.Do(func() error {
		for w := range workers {
			for _, side := range []metrics.Side{metrics.Public, metrics.Private} {
				idx := pubIdx
				if side == metrics.Private {
					idx = privIdx
				}
				s, err := u.Open(idx, 0)
				if err != nil {
					return err
				}
				src.Sockets = append(src.Sockets, metrics.Socket{Side: side, Worker: w, XSK: s})
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	for w := range workers {
		st := &worker.Stats{}
		st.Decap.Packets.Add(uint64(1000 * w))
		st.Decap.Drops[esp.ReasonReplay].Add(uint64(w))
		st.Decap.Batches[6].Add(uint64(w))
		st.Polls.Add(uint64(w))
		src.Workers = append(src.Workers, st)
	}
	return src
}

// BenchmarkScrape is one scrape of a 64-worker gateway (128 sockets):
// "gather" collects and sorts (what a scrape costs the daemon besides
// encoding), "http" is a whole /metrics request over loopback, and
// "gather-empty" is the Go and process collectors alone, the baseline to
// subtract.
func BenchmarkScrape(b *testing.B) {
	const workers = 64
	src := benchSources(b, workers)
	b.Run("gather", func(b *testing.B) {
		reg := metrics.New(src)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := reg.Gather(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("gather-empty", func(b *testing.B) {
		reg := metrics.New(metrics.Sources{})
		b.ReportAllocs()
		for b.Loop() {
			if _, err := reg.Gather(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("http", func(b *testing.B) {
		url := serve(b, src)
		b.ReportAllocs()
		var n int64
		for b.Loop() {
			resp, err := http.Get(url)
			if err != nil {
				b.Fatal(err)
			}
			m, err := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				b.Fatalf("scrape: %s, %v", resp.Status, err)
			}
			n = m
		}
		b.ReportMetric(float64(n), "bytes/scrape")
	})
}
