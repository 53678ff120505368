package sastore

import (
	"bytes"
	"encoding/json"
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
