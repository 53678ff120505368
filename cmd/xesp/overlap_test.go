package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `xesp run --print-config` validates like a start: two phones' outbound
// SAs on one inner address are refused with both names, before anything
// is printed.
func TestPrintConfigRefusesOverlap(t *testing.T) {
	const key = "000102030405060708090a0b0c0d0e0f10111213"
	sa := func(name, spi, peer string) string {
		return "  - {name: " + name + ", spi: " + spi + ", direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: " + key +
			", local: 198.51.100.1, peer: " + peer + ", encap: {}, inner: {local: 10.0.0.0/24, peer: 192.168.1.10}}\n"
	}
	cfg := "public: {interface: xpub0, addresses: [198.51.100.1]}\nprivate: {interface: xpriv0}\nsas:\n" +
		sa("a-out", "0x2001", "203.0.113.7") + sa("b-out", "0x2002", "203.0.113.8")
	path := filepath.Join(t.TempDir(), "xesp.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	err := runDaemon([]string{"--config", path, "--print-config"})
	if err == nil || !strings.Contains(err.Error(), `sas[1] "b-out": selectors overlap sas[0] "a-out"`) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("--print-config: %v", err)
	}
	// With a core_pool the same SAs are fine, and the allocation shows.
	if err := os.WriteFile(path, []byte(cfg+"core_pool: 100.64.0.0/10\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := runDaemon([]string{"--config", path, "--print-config"}); err != nil {
		t.Fatalf("with core_pool: %v", err)
	}
}
