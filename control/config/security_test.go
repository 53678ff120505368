package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/lab/testpki"
)

// Files holding secrets: token, TLS key, KEK and etcd password files that
// group or others can read stop the start; SA key files, SA files and a
// config with inline keys only draw a warning (the examples ship 0644).
func TestSecretFilePermissions(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.New(t, dir, "api")
	srv := ca.Server(t, "srv", "127.0.0.1")
	writeFile(t, dir, "admin.token", "admin-token-0123456789\n")
	writeFile(t, dir, "read.token", "read-token-0123456789\n")
	writeFile(t, dir, "kek", "k1 "+strings.Repeat("ab", 32)+"\n")
	writeFile(t, dir, "keys/ue1.hex", key20+"\n")
	good := minimal + `api:
  tcp: 0.0.0.0:9443
  tls: {cert: ` + srv.CertPath + `, key: ` + srv.KeyPath + `, client_ca: ` + ca.Path + `}
  token_file: admin.token
  read_token_file: read.token
etcd: {endpoints: ['https://10.0.0.1:2379'], node: gw-a, kek_file: kek}
sas:
  - {name: ue1-in, spi: 0x1001, direction: in, mode: transport, proposal: aes128gcm16, enc_key_file: keys/ue1.hex, local: 198.51.100.20, peer: 192.0.2.1, inner: {local: 10.0.0.1, core: 100.64.0.10}}
`
	path := writeFile(t, dir, "xesp.yaml", good)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(c.API.ReadBearerToken) != "read-token-0123456789" || c.API.TLS.ClientCAPath != ca.Path || c.Etcd.KEK == nil || c.Etcd.KEK.Current() != "k1" {
		t.Fatalf("parsed: %+v %+v", c.API, c.Etcd)
	}
	if len(c.Warnings) != 0 {
		t.Fatalf("warnings with every file 0600: %v", c.Warnings)
	}
	out, _ := c.Effective()
	if strings.Contains(string(out), "admin-token") || strings.Contains(string(out), "read-token") {
		t.Fatalf("effective config holds a token:\n%s", out)
	}

	// Loose modes: refused for secrets the daemon alone needs...
	for _, f := range []struct{ name, field string }{
		{"admin.token", "api.token_file"}, {"read.token", "api.read_token_file"}, {"kek", "etcd.kek_file"}, {srv.KeyPath, "api.tls"},
	} {
		p := f.name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		os.Chmod(p, 0o644)
		_, err := Load(path)
		if err == nil || !strings.Contains(err.Error(), f.field+": ") || !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("%s 0644: %v", f.name, err)
		}
		os.Chmod(p, 0o600)
	}
	// ...a warning for SA key material.
	os.Chmod(filepath.Join(dir, "keys/ue1.hex"), 0o644)
	c, err = Load(path)
	if err != nil || len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "sas[0] key file") || !strings.Contains(c.Warnings[0], "mode 0644") {
		t.Fatalf("loose key file: %v %q", err, c.Warnings)
	}

	// Transport rules.
	for _, tc := range []struct{ api, want string }{
		{"{tcp: '127.0.0.1:9443', insecure: true, token: 0123456789abcdef0}", ""},
		{"{tcp: 'localhost:9443', insecure: true, token: 0123456789abcdef0}", ""},
		{"{tcp: '10.0.0.1:9443', insecure: true, token: 0123456789abcdef0}", "api.insecure: 10.0.0.1:9443 is not a loopback address"},
		{"{tcp: ':9443', tls: {cert: " + srv.CertPath + "}, token: 0123456789abcdef0}", "api.tls: cert and key are both required"},
		{"{tcp: ':9443', tls: {cert: " + srv.CertPath + ", key: " + srv.KeyPath + "}, insecure: true, token: 0123456789abcdef0}", "api.insecure: set together with api.tls"},
		{"{tcp: ':9443', tls: {cert: " + srv.KeyPath + ", key: " + srv.KeyPath + "}, token: 0123456789abcdef0}", "api.tls: " + srv.KeyPath},
		{"{tcp: ':9443', tls: {cert: " + srv.CertPath + ", key: " + srv.KeyPath + ", client_ca: " + srv.KeyPath + "}, token: 0123456789abcdef0}", "api.tls.client_ca: " + srv.KeyPath + ": no PEM certificate"},
		{"{tcp: '127.0.0.1:1', insecure: true, token: 0123456789abcdef0, read_token: 0123456789abcdef0}", "api.read_token: equals the admin token"},
		{"{tcp: '127.0.0.1:1', insecure: true, token: 0123456789abcdef0, max_conns: 0}", "api.max_conns: must be 1..65536, got 0"},
		{"{tcp: '127.0.0.1:1', insecure: true, token: 0123456789abcdef0, max_conns: 4, max_conns_per_source: 5}", "api.max_conns_per_source: must be 1..api.max_conns (4), got 5"},
		{"{tls: {cert: a, key: b}}", "api.tls: set but api.tcp is not"},
	} {
		_, err := Parse([]byte(minimal+"api: "+tc.api+"\n"), "x.yaml")
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.api, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: got %v, want %q", tc.api, err, tc.want)
		case err != nil && strings.Contains(err.Error(), "PRIVATE KEY"):
			t.Errorf("error quotes a key file: %v", err)
		}
	}
}
