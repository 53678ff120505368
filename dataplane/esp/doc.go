// Package esp owns the IPsec ESP packet transformation (RFC 4303) and the
// RFC 3948 UDP encapsulation around it: security association state (cipher
// instances, outbound sequence counter, inbound anti-replay window), sealing
// and opening packets in place on caller-owned buffers, and building and
// classifying the outer IPv4/IPv6 (+UDP) headers.
//
// It must not do I/O, start goroutines, keep mutable globals or allocate per
// packet (the one exception: the first Open or Seal of an SA whose cipher
// is not built, or was released, builds it; see Transform): the gateway workers (AF_XDP frames), the UE emulator (UDP sockets),
// the traffic generator and the tests all call it on their own buffers. An
// SA is not safe for concurrent use; xesp steers each SPI to one worker so
// every SA has a single writer.
//
// Errors on the packet path are Reason values (a uint8 that implements
// error), so returning and counting them allocates nothing.
package esp
