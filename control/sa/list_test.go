package sa

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// listSpecs is n valid pairs.
func listSpecs(n int) []Spec {
	var out []Spec
	pp := uint16(4500)
	for i := range n {
		for _, d := range []struct {
			dir string
			spi uint32
		}{{"in", 0x100000 + uint32(i)}, {"out", 0x200000 + uint32(i)}} {
			out = append(out, Spec{SPI: SPIOf(d.spi), Direction: d.dir, Mode: "tunnel", Proposal: "aes128gcm16",
				EncKey: fmt.Sprintf("%040x", 1+i), Local: "192.0.2.1", Peer: "192.0.2.10",
				Encap: &EncapSpec{PeerPort: &pp}, Inner: &InnerSpec{Local: "10.0.0.0/24", Peer: fmt.Sprintf("100.64.%d.%d/32", i>>8, i&255)}})
		}
	}
	return out
}

// TestListShapesAgree: a large bare JSON list (parsed item by item on
// every CPU), the same SAs as JSON lines, and the sequential decoder's
// wrapper shape give the same SAs in the same order.
func TestListShapesAgree(t *testing.T) {
	specs := listSpecs(3000)
	list, _ := json.Marshal(specs)
	var lines strings.Builder
	for _, sp := range specs {
		b, _ := json.Marshal(sp)
		lines.Write(b)
		lines.WriteString("\n\n") // blank lines are allowed
	}
	wrapper, _ := json.Marshal(map[string]any{"sas": specs})
	a, err := ParseBytes(list, JSON, Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := ParseBytes([]byte(lines.String()), JSONL, Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseBytes(wrapper, JSON, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != 6000 || len(b) != 6000 || len(c) != 6000 {
		t.Fatalf("got %d, %d, %d SAs; want 6000", len(a), len(b), len(c))
	}
	for i := range a {
		if a[i].String() != c[i].String() || b[i].String() != c[i].String() || string(a[i].EncKey) != string(c[i].EncKey) || string(b[i].EncKey) != string(c[i].EncKey) {
			t.Fatalf("SA %d differs: %v / %v / %v", i, a[i], b[i], c[i])
		}
	}
}

// TestJSONLErrors: every problem of a JSON-lines file names the file,
// the line and the field; the valid SAs still come back; a syntax error
// stops the file naming its line.
func TestJSONLErrors(t *testing.T) {
	specs := listSpecs(3)
	var lines []string
	for _, sp := range specs {
		b, _ := json.Marshal(sp)
		lines = append(lines, string(b))
	}
	lines[1] = strings.Replace(lines[1], `"mode":"tunnel"`, `"mode":"tunnel","colour":"red"`, 1)
	lines[3] = strings.Replace(lines[3], `"enc_key":"`, `"enc_key":"zz`, 1)
	lines[4] = strings.Replace(lines[4], `"spi":"0x00100002"`, `"spi":"0x00100001"`, 1)
	lines = append(lines, `{"direction": "in", "replay_window": "x"}`)
	dir := t.TempDir()
	path := filepath.Join(dir, "phones.jsonl")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sas, err := ParseFile(path, Options{})
	want := []string{
		path + `: line 2: unknown field "colour"`,
		path + `: line 7: replay_window: a JSON string where an integer from 0 to 4294967295 is wanted`,
		path + `: line 4 0x00200001: enc_key: not hex: invalid character at offset 0`,
		path + `: line 7: spi: required`,
		path + `: line 7: mode: required (tunnel or transport)`,
	}
	got := messages(err)
	for i, w := range want {
		if i >= len(got) || got[i] != w {
			t.Fatalf("errors:\n got  %q\n want first %q", got, want)
		}
	}
	if !strings.Contains(strings.Join(got, "\n"), `spi: in 0x00100001 is also used by sa 0x00100001`) {
		t.Errorf("duplicate SPI not reported: %q", got)
	}
	// Line 2 has an unknown field (callers refuse the file for it) but
	// its SA validated, as did lines 1, 3 and 6; lines 4, 5 and 7 did not.
	if len(sas) != 4 {
		t.Errorf("got %d valid SAs, want 4", len(sas))
	}

	bad := filepath.Join(dir, "bad.jsonl")
	if err := os.WriteFile(bad, []byte(lines[0]+"\n"+`{"spi": }`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseFile(bad, Options{}); err == nil || err.Error() != bad+`: line 2: invalid character '}' looking for beginning of value` {
		t.Errorf("syntax error: %v", err)
	}
}
