package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The operator's view of lifetimes and rekeying through the running
// daemon: `xesp rekey` replaces a phone's SA pair and the phone talks
// through the new one (replies under the new outbound SPI); an SA added
// with a 1-second hard lifetime is removed by the daemon and
// `xesp events --wait` reports it; bad invocations fail with usage.
func TestCLIRekeyAndEvents(t *testing.T) {
	d := newDaemonTopo(t)
	d.start(t)
	cli := func(args ...string) (string, error) {
		out, err := xespCmd(nil, append(args, "--api", "unix:"+d.sock)...).CombinedOutput()
		return string(out), err
	}
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	ue1 := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 1024))
	talk(t, ue1, inner, "REGISTER before")
	ue1.Close()

	const newIn, newOut = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4", "c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4"
	file := filepath.Join(d.dir, "rekeyed.yaml")
	os.WriteFile(file, []byte("sas:\n"+saYAML("ue1-in-2", 0x1011, "in", newIn, 1)+saYAML("ue1-out-2", 0x2011, "out", newOut, 1)), 0o600)
	out, err := cli("rekey", "--old", "ue1-in,ue1-out", "--grace", "0s", file)
	if err != nil || !strings.Contains(out, "retired out:0x00002001") || !strings.Contains(out, "draining in:0x00001001") {
		t.Fatalf("xesp rekey: %v\n%s", err, out)
	}
	ue1 = d.newPhone(t, 4500, mustESP(t, 0x1011, newIn, 0), mustESP(t, 0x2011, newOut, 1024))
	talk(t, ue1, inner, "REGISTER after") // opened under 0x2011 or talk fails
	list, _ := cli("sa", "list")
	if strings.Contains(list, "0x00001001") || strings.Contains(list, "0x00002001") || !strings.Contains(list, "ue1-in-2") {
		t.Fatalf("sa list after the rekey:\n%s", list)
	}

	short := filepath.Join(d.dir, "short.yaml")
	os.WriteFile(short, []byte("sas:\n"+strings.Replace(saYAML("ue2-in", 0x1002, "in", runKeyIn, 2), "}}", "}, lifetime: {hard_seconds: 1}}", 1)), 0o600)
	if out, err := cli("sa", "add", short); err != nil {
		t.Fatalf("sa add: %v\n%s", err, out)
	}
	out, err = cli("events", "--wait", "10s")
	if err != nil || !strings.Contains(out, "hard in:0x00001002 ue2-in time reached") {
		t.Fatalf("xesp events: %v\n%s", err, out)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if list, _ := cli("sa", "list"); !strings.Contains(list, "ue2-in") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the expired SA is still listed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, args := range [][]string{{"rekey", file}, {"rekey", "--old", "x", "--grace", "-1s", file}, {"events", "--wait", "1h"}, {"events", "extra"}} {
		if out, err := cli(args...); err == nil {
			t.Errorf("xesp %s succeeded:\n%s", strings.Join(args, " "), out)
		} else if !strings.Contains(out, "usage") && !strings.Contains(out, "want") {
			t.Errorf("xesp %s: %s", strings.Join(args, " "), out)
		}
	}
}
