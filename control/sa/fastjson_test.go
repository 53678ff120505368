package sa

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
)

// fastSeeds are objects the fast decoder must take, and objects it must
// leave to encoding/json.
var fastSeeds = []struct {
	doc  string
	fast bool
}{
	{`{"name":"ue1-in","spi":"0x00001001","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"000102030405060708090a0b0c0d0e0fcafebabe","local":"198.51.100.20","peer":"192.0.2.10","encap":{},"inner":{"local":"10.0.0.0/24","peer":"10.99.0.1/32"}}`, true},
	{" {\n \"spi\" : 4097 , \"esn\": true, \"replay_window\": 0, \"encap\": {\"local_port\": 4500, \"peer_port\": 65535},\r\n \"inner\": {\"local\": \"10.0.0.1\", \"core\": \"100.64.0.1\"}, \"lifetime\": {\"soft_bytes\": 18446744073709551615, \"hard_seconds\": 60}, \"ports\": {\"local\": 5060, \"peer\": 0, \"protocol\": \"udp\"}, \"dscp\": 46, \"idle_timeout\": 90, \"pair\": \"p1\", \"auth_key\": \"\", \"enc_key_file\": \"k\", \"auth_key_file\": \"a\", \"esn\": false} ", false}, // esn twice
	{`{"spi": 4097, "esn": false, "dscp": 255, "lifetime": {}, "ports": {}}`, true},
	{`{}`, true},
	{`{"spi": "zz"}`, true},  // kept as raw, Parse reports it
	{`{"spi": 00}`, false},   // not JSON
	{`{"spi": 1.5}`, false},  // json's words
	{`{"spi": -1}`, false},   // json's words
	{`{"SPI": 4097}`, false}, // case-folded match: json's rule
	{`{"spi": 4097, "spi": 1}`, false},
	{`{"colour": "red"}`, false},     // unknown field
	{`{"name": "caf\u00e9"}`, false}, // escapes
	{"{\"name\": \"caf\xc3\xa9\"}", false},
	{`{"name": null}`, false},
	{`{"replay_window": 4294967296}`, false},
	{`{"replay_window": 4294967295}`, true},
	{`{"dscp": 256}`, false},
	{`{"encap": {"peer_port": 65536}}`, false},
	{`{"encap": {"peer_port": 1, "peer_port": 2}}`, false},
	{`{"esn": truex}`, false},
	{`{"esn": 1}`, false},
	{`{"spi": 4097} {}`, false},
	{`{"spi": 4097,}`, false},
	{`{"inner": {"local": "a", "zone": "b"}}`, false},
	{`[]`, false},
}

// checkFast: when the fast decoder takes doc, encoding/json (with unknown
// fields refused) takes it too and fills the same Spec; so does the fast
// decoder with scratch storage left dirty by an earlier item.
func checkFast(t *testing.T, doc []byte) bool {
	t.Helper()
	var fast Spec
	if !fastSpec(doc, &fast, nil) {
		return false
	}
	seven := uint16(7)
	dirty := specScratch{encap: EncapSpec{LocalPort: &seven, PeerPort: &seven},
		inner: InnerSpec{Local: "dirty", Peer: "dirty", Core: "dirty"}, ports: [2]uint16{7, 7}}
	var reused Spec
	if !fastSpec(doc, &reused, &dirty) {
		t.Fatalf("%q: taken without scratch, refused with it", doc)
	}
	if !reflect.DeepEqual(fast, reused) {
		t.Fatalf("%q:\n fresh   %+v\n scratch %+v", doc, fast, reused)
	}
	var slow Spec
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&slow); err != nil || dec.More() {
		t.Fatalf("fast decoder took %q, encoding/json refuses it: %v", doc, err)
	}
	if !reflect.DeepEqual(fast, slow) {
		t.Fatalf("%q:\n fast %+v\n json %+v", doc, fast, slow)
	}
	return true
}

func TestFastSpecMatchesJSON(t *testing.T) {
	for _, s := range fastSeeds {
		if got := checkFast(t, []byte(s.doc)); got != s.fast {
			t.Errorf("%q: fast path %v, want %v", s.doc, got, s.fast)
		}
	}
}

func FuzzFastSpec(f *testing.F) {
	for _, s := range fastSeeds {
		f.Add([]byte(s.doc))
	}
	f.Fuzz(func(t *testing.T, doc []byte) { checkFast(t, doc) })
}
