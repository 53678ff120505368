package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/secagree"
)

func TestCLISecAgree(t *testing.T) {
	e := newCLIEnv(t)
	ckFile := filepath.Join(e.dir, "ck")
	if err := os.WriteFile(ckFile, []byte("000102030405060708090a0b0c0d0e0f\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, string, error) {
		var out, errb bytes.Buffer
		err := runSecAgree(append(args, "--api", e.unix), &out, &errb)
		return out.String(), errb.String(), err
	}
	out, _, err := run("create", "--registration", "bob", "--ck-file", ckFile, "--ik", "f0e1d2c3b4a5968778695a4b3c2d1e0f",
		"--security-client", "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064",
		"--ue", "198.51.100.7:31000", "--ue-inner", "192.168.1.11", "--pcscf", "10.0.0.1", "--local", "192.0.2.1",
		"--port-c", "5063", "--port-s", "5065", "--spi-c", "3333", "--spi-s", "4444")
	if err != nil {
		t.Fatal(err)
	}
	ms, err := secagree.Parse(strings.TrimSpace(out))
	if err != nil || len(ms) != 1 || ms[0].SPIC != 3333 || ms[0].SPIS != 4444 || ms[0].Mod != secagree.ModeUDPEncTun {
		t.Fatalf("printed %q: %v", out, err)
	}
	if in, o := e.sad.Len(); in != 2 || o != 2 {
		t.Fatalf("SAD %d/%d", in, o)
	}
	if ent, ok := e.sad.GetName("bob.in-s"); !ok || string(ent.SA.EncKey) != "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f" {
		t.Fatal("bob.in-s missing or not keyed with the CK file's key")
	}
	// A bad field comes back with the server's message naming it.
	_, _, err = run("create", "--registration", "bob2", "--ck", "00", "--ik", "f0e1d2c3b4a5968778695a4b3c2d1e0f",
		"--security-client", "ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1;spi-s=2;port-c=3;port-s=4", "--ue", "198.51.100.7:31001",
		"--local", "192.0.2.1", "--port-c", "5063", "--port-s", "5065")
	if !api.IsStatus(err, 400) || !strings.Contains(err.Error(), "ck: need 16 bytes (IMS AKA), got 1") {
		t.Fatalf("bad ck: %v", err)
	}
	if _, _, err := run("create", "--ck", "00", "--ck-file", ckFile); err == nil || !errors.Is(err, errUsage) {
		t.Fatalf("--ck with --ck-file: %v", err)
	}
	out, _, err = run("show", "bob")
	if err != nil || strings.Count(out, "\n") != 4 || !strings.Contains(out, "bob.in-s\tin\t0x0000115c\tactive\tbinding 198.51.100.7:31000") {
		t.Fatalf("show printed %q: %v", out, err)
	}
	// A re-authentication over the CLI: binding and addresses taken over.
	out, _, err = run("create", "--registration", "bob-2", "--replaces", "bob", "--ck-file", ckFile, "--ik", "f0e1d2c3b4a5968778695a4b3c2d1e0f",
		"--security-client", "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=5555;spi-s=6666;port-c=5066;port-s=5064",
		"--local", "192.0.2.1", "--port-c", "5067", "--port-s", "5065", "--json")
	var re api.SecAgreeResponse
	if err != nil || json.Unmarshal([]byte(out), &re) != nil || len(re.SAs) != 4 || re.SAs[0].Binding != "198.51.100.7:31000" || re.SAs[0].Inner.Peer != "192.168.1.11/32" {
		t.Fatalf("create --replaces printed %q: %v", out, err)
	}
	if _, _, err := run("delete", "bob-2"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := run("show", "bob-2"); !api.IsStatus(err, 404) {
		t.Fatalf("show after delete: %v", err)
	}
	if _, _, err := run("delete", "bob", "--grace", "soon"); !errors.Is(err, errUsage) {
		t.Fatalf("bad --grace: %v", err)
	}
	out, _, err = run("delete", "bob", "--json", "--grace", "0s")
	if err != nil {
		t.Fatal(err)
	}
	var del api.RegistrationDeleted
	if err := json.Unmarshal([]byte(out), &del); err != nil || len(del.SAs) != 4 || del.Registration != "bob" {
		t.Fatalf("delete printed %q: %v", out, err)
	}
	if in, o := e.sad.Len(); in != 0 || o != 0 {
		t.Fatalf("SAD %d/%d after delete", in, o)
	}
	if _, _, err := run("delete", "bob"); !api.IsStatus(err, 404) {
		t.Fatalf("second delete: %v", err)
	}
	if _, _, err := run("frobnicate"); !errors.Is(err, errUsage) {
		t.Fatalf("unknown subcommand: %v", err)
	}
}
