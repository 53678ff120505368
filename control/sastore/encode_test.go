package sastore

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

// encodeVariety is SAs covering every optional field of the format.
const encodeVariety = `
- {name: "ue-9.a_b", pair: "p_1", spi: 0xfffffffe, direction: out, mode: tunnel,
   proposal: aes256gcm16, enc_key: 000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f01020304,
   local: 2001:db8::1, peer: 2001:db8::ffff:2, encap: {local_port: 1, peer_port: 65535},
   inner: {local: "2001:db8:1::/48", peer: "2001:db8:2::5", core: "2001:db8:3::5"},
   ports: {protocol: tcp}, dscp: 0, lifetime: {soft_seconds: 1, hard_bytes: 18446744073709551615}}
- {spi: 0x100, direction: in, mode: transport, proposal: aes128gcm16, enc_key: 000102030405060708090a0b0c0d0e0f10111213,
   replay_window: 0, local: 192.0.2.1, peer: 192.0.2.9, inner: {local: 10.0.0.1, core: 100.64.0.9},
   ports: {local: 5060}, idle_timeout: 30, esn: true}
- {spi: 0x101, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: 000102030405060708090a0b0c0d0e0f10111213,
   local: 192.0.2.1, peer: 192.0.2.9, inner: {local: 0.0.0.0/0, peer: 10.1.0.0/16}, ports: {protocol: "200"}, dscp: 46}
`

// AppendSA writes exactly what encoding/json writes for the SA with its
// keys: the file format stays what Decode (and older xesp) reads.
func TestAppendSAMatchesJSON(t *testing.T) {
	var sas []sa.SA
	for _, src := range []string{sample, encodeVariety} {
		got, err := sa.ParseBytes([]byte(src), sa.YAML, sa.Options{})
		if err != nil {
			t.Fatal(err)
		}
		sas = append(sas, got...)
	}
	if len(sas) != 6 {
		t.Fatalf("parsed %d SAs", len(sas))
	}
	for i := range sas {
		want, err := json.Marshal(sas[i].WithKeys())
		if err != nil {
			t.Fatal(err)
		}
		got := AppendSA([]byte("prefix"), &sas[i])
		if !bytes.Equal(got[6:], want) || string(got[:6]) != "prefix" {
			t.Errorf("SA %d:\n got %s\nwant %s", i, got[6:], want)
		}
		back, err := decodeEntry(got[6:], "test")
		if err != nil {
			t.Fatalf("SA %d: decode: %v", i, err)
		}
		if again := AppendSA(nil, &back); !bytes.Equal(again, want) {
			t.Errorf("SA %d: round trip changed it:\n got %s\nwant %s", i, again, want)
		}
	}
}

func BenchmarkEncodeSA(b *testing.B) {
	sas := sampleSAs(b)
	b.Run("AppendSA", func(b *testing.B) {
		var buf []byte
		for i := 0; b.Loop(); i++ {
			buf = AppendSA(buf[:0], &sas[i%len(sas)])
		}
	})
	b.Run("json", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if _, err := json.Marshal(sas[i%len(sas)].WithKeys()); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// A streamed compaction writes a snapshot Open reads back (the header's
// count padded), empties the journal, and a failure of the entries'
// source leaves both files as they were.
func TestCompactStream(t *testing.T) {
	sas := sampleSAs(t)
	path := filepath.Join(t.TempDir(), "api-sas")
	st, _ := openT(t, path)
	if err := st.Append(AppendPut(nil, entry(t, &sas[0]))); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	boom := errors.New("listing failed")
	if err := st.CompactStream(func(put func([]byte)) error {
		put(entry(t, &sas[1]))
		return boom
	}); !errors.Is(err, boom) {
		t.Fatalf("failed source: %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("a failed compaction changed the snapshot")
	}
	if got, err := Load(path); err != nil || !reflect.DeepEqual(got, sas[:1]) {
		t.Fatalf("after a failed compaction: %v, %v", labelsOf(got), err)
	}
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary file left: %v", err)
	}
	if err := st.CompactStream(func(put func([]byte)) error {
		for i := range sas {
			put(AppendSA(nil, &sas[i]))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if hdr := string(b[:bytes.IndexByte(b, '\n')]); !strings.Contains(hdr, " 3          ") || int64(len(b)) != st.SnapshotSize() {
		t.Fatalf("header %q, %d bytes, SnapshotSize %d", hdr, len(b), st.SnapshotSize())
	}
	if st.JournalSize() != int64(len(journalHeader)) {
		t.Fatalf("journal %d bytes after compaction", st.JournalSize())
	}
	st.Close()
	_, res := openT(t, path)
	if !reflect.DeepEqual(res.SAs, sas) {
		t.Fatalf("reopened: %v", labelsOf(res.SAs))
	}
}

func labelsOf(sas []sa.SA) []string {
	var out []string
	for i := range sas {
		out = append(out, sas[i].Label())
	}
	return out
}

// Strings that need escapes (names are restricted today, but the writer
// must not depend on it) come out as encoding/json writes them.
func TestAppendStringEscapes(t *testing.T) {
	for _, s := range []string{"", "plain-name_1.x", `q"b\s`, "<a&b>", "tab\there", "é\u2028\xff"} {
		want, _ := json.Marshal(s)
		if got := appendString(nil, s); !bytes.Equal(got, want) {
			t.Errorf("%q: %s, want %s", s, got, want)
		}
	}
}
