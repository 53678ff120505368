package metrics_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/xsktest"
)

// bumpWorkers gives three workers figures whose sums the tests know.
func bumpWorkers() []*worker.Stats {
	ws := []*worker.Stats{{}, {}, {}}
	w0, w1, w2 := ws[0], ws[1], ws[2]
	w0.Decap.Packets.Add(10)
	w0.Decap.Bytes.Add(1500)
	w0.Decap.Drops[esp.ReasonIntegrity].Add(2)
	w0.Decap.Drops[worker.DropTxFull].Add(1)
	w0.Decap.Batches[0].Add(3) // batches of 1
	w0.Decap.Batches[6].Add(1) // 33..64
	w1.Decap.Packets.Add(5)
	w1.Decap.Bytes.Add(400)
	w1.Decap.Drops[esp.ReasonReplay].Add(4)
	w1.Decap.Batches[9].Add(2) // above 256: +Inf only
	w1.Encap.Packets.Add(7)
	w1.Encap.Bytes.Add(700)
	w1.Encap.Drops[worker.DropNoNeighbor].Add(1)
	w1.Encap.Batches[3].Add(2) // 5..8
	w0.BindingChanges.Add(2)
	w2.BindingChanges.Add(1)
	w2.BindingEventsLost.Add(1)
	w0.Polls.Add(11)
	w2.Polls.Add(5)
	w1.Drained.Add(3)
	w2.Drained.Add(1)
	w0.CipherBuilds.Add(5)
	w2.CipherBuilds.Add(2)
	w0.CipherReleases.Add(3)
	return ws
}

// workerExpect is what bumpWorkers must scrape as, sums over workers.
var workerExpect = []expect{
	{"xesp_packets_total", "direction=decap,result=ok", 15},
	{"xesp_packets_total", "direction=decap,result=dropped", 7},
	{"xesp_packets_total", "direction=encap,result=ok", 7},
	{"xesp_packets_total", "direction=encap,result=dropped", 1},
	{"xesp_bytes_total", "direction=decap,result=ok", 1900},
	{"xesp_bytes_total", "direction=encap,result=ok", 700},
	{"xesp_drops_total", "direction=decap,reason=integ_error", 2},
	{"xesp_drops_total", "direction=decap,reason=replay", 4},
	{"xesp_drops_total", "direction=decap,reason=tx_full", 1},
	{"xesp_drops_total", "direction=encap,reason=no_neighbor", 1},
	{"xesp_drops_total", "direction=encap,reason=integ_error", 0},
	{"xesp_drops_total", "direction=decap,reason=bad_meta", 0},
	{"xesp_binding_changes_total", "", 3},
	{"xesp_binding_events_lost_total", "", 1},
	{"xesp_worker_idle_polls_total", "worker=0", 11},
	{"xesp_worker_idle_polls_total", "worker=1", 0},
	{"xesp_worker_idle_polls_total", "worker=2", 5},
	{"xesp_sa_removals_drained_total", "", 4},
	{"xesp_sa_ciphers_total", "result=built", 7},
	{"xesp_sa_ciphers_total", "result=released", 3},
}

// The worker figures alone (no root needed): exact values, every drop
// reason present for both directions, the histogram built from the bucket
// counters, and a clean lint.
func TestWorkerFigures(t *testing.T) {
	ws := bumpWorkers()
	src := metrics.Sources{Version: "v9.9.9", Workers: ws, SAs: func() []metrics.SACount {
		return []metrics.SACount{{Direction: "in", State: "active", Count: 3}, {Direction: "out", State: "active", Count: 3}}
	}}
	reg := metrics.New(src)
	if _, err := reg.Gather(); err != nil {
		t.Fatalf("gather: %v", err)
	}
	_, mfs := scrape(t, serve(t, src))
	checkAll(t, mfs, workerExpect)
	for _, dir := range []string{"decap", "encap"} {
		for d := worker.Drop(1); d < worker.NumDrops; d++ {
			sample(t, mfs, "xesp_drops_total", "direction="+dir+",reason="+d.String())
		}
	}
	if n := len(mfs["xesp_drops_total"].GetMetric()); n != 2*(int(worker.NumDrops)-1) {
		t.Errorf("xesp_drops_total has %d series, want %d (every reason but none, both directions)", n, 2*(int(worker.NumDrops)-1))
	}

	// The histogram through testutil's own comparison, text in, text out.
	want := `
# HELP xesp_worker_batch_size Descriptors per batch the workers took from an RX ring.
# TYPE xesp_worker_batch_size histogram
xesp_worker_batch_size_bucket{direction="decap",le="1"} 3
xesp_worker_batch_size_bucket{direction="decap",le="2"} 3
xesp_worker_batch_size_bucket{direction="decap",le="4"} 3
xesp_worker_batch_size_bucket{direction="decap",le="8"} 3
xesp_worker_batch_size_bucket{direction="decap",le="16"} 3
xesp_worker_batch_size_bucket{direction="decap",le="32"} 3
xesp_worker_batch_size_bucket{direction="decap",le="64"} 4
xesp_worker_batch_size_bucket{direction="decap",le="128"} 4
xesp_worker_batch_size_bucket{direction="decap",le="256"} 4
xesp_worker_batch_size_bucket{direction="decap",le="+Inf"} 6
xesp_worker_batch_size_sum{direction="decap"} 22
xesp_worker_batch_size_count{direction="decap"} 6
xesp_worker_batch_size_bucket{direction="encap",le="1"} 0
xesp_worker_batch_size_bucket{direction="encap",le="2"} 0
xesp_worker_batch_size_bucket{direction="encap",le="4"} 0
xesp_worker_batch_size_bucket{direction="encap",le="8"} 2
xesp_worker_batch_size_bucket{direction="encap",le="16"} 2
xesp_worker_batch_size_bucket{direction="encap",le="32"} 2
xesp_worker_batch_size_bucket{direction="encap",le="64"} 2
xesp_worker_batch_size_bucket{direction="encap",le="128"} 2
xesp_worker_batch_size_bucket{direction="encap",le="256"} 2
xesp_worker_batch_size_bucket{direction="encap",le="+Inf"} 2
xesp_worker_batch_size_sum{direction="encap"} 8
xesp_worker_batch_size_count{direction="encap"} 2
# HELP xesp_sas Security associations by direction and state.
# TYPE xesp_sas gauge
xesp_sas{direction="in",state="active"} 3
xesp_sas{direction="out",state="active"} 3
# HELP xesp_build_info Always 1; the version label says which build runs.
# TYPE xesp_build_info gauge
xesp_build_info{version="v9.9.9"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "xesp_worker_batch_size", "xesp_sas", "xesp_build_info"); err != nil {
		t.Error(err)
	}

	// A worker bumps its atomics between scrapes: the next scrape sees it.
	ws[2].Encap.Drops[esp.ReasonSeqCycled].Add(5)
	ws[2].Encap.Packets.Add(1)
	_, mfs = scrape(t, serve(t, src))
	checkAll(t, mfs, []expect{
		{"xesp_drops_total", "direction=encap,reason=seq_cycled", 5},
		{"xesp_packets_total", "direction=encap,result=dropped", 6},
		{"xesp_packets_total", "direction=encap,result=ok", 8},
	})

	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// Everything real at once: worker figures, the real xesp XDP programs'
// per-CPU counters bumped by BPF_PROG_TEST_RUN, AF_XDP sockets on veth in
// a namespace with a starved fill ring, TX descriptors waiting for a
// kick, the UMEM's accounting, all scraped over HTTP from 127.0.0.1.
func TestScrapeRealSources(t *testing.T) {
	// XDP verdicts through the real programs.
	objs, set := loadXDP(t)
	gwMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	phoneMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
	gwIP, phoneIP := net.IPv4(10, 0, 0, 1), net.IPv4(100, 64, 0, 7)
	keepalive := xsktest.UDPFrame(gwMAC, phoneMAC, phoneIP, gwIP, 31000, 4500, []byte{0xff})
	var unknown [48]byte
	binary.BigEndian.PutUint32(unknown[0:], 0x0badc0de)
	binary.BigEndian.PutUint32(unknown[4:], 1)
	noSA := xsktest.UDPFrame(gwMAC, phoneMAC, phoneIP, gwIP, 31000, 4500, unknown[:])
	arp := make([]byte, 60)
	copy(arp[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(arp[6:12], phoneMAC)
	binary.BigEndian.PutUint16(arp[12:], 0x0806)
	const xdpDrop, xdpPass = 1, 2
	runXDP(t, objs.XespPublic, keepalive, 3, xdpDrop)
	runXDP(t, objs.XespPublic, noSA, 2, xdpDrop)
	runXDP(t, objs.XespPrivate, arp, 1, xdpPass)

	// AF_XDP: two public worker sockets on one veth queue (shared fill
	// ring) and one private socket on another veth.
	gw := netns.ForTest(t, "xmet-gw")
	peer := netns.ForTest(t, "xmet-pe")
	peerPub, gwPub := netns.VethForTest(t, peer, gw)
	_, gwPriv := netns.VethForTest(t, peer, gw)
	gw.MustRun("ip", "addr", "add", "10.79.1.2/24", "dev", gwPub)
	peer.MustRun("ip", "addr", "add", "10.79.1.1/24", "dev", peerPub)
	pubIdx, pubMAC := ifaceIn(t, gw, gwPub)
	privIdx, _ := ifaceIn(t, gw, gwPriv)
	peer.MustRun("ip", "neigh", "replace", "10.79.1.2", "lladdr", pubMAC.String(), "dev", peerPub)

	u, err := xsk.New(xsk.Config{FrameCount: 512, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := u.Close(); err != nil {
			t.Errorf("close umem: %v", err)
		}
	})
	var pub0, pub1, priv0 *xsk.Socket
	if err := gw.Do(func() (err error) {
		if pub0, err = u.Open(pubIdx, 0); err != nil {
			return err
		}
		if pub1, err = u.Open(pubIdx, 0); err != nil {
			return err
		}
		priv0, err = u.Open(privIdx, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	const port = 7799
	st, err := xsktest.NewSteer(port, 2, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.Set(0, 0, pub0.FD()); err != nil {
		t.Fatal(err)
	}
	if err := st.Set(0, 1, pub1.FD()); err != nil {
		t.Fatal(err)
	}
	pool := u.NewPool()
	const given, sent, privFill, txWaiting = 8, 40, 4, 3
	if n, err := pub0.Refill(pool, given); n != given || err != nil {
		t.Fatalf("refill public: %d, %v", n, err)
	}
	if n, err := priv0.Refill(pool, privFill); n != privFill || err != nil {
		t.Fatalf("refill private: %d, %v", n, err)
	}
	// Frames on the private TX ring with no kick: copy mode sends only
	// inside sendto, so they stay there until the UMEM closes.
	addrs := make([]uint64, txWaiting)
	if n := pool.Get(addrs); n != txWaiting {
		t.Fatalf("got %d frames", n)
	}
	descs := make([]xsk.Desc, txWaiting)
	for i, a := range addrs {
		descs[i] = xsk.Desc{Addr: a + uint64(u.RxOffset()), Len: 60}
	}
	if n, err := priv0.Transmit(descs); n != txWaiting || err != nil {
		t.Fatalf("transmit: %d, %v", n, err)
	}
	attachXDP(t, gw, pubIdx, st.Prog)
	var c *net.UDPConn
	if err := peer.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 79, 1, 1), Port: 5599})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for i := range sent {
		// First payload byte 0: the steering program picks worker 0.
		if _, err := c.WriteToUDP([]byte{0, byte(i)}, &net.UDPAddr{IP: net.IPv4(10, 79, 1, 2), Port: port}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		s, err := pub0.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if pub0.RxOccupancy() == given && s.RxFillRingEmptyDescs == sent-given {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d datagrams: rx ring %d, stats %+v", sent, pub0.RxOccupancy(), s)
		}
	}

	start := time.Now().Add(-time.Hour)
	src := metrics.Sources{
		Version: "v1.2.3-test",
		Start:   start,
		Workers: bumpWorkers(),
		XDP:     set.Counters,
		Sockets: []metrics.Socket{
			{Side: metrics.Public, Worker: 0, XSK: pub0},
			{Side: metrics.Public, Worker: 1, XSK: pub1},
			{Side: metrics.Private, Worker: 0, XSK: priv0},
		},
		UMEM: u,
		SAs: func() []metrics.SACount {
			return []metrics.SACount{
				{Direction: "in", State: "active", Count: 3},
				{Direction: "out", State: "active", Count: 3},
				{Direction: "in", State: "soft-expired", Count: 1},
			}
		},
	}
	// Gathering directly first: a duplicate or inconsistent series is an
	// error here, where over HTTP ContinueOnError would only drop it.
	if _, err := metrics.New(src).Gather(); err != nil {
		t.Fatalf("gather: %v", err)
	}
	url := serve(t, src)
	body, mfs := scrape(t, url)
	checkAll(t, mfs, workerExpect)
	checkAll(t, mfs, []expect{
		{"xesp_xdp_packets_total", "program=xesp_public,reason=drop_keepalive", 3},
		{"xesp_xdp_bytes_total", "program=xesp_public,reason=drop_keepalive", float64(3 * len(keepalive))},
		{"xesp_xdp_packets_total", "program=xesp_public,reason=drop_no_sa", 2},
		{"xesp_xdp_bytes_total", "program=xesp_public,reason=drop_no_sa", float64(2 * len(noSA))},
		{"xesp_xdp_packets_total", "program=xesp_private,reason=pass_not_ip", 1},
		{"xesp_xdp_bytes_total", "program=xesp_private,reason=pass_not_ip", 60},
		{"xesp_xdp_packets_total", "program=xesp_public,reason=pass_not_ip", 0},
		{"xesp_xdp_packets_total", "program=xesp_public,reason=redirect_esp_udp", 0},

		{"xesp_xsk_ring_entries", "side=public,queue=0,worker=0,ring=rx", given},
		{"xesp_xsk_ring_entries", "side=public,queue=0,worker=0,ring=tx", 0},
		{"xesp_xsk_ring_entries", "side=public,queue=0,worker=1,ring=rx", 0},
		{"xesp_xsk_ring_entries", "side=private,queue=0,worker=0,ring=rx", 0},
		{"xesp_xsk_ring_entries", "side=private,queue=0,worker=0,ring=tx", txWaiting},
		{"xesp_xsk_fill_ring_entries", "side=public,queue=0", 0},
		{"xesp_xsk_fill_ring_entries", "side=private,queue=0", privFill},
		{"xesp_xsk_fill_ring_empty_total", "side=public,queue=0", sent - given},
		{"xesp_xsk_fill_ring_empty_total", "side=private,queue=0", 0},
		{"xesp_xsk_rx_dropped_total", "side=public,queue=0,worker=0", sent - given},
		{"xesp_xsk_rx_dropped_total", "side=public,queue=0,worker=1", 0},
		{"xesp_xsk_rx_dropped_total", "side=private,queue=0,worker=0", 0},
		{"xesp_xsk_rx_ring_full_total", "side=public,queue=0,worker=0", 0},
		{"xesp_xsk_invalid_descs_total", "side=public,queue=0,worker=0,ring=rx", 0},
		{"xesp_xsk_invalid_descs_total", "side=private,queue=0,worker=0,ring=tx", 0},

		{"xesp_umem_frames", "place=free", 512 - given - privFill - txWaiting},
		{"xesp_umem_frames", "place=fill", privFill},
		{"xesp_umem_frames", "place=kernel_rx", 0},
		{"xesp_umem_frames", "place=rx", given},
		{"xesp_umem_frames", "place=worker", 0},
		{"xesp_umem_frames", "place=tx", txWaiting},
		{"xesp_umem_frames", "place=kernel_tx", 0},
		{"xesp_umem_frames", "place=completion", 0},
		{"xesp_umem_frames", "place=lost", 0},

		{"xesp_sas", "direction=in,state=active", 3},
		{"xesp_sas", "direction=in,state=soft-expired", 1},
		{"xesp_build_info", "version=v1.2.3-test", 1},
	})
	var frames float64
	for _, m := range mfs["xesp_umem_frames"].GetMetric() {
		frames += m.GetGauge().GetValue()
	}
	if frames != 512 {
		t.Errorf("xesp_umem_frames sum to %v, want the UMEM's 512", frames)
	}
	if up := value(t, mfs, "xesp_uptime_seconds", ""); up < 3600 || up > 3600+120 {
		t.Errorf("uptime %v s, started an hour ago", up)
	}
	// Every XDP reason is exported, zeros too, under its program.
	for r := range bpf.NumReasons {
		reason := bpf.Reason(r)
		prog, name := "xesp_public", reason.String()
		if reason.Private() {
			prog, name = "xesp_private", strings.TrimPrefix(name, "priv_")
		}
		sample(t, mfs, "xesp_xdp_packets_total", "program="+prog+",reason="+name)
		sample(t, mfs, "xesp_xdp_bytes_total", "program="+prog+",reason="+name)
	}

	// The series count is a function of workers and sockets only.
	const workers, sockets, fillQueues, places, saRows = 3, 3, 2, 9, 3
	wantSeries := 4 + 2 + 2*(int(worker.NumDrops)-1) + 2 + 2 + 1 + workers +
		2*bpf.NumReasons + 2*sockets + fillQueues + fillQueues + 2*sockets + 2*sockets +
		places + saRows + 2 +
		int(worker.NumICMPKinds) + 2 + 2 + // ICMP sent by kind, limited, unsent; pre-fragmentation
		2 // ciphers built, released
	if n := xespSeries(mfs); n != wantSeries {
		t.Errorf("%d xesp_ series, want %d", n, wantSeries)
	}
	checkCardinality(t, mfs, workers)

	problems, err := promlint.New(bytes.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}

	// Scrapes may overlap (two Prometheus servers): the collector
	// serializes the counters map reads, whose buffer maps.Counters reuses.
	// Run under -race this fails without that lock.
	reg := metrics.New(src)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			mfs, err := reg.Gather()
			if err != nil {
				errs <- err
				return
			}
			for _, mf := range mfs {
				if mf.GetName() != "xesp_xdp_packets_total" {
					continue
				}
				for _, m := range mf.GetMetric() {
					if matches(m, labels("program=xesp_public,reason=drop_keepalive")) && m.GetCounter().GetValue() != 3 {
						errs <- fmt.Errorf("concurrent gather: drop_keepalive %v, want 3", m.GetCounter().GetValue())
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// A source that fails costs its own series only: close the counters
	// map under the collector and scrape again.
	if err := objs.XespMaps.Counters.Close(); err != nil {
		t.Fatal(err)
	}
	_, mfs = scrape(t, url)
	if mfs["xesp_xdp_packets_total"] != nil || mfs["xesp_xdp_bytes_total"] != nil {
		t.Errorf("XDP series served from a closed map")
	}
	checkAll(t, mfs, []expect{
		{"xesp_packets_total", "direction=decap,result=ok", 15},
		{"xesp_xsk_rx_dropped_total", "side=public,queue=0,worker=0", sent - given},
	})
	// promhttp counts a failed gathering after writing that scrape, so the
	// next scrape shows the first failure.
	_, mfs = scrape(t, url)
	checkAll(t, mfs, []expect{{"promhttp_metric_handler_errors_total", "cause=gathering", 1}})
}

func TestServe(t *testing.T) {
	// Returns nil once its context ends, with the port released.
	ctx, cancel := context.WithCancel(context.Background())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	done := make(chan error, 1)
	go func() { done <- metrics.Serve(ctx, addr, metrics.Handler(metrics.New(metrics.Sources{}))) }()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		resp, err := http.Get("http://" + addr + "/nothing")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("GET /nothing: %s, want 404: only /metrics is served", resp.Status)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server on %s never answered: %v", addr, err)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not return after cancel")
	}
	if ln, err := net.Listen("tcp", addr); err != nil {
		t.Errorf("port still taken after shutdown: %v", err)
	} else {
		ln.Close()
	}

	// A listener that cannot be opened is an error, not a hang.
	err = metrics.Serve(context.Background(), "127.0.0.1:-1", nil)
	var ae *net.AddrError
	var oe *net.OpError
	if err == nil || !(errors.As(err, &ae) || errors.As(err, &oe)) {
		t.Errorf("serve on a bad address: %v", err)
	}
}

// The slow path's outcomes appear under their names.
func TestSlowPathFigures(t *testing.T) {
	src := metrics.Sources{SlowPath: func() map[string]uint64 {
		return map[string]uint64{"esp_injected": 7, "ike_dropped": 2, "no_sa": 0}
	}}
	_, mfs := scrape(t, serve(t, src))
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "xesp_slowpath_packets_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			got[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	if len(got) != 3 || got["esp_injected"] != 7 || got["ike_dropped"] != 2 || got["no_sa"] != 0 {
		t.Fatalf("slow path series: %v", got)
	}
}
