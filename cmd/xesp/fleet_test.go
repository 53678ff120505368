package main

import (
	"context"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/lab/etcdtest"
)

// `xesp fleet` assigns SAs from SA files (key files read, the whole
// record sealed under the KEK), lists and moves them, and re-seals them
// under a new key id (rekey-store); etcd runs with TLS and client
// certificates, as the CLI does by default.
func TestFleetCLI(t *testing.T) {
	srv := etcdtest.StartTLS(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "k.hex"), []byte(runKeyOut+"\n"), 0o600)
	file := filepath.Join(dir, "ue1.yaml")
	os.WriteFile(file, []byte("sas:\n"+saYAML("ue1-in", 0x1001, "in", runKeyIn, 1)+
		strings.Replace(saYAML("ue1-out", 0x2001, "out", runKeyOut, 1), "enc_key: "+runKeyOut, "enc_key_file: k.hex", 1)), 0o600)
	kek1 := filepath.Join(dir, "kek")
	os.WriteFile(kek1, []byte("k1 "+strings.Repeat("ab", 32)+"\n"), 0o600)
	kek2 := filepath.Join(dir, "kek2")
	os.WriteFile(kek2, []byte("k1 "+strings.Repeat("ab", 32)+"\nk2 "+strings.Repeat("cd", 32)+"\n"), 0o600)
	tlsFlags := []string{"--ca", srv.CA.Path, "--cert", srv.ClientCert.CertPath, "--key", srv.ClientCert.KeyPath}
	fleet := func(args ...string) string {
		t.Helper()
		full := append(append([]string{"fleet", args[0], "--etcd", srv.Endpoint(), "--prefix", "/f"}, tlsFlags...), args[1:]...)
		out, err := xespCmd(nil, full...).CombinedOutput()
		if err != nil {
			t.Fatalf("xesp fleet %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if out := fleet("put", "--node", "gwa", "--kek", kek1, file); !strings.Contains(out, "2 SAs assigned to gwa, sealed under key id k1") {
		t.Fatalf("put: %s", out)
	}
	if out := fleet("list"); out != "gwa: ue1-in ue1-out\n" {
		t.Fatalf("list: %q", out)
	}
	fleet("move", "--from", "gwa", "--to", "gwb", "ue1-in", "ue1-out")
	if out := fleet("list"); out != "gwb: ue1-in ue1-out\n" {
		t.Fatalf("list after move: %q", out)
	}
	stored := func() []byte {
		r, err := srv.Client(t).Get(context.Background(), etcdsrc.SADir("/f", "gwb")+"ue1-out")
		if err != nil || len(r.Kvs) != 1 {
			t.Fatalf("get: %v", err)
		}
		return r.Kvs[0].Value
	}
	ring1, err := kek.Load(kek1)
	if err != nil {
		t.Fatal(err)
	}
	v := stored()
	if strings.Contains(string(v), runKeyOut) || !strings.Contains(string(v), `"kid":"k1"`) {
		t.Fatalf("stored record is not sealed under k1: %s", v)
	}
	plain, kid, err := etcdsrc.Unseal(ring1, "ue1-out", v)
	if err != nil || kid != "k1" {
		t.Fatalf("unseal: %v %q", err, kid)
	}
	list, err := sa.ParseBytes(plain, sa.JSON, sa.Options{})
	if err != nil || len(list) != 1 || list[0].Name != "ue1-out" || list[0].SPI != 0x2001 || hex.EncodeToString(list[0].EncKey) != runKeyOut {
		t.Fatalf("stored SA does not parse back with its key file's key: %v %+v", err, list)
	}
	if out := fleet("rekey-store", "--kek", kek2); !strings.Contains(out, "2 SA records re-sealed under key id k2, 0 already were (found: k1 2)") {
		t.Fatalf("rekey-store: %s", out)
	}
	if v := stored(); !strings.Contains(string(v), `"kid":"k2"`) {
		t.Fatalf("after rekey-store: %s", v)
	}

	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"fleet", "list", "--etcd", "http://127.0.0.1:2379"}, "plain http carries SA keys"},
		{[]string{"fleet", "list", "--etcd", "http://127.0.0.1"}, "etcd.endpoints[0]"},
		{append(append([]string{"fleet", "put"}, tlsFlags...), "--etcd", srv.Endpoint(), "--node", "gwa", file), "etcd.kek_file: required"},
		{append(append([]string{"fleet", "move"}, tlsFlags...), "--etcd", srv.Endpoint(), "--prefix", "/f", "--from", "gwa", "--to", "gwb", "ue1-in"), "not assigned to gwa"},
	} {
		out, err := xespCmd(nil, bad.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), bad.want) {
			t.Errorf("%v: %v\n%s", bad.args, err, out)
		}
	}
	// rekey-store with the old ring: the k2 records are reported, not
	// touched (and their prefix is /f here).
	out, err := xespCmd(nil, append(append([]string{"fleet", "rekey-store"}, tlsFlags...), "--etcd", srv.Endpoint(), "--prefix", "/f", "--kek", kek1)...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "2 records under a key id the KEK file lacks") {
		t.Fatalf("rekey-store with an old KEK file: %v\n%s", err, out)
	}
}
