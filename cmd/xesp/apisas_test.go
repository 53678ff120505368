package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/control/sa"
)

// apiSpec is an SA pair member as an API client sends it: configured peer
// port 4500, so a phone elsewhere is reached only through a learnt binding.
func apiSpec(t *testing.T, name string, spi uint32, dir, key string, inner int) sa.Spec {
	t.Helper()
	sas, err := sa.ParseBytes([]byte(saYAML(name, spi, dir, key, inner)), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sp := sas[0].Public()
	sp.EncKey = key
	return sp
}

// SAs added through the control API survive kill -9 (issue 7): the daemon
// writes them to state_dir (0600) before it answers, restores them at the
// next start before the first sync and does not prune them from the
// adopted maps. A phone behind a NAT port other than the configured one
// learnt its binding before the crash; after the restart the API lists its
// SAs with that binding, and it talks through them. An SA added right
// before the kill is back, one deleted right before it is not.
func TestRunDaemonKill9KeepsAPISAs(t *testing.T) {
	d := newDaemonTopo(t)
	dm := d.start(t)
	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for _, sp := range []sa.Spec{
		apiSpec(t, "ue2-in", 0x1002, "in", runKeyIn, 2),
		apiSpec(t, "ue2-out", 0x2002, "out", runKeyOut, 2),
		apiSpec(t, "ue3-in", 0x1003, "in", runKeyIn, 3),
	} {
		if _, err := c.Add(ctx, sp); err != nil {
			t.Fatalf("add %s: %v", sp.Name, err)
		}
	}
	// Phone 2 sits behind a NAPT port the SAs do not name.
	ue2 := d.newPhone(t, 4777, mustESP(t, 0x1002, runKeyIn, 0), mustESP(t, 0x2002, runKeyOut, 4096))
	inner2 := netip.MustParseAddrPort("10.99.0.2:5060")
	for i := 0; i < 3; i++ {
		talk(t, ue2, inner2, fmt.Sprintf("REGISTER before #%d", i))
	}
	d.waitSnapshot(t, "phone 2's binding", func(r rxstate.Record) bool { return r.Binding.Port() == 4777 })
	// Acknowledged API changes right before the crash.
	if _, err := c.Add(ctx, apiSpec(t, "ue4-in", 0x1004, "in", runKeyIn, 4)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Delete(ctx, "ue3-in"); err != nil {
		t.Fatal(err)
	}
	dm.cmd.Process.Kill()
	<-dm.exited
	c.Close()

	st, err := os.Stat(filepath.Join(d.dir, "state", "api-sas"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("the API SA file (with keys) has mode %v, want 0600", st.Mode().Perm())
	}

	dm = d.start(t)
	c, err = api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := map[string]api.SAView{}
	if err := c.Each(ctx, func(v *api.SAView) error { got[v.Name] = *v; return nil }); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ue1-in", "ue1-out", "ue2-in", "ue2-out", "ue4-in"} {
		if _, ok := got[name]; !ok {
			t.Fatalf("%s is missing after the restart; the daemon has %d SAs", name, len(got))
		}
	}
	if _, ok := got["ue3-in"]; ok || len(got) != 5 {
		t.Fatalf("after the restart the daemon has %d SAs (ue3-in, deleted before the crash, present: %v)", len(got), ok)
	}
	for _, name := range []string{"ue2-in", "ue2-out"} {
		if b := got[name].Binding; b != "192.0.2.10:4777" {
			t.Fatalf("%s binding after the restart is %s, want the learnt 192.0.2.10:4777", name, b)
		}
	}
	if !strings.Contains(dm.logs.String(), "api_sas=3") {
		t.Fatalf("the start log does not report 3 restored API SAs:\n%s", dm.logs.String())
	}
	for i := 0; i < 3; i++ {
		talk(t, ue2, inner2, fmt.Sprintf("REGISTER after #%d", i))
	}
	v, err := c.Get(ctx, "ue2-in")
	if err != nil {
		t.Fatal(err)
	}
	// The counters continue from before the crash (rx state restore).
	if v.Counters == nil || v.Counters.Packets != 6 {
		t.Fatalf("ue2-in counters after the restart: %+v, want 6 packets (3 before, 3 after)", v.Counters)
	}
}
