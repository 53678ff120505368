package api

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/xesp/xesp/control/sa"
)

// Ref is a parsed SA reference (see the package doc for the grammar).
// Exactly one form is set: Name; or ID with Dir and SPI (Peer valid only
// when the reference names the outbound peer).
type Ref struct {
	Name string
	ID   sa.ID
}

// maxRef bounds a reference: the longest valid one is an IPv6 identity.
const maxRef = 128

// ParseRef reads an SA reference.
func ParseRef(s string) (Ref, error) {
	if len(s) > maxRef {
		return Ref{}, fmt.Errorf("ref: longer than %d characters", maxRef)
	}
	dir, rest, ok := strings.Cut(s, ":")
	if !ok {
		if !sa.ValidName(s) {
			return Ref{}, fmt.Errorf("ref %q: not an SA name (1..64 of A-Z a-z 0-9 . _ - starting with a letter), in:SPI or out:SPI[@peer[:port]]", s)
		}
		return Ref{Name: s}, nil
	}
	var r Ref
	switch strings.ToLower(dir) {
	case "in":
		r.ID.Dir = sa.In
	case "out":
		r.ID.Dir = sa.Out
	default:
		return Ref{}, fmt.Errorf("ref %q: %q before ':' must be in or out", s, dir)
	}
	spiText, peer, hasPeer := strings.Cut(rest, "@")
	spi, err := parseSPI(spiText)
	if err != nil {
		return Ref{}, fmt.Errorf("ref %q: spi: %v", s, err)
	}
	r.ID.SPI = spi
	if !hasPeer {
		return r, nil
	}
	if r.ID.Dir == sa.In {
		return Ref{}, fmt.Errorf("ref %q: an inbound SA is named by its SPI alone: drop @%s", s, peer)
	}
	ap, err := parsePeer(peer)
	if err != nil {
		return Ref{}, fmt.Errorf("ref %q: peer: %v", s, err)
	}
	r.ID.Peer = ap
	return r, nil
}

func parseSPI(t string) (uint32, error) {
	var n uint64
	var err error
	if len(t) > 2 && (t[:2] == "0x" || t[:2] == "0X") {
		n, err = strconv.ParseUint(t[2:], 16, 32)
	} else {
		n, err = strconv.ParseUint(t, 10, 32)
	}
	switch {
	case err != nil:
		return 0, fmt.Errorf("%q is not a 32-bit number (0x hex or decimal)", t)
	case n < 256:
		return 0, fmt.Errorf("%d is reserved (RFC 4303 2.1)", n)
	}
	return uint32(n), nil
}

// parsePeer reads addr:port, [v6]:port, or a bare address (port 0: plain
// ESP), never with a zone: SA peers have none.
func parsePeer(t string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(t); err == nil {
		if ap.Addr().Zone() != "" {
			return netip.AddrPort{}, fmt.Errorf("%q: zones are not allowed", t)
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(t, "["), "]"))
	if err != nil || a.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%q: want address, address:port or [IPv6]:port", t)
	}
	return netip.AddrPortFrom(a.Unmap(), 0), nil
}

// String is the reference in the grammar ParseRef reads.
func (r Ref) String() string {
	if r.Name != "" {
		return r.Name
	}
	if r.ID.Dir == sa.Out && !r.ID.Peer.IsValid() {
		return fmt.Sprintf("out:0x%08x", r.ID.SPI)
	}
	return RefOf(r.ID)
}

// RefOf is the canonical reference of an SA identity.
func RefOf(id sa.ID) string {
	if id.Dir != sa.Out {
		return fmt.Sprintf("in:0x%08x", id.SPI)
	}
	if id.Peer.Port() == 0 {
		return fmt.Sprintf("out:0x%08x@%s", id.SPI, id.Peer.Addr())
	}
	return fmt.Sprintf("out:0x%08x@%s", id.SPI, id.Peer)
}
