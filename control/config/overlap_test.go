package config

import (
	"strings"
	"testing"
)

// twoPhones is issue 12's case: two phones behind different NAPTs, both
// 192.168.1.10 inside, each with its own SA pair.
const twoPhones = minimal + `sas:
  - {name: a-in,  spi: 0x1001, direction: in,  mode: tunnel, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.7, encap: {}, inner: {local: 10.0.0.0/24, peer: 192.168.1.10}}
  - {name: a-out, spi: 0x2001, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.7, encap: {}, inner: {local: 10.0.0.0/24, peer: 192.168.1.10}}
  - {name: b-in,  spi: 0x1002, direction: in,  mode: tunnel, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.8, encap: {}, inner: {local: 10.0.0.0/24, peer: 192.168.1.10}}
  - {name: b-out, spi: 0x2002, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.8, encap: {}, inner: {local: 10.0.0.0/24, peer: 192.168.1.10}}
`

// Without core addresses the two outbound SAs claim the same cleartext:
// refused, naming both and the shared selector.
func TestOverlappingPhonesRefused(t *testing.T) {
	_, err := Parse([]byte(twoPhones), "xesp.yaml")
	if err == nil {
		t.Fatal("ambiguous config accepted")
	}
	msgs := messages(err)
	if len(msgs) != 1 {
		t.Fatalf("want one error, got %q", msgs)
	}
	for _, want := range []string{`config xesp.yaml: sas[3] "b-out"`, `sas[1] "a-out"`, "destination 192.168.1.10/32", "local port any, peer port any"} {
		if !strings.Contains(msgs[0], want) {
			t.Errorf("%q lacks %q", msgs[0], want)
		}
	}
}

// core_pool gives each phone's pair its own core address (both SAs of a
// pair the same), which makes the config unambiguous; the effective
// config shows the allocation.
func TestCorePoolAllocates(t *testing.T) {
	c, err := Parse([]byte(twoPhones+"core_pool: 100.64.0.0/10\n"), "xesp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a-in": "100.64.0.1", "a-out": "100.64.0.1", "b-in": "100.64.0.2", "b-out": "100.64.0.2"}
	for _, s := range c.SAList {
		if s.Core.String() != want[s.Name] {
			t.Errorf("%s: core %v, want %s", s.Name, s.Core, want[s.Name])
		}
	}
	out, err := c.Effective()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(out), "core: 100.64.0.1") != 2 || strings.Count(string(out), "core: 100.64.0.2") != 2 {
		t.Errorf("effective config does not show the cores:\n%s", out)
	}
}

// Explicit cores: the same core address on two phones is refused; ports
// that differ make SAs of one core unambiguous; an SA's core inside
// another SA's inner.peer prefix is refused; a bad core_pool and a core
// with an inner.peer prefix are named.
func TestCoreRules(t *testing.T) {
	sa := func(name, spi, peer, core, ports string) string {
		s := `  - {name: ` + name + `, spi: ` + spi + `, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: ` + key20 +
			`, local: 198.51.100.20, peer: ` + peer + `, encap: {}, inner: {local: 10.0.0.0/24, peer: 192.168.1.10`
		if core != "" {
			s += `, core: ` + core
		}
		s += `}`
		if ports != "" {
			s += `, ports: ` + ports
		}
		return s + "}\n"
	}
	for _, c := range []struct {
		name, sas, extra string
		want             []string // substrings of the one error; none: accepted
	}{
		{"same-core", sa("a", "0x2001", "203.0.113.7", "100.64.0.1", "") + sa("b", "0x2002", "203.0.113.8", "100.64.0.1", ""), "",
			[]string{`sas[1] "b"`, `sas[0] "a"`, "destination 100.64.0.1/32"}},
		{"distinct-ports", sa("a", "0x2001", "203.0.113.7", "100.64.0.1", "{local: 5063, peer: 5060}") + sa("b", "0x2002", "203.0.113.7", "100.64.0.1", "{local: 5065, peer: 5062}"), "", nil},
		{"same-peer-port-any-local", sa("a", "0x2001", "203.0.113.7", "100.64.0.1", "{peer: 5060}") + sa("b", "0x2002", "203.0.113.7", "100.64.0.1", "{local: 5065, peer: 5060}"), "",
			[]string{`sas[1] "b"`, `sas[0] "a"`, "local port 5065, peer port 5060"}},
		{"core-inside-prefix", sa("a", "0x2001", "203.0.113.7", "100.64.0.1", "") +
			`  - {name: site, spi: 0x2003, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.9, inner: {local: 10.0.0.0/24, peer: 100.64.0.0/16}}` + "\n", "",
			[]string{`sas[1] "site"`, `sas[0] "a"`, "destination 100.64.0.1/32"}},
		{"bad-pool", sa("a", "0x2001", "203.0.113.7", "", ""), "core_pool: 100.64.0.1/10\n", []string{"core_pool: 100.64.0.1/10 has host bits set"}},
		{"core-with-prefix", strings.Replace(sa("a", "0x2001", "203.0.113.7", "100.64.0.1", ""), "peer: 192.168.1.10", "peer: 192.168.1.0/24", 1), "",
			[]string{`inner.peer: 192.168.1.0/24: with inner.core, inner.peer must be the phone's one address`}},
		{"core-family", sa("a", "0x2001", "203.0.113.7", "2001:db8::1", ""), "", []string{"inner.core: 2001:db8::1 and inner.peer 192.168.1.10/32 are of different address families"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse([]byte(minimal+c.extra+"sas:\n"+c.sas), "xesp.yaml")
			if len(c.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			msgs := messages(err)
			if len(msgs) != 1 {
				t.Fatalf("want one error, got %q", msgs)
			}
			for _, w := range c.want {
				if !strings.Contains(msgs[0], w) {
					t.Errorf("%q lacks %q", msgs[0], w)
				}
			}
		})
	}
}

// twoTransportPhones: two phones in transport mode, one behind a NAPT
// (UDP-encapsulated), one without (plain ESP), both to the P-CSCF.
const twoTransportPhones = minimal + `sas:
  - {name: a-in,  spi: 0x1001, direction: in,  mode: transport, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.7, encap: {}, inner: {local: 10.0.0.1}}
  - {name: a-out, spi: 0x2001, direction: out, mode: transport, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.7, encap: {}, inner: {local: 10.0.0.1}}
  - {name: b-in,  spi: 0x1002, direction: in,  mode: transport, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.8, inner: {local: 10.0.0.1}}
  - {name: b-out, spi: 0x2002, direction: out, mode: transport, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 203.0.113.8, inner: {local: 10.0.0.1}}
`

// Transport-mode SAs need a core address: without core_pool each is
// refused naming its path and the fix; with one, each phone's pair gets
// its own (shared by the pair), shown in the effective config. A
// transport SA without inner.local is refused naming that field.
func TestTransportNeedsCore(t *testing.T) {
	_, err := Parse([]byte(twoTransportPhones), "xesp.yaml")
	msgs := messages(err)
	if len(msgs) != 4 || !strings.Contains(msgs[0], `config xesp.yaml: sas[0] "a-in": inner.core: required in transport mode: the phone's core address; name one, or set core_pool to allocate it`) {
		t.Fatalf("errors %q", msgs)
	}
	c, err := Parse([]byte(twoTransportPhones+"core_pool: 100.64.0.0/10\n"), "xesp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a-in": "100.64.0.1", "a-out": "100.64.0.1", "b-in": "100.64.0.2", "b-out": "100.64.0.2"}
	for _, s := range c.SAList {
		if s.Core.String() != want[s.Name] || s.InnerLocal.String() != "10.0.0.1/32" {
			t.Errorf("%s: core %v inner.local %v, want %s", s.Name, s.Core, s.InnerLocal, want[s.Name])
		}
	}
	out, err := c.Effective()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(out), "core: 100.64.0.1") != 2 || strings.Contains(string(out), "peer: \"\"") {
		t.Errorf("effective config:\n%s", out)
	}
	noLocal := strings.ReplaceAll(twoTransportPhones, "inner: {local: 10.0.0.1}", "inner: {core: 100.64.0.9}")
	_, err = Parse([]byte(noLocal), "xesp.yaml")
	if msgs := messages(err); len(msgs) == 0 || !strings.Contains(msgs[0], `sas[0] "a-in": inner.local: required in transport mode`) {
		t.Fatalf("errors %q", msgs)
	}
}
