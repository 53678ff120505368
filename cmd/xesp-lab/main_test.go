package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/xesp/xesp/lab/netns"
)

// TestMain lets the test binary stand in for the xesp-lab binary: the phone
// tests start it as a separate process inside a namespace.
func TestMain(m *testing.M) {
	if os.Getenv("XESP_TEST_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	code := m.Run()
	if daemonDir != "" {
		os.RemoveAll(daemonDir)
	}
	os.Exit(code)
}

// labCmd is xesp-lab (this test binary in disguise) run in ns, or on the
// host when ns is nil.
func labCmd(ns *netns.NS, args ...string) *exec.Cmd {
	var c *exec.Cmd
	if ns == nil {
		c = exec.Command(os.Args[0], args...)
	} else {
		c = ns.Command(os.Args[0], args...)
	}
	c.Env = append(os.Environ(), "XESP_TEST_AS_MAIN=1")
	return c
}

var (
	daemonOnce sync.Once
	daemonDir  string
	daemonBin  string
	daemonErr  error
)

// xespCmd is the operator's binary (cmd/xesp), built once per test run:
// the phone's control API is driven with the same `xesp sa` client an
// operator uses on the gateway.
func xespCmd(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	daemonOnce.Do(func() {
		if daemonDir, daemonErr = os.MkdirTemp("", "xesp-bin-"); daemonErr != nil {
			return
		}
		daemonBin = filepath.Join(daemonDir, "xesp")
		out, err := exec.Command("go", "build", "-o", daemonBin, "../xesp").CombinedOutput()
		if err != nil {
			daemonErr = &buildError{err: err, out: string(out)}
		}
	})
	if daemonErr != nil {
		t.Fatalf("building cmd/xesp: %v", daemonErr)
	}
	return exec.Command(daemonBin, args...)
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// The keys of the gateway-view SA pair the phone tests use.
const (
	runKeyIn  = "606162636465666768696a6b6c6d6e6f70717273"
	runKeyOut = "808182838485868788898a8b8c8d8e8f90919293"
)
