package sa

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/xesp/xesp/dataplane/esp"
)

// Every field of the format written out, as the original design note had
// it (docs/sa-format.md's own examples are checked by TestDocExamples).
const formatExample = `sas:
  - name: ue1-in              # optional label, unique when given
    spi: 0x00001001           # integer, or a hex string "0x..."
    direction: in             # in | out
    mode: tunnel              # tunnel | transport
    proposal: aes128gcm16     # see below
    enc_key: 000102030405060708090a0b0c0d0e0fcafebabe   # hex; AEADs: key || 4-byte salt
    auth_key: ""              # hex; only for proposals with a separate integrity algorithm
    esn: false
    replay_window: 1024       # in only; 0 disables anti-replay
    local: 198.51.100.20      # outer address on this side
    peer: 192.0.2.10          # outer address of the far side
    encap:                    # present: UDP encapsulation (RFC 3948); absent: plain ESP
      local_port: 4500
      peer_port: 4500
    inner:                    # tunnel mode selectors (prefixes); transport mode: omit
      local: 10.0.0.0/24
      peer: 10.99.0.1/32
`

// The YAML and JSON examples of docs/sa-format.md are valid SAs.
func TestDocExamples(t *testing.T) {
	doc, err := os.ReadFile("../../docs/sa-format.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```(yaml|json)\n(.*?)```").FindAllSubmatch(doc, -1)
	if len(blocks) < 2 {
		t.Fatalf("found %d examples in docs/sa-format.md", len(blocks))
	}
	for i, b := range blocks {
		f := YAML
		if string(b[1]) == "json" {
			f = JSON
		}
		sas, err := ParseBytes(b[2], f, Options{})
		if err != nil || len(sas) == 0 {
			t.Errorf("example %d (%s): %d SAs, %v", i+1, b[1], len(sas), err)
		}
	}
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFormatExample(t *testing.T) {
	sas, err := ParseBytes([]byte(formatExample), YAML, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sas) != 1 {
		t.Fatalf("got %d SAs, want 1", len(sas))
	}
	s := sas[0]
	want := SA{
		Name: "ue1-in", SPI: 0x1001, Direction: In, Mode: Tunnel, Proposal: esp.AES128GCM16,
		ReplayWindow: 1024,
		Local:        netip.MustParseAddr("198.51.100.20"), Peer: netip.MustParseAddr("192.0.2.10"),
		InnerLocal: netip.MustParsePrefix("10.0.0.0/24"), InnerPeer: netip.MustParsePrefix("10.99.0.1/32"),
	}
	if !bytes.Equal(s.EncKey, mustHex(t, "000102030405060708090a0b0c0d0e0fcafebabe")) {
		t.Errorf("enc key = %x", []byte(s.EncKey))
	}
	if s.AuthKey != nil {
		t.Errorf("auth key = %d bytes, want none", len(s.AuthKey))
	}
	if s.Encap == nil || *s.Encap != (Encap{4500, 4500}) {
		t.Errorf("encap = %+v", s.Encap)
	}
	want.Encap = &Encap{4500, 4500}
	if got, w := mustJSON(t, s), mustJSON(t, want); !bytes.Equal(got, w) {
		t.Errorf("got  %s\nwant %s", got, w)
	}
}

func base() Spec {
	w := uint32(64)
	return Spec{
		Name: "ue1-in", SPI: SPIOf(0x1001), Direction: "in", Mode: "tunnel", Proposal: "aes128gcm16",
		EncKey: "000102030405060708090a0b0c0d0e0fcafebabe", ReplayWindow: &w,
		Local: "198.51.100.20", Peer: "192.0.2.10",
		Encap: &EncapSpec{},
		Inner: &InnerSpec{Local: "10.0.0.0/24", Peer: "10.99.0.1"},
	}
}

func u32(v uint32) *uint32 { return &v }
func u16(v uint16) *uint16 { return &v }

// TestParseRules runs one row per validation rule: the field changed and
// the exact message, or the accepted result.
func TestParseRules(t *testing.T) {
	cases := []struct {
		name  string
		edit  func(*Spec)
		opts  Options
		errs  []string // exact messages; nil: must parse
		check func(*testing.T, SA)
	}{
		{name: "valid", check: func(t *testing.T, s SA) {
			if s.ReplayWindow != 64 || s.InnerPeer != netip.MustParsePrefix("10.99.0.1/32") || *s.Encap != (Encap{4500, 4500}) {
				t.Errorf("got %v window %d encap %+v", s.Public(), s.ReplayWindow, *s.Encap)
			}
		}},
		{name: "key length", edit: func(s *Spec) { s.EncKey = "000102030405060708090a0b0c0d0e0f" },
			errs: []string{`sa "ue1-in": enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 16`}},
		{name: "unnamed uses spi", edit: func(s *Spec) { s.Name = ""; s.EncKey = "00" },
			errs: []string{`sa 0x00001001: enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 1`}},
		{name: "hex prefix and spaces", edit: func(s *Spec) { s.EncKey = " 0x000102030405060708090a0b0c0d0e0fcafebabe\n" }},
		{name: "bad hex", edit: func(s *Spec) { s.EncKey = "00010203040506070809za0b0c0d0e0fcafebabe" },
			errs: []string{`sa "ue1-in": enc_key: not hex: invalid character at offset 20`}},
		{name: "odd hex", edit: func(s *Spec) { s.EncKey = "000" },
			errs: []string{`sa "ue1-in": enc_key: not hex: odd number of digits`}},
		{name: "missing key", edit: func(s *Spec) { s.EncKey = "" },
			errs: []string{`sa "ue1-in": enc_key: required: aes128gcm16 needs 20 bytes (16 key + 4 salt)`}},
		{name: "aead takes no auth key", edit: func(s *Spec) { s.AuthKey = "00" },
			errs: []string{`sa "ue1-in": auth_key: aes128gcm16 takes no auth_key`}},
		{name: "cbc-sha1 needs auth key", edit: func(s *Spec) { s.Proposal = "aes128-sha1"; s.EncKey = strings.Repeat("11", 16) },
			errs: []string{`sa "ue1-in": auth_key: required: aes128-sha1 needs 20 bytes`}},
		{name: "cbc-sha256", edit: func(s *Spec) {
			s.Proposal = "AES256-SHA256"
			s.EncKey = strings.Repeat("11", 32)
			s.AuthKey = strings.Repeat("22", 32)
		}, check: func(t *testing.T, s SA) {
			if s.Proposal != esp.AES256SHA256 || !bytes.Equal(s.EncKey, bytes.Repeat([]byte{0x11}, 32)) || !bytes.Equal(s.AuthKey, bytes.Repeat([]byte{0x22}, 32)) {
				t.Errorf("keys %x / %x", []byte(s.EncKey), []byte(s.AuthKey))
			}
		}},
		{name: "chacha", edit: func(s *Spec) { s.Proposal = "chacha20poly1305"; s.EncKey = strings.Repeat("11", 32) },
			errs: []string{`sa "ue1-in": enc_key: chacha20poly1305 needs 36 bytes (32 key + 4 salt), got 32`}},
		{name: "null takes no enc key", edit: func(s *Spec) { s.Proposal = "null-sha1"; s.AuthKey = strings.Repeat("22", 20) },
			errs: []string{`sa "ue1-in": enc_key: null-sha1 takes no enc_key`}},
		{name: "null-sha1", edit: func(s *Spec) { s.Proposal = "null-sha1"; s.EncKey = ""; s.AuthKey = strings.Repeat("22", 20) },
			check: func(t *testing.T, s SA) {
				if s.EncKey != nil || len(s.AuthKey) != 20 {
					t.Errorf("enc %d auth %d bytes", len(s.EncKey), len(s.AuthKey))
				}
			}},
		{name: "no integrity refused", edit: func(s *Spec) { s.Proposal = "aes128"; s.EncKey = strings.Repeat("11", 16) },
			errs: []string{`sa "ue1-in": proposal: aes128 has no integrity protection; only the offline decrypt tool accepts it`}},
		{name: "no integrity allowed offline", edit: func(s *Spec) { s.Proposal = "aes128"; s.EncKey = strings.Repeat("11", 16) },
			opts: Options{AllowNoIntegrity: true}},
		{name: "unknown proposal", edit: func(s *Spec) { s.Proposal = "des" },
			errs: []string{`sa "ue1-in": proposal: unknown proposal "des" (accepted: ` + strings.Join(esp.ProposalKeywords(), ", ") + ")"}},
		{name: "spi zero", edit: func(s *Spec) { s.SPI = SPIOf(0) },
			errs: []string{`sa "ue1-in": spi: 0 is reserved (RFC 4303 2.1)`}},
		{name: "spi reserved", edit: func(s *Spec) { s.SPI = SPIOf(255) },
			errs: []string{`sa "ue1-in": spi: 255 is in the reserved range 1..255 (RFC 4303 2.1)`}},
		{name: "spi 256", edit: func(s *Spec) { s.SPI = SPIOf(256) }},
		{name: "spi missing", edit: func(s *Spec) { s.SPI = SPIValue{} },
			errs: []string{`sa "ue1-in": spi: required`}},
		{name: "everything missing", edit: func(s *Spec) { *s = Spec{} }, errs: []string{
			`sa: spi: required`, `sa: direction: required (in or out)`, `sa: mode: required (tunnel or transport)`,
			`sa: proposal: required (e.g. aes128gcm16)`, `sa: local: required`, `sa: peer: required`}},
		{name: "direction", edit: func(s *Spec) { s.Direction = "both" },
			errs: []string{`sa "ue1-in": direction: "both": must be in or out`}},
		{name: "mode", edit: func(s *Spec) { s.Mode = "beet" },
			errs: []string{`sa "ue1-in": mode: "beet": must be tunnel or transport`}},
		{name: "name charset", edit: func(s *Spec) { s.Name = "0x1001" },
			errs: []string{`sa "0x1001": name: "0x1001": use 1..64 of A-Z a-z 0-9 . _ - starting with a letter`}},
		{name: "replay default", edit: func(s *Spec) { s.ReplayWindow = nil }, check: func(t *testing.T, s SA) {
			if s.ReplayWindow != DefaultReplayWindow {
				t.Errorf("window %d", s.ReplayWindow)
			}
		}},
		{name: "replay disabled", edit: func(s *Spec) { s.ReplayWindow = u32(0) }, check: func(t *testing.T, s SA) {
			if s.ReplayWindow != 0 {
				t.Errorf("window %d", s.ReplayWindow)
			}
		}},
		{name: "replay small", edit: func(s *Spec) { s.ReplayWindow = u32(16) },
			errs: []string{`sa "ue1-in": replay_window: must be 32..4096, or 0 to disable anti-replay; got 16`}},
		{name: "replay large", edit: func(s *Spec) { s.ReplayWindow = u32(4097) },
			errs: []string{`sa "ue1-in": replay_window: must be 32..4096, or 0 to disable anti-replay; got 4097`}},
		{name: "replay on outbound", edit: func(s *Spec) { s.Direction = "out" },
			errs: []string{`sa "ue1-in": replay_window: only inbound SAs have a replay window`}},
		{name: "outbound without window", edit: func(s *Spec) { s.Direction = "OUT"; s.ReplayWindow = nil }, check: func(t *testing.T, s SA) {
			if s.Direction != Out || s.ReplayWindow != 0 {
				t.Errorf("dir %v window %d", s.Direction, s.ReplayWindow)
			}
		}},
		{name: "families", edit: func(s *Spec) { s.Peer = "2001:db8::1" },
			errs: []string{`sa "ue1-in": peer: 2001:db8::1 and local 198.51.100.20 are of different address families`}},
		{name: "bad address", edit: func(s *Spec) { s.Local = "host.example" },
			errs: []string{`sa "ue1-in": local: "host.example" is not an IP address`}},
		{name: "zone", edit: func(s *Spec) { s.Local = "fe80::1%eth0"; s.Peer = "fe80::2" },
			errs: []string{`sa "ue1-in": local: fe80::1%eth0: zones are not supported`}},
		{name: "multicast", edit: func(s *Spec) { s.Peer = "224.0.0.1" },
			errs: []string{`sa "ue1-in": peer: 224.0.0.1 is not a unicast address`}},
		{name: "mapped", edit: func(s *Spec) { s.Peer = "::ffff:192.0.2.10" },
			errs: []string{`sa "ue1-in": peer: ::ffff:192.0.2.10: write IPv4 addresses as a.b.c.d`}},
		{name: "encap ports", edit: func(s *Spec) { s.Encap = &EncapSpec{LocalPort: u16(0), PeerPort: u16(31000)} },
			errs: []string{`sa "ue1-in": encap.local_port: must be 1..65535`}},
		{name: "encap peer port", edit: func(s *Spec) { s.Encap = &EncapSpec{PeerPort: u16(31000)} }, check: func(t *testing.T, s SA) {
			if *s.Encap != (Encap{4500, 31000}) {
				t.Errorf("encap %+v", *s.Encap)
			}
		}},
		{name: "plain esp", edit: func(s *Spec) { s.Encap = nil }, check: func(t *testing.T, s SA) {
			if s.Encap != nil {
				t.Errorf("encap %+v", *s.Encap)
			}
		}},
		{name: "tunnel needs inner", edit: func(s *Spec) { s.Inner = nil },
			errs: []string{`sa "ue1-in": inner: required in tunnel mode (inner.local and inner.peer prefixes)`}},
		{name: "tunnel needs both", edit: func(s *Spec) { s.Inner.Local = "" },
			errs: []string{`sa "ue1-in": inner.local: required in tunnel mode`}},
		{name: "transport: inner.local one address, no inner.peer", edit: func(s *Spec) { s.Mode = "transport" },
			errs: []string{`sa "ue1-in": inner.peer: not used in transport mode (the phone's address is peer, and its NAT binding); remove it`,
				`sa "ue1-in": inner.local: 10.0.0.0/24: transport mode delivers to one address (/32), not a prefix`}},
		{name: "transport core side", edit: func(s *Spec) {
			s.Mode, s.Inner = "transport", &InnerSpec{Local: "10.0.0.1", Core: "100.64.0.9"}
		}, check: func(t *testing.T, s SA) {
			if s.InnerLocal != netip.MustParsePrefix("10.0.0.1/32") || s.Core != netip.MustParseAddr("100.64.0.9") || s.InnerPeer.IsValid() {
				t.Errorf("inner.local %v core %v inner.peer %v", s.InnerLocal, s.Core, s.InnerPeer)
			}
		}},
		{name: "transport families", edit: func(s *Spec) {
			s.Mode, s.Inner = "transport", &InnerSpec{Local: "2001:db8::1", Core: "2001:db8:1::9"}
		}, errs: []string{`sa "ue1-in": inner.local: 2001:db8::1 and local 198.51.100.20 are of different address families (transport mode re-addresses one IP header)`,
			`sa "ue1-in": inner.core: 2001:db8:1::9 and local 198.51.100.20 are of different address families (transport mode re-addresses one IP header)`}},
		{name: "transport", edit: func(s *Spec) { s.Mode = "transport"; s.Inner = nil }, check: func(t *testing.T, s SA) {
			if s.InnerLocal.IsValid() || s.InnerPeer.IsValid() {
				t.Errorf("selectors %v %v", s.InnerLocal, s.InnerPeer)
			}
		}},
		{name: "host bits", edit: func(s *Spec) { s.Inner.Local = "10.0.0.1/24" },
			errs: []string{`sa "ue1-in": inner.local: 10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?`}},
		{name: "inner families", edit: func(s *Spec) { s.Inner.Peer = "2001:db8::/64" },
			errs: []string{`sa "ue1-in": inner.peer: 2001:db8::/64 and inner.local 10.0.0.0/24 are of different address families`}},
		{name: "inner v6 over v4", edit: func(s *Spec) { s.Inner = &InnerSpec{Local: "2001:db8:1::/48", Peer: "2001:db8:2::7"} }, check: func(t *testing.T, s SA) {
			if s.InnerPeer != netip.MustParsePrefix("2001:db8:2::7/128") {
				t.Errorf("inner peer %v", s.InnerPeer)
			}
		}},
		{name: "lifetime", edit: func(s *Spec) {
			s.Lifetime = &LifetimeSpec{SoftBytes: 10, HardBytes: 5, SoftPackets: 1, HardPackets: 2, SoftSeconds: 9, HardSeconds: 0}
		}, errs: []string{`sa "ue1-in": lifetime.soft_bytes: 10 exceeds hard_bytes 5`}},
		{name: "lifetime ok", edit: func(s *Spec) { s.Lifetime = &LifetimeSpec{SoftSeconds: 3000, HardSeconds: 3600} }, check: func(t *testing.T, s SA) {
			if s.Lifetime != (Lifetime{SoftSeconds: 3000, HardSeconds: 3600}) {
				t.Errorf("lifetime %+v", s.Lifetime)
			}
		}},
		{name: "key file refused without dir", edit: func(s *Spec) { s.EncKey = ""; s.EncKeyFile = "k.hex" },
			errs: []string{`sa "ue1-in": enc_key_file: key files are not accepted here; give the key inline`}},
		{name: "both key and file", edit: func(s *Spec) { s.EncKeyFile = "k.hex" },
			errs: []string{`sa "ue1-in": enc_key: give enc_key or enc_key_file, not both`}},
		{name: "label override", edit: func(s *Spec) { s.Name = ""; s.SPI = SPIValue{} }, opts: Options{Label: "sas[3]"},
			errs: []string{`sas[3]: spi: required`}},
		{name: "label override with name", edit: func(s *Spec) { s.Peer = "" }, opts: Options{Label: "sas[2]"},
			errs: []string{`sas[2] "ue1-in": peer: required`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sp := base()
			if c.edit != nil {
				c.edit(&sp)
			}
			s, err := sp.Parse(c.opts)
			if c.errs == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if c.check != nil {
					c.check(t, s)
				}
				return
			}
			got := messages(err)
			if strings.Join(got, "\n") != strings.Join(c.errs, "\n") {
				t.Errorf("errors:\n got  %q\n want %q", got, c.errs)
			}
			for _, e := range Flatten(err) {
				var fe *FieldError
				if !errors.As(e, &fe) {
					t.Errorf("%v is not a *FieldError", e)
				}
			}
		})
	}
}

func messages(err error) []string {
	var out []string
	for _, e := range Flatten(err) {
		out = append(out, e.Error())
	}
	return out
}

func TestSPIForms(t *testing.T) {
	cases := []struct {
		yaml, json string
		want       uint32
		err        string
	}{
		{yaml: `0x00001001`, json: `"0x00001001"`, want: 0x1001},
		{yaml: `"0xDEADbeef"`, json: `"0XDEADBEEF"`, want: 0xdeadbeef},
		{yaml: `4097`, json: `4097`, want: 4097},
		{yaml: `4_097`, want: 4097},
		{yaml: `"4097"`, json: `"4097"`, err: `spi: "4097": a string must be hex with a 0x prefix (or write a plain integer)`},
		{yaml: `00001001`, err: `spi: 00001001 has a leading zero: write 0x0001001 for hex`},
		{yaml: `0x1_0000_0000`, json: `"0x100000000"`, err: `spi: 4294967296 does not fit in 32 bits`},
		{yaml: `"0xzz"`, json: `"0xzz"`, err: `spi: "0xzz" is not a hex number`},
		{yaml: `-5`, json: `-5`, err: `spi: "-5" is not an integer or a 0x hex string`},
		{yaml: `1.5`, json: `1.5`, err: `spi: "1.5" is not an integer or a 0x hex string`},
		{yaml: `[1]`, json: `[1]`, err: `spi: must be an integer or a 0x hex string`},
		{yaml: `true`, json: `true`, err: `spi: "true" is not an integer or a 0x hex string`},
	}
	for _, c := range cases {
		for _, f := range []Format{YAML, JSON} {
			in := c.yaml
			doc := "name: x1\nspi: " + in + "\ndirection: out\nmode: transport\nproposal: aes128gcm16\nenc_key: " +
				strings.Repeat("ab", 20) + "\nlocal: 198.51.100.20\npeer: 192.0.2.10\n"
			if f == JSON {
				if c.json == "" {
					continue
				}
				in = c.json
				doc = `{"name":"x1","spi":` + in + `,"direction":"out","mode":"transport","proposal":"aes128gcm16","enc_key":"` +
					strings.Repeat("ab", 20) + `","local":"198.51.100.20","peer":"192.0.2.10"}`
			}
			sas, err := ParseBytes([]byte(doc), f, Options{})
			if c.err == "" {
				if err != nil || len(sas) != 1 || sas[0].SPI != c.want {
					t.Errorf("%v %s: got %v, %v; want 0x%x", f, in, sas, err, c.want)
				}
				continue
			}
			if want := `sa "x1": ` + c.err; err == nil || err.Error() != want {
				t.Errorf("%v %s: got error %v\nwant %s", f, in, err, want)
			}
		}
	}
}

func TestFileShapesAndErrors(t *testing.T) {
	one := `{"spi": 4097, "direction": "in", "mode": "transport", "proposal": "null-sha1",
	  "auth_key": "` + strings.Repeat("22", 20) + `", "local": "2001:db8::1", "peer": "2001:db8::2"}`
	cases := []struct {
		name string
		f    Format
		doc  string
		n    int
		errs []string
	}{
		{name: "yaml wrapper", f: YAML, doc: formatExample, n: 1},
		{name: "yaml bare list", f: YAML, doc: "# comment\n---\n" + strings.TrimPrefix(strings.ReplaceAll(formatExample, "\n  ", "\n"), "sas:\n"), n: 1},
		{name: "yaml single", f: YAML, doc: "%YAML 1.1\n---\n" + one, n: 1},
		{name: "json single", f: JSON, doc: one, n: 1},
		{name: "json list", f: JSON, doc: " [" + one + "," + strings.Replace(one, "4097", `"0x1002"`, 1) + "]", n: 2},
		{name: "json wrapper", f: JSON, doc: `{"sas": [` + one + "]}", n: 1},
		{name: "empty wrapper", f: YAML, doc: "sas: []\n", n: 0},
		{name: "empty", f: YAML, doc: "# nothing\n", errs: []string{"empty document: no SA"}},
		{name: "empty json", f: JSON, doc: " ", errs: []string{"empty document: no SA"}},
		{name: "two documents", f: YAML, doc: one + "\n---\n" + one, errs: []string{"more than one YAML document: put all SAs in one list"}},
		{name: "json trailing", f: JSON, doc: one + "\n{}", errs: []string{"line 3: data after the JSON value"}},
		{name: "mixed", f: YAML, doc: "sas: []\nspi: 4097\n", errs: []string{"a document is either `sas: [...]` or a single SA, not both"}},
		{name: "yaml unknown field and validation", f: YAML, doc: `sas:
  - name: a
    spi: 0x1001
    direction: in
    mode: transport
    proposal: aes128gcm16
    enc-key: 00
    local: 192.0.2.1
    peer: 192.0.2.2
  - spi: 0x1002
    direction: sideways
    mode: transport
    proposal: aes128gcm16
    enc_key: 000102030405060708090a0b0c0d0e0fcafebabe
    replay_window: many
    local: 192.0.2.1
    peer: 192.0.2.2
  - direction: in
    mode: transport
    proposal: aes128gcm16
    enc_key: 000102030405060708090a0b0c0d0e0fcafebabe
    local: 192.0.2.1
    peer: 192.0.2.2
`, errs: []string{
			`line 7: unknown field "enc-key"`,
			"line 15: cannot unmarshal !!str `many` into uint32",
			`sa "a": enc_key: required: aes128gcm16 needs 20 bytes (16 key + 4 salt)`,
			`sa 0x00001002: direction: "sideways": must be in or out`,
			`sas[2]: spi: required`,
		}},
		{name: "json unknown field", f: JSON, doc: `[{"spi": 4097, "direction": "in", "colour": "red"}]`, errs: []string{
			`line 1: unknown field "colour"`,
			`sa 0x00001001: mode: required (tunnel or transport)`,
			`sa 0x00001001: proposal: required (e.g. aes128gcm16)`,
			`sa 0x00001001: local: required`,
			`sa 0x00001001: peer: required`,
		}},
		{name: "json type", f: JSON, doc: "{\"sas\": [\n" + strings.Replace(one, `"spi"`, `"replay_window": "x", "spi"`, 1) + "]}", errs: []string{
			`line 2: sas.replay_window: a JSON string where an integer from 0 to 4294967295 is wanted`,
		}},
		// One SA, not a list: Go's decoder names the embedded struct
		// ("Spec.enc_key"); the message names the JSON field only.
		{name: "json type one SA", f: JSON, doc: strings.Replace(one, `"spi"`, `"enc_key": 5, "spi"`, 1), errs: []string{
			`line 1: enc_key: a JSON number where a string is wanted`,
		}},
		{name: "json syntax", f: JSON, doc: "[\n{\"spi\": }", errs: []string{`line 2: invalid character '}' looking for beginning of value`}},
		{name: "duplicates", f: YAML, doc: "- " + one + "\n- " + strings.Replace(one, `"spi"`, `"name": "n1", "spi"`, 1) +
			"\n- " + strings.Replace(one, `"spi": 4097`, `"name": "n1", "spi": 4098`, 1), errs: []string{
			`sa "n1": spi: in 0x00001001 is also used by sa 0x00001001`,
			`sa "n1": name: "n1" is also used by sa "n1"`,
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sas, err := ParseBytes([]byte(c.doc), c.f, Options{})
			if c.errs == nil {
				if err != nil {
					t.Fatal(err)
				}
				if len(sas) != c.n {
					t.Fatalf("got %d SAs, want %d", len(sas), c.n)
				}
				return
			}
			if got := messages(err); strings.Join(got, "\n") != strings.Join(c.errs, "\n") {
				t.Errorf("errors:\n got  %q\n want %q", got, c.errs)
			}
		})
	}
}

func TestParseFileKeyFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("keys/ue1.enc", "  0x"+strings.Repeat("11", 16)+"\n")
	write("keys/ue1.auth", strings.Repeat("22", 20)+"\n\n")
	write("keys/big", strings.Repeat("0", maxKeyFile+1))
	doc := `sas:
  - name: ue1-out
    spi: 0xc0000001
    direction: out
    mode: transport
    proposal: aes128-sha1
    enc_key_file: keys/ue1.enc
    auth_key_file: ` + filepath.Join(dir, "keys/ue1.auth") + `
    local: 198.51.100.20
    peer: 192.0.2.10
    encap: {peer_port: 31000}
`
	path := write("sub/../sas.yaml", doc)
	sas, err := ParseFile(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sas[0].EncKey, bytes.Repeat([]byte{0x11}, 16)) || !bytes.Equal(sas[0].AuthKey, bytes.Repeat([]byte{0x22}, 20)) {
		t.Fatalf("keys %x %x", []byte(sas[0].EncKey), []byte(sas[0].AuthKey))
	}
	if id := sas[0].ID(); id != (ID{Dir: Out, SPI: 0xc0000001, Peer: netip.MustParseAddrPort("192.0.2.10:31000")}) {
		t.Errorf("id %v", id)
	}

	bad := strings.NewReplacer("keys/ue1.enc", "keys/missing", filepath.Join(dir, "keys/ue1.auth"), "/dev/zero").Replace(doc) +
		strings.ReplaceAll(strings.ReplaceAll(strings.Replace(doc, "sas:\n", "", 1), "ue1-out", "ue2-out"), "keys/ue1.enc", "keys/big")
	bad = strings.Replace(bad, "0xc0000001", "0xc0000002", 2)
	path = write("bad.yml", bad)
	_, err = ParseFile(path, Options{})
	got := messages(err)
	want := []string{
		path + `: sa "ue1-out": enc_key_file: key file: open ` + filepath.Join(dir, "keys/missing") + `: no such file or directory`,
		path + `: sa "ue1-out": auth_key_file: key file: /dev/zero is not a regular file`,
		path + `: sa "ue2-out": enc_key_file: key file: ` + filepath.Join(dir, "keys/big") + ` is larger than 4096 bytes`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("errors:\n got  %q\n want %q", got, want)
	}

	if _, err := ParseFile(write("sas.txt", doc), Options{}); err == nil || !strings.Contains(err.Error(), `unknown extension ".txt"`) {
		t.Errorf("txt: %v", err)
	}
}

// TestRedaction proves that no printing or encoding path shows key bytes.
func TestRedaction(t *testing.T) {
	sp := base()
	sp.Proposal = "aes128-sha256"
	sp.EncKey = "c0ffee" + strings.Repeat("11", 13)
	sp.AuthKey = "beefed" + strings.Repeat("22", 29)
	s, err := sp.Parse(Options{})
	if err != nil {
		t.Fatal(err)
	}
	j, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	y, err := yaml.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	wrapped, _ := json.Marshal(struct{ K Secret }{s.EncKey})
	outs := map[string]string{
		"json": string(j), "yaml": string(y), "wrapped": string(wrapped),
		"%v": fmt.Sprintf("%v", s), "%+v": fmt.Sprintf("%+v", s), "%#v": fmt.Sprintf("%#v", s),
		"%x key": fmt.Sprintf("%x", s.EncKey), "%v key": fmt.Sprintf("%v", s.AuthKey), "%s key": fmt.Sprintf("%s", s.AuthKey),
		"%+v ptr": fmt.Sprintf("%+v", &s),
	}
	for what, out := range outs {
		if strings.Contains(strings.ToLower(out), "c0ffee") || strings.Contains(strings.ToLower(out), "beefed") || strings.Contains(out, "\xc0\xff\xee") {
			t.Errorf("%s leaks key material: %s", what, out)
		}
	}
	if !strings.Contains(string(j), `"spi":"0x00001001"`) || strings.Contains(string(j), "key") {
		t.Errorf("json = %s", j)
	}

	// The public view plus the keys parses back to the same SA.
	pub := s.Public()
	pub.EncKey, pub.AuthKey = sp.EncKey, sp.AuthKey
	var back Spec
	if err := json.Unmarshal(mustJSON(t, pub), &back); err != nil {
		t.Fatal(err)
	}
	s2, err := back.Parse(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s2.String() != s.String() || s2.ID() != s.ID() || !bytes.Equal(s2.EncKey, s.EncKey) || !bytes.Equal(s2.AuthKey, s.AuthKey) ||
		*s2.Encap != *s.Encap || s2.InnerPeer != s.InnerPeer || s2.ReplayWindow != s.ReplayWindow {
		t.Errorf("round trip: %v != %v", s2.Public(), s.Public())
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDedupRules(t *testing.T) {
	mk := func(dir, peer string, spi uint32, port uint16) *SA {
		s := &SA{SPI: spi, Direction: In, Peer: netip.MustParseAddr(peer)}
		if dir == "out" {
			s.Direction = Out
		}
		if port != 0 {
			s.Encap = &Encap{LocalPort: 4500, PeerPort: port}
		}
		return s
	}
	var d Dedup
	steps := []struct {
		s   *SA
		err string
	}{
		{mk("in", "192.0.2.1", 0x1000, 4500), ""},
		{mk("in", "192.0.2.2", 0x1000, 4500), "b: spi: in 0x00001000 is also used by a"},
		{mk("out", "192.0.2.1", 0x1000, 4500), ""},  // outbound SPI space is separate
		{mk("out", "192.0.2.2", 0x1000, 4500), ""},  // another peer chose the same SPI
		{mk("out", "192.0.2.2", 0x1000, 31000), ""}, // behind one NAPT, another port
		{mk("out", "192.0.2.2", 0x1000, 0), ""},     // plain ESP to the same address
		{mk("out", "192.0.2.1", 0x1000, 4500), "g: spi: out 0x00001000 to 192.0.2.1:4500 is also used by c"},
	}
	for i, st := range steps {
		where := string(rune('a' + i))
		err := d.Add(st.s, where)
		if st.err == "" && err != nil || st.err != "" && (err == nil || err.Error() != st.err) {
			t.Errorf("step %s: got %v, want %q", where, err, st.err)
		}
	}
}

// FuzzParseBytes: arbitrary bytes in either format never panic, and what
// parses satisfies the invariants Parse promises.
func FuzzParseBytes(f *testing.F) {
	f.Add([]byte(formatExample), true)
	f.Add([]byte(`[{"spi":"0x1001","direction":"out","mode":"tunnel","inner":{"local":"::/0","peer":"2001:db8::1"}}]`), false)
	f.Add([]byte("- spi: 00001\n  encap: {}\n  lifetime: {soft_bytes: 3}\n"), true)
	f.Add([]byte("&a [*a, *a]"), true)
	f.Fuzz(func(t *testing.T, data []byte, isYAML bool) {
		format := JSON
		if isYAML {
			format = YAML
		}
		sas, err := ParseBytes(data, format, Options{})
		if err != nil {
			return
		}
		for _, s := range sas {
			if s.SPI < 256 || s.Direction == DirInvalid || s.Mode == ModeInvalid || !s.Proposal.HasIntegrity() ||
				len(s.EncKey) != s.Proposal.EncKeyLen() || len(s.AuthKey) != s.Proposal.AuthKeyLen() ||
				s.Local.Is4() != s.Peer.Is4() || (s.Mode == Tunnel) != s.InnerPeer.IsValid() {
				t.Fatalf("invariant broken: %v", s.Public())
			}
		}
	})
}
