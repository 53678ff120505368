package gateway

import (
	"bytes"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// filesHolding lists the files under dir holding key (hex, either case,
// or raw).
func filesHolding(t *testing.T, dir, key string) []string {
	t.Helper()
	raw, _ := hex.DecodeString(key)
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(bytes.ToLower(b), []byte(key)) || bytes.Contains(b, raw) {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// After an SA is deleted or its keys are replaced (a rekey, a PUT), no
// file under state_dir holds the old keys once the change is flushed,
// which is before the API answers; the SAs still there keep theirs, and
// every state file is 0600.
func TestDeletedKeysLeaveTheDisk(t *testing.T) {
	const (
		k1 = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3"
		k2 = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3"
		k3 = "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3"
		k4 = "9091929394959697989990919293949596979899"
	)
	parse := func(y string) []sa.SA {
		sas, err := sa.ParseBytes([]byte(y), sa.YAML, sa.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return sas
	}
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	one := parse(pairYAML(1, 0x1001, 0x2001, k1, k2, ""))
	two := parse(pairYAML(2, 0x1002, 0x2002, k3, k3, ""))
	if err := d.AddAll(append(one, two...)); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := newAPISAs(&Gateway{Config: &config.Config{StateDir: dir}, SAD: d})
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{k1, k2, k3} {
		if len(filesHolding(t, dir, k)) == 0 {
			t.Fatalf("key %s is not in state_dir at all: the check would see nothing", k)
		}
	}
	// Delete the first pair (as xesp sa del or a sec-agree delete does).
	for _, s := range one {
		if _, err := d.Delete(s.ID()); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{k1, k2} {
		if f := filesHolding(t, dir, k); len(f) > 0 {
			t.Fatalf("deleted SA's key %s still in %v", k, f)
		}
	}
	// Replace the second pair's keys (a rekey in place).
	for _, s := range two {
		s.EncKey = sa.Secret(mustHex(t, k4))
		if _, err := d.Update(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	if f := filesHolding(t, dir, k3); len(f) > 0 {
		t.Fatalf("replaced key still in %v", f)
	}
	if len(filesHolding(t, dir, k4)) == 0 {
		t.Fatal("the new key is not stored")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if st, _ := os.Stat(filepath.Join(dir, e.Name())); st.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v", e.Name(), st.Mode().Perm())
		}
	}
	p.close()
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// BenchmarkAPISAsDelete100k is what deleting an API SA costs with 100k
// of them in the store: the journal append plus, when due, the
// compaction that takes the deleted keys off the disk (at most one per
// scrubEvery above scrubSmallSize; ns/op is the average over deletes
// spread as the benchmark runs them, compact-ms one compaction).
func BenchmarkAPISAsDelete100k(b *testing.B) {
	base, err := sa.ParseBytes([]byte(pairYAML(1, 0x1001, 0x2001, keyIn, keyOut, "")), sa.YAML, sa.Options{})
	if err != nil {
		b.Fatal(err)
	}
	d, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		b.Fatal(err)
	}
	const n = 100000
	for i := range n + b.N {
		s := base[0]
		s.Name = ""
		s.SPI = uint32(0x100000 + i)
		if _, err := d.Add(s); err != nil {
			b.Fatal(err)
		}
	}
	p := newAPISAs(&Gateway{Config: &config.Config{StateDir: b.TempDir()}, SAD: d})
	if err := p.flush(d.Version()); err != nil {
		b.Fatal(err)
	}
	// One compaction, timed alone.
	p.mu.Lock()
	t0 := time.Now()
	if err := p.compact(nil, false); err != nil {
		b.Fatal(err)
	}
	compact := time.Since(t0)
	p.mu.Unlock()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		e, _ := d.Lookup(sa.In, uint32(0x100000+n+i))
		if _, err := d.Delete(e.ID); err != nil {
			b.Fatal(err)
		}
		if err := p.flush(d.Version()); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(compact.Milliseconds()), "compact-ms")
	b.ReportMetric(float64(p.store.SnapshotSize())/(1<<20), "snapshot-MiB")
}
