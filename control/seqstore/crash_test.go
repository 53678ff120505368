package seqstore

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	crashEnv    = "XESP_SEQSTORE_CRASH_DIR"
	crashKeys   = 64
	crashPrefix = "seqstore-durable "
	// Small enough that the child compacts every few rounds, so some kills
	// land inside a compaction (write, fsync, rename, directory fsync).
	crashCompactAfter = 128
)

// crashKey is the key of the j-th SA in the crash test. It goes through
// KeyFor so the test also proves the store's secret survives SIGKILL.
func crashKey(s *Store, j int) Key {
	enc := bytes.Repeat([]byte{byte(j)}, 20)
	peer := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(j)}), 4500)
	return s.KeyFor("out", uint32(0x1000+j), peer, "aes128gcm16", enc, nil)
}

// crashHigh is what the child reserves for key j in round r.
func crashHigh(r uint64, j int) uint64 { return r*1000 + uint64(j) + 1 }

// TestCrashChild is the process the crash test kills. It resumes from the
// store's state, then reserves round after round, printing each round only
// after Reserve returned, i.e. after the fdatasync.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashEnv)
	if dir == "" {
		t.Skip("run by TestCrashKill9")
	}
	s, err := Open(dir, Options{CompactAfter: crashCompactAfter})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(2)
	}
	var round uint64
	if h, ok := s.High(crashKey(s, 0)); ok {
		round = h / 1000
	}
	batch := make([]Reservation, crashKeys)
	for {
		round++
		for j := range batch {
			batch[j] = Reservation{crashKey(s, j), crashHigh(round, j)}
		}
		if err := s.Reserve(batch); err != nil {
			fmt.Fprintln(os.Stderr, "child reserve:", err)
			os.Exit(3)
		}
		fmt.Printf("%s%d\n", crashPrefix, round)
	}
}

// TestCrashKill9 kills a reserving process with SIGKILL at random moments
// and checks that every round it reported as durable is still there after
// a reopen. SIGKILL keeps the page cache, so this proves the log format,
// torn-tail handling, compaction's rename dance and the order "fsync, then
// acknowledge"; it cannot prove the disk honours fdatasync on power loss.
func TestCrashKill9(t *testing.T) {
	dir := t.TempDir()
	kills := 8
	if testing.Short() {
		kills = 3
	}
	var lastRound uint64
	for kill := range kills {
		reported := runAndKill(t, dir, kill == 0)
		if reported < lastRound {
			t.Fatalf("kill %d: child resumed at round %d, below the durable %d", kill, reported, lastRound)
		}
		lastRound = reported

		// Left behind when the kill landed inside a compaction; Open
		// must discard it.
		_, serr := os.Stat(filepath.Join(dir, compactName))
		midCompaction := serr == nil

		s, err := Open(dir, Options{CompactAfter: crashCompactAfter})
		if err != nil {
			t.Fatalf("kill %d: reopen after SIGKILL: %v", kill, err)
		}
		for j := range crashKeys {
			want := crashHigh(reported, j)
			if got, ok := s.High(crashKey(s, j)); !ok || got < want {
				s.Close()
				t.Fatalf("kill %d: key %d: High = %d, %v; the child was told %d was durable", kill, j, got, ok, want)
			}
		}
		st := s.Stats()
		t.Logf("kill %d: last durable round %d; killed mid-compaction: %v; reopened log: %d records, %d torn bytes cut, %d skipped",
			kill, reported, midCompaction, st.LogRecords, st.TornBytesAtOpen, st.SkippedAtOpen)
		s.Close()
	}
}

// runAndKill starts the child, lets it run for a random time after its
// first durable round, SIGKILLs it and returns the last round it reported.
// When checkLock is set it also opens the directory while the child holds
// it and checks that ErrLocked names the child's pid.
func runAndKill(t *testing.T, dir string, checkLock bool) (lastRound uint64) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnv+"="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})

	rounds := make(chan uint64, 1024)
	done := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line, ok := strings.CutPrefix(sc.Text(), crashPrefix)
			if !ok {
				continue
			}
			r, err := strconv.ParseUint(line, 10, 64)
			if err != nil {
				done <- fmt.Errorf("child printed %q: %w", sc.Text(), err)
				return
			}
			rounds <- r
		}
		done <- sc.Err()
	}()

	var last uint64
	select {
	case last = <-rounds:
	case err := <-done:
		t.Fatalf("child ended before its first round: %v; stderr: %s", err, stderr.Bytes())
	case <-time.After(60 * time.Second):
		t.Fatalf("no durable round from the child within 60 s; stderr: %s", stderr.Bytes())
	}

	if checkLock {
		_, err := Open(dir, Options{})
		if !errors.Is(err, ErrLocked) {
			t.Fatalf("Open while the child holds the store: %v, want ErrLocked", err)
		}
		want := fmt.Sprintf("pid %d", cmd.Process.Pid)
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("lock error %q does not name the child (%s)", err, want)
		}
	}

	deadline := time.After(time.Duration(5+rand.IntN(200)) * time.Millisecond)
wait:
	for {
		select {
		case last = <-rounds:
		case <-deadline:
			break wait
		case err := <-done:
			t.Fatalf("child ended on its own: %v; stderr: %s", err, stderr.Bytes())
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed = true
	// Everything the child printed before it died is in the pipe; drain
	// it, then reap the child (which releases nothing more: the kernel
	// dropped its flock when it died).
	for {
		select {
		case last = <-rounds:
			continue
		case err := <-done:
			if err != nil {
				t.Fatalf("reading the child: %v", err)
			}
		}
		break
	}
	for len(rounds) > 0 {
		last = <-rounds
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child did not die of SIGKILL: %v; stderr: %s", err, stderr.Bytes())
	}
	return last
}
