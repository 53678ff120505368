package instlock

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// A second taker gets a HeldError naming the holder's PID, for the state
// directory (PID from the file) and a bare directory (PID from
// /proc/locks, the pin directory's case); releasing frees it.
func TestSecondTakerNamesHolder(t *testing.T) {
	dir := t.TempDir()
	l, err := StateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(dir + "/" + FileName); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("lock file holds %q, want our pid", b)
	}
	_, err = StateDir(dir)
	var he *HeldError
	if !errors.As(err, &he) || he.PID != os.Getpid() || he.What != "state_dir" || !errors.Is(err, ErrHeld) {
		t.Fatalf("second lock: %v, want HeldError naming pid %d", err, os.Getpid())
	}
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("message %q does not name the pid", err)
	}
	l.Release()
	l2, err := StateDir(dir)
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	l2.Release()

	pin := t.TempDir()
	// The holder is another process: flock(1) from util-linux holds the
	// directory while sleep runs.
	if _, err := exec.LookPath("flock"); err != nil {
		t.Skip("flock(1) not installed")
	}
	cmd := exec.Command("flock", "-x", pin, "sh", "-c", "echo locked; exec sleep 30")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	buf := make([]byte, 7)
	if _, err := out.Read(buf); err != nil {
		t.Fatal(err)
	}
	_, err = Dir("pin_dir", pin)
	if !errors.As(err, &he) || he.What != "pin_dir" || he.PID != cmd.Process.Pid {
		t.Fatalf("pin dir held by flock(1): %v, want HeldError naming pid %d", err, cmd.Process.Pid)
	}
}
