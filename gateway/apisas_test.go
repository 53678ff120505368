package gateway

import (
	"context"
	"log/slog"
	"path/filepath"
	"reflect"
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
