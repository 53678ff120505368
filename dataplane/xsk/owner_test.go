package xsk_test

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"

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

// A hand-over keeps each queue's ring owner whatever order the exporter
// lists the sockets in: the owner's worker pool is where the frames on
// the fill ring came from. A hand-over naming two owners on one queue is
// refused, and one from an exporter that marks none (older xesp) gives
// the rings to the first socket listed, as that exporter meant.
func TestAdoptKeepsRingOwner(t *testing.T) {
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	s0, s1 := open(t, u, tp.a), open(t, u, tp.a)
	h, fds, err := u.Export([]*xsk.Socket{s1, s0}) // the owner second
	if err != nil {
		t.Fatal(err)
	}
	if h.Sockets[0].Owner || !h.Sockets[1].Owner {
		t.Fatalf("exported owners %v, %v; want the second socket only", h.Sockets[0].Owner, h.Sockets[1].Owner)
	}
	dup := func() []int {
		t.Helper()
		out := make([]int, len(fds))
		for i, fd := range fds {
			if out[i], err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err != nil {
				t.Fatal(err)
			}
		}
		return out
	}

	bad := h
	bad.Sockets = append([]xsk.SocketState(nil), h.Sockets...)
	bad.Sockets[0].Owner = true
	d := dup()
	if _, _, err := xsk.Adopt(bad, d[0], d[1:]); err == nil || !strings.Contains(err.Error(), "2 ring owners") {
		t.Fatalf("adopt with two owners on one queue: %v", err)
	}

	legacy := h
	legacy.Sockets = append([]xsk.SocketState(nil), h.Sockets...)
	legacy.Sockets[1].Owner = false
	d = dup()
	u2, socks, err := xsk.Adopt(legacy, d[0], d[1:])
	if err != nil {
		t.Fatal(err)
	}
	if !socks[0].OwnsRings() || socks[1].OwnsRings() {
		t.Fatalf("unmarked hand-over: owners %v, %v; want the first listed", socks[0].OwnsRings(), socks[1].OwnsRings())
	}
	u2.Abandon()

	d = dup()
	u3, socks, err := xsk.Adopt(h, d[0], d[1:])
	if err != nil {
		t.Fatal(err)
	}
	defer u3.Abandon()
	if socks[0].OwnsRings() || !socks[1].OwnsRings() {
		t.Fatalf("adopted owners %v, %v; want the exporter's owner, listed second", socks[0].OwnsRings(), socks[1].OwnsRings())
	}
}
