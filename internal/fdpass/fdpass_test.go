package fdpass

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func pair(t *testing.T) (a, b *net.UnixConn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	b, err = ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// A message far larger than a socket buffer arrives whole, and the
// passed descriptors are the same open files: what is written through
// one is read through the other.
func TestSendRecvDescriptors(t *testing.T) {
	a, b := pair(t)
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	msg := bytes.Repeat([]byte("handover "), 300000)
	errc := make(chan error, 1)
	go func() { errc <- Send(a, msg, []int{int(f.Fd()), int(w.Fd())}) }()
	got, fds, err := Recv(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) || len(fds) != 2 {
		t.Fatalf("got %d bytes and %d fds, want %d bytes and 2 fds", len(got), len(fds), len(msg))
	}
	for _, fd := range fds {
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
			t.Fatalf("fd %d: flags %#x, %v: want close-on-exec", fd, fl, err)
		}
	}
	if _, err := unix.Write(fds[1], []byte("through the passed end")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, _ := r.Read(buf)
	if string(buf[:n]) != "through the passed end" {
		t.Fatalf("pipe read %q", buf[:n])
	}
	unix.Close(fds[0])
	unix.Close(fds[1])
	if pid, err := CheckPeer(b); err != nil || pid != os.Getpid() {
		t.Fatalf("peer pid %d, %v: want %d", pid, err, os.Getpid())
	}
}

// A peer that hangs up mid-message is an error, not a short message.
func TestRecvTruncated(t *testing.T) {
	a, b := pair(t)
	var hdr [8]byte
	hdr[0] = 100
	a.Write(hdr[:])
	a.Write([]byte("short"))
	a.Close()
	if _, _, err := Recv(b); err == nil {
		t.Fatal("a truncated message was accepted")
	}
}

// More descriptors than one SCM_RIGHTS message carries (a hand-over of
// 8 workers on 16 RX queues a side passes 259) arrive in order, each the
// open file that was sent, with the message intact.
func TestSendRecvManyDescriptors(t *testing.T) {
	const n = 2*MaxFDs + 17
	a, b := pair(t)
	var sent []int
	dir := t.TempDir()
	for i := range n {
		f, err := os.Create(filepath.Join(dir, fmt.Sprint(i)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		sent = append(sent, int(f.Fd()))
	}
	msg := []byte("the hand-over")
	errc := make(chan error, 1)
	go func() { errc <- Send(a, msg, sent) }()
	got, fds, err := Recv(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	if string(got) != string(msg) || len(fds) != n {
		t.Fatalf("got %q and %d fds, want %q and %d", got, len(fds), msg, n)
	}
	for i, fd := range fds {
		var want, have unix.Stat_t
		if err := unix.Fstat(sent[i], &want); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fstat(fd, &have); err != nil {
			t.Fatal(err)
		}
		if want.Ino != have.Ino || want.Dev != have.Dev {
			t.Fatalf("descriptor %d is inode %d, want %d (order lost)", i, have.Ino, want.Ino)
		}
	}
	// The next message on the connection still frames correctly.
	go func() { errc <- Send(a, []byte("next"), nil) }()
	if got, fds, err := Recv(b); err != nil || string(got) != "next" || len(fds) != 0 {
		t.Fatalf("next message: %q, %d fds, %v", got, len(fds), err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if err := Send(a, nil, make([]int, MaxTotalFDs+1)); err == nil {
		t.Fatalf("sending %d descriptors: no error", MaxTotalFDs+1)
	}
}
