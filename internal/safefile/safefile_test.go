package safefile

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	ok := filepath.Join(dir, "key")
	os.WriteFile(ok, []byte("abc"), 0o600)
	if b, err := Read(ok, 3); err != nil || string(b) != "abc" {
		t.Fatalf("regular file: %q, %v", b, err)
	}
	if _, err := Read(ok, 2); err == nil || !strings.Contains(err.Error(), "larger than 2") {
		t.Fatalf("over the limit: %v", err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Read(fifo, 10); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("fifo: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("reading a FIFO blocked")
	}
	for _, p := range []string{"/dev/zero", dir} {
		if _, err := Read(p, 10); err == nil {
			t.Fatalf("%s accepted", p)
		}
	}
	if _, err := os.Stat("/proc/kcore"); err == nil {
		if _, err := Read("/proc/kcore", 1<<20); err == nil {
			t.Fatal("/proc/kcore accepted")
		}
	}
}

func TestReplace(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A stale temporary file with a looser mode must not leak its mode
	// into the state file (it may hold keys).
	if err := os.WriteFile(path+".tmp", []byte("stale and longer"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Replace(path, []byte("new")); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "new" {
		t.Errorf("contents %q, want %q", got, "new")
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if m := st.Mode().Perm(); m != 0o600 {
		t.Errorf("mode %o, want 600", m)
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}
	if err := Replace(filepath.Join(dir, "missing", "state"), nil); err == nil {
		t.Error("Replace into a missing directory succeeded")
	}
}

// errAfter is a context whose Err turns context.Canceled after n calls:
// a cancellation that lands in the middle of a write, deterministically.
type errAfter struct {
	context.Context
	n int
}

func (c *errAfter) Err() error {
	if c.n--; c.n < 0 {
		return context.Canceled
	}
	return nil
}

// A cancelled ReplaceContext leaves the old contents and no temporary
// file, whether it was cancelled before it began, between chunks, or
// after the last chunk (before the fsync); one that is not cancelled
// writes a multi-chunk file whole.
func TestReplaceContextCancelled(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := bytes.Repeat([]byte{7}, 3*replaceChunk+5) // four chunks
	for _, n := range []int{0, 2, 4} {
		err := ReplaceContext(&errAfter{Context: context.Background(), n: n}, path, b)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled after %d looks: %v, want context.Canceled", n, err)
		}
		if got, _ := os.ReadFile(path); string(got) != "old" {
			t.Fatalf("cancelled after %d looks: the file holds %d bytes, want the old contents", n, len(got))
		}
		if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
			t.Fatalf("cancelled after %d looks: temporary file left behind: %v", n, err)
		}
	}
	if err := ReplaceContext(&errAfter{Context: context.Background(), n: 5}, path, b); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, b) {
		t.Fatalf("the file holds %d bytes, want %d", len(got), len(b))
	}
}
