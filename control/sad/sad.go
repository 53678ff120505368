// Package sad is the SA database: the control plane's source of truth for
// which SAs exist, which worker owns each, the dense per-worker index the
// XDP maps hand to that worker, each SA's NAT binding and state.
//
// It is pure bookkeeping: it never touches BPF maps, sockets or packets
// (the manager mirrors it into the kernel by reading the change feed) and
// the data path never reads it. All methods are safe for concurrent use.
//
// The rules it enforces:
//
//   - Identity (sa.ID): an inbound SA is (in, SPI), because the XDP program
//     looks inbound SAs up by SPI alone; an outbound SA is (out, SPI, peer
//     address, encap peer port), because peers choose outbound SPIs and two
//     phones behind one NAPT may choose the same one. Names, when given,
//     are unique across both directions.
//   - Pairing: SAs that share one NAT mapping form a group and live on one
//     worker, so the binding an inbound SA learns is used by its outbound
//     partner without crossing workers. The group is the SA's explicit
//     `pair` label when set; otherwise (configured peer address, encap
//     peer port, inner peer prefix) — the phone's outer NAT mapping and its
//     inner address, which an in/out pair of one phone always share.
//   - Placement: a new group goes to the least-loaded worker (by SA count,
//     lowest number on ties) — except that a group without a core address
//     whose inner peer prefix already has outbound SAs joins their worker
//     (one trie entry, one worker); a group's later SAs follow it. Placement is
//     sticky: moving an SA would lose its replay window and sequence state.
//   - Selectors: no two outbound SAs may claim one cleartext packet
//     (sa.Selector: core address or inner peer prefix, inner local
//     prefix, ports), or which phone gets it would depend on install
//     order. The one exception is AddRekey: a rekey's new SAs may overlap
//     the SAs they replace until those are deleted.
//   - Core addresses: an SA with inner.core groups by it (not by pair
//     label or peer), so every SA set of one phone — a re-registration's
//     new sec-agree set and the current one — lives on one worker, where
//     the worker finds among them the SA whose ports match.
//   - Indexes: dense per worker, shared by both directions (one table per
//     worker). Freed indexes are reused oldest-first, which keeps the table
//     dense yet leaves a just-freed slot unused for as long as possible, so
//     a frame still in flight for a deleted SA is unlikely to meet its
//     successor.
package sad

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/xesp/xesp/control/sa"
)

// Errors returned (wrapped, with detail) by the SAD.
var (
	ErrExists    = errors.New("already exists")
	ErrNotFound  = errors.New("no such SA")
	ErrAmbiguous = errors.New("several outbound SAs have this SPI; name the peer")
	ErrFull      = errors.New("SA table full")
	ErrInvalid   = errors.New("invalid SA")
	// ErrOverlap: the outbound SA's selectors overlap another outbound
	// SA's (sa.OverlapError says which and where); only a rekey's
	// make-before-break may overlap, and only the SAs it replaces.
	ErrOverlap = errors.New("outbound selectors overlap")
	// ErrConflict: another change already claimed the SA (a concurrent
	// rekey is replacing it); the caller lost the race.
	ErrConflict = errors.New("already being replaced by another change")
	// ErrResync means the change log no longer holds the version asked
	// for: the consumer must re-read everything (List) and continue from
	// the version it read before listing.
	ErrResync = errors.New("change log overrun: resync with List")
)

// State is an SA's lifecycle state.
type State uint8

// SA states. Lifetime enforcement sets the expired states; the SAD only
// records them.
const (
	Active State = iota
	SoftExpired
	HardExpired
)

func (s State) String() string {
	switch s {
	case Active:
		return "active"
	case SoftExpired:
		return "soft-expired"
	case HardExpired:
		return "hard-expired"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Record is a copy of one SA with its runtime fields. The key slices in SA
// are shared with the SAD and must not be modified.
type Record struct {
	SA     sa.SA
	ID     sa.ID
	Worker uint16
	Index  uint32
	// Binding is where outbound packets go and inbound packets come
	// from: the configured peer and encap port at first, then what the
	// workers learn from authenticated packets.
	Binding netip.AddrPort
	State   State
	Created time.Time
	Version uint64 // SAD version of the SA's last change
	// Replaced says a rekey has replaced the SA: it lives on only until
	// its grace period ends, and no second rekey may replace it.
	Replaced bool
}

// Options configures a SAD.
type Options struct {
	Workers int // 1..65535
	// MaxSAs caps inbound and outbound SAs separately, matching the
	// capacity of the SA map and the policy map; 0 means no cap.
	MaxSAs int
	// LogSize is how many changes the feed retains (default 65536).
	LogSize int
}

// entry is the stored form. The SA is replaced wholesale on update, never
// modified in place, so copies handed out stay consistent.
type entry struct {
	p        packed
	seq      uint64 // creation order: List's stable order and cursor
	version  uint64
	created  int64
	bind     binding
	index    uint32
	worker   uint16
	state    State
	deleted  bool
	replaced bool   // claimed by a rekey (Replace)
	nextOut  *entry // outbound SAs sharing this SPI
	nextPeer *entry // members of the same group
}

func (e *entry) id() sa.ID { return e.p.id() }

func (e *entry) export() Record {
	s := e.p.unpack()
	return Record{
		SA: s, ID: s.ID(), Worker: e.worker, Index: e.index, Binding: e.bind.addrPort(),
		State: e.state, Created: time.Unix(0, e.created), Version: e.version, Replaced: e.replaced,
	}
}

// binding is a NAT binding in 20 bytes without a pointer (a
// netip.AddrPort is 32 with one).
type binding struct {
	addr [16]byte
	port uint16
	fam  uint16
}

func bindingOf(ap netip.AddrPort) binding {
	b := binding{port: ap.Port()}
	b.addr, b.fam = packAddr(ap.Addr())
	return b
}

func (b binding) addrPort() netip.AddrPort {
	return netip.AddrPortFrom(unpackAddr(b.addr, b.fam), b.port)
}

// GroupKey identifies the SAs sharing one worker and one NAT mapping. It
// is comparable: the manager keys the binding a group's SAs share by it.
// Addresses are 16 bytes and a family, without netip's pointer: the SAD
// and the manager hold one key per group.
type GroupKey struct {
	label string
	peer  [16]byte
	inner [16]byte
	port  uint16
	bits  uint8  // inner prefix length + 1; 0: none
	fams  uint16 // peer's family | inner's << 2
}

// GroupOf is the pair group an SA belongs to (see the package doc).
func GroupOf(s *sa.SA) GroupKey {
	if s.Core.IsValid() {
		// One phone, one core address: all its SA sets share a worker
		// and the NAT binding (see the package doc).
		k := GroupKey{label: "core", bits: uint8(s.Core.BitLen() + 1)}
		var f uint16
		k.inner, f = packAddr(s.Core)
		k.fams = f << 2
		return k
	}
	if s.Pair != "" {
		return GroupKey{label: s.Pair}
	}
	k := GroupKey{}
	k.peer, k.fams = packAddr(s.Peer)
	if s.InnerPeer.IsValid() {
		var f uint16
		k.inner, f = packAddr(s.InnerPeer.Addr())
		k.fams |= f << 2
		k.bits = uint8(s.InnerPeer.Bits() + 1)
	}
	if s.Encap != nil {
		k.port = s.Encap.PeerPort
	}
	return k
}

// group is GroupOf(e's SA) without unpacking it.
func (e *entry) group() GroupKey {
	p := &e.p
	if f := p.fam(slotCore); f != famNone {
		bits := 33
		if f == fam6 {
			bits = 129
		}
		return GroupKey{label: "core", inner: p.core, bits: uint8(bits), fams: f << 2}
	}
	if p.x != nil && p.x.pair != "" {
		return GroupKey{label: p.x.pair}
	}
	k := GroupKey{peer: p.peer, fams: p.fam(slotPeer), port: p.peerPort()}
	if p.innerPeerBits != 0 {
		k.inner, k.bits = p.innerPeer, p.innerPeerBits
		k.fams |= p.fam(slotInnerPeer) << 2
	}
	return k
}

type worker struct {
	sas  int
	next uint32   // indexes below next have been handed out at least once
	free []uint32 // FIFO of freed indexes; free[head:] are live
	head int
}

func (w *worker) alloc() uint32 {
	if w.head < len(w.free) {
		i := w.free[w.head]
		w.head++
		if w.head == len(w.free) {
			w.free, w.head = w.free[:0], 0
		} else if w.head > 1024 && w.head*2 > len(w.free) {
			n := copy(w.free, w.free[w.head:])
			w.free, w.head = w.free[:n], 0
		}
		return i
	}
	i := w.next
	w.next++
	return i
}

func (w *worker) release(i uint32) { w.free = append(w.free, i) }

// SAD is the SA database.
type SAD struct {
	mu sync.RWMutex
	// inSPI finds an inbound SA by SPI, outSPI the outbound SAs of one
	// SPI (a chain through nextOut, told apart by peer): together the
	// identity index, at 16 bytes of map slot per SA.
	inSPI   map[uint32]*entry
	shared  map[sharedVal]*shared // interned packed.sh
	byName  map[string]*entry
	outSPI  map[uint32]*entry // head of the chain of outbound SAs with this SPI
	groups  groupIndex
	order   []*entry // by seq; deleted entries linger until compaction
	dead    int      // deleted entries in order
	seq     uint64
	workers []worker
	in, out int
	max     int
	// outSel finds outbound SAs whose selectors overlap; cores counts
	// the SAs naming each core address, phones maps a phone (peer, encap
	// port, inner peer) to the core address its SAs use, so a
	// re-registration keeps it (CoreOf, CoreInUse).
	outSel sa.OutIndex[*entry]
	cores  map[netip.Addr]int
	phones map[phoneKey]netip.Addr

	version uint64
	log     []Change // ring: version v lives at log[v%len(log)]
	notify  chan struct{}
}

// New returns an empty SAD.
func New(o Options) (*SAD, error) {
	if o.Workers < 1 || o.Workers > 65535 {
		return nil, fmt.Errorf("sad: workers must be 1..65535, got %d", o.Workers)
	}
	if o.MaxSAs < 0 {
		return nil, fmt.Errorf("sad: max SAs must not be negative, got %d", o.MaxSAs)
	}
	if o.LogSize <= 0 {
		o.LogSize = 65536
	}
	return &SAD{
		inSPI:   make(map[uint32]*entry),
		shared:  make(map[sharedVal]*shared),
		byName:  make(map[string]*entry),
		outSPI:  make(map[uint32]*entry),
		groups:  newGroupIndex(),
		cores:   make(map[netip.Addr]int),
		phones:  make(map[phoneKey]netip.Addr),
		workers: make([]worker, o.Workers),
		max:     o.MaxSAs,
		log:     make([]Change, o.LogSize),
		notify:  make(chan struct{}, 1),
	}, nil
}

// Add inserts a validated SA and returns its entry.
func (d *SAD) Add(s sa.SA) (Record, error) {
	d.mu.Lock()
	e, err := d.add(&s, time.Now().UnixNano())
	var out Record
	if err == nil {
		out = e.export()
	}
	d.mu.Unlock()
	if err == nil {
		d.wake()
	}
	return out, err
}

// AddAll inserts many SAs under one lock (config load). It adds every SA
// it can and returns one error per SA it could not.
func (d *SAD) AddAll(sas []sa.SA) error {
	var errs []error
	now := time.Now().UnixNano()
	d.mu.Lock()
	d.reserve(sas)
	for i := range sas {
		if _, err := d.add(&sas[i], now); err != nil {
			errs = append(errs, err)
		}
	}
	d.mu.Unlock()
	d.wake()
	return errors.Join(errs...)
}

// reserve sizes an empty SAD's indexes for sas before AddAll adds them:
// grown one rehash at a time, the maps of a million-SA config load cost
// a quarter of the load in rehashing alone.
func (d *SAD) reserve(sas []sa.SA) {
	// Every entry, live or deleted and not yet compacted, is in order.
	if len(d.order) != 0 || len(sas) < reserveMin {
		return
	}
	var in, out, named, cored int
	for i := range sas {
		s := &sas[i]
		if s.Direction == sa.Out {
			out++
		} else {
			in++
		}
		if s.Name != "" {
			named++
		}
		if s.Core.IsValid() {
			cored++
		}
	}
	d.inSPI = make(map[uint32]*entry, in)
	d.outSPI = make(map[uint32]*entry, out)
	d.byName = make(map[string]*entry, named)
	// A pair's two SAs share one group, one core address and one phone.
	d.groups.byHash = make(map[uint64]*entry, max(in, out))
	d.cores = make(map[netip.Addr]int, cored/2)
	d.phones = make(map[phoneKey]netip.Addr, cored/2)
	d.order = make([]*entry, 0, len(sas))
}

// reserveMin is the smallest AddAll that sizes the maps up front.
const reserveMin = 4096

// AddRekey is Add for a rekey's new SA: its selectors may overlap those
// of the SAs in replaces (make-before-break), never any other's.
func (d *SAD) AddRekey(s sa.SA, replaces []sa.ID) (Record, error) {
	d.mu.Lock()
	e, err := d.addChecked(&s, time.Now().UnixNano(), replaces)
	var out Record
	if err == nil {
		out = e.export()
	}
	d.mu.Unlock()
	if err == nil {
		d.wake()
	}
	return out, err
}

func (d *SAD) add(s *sa.SA, now int64) (*entry, error) {
	return d.addChecked(s, now, nil)
}

func (d *SAD) addChecked(s *sa.SA, now int64, replaces []sa.ID) (*entry, error) {
	if err := d.check(s, nil, replaces); err != nil {
		return nil, err
	}
	gk := GroupOf(s)
	head := d.groups.get(gk)
	var wk uint16
	if head != nil {
		wk = head.worker
	} else {
		wk = d.place(s)
	}
	w := &d.workers[wk]
	d.seq++
	e := &entry{
		seq: d.seq, created: now, bind: bindingOf(initialBinding(s)),
		worker: wk, index: w.alloc(),
	}
	var sh sharedVal
	e.p, sh = pack(s)
	d.adopt(&e.p, sh)
	if head != nil {
		// A group shares one NAT mapping: a late partner starts from
		// what its group has learnt, not from the configured peer.
		e.bind = head.bind
	}
	w.sas++
	e.nextPeer = head
	d.groups.set(gk, e)
	if s.Name != "" {
		d.byName[s.Name] = e
	}
	if s.Direction == sa.Out {
		e.nextOut = d.outSPI[s.SPI]
		d.outSPI[s.SPI] = e
		d.out++
	} else {
		d.inSPI[s.SPI] = e
		d.in++
	}
	d.order = append(d.order, e)
	d.index(e)
	d.record(e, OpAdd, e.worker, e.index)
	return e, nil
}

// lookup finds the SA with identity id (nil: none).
func (d *SAD) lookup(id sa.ID) *entry {
	switch id.Dir {
	case sa.In:
		return d.inSPI[id.SPI]
	case sa.Out:
		for e := d.outSPI[id.SPI]; e != nil; e = e.nextOut {
			if e.p.peerPort() == id.Peer.Port() && unpackAddr(e.p.peer, e.p.fam(slotPeer)) == id.Peer.Addr() {
				return e
			}
		}
	}
	return nil
}

type phoneKey struct {
	peer  netip.AddrPort
	inner netip.Prefix
}

func phoneOf(s *sa.SA) phoneKey { return phoneKey{initialBinding(s), s.InnerPeer} }

// index records e in the selector and core-address indexes.
func (d *SAD) index(e *entry) {
	if e.p.dir != sa.Out && e.p.fam(slotCore) == famNone {
		return
	}
	s := e.p.unpack()
	if s.Direction == sa.Out {
		d.outSel.Add(sa.OutSelector(&s), e)
	}
	if c := s.Core; c.IsValid() {
		d.cores[c]++
		d.phones[phoneOf(&s)] = c
	}
}

// unindex undoes index.
func (d *SAD) unindex(e *entry) {
	if e.p.dir != sa.Out && e.p.fam(slotCore) == famNone {
		return
	}
	s := e.p.unpack()
	if s.Direction == sa.Out {
		d.outSel.Remove(sa.OutSelector(&s), e)
	}
	if c := s.Core; c.IsValid() {
		if d.cores[c]--; d.cores[c] <= 0 {
			delete(d.cores, c)
			if k := phoneOf(&s); d.phones[k] == c {
				delete(d.phones, k)
			}
		}
	}
}

// CoreInUse says whether any SA names core address a.
func (d *SAD) CoreInUse(a netip.Addr) bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.cores[a] > 0
}

// CoreOf returns the core address the SAs of the phone at peer (its
// first NAT binding: address and encap port, 0 for plain ESP) with inner
// address inner use, if any: a re-registration keeps it.
func (d *SAD) CoreOf(peer netip.AddrPort, inner netip.Prefix) (netip.Addr, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	a, ok := d.phones[phoneKey{peer, inner}]
	return a, ok
}

// Overlap returns the error adding s would meet for its selectors, if
// any (sec-agree checks a core address before using it).
func (d *SAD) Overlap(s *sa.SA) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.overlap(s, nil, nil)
}

func (d *SAD) overlap(s *sa.SA, self *entry, replaces []sa.ID) error {
	if s.Direction != sa.Out {
		return nil
	}
	sel := sa.OutSelector(s)
	other, osel, ok := d.outSel.Conflict(sel, func(o *entry) bool {
		if o == self {
			return true
		}
		for _, id := range replaces {
			if o.id() == id {
				return true
			}
		}
		return false
	})
	if !ok {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrOverlap, &sa.OverlapError{SA: s.Label(), Other: other.p.label(), Common: sel.Common(osel)})
}

// transportReady refuses a transport-mode SA the data path could not
// carry (docs/addressing.md, "Transport mode"): the gateway delivers the
// phone's segments from its core address to one core-side address, so
// both must be known. Here, where every source (config, API, sec-agree,
// etcd) passes, so none half-works.
func transportReady(s *sa.SA) error {
	if s.Mode != sa.Transport {
		return nil
	}
	if !s.Core.IsValid() {
		return fmt.Errorf("%s: inner.core: %w: a transport-mode SA needs the phone's core address: name one in inner.core or configure core_pool to allocate it", s.Label(), ErrInvalid)
	}
	if !s.InnerLocal.IsValid() {
		return fmt.Errorf("%s: inner.local: %w: a transport-mode SA needs the core-side address its phone's packets are delivered to (e.g. the P-CSCF), one address", s.Label(), ErrInvalid)
	}
	if !s.InnerLocal.IsSingleIP() || s.InnerPeer.IsValid() || s.Core.Is4() != s.Local.Is4() || s.InnerLocal.Addr().Is4() != s.Local.Is4() {
		return fmt.Errorf("%s: inner: %w: not from sa.Parse (transport mode: one inner.local address and inner.core of local's family, no inner.peer)", s.Label(), ErrInvalid)
	}
	return nil
}

func initialBinding(s *sa.SA) netip.AddrPort {
	var port uint16
	if s.Encap != nil {
		port = s.Encap.PeerPort
	}
	return netip.AddrPortFrom(s.Peer, port)
}

// check applies the uniqueness and capacity rules to s; self is the entry
// s replaces on update (nil on add).
func (d *SAD) check(s *sa.SA, self *entry, replaces []sa.ID) error {
	if s.Direction != sa.In && s.Direction != sa.Out || s.SPI < 256 || !s.Peer.IsValid() {
		return fmt.Errorf("%s: %w: not from sa.Parse (direction, SPI or peer unset)", s.Label(), ErrInvalid)
	}
	if hasZone(s) {
		return fmt.Errorf("%s: %w: not from sa.Parse (an address with an IPv6 zone)", s.Label(), ErrInvalid)
	}
	if err := transportReady(s); err != nil {
		return err
	}
	id := s.ID()
	if other := d.lookup(id); other != nil && other != self {
		if s.Direction == sa.In {
			return fmt.Errorf("%s: %w: inbound SPI 0x%08x is used by %s (the XDP SA map is keyed by SPI alone)", s.Label(), ErrExists, s.SPI, other.p.label())
		}
		return fmt.Errorf("%s: %w: outbound SPI 0x%08x to %s is used by %s", s.Label(), ErrExists, s.SPI, id.Peer, other.p.label())
	}
	if s.Name != "" {
		if other, dup := d.byName[s.Name]; dup && other != self {
			return fmt.Errorf("%s: %w: name is used by the %s SA 0x%08x", s.Label(), ErrExists, other.p.dir, other.p.spi)
		}
	}
	if self == nil && d.max > 0 {
		if s.Direction == sa.Out && d.out >= d.max || s.Direction == sa.In && d.in >= d.max {
			return fmt.Errorf("%s: %w: %d %s SAs", s.Label(), ErrFull, d.max, s.Direction)
		}
	}
	return d.overlap(s, self, replaces)
}

// place chooses a new group's worker. An SA without a core address whose
// destination selector (inner peer prefix, transport peer) is already an
// outbound SA's goes to that SA's worker: XDP's trie steers the prefix to
// one worker, which picks among the SAs there by ports (two phones on one
// inner address told apart by the P-CSCF's protected ports, or one
// phone's re-registration). Otherwise the least-loaded worker.
func (d *SAD) place(s *sa.SA) uint16 {
	if !s.Core.IsValid() {
		if e, ok := d.outSel.Any(sa.OutSelector(s).Dst); ok {
			return e.worker
		}
	}
	return d.leastLoaded()
}

func (d *SAD) leastLoaded() uint16 {
	best := 0
	for i := 1; i < len(d.workers); i++ {
		if d.workers[i].sas < d.workers[best].sas {
			best = i
		}
	}
	return uint16(best)
}

// leave takes e out of its group, dropping the group when it empties.
func (d *SAD) leave(e *entry) {
	gk := e.group()
	head := d.groups.get(gk)
	if head == e {
		d.groups.set(gk, e.nextPeer)
	} else {
		for p := head; p != nil; p = p.nextPeer {
			if p.nextPeer == e {
				p.nextPeer = e.nextPeer
				break
			}
		}
	}
	e.nextPeer = nil
}

func (d *SAD) unlinkOut(e *entry) {
	head := d.outSPI[e.p.spi]
	if head == e {
		if e.nextOut == nil {
			delete(d.outSPI, e.p.spi)
		} else {
			d.outSPI[e.p.spi] = e.nextOut
		}
	} else {
		for p := head; p != nil; p = p.nextOut {
			if p.nextOut == e {
				p.nextOut = e.nextOut
				break
			}
		}
	}
	e.nextOut = nil
}

// Update replaces the SA with s's identity by s. Runtime fields stay: the
// worker, the index, the binding and the creation time — unless the
// update moves the SA into another pairing group that lives on another
// worker, in which case it follows its group (new worker, new index, the
// group's binding). SPI and direction are the identity and cannot change
// (delete and add: a new SPI is a new SA with fresh replay state).
func (d *SAD) Update(s sa.SA) (Record, error) {
	d.mu.Lock()
	e, err := d.update(&s)
	var out Record
	if err == nil {
		out = e.export()
	}
	d.mu.Unlock()
	if err == nil {
		d.wake()
	}
	return out, err
}

func (d *SAD) update(s *sa.SA) (*entry, error) {
	e := d.lookup(s.ID())
	ok := e != nil
	if !ok {
		return nil, fmt.Errorf("%s: %w: %s", s.Label(), ErrNotFound, s.ID())
	}
	if err := d.check(s, e, nil); err != nil {
		return nil, err
	}
	d.unindex(e)
	defer d.index(e)
	prevWorker, prevIndex := e.worker, e.index
	oldKey, newKey := e.group(), GroupOf(s)
	if oldKey != newKey {
		d.leave(e) // by its old key: before e.p changes
	}
	if e.p.name != s.Name {
		if e.p.name != "" {
			delete(d.byName, e.p.name)
		}
		if s.Name != "" {
			d.byName[s.Name] = e
		}
	}
	old := e.p
	var sh sharedVal
	e.p, sh = pack(s)
	d.adopt(&e.p, sh)
	d.release(&old)
	if oldKey != newKey {
		head := d.groups.get(newKey)
		if head != nil && head.worker != e.worker {
			d.workers[e.worker].sas--
			d.workers[e.worker].release(e.index)
			e.worker = head.worker
			e.index = d.workers[head.worker].alloc()
			d.workers[head.worker].sas++
		}
		if head != nil {
			e.bind = head.bind
		} else {
			e.bind = bindingOf(initialBinding(s))
		}
		e.nextPeer = head
		d.groups.set(newKey, e)
	}
	d.record(e, OpUpdate, prevWorker, prevIndex)
	return e, nil
}

// Replace is a rekey's one atomic step: under one lock it checks that
// every old SA exists and that no other change has replaced it, adds all
// the new SAs (all or none) and marks the old ones replaced. Of several
// concurrent Replace calls naming one old SA exactly one succeeds; the
// others get ErrConflict and change nothing. The old SAs stay (marked)
// until the caller deletes them.
func (d *SAD) Replace(old []sa.ID, news []sa.SA) ([]Record, error) {
	d.mu.Lock()
	for _, id := range old {
		e := d.lookup(id)
		if e == nil {
			d.mu.Unlock()
			return nil, fmt.Errorf("old SA %s: %w", id, ErrNotFound)
		}
		if e.replaced {
			d.mu.Unlock()
			return nil, fmt.Errorf("old SA %s (%s): %w", id, e.p.label(), ErrConflict)
		}
	}
	now := time.Now().UnixNano()
	added := make([]*entry, 0, len(news))
	for i := range news {
		e, err := d.addChecked(&news[i], now, old)
		if err != nil {
			for _, a := range added {
				d.delete(a)
			}
			d.mu.Unlock()
			if len(added) > 0 {
				d.wake()
			}
			return nil, err
		}
		added = append(added, e)
	}
	for _, id := range old {
		d.lookup(id).replaced = true
	}
	out := make([]Record, len(added))
	for i, e := range added {
		out[i] = e.export()
	}
	d.mu.Unlock()
	d.wake()
	return out, nil
}

// Delete removes the SA with this identity and frees its index.
func (d *SAD) Delete(id sa.ID) (Record, error) {
	d.mu.Lock()
	e := d.lookup(id)
	ok := e != nil
	var out Record
	if ok {
		d.delete(e)
		out = e.export()
	}
	d.mu.Unlock()
	if !ok {
		return Record{}, fmt.Errorf("delete %s: %w", id, ErrNotFound)
	}
	d.wake()
	return out, nil
}

// DeleteName removes the SA with this name.
func (d *SAD) DeleteName(name string) (Record, error) {
	d.mu.Lock()
	e, ok := d.byName[name]
	var out Record
	if ok {
		d.delete(e)
		out = e.export()
	}
	d.mu.Unlock()
	if !ok {
		return Record{}, fmt.Errorf("delete sa %q: %w", name, ErrNotFound)
	}
	d.wake()
	return out, nil
}

func (d *SAD) delete(e *entry) {
	d.unindex(e)
	if e.p.name != "" {
		delete(d.byName, e.p.name)
	}
	if e.p.dir == sa.Out {
		d.unlinkOut(e)
		d.out--
	} else {
		delete(d.inSPI, e.p.spi)
		d.in--
	}
	d.leave(e)
	w := &d.workers[e.worker]
	w.sas--
	w.release(e.index)
	d.release(&e.p)
	e.deleted = true
	d.dead++
	d.record(e, OpDelete, e.worker, e.index)
	if d.dead > 1024 && d.dead*2 > len(d.order) {
		d.compact()
	}
}

func (d *SAD) compact() {
	live := d.order[:0]
	for _, e := range d.order {
		if !e.deleted {
			live = append(live, e)
		}
	}
	clear(d.order[len(live):])
	d.order, d.dead = live, 0
}

// Get returns the SA with this identity.
func (d *SAD) Get(id sa.ID) (Record, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if e := d.lookup(id); e != nil {
		return e.export(), true
	}
	return Record{}, false
}

// Group returns the identities of the SAs sharing id's group (its SA
// pair, or a registration's SAs): one NAT binding, one worker. id itself
// is included; nil when id is unknown.
func (d *SAD) Group(id sa.ID) []sa.ID {
	d.mu.RLock()
	defer d.mu.RUnlock()
	e := d.lookup(id)
	ok := e != nil
	if !ok {
		return nil
	}
	var out []sa.ID
	for p := d.groups.get(e.group()); p != nil; p = p.nextPeer {
		out = append(out, p.id())
	}
	return out
}

// GetName returns the SA with this name.
func (d *SAD) GetName(name string) (Record, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if e, ok := d.byName[name]; ok {
		return e.export(), true
	}
	return Record{}, false
}

// Lookup finds an SA by direction and SPI alone, as an operator types it.
// Inbound SPIs are unique; an outbound SPI shared by several peers gives
// ErrAmbiguous (use Get with the full ID, or the name).
func (d *SAD) Lookup(dir sa.Direction, spi uint32) (Record, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	var e *entry
	if dir == sa.Out {
		e = d.outSPI[spi]
		if e != nil && e.nextOut != nil {
			return Record{}, fmt.Errorf("out 0x%08x: %w", spi, ErrAmbiguous)
		}
	} else {
		e = d.inSPI[spi]
	}
	if e == nil {
		return Record{}, fmt.Errorf("%s 0x%08x: %w", dir, spi, ErrNotFound)
	}
	return e.export(), nil
}

// List returns up to limit SAs in creation order, starting after cursor
// (0 for the first page), appended to dst[:0]. next is the cursor for the
// following page, 0 once the end is reached. An SA keeps its place across
// updates, so paging while others write neither repeats nor skips an SA
// that exists throughout.
func (d *SAD) List(cursor uint64, limit int, dst []Record) (page []Record, next uint64) {
	page = dst[:0]
	if limit <= 0 {
		return page, cursor
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	i := sort.Search(len(d.order), func(i int) bool { return d.order[i].seq > cursor })
	var last uint64
	for ; i < len(d.order) && len(page) < limit; i++ {
		if e := d.order[i]; !e.deleted {
			page = append(page, e.export())
			last = e.seq
		}
	}
	for ; i < len(d.order); i++ {
		if !d.order[i].deleted {
			return page, last
		}
	}
	return page, 0
}

// ListChanged is List of only the SAs changed after version since (their
// Version is newer): what a consumer whose feed overran re-reads, without
// copying out the SAs it has seen.
func (d *SAD) ListChanged(since, cursor uint64, limit int, dst []Record) (page []Record, next uint64) {
	page = dst[:0]
	if limit <= 0 {
		return page, cursor
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	i := sort.Search(len(d.order), func(i int) bool { return d.order[i].seq > cursor })
	for ; i < len(d.order) && len(page) < limit; i++ {
		if e := d.order[i]; !e.deleted && e.version > since {
			page = append(page, e.export())
		}
	}
	if i == len(d.order) {
		return page, 0
	}
	return page, d.order[i-1].seq
}
