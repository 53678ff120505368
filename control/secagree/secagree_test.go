package secagree

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/md5"
	"crypto/sha1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

// The header combinations: each row is a value as a phone or a P-CSCF
// writes it, what it decodes to, and the canonical form String produces.
func TestParseCombinations(t *testing.T) {
	cases := []struct {
		name, in string
		want     []Mechanism
		canon    string
	}{
		{
			name: "TS 24.229 style client, leading-zero SPIs, no ealg/mod/prot",
			in:   "ipsec-3gpp; alg=hmac-sha-1-96; spi-c=0023456789; spi-s=12345678; port-c=2468; port-s=1357",
			want: []Mechanism{{Name: "ipsec-3gpp", Alg: "hmac-sha-1-96", SPIC: 23456789, SPIS: 12345678, PortC: 2468, PortS: 1357,
				HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true}},
			canon: "ipsec-3gpp;alg=hmac-sha-1-96;spi-c=23456789;spi-s=12345678;port-c=2468;port-s=1357",
		},
		{
			name: "every parameter, UDP-enc-tun, q",
			in:   "ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=4294967295;spi-s=256;port-c=65535;port-s=1",
			want: []Mechanism{{Name: "ipsec-3gpp", Q: 100, HasQ: true, Prot: "esp", Mod: ModeUDPEncTun, Ealg: "aes-cbc", Alg: "hmac-sha-1-96",
				SPIC: 4294967295, SPIS: 256, PortC: 65535, PortS: 1, HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true}},
			canon: "ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=4294967295;spi-s=256;port-c=65535;port-s=1",
		},
		{
			name: "case-insensitive names and values, LWS and folding, mod=tun",
			in:   " IPSEC-3GPP ;\r\n\tALG = hmac-md5-96 ; Mod=TUN; Prot=ESP; EALG=null; SPI-C=1000; Spi-S=1001; PORT-C=5062; port-S=5064 ",
			want: []Mechanism{{Name: "IPSEC-3GPP", Alg: "hmac-md5-96", Mod: ModeTun, Prot: "esp", Ealg: "null",
				SPIC: 1000, SPIS: 1001, PortC: 5062, PortS: 5064, HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true}},
			canon: "IPSEC-3GPP;prot=esp;mod=tun;ealg=null;alg=hmac-md5-96;spi-c=1000;spi-s=1001;port-c=5062;port-s=5064",
		},
		{
			name: "two ipsec-3gpp offers, mod=trans, prot=ah, q=1 and q=0.500",
			in:   "ipsec-3gpp;q=1;alg=hmac-sha-1-96;ealg=des-ede3-cbc;mod=trans;spi-c=300;spi-s=301;port-c=1;port-s=2, ipsec-3gpp;q=0.500;prot=ah;alg=hmac-md5-96;spi-c=302;spi-s=303;port-c=3;port-s=4",
			want: []Mechanism{
				{Name: "ipsec-3gpp", Q: 1000, HasQ: true, Alg: "hmac-sha-1-96", Ealg: "des-ede3-cbc", Mod: ModeTrans, SPIC: 300, SPIS: 301, PortC: 1, PortS: 2, HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true},
				{Name: "ipsec-3gpp", Q: 500, HasQ: true, Prot: "ah", Alg: "hmac-md5-96", SPIC: 302, SPIS: 303, PortC: 3, PortS: 4, HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true},
			},
			canon: "ipsec-3gpp;q=1;mod=trans;ealg=des-ede3-cbc;alg=hmac-sha-1-96;spi-c=300;spi-s=301;port-c=1;port-s=2, ipsec-3gpp;q=0.5;prot=ah;alg=hmac-md5-96;spi-c=302;spi-s=303;port-c=3;port-s=4",
		},
		{
			name: "other mechanisms kept: digest with quoted values, tls, extension on ipsec-3gpp, empty list elements",
			in:   `digest;d-alg=md5;d-qop=auth-int;d-ver="0,1;x";q=0.2, tls;q=0.3,,ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1;spi-s=2;port-c=3;port-s=4;x-ext;y-ext="a b"`,
			want: []Mechanism{
				{Name: "digest", Q: 200, HasQ: true, Extra: []Param{{Name: "d-alg", Value: "md5"}, {Name: "d-qop", Value: "auth-int"}, {Name: "d-ver", Value: `"0,1;x"`}}},
				{Name: "tls", Q: 300, HasQ: true},
				{Name: "ipsec-3gpp", Alg: "hmac-sha-1-96", SPIC: 1, SPIS: 2, PortC: 3, PortS: 4, HasSPIC: true, HasSPIS: true, HasPortC: true, HasPortS: true,
					Extra: []Param{{Name: "x-ext", Bare: true}, {Name: "y-ext", Value: `"a b"`}}},
			},
			canon: `digest;q=0.2;d-alg=md5;d-qop=auth-int;d-ver="0,1;x", tls;q=0.3, ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1;spi-s=2;port-c=3;port-s=4;x-ext;y-ext="a b"`,
		},
		{
			name:  "q=0 and q=0. and q=1.000",
			in:    "tls;q=0, tls;q=0., tls;q=1.000",
			want:  []Mechanism{{Name: "tls", HasQ: true}, {Name: "tls", HasQ: true}, {Name: "tls", Q: 1000, HasQ: true}},
			canon: "tls;q=0, tls;q=0, tls;q=1",
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Parse(c.in)
			if err != nil {
				t.Fatal(err)
			}
			if !equalLists(got, c.want) {
				t.Fatalf("parsed\n got %+v\nwant %+v", got, c.want)
			}
			if f := Format(got); f != c.canon {
				t.Fatalf("produced\n got %s\nwant %s", f, c.canon)
			}
			again, err := Parse(c.canon)
			if err != nil || !equalLists(again, got) {
				t.Fatalf("canonical form does not read back: %v\n%+v", err, again)
			}
			if err := Verify(c.canon, got); err != nil {
				t.Fatalf("verify against itself: %v", err)
			}
		})
	}
}

func equalLists(a, b []Mechanism) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if len(x.Extra) == 0 && len(y.Extra) == 0 {
			x.Extra, y.Extra = nil, nil
		}
		if x.Name != y.Name || x.String() != y.String() || !Same(&x, &y) || x.Alg != y.Alg || x.Ealg != y.Ealg || x.Prot != y.Prot || x.Mod != y.Mod {
			return false
		}
	}
	return true
}

// Every malformed value is refused with a message naming the mechanism
// and the parameter.
func TestParseErrors(t *testing.T) {
	const ok = "alg=hmac-sha-1-96;spi-c=1000;spi-s=1001;port-c=5062;port-s=5064"
	cases := []struct{ in, want string }{
		{"", "no mechanism"},
		{" , ,", "no mechanism"},
		{"ipsec-3gpp;spi-c=1000;spi-s=1001;port-c=5062;port-s=5064", "mechanism 1 (ipsec-3gpp): alg: required for ipsec-3gpp"},
		{"ipsec-3gpp;alg=hmac-sha-1-96;spi-s=1001;port-c=5062;port-s=5064", "spi-c: required"},
		{"ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1000;port-c=5062;port-s=5064", "spi-s: required"},
		{"ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1000;spi-s=1001;port-s=5064", "port-c: required"},
		{"ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1000;spi-s=1001;port-c=5062", "port-s: required"},
		{"tls, ipsec-3gpp;" + ok + ";spi-c=7", "mechanism 2 (ipsec-3gpp): spi-c: given twice"},
		{"ipsec-3gpp;" + ok + ";SPI-S=7", "spi-s: given twice"},
		{"ipsec-3gpp;alg=x;spi-c=4294967296;spi-s=1;port-c=1;port-s=2", "spi-c: 4294967296 does not fit in 32 bits"},
		{"ipsec-3gpp;alg=x;spi-c=0x10;spi-s=1;port-c=1;port-s=2", `spi-c: "0x10" is not a decimal number`},
		{"ipsec-3gpp;alg=x;spi-c=-1;spi-s=1;port-c=1;port-s=2", `spi-c: "-1" is not a decimal number`},
		{"ipsec-3gpp;alg=x;spi-c=1;spi-s=1;port-c=0;port-s=2", "port-c: 0: want a port 1..65535"},
		{"ipsec-3gpp;alg=x;spi-c=1;spi-s=1;port-c=1;port-s=65536", "port-s: 65536: want a port 1..65535"},
		{"ipsec-3gpp;" + ok + ";mod=transport", `mod: "transport": want trans, tun or UDP-enc-tun`},
		{"ipsec-3gpp;" + ok + ";prot=udp", `prot: "udp": want esp or ah`},
		{"ipsec-3gpp;" + ok + ";q=1.5", `q: "1.5": want a qvalue`},
		{"ipsec-3gpp;" + ok + ";q=0.1234", `q: "0.1234": want a qvalue`},
		{"ipsec-3gpp;" + ok + ";q=2", `q: "2": want a qvalue`},
		{"ipsec-3gpp;" + ok + ";q", "q: needs a value"},
		{"ipsec-3gpp;" + ok + ";alg", "alg: given twice"},
		{"ipsec-3gpp;ealg;" + ok, "ealg: needs a value"},
		{"ipsec-3gpp;" + ok + ";;", "empty parameter"},
		{"ipsec 3gpp;" + ok, `mechanism name "ipsec 3gpp" is not a token`},
		{"ipsec-3gpp;" + ok + ";x y=1", `parameter name "x y" is not a token`},
		{"ipsec-3gpp;" + ok + `;x="unterminated`, "unterminated quoted string"},
		{"ipsec-3gpp;" + ok + `;x=a"b"`, `x: value "a\"b\"" is neither a token`},
		{strings.Repeat("tls,", maxMechanisms+1), "more than 32 mechanisms"},
		{"tls" + strings.Repeat(";a", maxParams+1), "more than 32 parameters"},
		{strings.Repeat("x", maxValueLen+1), "longer than"},
	}
	for _, c := range cases {
		_, err := Parse(c.in)
		var pe *ParseError
		if err == nil || !errors.As(err, &pe) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Parse(%.60q): %v, want an error containing %q", c.in, err, c.want)
		}
	}
}

func TestVerifyDetectsChanges(t *testing.T) {
	sent, err := Parse("ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065")
	if err != nil {
		t.Fatal(err)
	}
	// Equal by meaning: reordered, other case, LWS.
	if err := Verify(" ipsec-3GPP ; alg=hmac-sha-1-96;spi-s=5001; SPI-C=5000;port-s=5065;port-c=5063;ealg=aes-cbc;MOD=udp-enc-tun;prot=ESP;q=0.100", sent); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		"ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=null;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065",    // downgraded ealg
		"ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065",              // ealg dropped
		"ipsec-3gpp;q=0.1;prot=esp;mod=trans;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065",       // mod
		"ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=5000;spi-s=5002;port-c=5063;port-s=5065", // spi-s
		"ipsec-3gpp;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065",       // q
		"ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065, tls",
		"ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=5000;spi-s=5001;port-c=5063;port-s=5065;x=1",
		"garbage=",
	} {
		if err := Verify(bad, sent); err == nil {
			t.Errorf("Verify accepted %q", bad)
		}
	}
}

func TestChoose(t *testing.T) {
	mech := func(s string) []Mechanism {
		t.Helper()
		m, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	const ids = ";spi-c=1000;spi-s=1001;port-c=5062;port-s=5064"
	pol := DefaultPolicy()
	cases := []struct {
		name, offer string
		pol         Policy
		want        int // index into the offer, -1: error
		err         string
	}{
		{"UDP-enc-tun beats trans though offered later", "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc" + ids + ", ipsec-3gpp;mod=UDP-enc-tun;alg=hmac-sha-1-96;ealg=aes-cbc" + ids, pol, 1, ""},
		{"aes-cbc beats null", "ipsec-3gpp;mod=UDP-enc-tun;alg=hmac-sha-1-96;ealg=null" + ids + ", ipsec-3gpp;mod=UDP-enc-tun;alg=hmac-sha-1-96;ealg=aes-cbc" + ids, pol, 1, ""},
		{"absent ealg is null and acceptable", "ipsec-3gpp;alg=hmac-md5-96" + ids + ", ipsec-3gpp;alg=hmac-sha-1-96" + ids, pol, 1, ""},
		{"q breaks a tie", "ipsec-3gpp;q=0.2;alg=hmac-sha-1-96" + ids + ";x=a, ipsec-3gpp;q=0.9;alg=hmac-sha-1-96" + ids + ";x=b", pol, 1, ""},
		{"absent q ranks as 1", "ipsec-3gpp;q=0.9;alg=hmac-sha-1-96" + ids + ";x=a, ipsec-3gpp;alg=hmac-sha-1-96" + ids + ";x=b", pol, 1, ""},
		{"offer order breaks the rest", "ipsec-3gpp;alg=hmac-sha-1-96" + ids + ";x=a, ipsec-3gpp;alg=hmac-sha-1-96" + ids + ";x=b", pol, 0, ""},
		{"policy may prefer md5 when it lists it", "ipsec-3gpp;alg=hmac-sha-1-96" + ids + ", ipsec-3gpp;alg=hmac-md5-96" + ids,
			Policy{Algs: []string{AlgHMACMD596, AlgHMACSHA196}, Ealgs: []string{EalgNull}, Mods: []Mode{ModeTrans}}, 1, ""},
		{"other mechanisms ignored", "digest;d-alg=md5, tls, ipsec-3gpp;alg=hmac-sha-1-96" + ids, pol, 2, ""},
		{"md5-only offer accepted by default", "ipsec-3gpp;alg=hmac-md5-96;ealg=aes-cbc" + ids, pol, 0, ""},
		{"sha-1 beats md5 by default", "ipsec-3gpp;alg=hmac-md5-96;ealg=aes-cbc" + ids + ", ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc" + ids, pol, 1, ""},
		{"nothing acceptable, every reason", "ipsec-3gpp;alg=hmac-md5-96" + ids + ", ipsec-3gpp;alg=hmac-sha-1-96;ealg=des-ede3-cbc" + ids + ", ipsec-3gpp;prot=ah;alg=hmac-sha-1-96" + ids,
			Policy{Algs: []string{AlgHMACSHA196}, Ealgs: pol.Ealgs, Mods: pol.Mods}, -1, "mechanism 1: alg=hmac-md5-96 is not accepted; mechanism 2: ealg=des-ede3-cbc is not accepted; mechanism 3: prot=ah is not supported"},
		{"mod refused", "ipsec-3gpp;mod=tun;alg=hmac-sha-1-96" + ids, Policy{Algs: []string{AlgHMACSHA196}, Ealgs: []string{EalgNull}, Mods: []Mode{ModeUDPEncTun}}, -1, "mod=tun is not accepted"},
		{"no ipsec-3gpp", "tls;q=0.1, digest", pol, -1, "no ipsec-3gpp mechanism offered"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			offer := mech(c.offer)
			got, err := Choose(offer, c.pol)
			if c.want < 0 {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("got %v, want error %q", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.String() != offer[c.want].String() {
				t.Fatalf("chose %s, want %s", got.String(), offer[c.want].String())
			}
		})
	}
}

// Known answers of TS 33.203 Annex I, written out by hand from the rule.
func TestExpandKeysKnownAnswers(t *testing.T) {
	ck := mustHex(t, "000102030405060708090a0b0c0d0e0f")
	ik := mustHex(t, "f0e1d2c3b4a5968778695a4b3c2d1e0f")
	cases := []struct {
		alg, ealg, auth, enc string
	}{
		{AlgHMACSHA196, EalgAESCBC, "f0e1d2c3b4a5968778695a4b3c2d1e0f00000000", "000102030405060708090a0b0c0d0e0f"},
		{AlgHMACSHA196, EalgNull, "f0e1d2c3b4a5968778695a4b3c2d1e0f00000000", ""},
		{AlgHMACSHA196, "", "f0e1d2c3b4a5968778695a4b3c2d1e0f00000000", ""},
		{AlgHMACMD596, EalgAESCBC, "f0e1d2c3b4a5968778695a4b3c2d1e0f", "000102030405060708090a0b0c0d0e0f"},
		{AlgHMACMD596, EalgDESEDE3, "f0e1d2c3b4a5968778695a4b3c2d1e0f", "000102030405060708090a0b0c0d0e0f0001020304050607"},
	}
	for _, c := range cases {
		k, err := ExpandKeys(c.alg, c.ealg, ck, ik)
		if err != nil {
			t.Fatalf("%s/%s: %v", c.alg, c.ealg, err)
		}
		if hex.EncodeToString(k.Auth) != c.auth || hex.EncodeToString(k.Enc) != c.enc {
			t.Errorf("%s/%s: auth %x enc %x, want %s %s", c.alg, c.ealg, k.Auth, k.Enc, c.auth, c.enc)
		}
	}
	// The expansion must not alias the caller's keys.
	k, _ := ExpandKeys(AlgHMACSHA196, EalgAESCBC, ck, ik)
	k.Auth[0], k.Enc[0] = 0xaa, 0xaa
	if ik[0] != 0xf0 || ck[0] != 0x00 {
		t.Fatal("ExpandKeys aliases CK or IK")
	}
	for _, bad := range []struct{ alg, ealg, want string }{
		{"hmac-sha-256", EalgNull, `alg: "hmac-sha-256"`},
		{AlgHMACSHA196, "aes-gcm", `ealg: "aes-gcm"`},
	} {
		if _, err := ExpandKeys(bad.alg, bad.ealg, ck, ik); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s/%s: %v", bad.alg, bad.ealg, err)
		}
	}
	if _, err := ExpandKeys(AlgHMACSHA196, EalgAESCBC, ck[:15], ik); err == nil || !strings.Contains(err.Error(), "ck: need 16 bytes") {
		t.Errorf("short ck: %v", err)
	}
	if _, err := ExpandKeys(AlgHMACSHA196, EalgNull, nil, ik[:8]); err == nil || !strings.Contains(err.Error(), "ik: need 16 bytes") {
		t.Errorf("short ik: %v", err)
	}
	if _, err := ExpandKeys(AlgHMACSHA196, EalgNull, nil, ik); err != nil {
		t.Errorf("null encryption needs no ck: %v", err)
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testRegistration(t *testing.T, mod, ealg string) Registration {
	t.Helper()
	return testRegistrationAlg(t, AlgHMACSHA196, mod, ealg)
}

func testRegistrationAlg(t *testing.T, alg, mod, ealg string) Registration {
	t.Helper()
	client, err := Parse("ipsec-3gpp;alg=" + alg + ";ealg=" + ealg + ";mod=" + mod + ";spi-c=1111;spi-s=2222;port-c=5062;port-s=5064")
	if err != nil {
		t.Fatal(err)
	}
	return Registration{
		Name: "reg1", Client: client[0], Server: Server(client[0], DefaultPolicy(), 3333, 4444, 5063, 5065),
		CK: mustHex(t, "000102030405060708090a0b0c0d0e0f"), IK: mustHex(t, "f0e1d2c3b4a5968778695a4b3c2d1e0f"),
		Local: netip.MustParseAddr("192.0.2.1"), UE: netip.MustParseAddrPort("198.51.100.7:31000"),
		UEInner: netip.MustParseAddr("192.168.1.11"), PCSCF: netip.MustParseAddr("10.0.0.1"),
	}
}

// The four SAs of TS 33.203 7.1 with the right SPIs, directions, ports,
// modes, encapsulation and keys.
func TestDeriveFourSAs(t *testing.T) {
	r := testRegistration(t, "UDP-enc-tun", "aes-cbc")
	ds, err := Derive(r)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		role, dir string
		spi       uint32
		src, dst  uint16
	}{
		{"in-s", "in", 4444, 5062, 5065},
		{"in-c", "in", 3333, 5064, 5063},
		{"out-s", "out", 2222, 5063, 5064},
		{"out-c", "out", 1111, 5065, 5062},
	}
	if len(ds) != 4 {
		t.Fatalf("%d SAs", len(ds))
	}
	for i, w := range want {
		d := ds[i]
		s, err := d.Spec.Parse(sa.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if d.Role != w.role || s.Direction.String() != w.dir || s.SPI != w.spi || d.SrcPort != w.src || d.DstPort != w.dst {
			t.Errorf("SA %d: %s %s 0x%x %d->%d, want %+v", i, d.Role, s.Direction, s.SPI, d.SrcPort, d.DstPort, w)
		}
		if s.Name != "reg1."+w.role || s.Pair != "reg1" || s.Mode != sa.Tunnel || s.Proposal != esp.AES128SHA1 ||
			s.Local != r.Local || s.Peer != r.UE.Addr() || s.Encap == nil || s.Encap.LocalPort != 4500 || s.Encap.PeerPort != 31000 ||
			s.InnerLocal.String() != "10.0.0.1/32" || s.InnerPeer.String() != "192.168.1.11/32" {
			t.Errorf("SA %d: %v encap %+v inner %s %s", i, s, s.Encap, s.InnerLocal, s.InnerPeer)
		}
		if want := (sa.Ports{Local: map[string]uint16{"in-s": 5065, "in-c": 5063, "out-s": 5063, "out-c": 5065}[w.role],
			Peer: map[string]uint16{"in-s": 5062, "in-c": 5064, "out-s": 5064, "out-c": 5062}[w.role]}); s.Ports != want {
			t.Errorf("SA %d: ports %+v, want %+v", i, s.Ports, want)
		}
		if hex.EncodeToString(s.EncKey) != "000102030405060708090a0b0c0d0e0f" || hex.EncodeToString(s.AuthKey) != "f0e1d2c3b4a5968778695a4b3c2d1e0f00000000" {
			t.Errorf("SA %d: keys not the Annex I expansion", i)
		}
	}

	// trans: transport mode, plain ESP, no selectors; tun: tunnel, plain ESP.
	// hmac-md5-96 (RFC 2403) takes IK as is, no zero padding.
	for _, c := range []struct {
		alg, mod, ealg string
		mode           sa.Mode
		prop           esp.Proposal
		auth           string
	}{
		{AlgHMACSHA196, "trans", "null", sa.Transport, esp.NullSHA1, "f0e1d2c3b4a5968778695a4b3c2d1e0f00000000"},
		{AlgHMACSHA196, "tun", "aes-cbc", sa.Tunnel, esp.AES128SHA1, "f0e1d2c3b4a5968778695a4b3c2d1e0f00000000"},
		{AlgHMACMD596, "trans", "null", sa.Transport, esp.NullMD5, "f0e1d2c3b4a5968778695a4b3c2d1e0f"},
		{AlgHMACMD596, "tun", "aes-cbc", sa.Tunnel, esp.AES128MD5, "f0e1d2c3b4a5968778695a4b3c2d1e0f"},
	} {
		ds, err := Derive(testRegistrationAlg(t, c.alg, c.mod, c.ealg))
		if err != nil {
			t.Fatal(err)
		}
		if len(ds) != 4 {
			t.Fatalf("%s mod=%s: %d SAs", c.alg, c.mod, len(ds))
		}
		for _, d := range ds {
			s, err := d.Spec.Parse(sa.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if s.Mode != c.mode || s.Encap != nil || s.Proposal != c.prop || (c.mode == sa.Transport) == s.InnerPeer.IsValid() {
				t.Errorf("%s mod=%s: %v encap %v", c.alg, c.mod, s, s.Encap)
			}
			if hex.EncodeToString(s.AuthKey) != c.auth {
				t.Errorf("%s mod=%s: auth key %x, want %s", c.alg, c.mod, s.AuthKey, c.auth)
			}
		}
	}
}

func TestDeriveRefuses(t *testing.T) {
	mut := func(f func(r *Registration)) Registration {
		r := testRegistration(t, "UDP-enc-tun", "aes-cbc")
		f(&r)
		return r
	}
	cases := []struct {
		name string
		r    Registration
		want string
	}{
		{"unknown alg", mut(func(r *Registration) { r.Client.Alg, r.Server.Alg = "hmac-sha-256-128", "hmac-sha-256-128" }), `alg: "hmac-sha-256-128"`},
		{"md5 with 3des", mut(func(r *Registration) {
			r.Client.Alg, r.Server.Alg = AlgHMACMD596, AlgHMACMD596
			r.Client.Ealg, r.Server.Ealg = EalgDESEDE3, EalgDESEDE3
		}), "ealg: des-ede3-cbc: the ESP engine has no 3DES"},
		{"3des", mut(func(r *Registration) { r.Client.Ealg, r.Server.Ealg = EalgDESEDE3, EalgDESEDE3 }), "ealg: des-ede3-cbc: the ESP engine has no 3DES"},
		{"disagree", mut(func(r *Registration) { r.Server.Ealg = EalgNull }), "client and server mechanisms disagree"},
		{"ah", mut(func(r *Registration) { r.Client.Prot, r.Server.Prot = "ah", "ah" }), "prot: only esp"},
		{"short ck", mut(func(r *Registration) { r.CK = r.CK[:8] }), "ck: need 16 bytes"},
		{"no ue", mut(func(r *Registration) { r.UE = netip.AddrPort{} }), "ue: need the phone's observed address"},
		{"no inner", mut(func(r *Registration) { r.UEInner = netip.Addr{} }), "ue_inner, pcscf: mod=UDP-enc-tun needs both"},
		{"name", mut(func(r *Registration) { r.Name = strings.Repeat("a", 59) }), "registration: want 1..58"},
		{"bad name", mut(func(r *Registration) { r.Name = "1reg" }), `name: "1reg.in-s"`},
		{"reserved spi", mut(func(r *Registration) { r.Client.SPIC = 7 }), `sa "reg1.out-c": spi: 7 is in the reserved range`},
		{"family", mut(func(r *Registration) { r.UE = netip.MustParseAddrPort("[2001:db8::1]:4500") }), "different address families"},
	}
	for _, c := range cases {
		if _, err := Derive(c.r); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

// The derived keys drive the ESP engine exactly as TS 33.203 says: a
// packet the engine seals with the derived SA authenticates under
// HMAC-SHA-1 keyed with IK||0^32 and decrypts under AES-128-CBC keyed
// with CK, computed here with the standard library alone.
func TestDerivedKeysDriveTheEngine(t *testing.T) {
	r := testRegistration(t, "UDP-enc-tun", "aes-cbc")
	ds, err := Derive(r)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ds[3].Spec.Parse(sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e, err := esp.NewTransform(esp.Config{SPI: s.SPI, Proposal: s.Proposal, EncKey: s.EncKey, AuthKey: s.AuthKey, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	inner := pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5065"), netip.MustParseAddrPort("192.168.1.11:5062"), []byte("SIP/2.0 200 OK\r\n\r\n"))
	buf := make([]byte, 64+len(inner)+64)
	copy(buf[64:], inner)
	start, end, err := e.Seal(buf, 64, len(inner), esp.NextHeaderFor(inner), 0)
	if err != nil {
		t.Fatal(err)
	}
	p := buf[start:end]
	if binary.BigEndian.Uint32(p) != 1111 || binary.BigEndian.Uint32(p[4:]) != 1 {
		t.Fatalf("ESP header %x", p[:8])
	}
	mac := hmac.New(sha1.New, append(append([]byte(nil), r.IK...), 0, 0, 0, 0))
	mac.Write(p[:len(p)-12])
	if !bytes.Equal(mac.Sum(nil)[:12], p[len(p)-12:]) {
		t.Fatal("ICV is not HMAC-SHA-1-96 under IK||0^32")
	}
	blk, _ := aes.NewCipher(r.CK)
	ct := p[8+16 : len(p)-12]
	pt := make([]byte, len(ct))
	cipher.NewCBCDecrypter(blk, p[8:24]).CryptBlocks(pt, ct)
	if !bytes.Equal(pt[:len(inner)], inner) {
		t.Fatal("payload does not decrypt under AES-128-CBC with CK")
	}
}

// The same for hmac-md5-96: the ICV is HMAC-MD5-96 (RFC 2403) keyed with
// IK itself, for both aes-cbc (payload decrypts under CK) and null.
func TestDerivedMD5KeysDriveTheEngine(t *testing.T) {
	for _, ealg := range []string{EalgAESCBC, EalgNull} {
		r := testRegistrationAlg(t, AlgHMACMD596, "UDP-enc-tun", ealg)
		ds, err := Derive(r)
		if err != nil {
			t.Fatal(err)
		}
		s, err := ds[3].Spec.Parse(sa.Options{})
		if err != nil {
			t.Fatal(err)
		}
		e, err := esp.NewTransform(esp.Config{SPI: s.SPI, Proposal: s.Proposal, EncKey: s.EncKey, AuthKey: s.AuthKey, Mode: esp.ModeTunnel})
		if err != nil {
			t.Fatal(err)
		}
		inner := pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5065"), netip.MustParseAddrPort("192.168.1.11:5062"), []byte("SIP/2.0 200 OK\r\n\r\n"))
		buf := make([]byte, 64+len(inner)+64)
		copy(buf[64:], inner)
		start, end, err := e.Seal(buf, 64, len(inner), esp.NextHeaderFor(inner), 0)
		if err != nil {
			t.Fatal(err)
		}
		p := buf[start:end]
		if binary.BigEndian.Uint32(p) != 1111 || binary.BigEndian.Uint32(p[4:]) != 1 {
			t.Fatalf("%s: ESP header %x", ealg, p[:8])
		}
		mac := hmac.New(md5.New, r.IK)
		mac.Write(p[:len(p)-12])
		if !bytes.Equal(mac.Sum(nil)[:12], p[len(p)-12:]) {
			t.Fatalf("%s: ICV is not HMAC-MD5-96 under IK", ealg)
		}
		if ealg == EalgNull {
			if !bytes.Equal(p[8:8+len(inner)], inner) {
				t.Fatal("null: payload is not the inner packet in clear")
			}
			continue
		}
		blk, _ := aes.NewCipher(r.CK)
		ct := p[8+16 : len(p)-12]
		pt := make([]byte, len(ct))
		cipher.NewCBCDecrypter(blk, p[8:24]).CryptBlocks(pt, ct)
		if !bytes.Equal(pt[:len(inner)], inner) {
			t.Fatal("payload does not decrypt under AES-128-CBC with CK")
		}
	}
}

// FuzzParse: Parse never panics; what it accepts produces a value that
// reads back to the same mechanisms, and Verify accepts it.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"ipsec-3gpp;q=0.1;prot=esp;mod=UDP-enc-tun;ealg=aes-cbc;alg=hmac-sha-1-96;spi-c=4294967295;spi-s=256;port-c=65535;port-s=1",
		`digest;d-alg=md5;d-qop=auth-int;d-ver="0,1;x";q=0.2, tls;q=0.3,,ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1;spi-s=2;port-c=3;port-s=4;x-ext`,
		" IPSEC-3GPP ;\r\n\tALG = hmac-md5-96 ; Mod=TUN; Prot=ah; SPI-C=01000; Spi-S=1001; PORT-C=5062; port-S=5064 ",
		"tls;q=0., tls;q=1.000",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := Parse(s)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		out := Format(ms)
		again, err := Parse(out)
		if err != nil {
			t.Fatalf("produced %q does not parse: %v", out, err)
		}
		if Format(again) != out {
			t.Fatalf("not stable: %q -> %q", out, Format(again))
		}
		if err := Verify(out, ms); err != nil {
			t.Fatal(err)
		}
	})
}
