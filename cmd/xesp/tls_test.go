package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/lab/testpki"
)

// The CLI over the API's TLS listener: it verifies the server against
// --ca/$XESP_CA, presents --cert/--key for mTLS, and the read-only token
// reads but cannot change anything. curl, a client xesp did not write,
// gets the same answers.
func TestCLIOverTLS(t *testing.T) {
	e := newCLIEnv(t)
	sas := cliWriteSAFile(t, e.dir)
	if _, _, err := cliRun(t, "sa", "add", sas, "--api", e.tcp, "--token", cliToken); err != nil {
		t.Fatalf("admin add over mTLS: %v", err)
	}
	out, _, err := cliRun(t, "sa", "list", "--api", e.tcp, "--token", cliReadToken)
	if err != nil || !strings.Contains(out, "ue1-in") || strings.Contains(out, cliEncKey1) {
		t.Fatalf("read-only list: %v\n%s", err, out)
	}
	_, _, err = cliRun(t, "sa", "del", "ue1-in", "--api", e.tcp, "--token", cliReadToken)
	if !api.IsStatus(err, 403) || !strings.Contains(err.Error(), "read-only token cannot DELETE") {
		t.Fatalf("read-only delete: %v", err)
	}
	if _, ok := e.sad.GetName("ue1-in"); !ok {
		t.Fatal("the read-only token deleted an SA")
	}

	// Without a client certificate the handshake fails.
	t.Setenv("XESP_CERT", "")
	t.Setenv("XESP_KEY", "")
	_, _, err = cliRun(t, "stats", "--api", e.tcp, "--token", cliToken)
	if err == nil || errors.Is(err, errUsage) || !strings.Contains(err.Error(), "certificate required") {
		t.Fatalf("no client certificate: %v", err)
	}
	// A server certificate from another CA is not trusted.
	other := testpki.New(t, t.TempDir(), "other")
	_, _, err = cliRun(t, "stats", "--api", e.tcp, "--token", cliToken, "--ca", other.Path, "--cert", e.client.CertPath, "--key", e.client.KeyPath)
	if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
		t.Fatalf("untrusted server: %v", err)
	}
	// A client key others can read is refused before dialing.
	loose := filepath.Join(e.dir, "loose.key")
	b, _ := os.ReadFile(e.client.KeyPath)
	os.WriteFile(loose, b, 0o644)
	os.Chmod(loose, 0o644)
	_, _, err = cliRun(t, "stats", "--api", e.tcp, "--token", cliToken, "--cert", e.client.CertPath, "--key", loose)
	if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("loose client key: %v", err)
	}
	// TLS flags on a plain address are a usage error.
	_, _, err = cliRun(t, "stats", "--api", e.unix, "--ca", e.ca.Path)
	if !errors.Is(err, errUsage) {
		t.Fatalf("--ca on unix: %v", err)
	}

	// curl: with the client certificate and the token it reads the SA;
	// without the certificate the TLS handshake is refused.
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatalf("curl not installed: %v", err)
	}
	curl := func(args ...string) (string, error) {
		c := exec.Command("curl", append([]string{"-sS", "--max-time", "5", "--cacert", e.ca.Path}, args...)...)
		b, err := c.CombinedOutput()
		return string(b), err
	}
	body, err := curl("--cert", e.client.CertPath, "--key", e.client.KeyPath, "-H", "Authorization: Bearer "+cliReadToken, e.tcp+"/v1/sas/ue1-in")
	if err != nil || !strings.Contains(body, `"name":"ue1-in"`) || strings.Contains(body, cliEncKey1) {
		t.Fatalf("curl over mTLS: %v\n%s", err, body)
	}
	body, err = curl("--cert", e.client.CertPath, "--key", e.client.KeyPath, "-H", "Authorization: Bearer "+cliReadToken, "-X", "DELETE", e.tcp+"/v1/sas/ue1-in")
	if err != nil || !strings.Contains(body, "read-only token cannot DELETE") {
		t.Fatalf("curl delete with the read token: %v\n%s", err, body)
	}
	body, err = curl("-H", "Authorization: Bearer "+cliToken, e.tcp+"/v1/stats")
	if err == nil {
		t.Fatalf("curl without a client certificate was served:\n%s", body)
	}
	body, err = curl("--tls-max", "1.1", "--cert", e.client.CertPath, "--key", e.client.KeyPath, "-H", "Authorization: Bearer "+cliToken, e.tcp+"/v1/stats")
	if err == nil {
		t.Fatalf("curl with TLS 1.1 was served:\n%s", body)
	}
	t.Logf("curl refused without client certificate and with TLS 1.1, as it should")
}
