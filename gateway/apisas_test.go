package gateway

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"reflect"
	"sort"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/sastore"
	"github.com/xesp/xesp/lab/etcdtest"
)

// Which SAs state_dir/api-sas holds: those added through the API and API
// changes of config SAs; not config SAs as the file gives them, and not
// etcd's SAs (etcd is their store). The next start loads them over the
// config's SAs.
func TestAPISAsSelection(t *testing.T) {
	parse := func(y string) []sa.SA {
		sas, err := sa.ParseBytes([]byte(y), sa.YAML, sa.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return sas
	}
	cfgSAs := parse(pairYAML(1, 0x1001, 0x2001, keyIn, keyOut, ""))
	changed := cfgSAs[1]
	changed.Lifetime.HardPackets = 1000 // an API PUT of a config SA
	apiSAs := parse(pairYAML(3, 0x1003, 0x2003, keyIn, keyOut, ""))

	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddAll(append(append([]sa.SA(nil), cfgSAs...), apiSAs...)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Update(changed); err != nil {
		t.Fatal(err)
	}

	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	etcdSA := parse(pairYAML(5, 0x1005, 0x2005, keyIn, keyOut, ""))[0]
	sp := etcdSA.Public()
	sp.EncKey = keyIn
	if err := etcdsrc.Put(context.Background(), cli, "/x", "gw1", sp); err != nil {
		t.Fatal(err)
	}
	src, err := etcdsrc.New(etcdsrc.Options{Client: cli, Prefix: "/x", Node: "gw1", SAD: d, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { src.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-src.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("etcd source never listed")
	}
	if _, ok := d.Get(etcdSA.ID()); !ok {
		t.Fatal("the etcd SA is not in the SAD")
	}

	cfg := &config.Config{StateDir: t.TempDir(), SAList: cfgSAs}
	p := newAPISAs(&Gateway{Config: cfg, SAD: d})
	p.setEtcd(src)
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	got, err := sastore.Load(filepath.Join(cfg.StateDir, apiSAsFile))
	if err != nil {
		t.Fatal(err)
	}
	want := []sa.SA{changed, apiSAs[0], apiSAs[1]}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("api-sas holds %d SAs %v, want the changed config SA and the API pair", len(got), labels(got))
	}

	// The next start: config SAs first, then the file over them.
	d2, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.AddAll(cfgSAs); err != nil {
		t.Fatal(err)
	}
	n, err := newAPISAs(&Gateway{Config: cfg, SAD: d2}).restore()
	if err != nil || n != 3 {
		t.Fatalf("restore: %d, %v", n, err)
	}
	if e, _ := d2.Get(changed.ID()); e.SA.Lifetime.HardPackets != 1000 {
		t.Fatal("the API's version of the config SA did not win")
	}
	if _, ok := d2.Get(apiSAs[1].ID()); !ok || d2.Version() == 0 {
		t.Fatal("the API pair was not restored")
	}
	if _, ok := d2.Get(etcdSA.ID()); ok {
		t.Fatal("an etcd SA came back from the local file")
	}
}

func labels(sas []sa.SA) []string {
	var out []string
	for i := range sas {
		out = append(out, sas[i].Label())
	}
	return out
}

// BenchmarkAPISAsFlush100k is what an API call waits for on top of the
// data path sync with 100k API SAs in the SAD: one SA added, the file
// rewritten (only the new SA encoded; the rest reused). Compare with
// sastore's BenchmarkSave100k, which encodes all of them.
func BenchmarkAPISAsFlush100k(b *testing.B) {
	base, err := sa.ParseBytes([]byte(pairYAML(1, 0x1001, 0x2001, keyIn, keyOut, "")), sa.YAML, sa.Options{})
	if err != nil {
		b.Fatal(err)
	}
	d, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		b.Fatal(err)
	}
	add := func(i int) {
		s := base[0]
		s.Name = ""
		s.SPI = uint32(0x100000 + i)
		if _, err := d.Add(s); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < 100000; i++ {
		add(i)
	}
	p := newAPISAs(&Gateway{Config: &config.Config{StateDir: b.TempDir()}, SAD: d})
	if err := p.flush(d.Version()); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		add(100000 + i)
		if err := p.flush(d.Version()); err != nil {
			b.Fatal(err)
		}
	}
}

// When the SAD's change feed overruns (a bulk add of more SAs than it
// keeps), a flush still leaves the store equal to the SAD's API SAs: a
// bulk add into an empty store is written as one snapshot; a later
// overrun with few changes encodes only the changed SAs (not the whole
// SAD again), writes a delete for each SA gone, and the deleted keys
// leave the disk.
func TestAPISAsFeedOverrun(t *testing.T) {
	base, err := sa.ParseBytes([]byte(pairYAML(1, 0x1001, 0x2001, keyIn, keyOut, "")), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d, err := sad.New(sad.Options{Workers: 2, LogSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	mk := func(i int) sa.SA {
		s := base[0]
		s.Name = ""
		s.SPI = uint32(0x100000 + i)
		s.Pair = fmt.Sprintf("g%d", i) // one binding each
		s.EncKey = append(sa.Secret(nil), s.EncKey...)
		s.EncKey[0] = byte(i)
		s.EncKey[1] = byte(i >> 8)
		return s
	}
	const n = 3000
	var bulk []sa.SA
	for i := range n {
		bulk = append(bulk, mk(i))
	}
	if err := d.AddAll(bulk); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, apiSAsFile)
	p := newAPISAs(&Gateway{Config: &config.Config{StateDir: dir}, SAD: d})
	check := func(what string) {
		t.Helper()
		got, err := sastore.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		var want []sa.SA
		var cur uint64
		for {
			var page []sad.Record
			page, cur = d.List(cur, 1000, nil)
			for _, r := range page {
				want = append(want, r.SA)
			}
			if cur == 0 {
				break
			}
		}
		sortSAs(got)
		sortSAs(want)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: the store holds %d SAs, the SAD %d (or they differ)", what, len(got), len(want))
		}
		if p.held.len() != len(want) {
			t.Fatalf("%s: %d SAs held, %d in the SAD", what, p.held.len(), len(want))
		}
	}
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	check("bulk add")
	if p.encodes != n || p.store.JournalSize() > 100 {
		t.Fatalf("bulk add: %d entries encoded for %d SAs, journal %d bytes: want one snapshot write", p.encodes, n, p.store.JournalSize())
	}

	// An overrun of binding changes and a few adds: only those encoded,
	// only the adds written.
	for i := range 200 {
		if _, err := d.SetBinding(bulk[i].ID(), netip.MustParseAddrPort(fmt.Sprintf("198.51.100.%d:%d", i%250+1, 1000+i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := n; i < n+100; i++ {
		if _, err := d.Add(mk(i)); err != nil {
			t.Fatal(err)
		}
	}
	before, j0 := p.encodes, p.store.JournalSize()
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	check("bindings and adds")
	if got := p.encodes - before; got != 300 {
		t.Fatalf("overrun with 300 SAs changed: %d encoded", got)
	}
	if p.stale || p.store.JournalSize()-j0 > 100*400 {
		t.Fatalf("bindings rewritten: journal grew by %d bytes, stale %v", p.store.JournalSize()-j0, p.stale)
	}

	// An overrun with deletes and key changes: deletes written, the old
	// keys gone from the disk.
	for i := 0; i < 150; i++ {
		if _, err := d.Delete(bulk[i].ID()); err != nil {
			t.Fatal(err)
		}
	}
	changed := mk(500)
	changed.EncKey = append(sa.Secret(nil), changed.EncKey...)
	changed.EncKey[5] ^= 0xff
	if _, err := d.Update(changed); err != nil {
		t.Fatal(err)
	}
	if err := p.flush(d.Version()); err != nil {
		t.Fatal(err)
	}
	check("deletes")
	for _, s := range []sa.SA{bulk[0], bulk[149], bulk[500]} {
		if f := filesHolding(t, dir, hex.EncodeToString(s.EncKey)); len(f) > 0 {
			t.Fatalf("old key of %s still in %v", s.Label(), f)
		}
	}
	if len(filesHolding(t, dir, hex.EncodeToString(changed.EncKey))) == 0 {
		t.Fatal("the updated key is not stored")
	}
	p.close()

	// The next start loads what was flushed.
	d2, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	p2 := newAPISAs(&Gateway{Config: &config.Config{StateDir: dir}, SAD: d2})
	if got, err := p2.restore(); err != nil || got != n+100-150 {
		t.Fatalf("restore: %d SAs, %v", got, err)
	}
	p2.close()
}

func sortSAs(sas []sa.SA) {
	sort.Slice(sas, func(i, j int) bool { return sas[i].SPI < sas[j].SPI })
}

// heldSet keeps inbound SAs by SPI and the others by their whole key,
// and gives every one back as the key it was put with, an outbound SA
// with the same SPI as an inbound one included.
func TestHeldSet(t *testing.T) {
	h := newHeldSet()
	in := sa.ID{Dir: sa.In, SPI: 0x1001}.Key()
	out := sa.ID{Dir: sa.Out, SPI: 0x1001, Peer: netip.MustParseAddrPort("192.0.2.10:4500")}.Key()
	out6 := sa.ID{Dir: sa.Out, SPI: 0x1002, Peer: netip.MustParseAddrPort("[2001:db8::1]:0")}.Key()
	h.put(in, 1)
	h.put(out, 2)
	h.put(out6, 3)
	if len(h.in) != 1 || len(h.out) != 2 || h.len() != 3 {
		t.Fatalf("in %d out %d", len(h.in), len(h.out))
	}
	for k, want := range map[sa.Key]uint64{in: 1, out: 2, out6: 3} {
		if f, ok := h.get(k); !ok || f != want {
			t.Fatalf("get %v: %d %v, want %d", k.ID(), f, ok, want)
		}
	}
	seen := map[sa.Key]uint64{}
	if err := h.each(func(k sa.Key, f uint64) error {
		seen[k] = f
		if f == 2 {
			h.del(k)
		}
		return nil
	}); err != nil || len(seen) != 3 || seen[in] != 1 || seen[out] != 2 || seen[out6] != 3 {
		t.Fatalf("each: %v %v", seen, err)
	}
	if _, ok := h.get(out); ok || h.len() != 2 {
		t.Fatal("deleted during each, still held")
	}
	h.del(in)
	if _, ok := h.get(in); ok || h.len() != 1 {
		t.Fatal("inbound delete")
	}
}
