package corepool

import (
	"errors"
	"net/netip"
	"testing"
)

// Next walks the prefix from the last allocation, skips taken addresses
// and (IPv4, shorter than /31) the network and broadcast addresses,
// wraps once and then reports exhaustion.
func TestNext(t *testing.T) {
	p, err := New(netip.MustParsePrefix("100.64.0.0/29"))
	if err != nil {
		t.Fatal(err)
	}
	taken := map[netip.Addr]bool{netip.MustParseAddr("100.64.0.2"): true}
	isTaken := func(a netip.Addr) bool { return taken[a] }
	var got []string
	for {
		a, err := p.Next(isTaken)
		if errors.Is(err, ErrExhausted) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		taken[a] = true
		got = append(got, a.String())
	}
	want := "[100.64.0.1 100.64.0.3 100.64.0.4 100.64.0.5 100.64.0.6]"
	if s := fmtList(got); s != want {
		t.Fatalf("allocated %s, want %s", s, want)
	}
	// A released address is found again by walking on, after the others.
	delete(taken, netip.MustParseAddr("100.64.0.4"))
	if a, err := p.Next(isTaken); err != nil || a.String() != "100.64.0.4" {
		t.Fatalf("after release: %v %v", a, err)
	}
	if _, err := New(netip.MustParsePrefix("100.64.0.1/24")); err == nil {
		t.Fatal("prefix with host bits accepted")
	}
}

func TestFromMiddleAndIPv6(t *testing.T) {
	p, _ := New(netip.MustParsePrefix("100.64.0.0/10"))
	a, err := p.FromMiddle().Next(func(netip.Addr) bool { return false })
	if err != nil || a.String() != "100.96.0.0" {
		t.Fatalf("middle: %v %v", a, err)
	}
	// IPv6 has no broadcast: the whole prefix is usable.
	p6, _ := New(netip.MustParsePrefix("2001:db8:c0::/127"))
	taken := map[netip.Addr]bool{}
	for _, want := range []string{"2001:db8:c0::", "2001:db8:c0::1"} {
		a, err := p6.Next(func(a netip.Addr) bool { return taken[a] })
		if err != nil || a.String() != want {
			t.Fatalf("ipv6: %v %v, want %s", a, err, want)
		}
		taken[a] = true
	}
	if _, err := p6.Next(func(a netip.Addr) bool { return taken[a] }); !errors.Is(err, ErrExhausted) {
		t.Fatalf("ipv6 exhausted: %v", err)
	}
}

func fmtList(s []string) string {
	out := "["
	for i, x := range s {
		if i > 0 {
			out += " "
		}
		out += x
	}
	return out + "]"
}
