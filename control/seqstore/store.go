package seqstore

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

const (
	lockName    = "lock"
	logName     = "seq.log"
	compactName = "seq.log.compact"

	// chunkRecords bounds the write buffer: a batch of a million SAs is
	// written in 2 MiB pieces and still fsync'd once.
	chunkRecords = 1 << 16
)

var (
	// ErrLocked: another process (or another Store in this one) holds the
	// state directory.
	ErrLocked = errors.New("state directory is in use")
	// ErrInsecureDir: the state directory is writable by everyone, so
	// anyone could replace the log and make SAs restart at 1.
	ErrInsecureDir = errors.New("state directory is world-writable")
	// ErrCorrupt: the log's header does not check out. The store is never
	// recreated over it: a new secret would restart every SA at 1.
	ErrCorrupt = errors.New("sequence log is corrupt")
	// ErrClosed: the Store was closed.
	ErrClosed = errors.New("store is closed")
)

// Options tune a Store. The zero value gives the defaults.
type Options struct {
	// Block is the reservation block size the caller's policy uses (see
	// NextBlock); the store only hands it back via Block. Default 1<<20:
	// at 100 kpps one SA needs an fsync'd extension about every 5 s, and a
	// restart skips at most 2^20 of the 2^32 numbers of a non-ESN SA.
	Block uint64
	// CompactAfter is the number of log records below which the log is
	// never rewritten automatically, however many are superseded. Default
	// 1<<16 (2 MiB of log).
	CompactAfter int
}

// Reservation asks that Key's high-water mark become High: the first
// sequence number the SA is NOT yet allowed to send.
type Reservation struct {
	Key  Key
	High uint64
}

// Stats describe the store for metrics and tests.
type Stats struct {
	Keys            int   // live keys
	LogRecords      int   // records in the log, superseded ones included
	LogBytes        int64 // size of the log, header included
	SkippedAtOpen   int   // records Open ignored: bad CRC or fields
	TornBytesAtOpen int64 // bytes of a partial last record Open cut off
	Compactions     int   // rewrites since Open
	CompactErr      error // last failed automatic compaction; nil after a success
}

// Store is the durable map from Key to high-water mark. One process owns a
// state directory at a time. Its methods are safe for concurrent use;
// writers (Reserve, Forget, Compact) run one at a time, and High does not
// wait for a writer's fsync.
type Store struct {
	dir  string
	opts Options
	hdr  header
	lock *os.File
	macs *sync.Pool // of *keyState, for KeyFor

	wmu         sync.Mutex // serialises everything that writes the log
	f           *os.File   // the log, its offset at the end
	size        int64      // bytes in the log, always header + whole records
	records     int
	buf         []byte
	err         error // sticky: the log's state on disk is unknown
	closed      bool
	nextCompact int
	stats       Stats

	mu    sync.RWMutex // guards highs; written only while wmu is held
	highs map[Key]uint64
}

// Open opens the store in dir, creating dir (0700) and a new store with a
// fresh secret if there is none. It takes dir's lock for the life of the
// Store and replays the log.
func Open(dir string, opts Options) (*Store, error) {
	if opts.Block == 0 {
		opts.Block = 1 << 20
	}
	if opts.CompactAfter <= 0 {
		opts.CompactAfter = 1 << 16
	}
	if err := makeDir(dir); err != nil {
		return nil, err
	}
	lock, err := takeLock(dir)
	if err != nil {
		return nil, err
	}
	s := &Store{dir: dir, opts: opts, lock: lock, highs: make(map[Key]uint64)}
	if err := s.load(); err != nil {
		lock.Close()
		return nil, err
	}
	s.nextCompact = opts.CompactAfter
	s.macs = newMACPool(s.hdr.secret[:])
	return s, nil
}

// makeDir creates dir 0700 if missing and refuses one anyone may write to.
// Directories it creates are fsync'd into their parents: a state directory
// whose own entry is lost in a crash would take every reservation with it.
func makeDir(dir string) error {
	var created []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("seqstore: stat %s: %w", d, err)
		}
		created = append(created, d)
		if filepath.Dir(d) == d {
			break
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("seqstore: create state directory %s: %w", dir, err)
	}
	for _, d := range created {
		if err := syncDir(filepath.Dir(d)); err != nil {
			return err
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("seqstore: stat state directory %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("seqstore: state directory %s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("seqstore: %s (mode %v): %w", dir, fi.Mode().Perm(), ErrInsecureDir)
	}
	return nil
}

// takeLock flocks dir/lock. flock rather than fcntl locks because an flock
// belongs to the open file, so a second Open in the same process conflicts
// too, and the kernel drops it when the holder dies however it dies.
func takeLock(dir string) (*os.File, error) {
	path := filepath.Join(dir, lockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("seqstore: open lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			var holder [32]byte
			n, _ := f.ReadAt(holder[:], 0)
			if n > 0 {
				return nil, fmt.Errorf("seqstore: %s: %w by pid %s", dir, ErrLocked, holder[:n])
			}
			return nil, fmt.Errorf("seqstore: %s: %w (holder unknown)", dir, ErrLocked)
		}
		return nil, fmt.Errorf("seqstore: lock %s: %w", path, err)
	}
	// The pid is only for the other daemon's error message; nothing
	// depends on it being durable.
	pid := fmt.Appendf(nil, "%d", os.Getpid())
	err = f.Truncate(0)
	if err == nil {
		_, err = f.WriteAt(pid, 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("seqstore: write pid to %s: %w", path, err)
	}
	return f, nil
}

// load opens or creates the log and replays it into highs.
func (s *Store) load() error {
	if err := os.Remove(filepath.Join(s.dir, compactName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("seqstore: remove stale compaction file: %w", err)
	}
	path := filepath.Join(s.dir, logName)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		if _, err := rand.Read(s.hdr.secret[:]); err != nil {
			return fmt.Errorf("seqstore: store secret: %w", err)
		}
		f, err = s.writeLog(nil)
		if err != nil {
			return fmt.Errorf("seqstore: create %s: %w", path, err)
		}
		s.f, s.size, s.records = f, headerSize, 0
		return nil
	}
	if err != nil {
		return fmt.Errorf("seqstore: open %s: %w", path, err)
	}
	if err := s.replay(f); err != nil {
		f.Close()
		return fmt.Errorf("seqstore: %s: %w", path, err)
	}
	s.f = f
	return nil
}

func (s *Store) replay(f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	var hb [headerSize]byte
	if _, err := io.ReadFull(f, hb[:]); err != nil {
		return fmt.Errorf("%w: read header: %v", ErrCorrupt, err)
	}
	if s.hdr, err = decodeHeader(hb[:]); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	whole := (fi.Size() - headerSize) / recordSize
	end := headerSize + whole*recordSize
	if torn := fi.Size() - end; torn != 0 {
		// Cut the torn record now: appending after it would misalign
		// every later record. Its reservation was never acknowledged.
		if err := f.Truncate(end); err != nil {
			return fmt.Errorf("cut torn record: %w", err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return fmt.Errorf("fdatasync after cutting torn record: %w", err)
		}
		s.stats.TornBytesAtOpen = torn
	}
	buf := make([]byte, chunkRecords*recordSize)
	for left := whole; left > 0; {
		n := min(left, chunkRecords)
		b := buf[:n*recordSize]
		if _, err := io.ReadFull(f, b); err != nil {
			return fmt.Errorf("read records: %w", err)
		}
		for ; len(b) > 0; b = b[recordSize:] {
			k, high, kind, ok := parseRecord(b)
			switch {
			case !ok:
				s.stats.SkippedAtOpen++
			case kind == kindForget:
				delete(s.highs, k)
			case high > s.highs[k]:
				s.highs[k] = high
			}
		}
		left -= n
	}
	s.size, s.records = end, int(whole)
	if _, err := f.Seek(end, io.SeekStart); err != nil {
		return fmt.Errorf("seek to end: %w", err)
	}
	return nil
}

// writeLog writes a complete log (header, then one record per entry of
// highs, which may be nil) to the compaction file, makes it durable and
// renames it over the log. It returns the new log open for appending. A
// crash anywhere leaves the old log or the new one, never neither.
func (s *Store) writeLog(highs map[Key]uint64) (*os.File, error) {
	tmp := filepath.Join(s.dir, compactName)
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*os.File, error) {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	hb := s.hdr.encode()
	buf := append(s.buf[:0], hb[:]...)
	for k, high := range highs {
		if len(buf)+recordSize > chunkRecords*recordSize {
			if _, err := f.Write(buf); err != nil {
				return fail(fmt.Errorf("write %s: %w", tmp, err))
			}
			buf = buf[:0]
		}
		buf = append(buf, make([]byte, recordSize)...)
		putRecord(buf[len(buf)-recordSize:], k, high, kindReserve)
	}
	if _, err := f.Write(buf); err != nil {
		return fail(fmt.Errorf("write %s: %w", tmp, err))
	}
	s.buf = buf[:0]
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("fsync %s: %w", tmp, err))
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, logName)); err != nil {
		return fail(fmt.Errorf("rename %s: %w", tmp, err))
	}
	if err := syncDir(s.dir); err != nil {
		// The rename may or may not survive a crash, so records appended
		// to the new file might vanish with it: nothing more may be
		// acknowledged.
		f.Close()
		return nil, errSticky{err}
	}
	return f, nil
}

// errSticky marks an error after which the log's state on disk is unknown.
type errSticky struct{ error }

func (e errSticky) Unwrap() error { return e.error }

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("seqstore: open directory %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("seqstore: fsync directory %s: %w", dir, err)
	}
	return nil
}

// Block is Options.Block: the reservation block size for NextBlock.
func (s *Store) Block() uint64 { return s.opts.Block }

// High returns the high-water mark last made durable for k: a restarted SA
// must not send a sequence number below it (StartSeq). ok is false for a
// key the store has never seen or has forgotten.
func (s *Store) High(k Key) (high uint64, ok bool) {
	s.mu.RLock()
	high, ok = s.highs[k]
	s.mu.RUnlock()
	return high, ok
}

// Len is the number of live keys.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.highs)
}

// Stats returns counters about the log.
func (s *Store) Stats() Stats {
	s.wmu.Lock()
	st := s.stats
	st.LogRecords, st.LogBytes = s.records, s.size
	s.wmu.Unlock()
	st.Keys = s.Len()
	return st
}

// Reserve makes every reservation in batch durable with one fdatasync and
// only then raises High. A reservation at or below the key's current mark
// changes nothing and writes nothing (max wins); High 0 is ignored.
//
// When Reserve returns an error none of the batch may be relied on, and
// High still shows what was durable before. After a failed fsync the store
// refuses every later write (the kernel may have dropped the dirty pages
// and cleared the error); the caller must stop extending and reopen.
func (s *Store) Reserve(batch []Reservation) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	start, startRecords := s.size, s.records
	buf := s.buf[:0]
	for _, r := range batch {
		// highs is only written under wmu, which we hold: no mu needed.
		if cur, ok := s.highs[r.Key]; r.High == 0 || ok && r.High <= cur {
			continue
		}
		if len(buf) == chunkRecords*recordSize {
			if err := s.appendRecords(buf, start, startRecords); err != nil {
				return err
			}
			buf = buf[:0]
		}
		buf = append(buf, make([]byte, recordSize)...)
		putRecord(buf[len(buf)-recordSize:], r.Key, r.High, kindReserve)
	}
	if err := s.appendRecords(buf, start, startRecords); err != nil {
		return err
	}
	s.buf = buf[:0]
	if s.records == startRecords {
		return nil
	}
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		s.err = fmt.Errorf("seqstore: fdatasync %s: %w", logName, err)
		return s.err
	}
	s.mu.Lock()
	for _, r := range batch {
		if cur, ok := s.highs[r.Key]; r.High != 0 && (!ok || r.High > cur) {
			s.highs[r.Key] = r.High
		}
	}
	s.mu.Unlock()
	s.maybeCompact()
	return nil
}

// Forget drops keys whose SAs were deleted, so the map and the log do not
// grow with SA churn. It is optional and only safe when the key material
// will never be used for sending again: a forgotten key that comes back
// (the same SA file installed again, a rekey that reuses KEYMAT) starts at
// 1 and repeats every nonce it sent before. A daemon that cannot promise
// that should not call it; the cost is 32 bytes of log per dead SA.
//
// Tombstones are written but not fsync'd: a crash may bring forgotten
// keys back, which errs on the safe side. The next Reserve's fsync makes
// them durable anyway.
func (s *Store) Forget(keys []Key) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	start, startRecords := s.size, s.records
	buf := s.buf[:0]
	for _, k := range keys {
		if _, ok := s.highs[k]; !ok {
			continue
		}
		if len(buf) == chunkRecords*recordSize {
			if err := s.appendRecords(buf, start, startRecords); err != nil {
				return err
			}
			buf = buf[:0]
		}
		buf = append(buf, make([]byte, recordSize)...)
		putRecord(buf[len(buf)-recordSize:], k, 0, kindForget)
	}
	if err := s.appendRecords(buf, start, startRecords); err != nil {
		return err
	}
	s.buf = buf[:0]
	s.mu.Lock()
	for _, k := range keys {
		delete(s.highs, k)
	}
	s.mu.Unlock()
	s.maybeCompact()
	return nil
}

// appendRecords writes buf at the end of the log. On failure it cuts the
// log back to start, so a half-written batch cannot misalign later records
// or be half-acknowledged; if even that fails the store stops writing.
func (s *Store) appendRecords(buf []byte, start int64, startRecords int) error {
	if len(buf) == 0 {
		return nil
	}
	if _, err := s.f.Write(buf); err != nil {
		werr := fmt.Errorf("seqstore: append to %s: %w", logName, err)
		if terr := s.f.Truncate(start); terr != nil {
			s.err = errors.Join(werr, fmt.Errorf("seqstore: cut back %s: %w", logName, terr))
			return s.err
		}
		if _, serr := s.f.Seek(start, io.SeekStart); serr != nil {
			s.err = errors.Join(werr, fmt.Errorf("seqstore: seek %s: %w", logName, serr))
			return s.err
		}
		s.size, s.records = start, startRecords
		return werr
	}
	s.size += int64(len(buf))
	s.records += len(buf) / recordSize
	return nil
}

func (s *Store) usable() error {
	if s.closed {
		return ErrClosed
	}
	return s.err
}

// maybeCompact rewrites the log once superseded records dominate it. A
// failure leaves the old log in use (still correct, just longer) and is
// retried after the log has doubled again.
func (s *Store) maybeCompact() {
	if s.records < s.nextCompact || s.records <= 4*len(s.highs) {
		return
	}
	if err := s.compact(); err != nil {
		s.stats.CompactErr = err
		s.nextCompact = 2 * s.records
		return
	}
	s.stats.CompactErr = nil
}

// Compact rewrites the log as one record per live key now, whatever its
// size. Automatic compaction makes calling it unnecessary.
func (s *Store) Compact() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	return s.compact()
}

func (s *Store) compact() error {
	// highs cannot change under us (we hold wmu); reading it needs no mu.
	f, err := s.writeLog(s.highs)
	if err != nil {
		var sticky errSticky
		if errors.As(err, &sticky) {
			s.err = sticky.error
			return s.err
		}
		return fmt.Errorf("seqstore: compact: %w", err)
	}
	old := s.f
	s.f = f
	s.records = len(s.highs)
	s.size = headerSize + int64(s.records)*recordSize
	s.nextCompact = max(s.opts.CompactAfter, 4*s.records)
	s.stats.Compactions++
	old.Close()
	return nil
}

// Close releases the log and the directory lock. Every reservation already
// returned by Reserve is on disk; Close adds nothing to that.
func (s *Store) Close() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var errs []error
	if s.f != nil {
		if err := s.f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("seqstore: close %s: %w", logName, err))
		}
	}
	if err := s.lock.Close(); err != nil {
		errs = append(errs, fmt.Errorf("seqstore: release lock: %w", err))
	}
	return errors.Join(errs...)
}
