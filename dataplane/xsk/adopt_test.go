package xsk_test

import (
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/dataplane/xsk"
)

// A hand-over in miniature: a socket serves, then stops at a batch
// boundary while datagrams keep arriving (they wait on its RX ring); the
// UMEM is exported, the exporter's descriptors are duplicated as
// SCM_RIGHTS would, the exporter abandons its side, and Adopt maps the
// same bound socket and memory again. The XSK map is never touched: every
// datagram sent before, during and after arrives exactly once, byte for
// byte, and the books balance in the adopting UMEM.
func TestExportAdoptKeepsSocketBound(t *testing.T) {
	const batch = 40
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	st := steer(t, 1)
	s := open(t, u, tp.a)
	p := u.NewPool()
	if err := st.Set(0, 0, s.FD()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Refill(p, 0); err != nil {
		t.Fatal(err)
	}
	attach(t, tp.a, st.Prog)
	c := udpFrom(t, tp.peer1, 5556)
	dst := &net.UDPAddr{IP: tp.a.ip, Port: testPort}
	send := func(from, n int) {
		for i := from; i < from+n; i++ {
			if _, err := c.WriteToUDP([]byte(fmt.Sprintf("\x00datagram %d", i)), dst); err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(u *xsk.UMEM, got []xsk.Desc, from int) {
		t.Helper()
		for i, d := range got {
			want := []byte(fmt.Sprintf("\x00datagram %d", from+i))
			if pl := u.Packet(d); len(pl) < 42 || !bytes.Equal(pl[42:], want) {
				t.Fatalf("datagram %d: got %q, want %q", from+i, pl, want)
			}
		}
	}
	send(0, batch)
	got, err := receive(s, p, batch, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	check(u, got, 0)
	p.PutDescs(got)
	p.Close() // the worker stopped

	send(batch, batch) // nobody serves: they wait on the RX ring
	h, fds, err := u.Export([]*xsk.Socket{s})
	if err != nil {
		t.Fatal(err)
	}
	dups := make([]int, len(fds))
	for i, fd := range fds {
		if dups[i], err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err != nil {
			t.Fatal(err)
		}
	}
	u.Abandon()
	if err := u.Close(); err != nil {
		t.Fatalf("close after abandon: %v", err)
	}
	u2, socks, err := xsk.Adopt(h, dups[0], dups[1:])
	if err != nil {
		t.Fatal(err)
	}
	defer u2.Close()
	if len(socks) != 1 || socks[0].Mode() != s.Mode() {
		t.Fatalf("adopted %d sockets (mode %v), want 1 in %v", len(socks), socks[0].Mode(), s.Mode())
	}
	p2 := u2.NewPool()
	got, err = receive(socks[0], p2, batch, 3*time.Second)
	if err != nil {
		t.Fatalf("datagrams queued during the hand-over: %v", err)
	}
	check(u2, got, batch)
	p2.PutDescs(got)
	send(2*batch, batch)
	got, err = receive(socks[0], p2, batch, 3*time.Second)
	if err != nil {
		t.Fatalf("datagrams after the hand-over: %v", err)
	}
	check(u2, got, 2*batch)
	p2.PutDescs(got)
	if n := socks[0].Receive(make([]xsk.Desc, 8)); n != 0 {
		t.Fatalf("%d datagrams more than sent", n)
	}
	a := settle(t, u2, socks[0], p2)
	if a.Lost != 0 || a.Worker != 0 {
		t.Fatalf("after the hand-over: %+v", a)
	}
}

// A successor that served the rings and then gave up: the exporter takes
// the rings back (Reclaim) as the successor left them (received,
// refilled) and closes them normally within its drain bounds.
func TestReclaimAfterFailedSuccessor(t *testing.T) {
	const n = 30
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	st := steer(t, 1)
	s := open(t, u, tp.a)
	p := u.NewPool()
	if err := st.Set(0, 0, s.FD()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Refill(p, 64); err != nil {
		t.Fatal(err)
	}
	attach(t, tp.a, st.Prog)
	p.Close()
	h, fds, err := u.Export([]*xsk.Socket{s})
	if err != nil {
		t.Fatal(err)
	}
	dups := make([]int, len(fds))
	for i, fd := range fds {
		if dups[i], err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err != nil {
			t.Fatal(err)
		}
	}
	u2, socks, err := xsk.Adopt(h, dups[0], dups[1:])
	if err != nil {
		t.Fatal(err)
	}
	p2 := u2.NewPool()
	c := udpFrom(t, tp.peer1, 5556)
	for i := 0; i < n; i++ {
		if _, err := c.WriteToUDP([]byte(fmt.Sprintf("\x00datagram %d", i)), &net.UDPAddr{IP: tp.a.ip, Port: testPort}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := receive(socks[0], p2, n, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	p2.PutDescs(got)
	if _, err := socks[0].Refill(p2, 0); err != nil {
		t.Fatal(err)
	}
	p2.Close()
	u2.Abandon() // the successor gives up

	u.Reclaim()
	done := make(chan error, 1)
	go func() { done <- u.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("close after reclaim did not return")
	}
}
