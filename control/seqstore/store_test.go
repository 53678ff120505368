package seqstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func open(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func reopen(t testing.TB, s *Store, opts Options) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return open(t, s.dir, opts)
}

func testKey(i int) Key {
	var k Key
	binary.BigEndian.PutUint64(k[8:], uint64(i))
	k[0] = 0xa5
	return k
}

func mustHigh(t testing.TB, s *Store, k Key, want uint64) {
	t.Helper()
	got, ok := s.High(k)
	if !ok || got != want {
		t.Fatalf("High(%v) = %d, %v; want %d, true", k, got, ok, want)
	}
}

func logPath(s *Store) string { return filepath.Join(s.dir, logName) }

func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

func TestRoundTripAcrossReopen(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	a, b, c := testKey(1), testKey(2), testKey(3)
	if _, ok := s.High(a); ok {
		t.Fatal("fresh store knows a key")
	}
	if err := s.Reserve([]Reservation{{a, 100}, {b, 1 << 40}}); err != nil {
		t.Fatal(err)
	}
	mustHigh(t, s, a, 100)
	// Lower and zero reservations change nothing and write nothing.
	if err := s.Reserve([]Reservation{{a, 50}, {b, 7}, {c, 0}}); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.LogRecords != 2 || st.Keys != 2 {
		t.Fatalf("after no-op reserve: %+v, want 2 records, 2 keys", st)
	}
	if err := s.Reserve([]Reservation{{a, 200}}); err != nil {
		t.Fatal(err)
	}

	s = reopen(t, s, Options{})
	mustHigh(t, s, a, 200)
	mustHigh(t, s, b, 1<<40)
	if _, ok := s.High(c); ok {
		t.Fatal("zero reservation created a key")
	}
	if st := s.Stats(); st.LogRecords != 3 || st.LogBytes != headerSize+3*recordSize || st.SkippedAtOpen != 0 {
		t.Fatalf("stats after reopen: %+v", st)
	}
	if got := fileSize(t, logPath(s)); got != headerSize+3*recordSize {
		t.Fatalf("log is %d bytes, want %d", got, headerSize+3*recordSize)
	}
}

// A batch may name a key twice with the higher mark first; both records
// reach the log and replay must still keep the max, not the last.
func TestMaxWinsOnReplay(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	k := testKey(9)
	if err := s.Reserve([]Reservation{{k, 500}, {k, 100}}); err != nil {
		t.Fatal(err)
	}
	mustHigh(t, s, k, 500)
	if st := s.Stats(); st.LogRecords != 2 {
		t.Fatalf("want both records in the log, got %d", st.LogRecords)
	}
	s = reopen(t, s, Options{})
	mustHigh(t, s, k, 500)
}

func TestMillionKeysOneBatch(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000,000 keys: skipped with -short")
	}
	const n = 1_000_000
	s := open(t, t.TempDir(), Options{})
	batch := make([]Reservation, n)
	for i := range batch {
		batch[i] = Reservation{testKey(i), uint64(i)<<8 + 1}
	}
	t0 := time.Now()
	if err := s.Reserve(batch); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	size := fileSize(t, logPath(s))
	if want := int64(headerSize + n*recordSize); size != want {
		t.Fatalf("log is %d bytes, want %d", size, want)
	}
	t.Logf("Reserve of %d keys in one call: %v (one fdatasync), log %d bytes", n, took, size)

	t0 = time.Now()
	s = reopen(t, s, Options{})
	t.Logf("Open replaying %d records: %v", n, time.Since(t0))
	if s.Len() != n {
		t.Fatalf("Len = %d after reopen, want %d", s.Len(), n)
	}
	for i := range batch {
		if got, ok := s.High(batch[i].Key); !ok || got != batch[i].High {
			t.Fatalf("key %d: High = %d, %v; want %d", i, got, ok, batch[i].High)
		}
	}
}

// A crash in the middle of a write leaves part of a record at the end. It
// must be ignored (the key's earlier record stands) and cut off, so that
// later appends stay aligned.
func TestTornTailIgnored(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	a, b := testKey(1), testKey(2)
	for _, h := range []uint64{100, 200} {
		if err := s.Reserve([]Reservation{{a, h}}); err != nil {
			t.Fatal(err)
		}
	}
	path := logPath(s)
	s.Close()
	full := fileSize(t, path)
	if err := os.Truncate(path, full-10); err != nil {
		t.Fatal(err)
	}

	s = open(t, s.dir, Options{})
	mustHigh(t, s, a, 100)
	if st := s.Stats(); st.TornBytesAtOpen != recordSize-10 || st.LogRecords != 1 {
		t.Fatalf("stats: %+v, want %d torn bytes and 1 record", st, recordSize-10)
	}
	if got := fileSize(t, path); got != headerSize+recordSize {
		t.Fatalf("torn record not cut: log is %d bytes", got)
	}
	if err := s.Reserve([]Reservation{{b, 5}, {a, 300}}); err != nil {
		t.Fatal(err)
	}

	s = reopen(t, s, Options{})
	mustHigh(t, s, a, 300)
	mustHigh(t, s, b, 5)
	if st := s.Stats(); st.TornBytesAtOpen != 0 || st.SkippedAtOpen != 0 || st.LogRecords != 3 {
		t.Fatalf("after append past the cut: %+v", st)
	}
}

func TestCorruptRecordIgnored(t *testing.T) {
	for _, tc := range []struct {
		name string
		off  int // byte of the second record to flip
	}{
		{"key", 3},
		{"high", 17},
		{"kind", 24},
		{"pad", 26},
		{"crc", 30},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t, t.TempDir(), Options{})
			a, b := testKey(1), testKey(2)
			for _, r := range []Reservation{{a, 100}, {a, 200}, {b, 300}} {
				if err := s.Reserve([]Reservation{r}); err != nil {
					t.Fatal(err)
				}
			}
			path := logPath(s)
			s.Close()
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			data[headerSize+recordSize+tc.off] ^= 0x40
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}

			s = open(t, s.dir, Options{})
			mustHigh(t, s, a, 100)
			mustHigh(t, s, b, 300)
			if st := s.Stats(); st.SkippedAtOpen != 1 || st.Keys != 2 {
				t.Fatalf("stats: %+v, want 1 skipped record, 2 keys", st)
			}
		})
	}
}

// A corrupt header must stop Open and must not be overwritten: a new
// secret would give every SA a new key and a restart at 1.
func TestCorruptHeaderRefused(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	if err := s.Reserve([]Reservation{{testKey(1), 10}}); err != nil {
		t.Fatal(err)
	}
	path := logPath(s)
	s.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	data[20] ^= 1 // inside the secret
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(s.dir, Options{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open with corrupt header: %v, want ErrCorrupt", err)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after, data) {
		t.Fatal("Open modified a log whose header it could not read")
	}

	// A log cut inside its header is just as unusable.
	if err := os.Truncate(path, headerSize-1); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(s.dir, Options{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open with short header: %v, want ErrCorrupt", err)
	}
}

func TestCompactionKeepsMaxAndShrinks(t *testing.T) {
	const keys, rounds = 100, 50
	s := open(t, t.TempDir(), Options{})
	for r := 1; r <= rounds; r++ {
		batch := make([]Reservation, keys)
		for i := range batch {
			batch[i] = Reservation{testKey(i), uint64(r*1000 + i)}
		}
		if err := s.Reserve(batch); err != nil {
			t.Fatal(err)
		}
	}
	// One stale record that must not win after compaction either.
	if err := s.Reserve([]Reservation{{testKey(0), 999_999}, {testKey(0), 60_000}}); err != nil {
		t.Fatal(err)
	}
	before := fileSize(t, logPath(s))
	if want := int64(headerSize + (keys*rounds+2)*recordSize); before != want {
		t.Fatalf("log before compaction: %d bytes, want %d", before, want)
	}
	if err := s.Compact(); err != nil {
		t.Fatal(err)
	}
	after := fileSize(t, logPath(s))
	if want := int64(headerSize + keys*recordSize); after != want {
		t.Fatalf("log after compaction: %d bytes, want %d", after, want)
	}
	t.Logf("compaction: %d -> %d bytes", before, after)
	// Appends after the compaction go to the new file.
	if err := s.Reserve([]Reservation{{testKey(1), 1 << 50}}); err != nil {
		t.Fatal(err)
	}

	s = reopen(t, s, Options{})
	mustHigh(t, s, testKey(0), 999_999)
	mustHigh(t, s, testKey(1), 1<<50)
	for i := 2; i < keys; i++ {
		mustHigh(t, s, testKey(i), uint64(rounds*1000+i))
	}
	if st := s.Stats(); st.LogRecords != keys+1 || st.SkippedAtOpen != 0 {
		t.Fatalf("after reopen: %+v", st)
	}
}

func TestAutoCompaction(t *testing.T) {
	const keys = 10
	opts := Options{CompactAfter: 64}
	s := open(t, t.TempDir(), opts)
	for r := 1; r <= 1000; r++ {
		batch := make([]Reservation, keys)
		for i := range batch {
			batch[i] = Reservation{testKey(i), uint64(r*keys + i)}
		}
		if err := s.Reserve(batch); err != nil {
			t.Fatal(err)
		}
	}
	st := s.Stats()
	if st.Compactions < 100 || st.CompactErr != nil {
		t.Fatalf("10,000 records over 10 keys with CompactAfter 64: %+v", st)
	}
	if st.LogRecords > 64+keys {
		t.Fatalf("log holds %d records, want at most %d", st.LogRecords, 64+keys)
	}
	if got := fileSize(t, logPath(s)); got != st.LogBytes {
		t.Fatalf("file is %d bytes, Stats says %d", got, st.LogBytes)
	}
	s = reopen(t, s, opts)
	for i := range keys {
		mustHigh(t, s, testKey(i), uint64(1000*keys+i))
	}
}

func TestForget(t *testing.T) {
	const keys = 100
	s := open(t, t.TempDir(), Options{})
	batch := make([]Reservation, keys)
	for i := range batch {
		batch[i] = Reservation{testKey(i), uint64(1000 + i)}
	}
	if err := s.Reserve(batch); err != nil {
		t.Fatal(err)
	}
	var gone []Key
	for i := 0; i < keys; i += 2 {
		gone = append(gone, testKey(i))
	}
	gone = append(gone, testKey(12345)) // unknown: no tombstone
	if err := s.Forget(gone); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Keys != keys/2 || st.LogRecords != keys+keys/2 {
		t.Fatalf("after Forget: %+v", st)
	}
	// A forgotten key reserved again starts fresh and must survive replay
	// after its own tombstone.
	if err := s.Reserve([]Reservation{{testKey(0), 7}}); err != nil {
		t.Fatal(err)
	}

	check := func(s *Store) {
		t.Helper()
		mustHigh(t, s, testKey(0), 7)
		for i := 1; i < keys; i++ {
			h, ok := s.High(testKey(i))
			switch {
			case i%2 == 0 && ok:
				t.Fatalf("forgotten key %d came back with %d", i, h)
			case i%2 == 1 && (!ok || h != uint64(1000+i)):
				t.Fatalf("key %d: %d, %v", i, h, ok)
			}
		}
	}
	s = reopen(t, s, Options{})
	check(s)
	if err := s.Compact(); err != nil {
		t.Fatal(err)
	}
	if got, want := fileSize(t, logPath(s)), int64(headerSize+(keys/2+1)*recordSize); got != want {
		t.Fatalf("compaction kept tombstoned keys: %d bytes, want %d", got, want)
	}
	s = reopen(t, s, Options{})
	check(s)
}

func TestSecondOpenFails(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{})
	_, err := Open(dir, Options{})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	if pid := fmt.Sprintf("pid %d", os.Getpid()); !strings.Contains(err.Error(), pid) {
		t.Fatalf("error %q does not name the holder (%s)", err, pid)
	}
	if err := s.Reserve([]Reservation{{testKey(1), 10}}); err != nil {
		t.Fatalf("holder broken by the failed Open: %v", err)
	}
	s.Close()
	s = open(t, dir, Options{})
	mustHigh(t, s, testKey(1), 10)
}

func TestDirectoryPermissions(t *testing.T) {
	base := t.TempDir()
	ww := filepath.Join(base, "ww")
	if err := os.Mkdir(ww, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(ww, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ww, Options{}); !errors.Is(err, ErrInsecureDir) {
		t.Fatalf("Open of a 0777 dir: %v, want ErrInsecureDir", err)
	}
	if _, err := os.Stat(filepath.Join(ww, logName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused dir got a log anyway: %v", err)
	}

	fresh := filepath.Join(base, "a", "b")
	s := open(t, fresh, Options{})
	s.Close()
	for _, p := range []string{fresh, filepath.Join(base, "a")} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Fatalf("%s created with mode %v, want 0700", p, fi.Mode().Perm())
		}
	}
	for _, name := range []string{logName, lockName} {
		fi, err := os.Stat(filepath.Join(fresh, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v, want 0600", name, fi.Mode().Perm())
		}
	}
}

// A compaction that crashed before its rename leaves its file behind; Open
// must discard it and keep the real log.
func TestStaleCompactionFileDiscarded(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	if err := s.Reserve([]Reservation{{testKey(1), 42}}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	junk := filepath.Join(s.dir, compactName)
	if err := os.WriteFile(junk, []byte("half a compaction"), 0o600); err != nil {
		t.Fatal(err)
	}
	s = open(t, s.dir, Options{})
	mustHigh(t, s, testKey(1), 42)
	if _, err := os.Stat(junk); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale compaction file still there: %v", err)
	}
}

func TestClosedStore(t *testing.T) {
	s := open(t, t.TempDir(), Options{})
	s.Close()
	if err := s.Reserve([]Reservation{{testKey(1), 1}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Reserve after Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// Readers never see a mark go down or appear before its fsync finished;
// run with -race this also checks the locking between High and Reserve.
func TestHighConcurrentWithReserve(t *testing.T) {
	const keys, rounds = 32, 200
	s := open(t, t.TempDir(), Options{CompactAfter: 64})
	stop := make(chan struct{})
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			var last [keys]uint64
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				for i := range keys {
					h, _ := s.High(testKey(i))
					if h < last[i] {
						errs <- fmt.Errorf("key %d went from %d down to %d", i, last[i], h)
						return
					}
					last[i] = h
				}
			}
		}()
	}
	batch := make([]Reservation, keys)
	for r := 1; r <= rounds; r++ {
		for i := range batch {
			batch[i] = Reservation{testKey(i), uint64(r)}
		}
		if err := s.Reserve(batch); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if st := s.Stats(); st.Compactions == 0 {
		t.Fatalf("no compaction ran under the readers: %+v", st)
	}
}
