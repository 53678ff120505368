package metrics

import (
	"fmt"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/maps"
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descPackets = desc("xesp_packets_total",
		"Packets the workers handled, by direction and result (ok: forwarded; dropped: see xesp_drops_total).",
		"direction", "result")
	descBytes = desc("xesp_bytes_total",
		"Bytes the workers forwarded, frames as transmitted (dropped bytes are not counted by the workers).",
		"direction", "result")
	descDrops = desc("xesp_drops_total",
		"Packets the workers dropped, by direction and reason.",
		"direction", "reason")
	descBatch = desc("xesp_worker_batch_size",
		"Descriptors per batch the workers took from an RX ring.",
		"direction")
	descBindingChanges = desc("xesp_binding_changes_total",
		"NAT binding changes the workers applied after authentication (RFC 3948 port or address change).")
	descBindingLost = desc("xesp_binding_events_lost_total",
		"Binding changes the manager's queue had no room for (its periodic scan still finds them).")
	descPolls = desc("xesp_worker_idle_polls_total",
		"Times a worker found nothing to do and slept in poll(2).",
		"worker")
	descDrained = desc("xesp_sa_removals_drained_total",
		"SA removals the workers completed after processing the frames XDP had already steered to the SA.")
	descCiphers = desc("xesp_sa_ciphers_total",
		"SA ciphers the workers built on an SA's first packet (after install or an idle release) and released after the SA was idle; built minus released is how many are alive (~0.77 KB each for AES-GCM).",
		"result")
	descSlowPath = desc("xesp_slowpath_packets_total",
		"Datagrams the NAT-T socket received from the kernel (what XDP passed up: reassembled fragments, IKE), by outcome.",
		"result")
	descLifetime = desc("xesp_sa_lifetime_expiries_total",
		"SA lifetimes reached, by kind (soft: rekey due; hard: SA removed) and limit (time, bytes, packets, seq); kind idle, limit idle: idle-phone events.",
		"kind", "limit")
	descFloodActive = desc("xesp_flood_sas",
		"SAs whose flood budget XDP enforced within the last second (GET /v1/floods names them; an SA is not a label).")
	descFloodFailures = desc("xesp_flood_auth_failures_total",
		"Failed authentications the workers charged to the flood budgets.")
	descEtcdRejected = desc("xesp_etcd_sa_records_rejected_total",
		"SA records from etcd this gateway refused, by reason (unknown_key, unsealable, invalid).",
		"reason")
	descAPIConns = desc("xesp_api_tcp_connections",
		"Connections the API's TCP listener holds now (capped by api.max_conns).")
	descAPIRefused = desc("xesp_api_tcp_refused_total",
		"Connections the API's TCP listener closed at accept: their source was at api.max_conns_per_source.")
	descXDPPackets = desc("xesp_xdp_packets_total",
		"Packets the XDP programs gave a verdict, by program and reason.",
		"program", "reason")
	descXDPBytes = desc("xesp_xdp_bytes_total",
		"Bytes of the packets the XDP programs gave a verdict, by program and reason.",
		"program", "reason")
	descRing = desc("xesp_xsk_ring_entries",
		"Descriptors on a socket's RX ring (received, not yet taken by the worker) or TX ring (not yet taken by the kernel).",
		"side", "queue", "worker", "ring")
	descFill = desc("xesp_xsk_fill_ring_entries",
		"Frames on the fill ring of a (device, queue), shared by the workers' sockets there.",
		"side", "queue")
	descFillEmpty = desc("xesp_xsk_fill_ring_empty_total",
		"Packets that found the fill ring of a (device, queue) empty (kernel rx_fill_ring_empty_descs).",
		"side", "queue")
	descRxDropped = desc("xesp_xsk_rx_dropped_total",
		"Packets the kernel dropped for a socket: no frame or no room (kernel rx_dropped).",
		"side", "queue", "worker")
	descRxFull = desc("xesp_xsk_rx_ring_full_total",
		"Packets dropped because a socket's RX ring was full (kernel rx_ring_full).",
		"side", "queue", "worker")
	descInvalid = desc("xesp_xsk_invalid_descs_total",
		"Invalid descriptors the kernel found on a socket's RX or TX ring.",
		"side", "queue", "worker", "ring")
	descFrames = desc("xesp_umem_frames",
		"UMEM frames by where they are now; the places add up to the UMEM's frame count.",
		"place")
	descSAs = desc("xesp_sas",
		"Security associations by direction and state.",
		"direction", "state")
	descUptime = desc("xesp_uptime_seconds",
		"Seconds since the daemon started.")
	descICMP = desc("xesp_icmp_errors_total",
		"ICMP errors the workers generated, by reason (time_exceeded, too_big) and result (sent; limited: the rate limit held it back; unsent: no source address or no outbound SA; both with reason \"any\").",
		"reason", "result")
	descPreFrag = desc("xesp_prefragmented_packets_total",
		"IPv4 packets from the core (DF clear) split before sealing to fit the public MTU (RFC 4459 pre-fragmentation).")
	descPreFrags = desc("xesp_prefragments_total",
		"Inner fragments made by pre-fragmentation, each sealed into its own ESP packet.")
	descIdle = desc("xesp_sa_idle",
		"Inbound SAs whose phone is idle now: no authenticated packet and no NAT-keepalive for the idle timeout.")
	descBuild = desc("xesp_build_info",
		"Always 1; the version label says which build runs.",
		"version")
)

var allDescs = []*prometheus.Desc{
	descPackets, descBytes, descDrops, descBatch, descBindingChanges, descBindingLost, descPolls,
	descXDPPackets, descXDPBytes, descRing, descFill, descFillEmpty, descRxDropped, descRxFull,
	descInvalid, descFrames, descSAs, descUptime, descBuild, descSlowPath, descLifetime, descDrained, descCiphers,
	descFloodActive, descFloodFailures,
	descEtcdRejected, descAPIConns, descAPIRefused,
	descICMP, descPreFrag, descPreFrags, descIdle,
}

// directions are the label values of worker.Stats' two DirStats, in the
// order dirStats returns them.
var directions = [2]string{"decap", "encap"}

func dirStats(s *worker.Stats) [2]*worker.DirStats { return [2]*worker.DirStats{&s.Decap, &s.Encap} }

// batchBounds are the finite upper bounds of the worker's batch buckets.
// The last worker bucket also counts every larger batch, so it has no
// finite bound and is left to +Inf.
var batchBounds = func() [worker.BatchBuckets - 1]float64 {
	var b [worker.BatchBuckets - 1]float64
	for i := range b {
		b[i] = float64(worker.BatchBucketUpper(i))
	}
	return b
}()

// sockLabels are one socket's label values, formatted once.
type sockLabels struct {
	side, queue, worker string
}

// collector reads Sources at scrape time. Label strings are built in
// newCollector so a scrape formats no integers.
type collector struct {
	src     Sources
	start   time.Time
	version string
	workers []string // worker label per Sources.Workers index
	socks   []sockLabels
	// fillRep marks one socket per (side, device, queue): it reports the
	// fill ring and its statistic, which the queue's sockets share.
	fillRep []bool

	xdpProgram, xdpReason [bpf.NumReasons]string

	xdpMu sync.Mutex // maps.Counters.Read reuses a buffer; scrapes may overlap
	snap  maps.Snapshot
}

func newCollector(src Sources) *collector {
	c := &collector{src: src, start: src.Start, version: src.Version}
	if c.start.IsZero() {
		c.start = time.Now()
	}
	if c.version == "" {
		c.version = "unknown"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
			c.version = bi.Main.Version
		}
	}
	c.workers = make([]string, len(src.Workers))
	for i := range c.workers {
		c.workers[i] = strconv.Itoa(i)
	}
	type fillKey struct {
		side           Side
		ifindex, queue int
	}
	seen := map[fillKey]bool{}
	c.socks = make([]sockLabels, len(src.Sockets))
	c.fillRep = make([]bool, len(src.Sockets))
	for i, s := range src.Sockets {
		c.socks[i] = sockLabels{side: s.Side.String(), queue: strconv.Itoa(s.XSK.Queue()), worker: strconv.Itoa(s.Worker)}
		k := fillKey{s.Side, s.XSK.Ifindex(), s.XSK.Queue()}
		c.fillRep[i] = !seen[k]
		seen[k] = true
	}
	for r := range bpf.NumReasons {
		reason := bpf.Reason(r)
		c.xdpProgram[r] = "xesp_public"
		c.xdpReason[r] = reason.String()
		if reason.Private() {
			c.xdpProgram[r] = "xesp_private"
			c.xdpReason[r] = strings.TrimPrefix(reason.String(), "priv_")
		}
	}
	return c
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	c.collectWorkers(ch)
	c.collectXDP(ch)
	c.collectSockets(ch)
	if c.src.UMEM != nil {
		a := c.src.UMEM.Accounting()
		for _, p := range [...]struct {
			place string
			n     int64
		}{{"free", a.Free}, {"fill", a.Fill}, {"kernel_rx", a.KernelRX}, {"rx", a.RX}, {"worker", a.Worker},
			{"tx", a.TX}, {"kernel_tx", a.KernelTX}, {"completion", a.Completion}, {"lost", a.Lost}} {
			ch <- prometheus.MustNewConstMetric(descFrames, prometheus.GaugeValue, float64(p.n), p.place)
		}
	}
	if c.src.SlowPath != nil {
		for name, n := range c.src.SlowPath() {
			ch <- prometheus.MustNewConstMetric(descSlowPath, prometheus.CounterValue, float64(n), name)
		}
	}
	if c.src.Flood != nil {
		active, failures := c.src.Flood()
		ch <- prometheus.MustNewConstMetric(descFloodActive, prometheus.GaugeValue, float64(active))
		ch <- prometheus.MustNewConstMetric(descFloodFailures, prometheus.CounterValue, float64(failures))
	}
	if c.src.Lifetime != nil {
		for key, n := range c.src.Lifetime() {
			kind, limit, _ := strings.Cut(key, "/")
			ch <- prometheus.MustNewConstMetric(descLifetime, prometheus.CounterValue, float64(n), kind, limit)
		}
	}
	if c.src.EtcdRejected != nil {
		for reason, n := range c.src.EtcdRejected() {
			ch <- prometheus.MustNewConstMetric(descEtcdRejected, prometheus.CounterValue, float64(n), reason)
		}
	}
	if c.src.APIConns != nil {
		open, refused := c.src.APIConns()
		ch <- prometheus.MustNewConstMetric(descAPIConns, prometheus.GaugeValue, float64(open))
		ch <- prometheus.MustNewConstMetric(descAPIRefused, prometheus.CounterValue, float64(refused))
	}
	if c.src.Idle != nil {
		ch <- prometheus.MustNewConstMetric(descIdle, prometheus.GaugeValue, float64(c.src.Idle()))
	}
	if c.src.SAs != nil {
		for _, n := range c.src.SAs() {
			ch <- prometheus.MustNewConstMetric(descSAs, prometheus.GaugeValue, float64(n.Count), n.Direction, n.State)
		}
	}
	ch <- prometheus.MustNewConstMetric(descUptime, prometheus.GaugeValue, time.Since(c.start).Seconds())
	ch <- prometheus.MustNewConstMetric(descBuild, prometheus.GaugeValue, 1, c.version)
}

// dirTotals are one direction's figures summed over workers.
type dirTotals struct {
	packets, bytes uint64
	drops          [worker.NumDrops]uint64
	batches        [worker.BatchBuckets]uint64
}

func (c *collector) collectWorkers(ch chan<- prometheus.Metric) {
	var tot [2]dirTotals
	var changes, lost, drained, limited, unsent, prefrag, frags, built, released uint64
	var icmp [worker.NumICMPKinds]uint64
	for i, w := range c.src.Workers {
		for k := range icmp {
			icmp[k] += w.ICMP[k].Load()
		}
		limited += w.ICMPLimited.Load()
		unsent += w.ICMPUnsent.Load()
		prefrag += w.PreFragmented.Load()
		frags += w.PreFragments.Load()
		for d, ds := range dirStats(w) {
			t := &tot[d]
			t.packets += ds.Packets.Load()
			t.bytes += ds.Bytes.Load()
			for r := range ds.Drops {
				t.drops[r] += ds.Drops[r].Load()
			}
			for b := range ds.Batches {
				t.batches[b] += ds.Batches[b].Load()
			}
		}
		changes += w.BindingChanges.Load()
		lost += w.BindingEventsLost.Load()
		drained += w.Drained.Load()
		built += w.CipherBuilds.Load()
		released += w.CipherReleases.Load()
		ch <- prometheus.MustNewConstMetric(descPolls, prometheus.CounterValue, float64(w.Polls.Load()), c.workers[i])
	}
	for d, t := range tot {
		dir := directions[d]
		var dropped uint64
		for r := worker.Drop(esp.ReasonNone) + 1; r < worker.NumDrops; r++ {
			dropped += t.drops[r]
			ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(t.drops[r]), dir, r.String())
		}
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(t.packets), dir, "ok")
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(dropped), dir, "dropped")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(t.bytes), dir, "ok")

		buckets := make(map[float64]uint64, len(batchBounds))
		var cum uint64
		for b, le := range batchBounds {
			cum += t.batches[b]
			buckets[le] = cum
		}
		count := cum + t.batches[worker.BatchBuckets-1]
		// Every frame of a batch ends forwarded or dropped, once, so their
		// total is the sum of the batch sizes (up to the rare slow-path
		// drops outside a batch; see the package doc).
		sum := float64(t.packets + dropped)
		ch <- prometheus.MustNewConstHistogram(descBatch, count, sum, buckets, dir)
	}
	ch <- prometheus.MustNewConstMetric(descBindingChanges, prometheus.CounterValue, float64(changes))
	ch <- prometheus.MustNewConstMetric(descDrained, prometheus.CounterValue, float64(drained))
	ch <- prometheus.MustNewConstMetric(descCiphers, prometheus.CounterValue, float64(built), "built")
	ch <- prometheus.MustNewConstMetric(descCiphers, prometheus.CounterValue, float64(released), "released")
	ch <- prometheus.MustNewConstMetric(descBindingLost, prometheus.CounterValue, float64(lost))
	for k := range icmp {
		ch <- prometheus.MustNewConstMetric(descICMP, prometheus.CounterValue, float64(icmp[k]), worker.ICMPKindName(k), "sent")
	}
	ch <- prometheus.MustNewConstMetric(descICMP, prometheus.CounterValue, float64(limited), "any", "limited")
	ch <- prometheus.MustNewConstMetric(descICMP, prometheus.CounterValue, float64(unsent), "any", "unsent")
	ch <- prometheus.MustNewConstMetric(descPreFrag, prometheus.CounterValue, float64(prefrag))
	ch <- prometheus.MustNewConstMetric(descPreFrags, prometheus.CounterValue, float64(frags))
}

func (c *collector) collectXDP(ch chan<- prometheus.Metric) {
	if c.src.XDP == nil {
		return
	}
	c.xdpMu.Lock()
	defer c.xdpMu.Unlock()
	if err := c.src.XDP.Read(&c.snap); err != nil {
		ch <- prometheus.NewInvalidMetric(descXDPPackets, fmt.Errorf("read xdp verdict counters: %w", err))
		return
	}
	for r, v := range c.snap {
		ch <- prometheus.MustNewConstMetric(descXDPPackets, prometheus.CounterValue, float64(v.Packets), c.xdpProgram[r], c.xdpReason[r])
		ch <- prometheus.MustNewConstMetric(descXDPBytes, prometheus.CounterValue, float64(v.Bytes), c.xdpProgram[r], c.xdpReason[r])
	}
}

func (c *collector) collectSockets(ch chan<- prometheus.Metric) {
	for i, s := range c.src.Sockets {
		l := &c.socks[i]
		ch <- prometheus.MustNewConstMetric(descRing, prometheus.GaugeValue, float64(s.XSK.RxOccupancy()), l.side, l.queue, l.worker, "rx")
		ch <- prometheus.MustNewConstMetric(descRing, prometheus.GaugeValue, float64(s.XSK.TxPending()), l.side, l.queue, l.worker, "tx")
		if c.fillRep[i] {
			ch <- prometheus.MustNewConstMetric(descFill, prometheus.GaugeValue, float64(s.XSK.FillOccupancy()), l.side, l.queue)
		}
		st, err := s.XSK.Stats()
		if err != nil {
			ch <- prometheus.NewInvalidMetric(descRxDropped, fmt.Errorf("xsk %s queue %s worker %s: %w", l.side, l.queue, l.worker, err))
			continue
		}
		ch <- prometheus.MustNewConstMetric(descRxDropped, prometheus.CounterValue, float64(st.RxDropped), l.side, l.queue, l.worker)
		ch <- prometheus.MustNewConstMetric(descRxFull, prometheus.CounterValue, float64(st.RxRingFull), l.side, l.queue, l.worker)
		ch <- prometheus.MustNewConstMetric(descInvalid, prometheus.CounterValue, float64(st.RxInvalidDescs), l.side, l.queue, l.worker, "rx")
		ch <- prometheus.MustNewConstMetric(descInvalid, prometheus.CounterValue, float64(st.TxInvalidDescs), l.side, l.queue, l.worker, "tx")
		if c.fillRep[i] {
			ch <- prometheus.MustNewConstMetric(descFillEmpty, prometheus.CounterValue, float64(st.RxFillRingEmptyDescs), l.side, l.queue)
		}
	}
}
