// Package xsk is xesp's AF_XDP socket layer, written on golang.org/x/sys/unix:
// one UMEM shared by every socket of the gateway, fill/completion/RX/TX
// rings, batch receive and transmit, need_wakeup, the copy-mode TX budget,
// kernel statistics and frame accounting. It moves frames; it does not
// parse, encrypt or route them, owns no BPF program or map (the caller puts
// Socket.FD into its XSK map), and never copies a packet.
//
// # Memory layout
//
// One UMEM (New) of Config.FrameCount frames of Config.FrameSize bytes
// (default 4096: see Config.FrameSize), in aligned mode. The kernel puts a
// received packet at frame offset Headroom + XDP_PACKET_HEADROOM (256),
// UMEM.RxOffset. A TX descriptor may start anywhere in its frame (a worker
// writes a new L2 or encapsulation header in front of the payload it
// received) but must end inside it: Transmit refuses a descriptor crossing
// the frame end, which the kernel would count in tx_invalid_descs and never
// complete. The area is a memfd (memfd.go), not an anonymous mapping, so
// it can be handed to another process.
//
// # Hand-over to another process
//
// Export describes a quiet UMEM (no pool open) and names the descriptors
// to pass (the memfd and the bound sockets); Adopt maps them again in the
// receiving process, rings included (a bound socket's rings can be
// mapped), without unbinding, so XSK map slots holding the sockets keep
// working; the exporter then Abandons its side (unmaps and closes without
// touching a ring index) or, if the successor failed, Reclaims the rings
// as the successor left them and closes normally (adopt.go).
//
// # Sockets, rings and sharing
//
// The first socket opened on the UMEM registers it (XDP_UMEM_REG) and binds
// without XDP_SHARED_UMEM, asking for zero-copy and accepting the kernel's
// fallback to copy mode (Config.Bind can force either); Socket.Mode reports
// what XDP_OPTIONS confirms. Later sockets bind with XDP_SHARED_UMEM, which
// forbids other bind flags: mode and need_wakeup are inherited. The first
// socket on each further (device, queue) creates that queue's own fill and
// completion rings before binding (the kernel builds one buffer pool per
// (device, queue)) and names any bound socket of the UMEM as
// sxdp_shared_umem_fd; further sockets on the same (device, queue) name a
// socket of that queue and get only RX and TX rings. So a frame received on
// the public device can be transmitted on the private one by its address.
//
// # Concurrency
//
// Each worker goroutine owns its sockets' RX and TX rings and its Pool
// exclusively: Receive, Transmit and Kick take no lock. The fill and
// completion rings of a (device, queue) are single-producer/single-consumer
// rings the kernel shares among every socket bound there; exactly one of
// those sockets owns them (Socket.OwnsRings: the first opened, and on its
// Close the next), and only its worker refills and drains them, so Refill
// and Complete take no lock either (on other sockets they return 0 after
// one atomic load). The gateway opens queue q's sockets from worker
// q mod workers on, so ownership is spread over the workers. Frames a
// worker received on a queue it does not own came from the owner's pool,
// and completions for frames sent on a queue come back to that queue's
// owner: pools drift, and rebalance through the UMEM's shared overflow
// (under the UMEM mutex, once per half-pool of imbalance, never per packet
// or per loop). No counter is shared either: each socket and pool counts
// the frames it handed out (a single-writer atomic) and Accounting sums
// them. Open, Close and Accounting are control-plane calls under the UMEM
// mutex.
//
// # Frame accounting
//
// Every frame is in exactly one place: a free pool or the shared overflow
// (Free), a fill ring (Fill), taken by the kernel for RX but not yet
// posted (KernelRX), an RX ring (RX), a worker (Worker), a TX ring (TX),
// taken by the kernel for TX with no completion yet (KernelTX), a
// completion ring (Completion), or abandoned in the kernel when its
// (device, queue) was torn down (Lost; recovered when the UMEM next has no
// socket, pool or held frame). UMEM.Accounting computes each from its own
// source (pool lengths, both indexes of every ring, event counters), so a
// leak or double free shows as Total() != FrameCount. It is exact when the
// data path is quiet; under traffic it is a monitoring snapshot.
//
// # XDP metadata in copy mode (Linux 6.18, veth)
//
// Measured by TestSteerSharedQueueAndMetadata: metadata an XDP program adds
// with bpf_xdp_adjust_meta before bpf_redirect_map to an XSKMAP is copied
// into the UMEM frame in copy mode, ending exactly at the descriptor's
// address (UMEM.Meta(addr, n)); the descriptor's address and length cover
// the packet only. Bytes in front of the metadata are not cleared (zero in
// a fresh UMEM, stale in a reused frame), so readers must check a magic
// value, as xesp_meta's magic byte does.
//
// # Closing
//
// Remove a socket from the XSK map before Socket.Close. Close drains TX
// and completions, returns frames on its rings to the shared overflow and,
// for the last socket of a (device, queue), that queue's fill ring. The
// kernel frees a queue's buffer pool from a workqueue, so a bind right
// after a close may see EBUSY for a moment; Open retries for up to a
// second. UMEM.Close closes everything and unmaps the area; both are
// idempotent.
package xsk
