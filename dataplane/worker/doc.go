// Package worker is xesp's data path: one goroutine per worker, locked to
// an OS thread, that takes batches of frames from its AF_XDP sockets, opens
// (public side) or seals (private side) them in place with the ESP engine,
// writes the L2 header for the other side, and transmits them from the
// same UMEM frame on the other interface's socket. Tunnel-mode packets are
// routed (router.go, xlate.go); for transport-mode SAs the gateway is the
// endpoint and re-addresses the segment between the phone's core address
// and one core-side host (transport.go).
//
// A worker is the single writer of the SAs it owns: their sequence
// counters, replay windows and NAT bindings. The XDP programs steer every
// SPI and every outbound policy to the owning worker, so no lock is taken
// per packet. The manager installs and removes SAs through Commands the
// worker applies between batches, and reads what the worker publishes
// (counters, bindings) through atomics.
//
// It must not: touch BPF maps, parse configuration, block on anything but
// its poll(2) when idle, or allocate per packet (a NAT binding change, which
// is rare and attacker-paced only after authentication, allocates one
// small value; an SA's first packet after install or after an idle
// release builds its cipher, idle.go).
//
// Security rule (RFC 3948 section 3.5, docs/architecture.md): a binding moves
// only after the packet authenticated and passed the replay check, i.e.
// after esp.Transform.OpenPacket returned success.
package worker
