// Package slowpath owns the UDP sockets on the NAT-T port: everything the
// XDP program passes up to the kernel there ends up here. That is IKE
// (datagrams starting with the RFC 3948 non-ESP marker), IP-fragmented
// ESP-in-UDP that the kernel reassembled (XDP cannot see a fragment's SPI),
// and anything sent to the gateway's public address without crossing XDP.
//
// Each datagram is classified as RFC 3948 section 2.2 says: a single 0xFF
// byte is a NAT keepalive (counted), a zero marker is IKE (relayed
// verbatim, marker included, to the configured IKE endpoint, or counted
// and dropped), anything else is ESP, looked up by SPI in the SAD and
// handed in batches to the owning worker with worker.Worker.Inject.
//
// It must not open, authenticate or otherwise touch ESP itself: the worker
// that owns an SA is the single writer of its replay window, sequence
// counter and NAT binding, and an injected packet goes through exactly
// the checks an XDP-redirected one does. It never writes BPF maps or the
// SAD, and it never sends to any address but the IKE endpoint and the
// peers that IKE endpoint answers.
package slowpath
