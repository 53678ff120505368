package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/lab/etcdtest"
)

// `xesp fleet` assigns SAs from SA files (key files read and written
// inline), lists and moves them; what it writes is what a gateway loads.
func TestFleetCLI(t *testing.T) {
	srv := etcdtest.Start(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "k.hex"), []byte(runKeyOut+"\n"), 0o600)
	file := filepath.Join(dir, "ue1.yaml")
	os.WriteFile(file, []byte("sas:\n"+saYAML("ue1-in", 0x1001, "in", runKeyIn, 1)+
		strings.Replace(saYAML("ue1-out", 0x2001, "out", runKeyOut, 1), "enc_key: "+runKeyOut, "enc_key_file: k.hex", 1)), 0o600)
	fleet := func(args ...string) string {
		t.Helper()
		full := append([]string{"fleet", args[0], "--etcd", srv.Endpoint(), "--prefix", "/f"}, args[1:]...)
		out, err := xespCmd(nil, full...).CombinedOutput()
		if err != nil {
			t.Fatalf("xesp fleet %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if out := fleet("put", "--node", "gwa", file); !strings.Contains(out, "2 SAs assigned to gwa") {
		t.Fatalf("put: %s", out)
	}
	if out := fleet("list"); out != "gwa: ue1-in ue1-out\n" {
		t.Fatalf("list: %q", out)
	}
	fleet("move", "--from", "gwa", "--to", "gwb", "ue1-in", "ue1-out")
	if out := fleet("list"); out != "gwb: ue1-in ue1-out\n" {
		t.Fatalf("list after move: %q", out)
	}
	r, err := srv.Client(t).Get(context.Background(), etcdsrc.SADir("/f", "gwb")+"ue1-out")
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("get: %v", err)
	}
	list, err := sa.ParseBytes(r.Kvs[0].Value, sa.JSON, sa.Options{})
	if err != nil || len(list) != 1 || list[0].Name != "ue1-out" || list[0].SPI != 0x2001 {
		t.Fatalf("stored SA does not parse back: %v %+v", err, list)
	}
	if !strings.Contains(string(r.Kvs[0].Value), runKeyOut) {
		t.Fatal("the key file's key was not written inline")
	}

	out, err := xespCmd(nil, "fleet", "list", "--etcd", "http://127.0.0.1").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "etcd.endpoints[0]") {
		t.Fatalf("bad endpoint: %v\n%s", err, out)
	}
	out, err = xespCmd(nil, "fleet", "move", "--etcd", srv.Endpoint(), "--prefix", "/f", "--from", "gwa", "--to", "gwb", "ue1-in").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not assigned to gwa") {
		t.Fatalf("moving an SA the node lacks: %v\n%s", err, out)
	}
}
