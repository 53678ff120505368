package seqstore

import "math"

// StartSeq is the first sequence number an outbound SA may use after it is
// installed, given what High returned (0 when the key is unknown). The
// persisted mark itself is safe: it is the first number that was never
// allowed, so it was never sent. Sequence number 0 is never sent (RFC 4303
// 3.3.3), hence the floor of 1.
func StartSeq(persisted uint64) uint64 { return max(persisted, 1) }

// NextBlock is the whole reservation policy, kept here so the manager and
// its tests share one definition. next is the SA's next sequence number,
// high its durable mark (0 before the first reservation), block the block
// size (Store.Block). It reports whether to reserve again and the new
// mark:
//
//   - at install (high 0): next + block, so the SA may start at once after
//     one fsync;
//   - while more than half a block is left below high: nothing to do;
//   - once next passes high - block/2: one more block above max(high,
//     next). Reserving at the midpoint leaves half a block of sending time
//     (at 100 kpps and the default block, about 5 s) for the fsync, so a
//     slow disk delays extension, not traffic.
//
// The mark saturates at 2^64-1; it may run past 2^32 for a non-ESN SA,
// which is harmless because the SA itself refuses to send beyond its
// space. The data path must not send at or above the durable mark: if an
// extension is late or fails, the SA stalls rather than reuse a nonce.
func NextBlock(next, high, block uint64) (newHigh uint64, extend bool) {
	if high > next && high-next > block/2 {
		return high, false
	}
	base := max(high, next)
	if base > math.MaxUint64-block {
		newHigh = math.MaxUint64
	} else {
		newHigh = base + block
	}
	return newHigh, newHigh > high
}
