package main

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/lab/netns"
)

// -sa-file writes the gateway's side of the pairs in a file the SA
// loader reads; bad flags are usage errors naming the flag.
func TestPktgenSAFileAndUsage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sas.json")
	if err := runPktgen([]string{"-sas", "4", "-sa-file", path}); err != nil {
		t.Fatal(err)
	}
	sas, err := sa.ParseFile(path, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sas) != 8 {
		t.Fatalf("%d SAs in the file, want 8", len(sas))
	}
	// The JSON-lines shape holds the same SAs, one a line.
	lpath := filepath.Join(t.TempDir(), "sas.jsonl")
	if err := runPktgen([]string{"-sas", "4", "-sa-file", lpath}); err != nil {
		t.Fatal(err)
	}
	lsas, err := sa.ParseFile(lpath, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(lpath); len(lsas) != 8 || strings.Count(string(data), "\n") != 8 {
		t.Fatalf("%d SAs in %d lines, want 8", len(lsas), strings.Count(string(data), "\n"))
	}
	for i := range sas {
		if sas[i].String() != lsas[i].String() || string(sas[i].EncKey) != string(lsas[i].EncKey) {
			t.Errorf("SA %d: %v in the list, %v in the lines", i, sas[i], lsas[i])
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-sas", "0", "-sa-file", path}, "-sas"},
		{[]string{"-sas", "1000001", "-sa-file", path}, "-sas"},
		{[]string{"-count", "1"}, "-dev and -dst-mac"},
		{[]string{"-dev", "x", "-dst-mac", "02:00:00:00:00:01"}, "-duration or -count"},
		{[]string{"-dev", "x", "-dst-mac", "nope", "-count", "1"}, "-dst-mac"},
		{[]string{"-dev", "x", "-dst-mac", "02:00:00:00:00:01", "-count", "1", "-sizes", "9000"}, "-sizes"},
		{[]string{"-phone", "300.1.1.1", "-sa-file", path}, "-phone"},
		{[]string{"-dev", "x", "-dst-mac", "02:00:00:00:00:01", "-count", "1", "-engine", "dpdk"}, "-engine"},
	} {
		err := runPktgen(c.args)
		if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want a usage error about %s", c.args, err, c.want)
		}
	}
}

// The command sends exactly -count ESP frames (and cleartext ones with
// -clear) out of a veth in a namespace, with either engine, counted by an
// XDP program on the peer.
func TestPktgenSendsCount(t *testing.T) {
	a, b := netns.ForTest(t, "pca"), netns.ForTest(t, "pcb")
	aIf, bIf := netns.VethForTest(t, a, b)
	var bIdx int
	var bMAC net.HardwareAddr
	if err := b.Do(func() error {
		i, err := net.InterfaceByName(bIf)
		if err != nil {
			return err
		}
		bIdx, bMAC = i.Index, i.HardwareAddr
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args  []string
		port  uint16
		count int
	}{
		{[]string{"-sas", "50", "-sizes", "imix"}, esp.NATTPort, 1500},
		{[]string{"-sas", "7", "-clear", "-sizes", "sip", "-rate", "200000"}, 5060, 20000},
		{[]string{"-sas", "1000", "-engine", "afxdp", "-sizes", "1400"}, esp.NATTPort, 40000},
	} {
		cnt, err := gen.NewCounter(c.port)
		if err != nil {
			t.Fatal(err)
		}
		var l link.Link
		if err := b.Do(func() (err error) {
			l, err = link.AttachXDP(link.XDPOptions{Program: cnt.Prog, Interface: bIdx, Flags: link.XDPDriverMode})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		args := append([]string{"-netns", a.Name, "-dev", aIf, "-dst-mac", bMAC.String(), "-count", strconv.Itoa(c.count), "-cpu", "-1"}, c.args...)
		if err := runPktgen(args); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		var got uint64
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if got, _, err = cnt.Read(); err != nil {
				t.Fatal(err)
			}
			if got >= uint64(c.count) {
				break
			}
		}
		l.Close()
		cnt.Close()
		if got != uint64(c.count) {
			t.Fatalf("%v: peer counted %d frames, want %d", c.args, got, c.count)
		}
	}
}
