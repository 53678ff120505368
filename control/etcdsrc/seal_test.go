package etcdsrc

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"os/exec"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/lab/etcdtest"
)

func ring(t *testing.T, lines string) *kek.Ring {
	t.Helper()
	r, err := kek.Parse([]byte(lines))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

const (
	kekA = "a1 " + "1111111111111111111111111111111111111111111111111111111111111111" + "\n"
	kekB = "b2 " + "2222222222222222222222222222222222222222222222222222222222222222" + "\n"
)

// startWith runs a Source with a KEK (nil: none) until the test ends.
func startWith(t *testing.T, cli *clientv3.Client, node string, r *kek.Ring) (*Source, *sad.SAD) {
	t.Helper()
	d, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	src, err := New(Options{Client: cli, Prefix: prefix, Node: node, SAD: d, Retry: 100 * time.Millisecond,
		Timeout: 2 * time.Second, Log: slog.New(slog.DiscardHandler), KEK: r})
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
		t.Fatal("source never listed")
	}
	return src, d
}

// etcd over TLS with client-certificate auth, SA records sealed under a
// KEK: the source serves them with their keys; etcdctl sees no key
// bytes; a source without the KEK, or with another key id, serves
// nothing and says why; a client without a certificate is refused.
func TestSealedRecordsOverTLS(t *testing.T) {
	srv := etcdtest.StartTLS(t)
	e := &config.Etcd{Endpoints: []string{srv.Endpoint()}, Dial: 2 * time.Second,
		TLS: &config.EtcdTLS{CAPath: srv.CA.Path, CertPath: srv.ClientCert.CertPath, KeyPath: srv.ClientCert.KeyPath}}
	cli, err := Dial(e, DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ra := ring(t, kekA)
	ctx := context.Background()
	for _, sp := range []struct {
		name string
		spi  uint32
		dir  string
		key  string
	}{{"ue1-in", 0x1001, "in", k1}, {"ue1-out", 0x2001, "out", k2}} {
		if err := PutSealed(ctx, cli, ra, prefix, "gw1", spec(sp.name, sp.spi, sp.dir, sp.key, 1)); err != nil {
			t.Fatal(err)
		}
	}
	src, d := startWith(t, cli, "gw1", ra)
	if got := names(d); len(got) != 2 || src.Stats.Applied.Load() != 2 {
		t.Fatalf("served %v (applied %d, rejected %d)", got, src.Stats.Applied.Load(), src.Stats.Rejected.Load())
	}
	e1, _ := d.GetName("ue1-in")
	if hex.EncodeToString(e1.SA.EncKey) != k1 {
		t.Fatal("ue1-in's key did not survive sealing")
	}

	// etcdctl, with the client certificate, dumps everything: no key.
	dump, err := exec.Command("etcdctl", "--endpoints", srv.Endpoint(), "--cacert", srv.CA.Path,
		"--cert", srv.ClientCert.CertPath, "--key", srv.ClientCert.KeyPath, "get", "--prefix", prefix).CombinedOutput()
	if err != nil {
		t.Fatalf("etcdctl: %v\n%s", err, dump)
	}
	if !bytes.Contains(dump, []byte(`"sealed":"xesp-kek/1"`)) {
		t.Fatalf("etcdctl shows no sealed record:\n%s", dump)
	}
	for _, k := range []string{k1, k2} {
		raw, _ := hex.DecodeString(k)
		if bytes.Contains(bytes.ToLower(dump), []byte(k[:16])) || bytes.Contains(dump, raw[:8]) {
			t.Fatalf("etcdctl output holds key %s:\n%s", k, dump)
		}
	}
	// Without a client certificate etcd refuses the client.
	noCert, err := exec.Command("etcdctl", "--endpoints", srv.Endpoint(), "--cacert", srv.CA.Path,
		"--dial-timeout", "2s", "--command-timeout", "3s", "get", "--prefix", prefix).CombinedOutput()
	if err == nil {
		t.Fatalf("etcdctl without a client certificate read etcd:\n%s", noCert)
	}
	bare, err := Dial(&config.Etcd{Endpoints: []string{srv.Endpoint()}, Dial: 2 * time.Second,
		TLS: &config.EtcdTLS{CAPath: srv.CA.Path}}, DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Close()
	gctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	_, err = bare.Get(gctx, prefix, clientv3.WithPrefix())
	cancel()
	if err == nil {
		t.Fatal("a client without a certificate read etcd")
	}
	t.Logf("client without certificate refused: %v", err)

	// A gateway without the KEK, and one holding only another id.
	src2, d2 := startWith(t, cli, "gw1", nil)
	if n := len(names(d2)); n != 0 || src2.Stats.Unsealable.Load() != 2 {
		t.Fatalf("no KEK: served %d, unsealable %d", n, src2.Stats.Unsealable.Load())
	}
	if err := src2.lastParseError(SADir(prefix, "gw1")+"ue1-in", mustGet(t, cli, "gw1", "ue1-in")); !errors.Is(err, ErrNoKEK) || strings.Contains(err.Error(), k1[:16]) {
		t.Fatalf("no KEK: %v", err)
	}
	src3, d3 := startWith(t, cli, "gw1", ring(t, kekB))
	if n := len(names(d3)); n != 0 || src3.Stats.UnknownKey.Load() != 2 {
		t.Fatalf("unknown id: served %d, unknown %d", n, src3.Stats.UnknownKey.Load())
	}
	if err := src3.lastParseError(SADir(prefix, "gw1")+"ue1-in", mustGet(t, cli, "gw1", "ue1-in")); !errors.Is(err, kek.ErrUnknownKey) || !strings.Contains(err.Error(), `"a1"`) {
		t.Fatalf("unknown id: %v", err)
	}
	// A record copied under another name does not open.
	if err := src.lastParseError(SADir(prefix, "gw1")+"ue9-in", mustGet(t, cli, "gw1", "ue1-in")); !errors.Is(err, kek.ErrOpen) {
		t.Fatalf("record under another name: %v", err)
	}
	// A record in clear is refused where a KEK is configured.
	put(t, cli, "gw1", spec("ue3-in", 0x1003, "in", k1, 3))
	deadline := time.Now().Add(5 * time.Second)
	for src.Stats.Unsealable.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := d.GetName("ue3-in"); ok || src.Stats.Unsealable.Load() == 0 {
		t.Fatalf("a record in clear was served (unsealable %d)", src.Stats.Unsealable.Load())
	}
}

func mustGet(t *testing.T, cli *clientv3.Client, node, name string) string {
	t.Helper()
	r, err := cli.Get(context.Background(), SADir(prefix, node)+name)
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("get %s: %v", name, err)
	}
	return string(r.Kvs[0].Value)
}

// Rotation: records sealed under a1 (and one in clear) are rewritten
// under b2 by Rekey; a gateway holding only b2 then serves them all, and
// a second Rekey has nothing to do.
func TestRekeyStore(t *testing.T) {
	srv := etcdtest.StartTLS(t)
	cli := srv.Client(t)
	ctx := context.Background()
	ra := ring(t, kekA)
	for i, name := range []string{"ue1-in", "ue2-in", "ue3-in"} {
		if err := PutSealed(ctx, cli, ra, prefix, "gw1", spec(name, 0x1001+uint32(i), "in", k1, i+1)); err != nil {
			t.Fatal(err)
		}
	}
	put(t, cli, "gw2", spec("ue4-in", 0x1004, "in", k2, 4)) // in clear, from before the KEK
	rab := ring(t, kekA+kekB)
	if rab.Current() != "b2" {
		t.Fatalf("current %q", rab.Current())
	}
	res, err := Rekey(ctx, cli, rab, prefix)
	if err != nil || res.Resealed != 4 || res.ByKID["a1"] != 3 || res.ByKID[""] != 1 || len(res.Unknown) != 0 {
		t.Fatalf("rekey: %+v %v", res, err)
	}
	rb := ring(t, kekB)
	_, d := startWith(t, cli, "gw1", rb)
	_, d2 := startWith(t, cli, "gw2", rb)
	if len(names(d)) != 3 || len(names(d2)) != 1 {
		t.Fatalf("after rekey a b2-only gateway serves %v and %v", names(d), names(d2))
	}
	res, err = Rekey(ctx, cli, rab, prefix)
	if err != nil || res.Resealed != 0 || res.Current != 4 {
		t.Fatalf("second rekey: %+v %v", res, err)
	}
	// A ring without b2 reports the records it cannot touch.
	res, err = Rekey(ctx, cli, ring(t, kekA), prefix)
	if err != nil || len(res.Unknown) != 4 || res.Resealed != 0 {
		t.Fatalf("rekey with an old ring: %+v %v", res, err)
	}
}
