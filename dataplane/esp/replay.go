package esp

import (
	"fmt"
	"math/bits"
)

// Replay window limits. Sizes need not be multiples of 64.
const (
	MinReplayWindow     = 32
	MaxReplayWindow     = 1 << 16
	DefaultReplayWindow = 1024
)

// inferWindowDisabled is the window the ESN high-order inference (RFC 4303
// Appendix A2.2) uses when anti-replay is off: a receiver must still know
// the high 32 bits for the ICV, and half the 32-bit space tolerates any
// realistic reordering without ambiguity.
const inferWindowDisabled = 1 << 31

// ReplayWindow is the inbound anti-replay state of one SA: the highest
// authenticated sequence number and a bitmap of those seen inside the
// window. The bitmap is a ring of 64-bit words (RFC 6479): advancing clears
// whole words instead of shifting, and the ring is one word larger than the
// window so a cleared word never holds an in-window bit.
//
// The ring has exactly ReplayWords(size) words (17 for the default 1024:
// 136 bytes, not the 256 a power-of-two ring needs), and a word is found
// by its distance from the top's word, pos being where that one is: a
// subtraction and a compare per lookup instead of a division.
//
// The words are allocated by the first Update (or an Import of a state
// with a top), unless the caller provided storage (InitTransform): until
// an SA has authenticated a packet its window is empty, nothing can be
// left of or inside it (Check only reads the ring for a number at or
// below the top, and the top is 0), so an idle SA of a million-SA gateway
// keeps no words at all. Laziness changes no answer: the ring is created
// empty exactly where an eager one would still be empty.
type ReplayWindow struct {
	ring []uint64
	top  uint64 // highest authenticated sequence number, 0 before the first
	size uint32 // W; 0 disables the check (high bits are still tracked)
	pos  uint16 // ring index of word top>>6 (< ReplayWords(MaxReplayWindow))
	esn  bool
}

// ReplayWords is how many 64-bit words a window of size bits keeps (0 when
// anti-replay is off): the storage InitTransform may be given for it.
func ReplayWords(size int) int {
	if size <= 0 {
		return 0
	}
	return (size+63)/64 + 1
}

// NewReplayWindow returns a window of size bits (0 disables anti-replay,
// otherwise MinReplayWindow..MaxReplayWindow). esn selects 64-bit sequence
// numbers with the Appendix A2 inference of the high half.
func NewReplayWindow(size int, esn bool) (*ReplayWindow, error) {
	w := &ReplayWindow{}
	if err := w.init(size, esn, nil); err != nil {
		return nil, err
	}
	return w, nil
}

// init sets up an empty window, its ring in buf when buf is long enough,
// else none until it is needed (grow).
func (w *ReplayWindow) init(size int, esn bool, buf []uint64) error {
	if size != 0 && (size < MinReplayWindow || size > MaxReplayWindow) {
		return fmt.Errorf("replay_window: %d out of range (0 disables, else %d..%d)", size, MinReplayWindow, MaxReplayWindow)
	}
	*w = ReplayWindow{size: uint32(size), esn: esn}
	if n := ReplayWords(size); n > 0 && len(buf) >= n {
		w.ring = buf[:n:n]
		clear(w.ring)
	}
	return nil
}

// grow gives an enabled window its (zeroed) ring if it has none yet: once
// per SA, on its first authenticated packet.
func (w *ReplayWindow) grow() {
	if w.ring == nil && w.size != 0 {
		w.ring = make([]uint64, ReplayWords(int(w.size)))
	}
}

// at is the ring index of the word d words below the top's (d <
// len(ring)).
func (w *ReplayWindow) at(d uint64) uint64 {
	n := uint64(len(w.ring))
	i := uint64(w.pos) + n - d
	if i >= n {
		i -= n
	}
	return i
}

// Size is the window size in packets; 0 when anti-replay is disabled.
func (w *ReplayWindow) Size() int { return int(w.size) }

// Top is the highest authenticated sequence number (0 before the first).
func (w *ReplayWindow) Top() uint64 { return w.top }

// Check is the pre-integrity test of RFC 4303 3.4.3: it infers the full
// sequence number from the 32 bits on the wire and rejects duplicates and
// numbers left of the window. It changes nothing; call Update once the
// packet authenticated.
func (w *ReplayWindow) Check(seqLo uint32) (uint64, Reason) {
	seq := uint64(seqLo)
	if w.esn {
		var r Reason
		if seq, r = w.infer(seqLo); r != ReasonNone {
			return seq, r
		}
	}
	if seq == 0 {
		// The first packet an SA sends is number 1 (RFC 4303 3.3.3).
		return 0, ReasonReplay
	}
	size := uint64(w.size)
	if size == 0 || seq > w.top {
		return seq, ReasonNone
	}
	if w.top-seq >= size {
		return seq, ReasonReplayOld
	}
	if w.ring[w.at(w.top>>6-seq>>6)]&(1<<(seq&63)) != 0 {
		return seq, ReasonReplay
	}
	return seq, ReasonNone
}

// infer implements RFC 4303 Appendix A2.2.
func (w *ReplayWindow) infer(seqLo uint32) (uint64, Reason) {
	win := uint32(inferWindowDisabled)
	if w.size > 0 {
		win = uint32(w.size)
	}
	tl, th := uint32(w.top), uint32(w.top>>32)
	var hi uint32
	if tl >= win-1 {
		// Case A: the window lies within one 2^32 block.
		if seqLo >= tl-win+1 {
			hi = th
		} else {
			hi = th + 1
		}
	} else {
		// Case B: the window straddles a 2^32 boundary.
		if seqLo >= tl-win+1 { // wraps: the upper part of the previous block
			if th == 0 {
				return uint64(seqLo), ReasonReplayOld
			}
			hi = th - 1
		} else {
			hi = th
		}
	}
	return uint64(hi)<<32 | uint64(seqLo), ReasonNone
}

// Update records an authenticated sequence number, sliding the window when
// it is the new highest.
func (w *ReplayWindow) Update(seq uint64) {
	if seq <= w.top {
		// The ring exists: top > 0 means an Update or Import made it
		// (seq 0 with top 0 is never sent, and records nothing).
		if w.size != 0 && w.top-seq < uint64(w.size) && w.ring != nil {
			w.ring[w.at(w.top>>6-seq>>6)] |= 1 << (seq & 63)
		}
		return
	}
	if w.size != 0 {
		w.grow()
		n := uint16(len(w.ring))
		if adv := seq>>6 - w.top>>6; adv >= uint64(n) {
			clear(w.ring)
			w.pos = 0
		} else {
			for ; adv > 0; adv-- {
				if w.pos++; w.pos == n {
					w.pos = 0
				}
				w.ring[w.pos] = 0
			}
		}
		w.ring[w.pos] |= 1 << (seq & 63)
	}
	w.top = seq
}

// ReplayState is a window's persistent form, independent of the ring layout:
// bit i of Bitmap (word i/64, bit i%64) says Top-i was received.
type ReplayState struct {
	Top    uint64   `json:"top" yaml:"top"`
	Bitmap []uint64 `json:"bitmap" yaml:"bitmap"`
}

// Export returns the state for persisting; it allocates (control plane).
func (w *ReplayWindow) Export() ReplayState {
	size := uint64(w.size)
	st := ReplayState{Top: w.top, Bitmap: make([]uint64, (size+63)/64)}
	// A word at a time, not a bit: the manager exports every changed
	// inbound window on the worker's own thread each snapshot interval, so with a
	// million SAs a 1024-iteration loop per SA stalled the data path for
	// seconds.
	lim := min(size, w.top) // bits i < lim may be set (Top-i >= 1, in the window)
	for j := uint64(0); 64*j < lim; j++ {
		st.Bitmap[j] = w.word(j, lim-64*j)
	}
	return st
}

// word returns bit k = "t-k was received" for k < min(n, 64), t = top-64j:
// the 64 ring bits ending at sequence number t, reversed. t's word is j
// words below the top's, the one before it j+1 (< len(ring): 64j < size).
func (w *ReplayWindow) word(j, n uint64) uint64 {
	sh := w.top & 63 // t & 63
	x := w.ring[w.at(j)] << (63 - sh)
	if sh < 63 {
		x |= w.ring[w.at(j+1)] >> (sh + 1)
	}
	v := bits.Reverse64(x)
	if n < 64 {
		v &= 1<<n - 1
	}
	return v
}

// Import restores a state written by Export for a window of the same size.
func (w *ReplayWindow) Import(st ReplayState) error {
	size := uint64(w.size)
	if want := int((size + 63) / 64); len(st.Bitmap) != want {
		return fmt.Errorf("replay state: bitmap has %d words, window of %d needs %d", len(st.Bitmap), w.size, want)
	}
	if !w.esn && st.Top > 0xffffffff {
		return fmt.Errorf("replay state: top %d exceeds 32 bits on a non-ESN SA", st.Top)
	}
	if st.Top != 0 {
		w.grow()
	}
	clear(w.ring)
	w.top, w.pos = st.Top, 0
	lim := min(size, w.top)
	sh := w.top & 63 // t & 63 for every t = top-64j
	for j := uint64(0); 64*j < lim; j++ {
		v := st.Bitmap[j]
		if n := lim - 64*j; n < 64 {
			v &= 1<<n - 1
		}
		// Word's inverse: bit k of v is t-k.
		x := bits.Reverse64(v)
		w.ring[w.at(j)] |= x >> (63 - sh)
		if sh < 63 {
			w.ring[w.at(j+1)] |= x << (sh + 1)
		}
	}
	return nil
}
