package api

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// maxSocketPath is the longest Unix socket path Linux takes (sun_path
// holds 108 bytes with the terminating NUL).
const maxSocketPath = 107

// unixSocket is the API's socket file and its listener.
type unixSocket struct {
	ln   *net.UnixListener
	path string
	// ino identifies our socket file, so shutdown never removes a file
	// another process put at the path in the meantime.
	ino uint64
}

// listenUnix binds the API socket at path with mode 0600 and no window in
// which it is reachable with wider permissions: it binds inside a fresh
// 0700 directory next to path, chmods, then renames into place. A socket
// file already at path is replaced only if nothing answers on it.
func listenUnix(path string) (*unixSocket, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("api: socket directory: %w", err)
	}
	if err := clearStale(path); err != nil {
		return nil, err
	}
	// The temporary name is longer than path: say so in terms of path,
	// which is what the operator configured (api.unix).
	if max := maxSocketPath - len(".xesp-api-0123456789/s"); len(path)-len(filepath.Base(path)) > max {
		return nil, fmt.Errorf("api: listen unix %s: the directory's path is too long for a Unix socket: keep it under %d bytes", path, max)
	}
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("api: listen unix %s: too long for a Unix socket: keep it under %d bytes", path, maxSocketPath)
	}
	tmp, err := os.MkdirTemp(dir, ".xesp-api-")
	if err != nil {
		return nil, fmt.Errorf("api: socket directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	tmpPath := filepath.Join(tmp, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmpPath, Net: "unix"})
	if err != nil {
		// The error names the temporary path, which means nothing to
		// the operator: keep only the cause.
		var oe *net.OpError
		if errors.As(err, &oe) {
			err = oe.Err
		}
		return nil, fmt.Errorf("api: listen unix %s: %w", path, err)
	}
	// The file is renamed away from the name the listener knows; we
	// remove it ourselves.
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (*unixSocket, error) {
		ln.Close()
		return nil, fmt.Errorf("api: listen unix %s: %w", path, err)
	}
	if err := os.Chmod(tmpPath, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmpPath, path); err != nil {
		return fail(err)
	}
	st, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	u := &unixSocket{ln: ln, path: path}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		u.ino = sys.Ino
	}
	return u, nil
}

// clearStale removes a socket file nobody serves on. A live socket means
// another daemon runs: refuse rather than steal its path. Anything but a
// socket is left alone: the path is probably a mistake.
func clearStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("api: socket %s: %w", path, err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("api: socket %s: exists and is not a socket; refusing to replace it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("api: socket %s: another process is serving on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("api: socket %s: cannot tell whether it is stale: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("api: remove stale socket %s: %w", path, err)
	}
	return nil
}

func (u *unixSocket) close() {
	u.ln.Close()
	if st, err := os.Lstat(u.path); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Ino == u.ino {
			os.Remove(u.path)
		}
	}
}
