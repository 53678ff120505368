package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/lab/netns"
)

// Every operator mistake at start, run against the real binary: it exits
// non-zero with one line on stderr naming the config field and the fix,
// never a panic or a stack trace.
func TestStartErrors(t *testing.T) {
	d := newDaemonTopo(t)
	base, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	dummy := netns.UniqueName("br")
	d.gw.MustRun("ip", "link", "add", dummy, "type", "bridge")
	d.gw.MustRun("ip", "link", "set", dummy, "up")
	stateFile := filepath.Join(d.dir, "not-a-dir")
	if err := os.WriteFile(stateFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(d.dir, "state")
	cases := []struct {
		name string
		edit func(string) string
		want []string
	}{
		{"misspelt interface", func(c string) string {
			return strings.Replace(c, "interface: "+d.pubIf, "interface: "+d.pubIf+"x", 1)
		}, []string{`public.interface: "` + d.pubIf + `x": no such network interface`, "fix public.interface"}},
		{"private interface", func(c string) string {
			return strings.Replace(c, "interface: "+d.privIf, "interface: nosuch0", 1)
		}, []string{`private.interface: "nosuch0": no such network interface`}},
		{"state_dir is a file", func(c string) string {
			return strings.Replace(c, "state_dir: "+stateDir, "state_dir: "+stateFile, 1)
		}, []string{"state_dir " + stateFile + ":", "must be a directory"}},
		{"api socket in a missing directory", func(c string) string {
			return strings.Replace(c, "api: {unix: "+d.sock, "api: {unix: "+d.dir+"/missing/api.sock", 1)
		}, []string{"api.unix: " + d.dir + "/missing/api.sock: directory " + d.dir + "/missing does not exist", "create it or change api.unix"}},
		{"no native xdp", func(c string) string {
			return strings.Replace(c, "interface: "+d.pubIf, "interface: "+dummy, 1)
		}, []string{"xdp_mode: native:", "set xdp_mode: generic"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "xesp.yaml")
			if err := os.WriteFile(cfg, []byte(c.edit(string(base))), 0o600); err != nil {
				t.Fatal(err)
			}
			checkStartError(t, d, cfg, c.want)
		})
	}

	// A second daemon on the same pins while the first runs.
	t.Run("busy pin directory", func(t *testing.T) {
		// `ip netns exec` gives each process its own /sys and so its own
		// /sys/fs/bpf; a bpffs mounted here first is the one both
		// daemons see, as on a host where they share /sys/fs/bpf.
		bpffs := t.TempDir()
		if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH) })
		pins := regexp.MustCompile(`pin_dir: \S+`).ReplaceAllString(string(base), "pin_dir: "+bpffs+"/xesp")
		if err := os.WriteFile(d.cfg, []byte(pins), 0o600); err != nil {
			t.Fatal(err)
		}
		first := d.start(t)
		cfg := filepath.Join(t.TempDir(), "xesp.yaml")
		other := strings.Replace(pins, "state_dir: "+stateDir, "state_dir: "+filepath.Join(d.dir, "state2"), 1)
		other = strings.Replace(other, "api: {unix: "+d.sock, "api: {unix: "+d.sock+"2", 1)
		if err := os.WriteFile(cfg, []byte(other), 0o600); err != nil {
			t.Fatal(err)
		}
		checkStartError(t, d, cfg, []string{"pin_dir ", "is in use by xesp pid", "stop it first", "or give this one another pin_dir"})
		select {
		case <-first.exited:
			t.Fatalf("the first daemon died: %v\n%s", first.err, first.logs)
		default:
		}
	})
}

func checkStartError(t *testing.T, d *daemonTopo, cfg string, want []string) {
	t.Helper()
	cmd := xespCmd(d.gw, "run", "--config", cfg)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil || cmd.ProcessState.ExitCode() != 1 {
		t.Fatalf("exit %v, want status 1\n%s", err, stderr.String())
	}
	msg := strings.TrimRight(stderr.String(), "\n")
	if strings.Contains(msg, "\n") || strings.Contains(msg, "panic") || strings.Contains(msg, "goroutine") {
		t.Fatalf("want one line, got:\n%s", msg)
	}
	if !strings.HasPrefix(msg, "xesp run: ") {
		t.Errorf("%q: not the CLI's error line", msg)
	}
	for _, w := range want {
		if !strings.Contains(msg, w) {
			t.Errorf("%q\nlacks %q", msg, w)
		}
	}
}
