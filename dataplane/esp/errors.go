package esp

import "errors"

// Reason says why a packet was not accepted (or, for ReasonDummy, that it
// was a valid dummy packet to discard). It implements error: the packet
// path returns Reason values directly, which costs no allocation, and
// callers count them by index without formatting strings.
type Reason uint8

// Reasons. The String names are stable (metrics labels, logs, the decrypt
// tool's JSON) and follow VPP's ESP error taxonomy where one exists.
const (
	ReasonNone       Reason = iota // not an error
	ReasonRunt                     // shorter than the smallest valid packet for its SA/header
	ReasonTruncated                // length inconsistent with the headers or the cipher's block size
	ReasonNoSA                     // no SA for the SPI (or the SPI does not match the SA)
	ReasonIntegrity                // ICV/AEAD tag check failed
	ReasonReplay                   // duplicate inside the replay window (or sequence number 0)
	ReasonReplayOld                // left of the replay window
	ReasonPadding                  // padding bytes not 1, 2, 3, ... or Pad Length too large
	ReasonNextHeader               // Next Header not allowed for the SA's mode, or inner header mismatch
	ReasonDummy                    // Next Header 59: a dummy packet (RFC 4303 2.6), discard and count
	ReasonSeqCycled                // outbound sequence numbers exhausted: rekey
	ReasonNoRoom                   // the buffer lacks the head- or tailroom the operation needs
	ReasonBadVersion               // outer packet is neither IPv4 nor IPv6
	ReasonBadHeader                // malformed outer IP/UDP header (length, checksum, IHL)
	ReasonFragment                 // outer packet is an IP fragment; reassembly is not ours
	ReasonNotESP                   // outer packet carries neither ESP nor UDP-encapsulated ESP
	ReasonInvalid                  // caller error: bad argument (negative length, address family mismatch)
	NumReasons                     // number of reasons; sizes counter arrays
)

var reasonNames = [NumReasons]string{
	ReasonNone:       "none",
	ReasonRunt:       "runt",
	ReasonTruncated:  "truncated",
	ReasonNoSA:       "no_sa",
	ReasonIntegrity:  "integ_error",
	ReasonReplay:     "replay",
	ReasonReplayOld:  "replay_old",
	ReasonPadding:    "padding",
	ReasonNextHeader: "next_header",
	ReasonDummy:      "dummy",
	ReasonSeqCycled:  "seq_cycled",
	ReasonNoRoom:     "no_room",
	ReasonBadVersion: "bad_version",
	ReasonBadHeader:  "bad_header",
	ReasonFragment:   "fragment",
	ReasonNotESP:     "not_esp",
	ReasonInvalid:    "invalid",
}

var reasonMessages = [NumReasons]string{
	ReasonNone:       "esp: no error",
	ReasonRunt:       "esp: runt packet",
	ReasonTruncated:  "esp: truncated or misaligned packet",
	ReasonNoSA:       "esp: no SA for SPI",
	ReasonIntegrity:  "esp: integrity check failed",
	ReasonReplay:     "esp: replayed sequence number",
	ReasonReplayOld:  "esp: sequence number left of the replay window",
	ReasonPadding:    "esp: bad padding",
	ReasonNextHeader: "esp: bad next header",
	ReasonDummy:      "esp: dummy packet (next header 59)",
	ReasonSeqCycled:  "esp: sequence number space exhausted, rekey the SA",
	ReasonNoRoom:     "esp: not enough head- or tailroom in buffer",
	ReasonBadVersion: "esp: outer packet is not IPv4 or IPv6",
	ReasonBadHeader:  "esp: malformed outer header",
	ReasonFragment:   "esp: outer packet is a fragment",
	ReasonNotESP:     "esp: not an ESP packet",
	ReasonInvalid:    "esp: invalid argument",
}

// String returns the stable snake_case name (e.g. "integ_error").
func (r Reason) String() string {
	if r < NumReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// Error returns a human-readable message that ends with nothing variable, so
// it never allocates.
func (r Reason) Error() string {
	if r < NumReasons {
		return reasonMessages[r]
	}
	return "esp: unknown reason"
}

// Sentinel errors, one per reason, for errors.Is. They are the Reason values
// themselves, so errors.Is(err, ErrReplay) and ReasonOf(err) == ReasonReplay
// agree.
var (
	ErrRunt       error = ReasonRunt
	ErrTruncated  error = ReasonTruncated
	ErrNoSA       error = ReasonNoSA
	ErrIntegrity  error = ReasonIntegrity
	ErrReplay     error = ReasonReplay
	ErrReplayOld  error = ReasonReplayOld
	ErrPadding    error = ReasonPadding
	ErrNextHeader error = ReasonNextHeader
	ErrDummy      error = ReasonDummy
	ErrSeqCycled  error = ReasonSeqCycled
	ErrNoRoom     error = ReasonNoRoom
	ErrBadVersion error = ReasonBadVersion
	ErrBadHeader  error = ReasonBadHeader
	ErrFragment   error = ReasonFragment
	ErrNotESP     error = ReasonNotESP
	ErrInvalid    error = ReasonInvalid
)

// ReasonOf maps an error from this package to its Reason: ReasonNone for
// nil, NumReasons for an error that carries no Reason. The fast path (a bare
// Reason) is a type assertion and does not allocate.
func ReasonOf(err error) Reason {
	if err == nil {
		return ReasonNone
	}
	if r, ok := err.(Reason); ok {
		return r
	}
	var r Reason
	if errors.As(err, &r) {
		return r
	}
	return NumReasons
}

// Counters counts packet outcomes by Reason; index ReasonNone counts
// accepted packets. It is a plain array so a worker can keep one per SA or
// per batch and fold it into metrics without locks.
type Counters [NumReasons + 1]uint64

// Count adds one to err's reason (the last slot counts foreign errors).
func (c *Counters) Count(err error) { c[ReasonOf(err)]++ }
