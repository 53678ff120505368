package worker

import (
	"math/bits"
	"sync/atomic"

	"github.com/xesp/xesp/dataplane/esp"
)

// Drop is why the worker dropped a frame. The first esp.NumReasons values
// are the ESP engine's reasons, so an engine error is counted without
// translation; the rest are the worker's own.
type Drop uint8

const (
	DropBadMeta       = Drop(esp.NumReasons) + iota // frame without valid xesp metadata
	DropWrongDir                                    // SA at the index is of the other direction
	DropPolicy                                      // inner packet outside the SA's selectors (RFC 4301 5.1/5.2): addresses, protocol, ports
	DropNoNeighbor                                  // next-hop MAC not known yet (resolution requested)
	DropTxFull                                      // the other side's TX ring was full
	DropNoFrame                                     // no free UMEM frame for a slow-path packet or a fragment
	DropOversized                                   // larger than the outgoing link's MTU and not fragmentable
	DropSeqUnreserved                               // next sequence number not durably reserved yet
	DropLifetime                                    // the SA reached its hard packet or byte lifetime (RFC 4301 4.4.2.1)
	DropXlate                                       // core-address translation impossible: IPv6 extension headers hide the UDP/TCP checksum
	DropTTL                                         // inner TTL/hop limit would reach 0 here (ICMP Time Exceeded sent, rate permitting)
	DropECN                                         // outer CE over an inner Not-ECT packet (RFC 6040 4.2)
	DropTooBig                                      // DF-set IPv4 or IPv6 too big for the public MTU once sealed (ICMP sent, rate permitting)
	DropFragment                                    // an IP fragment from the core for a transport-mode SA, which seals whole segments only
	NumDrops
)

var dropNames = [NumDrops - Drop(esp.NumReasons)]string{
	DropBadMeta - Drop(esp.NumReasons):       "bad_meta",
	DropWrongDir - Drop(esp.NumReasons):      "wrong_direction",
	DropPolicy - Drop(esp.NumReasons):        "selector",
	DropNoNeighbor - Drop(esp.NumReasons):    "no_neighbor",
	DropTxFull - Drop(esp.NumReasons):        "tx_full",
	DropNoFrame - Drop(esp.NumReasons):       "no_frame",
	DropOversized - Drop(esp.NumReasons):     "oversized",
	DropSeqUnreserved - Drop(esp.NumReasons): "seq_unreserved",
	DropLifetime - Drop(esp.NumReasons):      "lifetime_expired",
	DropXlate - Drop(esp.NumReasons):         "xlate",
	DropTTL - Drop(esp.NumReasons):           "ttl_exceeded",
	DropECN - Drop(esp.NumReasons):           "ecn_ce_not_ect",
	DropTooBig - Drop(esp.NumReasons):        "too_big",
	DropFragment - Drop(esp.NumReasons):      "transport_fragment",
}

// String is the stable metric label of the reason.
func (d Drop) String() string {
	if d < Drop(esp.NumReasons) {
		return esp.Reason(d).String()
	}
	if d < NumDrops {
		return dropNames[d-Drop(esp.NumReasons)]
	}
	return "unknown"
}

// BatchBuckets is the number of batch-size histogram buckets: bucket i
// counts batches of size in [2^(i-1)+1, 2^i] (bucket 0: size 1).
const BatchBuckets = 10

// DirStats are one direction's figures. Dummy packets (Next Header 59) are
// drops with reason "dummy": RFC 4303 says discard them, and counting
// them apart lets an operator see TFC traffic.
type DirStats struct {
	Packets atomic.Uint64 // forwarded
	Bytes   atomic.Uint64 // bytes forwarded (frames as transmitted)
	Drops   [NumDrops]atomic.Uint64
	Batches [BatchBuckets]atomic.Uint64
}

// Stats are one worker's figures, written by the worker only.
type Stats struct {
	Decap, Encap   DirStats
	BindingChanges atomic.Uint64
	// BindingEventsLost counts binding changes the manager's queue had no
	// room for; the manager's periodic scan still finds them.
	BindingEventsLost atomic.Uint64
	Polls             atomic.Uint64 // times the worker slept in poll(2)
	// Drained counts SA removals that waited for the frames already
	// steered to their slot (Command.Drain).
	Drained atomic.Uint64
	// ICMP counts the ICMP errors sent, by kind (ICMPKindName);
	// ICMPLimited those the rate limit suppressed, ICMPUnsent those
	// that could not be built (no private address of the family, no
	// outbound SA toward the phone).
	ICMP        [NumICMPKinds]atomic.Uint64
	ICMPLimited atomic.Uint64
	ICMPUnsent  atomic.Uint64
	// PreFragmented counts IPv4 packets from the core, DF clear, split
	// before sealing because sealed they would exceed the public MTU
	// (RFC 4459 3.2); PreFragments the fragments made of them.
	PreFragmented, PreFragments atomic.Uint64
	// CipherBuilds counts SA ciphers built on a first packet (after
	// install or an idle release), CipherReleases those released after
	// Config.CipherIdle without a packet (idle.go); their difference is
	// the ciphers alive.
	CipherBuilds, CipherReleases atomic.Uint64
}

// NumICMPKinds is the number of ICMP error kinds the worker counts.
const NumICMPKinds = int(numICMPKinds)

// ICMPKindName is the metric label of Stats.ICMP[i].
func ICMPKindName(i int) string { return icmpKind(i).String() }

func batchBucket(n int) int {
	if n <= 1 {
		return 0
	}
	b := bits.Len(uint(n - 1))
	if b >= BatchBuckets {
		b = BatchBuckets - 1
	}
	return b
}

// BatchBucketUpper is the largest batch size bucket i counts.
func BatchBucketUpper(i int) int { return 1 << i }
