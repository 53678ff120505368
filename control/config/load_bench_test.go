package config

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/xesp/xesp/bench/pktgen"
)

// BenchmarkLoadSAFile is config.Load of a config naming one JSON-lines SA
// file of XESP_LOAD_PAIRS pairs (default 200,000), the file the
// benchmark harness's config install loads (pktgen.WriteSAFile).
func BenchmarkLoadSAFile(b *testing.B) {
	pairs, err := pktgen.LoadPairs(200_000)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	file := filepath.Join(dir, "phones.jsonl")
	if err := pktgen.WriteSAFile(context.Background(), file, pairs, pktgen.DefaultNet()); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(dir, "xesp.yaml")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(`
public: {interface: eth0, addresses: [192.0.2.1]}
private: {interface: eth1}
max_sas: %d
state_dir: /var/lib/xesp
sa_files: [%s]
`, 1<<21, file)), 0o600); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		c, err := Load(path)
		if err != nil {
			b.Fatal(err)
		}
		if len(c.SAList) != 2*pairs {
			b.Fatalf("%d SAs, want %d", len(c.SAList), 2*pairs)
		}
	}
	b.ReportMetric(float64(2*pairs)*float64(b.N)/b.Elapsed().Seconds(), "SAs/s")
}
