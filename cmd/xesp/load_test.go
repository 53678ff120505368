package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/api"
)

// loadPairs is the size of the generated SA file: enough that the file
// is parsed in parallel chunks and the maps are written in several
// batches, small enough for a test.
const loadPairs = 5000

// phonesJSONL writes n pairs as a JSON-lines SA file: pair i is inbound
// SPI 0x100000+i and outbound 0x200000+i, inner peer 10.99.(1+i/250).(1+i%250),
// peer 192.0.2.10:4600, keys derived from i. bad, when >= 0, gets a
// 16-byte key on its inbound line.
func phonesJSONL(t *testing.T, dir string, n, bad int) string {
	t.Helper()
	var b strings.Builder
	for i := range n {
		inner := fmt.Sprintf("10.99.%d.%d", 1+i/250, 1+i%250)
		for _, d := range []struct {
			dir string
			spi int
			key string
		}{{"in", 0x100000 + i, loadKey('i', i)}, {"out", 0x200000 + i, loadKey('o', i)}} {
			if i == bad && d.dir == "in" {
				d.key = d.key[:32]
			}
			fmt.Fprintf(&b, `{"spi": "0x%08x", "direction": %q, "mode": "tunnel", "proposal": "aes128gcm16", "enc_key": %q, "local": "192.0.2.1", "peer": "192.0.2.10", "encap": {"peer_port": 4600}, "inner": {"local": "10.0.0.0/24", "peer": %q}}`+"\n",
				d.spi, d.dir, d.key, inner)
		}
	}
	path := filepath.Join(dir, "phones.jsonl")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func loadKey(dir byte, i int) string { return fmt.Sprintf("%02x%030x%08x", dir, i+1, 0x10ad0000+i) }

// TestRunDaemonLoadsSAFile: `xesp run` with a generated JSON-lines SA
// file in sa_files (next to the config's inline pair) comes up holding
// every SA in the SAD and every inbound SA in the pinned XDP SA map, and
// a phone of the file talks through it. A file with one bad key is
// refused before anything starts, naming the file, the line, the SA and
// the field.
func TestRunDaemonLoadsSAFile(t *testing.T) {
	d := newDaemonTopo(t)
	bad := phonesJSONL(t, d.dir, loadPairs, 4321)
	cfg, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg = append(cfg, []byte("max_sas: 16384\nsa_files: [phones.jsonl]\n")...)
	if err := os.WriteFile(d.cfg, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := xespCmd(d.gw, "run", "--config", d.cfg).CombinedOutput()
	want := fmt.Sprintf("config %s: sa_files[0]: %s: line %d 0x%08x: enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 16", d.cfg, bad, 2*4321+1, 0x100000+4321)
	if err == nil || !strings.Contains(string(out), want) {
		t.Fatalf("bad SA file: %v\n%s\nwant %s", err, out, want)
	}

	phonesJSONL(t, d.dir, loadPairs, -1)
	start := time.Now()
	dm := d.start(t)
	t.Logf("%d pairs from sa_files: API up after %v", loadPairs, time.Since(start).Round(time.Millisecond))

	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h, err := c.Health(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if h.SAs.In != loadPairs+1 || h.SAs.Out != loadPairs+1 {
		t.Fatalf("SAD holds %d in, %d out; want %d each", h.SAs.In, h.SAs.Out, loadPairs+1)
	}
	// The API answers once the manager's first sync installed every SA;
	// the inbound ones are in the XDP SA map by then. The map is pinned
	// in the daemon's mount namespace (ip netns exec remounts /sys).
	m, err := ebpf.LoadPinnedMap(filepath.Join(fmt.Sprintf("/proc/%d/root/sys/fs/bpf/xesp-test-%d", dm.cmd.Process.Pid, os.Getpid()), d.pubIf, bpf.XespMapSas), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	spis, vals := make([]uint32, 4096), make([]bpf.SASteer, 4096)
	var cur ebpf.MapBatchCursor
	inMap := map[uint32]bool{}
	for {
		n, err := m.BatchLookup(&cur, spis, vals, nil)
		for _, s := range spis[:n] {
			inMap[s] = true
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(inMap) != loadPairs+1 || !inMap[0x1001] || !inMap[0x100000] || !inMap[0x100000+loadPairs-1] {
		t.Fatalf("XDP SA map holds %d SPIs (0x1001 %v, first %v, last %v); want %d", len(inMap), inMap[0x1001], inMap[0x100000], inMap[0x100000+loadPairs-1], loadPairs+1)
	}

	// The file's last phone talks through the gateway both ways.
	k := loadPairs - 1
	ph := d.newPhone(t, 4600, mustESP(t, uint32(0x100000+k), loadKey('i', k), 0), mustESP(t, uint32(0x200000+k), loadKey('o', k), 1024))
	talk(t, ph, netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("10.99.%d.%d", 1+k/250, 1+k%250)), 5060), "REGISTER file phone")
}
