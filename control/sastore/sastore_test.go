package sastore

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

const sample = `
- {name: ue1-in, spi: 0x1001, direction: in, mode: tunnel, proposal: aes128gcm16,
   enc_key: 000102030405060708090a0b0c0d0e0f10111213, replay_window: 128,
   local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: 4501},
   inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32},
   lifetime: {soft_packets: 10, hard_packets: 20, hard_bytes: 99999, hard_seconds: 3600}}
- {name: ue1-out, pair: p1, spi: 0x2001, direction: out, mode: tunnel, proposal: aes128gcm16,
   enc_key: 202122232425262728292a2b2c2d2e2f30313233, esn: true,
   local: 192.0.2.1, peer: 192.0.2.10, encap: {}, inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32},
   ports: {local: 5064, peer: 5066}}
- {spi: 3003, direction: in, mode: transport, proposal: aes128-sha256,
   enc_key: 000102030405060708090a0b0c0d0e0f,
   auth_key: 000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f,
   local: 2001:db8::1, peer: 2001:db8::2}
`

func sampleSAs(t testing.TB) []sa.SA {
	t.Helper()
	sas, err := sa.ParseBytes([]byte(sample), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return sas
}

func TestRoundTrip(t *testing.T) {
	sas := sampleSAs(t)
	path := filepath.Join(t.TempDir(), "api-sas")
	if err := Save(path, sas); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, sas) {
		t.Fatalf("round trip changed the SAs:\n got %+v\nwant %+v", got, sas)
	}
	// The keys are in the file: that is why it is 0600.
	b, _ := os.ReadFile(path)
	if !bytes.Contains(b, []byte("202122232425262728292a2b2c2d2e2f30313233")) {
		t.Fatal("the outbound key is not in the file")
	}
	// An empty set is a valid file, and replacing works.
	if err := Save(path, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := Load(path); err != nil || len(got) != 0 {
		t.Fatalf("empty set: %v, %v", got, err)
	}
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary file left behind: %v", err)
	}
}

func TestMissingFileIsEmpty(t *testing.T) {
	got, err := Load(filepath.Join(t.TempDir(), "none"))
	if err != nil || got != nil {
		t.Fatalf("missing file: %v, %v", got, err)
	}
}

func TestPermissions(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "api-sas")
	// A stale temporary file readable by all must not pass its mode on.
	if err := os.WriteFile(path+".tmp", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Save(path, sampleSAs(t)); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v, want 0600", st.Mode().Perm())
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = Load(path)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a world-readable key file was accepted or the error is unclear: %v", err)
	}
}

// reheader returns body under a correct header, so the test reaches the
// checks behind the checksum.
func reheader(count int, body string) []byte {
	sum := sha256.Sum256([]byte(body))
	return []byte(fmt.Sprintf("%s 1 %d %s\n%s", magic, count, hex.EncodeToString(sum[:]), body))
}

func TestCorruptRefused(t *testing.T) {
	good, err := Encode(sampleSAs(t))
	if err != nil {
		t.Fatal(err)
	}
	nl := bytes.IndexByte(good, '\n')
	flipped := bytes.Clone(good)
	flipped[len(flipped)-10] ^= 0x01
	cases := []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "no header line"},
		{"truncated", good[:len(good)-20], "checksum mismatch"},
		{"bit flip", flipped, "checksum mismatch"},
		{"other file", []byte("xesp rx state\n{}"), "header"},
		{"future version", bytes.Replace(good, []byte(magic+" 1 "), []byte(magic+" 2 "), 1), "format version"},
		{"bad count", bytes.Replace(good, []byte(magic+" 1 3 "), []byte(magic+" 1 x "), 1), "count"},
		{"count mismatch", reheader(2, string(good[nl+1:])), "header says 2 SAs, the list holds 3"},
		{"not JSON", reheader(0, "[{"), "unexpected EOF"},
		{"unknown field", reheader(1, `[{"spi":1,"bogus":1}]`), "bogus"},
		{"trailing data", reheader(0, `[] []`), "data after"},
		{"bad key", reheader(1, `[{"spi":4097,"direction":"in","mode":"transport","proposal":"aes128gcm16","enc_key":"0011","local":"192.0.2.1","peer":"192.0.2.10"}]`), "sas[0]"},
		{"key file", reheader(1, `[{"spi":4097,"direction":"in","mode":"transport","proposal":"aes128gcm16","enc_key_file":"/etc/shadow","local":"192.0.2.1","peer":"192.0.2.10"}]`), "sas[0]"},
	}
	dir := t.TempDir()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode(c.b)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Decode: %v, want ErrCorrupt saying %q", err, c.want)
			}
			path := filepath.Join(dir, "api-sas")
			if err := WriteFile(path, c.b); err != nil {
				t.Fatal(err)
			}
			if _, err := Load(path); err == nil || !strings.Contains(err.Error(), path) {
				t.Fatalf("Load: %v, want an error naming %s", err, path)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	good, err := Encode(sampleSAs(f))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(reheader(0, "[]"))
	f.Add(reheader(1, `[{"spi":1}]`))
	f.Add([]byte(magic + " 1 0 00\n[]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		sas, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error without ErrCorrupt: %v", err)
			}
			return
		}
		// Whatever decodes re-encodes to the same SAs.
		again, err := Encode(sas)
		if err != nil {
			t.Fatal(err)
		}
		back, err := Decode(again)
		if err != nil {
			t.Fatalf("re-encoded file refused: %v", err)
		}
		if !reflect.DeepEqual(back, sas) {
			t.Fatalf("re-encoding changed the SAs")
		}
	})
}

// BenchmarkSave100k is the cost of one write of 100k API SAs (a P-CSCF
// with 25k phones' sec-agree quads): the file is rewritten whole.
func BenchmarkSave100k(b *testing.B) {
	base := sampleSAs(b)
	sas := make([]sa.SA, 100000)
	for i := range sas {
		sas[i] = base[i%2]
		sas[i].Name = fmt.Sprintf("sa%d", i)
		sas[i].SPI = uint32(0x10000 + i)
	}
	path := filepath.Join(b.TempDir(), "api-sas")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := Save(path, sas); err != nil {
			b.Fatal(err)
		}
	}
	st, _ := os.Stat(path)
	b.ReportMetric(float64(st.Size()), "file-bytes")
}
