// Package safefile reads files an operator's configuration names (config,
// SA files, key files, token files) without letting a bad path hang or
// exhaust the daemon: only regular files, opened non-blocking so a FIFO
// cannot stall open(2), and never more than a stated size (a /proc file
// can claim terabytes). It also replaces the daemon's own state files
// (Replace) so that a crash leaves either the old or the new file whole.
package safefile

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
)

// Read returns the contents of the regular file at path, refusing
// anything else and anything larger than limit bytes.
func Read(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	// Sized from the stat, so a 600 MB SA file is read once into one
	// buffer, not copied through io.ReadAll's doublings; one byte more
	// tells a file that grew since from one that did not.
	b := make([]byte, 0, st.Size()+1)
	b, err = readAll(io.LimitReader(f, limit+1), b)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return b, nil
}

// readAll is io.ReadAll into b's spare capacity.
func readAll(r io.Reader, b []byte) ([]byte, error) {
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// Replace replaces the file at path with b, mode 0600, atomically and
// durably: written to path+".tmp", fsync'd, renamed over path, and the
// directory fsync'd, so after a crash path holds the old or the new
// contents, never a mix, and a returned nil means the new contents
// survive a power cut.
func Replace(path string, b []byte) error {
	return ReplaceContext(context.Background(), path, b)
}

// replaceChunk is how much ReplaceContext writes between looks at its
// context: a few milliseconds of page-cache copying.
const replaceChunk = 8 << 20

// ReplaceContext is Replace that gives up, leaving the old file and no
// temporary one, when ctx ends before the new contents are synced: a
// stopping daemon's periodic state write of hundreds of megabytes must
// not hold the stop up.
func ReplaceContext(ctx context.Context, path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	// A temporary file left by an older umask or by hand keeps its mode
	// through O_TRUNC: state files may hold keys, so make sure they are
	// not readable by others.
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("save %s: %w", path, err)
	}
	// The context is looked at before each chunk and once more before
	// the fsync, the part a cancelled write spares the most.
	for off := 0; ; off += replaceChunk {
		if err := ctx.Err(); err != nil {
			f.Close()
			os.Remove(tmp)
			return fmt.Errorf("save %s: %w", path, err)
		}
		if off >= len(b) {
			break
		}
		if _, err := f.Write(b[off:min(off+replaceChunk, len(b))]); err != nil {
			f.Close()
			return fmt.Errorf("save %s: %w", path, err)
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("save %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("save %s: fsync directory: %w", path, err)
	}
	return nil
}
