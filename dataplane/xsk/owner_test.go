package xsk_test

import (
	"testing"

	"github.com/xesp/xesp/dataplane/xsk"
)

// One socket per (device, queue) owns its fill and completion rings: the
// first opened. Refill and Complete on the others move nothing; closing
// the owner hands the rings, with the frames on them, to the next socket,
// and the books still balance.
func TestRingOwnerHandOver(t *testing.T) {
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	s0, s1 := open(t, u, tp.a), open(t, u, tp.a)
	if !s0.OwnsRings() || s1.OwnsRings() {
		t.Fatalf("owners: first %v, second %v", s0.OwnsRings(), s1.OwnsRings())
	}
	p := u.NewPool()
	if n, err := s1.Refill(p, 0); n != 0 || err != nil {
		t.Fatalf("refill on a socket not owning the rings: %d, %v", n, err)
	}
	if n, err := s0.Refill(p, 100); n != 100 || err != nil {
		t.Fatalf("owner refill: %d, %v", n, err)
	}
	if err := s0.Close(); err != nil {
		t.Fatal(err)
	}
	if !s1.OwnsRings() {
		t.Fatal("the rings were not handed to the remaining socket")
	}
	if a := u.Accounting(); a.Fill != 100 || a.Total() != 1024 {
		t.Fatalf("after the hand-over: %+v (total %d), want 100 on the fill ring of 1024", a, a.Total())
	}
	// The new owner goes on where the old one stopped: the other 156 fit.
	if n, err := s1.Refill(p, 0); n != 156 || err != nil {
		t.Fatalf("refill by the new owner: %d, %v; want 156", n, err)
	}
	if a := u.Accounting(); a.Fill != 256 || a.Total() != 1024 {
		t.Fatalf("after the new owner's refill: %+v", a)
	}
}
