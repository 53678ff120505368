package sastore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

func entry(t testing.TB, s *sa.SA) []byte {
	t.Helper()
	b, err := EncodeSA(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ids(sas []sa.SA) []sa.ID {
	var out []sa.ID
	for i := range sas {
		out = append(out, sas[i].ID())
	}
	return out
}

// openT opens the store at path and fails the test on an error.
func openT(t *testing.T, path string) (*Store, OpenResult) {
	t.Helper()
	st, res, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, res
}

// Puts, an update and deletes (one of an SA the set does not hold) replay
// over the snapshot in order; both files are 0600; Load and Open agree.
func TestJournalReplay(t *testing.T) {
	sas := sampleSAs(t)
	path := filepath.Join(t.TempDir(), "api-sas")
	if err := Save(path, sas[:1]); err != nil {
		t.Fatal(err)
	}
	st, res := openT(t, path)
	if res.Snapshot != 1 || res.Records != 0 || len(res.SAs) != 1 {
		t.Fatalf("fresh journal over a 1-SA snapshot: %+v", res)
	}
	changed := sas[0]
	changed.ReplayWindow = 64
	var recs []byte
	recs = AppendPut(recs, entry(t, &sas[1]))
	recs = AppendPut(recs, entry(t, &sas[2]))
	recs = AppendPut(recs, entry(t, &changed))
	recs = AppendDelete(recs, sas[2].ID())
	recs = AppendDelete(recs, sa.ID{Dir: sa.In, SPI: 0xdead}) // absent: no effect
	if err := st.Append(recs); err != nil {
		t.Fatal(err)
	}
	if err := st.Append(AppendDelete(nil, sas[1].ID())); err != nil {
		t.Fatal(err)
	}
	if err := st.Append(AppendPut(nil, entry(t, &sas[1]))); err != nil {
		t.Fatal(err)
	}
	want := []sa.SA{changed, sas[1]}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Load after replay: %v, want %v", ids(got), ids(want))
	}
	st.Close()
	_, res = openT(t, path)
	if res.Records != 7 || res.TornBytes != 0 || !reflect.DeepEqual(res.SAs, want) {
		t.Fatalf("Open after replay: %d records, torn %d, SAs %v; want 7, 0, %v", res.Records, res.TornBytes, ids(res.SAs), ids(want))
	}
	for _, p := range []string{path, path + JournalSuffix} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v, want 0600", p, fi.Mode().Perm())
		}
	}
	// An outbound SA's delete record carries its peer and port.
	out := sas[1].ID()
	rs, _, err := DecodeJournal(append([]byte(journalHeader), AppendDelete(nil, out)...))
	if err != nil || len(rs) != 1 || !rs[0].Delete || rs[0].ID != out {
		t.Fatalf("delete of %v decodes to %+v, %v", out, rs, err)
	}
}

// A torn last append, cut at every byte, or zero-filled, or with its
// data garbled, is cut off by Open (and said so) and left out by Load;
// the records before it stay.
func TestJournalTornTail(t *testing.T) {
	sas := sampleSAs(t)
	good := AppendPut([]byte(journalHeader), entry(t, &sas[0]))
	last := AppendPut(nil, entry(t, &sas[1]))
	garbled := append([]byte(nil), last...)
	garbled[len(garbled)-3] ^= 0xff
	tails := map[string][]byte{
		"zeros":   make([]byte, 4096),
		"garbled": garbled,
	}
	for n := 1; n < len(last); n++ {
		tails[fmt.Sprintf("cut at %d", n)] = last[:n]
	}
	for name, tail := range tails {
		dir := t.TempDir()
		path := filepath.Join(dir, "api-sas")
		if err := Save(path, nil); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path+JournalSuffix, append(append([]byte(nil), good...), tail...), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := Load(path)
		if err != nil || len(got) != 1 || got[0].ID() != sas[0].ID() {
			t.Fatalf("%s: Load = %v, %v; want the first SA only", name, ids(got), err)
		}
		st, res, err := Open(path)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if res.TornAt != int64(len(good)) || res.TornBytes != int64(len(tail)) || len(res.SAs) != 1 {
			t.Fatalf("%s: Open = torn %d bytes at %d, %d SAs; want %d at %d, 1 SA", name, res.TornBytes, res.TornAt, len(res.SAs), len(tail), len(good))
		}
		// The tail is gone from the file and the next append follows the good records.
		if err := st.Append(last); err != nil {
			t.Fatal(err)
		}
		st.Close()
		b, _ := os.ReadFile(path + JournalSuffix)
		if string(b) != string(good)+string(last) {
			t.Fatalf("%s: journal after cut and append is %d bytes, want %d", name, len(b), len(good)+len(last))
		}
		if got, _ := Load(path); len(got) != 2 {
			t.Fatalf("%s: after the append Load holds %d SAs, want 2", name, len(got))
		}
	}
}

// A bad record with records after it is corruption, not a torn append:
// Open and Load refuse it, name the file and the offset, and leave the
// file as it was.
func TestJournalMidFileCorruption(t *testing.T) {
	sas := sampleSAs(t)
	first := AppendPut([]byte(journalHeader), entry(t, &sas[0]))
	second := AppendPut(nil, entry(t, &sas[1]))
	third := AppendPut(nil, entry(t, &sas[2]))
	mk := func(mod func(b []byte)) []byte {
		b := append(append(append([]byte(nil), first...), second...), third...)
		mod(b)
		return b
	}
	at := len(first)
	cases := map[string][]byte{
		"flipped data byte": mk(func(b []byte) { b[at+20] ^= 1 }),
		"flipped checksum":  mk(func(b []byte) { b[at+5] ^= 1 }),
		"huge length":       mk(func(b []byte) { b[at] = 0x7f }),
		"zero length":       mk(func(b []byte) { copy(b[at:], []byte{0, 0, 0, 0}) }),
		"unknown type":      append(append(append([]byte(nil), first...), appendRecord(nil, 'X', []byte("x"))...), third...),
		"bad SA in record":  append(append(append([]byte(nil), first...), AppendPut(nil, []byte(`{"spi":1}`))...), third...),
		"bad delete id":     append(append(append([]byte(nil), first...), appendRecord(nil, 'D', []byte{9, 0, 0, 0, 1})...), third...),
	}
	for name, b := range cases {
		path := filepath.Join(t.TempDir(), "api-sas")
		if err := Save(path, nil); err != nil {
			t.Fatal(err)
		}
		jpath := path + JournalSuffix
		if err := os.WriteFile(jpath, b, 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := Open(path)
		want := fmt.Sprintf("offset %d", at)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), jpath) || !strings.Contains(err.Error(), want) {
			t.Fatalf("%s: Open error %v; want ErrCorrupt naming %s and %q", name, err, jpath, want)
		}
		if _, err := Load(path); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: Load error %v, want ErrCorrupt", name, err)
		}
		if after, _ := os.ReadFile(jpath); string(after) != string(b) {
			t.Fatalf("%s: the refused journal was changed", name)
		}
	}
	// A wrong header is refused too, and so is a group-readable journal.
	path := filepath.Join(t.TempDir(), "api-sas")
	os.WriteFile(path+JournalSuffix, []byte("xesp-api-sas-journal 2\n"), 0o600)
	if _, _, err := Open(path); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "offset 0") {
		t.Fatalf("journal version 2: %v", err)
	}
	os.WriteFile(path+JournalSuffix, []byte(journalHeader), 0o644)
	os.Chmod(path+JournalSuffix, 0o644)
	if _, _, err := Open(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("journal mode 0644: %v", err)
	}
}

// Compaction at every crash point loads the set it compacts: the files
// are built as a crash would leave them after each step (new snapshot
// not yet renamed; renamed but the journal not yet replaced; both done),
// and Compact itself is run for the last state.
func TestCompactionCrashPoints(t *testing.T) {
	sas := sampleSAs(t)
	changed := sas[0]
	changed.ReplayWindow = 32
	setup := func(t *testing.T) (string, []byte, [][]byte) {
		path := filepath.Join(t.TempDir(), "api-sas")
		if err := Save(path, sas[:2]); err != nil {
			t.Fatal(err)
		}
		st, _ := openT(t, path)
		var recs []byte
		recs = AppendDelete(recs, sas[1].ID())
		recs = AppendPut(recs, entry(t, &sas[2]))
		recs = AppendPut(recs, entry(t, &changed))
		recs = AppendPut(recs, entry(t, &sas[1]))
		recs = AppendDelete(recs, sas[2].ID())
		if err := st.Append(recs); err != nil {
			t.Fatal(err)
		}
		st.Close()
		oldJournal, _ := os.ReadFile(path + JournalSuffix)
		// The set Compact is given: the snapshot with the journal replayed.
		return path, oldJournal, [][]byte{entry(t, &changed), entry(t, &sas[1])}
	}
	want := map[sa.ID]sa.SA{changed.ID(): changed, sas[1].ID(): sas[1]}
	check := func(t *testing.T, step, path string) {
		t.Helper()
		got, err := Load(path)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		_, res := openT(t, path)
		for _, set := range [][]sa.SA{got, res.SAs} {
			m := map[sa.ID]sa.SA{}
			for _, s := range set {
				m[s.ID()] = s
			}
			if len(set) != len(m) || !reflect.DeepEqual(m, want) {
				t.Fatalf("%s: loads %v, want %v and %v", step, ids(set), changed.ID(), sas[1].ID())
			}
		}
	}
	t.Run("before-snapshot-rename", func(t *testing.T) {
		path, _, entries := setup(t)
		// The new snapshot was being written to the temporary file.
		if err := os.WriteFile(path+".tmp", Assemble(entries)[:40], 0o600); err != nil {
			t.Fatal(err)
		}
		check(t, "crash before the snapshot rename", path)
	})
	t.Run("between-renames", func(t *testing.T) {
		path, oldJournal, entries := setup(t)
		if err := WriteFile(path, Assemble(entries)); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path+JournalSuffix+".tmp", []byte(journalHeader[:5]), 0o600); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(path + JournalSuffix); string(b) != string(oldJournal) {
			t.Fatal("setup: the old journal is not in place")
		}
		check(t, "crash between the snapshot and the journal renames", path)
	})
	t.Run("done", func(t *testing.T) {
		path, _, entries := setup(t)
		st, _ := openT(t, path)
		if err := st.Compact(entries); err != nil {
			t.Fatal(err)
		}
		if st.JournalSize() != int64(len(journalHeader)) {
			t.Fatalf("journal after compaction is %d bytes", st.JournalSize())
		}
		// Appends after a compaction go to the new journal.
		if err := st.Append(AppendDelete(nil, sas[1].ID())); err != nil {
			t.Fatal(err)
		}
		st.Close()
		got, err := Load(path)
		if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], changed) {
			t.Fatalf("after compaction and a delete: %v, %v", ids(got), err)
		}
	})
}

// NeedCompact: not for a small journal, yes once it outgrows a large
// snapshot's size.
func TestNeedCompact(t *testing.T) {
	path := filepath.Join(t.TempDir(), "api-sas")
	st, _ := openT(t, path)
	s := sampleSAs(t)[0]
	e := entry(t, &s)
	for st.JournalSize() < 1<<20 {
		if st.NeedCompact() {
			t.Fatalf("compaction wanted at %d journal bytes over an empty snapshot", st.JournalSize())
		}
		var recs []byte
		for i := 0; i < 256; i++ {
			recs = AppendPut(recs, e)
		}
		if err := st.Append(recs); err != nil {
			t.Fatal(err)
		}
	}
	if !st.NeedCompact() {
		t.Fatalf("no compaction wanted at %d journal bytes", st.JournalSize())
	}
}

// FuzzDecodeJournal runs tens of thousands of inputs a second, but its
// inputs grow from a 1 KB journal and Go minimizes each new interesting
// input for up to 60 s by default, quadratically in its length: run it
// with -fuzzminimizetime=500x (make fuzz does), or it spends the whole
// -fuzztime minimizing the first finding.
func FuzzDecodeJournal(f *testing.F) {
	sas := sampleSAs(f)
	b := []byte(journalHeader)
	for i := range sas {
		b = AppendPut(b, entry(f, &sas[i]))
	}
	b = AppendDelete(b, sas[1].ID())
	f.Add(b)
	f.Add(b[:len(b)-3])
	f.Add([]byte(journalHeader))
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, valid, err := DecodeJournal(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if valid < int64(len(journalHeader)) || valid > int64(len(b)) {
			t.Fatalf("valid prefix %d of %d bytes", valid, len(b))
		}
		// Re-encoding the records gives the valid prefix's record count
		// back, and the prefix decodes to the same records with no tail.
		again, v2, err := DecodeJournal(b[:valid])
		if err != nil || v2 != valid || len(again) != len(recs) {
			t.Fatalf("valid prefix decodes to %d records, %d bytes, %v; want %d, %d", len(again), v2, err, len(recs), valid)
		}
		for i := range recs {
			if recs[i].Delete {
				continue
			}
			if _, err := EncodeSA(&recs[i].SA); err != nil {
				t.Fatalf("decoded SA does not encode: %v", err)
			}
		}
		_ = replay(nil, recs)
	})
}

func bigSet(b *testing.B) []sa.SA {
	base := sampleSAs(b)
	sas := make([]sa.SA, 100000)
	for i := range sas {
		sas[i] = base[i%2]
		sas[i].Name = fmt.Sprintf("sa%d", i)
		sas[i].SPI = uint32(0x10000 + i)
	}
	return sas
}

// BenchmarkAPICall100k compares what one acknowledged API call (one SA
// added) costs the store with 100k SAs: before, the whole file rewritten
// (from cached entries, as the gateway did); after, one journal append
// and fsync (compaction amortized in, as the gateway runs it).
func BenchmarkAPICall100k(b *testing.B) {
	sas := bigSet(b)
	entries := make([][]byte, len(sas))
	for i := range sas {
		entries[i] = entry(b, &sas[i])
	}
	extra := sas[0]
	b.Run("rewrite", func(b *testing.B) {
		path := filepath.Join(b.TempDir(), "api-sas")
		items := append([][]byte(nil), entries...)
		for i := 0; i < b.N; i++ {
			extra.SPI = uint32(0x1000000 + i)
			items = append(items, entry(b, &extra))
			if err := WriteFile(path, Assemble(items)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("journal", func(b *testing.B) {
		path := filepath.Join(b.TempDir(), "api-sas")
		if err := WriteFile(path, Assemble(entries)); err != nil {
			b.Fatal(err)
		}
		st, _, err := Open(path)
		if err != nil {
			b.Fatal(err)
		}
		defer st.Close()
		items := append([][]byte(nil), entries...)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			extra.SPI = uint32(0x1000000 + i)
			e := entry(b, &extra)
			items = append(items, e)
			if err := st.Append(AppendPut(nil, e)); err != nil {
				b.Fatal(err)
			}
			if st.NeedCompact() {
				if err := st.Compact(items); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}
