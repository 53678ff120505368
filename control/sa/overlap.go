package sa

import (
	"fmt"
	"net/netip"
)

// Selector is what an outbound SA claims of the cleartext leaving toward
// the phones (RFC 4301 4.4.1): the destination (the SA's core address when
// it has one, else its inner peer prefix, else in transport mode the
// phone's own address), the source (inner.local; invalid means any) and
// the ports (0: any). XDP and the worker pick an outbound SA by these, so
// two outbound SAs whose selectors overlap would leave the choice to
// install order: that is refused (docs/addressing.md).
type Selector struct {
	Dst, Src netip.Prefix
	Ports    Ports
}

// OutSelector returns an outbound SA's selector.
func OutSelector(s *SA) Selector {
	sel := Selector{Src: s.InnerLocal, Ports: s.Ports}
	switch {
	case s.Core.IsValid():
		sel.Dst = netip.PrefixFrom(s.Core, s.Core.BitLen())
	case s.InnerPeer.IsValid():
		sel.Dst = s.InnerPeer
	default:
		sel.Dst = netip.PrefixFrom(s.Peer, s.Peer.BitLen())
	}
	return sel
}

func portOverlap(a, b uint16) bool { return a == 0 || b == 0 || a == b }

func prefixOverlap(a, b netip.Prefix) bool {
	if !a.IsValid() || !b.IsValid() {
		return true // any
	}
	return a.Overlaps(b)
}

// Overlaps says whether one cleartext packet could match both selectors.
func (a Selector) Overlaps(b Selector) bool {
	return a.Dst.Overlaps(b.Dst) && prefixOverlap(a.Src, b.Src) &&
		portOverlap(a.Ports.Local, b.Ports.Local) && portOverlap(a.Ports.Peer, b.Ports.Peer) &&
		(a.Ports.Proto == 0 || b.Ports.Proto == 0 || a.Ports.Proto == b.Ports.Proto)
}

// Common describes the traffic both selectors match, for messages.
func (a Selector) Common(b Selector) string {
	dst := a.Dst
	if b.Dst.Bits() > dst.Bits() {
		dst = b.Dst
	}
	s := "destination " + dst.String()
	if a.Src.IsValid() || b.Src.IsValid() {
		src := a.Src
		if !src.IsValid() || b.Src.IsValid() && b.Src.Bits() > src.Bits() {
			src = b.Src
		}
		s += " from " + src.String()
	}
	port := func(x, y uint16) string {
		if x == 0 && y == 0 {
			return "any"
		}
		return fmt.Sprint(max(x, y))
	}
	return s + ", local port " + port(a.Ports.Local, b.Ports.Local) + ", peer port " + port(a.Ports.Peer, b.Ports.Peer)
}

// OverlapError names two outbound SAs that could both claim one cleartext
// packet and the traffic they share.
type OverlapError struct {
	SA, Other string // labels, as the caller names them
	Common    string // Selector.Common
}

func (e *OverlapError) Error() string {
	return fmt.Sprintf("%s: selectors overlap %s (both match %s): one cleartext packet must map to one outbound SA; give each phone its own inner.core, or distinct ports", e.SA, e.Other, e.Common)
}

// OutIndex finds the outbound SAs whose selectors overlap a given one. V
// is the caller's handle for an SA (a label, a SAD entry). A lookup costs
// a map probe per distinct destination prefix length shorter than or
// equal to the one asked and, only when longer prefixes are stored, a
// scan of those; within one destination, a selector with both ports set
// probes four port keys. With per-phone core addresses every key is a host
// prefix, and without them many phones on one inner address are told
// apart by ports: either way an add costs a handful of probes whatever
// the SA count (BenchmarkOutIndex). The zero value is ready to use; it is
// not safe for concurrent use.
type OutIndex[V comparable] struct {
	// byLen[fam][bits] holds the SAs whose destination prefix has that
	// length; fam is 0 for IPv4, 1 for IPv6.
	byLen [2][129]map[netip.Prefix]*outBucket[V]
	lens  [2][129]int // entries per length, to skip empty ones
}

// outBucket holds the SAs of one destination prefix by their exact port
// selectors. Many phones may share one destination without core
// addresses (all on 192.168.1.10, told apart by the P-CSCF's ports): a
// query with both ports set probes the four keys that can overlap it
// instead of scanning them all.
type outBucket[V comparable] struct {
	byPorts map[portPair][]outItem[V]
	n       int
}

// portPair is a bucket's key: the port selectors without the protocol,
// so the four probes of conflict find SAs of any protocol selector
// (Overlaps then compares protocols).
type portPair struct{ local, peer uint16 }

func pairOf(p Ports) portPair { return portPair{p.Local, p.Peer} }

func fam(p netip.Prefix) int {
	if p.Addr().Is4() {
		return 0
	}
	return 1
}

type outItem[V comparable] struct {
	sel Selector
	v   V
}

// Add records v with selector sel.
func (x *OutIndex[V]) Add(sel Selector, v V) {
	f, b := fam(sel.Dst), sel.Dst.Bits()
	if x.byLen[f][b] == nil {
		x.byLen[f][b] = make(map[netip.Prefix]*outBucket[V])
	}
	bk := x.byLen[f][b][sel.Dst]
	if bk == nil {
		bk = &outBucket[V]{byPorts: make(map[portPair][]outItem[V], 1)}
		x.byLen[f][b][sel.Dst] = bk
	}
	bk.byPorts[pairOf(sel.Ports)] = append(bk.byPorts[pairOf(sel.Ports)], outItem[V]{sel, v})
	bk.n++
	x.lens[f][b]++
}

// Remove forgets v recorded with sel.
func (x *OutIndex[V]) Remove(sel Selector, v V) {
	f, b := fam(sel.Dst), sel.Dst.Bits()
	bk := x.byLen[f][b][sel.Dst]
	if bk == nil {
		return
	}
	list := bk.byPorts[pairOf(sel.Ports)]
	for i, it := range list {
		if it.v == v {
			list = append(list[:i:i], list[i+1:]...)
			bk.n--
			x.lens[f][b]--
			break
		}
	}
	if len(list) == 0 {
		delete(bk.byPorts, pairOf(sel.Ports))
	} else {
		bk.byPorts[pairOf(sel.Ports)] = list
	}
	if bk.n == 0 {
		delete(x.byLen[f][b], sel.Dst)
	}
}

// Any returns one SA recorded with exactly destination dst, if any.
func (x *OutIndex[V]) Any(dst netip.Prefix) (V, bool) {
	var zero V
	if !dst.IsValid() {
		return zero, false
	}
	if bk := x.byLen[fam(dst)][dst.Bits()][dst]; bk != nil {
		for _, list := range bk.byPorts {
			if len(list) > 0 {
				return list[0].v, true
			}
		}
	}
	return zero, false
}

// conflict returns an item of bk whose selector overlaps sel and that
// skip does not accept.
func (bk *outBucket[V]) conflict(sel Selector, skip func(V) bool) (outItem[V], bool) {
	check := func(list []outItem[V]) (outItem[V], bool) {
		for _, it := range list {
			if it.sel.Overlaps(sel) && (skip == nil || !skip(it.v)) {
				return it, true
			}
		}
		return outItem[V]{}, false
	}
	if l, p := sel.Ports.Local, sel.Ports.Peer; l != 0 && p != 0 {
		// Only these four port keys can overlap (l, p).
		for _, k := range [4]portPair{{l, p}, {0, p}, {l, 0}, {0, 0}} {
			if it, ok := check(bk.byPorts[k]); ok {
				return it, true
			}
		}
		return outItem[V]{}, false
	}
	for _, list := range bk.byPorts {
		if it, ok := check(list); ok {
			return it, true
		}
	}
	return outItem[V]{}, false
}

// Conflict returns a recorded SA whose selector overlaps sel, other than
// those skip accepts (the SA itself on update, the SAs a rekey replaces).
func (x *OutIndex[V]) Conflict(sel Selector, skip func(V) bool) (V, Selector, bool) {
	var zero V
	if !sel.Dst.IsValid() {
		return zero, Selector{}, false
	}
	a, f := sel.Dst.Addr(), fam(sel.Dst)
	for b := 0; b <= sel.Dst.Bits(); b++ {
		if x.lens[f][b] == 0 {
			continue
		}
		p, err := a.Prefix(b)
		if err != nil {
			continue
		}
		if bk := x.byLen[f][b][p]; bk != nil {
			if it, ok := bk.conflict(sel, skip); ok {
				return it.v, it.sel, true
			}
		}
	}
	for b := sel.Dst.Bits() + 1; b <= a.BitLen(); b++ {
		if x.lens[f][b] == 0 {
			continue
		}
		for p, bk := range x.byLen[f][b] {
			if sel.Dst.Contains(p.Addr()) {
				if it, ok := bk.conflict(sel, skip); ok {
					return it.v, it.sel, true
				}
			}
		}
	}
	return zero, Selector{}, false
}

// CheckOverlaps returns one *OverlapError per outbound SA of list whose
// selectors overlap an earlier one's, naming both by labels[i].
func CheckOverlaps(list []SA, labels []string) []error {
	return CheckOverlapsFunc(list, func(i int) string { return labels[i] })
}

// CheckOverlapsFunc is CheckOverlaps naming SA i by label(i), called only
// for the SAs a message names: a config of a million SAs makes no label.
func CheckOverlapsFunc(list []SA, label func(int) string) []error {
	var x OutIndex[int]
	var errs []error
	for i := range list {
		s := &list[i]
		if s.Direction != Out {
			continue
		}
		sel := OutSelector(s)
		if j, other, ok := x.Conflict(sel, nil); ok {
			errs = append(errs, &OverlapError{SA: label(i), Other: label(j), Common: sel.Common(other)})
			continue
		}
		x.Add(sel, i)
	}
	return errs
}
