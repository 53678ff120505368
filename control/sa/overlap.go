package sa

import (
	"fmt"
	"net/netip"
	"unique"
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
	// length, keyed by the prefix's address (As16; the length and family
	// are the map's); fam is 0 for IPv4, 1 for IPv6. A destination's
	// first SA lives in the map slot itself: 48 bytes of slot for the
	// usual destination of one SA, no allocation of its own.
	byLen [2][129]map[[16]byte]outBucket[V]
	lens  [2][129]int // entries per length, to skip empty ones
	// lastSrc is the source prefix interned last and its handle: a
	// config load repeats one (unique.Make is a lookup of its own).
	lastSrc netip.Prefix
	lastH   unique.Handle[netip.Prefix]
}

// bucketList is how many SAs of one destination a bucket keeps in a list
// before it indexes them by ports: most destinations have one (a phone's
// core address or inner address), and a list costs less than a map.
const bucketList = 16

// outBucket holds the SAs of one destination prefix: the one SA most
// destinations have inline (one), else all of them in more.
type outBucket[V comparable] struct {
	one  outItem[V] // while more is nil
	more *outMore[V]
}

// outMore holds the SAs of a destination that has several: a list while
// they are few, else by their exact port selectors. Many phones may share
// one destination without core addresses (all on 192.168.1.10, told apart
// by the P-CSCF's ports): a query with both ports set then probes the
// four keys that can overlap it instead of scanning them all.
type outMore[V comparable] struct {
	list    []outItem[V] // nil once byPorts is used
	byPorts map[portPair][]outItem[V]
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

// outItem is one SA of a bucket: its selector without the destination
// (the bucket's). The source prefix, which the SAs of a gateway share
// (the core network), is interned: 8 bytes, zero for any.
type outItem[V comparable] struct {
	src   unique.Handle[netip.Prefix]
	ports Ports
	v     V
}

func (x *OutIndex[V]) itemOf(sel Selector, v V) outItem[V] {
	it := outItem[V]{ports: sel.Ports, v: v}
	if sel.Src.IsValid() {
		if sel.Src != x.lastSrc {
			x.lastSrc, x.lastH = sel.Src, unique.Make(sel.Src)
		}
		it.src = x.lastH
	}
	return it
}

// selector rebuilds the item's selector, dst being its bucket's prefix.
func (it *outItem[V]) selector(dst netip.Prefix) Selector {
	sel := Selector{Dst: dst, Ports: it.ports}
	if it.src != (unique.Handle[netip.Prefix]{}) {
		sel.Src = it.src.Value()
	}
	return sel
}

func keyAddr(k [16]byte, f int) netip.Addr {
	if f == 0 {
		return netip.AddrFrom16(k).Unmap()
	}
	return netip.AddrFrom16(k)
}

// add puts it in m, whose byPorts has the items once there are more
// than bucketList.
func (m *outMore[V]) add(it outItem[V]) {
	switch {
	case m.byPorts != nil:
		m.byPorts[pairOf(it.ports)] = append(m.byPorts[pairOf(it.ports)], it)
	case len(m.list) < bucketList:
		m.list = append(m.list, it)
	default:
		m.byPorts = make(map[portPair][]outItem[V], len(m.list)+1)
		for _, o := range append(m.list, it) {
			m.byPorts[pairOf(o.ports)] = append(m.byPorts[pairOf(o.ports)], o)
		}
		m.list = nil
	}
}

// Add records v with selector sel.
func (x *OutIndex[V]) Add(sel Selector, v V) {
	f, b := fam(sel.Dst), sel.Dst.Bits()
	m := x.byLen[f][b]
	if m == nil {
		m = make(map[[16]byte]outBucket[V])
		x.byLen[f][b] = m
	}
	k := sel.Dst.Addr().As16()
	it := x.itemOf(sel, v)
	bk, ok := m[k]
	switch {
	case !ok:
		bk.one = it
	case bk.more == nil:
		bk.more = &outMore[V]{list: []outItem[V]{bk.one, it}}
		bk.one = outItem[V]{}
	default:
		bk.more.add(it)
	}
	m[k] = bk
	x.lens[f][b]++
}

// removeItem drops the item holding v from list, reporting whether it did.
func removeItem[V comparable](list []outItem[V], v V) ([]outItem[V], bool) {
	for i := range list {
		if list[i].v == v {
			var zero outItem[V]
			copy(list[i:], list[i+1:])
			list[len(list)-1] = zero
			return list[:len(list)-1], true
		}
	}
	return list, false
}

// Remove forgets v recorded with sel.
func (x *OutIndex[V]) Remove(sel Selector, v V) {
	f, b := fam(sel.Dst), sel.Dst.Bits()
	m := x.byLen[f][b]
	k := sel.Dst.Addr().As16()
	bk, ok := m[k]
	if !ok {
		return
	}
	if bk.more == nil {
		if bk.one.v == v {
			delete(m, k)
			x.lens[f][b]--
		}
		return
	}
	var removed bool
	mo := bk.more
	if mo.byPorts != nil {
		pp := pairOf(sel.Ports)
		var list []outItem[V]
		if list, removed = removeItem(mo.byPorts[pp], v); len(list) == 0 {
			delete(mo.byPorts, pp)
		} else {
			mo.byPorts[pp] = list
		}
	} else {
		mo.list, removed = removeItem(mo.list, v)
	}
	if removed {
		x.lens[f][b]--
	}
	switch {
	case len(mo.list) == 0 && len(mo.byPorts) == 0:
		delete(m, k)
	case len(mo.list) == 1 && mo.byPorts == nil:
		m[k] = outBucket[V]{one: mo.list[0]} // back inline
	}
}

// Any returns one SA recorded with exactly destination dst, if any.
func (x *OutIndex[V]) Any(dst netip.Prefix) (V, bool) {
	var zero V
	if !dst.IsValid() {
		return zero, false
	}
	bk, ok := x.byLen[fam(dst)][dst.Bits()][dst.Addr().As16()]
	switch {
	case !ok:
		return zero, false
	case bk.more == nil:
		return bk.one.v, true
	case len(bk.more.list) > 0:
		return bk.more.list[0].v, true
	}
	for _, list := range bk.more.byPorts {
		if len(list) > 0 {
			return list[0].v, true
		}
	}
	return zero, false
}

// conflict returns an item of bk, the bucket of destination dst, whose
// selector overlaps sel and that skip does not accept.
func (bk *outBucket[V]) conflict(dst netip.Prefix, sel Selector, skip func(V) bool) (V, Selector, bool) {
	check := func(list []outItem[V]) (V, Selector, bool) {
		for i := range list {
			if o := list[i].selector(dst); o.Overlaps(sel) && (skip == nil || !skip(list[i].v)) {
				return list[i].v, o, true
			}
		}
		var zero V
		return zero, Selector{}, false
	}
	mo := bk.more
	switch {
	case mo == nil:
		one := [1]outItem[V]{bk.one}
		return check(one[:])
	case mo.byPorts == nil:
		return check(mo.list)
	}
	if l, p := sel.Ports.Local, sel.Ports.Peer; l != 0 && p != 0 {
		// Only these four port keys can overlap (l, p).
		for _, k := range [4]portPair{{l, p}, {0, p}, {l, 0}, {0, 0}} {
			if v, o, ok := check(mo.byPorts[k]); ok {
				return v, o, true
			}
		}
	} else {
		for _, list := range mo.byPorts {
			if v, o, ok := check(list); ok {
				return v, o, true
			}
		}
	}
	var zero V
	return zero, Selector{}, false
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
		if bk, ok := x.byLen[f][b][p.Addr().As16()]; ok {
			if v, o, ok := bk.conflict(p, sel, skip); ok {
				return v, o, true
			}
		}
	}
	for b := sel.Dst.Bits() + 1; b <= a.BitLen(); b++ {
		if x.lens[f][b] == 0 {
			continue
		}
		for k, bk := range x.byLen[f][b] {
			if ka := keyAddr(k, f); sel.Dst.Contains(ka) {
				if v, o, ok := bk.conflict(netip.PrefixFrom(ka, b), sel, skip); ok {
					return v, o, true
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
