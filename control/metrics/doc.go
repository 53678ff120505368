// Package metrics exposes xesp's figures to Prometheus on /metrics. It owns
// the metric names and labels below and reads every figure at scrape time
// from the sources the daemon hands it (Sources): the workers' atomic
// counters, the XDP verdict counters map, the AF_XDP sockets' kernel
// statistics and ring indexes, the UMEM's frame accounting and the SA
// counts.
//
// It must not: be called from the data path (workers only bump atomics;
// all Prometheus work happens in Collect, on the scrape goroutine), write
// any BPF map or socket, keep per-packet or per-SA state, or put an SA
// (SPI, name, peer) in a label. Carriers run 10^5–10^6 SAs; per-SA figures
// come from the control API, never from here.
//
// # Metrics
//
//	name                              type       labels                       source
//	xesp_packets_total                counter    direction, result            worker.DirStats Packets (ok), sum of Drops (dropped)
//	xesp_bytes_total                  counter    direction, result            worker.DirStats Bytes (result="ok" only, see below)
//	xesp_drops_total                  counter    direction, reason            worker.DirStats Drops, every reason (zeros too)
//	xesp_worker_batch_size            histogram  direction                    worker.DirStats Batches (le 1, 2, 4 … 256, +Inf)
//	xesp_binding_changes_total        counter    -                            worker.Stats BindingChanges
//	xesp_binding_events_lost_total    counter    -                            worker.Stats BindingEventsLost
//	xesp_worker_idle_polls_total      counter    worker                       worker.Stats Polls
//	xesp_sa_removals_drained_total    counter    -                            worker.Stats Drained
//	xesp_sa_ciphers_total             counter    result                       worker.Stats CipherBuilds (built), CipherReleases (released)
//	xesp_xdp_packets_total            counter    program, reason              maps.Counters (every reason, zeros too)
//	xesp_xdp_bytes_total              counter    program, reason              maps.Counters
//	xesp_xsk_ring_entries             gauge      side, queue, worker, ring    Socket.RxOccupancy (rx), TxPending (tx)
//	xesp_xsk_fill_ring_entries        gauge      side, queue                  Socket.FillOccupancy, once per (device, queue)
//	xesp_xsk_fill_ring_empty_total    counter    side, queue                  XDP_STATISTICS rx_fill_ring_empty_descs, once per (device, queue)
//	xesp_xsk_rx_dropped_total         counter    side, queue, worker          XDP_STATISTICS rx_dropped
//	xesp_xsk_rx_ring_full_total       counter    side, queue, worker          XDP_STATISTICS rx_ring_full
//	xesp_xsk_invalid_descs_total      counter    side, queue, worker, ring    XDP_STATISTICS rx/tx_invalid_descs
//	xesp_umem_frames                  gauge      place                        UMEM.Accounting
//	xesp_sas                          gauge      direction, state             Sources.SAs
//	xesp_etcd_sa_records_rejected_total counter  reason                       Sources.EtcdRejected (unknown_key, unsealable, invalid)
//	xesp_api_tcp_connections          gauge      -                            Sources.APIConns (held now)
//	xesp_api_tcp_refused_total        counter    -                            Sources.APIConns (closed at accept, source over its share)
//	xesp_uptime_seconds               gauge      -                            since Sources.Start
//	xesp_build_info                   gauge      version                      always 1
//
// Label values: direction is decap|encap for the data path and in|out for
// SAs (as package sa spells them); result is ok|dropped; reason is
// worker.Drop.String() (the ESP engine's VPP-style names such as
// integ_error, replay, no_sa, plus bad_meta, wrong_direction, policy,
// no_neighbor, tx_full) for xesp_drops_total, and bpf.Reason.String() with
// the "priv_" prefix removed for the XDP metrics, so that the same cause
// (aborted, pass_not_ip, drop_no_xsk) sums across programs; program is
// xesp_public|xesp_private (bpf.Reason.Private); side is public|private;
// ring is rx|tx; place is free, fill, kernel_rx, rx, worker, tx, kernel_tx,
// completion, lost (the fields of xsk.Accounting). worker and queue are
// decimal indexes, so the series count grows with workers × queues (≤ 64
// workers), never with SAs.
//
// Departures from the first draft of the names, and why:
//   - The fill ring and its rx_fill_ring_empty_descs statistic belong to a
//     (device, queue), shared by every worker socket bound there (the kernel
//     reads the statistic from the shared buffer pool). Labelled per worker
//     they would repeat one figure per worker and sum to a multiple of the
//     truth, so they are exported once per (side, queue) under their own
//     names.
//   - Per-socket series carry a queue label: with more than one NIC queue a
//     worker has one socket per queue and side, and {side, worker} alone
//     would give two sockets the same series.
//   - xesp_bytes_total has result="ok" only: workers count the bytes they
//     forward but not the bytes they drop (dropped bytes at the XDP stage
//     are in xesp_xdp_bytes_total).
//   - The histogram's sum is the number of frames the workers handled in
//     that direction (forwarded + dropped): every frame of a batch ends in
//     exactly one of those, so their total is the sum of the batch sizes.
//     The one exception is a slow-path packet dropped while the worker
//     builds its frame (no_frame, or no_room before decap), which is a drop
//     outside any batch: the sum can exceed the true batch total by those
//     rare drops. The workers keep no exact sum; a Frames counter in
//     worker.DirStats would make it exact. The last worker bucket (batches
//     above 256) has no finite bound and shows only in +Inf.
//   - The "none" ESP reason (index 0 of worker.Drop) is not a drop and is
//     not exported.
//
// Counters are sums over workers taken at scrape time; each source only
// grows, so the sums are monotonic as long as the set of workers and
// sockets is (a socket reopened by the daemon restarts its kernel
// counters, which Prometheus treats as a counter reset).
//
// # Serving
//
// New builds a registry with the xesp collector and the Go runtime and
// process collectors; Handler wraps it in promhttp with a timeout,
// coalesced gathering and a cap on concurrent scrapes; Serve runs the
// daemon's metrics listener until its context ends and then shuts down
// gracefully. Stop serving before closing the sockets or maps the
// collector reads.
package metrics
