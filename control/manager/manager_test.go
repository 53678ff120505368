package manager

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

// recWorkers stands in for the workers: it applies commands to plain
// tables and records, for every command, whether XDP could steer to the
// slot at that moment, which is what the manager's ordering protects.
type recWorkers struct {
	t      *testing.T
	maps   *maps.Set
	mu     sync.Mutex
	tables [][]*worker.Slot
}

func (r *recWorkers) Len() int { return len(r.tables) }

func (r *recWorkers) Send(_ context.Context, w int, cmds []worker.Command) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range cmds {
		for int(c.Index) >= len(r.tables[w]) {
			r.tables[w] = append(r.tables[w], nil)
		}
		old := r.tables[w][c.Index]
		if c.Entry == nil && old != nil && old.Dir == worker.Inbound {
			// Uninstalling an inbound SA: XDP must not steer to it any more.
			if _, err := r.maps.SAs.Lookup(old.SA.SPI()); !errors.Is(err, maps.ErrNotFound) {
				r.t.Errorf("worker %d slot %d uninstalled while XDP still steers SPI 0x%x to it", w, c.Index, old.SA.SPI())
			}
		}
		if c.Entry == nil && old != nil && old.Dir == worker.Outbound {
			if p, err := r.maps.Policies.Lookup(old.InnerPeer().Addr()); err == nil && int(p.Worker) == w && p.SaIndex == c.Index {
				r.t.Errorf("worker %d slot %d uninstalled while XDP still steers %s to it", w, c.Index, old.InnerPeer())
			}
		}
		if c.Entry == nil && old != nil && (!c.Drain || c.Done == nil) {
			// Frames already steered to the slot must be processed first.
			r.t.Errorf("worker %d slot %d removed without draining", w, c.Index)
		}
		if c.Entry != nil && c.Entry.Dir == worker.Inbound {
			// Installing: XDP must not steer to the slot yet.
			if _, err := r.maps.SAs.Lookup(c.Entry.SA.SPI()); err == nil && old == nil {
				r.t.Errorf("SPI 0x%x published before its worker held it", c.Entry.SA.SPI())
			}
		}
		if c.Entry != nil && c.Inherit && old != nil && old.Dir == c.Entry.Dir && old.SA.SPI() == c.Entry.SA.SPI() {
			worker.Inherit(c.Entry, old) // what the real worker does on its thread
		}
		r.tables[w][c.Index] = c.Entry
		if c.Done != nil {
			close(c.Done) // no frames in flight here: a drain completes at once
		}
	}
	return nil
}

func (r *recWorkers) Sync(context.Context, int) error { return nil }

func (r *recWorkers) entry(w int, i uint32) *worker.Slot {
	r.mu.Lock()
	defer r.mu.Unlock()
	if int(i) >= len(r.tables[w]) {
		return nil
	}
	return r.tables[w][i]
}

type fixture struct {
	d    *sad.SAD
	m    *Manager
	w    *recWorkers
	maps *maps.Set
	seq  *seqstore.Store
}

// newOverrunFixture is a 2-worker fixture whose SAD's change log holds
// only 4 changes, so a test can overrun it and force a resync.
func newOverrunFixture(t *testing.T) *fixture {
	t.Helper()
	f := newFixture(t, 2, "")
	d, err := sad.New(sad.Options{Workers: 2, MaxSAs: 1000, LogSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	f.d = d
	f.m, _ = New(Options{SAD: d, Maps: f.maps, Workers: f.w, Events: make(chan worker.BindingChange)})
	return f
}

func newFixture(t *testing.T, workers int, seqDir string) *fixture {
	t.Helper()
	netns.RequireRoot(t)
	inst, err := loader.Load(loader.Options{Public: "lo", NoPin: true, SACapacity: 1024, PolicyCapacity: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Close() })
	d, err := sad.New(sad.Options{Workers: workers, MaxSAs: 1000})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{d: d, maps: inst.Maps, w: &recWorkers{t: t, maps: inst.Maps, tables: make([][]*worker.Slot, workers)}}
	if seqDir != "" {
		if f.seq, err = seqstore.Open(seqDir, seqstore.Options{Block: 1000}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.seq.Close() })
	}
	f.m, err = New(Options{SAD: d, Maps: inst.Maps, Workers: f.w, Events: make(chan worker.BindingChange), Seq: f.seq})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) sync(t *testing.T) {
	t.Helper()
	if err := f.m.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
}

var (
	gwAddr   = netip.MustParseAddr("198.51.100.1")
	phoneOut = netip.MustParseAddr("192.0.2.10")
)

func mkSA(name string, spi uint32, dir sa.Direction, inner string, key byte) sa.SA {
	k := make([]byte, 20)
	for i := range k {
		k[i] = key
	}
	return sa.SA{Name: name, SPI: spi, Direction: dir, Mode: sa.Tunnel, Proposal: esp.AES128GCM16, EncKey: k,
		ReplayWindow: map[bool]uint32{true: 1024}[dir == sa.In], Local: gwAddr, Peer: phoneOut,
		Encap: &sa.Encap{LocalPort: 4500, PeerPort: 4500}, InnerLocal: netip.MustParsePrefix("10.0.0.0/24"),
		InnerPeer: netip.MustParsePrefix(inner)}
}

// Adding a pair installs both in one worker's table, then publishes the
// inbound SPI and the outbound policy pointing at those slots; both share
// one NAT binding.
func TestAddPublishesAfterInstall(t *testing.T) {
	f := newFixture(t, 2, "")
	in, out := mkSA("in", 0x1001, sa.In, "10.99.0.1/32", 1), mkSA("out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	if _, err := f.d.Add(in); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.Add(out); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	ei, _ := f.d.Get(in.ID())
	eo, _ := f.d.Get(out.ID())
	if ei.Worker != eo.Worker {
		t.Fatalf("pair split over workers %d and %d", ei.Worker, eo.Worker)
	}
	v, err := f.maps.SAs.Lookup(0x1001)
	if err != nil || v.SaIndex != ei.Index || v.Worker != ei.Worker {
		t.Fatalf("SA map: %+v, %v; want index %d worker %d", v, err, ei.Index, ei.Worker)
	}
	p, err := f.maps.Policies.Lookup(netip.MustParseAddr("10.99.0.1"))
	if err != nil || p.SaIndex != eo.Index || p.Worker != eo.Worker {
		t.Fatalf("policy: %+v, %v; want index %d", p, err, eo.Index)
	}
	wi, wo := f.w.entry(int(ei.Worker), ei.Index), f.w.entry(int(eo.Worker), eo.Index)
	if wi == nil || wo == nil || wi.Dir != worker.Inbound || wo.Dir != worker.Outbound || wi.Binding != wo.Binding {
		t.Fatalf("worker entries %+v %+v: want in/out sharing one binding", wi, wo)
	}
	if wi.InnerPeer() != in.InnerPeer || wo.Scope().Local != gwAddr || wo.LocalPort != 4500 {
		t.Fatalf("entry fields: inner %v local %v:%d", wi.InnerPeer(), wo.Scope().Local, wo.LocalPort)
	}
	if f.m.Installed() != 2 {
		t.Fatalf("installed %d", f.m.Installed())
	}
}

// Deleting unpublishes before uninstalling (recWorkers asserts it) and
// clears both maps.
func TestDeleteUnpublishesFirst(t *testing.T) {
	f := newFixture(t, 1, "")
	in, out := mkSA("in", 0x1001, sa.In, "10.99.0.1/32", 1), mkSA("out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	if _, err := f.d.Add(in); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.Add(out); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.d.Delete(in.ID()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.Delete(out.ID()); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.maps.SAs.Lookup(0x1001); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("SA map still has the SPI: %v", err)
	}
	if _, err := f.maps.Policies.Lookup(netip.MustParseAddr("10.99.0.1")); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("policy still present: %v", err)
	}
	if f.w.entry(0, 0) != nil || f.w.entry(0, 1) != nil || f.m.Installed() != 0 {
		t.Fatal("worker table still holds the SAs")
	}
}

// Updating an SA (new keys) rebuilds its cipher state but continues its
// sequence counter and replay window: rewinding either would reuse IVs or
// accept replays.
func TestUpdateCarriesSequenceAndWindow(t *testing.T) {
	f := newFixture(t, 1, "")
	in, out := mkSA("in", 0x1001, sa.In, "10.99.0.1/32", 1), mkSA("out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	if _, err := f.d.Add(in); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.Add(out); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	eo, _ := f.d.Get(out.ID())
	ei, _ := f.d.Get(in.ID())
	oldOut, oldIn := f.w.entry(0, eo.Index), f.w.entry(0, ei.Index)
	if err := oldOut.SA.SetNextSeq(5000); err != nil {
		t.Fatal(err)
	}
	oldIn.SA.Replay().Update(777)
	oldOut.Counters.Packets.Store(4999)

	out.EncKey = make([]byte, 20) // rekeyed in place
	in.EncKey = make([]byte, 20)
	if _, err := f.d.Update(out); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.Update(in); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	newOut, newIn := f.w.entry(0, eo.Index), f.w.entry(0, ei.Index)
	if newOut == oldOut || newIn == oldIn {
		t.Fatal("update did not rebuild the entries")
	}
	if got := newOut.SA.NextSeq(); got != 5000 {
		t.Fatalf("outbound next sequence %d after update, want 5000", got)
	}
	if got := newIn.SA.Replay().Top(); got != 777 {
		t.Fatalf("inbound window top %d after update, want 777", got)
	}
	if newOut.Counters.Packets.Load() != 4999 {
		t.Fatal("counters lost in the update")
	}
	if v, err := f.maps.SAs.Lookup(0x1001); err != nil || v.SaIndex != ei.Index {
		t.Fatalf("SA map after update: %+v %v", v, err)
	}
}

// Rekey make-before-break: two outbound SAs serve one inner prefix; the
// policy points at the newer, falls back to the older when the newer
// goes, and disappears with the last.
func TestPolicyFollowsNewestOutbound(t *testing.T) {
	f := newFixture(t, 1, "")
	old, nw := mkSA("old", 0x2001, sa.Out, "10.99.0.1/32", 1), mkSA("new", 0x2002, sa.Out, "10.99.0.1/32", 2)
	if _, err := f.d.Add(old); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	// A rekey's new SA may overlap the SA it replaces, and only that one
	// (a plain Add of it is refused as ambiguous).
	if _, err := f.d.AddRekey(nw, []sa.ID{old.ID()}); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	eo, okOld := f.d.Get(old.ID())
	en, okNew := f.d.Get(nw.ID())
	if !okOld || !okNew || eo.Index == en.Index {
		t.Fatalf("old in the SAD %v at slot %d, new %v at slot %d: want both, in two slots", okOld, eo.Index, okNew, en.Index)
	}
	dst := netip.MustParseAddr("10.99.0.1")
	if p, _ := f.maps.Policies.Lookup(dst); p.SaIndex != en.Index {
		t.Fatalf("policy at %d, want the newer SA's %d", p.SaIndex, en.Index)
	}
	if _, err := f.d.Delete(nw.ID()); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if p, err := f.maps.Policies.Lookup(dst); err != nil || p.SaIndex != eo.Index {
		t.Fatalf("policy %+v %v, want back at the older SA's %d", p, err, eo.Index)
	}
	if _, err := f.d.Delete(old.ID()); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.maps.Policies.Lookup(dst); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("policy left after both SAs went: %v", err)
	}
}

// Three outbound SAs on one prefix (one phone's, for three local ports),
// added in one sync (one commit, one
// publish): the newest holds the entry; removing the middle one leaves
// it there, removing the newest hands it back to the oldest.
func TestPolicyOlderRemovedFirst(t *testing.T) {
	f := newFixture(t, 1, "")
	var ids []sa.ID
	for i, n := range []string{"a", "b", "c"} {
		s := mkSA(n, 0x3001+uint32(i), sa.Out, "10.98.0.1/32", byte(1+i))
		// One phone's SAs for three local SIP ports: one trie prefix.
		s.Ports = sa.Ports{Local: 5060 + uint16(i), Proto: 17}
		if _, err := f.d.Add(s); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID())
	}
	f.sync(t)
	index := func(id sa.ID) uint32 {
		e, ok := f.d.Get(id)
		if !ok {
			t.Fatalf("%s not in the SAD", id)
		}
		return e.Index
	}
	dst := netip.MustParseAddr("10.98.0.1")
	want := func(id sa.ID, what string) {
		t.Helper()
		if p, err := f.maps.Policies.Lookup(dst); err != nil || p.SaIndex != index(id) {
			t.Fatalf("%s: policy %+v %v, want %s's index %d", what, p, err, id, index(id))
		}
	}
	want(ids[2], "all three")
	if _, err := f.d.Delete(ids[1]); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	want(ids[2], "middle removed")
	if _, err := f.d.Delete(ids[2]); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	want(ids[0], "newest removed")
	if _, err := f.d.Delete(ids[0]); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	if _, err := f.maps.Policies.Lookup(dst); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("policy left after every SA went: %v", err)
	}
	if len(f.m.policies) != 0 || len(f.m.older) != 0 {
		t.Fatalf("manager keeps %d policy keys, %d with older SAs", len(f.m.policies), len(f.m.older))
	}
}

// Pages of three SAs, so every publish overlaps the next page's build
// and install: a resync into an empty data path, then one Sync of
// changes whose later pages replace SAs (one whose add a page before is
// still being published) and delete a pair installed earlier. At the end the maps hold exactly what
// the SAD holds, each entry pointing at its SA's slot, and each slot
// holds its SA.
func TestPipelinedPages(t *testing.T) {
	defer func(n int) { resyncPage = n }(resyncPage)
	resyncPage = 3
	f := newOverrunFixture(t)
	d := f.d
	pair := func(i int, key byte) (in, out sa.SA) {
		inner := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 97, 0, byte(i)}), 32).String()
		return mkSA("", 0x4000+uint32(i), sa.In, inner, key), mkSA("", 0x5000+uint32(i), sa.Out, inner, key+1)
	}
	add := func(from, to int) {
		for i := from; i < to; i++ {
			in, out := pair(i, byte(2*i))
			for _, s := range []sa.SA{in, out} {
				if _, err := d.Add(s); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	check := func(what string, pairs []int) {
		t.Helper()
		if f.m.Installed() != 2*len(pairs) {
			t.Fatalf("%s: installed %d, want %d", what, f.m.Installed(), 2*len(pairs))
		}
		for _, i := range pairs {
			in, out := pair(i, 0)
			ein, ok1 := d.Get(in.ID())
			eout, ok2 := d.Get(out.ID())
			if !ok1 || !ok2 {
				t.Fatalf("%s: pair %d not in the SAD", what, i)
			}
			if st, err := f.maps.SAs.Lookup(in.SPI); err != nil || st.SaIndex != ein.Index || int(st.Worker) != int(ein.Worker) {
				t.Fatalf("%s: SPI 0x%x steers %+v %v, want worker %d index %d", what, in.SPI, st, err, ein.Worker, ein.Index)
			}
			if p, err := f.maps.Policies.Lookup(out.InnerPeer.Addr()); err != nil || p.SaIndex != eout.Index || int(p.Worker) != int(eout.Worker) {
				t.Fatalf("%s: policy %s %+v %v, want worker %d index %d", what, out.InnerPeer, p, err, eout.Worker, eout.Index)
			}
			for _, e := range []sad.Record{ein, eout} {
				if sl := f.w.entry(int(e.Worker), e.Index); sl == nil || sl.SA.SPI() != e.SA.SPI {
					t.Fatalf("%s: slot %d/%d does not hold SPI 0x%x", what, e.Worker, e.Index, e.SA.SPI)
				}
			}
		}
	}
	add(0, 8) // 16 changes > the log's 4: a resync, six pages
	f.sync(t)
	var all []int
	for i := range 8 {
		all = append(all, i)
	}
	check("resync", all)

	// Changes within the log: Sync's own pages.
	d2, err := sad.New(sad.Options{Workers: 2, MaxSAs: 1000})
	if err != nil {
		t.Fatal(err)
	}
	d = d2
	f.d = d
	f.m, _ = New(Options{SAD: d, Maps: f.maps, Workers: f.w, Events: make(chan worker.BindingChange)})
	add(0, 8)
	f.sync(t)
	check("first sync", all)
	add(8, 14) // pages of new SAs, then in later pages:
	// Pair 3's outbound (installed by the last sync) and pair 13's (added
	// two changes before, its publish in flight) replaced by new slot
	// versions.
	for _, i := range []int{3, 13} {
		_, out := pair(i, 0)
		out.EncKey = bytes.Repeat([]byte{0x77}, 20)
		if _, err := d.Update(out); err != nil {
			t.Fatal(err)
		}
	}
	in5, out5 := pair(5, 0) // pair 5 removed
	for _, id := range []sa.ID{in5.ID(), out5.ID()} {
		if _, err := d.Delete(id); err != nil {
			t.Fatal(err)
		}
	}
	f.sync(t)
	var left []int
	for i := range 14 {
		if i != 5 {
			left = append(left, i)
		}
	}
	check("paged sync", left)
	for _, spi := range []uint32{in5.SPI} {
		if _, err := f.maps.SAs.Lookup(spi); !errors.Is(err, maps.ErrNotFound) {
			t.Fatalf("deleted SPI 0x%x still steered: %v", spi, err)
		}
	}
	if _, err := f.maps.Policies.Lookup(out5.InnerPeer.Addr()); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("deleted pair's policy %s still there: %v", out5.InnerPeer, err)
	}
}

// A binding a worker learns reaches the SAD (the API shows it there).
func TestBindingEventReachesSAD(t *testing.T) {
	f := newFixture(t, 1, "")
	in := mkSA("in", 0x1001, sa.In, "10.99.0.1/32", 1)
	if _, err := f.d.Add(in); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	e, _ := f.d.Get(in.ID())
	moved := netip.MustParseAddrPort("203.0.113.7:61000")
	f.m.bindingChanged(worker.BindingChange{Worker: int(e.Worker), Index: e.Index, Peer: worker.Peer{Addr: moved}})
	if got, _ := f.d.Get(in.ID()); got.Binding != moved {
		t.Fatalf("SAD binding %v, want %v", got.Binding, moved)
	}
}

// With a sequence store, an outbound SA may send only below a durable
// reservation; a manager restarted on the same store starts the SA above
// everything the previous one reserved, and extension moves the limit.
func TestSequenceReservation(t *testing.T) {
	dir := t.TempDir()
	out := mkSA("out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	f := newFixture(t, 1, dir)
	if _, err := f.d.Add(out); err != nil {
		t.Fatal(err)
	}
	f.sync(t)
	e, _ := f.d.Get(out.ID())
	we := f.w.entry(0, e.Index)
	if we.SA.NextSeq() != 1 || we.Limit.Load() != 1001 || we.ExtendAt.Load() != 501 {
		t.Fatalf("first run: next %d limit %d extend at %d; want 1, 1001, 501", we.SA.NextSeq(), we.Limit.Load(), we.ExtendAt.Load())
	}
	we.Counters.Seq.Store(600) // the worker sent up to 600 and asked for more
	if err := f.m.extend(worker.SeqRequest{Worker: 0, Index: e.Index}); err != nil {
		t.Fatal(err)
	}
	if we.Limit.Load() != 2001 {
		t.Fatalf("limit after extension %d, want 2001", we.Limit.Load())
	}
	f.seq.Close()

	g := newFixture(t, 1, dir) // a restart: same state, fresh everything else
	if _, err := g.d.Add(out); err != nil {
		t.Fatal(err)
	}
	g.sync(t)
	e, _ = g.d.Get(out.ID())
	if got := g.w.entry(0, e.Index).SA.NextSeq(); got != 2001 {
		t.Fatalf("after restart the SA starts at %d, want 2001 (above every reservation)", got)
	}
}

// When the SAD's change log overran, Sync rebuilds from a full listing:
// everything the SAD holds ends up installed and published, and what it
// dropped meanwhile is unpublished and uninstalled.
func TestResyncAfterLogOverrun(t *testing.T) {
	f := newOverrunFixture(t)
	d := f.d
	var ids []sa.ID
	for i := 0; i < 40; i++ { // 40 changes > the log's 4: a resync
		s := mkSA("", 0x3000+uint32(i), sa.In, "10.99.1.0/24", byte(i))
		s.InnerPeer = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, 1, byte(i)}), 32)
		if _, err := d.Add(s); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID())
	}
	f.sync(t)
	if f.m.Installed() != 40 {
		t.Fatalf("installed %d after resync, want 40", f.m.Installed())
	}
	// The SAs the next overrun leaves unchanged keep their worker entries
	// (and so their ciphers and windows): a resync rebuilds only changes.
	kept := map[sa.ID]any{}
	for _, id := range ids[30:] {
		e, _ := d.Get(id)
		kept[id] = f.w.entry(int(e.Worker), e.Index)
	}
	for i := 0; i < 30; i++ { // 30 deletes: another overrun
		if _, err := d.Delete(ids[i]); err != nil {
			t.Fatal(err)
		}
	}
	// One changed during the overrun: that one is rebuilt.
	upd, _ := d.Get(ids[39])
	upd.SA.Peer = netip.MustParseAddr("192.0.2.99")
	if _, err := d.Update(upd.SA); err != nil {
		t.Fatal(err)
	}
	was := kept[ids[39]]
	delete(kept, ids[39])
	f.sync(t)
	if e, _ := d.Get(ids[39]); any(f.w.entry(int(e.Worker), e.Index)) == was {
		t.Fatalf("SPI 0x%x changed during the overrun but its entry was not rebuilt", ids[39].SPI)
	}
	if f.m.Installed() != 10 {
		t.Fatalf("installed %d after the second resync, want 10", f.m.Installed())
	}
	for id, was := range kept {
		e, _ := d.Get(id)
		if now := f.w.entry(int(e.Worker), e.Index); any(now) != was {
			t.Fatalf("SPI 0x%x unchanged across the overrun but reinstalled", id.SPI)
		}
	}
	for i, id := range ids {
		_, err := f.maps.SAs.Lookup(id.SPI)
		if gone := errors.Is(err, maps.ErrNotFound); gone != (i < 30) {
			t.Fatalf("SPI 0x%x published=%v, want %v", id.SPI, !gone, i >= 30)
		}
		e, ok := d.Get(id)
		if ok && f.w.entry(int(e.Worker), e.Index) == nil {
			t.Fatalf("SPI 0x%x not in its worker's table", id.SPI)
		}
	}
}

// The keepalives map follows installs, moves and removals by looking at
// the groups they touched only; a move whose event the workers lost is
// found by the full pass the lost-event count triggers.
func TestKeepaliveRegistrationFollowsChanges(t *testing.T) {
	f := newFixture(t, 1, "")
	ka := f.maps.Keepalives
	bA := netip.MustParseAddrPort("192.0.2.10:4500")
	bB := netip.MustParseAddrPort("192.0.2.11:4500")
	inA, outA := mkSA("a-in", 0x1001, sa.In, "10.99.0.1/32", 1), mkSA("a-out", 0x2001, sa.Out, "10.99.0.1/32", 2)
	inB, outB := mkSA("b-in", 0x1002, sa.In, "10.99.0.2/32", 3), mkSA("b-out", 0x2002, sa.Out, "10.99.0.2/32", 4)
	inB.Peer, outB.Peer = bB.Addr(), bB.Addr()
	for _, s := range []sa.SA{inA, outA, inB, outB} {
		if _, err := f.d.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	f.sync(t)
	f.m.syncKeepalives()
	registered := func(want ...netip.AddrPort) {
		t.Helper()
		for _, ap := range want {
			if _, ok := ka.Lookup(ap); !ok {
				t.Fatalf("%s not registered", ap)
			}
		}
		if n := ka.Len(); n != len(want) {
			t.Fatalf("%d bindings registered, want %d (%v)", n, len(want), want)
		}
	}
	registered(bA, bB)
	if len(f.m.kaCheck) != 0 {
		t.Fatalf("%d groups still listed after a pass", len(f.m.kaCheck))
	}

	// A learnt move with its event.
	moved := netip.MustParseAddrPort("192.0.2.10:61000")
	e, _ := f.d.Get(inA.ID())
	f.w.entry(int(e.Worker), e.Index).Binding.Set(worker.Peer{Addr: moved})
	f.m.bindingChanged(worker.BindingChange{Worker: int(e.Worker), Index: e.Index, Peer: worker.Peer{Addr: moved}})
	f.m.syncKeepalives()
	registered(moved, bB)

	// A move whose event was lost: unseen until the lost count moves.
	lostTo := netip.MustParseAddrPort("192.0.2.11:62000")
	eb, _ := f.d.Get(inB.ID())
	f.w.entry(int(eb.Worker), eb.Index).Binding.Set(worker.Peer{Addr: lostTo})
	var lost uint64
	f.m.o.EventsLost = func() uint64 { return lost }
	f.m.syncKeepalives()
	registered(moved, bB)
	lost = 1
	f.m.syncKeepalives()
	registered(moved, lostTo)

	// Removing a pair unregisters its binding.
	for _, id := range []sa.ID{inA.ID(), outA.ID()} {
		if _, err := f.d.Delete(id); err != nil {
			t.Fatal(err)
		}
	}
	f.sync(t)
	f.m.syncKeepalives()
	registered(lostTo)
}
