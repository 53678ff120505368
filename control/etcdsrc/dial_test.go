package etcdsrc

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/lab/etcdtest"
)

// etcd's own authentication on top of TLS: with auth enabled, the
// gateway's user and password (from a 0600 file, as the config reads it)
// may read its prefix; a wrong password is refused; the client
// certificate alone (its CN names no user) gets no access.
func TestDialUserPassword(t *testing.T) {
	srv := etcdtest.StartTLS(t)
	ctl := func(args ...string) {
		t.Helper()
		base := []string{"--endpoints", srv.Endpoint(), "--cacert", srv.CA.Path, "--cert", srv.ClientCert.CertPath,
			"--key", srv.ClientCert.KeyPath, "--dial-timeout", "3s"}
		out, err := exec.Command("etcdctl", append(base, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("etcdctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ctl("user", "add", "root", "--new-user-password=root-secret-1")
	ctl("role", "add", "gateway")
	ctl("role", "grant-permission", "gateway", "--prefix=true", "readwrite", prefix+"/")
	ctl("user", "add", "gw-a", "--new-user-password=gw-a-secret-1")
	ctl("user", "grant-role", "gw-a", "gateway")
	ctl("auth", "enable")

	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("good.pw", "gw-a-secret-1\n")
	write("bad.pw", "not-the-password\n")
	write("kek", strings.TrimSpace(kekA)+"\n")
	load := func(pwFile string) *config.Etcd {
		t.Helper()
		e := &config.Etcd{Endpoints: []string{srv.Endpoint()}, Node: "gw-a", Prefix: prefix, KEKFile: "kek",
			TLS: &config.EtcdTLS{CA: srv.CA.Path, Cert: srv.ClientCert.CertPath, Key: srv.ClientCert.KeyPath}}
		if pwFile != "" {
			e.Username, e.PasswordFile = "gw-a", pwFile
		}
		c := config.Config{Etcd: e, Path: filepath.Join(dir, "xesp.yaml")}
		if err := c.CheckEtcd(); err != nil {
			t.Fatal(err)
		}
		return e
	}
	try := func(e *config.Etcd) error {
		cli, err := Dial(e, DialOptions{})
		if err != nil {
			return err
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		_, err = cli.Put(ctx, prefix+"/probe", "x")
		if err == nil {
			_, err = cli.Get(ctx, prefix+"/", clientv3.WithPrefix())
		}
		return err
	}
	if err := try(load("good.pw")); err != nil {
		t.Fatalf("gw-a with its password: %v", err)
	}
	if err := try(load("bad.pw")); err == nil || !strings.Contains(err.Error(), "authentication failed") {
		t.Fatalf("wrong password: %v", err)
	}
	if err := try(load("")); err == nil || !strings.Contains(err.Error(), "permission denied") && !strings.Contains(err.Error(), "user name") {
		t.Fatalf("certificate without a user: %v", err)
	}
	// A password file others can read is refused by the config.
	loose := write("loose.pw", "gw-a-secret-1\n")
	os.Chmod(loose, 0o644)
	e := &config.Etcd{Endpoints: []string{srv.Endpoint()}, Node: "gw-a", Prefix: prefix, Insecure: true, Username: "gw-a", PasswordFile: loose}
	if err := (&config.Config{Etcd: e}).CheckEtcd(); err == nil || !strings.Contains(err.Error(), "etcd.password_file") || strings.Contains(err.Error(), "gw-a-secret") {
		t.Fatalf("loose password file: %v", err)
	}
}
