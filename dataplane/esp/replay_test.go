package esp

import (
	"bytes"
	"math/rand/v2"
	"slices"
	"testing"
)

// accept runs the receive order on a bare window: check, then update.
func accept(w *ReplayWindow, seqLo uint32) (uint64, Reason) {
	seq, r := w.Check(seqLo)
	if r == ReasonNone {
		w.Update(seq)
	}
	return seq, r
}

func TestReplayWindow(t *testing.T) {
	for _, size := range []int{32, 100, 1000, 1024, 4096, MaxReplayWindow} {
		w, err := NewReplayWindow(size, false)
		if err != nil {
			t.Fatal(err)
		}
		W := uint32(size)
		step := func(seq uint32, want Reason) {
			t.Helper()
			if _, r := accept(w, seq); r != want {
				t.Fatalf("W=%d top=%d seq %d: %v, want %v", size, w.Top(), seq, r, want)
			}
		}
		step(0, ReasonReplay) // never sent
		for s := uint32(1); s <= 10; s++ {
			step(s, ReasonNone) // in order
		}
		step(10, ReasonReplay) // duplicate of top
		step(5, ReasonReplay)  // duplicate inside
		step(20, ReasonNone)   // gap
		for s := uint32(19); s > 10; s-- {
			step(s, ReasonNone) // out of order inside the window
		}
		step(15, ReasonReplay)
		// Right edge of the window: top-W+1 is inside, top-W is out.
		top := 20 + 3*W
		step(top, ReasonNone)
		step(top-W+1, ReasonNone)
		step(top-W+1, ReasonReplay)
		step(top-W, ReasonReplayOld)
		step(1, ReasonReplayOld)
		// Jump larger than the window (and than the ring): all clear.
		top2 := top + 10*W + 7
		step(top2, ReasonNone)
		for s := top2 - W + 1; s < top2; s++ {
			if _, r := w.Check(s); r != ReasonNone {
				t.Fatalf("W=%d: %d after a big jump: %v (stale bit)", size, s, r)
			}
		}
		// Fill the window completely, then slide one by one: every
		// position must be a duplicate until it falls off the left.
		for s := top2 - W + 1; s < top2; s++ {
			step(s, ReasonNone)
		}
		for k := uint32(1); k <= 130; k++ {
			step(top2+k, ReasonNone)
			step(top2+k-W, ReasonReplayOld)
			step(top2+k-W+1, ReasonReplay)
		}
		// Export/Import round trip keeps verdicts.
		st := w.Export()
		w2, _ := NewReplayWindow(size, false)
		if err := w2.Import(st); err != nil {
			t.Fatal(err)
		}
		for s := uint32(w.Top()) - W - 2; s <= uint32(w.Top())+2; s++ {
			_, r1 := w.Check(s)
			_, r2 := w2.Check(s)
			if r1 != r2 {
				t.Fatalf("W=%d: after import seq %d: %v vs %v", size, s, r2, r1)
			}
		}
		if err := w2.Import(ReplayState{Top: 5, Bitmap: make([]uint64, 1+size/64+1)}); err == nil {
			t.Fatalf("W=%d: import of a wrong-size bitmap accepted", size)
		}
	}
	if _, err := NewReplayWindow(31, false); err == nil {
		t.Fatal("window 31 accepted")
	}
}

// TestReplayRandom compares the ring bitmap with a map-based model under
// random traffic, including jumps past the window.
func TestReplayRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	for _, tc := range []struct {
		size int
		esn  bool
	}{{32, false}, {65, false}, {1024, false}, {4096, false}, {32, true}, {100, true}, {1024, true}, {4096, true}} {
		size := tc.size
		w, _ := NewReplayWindow(size, tc.esn)
		seen := map[uint64]bool{}
		var top uint64
		base := uint64(1000)
		old := size + size/2 // left-of-window traffic is judged on 32-bit SAs
		if tc.esn {
			// With ESN a number left of the window is taken as the next
			// block (Appendix A2) and only the ICV can reject it, so the
			// walk stays inside the window and crosses 2^32.
			base, old = 0xfffff000, size
		}
		if err := w.Import(ReplayState{Top: base, Bitmap: make([]uint64, (size+63)/64)}); err != nil {
			t.Fatal(err)
		}
		top = base
		for i := 0; i < 20000; i++ {
			var seq uint64
			switch k := rng.IntN(10); {
			case k < 6:
				seq = top + 1 + uint64(rng.IntN(3))
			case k < 9 && top > uint64(old):
				seq = top - uint64(rng.IntN(old))
			default:
				seq = top + uint64(rng.IntN(3*size))
			}
			if seq == 0 {
				continue
			}
			want := ReasonNone
			switch {
			case seq <= top && top-seq >= uint64(size):
				want = ReasonReplayOld
			case seen[seq]:
				want = ReasonReplay
			}
			got, r := accept(w, uint32(seq))
			if r != want {
				t.Fatalf("W=%d step %d: seq %#x top %#x: %v, want %v", size, i, seq, top, r, want)
			}
			if r == ReasonNone {
				if got != seq {
					t.Fatalf("W=%d: inferred %#x, sent %#x", size, got, seq)
				}
				seen[seq] = true
				top = max(top, seq)
			}
		}
		if tc.esn && top <= 1<<32 {
			t.Fatalf("W=%d: the walk did not cross 2^32 (top %#x)", size, top)
		}
	}
}

// TestESNInference covers RFC 4303 Appendix A2.2 cases A and B.
func TestESNInference(t *testing.T) {
	w, _ := NewReplayWindow(64, true)
	const hi = uint64(7) << 32
	if err := w.Import(ReplayState{Top: hi | 1000, Bitmap: make([]uint64, 1)}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		lo   uint32
		want uint64
		r    Reason
	}{
		{1001, hi | 1001, ReasonNone},       // case A, same block
		{940, hi | 940, ReasonNone},         // case A, inside the window
		{937, hi | 937, ReasonNone},         // case A, left edge of the window
		{936, hi + 1<<32 | 936, ReasonNone}, // case A, below the window: next block
		{5, hi + 1<<32 | 5, ReasonNone},
		{999, hi | 999, ReasonNone},
		{0xffffffff, hi | 0xffffffff, ReasonNone}, // ahead in the same block
	} {
		got, r := w.Check(c.lo)
		if got != c.want || r != c.r {
			t.Errorf("top %#x lo %#x: %#x %v, want %#x %v", w.Top(), c.lo, got, r, c.want, c.r)
		}
	}
	// Case B: top just past a block boundary.
	_ = w.Import(ReplayState{Top: hi | 10, Bitmap: make([]uint64, 1)})
	for _, c := range []struct {
		lo   uint32
		want uint64
		r    Reason
	}{
		{0xfffffff0, hi - 1<<32 | 0xfffffff0, ReasonNone}, // previous block, inside window
		{0xffffffcb, hi - 1<<32 | 0xffffffcb, ReasonNone}, // left edge (top-63), previous block
		{0xffffffca, hi | 0xffffffca, ReasonNone},         // below the window: ahead in this block
		{11, hi | 11, ReasonNone},
		{3, hi | 3, ReasonNone},
	} {
		got, r := w.Check(c.lo)
		if got != c.want || r != c.r {
			t.Errorf("top %#x lo %#x: %#x %v, want %#x %v", w.Top(), c.lo, got, r, c.want, c.r)
		}
	}
	// Case B at the very start: no previous block exists.
	w0, _ := NewReplayWindow(64, true)
	if _, r := w0.Check(0xfffffff0); r != ReasonReplayOld {
		t.Errorf("start of SA, lo near 2^32: %v", r)
	}
	// Disabled window with ESN still infers.
	wd, _ := NewReplayWindow(0, true)
	_ = wd.Import(ReplayState{Top: hi | 0xfffffff0})
	if got, r := wd.Check(3); r != ReasonNone || got != hi+1<<32|3 {
		t.Errorf("disabled window: %#x %v", got, r)
	}
}

// TestESNRollover sends across 2^32 through real SAs, reordering around the
// boundary, and checks the receiver's full sequence numbers.
func TestESNRollover(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	for _, p := range []Proposal{AES128GCM16, AES128SHA1, ChaCha20Poly1305, AES256GCM8, NullSHA256} {
		out, in := pair(t, p, ModeTransport, true, 32, rng)
		if err := out.SetNextSeq(1<<32 - 20); err != nil {
			t.Fatal(err)
		}
		var pkts [][]byte
		var seqs []uint64
		for i := 0; i < 40; i++ {
			seqs = append(seqs, out.NextSeq())
			payload := randBytes(rng, 50)
			buf := make([]byte, out.Headroom()+50+out.MaxTailroom())
			copy(buf[out.Headroom():], payload)
			s, e, err := out.Seal(buf, out.Headroom(), 50, 17, 0)
			if err != nil {
				t.Fatal(err)
			}
			pkts = append(pkts, buf[s:e])
		}
		// The receiver has seen up to 2^32-15 already.
		_ = in.Replay().Import(ReplayState{Top: seqs[4], Bitmap: make([]uint64, 1)})
		order := []int{25, 5, 6, 24, 19, 20, 7} // after the boundary first, then before it
		for i := 8; i < 40; i++ {
			if i != 19 && i != 20 && i != 24 && i != 25 {
				order = append(order, i)
			}
		}
		for _, i := range order {
			res, err := in.Open(bytes.Clone(pkts[i]))
			if err != nil || res.Seq != seqs[i] {
				t.Fatalf("%v: packet %d (seq %#x): %v seq %#x", p, i, seqs[i], err, res.Seq)
			}
		}
		// Left of a window that straddles 2^32, the inference takes the
		// number for one in the next block (Appendix A2.2 case B), so the
		// ICV, computed with the wrong high half, rejects it.
		if _, err := in.Open(bytes.Clone(pkts[3])); err != ErrIntegrity {
			t.Fatalf("%v: packet left of the window across the boundary: %v", p, err)
		}
		if _, err := in.Open(bytes.Clone(pkts[24])); err != ErrReplay {
			t.Fatalf("%v: duplicate across the boundary: %v", p, err)
		}
	}
}

func TestSeqExhaustion(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 26))
	for _, esn := range []bool{false, true} {
		out, in := pair(t, AES128GCM16, ModeTransport, esn, 1024, rng)
		last := uint64(1<<32 - 1)
		if esn {
			last = ^uint64(0)
		}
		if err := out.SetNextSeq(last - 1); err != nil {
			t.Fatal(err)
		}
		if err := out.SetNextSeq(last - 5); err == nil {
			t.Fatal("SetNextSeq moved backwards")
		}
		_ = in.Replay().Import(ReplayState{Top: last - 10, Bitmap: make([]uint64, 16)})
		buf := make([]byte, 100)
		for _, want := range []uint64{last - 1, last} {
			if out.NextSeq() != want {
				t.Fatalf("esn=%v: NextSeq %#x, want %#x", esn, out.NextSeq(), want)
			}
			s, e, err := out.Seal(buf, out.Headroom(), 10, 17, 0)
			if err != nil {
				t.Fatalf("esn=%v seq %#x: %v", esn, want, err)
			}
			res, err := in.Open(buf[s:e])
			if err != nil || res.Seq != want {
				t.Fatalf("esn=%v: open seq %#x: %v %#x", esn, want, err, res.Seq)
			}
		}
		if !out.Exhausted() {
			t.Fatalf("esn=%v: not exhausted after the last number", esn)
		}
		for i := 0; i < 3; i++ {
			if _, _, err := out.Seal(buf, out.Headroom(), 10, 17, 0); err != ErrSeqCycled {
				t.Fatalf("esn=%v: seal after the last number: %v", esn, err)
			}
		}
		if esn && out.NextSeq() != 0 || !esn && out.NextSeq() != 1<<32 {
			t.Fatalf("esn=%v: NextSeq when exhausted %#x", esn, out.NextSeq())
		}
	}
	out, _ := pair(t, AES128GCM16, ModeTransport, false, 0, rng)
	if err := out.SetNextSeq(1<<32 + 1); err == nil {
		t.Fatal("non-ESN SA accepted a 33-bit sequence number")
	}
	if err := out.SetNextSeq(0); err == nil {
		t.Fatal("SetNextSeq(0) accepted")
	}
}

// Export and Import work a word at a time; they must agree bit for bit
// with the definition (bit i of Bitmap: Top-i received, inside the window)
// for any window size, fill and position of Top, including Tops below the
// window size and ESN numbers past 2^32.
func TestReplayExportImportWordwise(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for _, size := range []int{32, 64, 65, 100, 127, 128, 1000, 1024, 4096} {
		for trial := 0; trial < 60; trial++ {
			esn := trial%3 == 0
			w, err := NewReplayWindow(size, esn)
			if err != nil {
				t.Fatal(err)
			}
			base := uint64(1)
			if esn {
				base = 1<<32 - uint64(rng.IntN(3*size))
			}
			top := base + uint64(rng.IntN(4*size))
			for range rng.IntN(3 * size) {
				if s := top - uint64(rng.IntN(2*size)); s >= 1 && s <= top {
					w.Update(s)
				}
			}
			if trial%2 == 0 {
				w.Update(top)
			}
			// The definition, bit by bit.
			want := ReplayState{Top: w.top, Bitmap: make([]uint64, (size+63)/64)}
			for i := uint64(0); i < uint64(w.size) && i < w.top; i++ {
				s := w.top - i
				if ringHas(w, s) {
					want.Bitmap[i/64] |= 1 << (i % 64)
				}
			}
			got := w.Export()
			if got.Top != want.Top || !slices.Equal(got.Bitmap, want.Bitmap) {
				t.Fatalf("W=%d top %d: Export %x, want %x", size, w.top, got.Bitmap, want.Bitmap)
			}
			w2, _ := NewReplayWindow(size, esn)
			if err := w2.Import(got); err != nil {
				t.Fatal(err)
			}
			lo := uint64(1)
			if w.top > uint64(size)+64 {
				lo = w.top - uint64(size) - 64
			}
			for s := lo; s <= w.top+2; s++ {
				in1, in2 := ringHas(w, s), ringHas(w2, s)
				if in1 != in2 {
					t.Fatalf("W=%d top %d: after Import seq %d received %v, want %v", size, w.top, s, in2, in1)
				}
			}
			if w2.Export().Top != got.Top || !slices.Equal(w2.Export().Bitmap, got.Bitmap) {
				t.Fatalf("W=%d: Export after Import differs", size)
			}
		}
	}
}

// ringHas reads the ring bit of s, inside the window.
func ringHas(w *ReplayWindow, s uint64) bool {
	return s <= w.top && w.top-s < uint64(w.size) && w.ring[w.at(w.top>>6-s>>6)]&(1<<(s&63)) != 0
}

// The ring (exact word count, indexed by distance from the top's word)
// against a model that remembers every number: random walks with small
// steps, reordering and jumps past the whole window, for sizes that do and
// do not fill their last word.
func TestReplayRingModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 5))
	for _, size := range []int{32, 63, 64, 65, 100, 1024, 1025, 4096} {
		w, err := NewReplayWindow(size, false)
		if err != nil {
			t.Fatal(err)
		}
		if w.ring != nil {
			t.Fatalf("W=%d: a ring of %d words before the first packet, want none (lazy)", size, len(w.ring))
		}
		seen := map[uint64]bool{}
		top := uint64(0)
		for i := 0; i < 20000; i++ {
			var s uint64
			switch r := rng.IntN(100); {
			case r < 60:
				s = top + 1 + uint64(rng.IntN(3))
			case r < 95:
				s = top - uint64(min(int(top), rng.IntN(size+70)))
			default:
				s = top + uint64(rng.IntN(5*size))
			}
			_, why := w.Check(uint32(s))
			want := ReasonNone
			switch {
			case s == 0 || seen[s] && top-s < uint64(size):
				want = ReasonReplay
			case s < top && top-s >= uint64(size):
				want = ReasonReplayOld
			}
			if why != want {
				t.Fatalf("W=%d top %d: Check(%d) = %v, want %v", size, top, s, why, want)
			}
			if why == ReasonNone {
				w.Update(s)
				seen[s] = true
				top = max(top, s)
			}
		}
		if len(w.ring) != ReplayWords(size) {
			t.Fatalf("W=%d: ring of %d words, want %d", size, len(w.ring), ReplayWords(size))
		}
	}
}

// A window keeps no ring until it records a packet, and answers as one
// that has: the first packet (any number but 0) passes, the empty window
// exports zeros, an empty state imports without a ring and a state with a
// top gets one. Once the ring exists, Check and Update stop allocating.
func TestReplayRingLazy(t *testing.T) {
	for _, esn := range []bool{false, true} {
		w, err := NewReplayWindow(DefaultReplayWindow, esn)
		if err != nil {
			t.Fatal(err)
		}
		if _, why := w.Check(0); why != ReasonReplay {
			t.Fatalf("esn %v: Check(0) = %v on an empty window", esn, why)
		}
		// (With ESN a number far above 0 reads as the previous 2^32
		// block's, Appendix A2.2: not a question of the ring.)
		for _, s := range []uint32{1, 1000} {
			if seq, why := w.Check(s); why != ReasonNone || seq != uint64(s) {
				t.Fatalf("esn %v: Check(%d) = %d, %v on an empty window", esn, s, seq, why)
			}
		}
		st := w.Export()
		if st.Top != 0 || len(st.Bitmap) != DefaultReplayWindow/64 || slices.ContainsFunc(st.Bitmap, func(v uint64) bool { return v != 0 }) {
			t.Fatalf("esn %v: empty window exports %+v", esn, st)
		}
		if err := w.Import(st); err != nil || w.ring != nil {
			t.Fatalf("esn %v: importing an empty state: %v, ring %d words", esn, err, len(w.ring))
		}
		w.Update(500)
		if len(w.ring) != ReplayWords(DefaultReplayWindow) {
			t.Fatalf("esn %v: ring of %d words after the first packet", esn, len(w.ring))
		}
		if _, why := w.Check(500); why != ReasonReplay {
			t.Fatalf("esn %v: 500 again: %v", esn, why)
		}
		if _, why := w.Check(499); why != ReasonNone {
			t.Fatalf("esn %v: 499 below the first packet: %v", esn, why)
		}
		seq := uint64(501)
		if a := testing.AllocsPerRun(100, func() {
			if _, why := w.Check(uint32(seq)); why == ReasonNone {
				w.Update(seq)
			}
			seq += 3
		}); a != 0 {
			t.Fatalf("esn %v: %v allocations per packet once the ring exists", esn, a)
		}
		st = w.Export()
		v, err := NewReplayWindow(DefaultReplayWindow, esn)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.Import(st); err != nil || len(v.ring) != ReplayWords(DefaultReplayWindow) {
			t.Fatalf("esn %v: import of a state with a top: %v, ring %d words", esn, err, len(v.ring))
		}
		if got := v.Export(); got.Top != st.Top || !slices.Equal(got.Bitmap, st.Bitmap) {
			t.Fatalf("esn %v: round trip %+v, want %+v", esn, got, st)
		}
	}
	// Without anti-replay there is never a ring.
	w, _ := NewReplayWindow(0, false)
	w.Update(7)
	if w.ring != nil {
		t.Fatal("a disabled window grew a ring")
	}
}

func BenchmarkReplayExport(b *testing.B) {
	w, _ := NewReplayWindow(DefaultReplayWindow, false)
	for s := uint64(1); s < 5000; s += 2 {
		w.Update(s)
	}
	b.ReportAllocs()
	for range b.N {
		_ = w.Export()
	}
}
