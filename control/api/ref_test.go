package api

import (
	"net/netip"
	"net/url"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

func TestParseRef(t *testing.T) {
	out := func(spi uint32, peer string) Ref {
		r := Ref{ID: sa.ID{Dir: sa.Out, SPI: spi}}
		if peer != "" {
			r.ID.Peer = netip.MustParseAddrPort(peer)
		}
		return r
	}
	cases := []struct {
		in   string
		want Ref
		str  string // String(), "" for in
		err  string
	}{
		{in: "ue1-in", want: Ref{Name: "ue1-in"}},
		{in: "in:0x00001001", want: Ref{ID: sa.ID{Dir: sa.In, SPI: 0x1001}}},
		{in: "IN:4097", want: Ref{ID: sa.ID{Dir: sa.In, SPI: 0x1001}}, str: "in:0x00001001"},
		{in: "out:0xC0000001", want: out(0xc0000001, ""), str: "out:0xc0000001"},
		{in: "out:0xc0000001@192.0.2.10:4500", want: out(0xc0000001, "192.0.2.10:4500")},
		{in: "out:0xc0000001@192.0.2.10", want: out(0xc0000001, "192.0.2.10:0")},
		{in: "out:0xc0000001@[2001:db8::1]:4500", want: out(0xc0000001, "[2001:db8::1]:4500")},
		{in: "out:0xc0000001@2001:db8::1", want: out(0xc0000001, "[2001:db8::1]:0")},
		{in: "out:0xc0000001@[2001:db8::1]", want: out(0xc0000001, "[2001:db8::1]:0"), str: "out:0xc0000001@2001:db8::1"},
		{in: "out:0xc0000001@[::ffff:192.0.2.1]:4500", want: out(0xc0000001, "192.0.2.1:4500"), str: "out:0xc0000001@192.0.2.1:4500"},
		{in: "in:0x1001@192.0.2.1:4500", err: `ref "in:0x1001@192.0.2.1:4500": an inbound SA is named by its SPI alone: drop @192.0.2.1:4500`},
		{in: "in:255", err: `ref "in:255": spi: 255 is reserved (RFC 4303 2.1)`},
		{in: "in:0x100000000", err: `ref "in:0x100000000": spi: "0x100000000" is not a 32-bit number (0x hex or decimal)`},
		{in: "in:", err: `ref "in:": spi: "" is not a 32-bit number (0x hex or decimal)`},
		{in: "out:0x1001@192.0.2.1:99999", err: `ref "out:0x1001@192.0.2.1:99999": peer: "192.0.2.1:99999": want address, address:port or [IPv6]:port`},
		{in: "out:0x1001@[fe80::1%eth0]:4500", err: `ref "out:0x1001@[fe80::1%eth0]:4500": peer: "[fe80::1%eth0]:4500": zones are not allowed`},
		{in: "", err: `ref "": not an SA name (1..64 of A-Z a-z 0-9 . _ - starting with a letter), in:SPI or out:SPI[@peer[:port]]`},
		{in: "a/b", err: `ref "a/b": not an SA name (1..64 of A-Z a-z 0-9 . _ - starting with a letter), in:SPI or out:SPI[@peer[:port]]`},
		{in: "fwd:0x1001", err: `ref "fwd:0x1001": "fwd" before ':' must be in or out`},
	}
	for _, c := range cases {
		r, err := ParseRef(c.in)
		if c.err != "" {
			if err == nil || err.Error() != c.err {
				t.Errorf("%q: error %v\nwant %s", c.in, err, c.err)
			}
			continue
		}
		if err != nil || r != c.want {
			t.Errorf("%q: %+v %v, want %+v", c.in, r, err, c.want)
			continue
		}
		str := c.str
		if str == "" {
			str = c.in
		}
		if r.String() != str {
			t.Errorf("%q: String %q, want %q", c.in, r.String(), str)
		}
		// The escaped form survives a URL path round trip.
		u, err := url.Parse("http://x/v1/sas/" + url.PathEscape(r.String()))
		if err != nil {
			t.Fatal(err)
		}
		if back, err := ParseRef(u.Path[len("/v1/sas/"):]); err != nil || back != r {
			t.Errorf("%q: URL round trip %+v %v", c.in, back, err)
		}
	}
}

// TestLeakScan proves the key scan the other tests rely on can fail.
func TestLeakScan(t *testing.T) {
	k := "000102030405060708090a0b0c0d0e0fcafebabe"
	if l := leaks([]string{k}, [][]byte{[]byte(`{"spi":"0x00001001"}`)}); l != "" {
		t.Fatalf("false positive: %s", l)
	}
	for _, b := range []string{`{"enc_key":"` + k + `"}`, `x 08090A0B0C0D0E0F x`, "\x04\x05\x06\x07\x08\x09\x0a\x0b"} {
		if leaks([]string{k}, [][]byte{[]byte(b)}) == "" {
			t.Errorf("leak in %q not found", b)
		}
	}
}
