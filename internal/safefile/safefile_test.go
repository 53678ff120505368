package safefile

import (
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
	case <-time.After(2 * time.Second):
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
