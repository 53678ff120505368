package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/lab/testpki"
)

const (
	cliToken     = "cli-token-0123456789abcdef"
	cliReadToken = "cli-read-token-0123456789"
)

// cliDP is a data path with fixed figures; counters derive from the SPI.
type cliDP struct{}

func (cliDP) Synced(context.Context, uint64) error { return nil }

func (cliDP) SACounters(id sa.ID) (api.SACounters, bool) {
	if id.SPI == 0x2002 {
		return api.SACounters{}, false
	}
	c := api.SACounters{Packets: uint64(id.SPI & 0xffff), Bytes: uint64(id.SPI&0xffff) * 10, Drops: 1, Seq: 42}
	if id.Dir == sa.In {
		// Seen an hour and a half ago, a keepalive 20 s ago: the later wins.
		seen, ka := time.Now().Add(-90*time.Minute), time.Now().Add(-20*time.Second-300*time.Millisecond)
		c.LastSeen, c.LastKeepalive = &seen, &ka
	}
	return c, true
}

func (cliDP) Stats() api.Stats {
	return api.Stats{
		In:             api.DirStats{Packets: 1000, Bytes: 150000, Drops: map[string]uint64{"replay": 4, "integ_error": 2}},
		Out:            api.DirStats{Packets: 900, Bytes: 140000, Drops: map[string]uint64{"tx_full": 1}},
		XDP:            map[string]uint64{"redirect_esp_udp": 1006, "drop_no_sa": 9},
		BindingChanges: 5,
		Workers:        []api.WorkerStats{{Worker: 0, DecapPackets: 600, EncapPackets: 500, Drops: 4, BindingChanges: 3}, {Worker: 1, DecapPackets: 400, EncapPackets: 400, Drops: 3, BindingChanges: 2}},
	}
}

func (cliDP) Health() api.Health { return api.Health{OK: true, Workers: 2} }

type cliEnv struct {
	sad       *sad.SAD
	unix, tcp string
	dir       string
	ca        *testpki.CA
	client    testpki.Pair
}

func newCLIEnv(t *testing.T) *cliEnv {
	dir, err := os.MkdirTemp("", "xcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d, err := sad.New(sad.Options{Workers: 2, LogSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	lt, err := lifetime.New(lifetime.Options{SAD: d, Usage: func(sa.ID) (lifetime.Usage, bool) { return lifetime.Usage{}, false }})
	if err != nil {
		t.Fatal(err)
	}
	// TCP is served as a deployment serves it: TLS with client
	// certificates (mTLS) and an admin and a read-only token. The CLI
	// finds the CA and its certificate in the environment.
	ca := testpki.New(t, dir, "api")
	srvPair, cliPair := ca.Server(t, "server", "127.0.0.1"), ca.Client(t, "operator")
	t.Setenv("XESP_CA", ca.Path)
	t.Setenv("XESP_CERT", cliPair.CertPath)
	t.Setenv("XESP_KEY", cliPair.KeyPath)
	srv, err := api.New(api.Options{SAD: d, DataPath: cliDP{}, Events: lt, API: config.API{Unix: sock, TCP: "127.0.0.1:0",
		BearerToken: sa.Secret(cliToken), ReadBearerToken: sa.Secret(cliReadToken),
		TLS: &config.APITLS{CertPath: srvPair.CertPath, KeyPath: srvPair.KeyPath, ClientCAPath: ca.Path}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return &cliEnv{sad: d, unix: "unix:" + sock, tcp: "https://" + srv.TCPAddr().String(), dir: dir, ca: ca, client: cliPair}
}

// run runs a CLI command in-process, as main would dispatch it.
func cliRun(t *testing.T, cmd string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var o, e bytes.Buffer
	switch cmd {
	case "sa":
		err = runSA(args, &o, &e)
	case "stats":
		err = runStats(args, &o, &e)
	case "events":
		err = runEvents(args, &o, &e)
	default:
		t.Fatalf("unknown command %s", cmd)
	}
	return o.String(), e.String(), err
}

const cliEncKey1 = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4"
const cliEncKey2 = "c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4"

func cliWriteSAFile(t *testing.T, dir string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "keys"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "keys", "ue1-out.hex"), []byte(cliEncKey2+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	doc := `sas:
  - name: ue1-in
    spi: 0x00002001
    direction: in
    mode: tunnel
    proposal: aes128gcm16
    enc_key: ` + cliEncKey1 + `
    local: 198.51.100.20
    peer: 192.0.2.10
    encap: {peer_port: 31000}
    inner: {local: 10.0.0.0/24, peer: 100.64.0.1}
  - name: ue1-out
    spi: 0xc0002001
    direction: out
    mode: tunnel
    proposal: aes128gcm16
    enc_key_file: keys/ue1-out.hex
    local: 198.51.100.20
    peer: 192.0.2.10
    encap: {peer_port: 31000}
    inner: {local: 10.0.0.0/24, peer: 100.64.0.1}
  - spi: 0x2002
    direction: in
    mode: tunnel
    proposal: null-sha1
    auth_key: ` + strings.Repeat("5a", 20) + `
    local: 198.51.100.20
    peer: 192.0.2.11
    inner: {local: 10.0.0.0/24, peer: 100.64.0.2}
`
	path := filepath.Join(dir, "phones.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCLISA(t *testing.T) {
	e := newCLIEnv(t)
	file := cliWriteSAFile(t, e.dir)

	out, _, err := cliRun(t, "sa", "add", file, "--api", e.unix)
	if err != nil {
		t.Fatal(err)
	}
	want := `added sa "ue1-in" in:0x00002001 (worker 0, index 0)
added sa "ue1-out" out:0xc0002001@192.0.2.10:31000 (worker 0, index 1)
added sa 0x00002002 in:0x00002002 (worker 1, index 0)
`
	if out != want {
		t.Fatalf("sa add:\n%s\nwant\n%s", out, want)
	}
	// The key file was read by the CLI and its key reached the SAD.
	ent, ok := e.sad.GetName("ue1-out")
	if !ok || ent.SA.WithKeys().EncKey != cliEncKey2 {
		t.Fatal("ue1-out not in the SAD with the key file's key")
	}

	out, _, err = cliRun(t, "sa", "list", "--api", e.unix)
	if err != nil {
		t.Fatal(err)
	}
	want = `NAME     SPI         DIR  PROPOSAL     MODE    BINDING           CORE  WORKER  PACKETS  BYTES  DROPS  LAST SEEN
ue1-in   0x00002001  in   aes128gcm16  tunnel  192.0.2.10:31000  -     0       8193     81930  1      20s ago (keepalive)
ue1-out  0xc0002001  out  aes128gcm16  tunnel  192.0.2.10:31000  -     0       8193     81930  1      -
-        0x00002002  in   null-sha1    tunnel  192.0.2.11:0      -     1       -        -      -      -
`
	if out != want {
		t.Fatalf("sa list:\n%s\nwant\n%s", out, want)
	}

	t.Setenv("XESP_API", e.unix) // the environment names the API from here on
	out, _, err = cliRun(t, "sa", "list", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var views []api.SAView
	if err := json.Unmarshal([]byte(out), &views); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	if len(views) != 3 || views[1].Ref != "out:0xc0002001@192.0.2.10:31000" || views[2].Counters != nil || views[0].Counters.Seq != 42 {
		t.Fatalf("list --json: %+v", views)
	}

	out, _, err = cliRun(t, "sa", "show", "ue1-in")
	if err != nil {
		t.Fatal(err)
	}
	created := ent.Created.UTC().Format("2006-01-02T15:04:05Z07:00")
	want = `name:          ue1-in
ref:           in:0x00002001
spi:           0x00002001
direction:     in
mode:          tunnel
proposal:      aes128gcm16
esn:           false
replay window: 1024
local:         198.51.100.20
peer:          192.0.2.10
encap:         udp 4500 -> 31000
binding:       192.0.2.10:31000
inner:         10.0.0.0/24 <-> 100.64.0.1/32
worker:        0 (index 0)
state:         active
created:       ` + created + `
counters:      8193 packets, 81930 bytes, 1 drops, seq 42
last seen:     20s ago (keepalive)
`
	if out != want {
		t.Fatalf("sa show:\n%s\nwant\n%s", out, want)
	}
	out, _, err = cliRun(t, "sa", "show", "--json", "in:0x2002")
	var v api.SAView
	if err != nil || json.Unmarshal([]byte(out), &v) != nil || v.Proposal != "null-sha1" || v.Counters != nil {
		t.Fatalf("show --json: %v %s", err, out)
	}

	// Keys never come back through any command.
	for _, args := range [][]string{{"list"}, {"list", "--json"}, {"show", "ue1-out", "--json"}, {"show", "ue1-in"}} {
		out, _, _ := cliRun(t, "sa", args...)
		for _, k := range []string{cliEncKey1[:16], cliEncKey2[:16], strings.Repeat("5a", 8)} {
			if strings.Contains(out, k) {
				t.Fatalf("sa %v prints key material:\n%s", args, out)
			}
		}
	}

	// Adding again: every SA fails, each with the server's message.
	_, stderr, err := cliRun(t, "sa", "add", file)
	if err == nil || err.Error() != "3 of 3 SAs not added" || errors.Is(err, errUsage) {
		t.Fatalf("re-add: %v", err)
	}
	if want := `sa "ue1-in": already exists: inbound SPI 0x00002001 is used by sa "ue1-in" (the XDP SA map is keyed by SPI alone)`; !strings.HasPrefix(stderr, want+"\n") {
		t.Fatalf("re-add stderr:\n%s", stderr)
	}

	// Delete: flags may follow the references; one failure is the
	// server's message itself.
	// "delete" is the same command as "del" (as for secagree).
	out, _, err = cliRun(t, "sa", "del", "ue1-in", "--api", e.unix)
	if err != nil || out != "deleted \"ue1-in\" in:0x00002001\n" {
		t.Fatalf("sa del: %v\n%s", err, out)
	}
	out, _, err = cliRun(t, "sa", "delete", "out:0xc0002001@192.0.2.10:31000", "--api", e.unix)
	if err != nil || out != "deleted \"ue1-out\" out:0xc0002001@192.0.2.10:31000\n" {
		t.Fatalf("sa delete: %v\n%s", err, out)
	}
	_, _, err = cliRun(t, "sa", "del", "ue1-in")
	if err == nil || err.Error() != `sa "ue1-in": no such SA` || errors.Is(err, errUsage) {
		t.Fatalf("del missing: %v", err)
	}
	if in, outN := e.sad.Len(); in != 1 || outN != 0 {
		t.Fatalf("SAD holds %d/%d", in, outN)
	}
}

// With no lifetime events, events and events --follow say so (on stderr,
// so stdout stays one line per event) instead of printing nothing.
func TestCLIEventsNone(t *testing.T) {
	e := newCLIEnv(t)
	out, stderr, err := cliRun(t, "events", "--api", e.unix)
	if err != nil || out != "" || stderr != "no lifetime events (after 0)\n" {
		t.Fatalf("events: %v, stdout %q, stderr %q", err, out, stderr)
	}
	// --follow runs until stopped: run it as main would, with its
	// streams, and stop it once it has said there is nothing yet.
	r, w := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- runEvents([]string{"--follow", "--api", e.unix}, io.Discard, w); w.Close() }()
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil || line != "no lifetime events yet (after 0); waiting for more (Ctrl-C to stop)\n" {
		t.Fatalf("events --follow: %q, %v", line, err)
	}
	go io.Copy(io.Discard, r)
}

func TestCLIStats(t *testing.T) {
	e := newCLIEnv(t)
	if _, _, err := cliRun(t, "sa", "add", cliWriteSAFile(t, e.dir), "--api", e.unix); err != nil {
		t.Fatal(err)
	}
	// Over TCP with the token from a file, then from the environment.
	tokFile := filepath.Join(e.dir, "token")
	if err := os.WriteFile(tokFile, []byte(cliToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := cliRun(t, "stats", "--api", e.tcp, "--token-file", tokFile)
	if err != nil {
		t.Fatal(err)
	}
	want := `    direction  ok packets  ok bytes  dropped
   in (decap)        1000    150000        6
  out (encap)         900    140000        1

drops by reason:
  in   integ_error  2
  in   replay       4
  out  tx_full      1

XDP verdicts:
  drop_no_sa        9
  redirect_esp_udp  1006

SAs: 2 in, 1 out
binding changes: 5

  worker  SAs  decap  encap  drops  binding changes
       0    2    600    500      4                3
       1    1    400    400      3                2
`
	if out != want {
		t.Fatalf("stats:\n%s\nwant\n%s", out, want)
	}
	t.Setenv("XESP_TOKEN", cliToken)
	out, _, err = cliRun(t, "stats", "--json", "--api", e.tcp)
	var st api.Stats
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.SAs != (api.SACount{In: 2, Out: 1}) || st.XDP["redirect_esp_udp"] != 1006 {
		t.Fatalf("stats --json: %v %s", err, out)
	}
	// A wrong token is the server's 401 message, exit 1 not 2.
	_, _, err = cliRun(t, "stats", "--api", e.tcp, "--token", "not-the-token-at-all")
	if err == nil || err.Error() != "authorization: invalid bearer token" || errors.Is(err, errUsage) {
		t.Fatalf("wrong token: %v", err)
	}
}

func TestCLIUsage(t *testing.T) {
	e := newCLIEnv(t)
	bad := filepath.Join(e.dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("spi: 0x3001\ndirection: in\nmode: transport\nproposal: aes128gcm16\nenc_key_file: keys/none\nlocal: 192.0.2.1\npeer: 192.0.2.2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		cmd   string
		args  []string
		usage bool
		msg   string
	}{
		{"sa", nil, true, "usage: missing subcommand"},
		{"sa", []string{"frob"}, true, `usage: unknown subcommand "frob": use add, import, del, list or show`},
		{"sa", []string{"add"}, true, "usage: wrong arguments for sa add (run xesp sa -h)"},
		{"sa", []string{"show", "a", "b"}, true, "usage: wrong arguments for sa show (run xesp sa -h)"},
		{"sa", []string{"list", "--bogus"}, true, "usage: flag provided but not defined: -bogus"},
		{"sa", []string{"list", "--api", "ftp://x"}, true, `usage: api address "ftp://x": want unix:/path or https://host:port`},
		{"sa", []string{"list", "--api", e.tcp}, true, "usage: api address " + e.tcp + ": TCP needs a bearer token (--token, --token-file or XESP_TOKEN)"},
		{"sa", []string{"list", "--api", e.tcp, "--token", "x", "--token-file", "y"}, true, "usage: give --token or --token-file, not both"},
		{"stats", []string{"extra"}, true, `usage: unexpected arguments ["extra"]`},
		// Not usage: the file's own problem, found before anything is sent.
		{"sa", []string{"add", bad, "--api", e.unix}, false, bad + `: sa 0x00003001: enc_key_file: key file: open ` + filepath.Join(e.dir, "keys/none") + `: no such file or directory`},
		{"sa", []string{"show", "bad ref", "--api", e.unix}, false, `ref "bad ref": not an SA name (1..64 of A-Z a-z 0-9 . _ - starting with a letter), in:SPI or out:SPI[@peer[:port]]`},
	}
	for _, c := range cases {
		_, _, err := cliRun(t, c.cmd, c.args...)
		if err == nil || err.Error() != c.msg || errors.Is(err, errUsage) != c.usage {
			t.Errorf("%s %q: %v (usage %v), want %q (usage %v)", c.cmd, c.args, err, errors.Is(err, errUsage), c.msg, c.usage)
		}
	}
	if in, out := e.sad.Len(); in+out != 0 {
		t.Fatalf("SAD holds %d SAs after failed commands", in+out)
	}
}

// TestCLISAImport: `xesp sa import` sends a JSON-lines file in batches
// over mTLS; a batch with a bad item is refused whole, the error naming
// the file's SA and field, and the batches before it stay.
func TestCLISAImport(t *testing.T) {
	e := newCLIEnv(t)
	var lines []string
	for i := range 25 {
		for _, dir := range []string{"in", "out"} {
			spi := 0x10000 + i
			if dir == "out" {
				spi += 0x10000
			}
			lines = append(lines, fmt.Sprintf(`{"spi": %d, "direction": %q, "mode": "tunnel", "proposal": "aes128gcm16", "enc_key": "%040x", "local": "198.51.100.20", "peer": "192.0.2.10", "encap": {"peer_port": %d}, "inner": {"local": "10.0.0.0/24", "peer": "100.64.1.%d"}}`,
				spi, dir, 1000+i, 20000+i, i))
		}
	}
	path := filepath.Join(e.dir, "phones.jsonl")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := cliRun(t, "sa", "import", "--batch", "8", path, "--api", e.tcp, "--token", cliToken)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "imported 50 SAs in 7 batches in ") {
		t.Errorf("sa import: %q", out)
	}
	if in, o := e.sad.Len(); in != 25 || o != 25 {
		t.Fatalf("SAD holds %d in, %d out; want 25, 25", in, o)
	}

	// Items 8..15 of a second file are the second batch; item 12 is bad
	// by the gateway's rules (an SA already held), refused by the server.
	var more []string
	for i := range 20 {
		more = append(more, strings.NewReplacer(`"spi": 6`, `"spi": 9`, `"spi": 13`, `"spi": 16`, `"peer": "100.64.1.`, `"peer": "100.64.2.`).Replace(lines[i]))
	}
	more[12] = lines[0]
	path2 := filepath.Join(e.dir, "more.jsonl")
	if err := os.WriteFile(path2, []byte(strings.Join(more, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = cliRun(t, "sa", "import", "--batch", "8", "--parallel", "1", path2, "--api", e.unix)
	if err == nil || !strings.Contains(err.Error(), "batch of SAs 8..15") || !strings.Contains(err.Error(), "import stopped: 8 of 20 SAs added") || !strings.Contains(err.Error(), "[4]: sa 0x00010000: in 0x00010000: already exists") {
		t.Fatalf("bad batch: %v", err)
	}
	if in, o := e.sad.Len(); in != 29 || o != 29 {
		t.Errorf("after the refused batch the SAD holds %d in, %d out; want 29, 29 (the first batch of 8 added)", in, o)
	}
}
