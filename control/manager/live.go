package manager

import (
	"hash/maphash"
	"iter"
	"net/netip"

	"github.com/xesp/xesp/control/sa"
)

// liveSet is the installed SAs by identity: inbound by SPI, outbound by
// their compact identity (saKey). With a million SAs the map of full
// sa.ID keys (40 bytes, an address with its interning handle) cost ~80
// bytes per SA; these keys are 4 and 24 bytes.
type liveSet struct {
	in  map[uint32]*installed
	out map[saKey]*installed
}

// saKey is an sa.ID in 24 bytes instead of 40: the peer address in
// 16-byte form with its family (IPv4 apart from IPv4-mapped IPv6; 0: no
// peer, inbound). SA addresses carry no zone (the SA parser refuses
// them), so the two forms are the same identity.
type saKey struct {
	addr [16]byte
	spi  uint32
	port uint16
	dir  sa.Direction
	fam  uint8
}

func keyOf(id sa.ID) saKey {
	k := saKey{spi: id.SPI, dir: id.Dir}
	if a := id.Peer.Addr(); a.IsValid() {
		k.addr, k.port, k.fam = a.As16(), id.Peer.Port(), 6
		if a.Is4() {
			k.fam = 4
		}
	}
	return k
}

// id is the sa.ID k was made from.
func (k saKey) id() sa.ID {
	id := sa.ID{Dir: k.dir, SPI: k.spi}
	switch k.fam {
	case 4:
		id.Peer = netip.AddrPortFrom(netip.AddrFrom16(k.addr).Unmap(), k.port)
	case 6:
		id.Peer = netip.AddrPortFrom(netip.AddrFrom16(k.addr), k.port)
	}
	return id
}

func newLiveSet(in, out int) liveSet {
	return liveSet{in: make(map[uint32]*installed, in), out: make(map[saKey]*installed, out)}
}

func (l *liveSet) get(id sa.ID) *installed {
	if id.Dir == sa.In {
		return l.in[id.SPI]
	}
	return l.out[keyOf(id)]
}

func (l *liveSet) put(s *installed) {
	if s.key.dir == sa.In {
		l.in[s.key.spi] = s
		return
	}
	l.out[s.key] = s
}

// del removes s if it is what its identity maps to.
func (l *liveSet) del(s *installed) {
	if s.key.dir == sa.In {
		if l.in[s.key.spi] == s {
			delete(l.in, s.key.spi)
		}
		return
	}
	if l.out[s.key] == s {
		delete(l.out, s.key)
	}
}

func (l *liveSet) len() int { return len(l.in) + len(l.out) }

// all yields every installed SA, inbound first.
func (l *liveSet) all() iter.Seq[*installed] {
	return func(yield func(*installed) bool) {
		for _, s := range l.in {
			if !yield(s) {
				return
			}
		}
		for _, s := range l.out {
			if !yield(s) {
				return
			}
		}
	}
}

// policyKey is where XDP finds an outbound SA: the cores map's exact
// (core address, destination port) key when the SA has a core address,
// else the trie's inner prefix. 20 bytes, not the 64 of a prefix, an
// address and a port in netip form: the manager keeps one per outbound SA
// and one per map entry.
type policyKey struct {
	addr [16]byte
	port uint16 // core key only
	bits uint8  // prefix length; trie key only
	kind uint8
}

const (
	polNone uint8 = iota
	polPrefix4
	polPrefix6
	polCore4
	polCore6
)

func prefixKey(p netip.Prefix) policyKey {
	k := policyKey{addr: p.Addr().As16(), bits: uint8(p.Bits()), kind: polPrefix6}
	if p.Addr().Is4() {
		k.kind = polPrefix4
	}
	return k
}

func coreKey(a netip.Addr, port uint16) policyKey {
	k := policyKey{addr: a.As16(), port: port, kind: polCore6}
	if a.Is4() {
		k.kind = polCore4
	}
	return k
}

func (k policyKey) isCore() bool { return k.kind == polCore4 || k.kind == polCore6 }

func (k policyKey) prefix() netip.Prefix {
	a := netip.AddrFrom16(k.addr)
	if k.kind == polPrefix4 {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, int(k.bits))
}

func (k policyKey) core() netip.Addr {
	a := netip.AddrFrom16(k.addr)
	if k.kind == polCore4 {
		a = a.Unmap()
	}
	return a
}

// bindingTable finds a pair group's shared binding by its group key. The
// map is keyed by the key's hash, a chain through sharedBinding.next
// holding the (rare) collisions, each compared in full: a 64-byte
// groupRef as a map key cost ~150 bytes per pair, the copy in the
// sharedBinding is needed anyway to remove it.
type bindingTable struct {
	seed maphash.Seed
	m    map[uint64]*sharedBinding
	// hashOf replaces the seeded hash in tests (collisions on demand).
	hashOf func(groupRef) uint64
}

func newBindingTable() bindingTable {
	return bindingTable{seed: maphash.MakeSeed(), m: make(map[uint64]*sharedBinding)}
}

func (t *bindingTable) hash(k groupRef) uint64 {
	if t.hashOf != nil {
		return t.hashOf(k)
	}
	return maphash.Comparable(t.seed, k)
}

func (t *bindingTable) get(k groupRef) *sharedBinding {
	for sb := t.m[t.hash(k)]; sb != nil; sb = sb.next {
		if sb.worker == k.worker && sb.group == k.key {
			return sb
		}
	}
	return nil
}

// all yields every group's binding.
func (t *bindingTable) all() iter.Seq[*sharedBinding] {
	return func(yield func(*sharedBinding) bool) {
		for _, sb := range t.m {
			for ; sb != nil; sb = sb.next {
				if !yield(sb) {
					return
				}
			}
		}
	}
}

// add files sb, whose key the table does not hold.
func (t *bindingTable) add(sb *sharedBinding) {
	h := t.hash(sb.ref())
	sb.next = t.m[h]
	t.m[h] = sb
}

// del removes sb if the table holds it.
func (t *bindingTable) del(sb *sharedBinding) {
	h := t.hash(sb.ref())
	for p := t.m[h]; p != nil; p = p.next {
		if p != sb {
			continue
		}
		if prev := t.m[h]; prev == sb {
			if sb.next == nil {
				delete(t.m, h)
			} else {
				t.m[h] = sb.next
			}
		} else {
			for prev.next != sb {
				prev = prev.next
			}
			prev.next = sb.next
		}
		sb.next = nil
		return
	}
}
