// Package instlock keeps one xesp daemon per instance: it takes the
// exclusive flock(2) locks that a daemon holds on its state directory and
// on its bpffs pin directory for as long as it runs, and names the holder
// when a second process asks.
//
// What it owns: the lock files themselves (state_dir/daemon.lock with the
// holder's PID in it; the pin directory's own inode on bpffs, where no
// regular file can live). It must not touch anything the locks protect
// (maps, links, sockets): callers take a lock BEFORE they touch those.
//
// flock rather than fcntl locks: an flock belongs to the open file, so it
// dies with its holder however it dies (SIGKILL included), a second lock
// in the same process conflicts too, and the fd can be handed to an
// upgraded process over SCM_RIGHTS with the lock still held.
package instlock

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// FileName is the lock file in the state directory.
const FileName = "daemon.lock"

// ErrHeld: another process holds the lock (errors.As a *HeldError for
// who).
var ErrHeld = errors.New("held by a running xesp daemon")

// HeldError says which lock another process holds and, when known, its
// PID.
type HeldError struct {
	What string // "state_dir" or "pin_dir"
	Path string
	PID  int // 0 when it could not be found out
}

func (e *HeldError) Error() string {
	who := "another process"
	if e.PID > 0 {
		who = fmt.Sprintf("xesp pid %d", e.PID)
	}
	return fmt.Sprintf("%s %s is in use by %s: an xesp daemon is already running on it and was left untouched (stop it first)", e.What, e.Path, who)
}

func (e *HeldError) Unwrap() error { return ErrHeld }

// Lock is one held lock.
type Lock struct {
	f    *os.File
	what string
	path string
}

// StateDir locks dir/daemon.lock (creating dir 0700 if missing) and
// writes the caller's PID into it.
func StateDir(dir string) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state_dir %s: %w", dir, err)
	}
	path := filepath.Join(dir, FileName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state_dir: open lock file: %w", err)
	}
	l := &Lock{f: f, what: "state_dir", path: dir}
	if err := l.flock(); err != nil {
		return nil, err
	}
	if err := l.WritePID(os.Getpid()); err != nil {
		l.Release()
		return nil, err
	}
	return l, nil
}

// Dir locks the directory dir itself (it must exist): the pin directory
// on bpffs, which holds only pins.
func Dir(what, dir string) (*Lock, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: open %s to lock it: %w", what, dir, err)
	}
	l := &Lock{f: f, what: what, path: dir}
	if err := l.flock(); err != nil {
		return nil, err
	}
	return l, nil
}

// Adopt wraps an fd received from the process that took the lock (a
// hand-over): the lock is already held through it.
func Adopt(f *os.File, what, path string) *Lock { return &Lock{f: f, what: what, path: path} }

func (l *Lock) flock() error {
	err := unix.Flock(int(l.f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == nil {
		return nil
	}
	pid := l.holder()
	l.f.Close()
	if errors.Is(err, unix.EWOULDBLOCK) {
		return &HeldError{What: l.what, Path: l.path, PID: pid}
	}
	return fmt.Errorf("%s: lock %s: %w", l.what, l.path, err)
}

// holder finds who holds the lock: the PID written in a lock file (kept
// current across hand-overs), else the kernel's record in /proc/locks.
func (l *Lock) holder() int {
	if fi, err := l.f.Stat(); err == nil && fi.Mode().IsRegular() {
		b := make([]byte, 32)
		if n, _ := l.f.ReadAt(b, 0); n > 0 {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n]))); err == nil && pid > 0 {
				return pid
			}
		}
	}
	var st unix.Stat_t
	if unix.Fstat(int(l.f.Fd()), &st) != nil {
		return 0
	}
	return procLocksHolder(st.Ino, uint32(unix.Major(st.Dev)), uint32(unix.Minor(st.Dev)))
}

// procLocksHolder scans /proc/locks for an FLOCK on the inode, lines like
// "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF".
func procLocksHolder(ino uint64, major, minor uint32) int {
	f, err := os.Open("/proc/locks")
	if err != nil {
		return 0
	}
	defer f.Close()
	want := fmt.Sprintf("%02x:%02x:%d", major, minor, ino)
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		for i := 0; i+1 < len(fields); i++ {
			if fields[i+1] == want && i >= 1 && fields[1] == "FLOCK" {
				if pid, err := strconv.Atoi(fields[i]); err == nil {
					return pid
				}
			}
		}
	}
	return 0
}

// WritePID records pid as the holder (a hand-over's new process calls it).
func (l *Lock) WritePID(pid int) error {
	if fi, err := l.f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	if err := l.f.Truncate(0); err != nil {
		return fmt.Errorf("%s: write lock holder: %w", l.what, err)
	}
	if _, err := l.f.WriteAt([]byte(strconv.Itoa(pid)+"\n"), 0); err != nil {
		return fmt.Errorf("%s: write lock holder: %w", l.what, err)
	}
	return nil
}

// File is the locked file, for handing over to another process.
func (l *Lock) File() *os.File { return l.f }

// Release drops the lock (nil-safe).
func (l *Lock) Release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}
