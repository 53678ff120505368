package sad

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
)

var gw = netip.MustParseAddr("198.51.100.20")

// phone returns the SA of phone i in direction dir, as sa.Parse would:
// its own peer address behind its own NAPT port, its own inner address.
func phone(i int, dir sa.Direction) sa.SA {
	spi := uint32(0x10000 + i)
	if dir == sa.Out {
		spi = uint32(0xc0000000 + i)
	}
	key := make(sa.Secret, 20)
	key[0] = byte(i)
	return sa.SA{
		Name: fmt.Sprintf("ue%d-%s", i, dir), SPI: spi, Direction: dir, Mode: sa.Tunnel, Proposal: esp.AES128GCM16,
		EncKey: key, ReplayWindow: map[sa.Direction]uint32{sa.In: 1024}[dir],
		Local: gw, Peer: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
		Encap:      &sa.Encap{LocalPort: 4500, PeerPort: uint16(1024 + i%60000)},
		InnerLocal: netip.MustParsePrefix("10.0.0.0/24"),
		InnerPeer:  netip.PrefixFrom(netip.AddrFrom4([4]byte{100, byte(64 + i>>16), byte(i >> 8), byte(i)}), 32),
	}
}

func newSAD(t testing.TB, o Options) *SAD {
	t.Helper()
	d, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func mustAdd(t testing.TB, d *SAD, s sa.SA) Record {
	t.Helper()
	e, err := d.Add(s)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestNewRejects(t *testing.T) {
	for _, o := range []Options{{Workers: 0}, {Workers: 65536}, {Workers: 1, MaxSAs: -1}} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
}

func TestSPICollisionRules(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	in := phone(1, sa.In)
	mustAdd(t, d, in)

	// Another phone's inbound SA with the same SPI: the XDP map could not
	// tell them apart.
	clash := phone(2, sa.In)
	clash.SPI = in.SPI
	_, err := d.Add(clash)
	if !errors.Is(err, ErrExists) || err.Error() != `sa "ue2-in": already exists: inbound SPI 0x00010001 is used by sa "ue1-in" (the XDP SA map is keyed by SPI alone)` {
		t.Fatalf("inbound clash: %v", err)
	}

	// Outbound SPIs are the peers' choice: same SPI, other peer is fine,
	// as is the same peer address on another NAPT port; the same peer
	// and port is the same SA.
	o1 := phone(1, sa.Out)
	o1.SPI = in.SPI // the outbound SPI space is separate from the inbound one
	mustAdd(t, d, o1)
	o2 := phone(2, sa.Out)
	o2.SPI = o1.SPI
	mustAdd(t, d, o2)
	o3 := phone(3, sa.Out)
	o3.SPI, o3.Peer = o1.SPI, o1.Peer // same NAPT address, its own port
	mustAdd(t, d, o3)
	o4 := phone(4, sa.Out)
	o4.SPI, o4.Peer, o4.Encap = o1.SPI, o1.Peer, o1.Encap
	if _, err := d.Add(o4); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "outbound SPI 0x00010001 to 10.0.0.1:1025 is used by sa \"ue1-out\"") {
		t.Fatalf("outbound clash: %v", err)
	}

	// Names are unique across directions.
	dup := phone(5, sa.Out)
	dup.Name = "ue1-in"
	if _, err := d.Add(dup); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "name is used by the in SA 0x00010001") {
		t.Fatalf("name clash: %v", err)
	}
	if in, out := d.Len(); in != 1 || out != 3 {
		t.Fatalf("len %d/%d after rejected adds", in, out)
	}

	if _, err := d.Lookup(sa.Out, o1.SPI); !errors.Is(err, ErrAmbiguous) {
		t.Errorf("ambiguous lookup: %v", err)
	}
	if e, err := d.Lookup(sa.In, in.SPI); err != nil || e.SA.Name != "ue1-in" {
		t.Errorf("inbound lookup: %v %v", e.SA, err)
	}
	if _, err := d.Lookup(sa.In, 0x999); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing lookup: %v", err)
	}
	if e, ok := d.Get(o3.ID()); !ok || e.SA.Name != "ue3-out" {
		t.Errorf("get by full outbound ID: %v %v", e.SA, ok)
	}
	// Two of the three outbound SAs gone: the SPI is unambiguous again.
	if _, err := d.Delete(o1.ID()); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteName("ue3-out"); err != nil {
		t.Fatal(err)
	}
	if e, err := d.Lookup(sa.Out, o1.SPI); err != nil || e.SA.Name != "ue2-out" {
		t.Errorf("lookup after deletes: %v %v", e.SA, err)
	}
	if _, err := d.Add(sa.SA{Name: "raw"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("zero SA: %v", err)
	}
}

func TestPairingAndBalance(t *testing.T) {
	d := newSAD(t, Options{Workers: 3})
	e1 := mustAdd(t, d, phone(1, sa.In))
	for i := 2; i <= 5; i++ {
		mustAdd(t, d, phone(i, sa.In))
	}
	// Workers now hold 2,2,1 SAs; ue1's partner still joins ue1's worker.
	o1 := mustAdd(t, d, phone(1, sa.Out))
	if o1.Worker != e1.Worker {
		t.Fatalf("ue1-out on worker %d, ue1-in on %d", o1.Worker, e1.Worker)
	}
	// An explicit pair label overrides the derived rule.
	a, b := phone(20, sa.In), phone(21, sa.Out)
	a.Pair, b.Pair = "alice", "alice"
	ea := mustAdd(t, d, a)
	for i := 6; i <= 8; i++ {
		mustAdd(t, d, phone(i, sa.In))
	}
	if eb := mustAdd(t, d, b); eb.Worker != ea.Worker {
		t.Errorf("pair label: worker %d vs %d", eb.Worker, ea.Worker)
	}

	// Balance: many pairs, in and out added at different times.
	d = newSAD(t, Options{Workers: 4})
	const n = 1001
	for i := 0; i < n; i++ {
		mustAdd(t, d, phone(i, sa.In))
	}
	for i := 0; i < n; i++ {
		mustAdd(t, d, phone(i, sa.Out))
	}
	loads := d.Workers()
	lo, hi := loads[0].SAs, loads[0].SAs
	total := 0
	for _, l := range loads {
		lo, hi = min(lo, l.SAs), max(hi, l.SAs)
		total += l.SAs
		if l.IndexLimit != uint32(l.SAs) {
			t.Errorf("worker indexes not dense: %d SAs, limit %d", l.SAs, l.IndexLimit)
		}
	}
	if total != 2*n || hi-lo > 2 {
		t.Errorf("loads %+v", loads)
	}
	for i := 0; i < n; i++ {
		in, _ := d.Get(phone(i, sa.In).ID())
		out, _ := d.Get(phone(i, sa.Out).ID())
		if in.Worker != out.Worker {
			t.Fatalf("phone %d split across workers %d and %d", i, in.Worker, out.Worker)
		}
	}
}

func TestIndexReuse(t *testing.T) {
	d := newSAD(t, Options{Workers: 1})
	for i := 0; i < 10; i++ {
		if e := mustAdd(t, d, phone(i, sa.In)); e.Index != uint32(i) {
			t.Fatalf("SA %d got index %d", i, e.Index)
		}
	}
	for _, i := range []int{7, 2, 5} {
		if e, err := d.Delete(phone(i, sa.In).ID()); err != nil || e.Index != uint32(i) {
			t.Fatalf("delete %d: %v index %d", i, err, e.Index)
		}
	}
	// Oldest freed first, and no index beyond the dense range.
	for k, want := range []uint32{7, 2, 5, 10} {
		if e := mustAdd(t, d, phone(100+k, sa.In)); e.Index != want {
			t.Errorf("add %d got index %d, want %d", k, e.Index, want)
		}
	}
	if l := d.Workers()[0]; l.SAs != 11 || l.IndexLimit != 11 {
		t.Errorf("load %+v", l)
	}
	// A long free list compacts without losing indexes.
	for i := 0; i < 3000; i++ {
		mustAdd(t, d, phone(1000+i, sa.In))
	}
	for i := 0; i < 3000; i++ {
		if _, err := d.Delete(phone(1000+i, sa.In).ID()); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[uint32]bool{}
	for i := 0; i < 3000; i++ {
		e := mustAdd(t, d, phone(5000+i, sa.In))
		if e.Index < 11 || e.Index >= 3011 || seen[e.Index] {
			t.Fatalf("index %d reused badly", e.Index)
		}
		seen[e.Index] = true
	}
	if l := d.Workers()[0]; l.IndexLimit != 3011 {
		t.Errorf("index limit grew to %d", l.IndexLimit)
	}
}

func TestUpdateKeepsRuntime(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	in, out := phone(1, sa.In), phone(1, sa.Out)
	ein := mustAdd(t, d, in)
	mustAdd(t, d, out)
	moved := netip.MustParseAddrPort("203.0.113.9:40000")
	if n, err := d.SetBinding(in.ID(), moved); err != nil || n != 2 {
		t.Fatalf("set binding: %d %v", n, err)
	}
	time.Sleep(time.Millisecond) // so a reset creation time would show

	upd := in
	upd.EncKey = make(sa.Secret, 20)
	upd.Lifetime.HardSeconds = 3600
	upd.Name = "ue1-renamed"
	e, err := d.Update(upd)
	if err != nil {
		t.Fatal(err)
	}
	if e.Worker != ein.Worker || e.Index != ein.Index || e.Binding != moved || !e.Created.Equal(ein.Created) ||
		e.SA.Lifetime.HardSeconds != 3600 || e.Version <= ein.Version {
		t.Errorf("update lost runtime fields: before %+v after %+v", ein, e)
	}
	if _, ok := d.GetName("ue1-in"); ok {
		t.Error("old name still resolves")
	}
	if g, ok := d.GetName("ue1-renamed"); !ok || g.ID != in.ID() {
		t.Error("new name does not resolve")
	}

	// Not found, and a rename onto a taken name.
	if _, err := d.Update(phone(9, sa.In)); !errors.Is(err, ErrNotFound) {
		t.Errorf("update of unknown SA: %v", err)
	}
	taken := upd
	taken.Name = "ue1-out"
	if _, err := d.Update(taken); !errors.Is(err, ErrExists) {
		t.Errorf("rename onto taken name: %v", err)
	}

	// Re-pairing into a group on the other worker moves the SA there,
	// with a fresh index and the group's binding.
	other := mustAdd(t, d, phone(2, sa.In))
	if other.Worker == ein.Worker {
		t.Fatalf("test premise: phone 2 should land on the other worker")
	}
	since := d.Version()
	re := upd
	re.Peer, re.Encap, re.InnerPeer = phone(2, sa.In).Peer, phone(2, sa.In).Encap, phone(2, sa.In).InnerPeer
	e, err = d.Update(re)
	if err != nil {
		t.Fatal(err)
	}
	if e.Worker != other.Worker || e.Index != 1 || e.Binding != other.Binding {
		t.Errorf("re-paired SA: %+v", e)
	}
	ch, _, err := d.Changes(since, nil)
	if err != nil || len(ch) != 1 || ch[0].Op != OpUpdate || ch[0].PrevWorker != ein.Worker || ch[0].PrevIndex != ein.Index ||
		ch[0].Worker != other.Worker || ch[0].Index != 1 {
		t.Errorf("changes %+v %v", ch, err)
	}
	// The partner stays with its binding; its old group is now just it.
	if o, _ := d.Get(out.ID()); o.Worker != ein.Worker || o.Binding != moved {
		t.Errorf("partner: %+v", o)
	}
	if l := d.Workers(); l[ein.Worker].SAs != 1 || l[other.Worker].SAs != 2 {
		t.Errorf("loads %+v", l)
	}
}

func TestDeleteFrees(t *testing.T) {
	d := newSAD(t, Options{Workers: 2, MaxSAs: 2})
	in := mustAdd(t, d, phone(1, sa.In))
	mustAdd(t, d, phone(2, sa.In))
	if _, err := d.Add(phone(3, sa.In)); !errors.Is(err, ErrFull) {
		t.Fatalf("third inbound SA: %v", err)
	}
	mustAdd(t, d, phone(3, sa.Out)) // the outbound cap is separate

	e, err := d.Delete(in.ID)
	if err != nil || e.Index != in.Index || e.Worker != in.Worker {
		t.Fatalf("delete: %+v %v", e, err)
	}
	if _, ok := d.Get(in.ID); ok {
		t.Error("deleted SA still found")
	}
	if _, ok := d.GetName("ue1-in"); ok {
		t.Error("deleted name still found")
	}
	if _, err := d.Delete(in.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("second delete: %v", err)
	}
	if _, err := d.DeleteName("nobody"); !errors.Is(err, ErrNotFound) {
		t.Errorf("delete of unknown name: %v", err)
	}
	// SPI, name, slot and capacity are all free again.
	again := phone(4, sa.In)
	again.SPI, again.Name = in.SA.SPI, "ue1-in"
	e = mustAdd(t, d, again)
	if e.Index != in.Index || e.Worker != in.Worker {
		t.Errorf("freed slot not reused: %+v", e)
	}
	if _, err := d.SetBinding(in.ID, netip.AddrPort{}); err == nil {
		t.Error("invalid binding accepted")
	}
}

func TestBindingFollowsGroup(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	in := mustAdd(t, d, phone(1, sa.In))
	if want := netip.MustParseAddrPort("10.0.0.1:1025"); in.Binding != want {
		t.Fatalf("initial binding %v, want %v", in.Binding, want)
	}
	b := netip.MustParseAddrPort("203.0.113.7:61000")
	if n, err := d.SetBinding(in.ID, b); err != nil || n != 1 {
		t.Fatalf("set binding %d %v", n, err)
	}
	// The outbound partner arriving later starts from the learnt binding.
	if out := mustAdd(t, d, phone(1, sa.Out)); out.Binding != b {
		t.Errorf("late partner binding %v", out.Binding)
	}
	b2 := netip.MustParseAddrPort("203.0.113.7:61001")
	since := d.Version()
	if n, err := d.SetBinding(phone(1, sa.Out).ID(), b2); err != nil || n != 2 {
		t.Fatalf("set binding from out: %d %v", n, err)
	}
	if n, _ := d.SetBinding(in.ID, b2); n != 0 {
		t.Errorf("unchanged binding counted %d changes", n)
	}
	if e, _ := d.Get(in.ID); e.Binding != b2 {
		t.Errorf("inbound binding %v", e.Binding)
	}
	ch, _, _ := d.Changes(since, nil)
	if len(ch) != 2 || ch[0].Op != OpBinding || ch[1].Op != OpBinding {
		t.Errorf("changes %+v", ch)
	}
	if err := d.SetState(in.ID, SoftExpired); err != nil {
		t.Fatal(err)
	}
	if e, _ := d.Get(in.ID); e.State != SoftExpired || e.State.String() != "soft-expired" {
		t.Errorf("state %v", e.State)
	}
	if err := d.SetState(phone(7, sa.In).ID(), HardExpired); !errors.Is(err, ErrNotFound) {
		t.Errorf("state of unknown SA: %v", err)
	}
}

func TestChangeFeed(t *testing.T) {
	d := newSAD(t, Options{Workers: 1, LogSize: 8})
	select {
	case <-d.Notify():
		t.Fatal("notified before any change")
	default:
	}
	a := mustAdd(t, d, phone(1, sa.In))
	mustAdd(t, d, phone(2, sa.In))
	upd := phone(2, sa.In)
	upd.ESN = true
	if _, err := d.Update(upd); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Delete(a.ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Notify():
	default:
		t.Fatal("no notification after changes")
	}
	ch, v, err := d.Changes(0, make([]Change, 0, 16))
	if err != nil || v != 4 {
		t.Fatalf("changes: v%d %v", v, err)
	}
	var got []string
	for _, c := range ch {
		got = append(got, fmt.Sprintf("%d %s %s w%d i%d", c.Version, c.Op, c.ID, c.Worker, c.Index))
	}
	want := []string{"1 add in 0x00010001 w0 i0", "2 add in 0x00010002 w0 i1", "3 update in 0x00010002 w0 i1", "4 delete in 0x00010001 w0 i0"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("feed:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if ch, v, err := d.Changes(4, ch); err != nil || len(ch) != 0 || v != 4 {
		t.Errorf("nothing new: %v %d %v", ch, v, err)
	}
	for i := 10; i < 20; i++ {
		mustAdd(t, d, phone(i, sa.In))
	}
	if _, _, err := d.Changes(4, nil); !errors.Is(err, ErrResync) {
		t.Errorf("overrun: %v", err)
	}
	if ch, v, err := d.Changes(6, nil); err != nil || len(ch) != 8 || v != 14 || ch[0].Version != 7 {
		t.Errorf("oldest retained: %d changes to v%d, %v", len(ch), v, err)
	}
	if _, _, err := d.Changes(99, nil); !errors.Is(err, ErrResync) {
		t.Errorf("future version: %v", err)
	}
}

// TestListPaging pages through SAs while they are deleted and added, and
// across the compaction of the order slice.
func TestListPaging(t *testing.T) {
	d := newSAD(t, Options{Workers: 3})
	const n = 5000
	for i := 0; i < n; i++ {
		mustAdd(t, d, phone(i, sa.In))
	}
	// Delete 3000 (forces compaction), the even ones first.
	for i := 0; i < n && i < 6000; i += 2 {
		if i/2 < 2500 {
			if _, err := d.Delete(phone(i, sa.In).ID()); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := 1; i < 1000; i += 2 {
		if _, err := d.Delete(phone(i, sa.In).ID()); err != nil {
			t.Fatal(err)
		}
	}
	var seen []string
	var cursor uint64
	page := make([]Record, 0, 700)
	for pages := 0; ; pages++ {
		page, cursor = d.List(cursor, 700, page)
		for _, e := range page {
			seen = append(seen, e.SA.Name)
		}
		if pages == 1 {
			// Writers between pages: an update keeps its place, a
			// new SA comes at the end, a deleted one is not returned.
			u := phone(4999, sa.In)
			u.ESN = true
			if _, err := d.Update(u); err != nil {
				t.Fatal(err)
			}
			mustAdd(t, d, phone(n, sa.In))
			if _, err := d.Delete(phone(4997, sa.In).ID()); err != nil {
				t.Fatal(err)
			}
		}
		if cursor == 0 {
			break
		}
		if pages > 100 {
			t.Fatal("paging does not end")
		}
	}
	var want []string
	for i := 1001; i < n; i += 2 {
		if i != 4997 {
			want = append(want, fmt.Sprintf("ue%d-in", i))
		}
	}
	want = append(want, fmt.Sprintf("ue%d-in", n))
	if strings.Join(seen, ",") != strings.Join(want, ",") {
		t.Errorf("listed %d SAs, want %d; first %v", len(seen), len(want), seen[:min(5, len(seen))])
	}
	if p, c := d.List(0, 0, nil); len(p) != 0 || c != 0 {
		t.Errorf("limit 0: %d %d", len(p), c)
	}
}

// TestConcurrent runs writers, readers and a feed consumer at once; run
// with -race it proves the locking.
func TestConcurrent(t *testing.T) {
	d := newSAD(t, Options{Workers: 4, LogSize: 1 << 16})
	var wg sync.WaitGroup
	const writers, per = 4, 500
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				k := w*per + i
				mustAdd(t, d, phone(k, sa.In))
				mustAdd(t, d, phone(k, sa.Out))
				if i%3 == 0 {
					if _, err := d.Delete(phone(k, sa.Out).ID()); err != nil {
						t.Error(err)
					}
				}
				if _, err := d.SetBinding(phone(k, sa.In).ID(), netip.AddrPortFrom(gw, uint16(k))); err != nil {
					t.Error(err)
				}
			}
		}(w)
	}
	stop := make(chan struct{})
	var feedDone sync.WaitGroup
	feedDone.Add(1)
	var last uint64
	go func() {
		defer feedDone.Done()
		var buf []Change
		for {
			select {
			case <-d.Notify():
			case <-stop:
				return
			}
			var err error
			buf, last, err = d.Changes(last, buf)
			if err != nil {
				t.Error(err)
				return
			}
			var page []Record
			page, _ = d.List(0, 50, page)
			_ = page
		}
	}()
	wg.Wait()
	close(stop)
	feedDone.Wait()
	in, out := d.Len()
	if in != writers*per || out != writers*per-writers*((per+2)/3) {
		t.Errorf("len %d/%d", in, out)
	}
	total := 0
	for _, l := range d.Workers() {
		total += l.SAs
	}
	if total != in+out {
		t.Errorf("worker loads sum to %d, want %d", total, in+out)
	}
	for k := 0; k < writers*per; k++ {
		e, ok := d.Get(phone(k, sa.In).ID())
		if !ok || e.Binding != netip.AddrPortFrom(gw, uint16(k)) {
			t.Fatalf("phone %d: %+v", k, e)
		}
	}
}

// BenchmarkAdd measures the API-style add rate: one SA per call, one lock
// per call, into a SAD that grows to b.N SAs.
func BenchmarkAdd(b *testing.B) {
	sas := make([]sa.SA, b.N)
	for i := range sas {
		sas[i] = phone(i, sa.Direction(1+i%2))
	}
	d := newSAD(b, Options{Workers: 4})
	b.ResetTimer()
	start := time.Now()
	for i := range sas {
		if _, err := d.Add(sas[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "adds/s")
}

// BenchmarkLoad1M loads 1,000,000 SAs (500,000 phones, in and out) with
// AddAll, then walks them with List as the manager's resync does. It
// reports the load rate and the heap held per SA, SA values and keys
// included (they are built inside the measurement, as a config load
// builds them, and only the SAD keeps them).
func BenchmarkLoad1M(b *testing.B) {
	const n = 1_000_000
	for it := 0; it < b.N; it++ {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		d := newSAD(b, Options{Workers: 2, MaxSAs: n})
		start := time.Now()
		const batch = 10_000
		buf := make([]sa.SA, 0, batch)
		for i := 0; i < n; i += batch {
			buf = buf[:0]
			for k := i; k < i+batch; k++ {
				buf = append(buf, phone(k/2, sa.Direction(1+k%2)))
			}
			if err := d.AddAll(buf); err != nil {
				b.Fatal(err)
			}
		}
		load := time.Since(start)
		clear(buf)
		runtime.GC()
		runtime.ReadMemStats(&after)
		start = time.Now()
		var cursor uint64
		page := make([]Record, 0, 4096)
		listed := 0
		for {
			page, cursor = d.List(cursor, 4096, page)
			listed += len(page)
			if cursor == 0 {
				break
			}
		}
		list := time.Since(start)
		if in, out := d.Len(); in+out != n || listed != n {
			b.Fatalf("loaded %d+%d, listed %d", in, out, listed)
		}
		b.ReportMetric(float64(n)/load.Seconds(), "adds/s")
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "bytes/SA")
		b.ReportMetric(float64(list.Nanoseconds())/n, "list-ns/SA")
		runtime.KeepAlive(d)
	}
}

// Replace is one atomic claim: of many concurrent replacements of the
// same old SA exactly one wins, the others get ErrConflict and add
// nothing; a failed add rolls back and leaves the old SA claimable; an
// unknown old SA is ErrNotFound.
func TestReplaceOneWinner(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	old := mustAdd(t, d, phone(1, sa.In))
	const racers = 16
	var wins, conflicts int
	var mu sync.Mutex
	var wg sync.WaitGroup
	for r := 0; r < racers; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := phone(100+r, sa.In)
			_, err := d.Replace([]sa.ID{old.ID}, []sa.SA{n})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				wins++
			case errors.Is(err, ErrConflict):
				conflicts++
			default:
				t.Errorf("racer %d: %v", r, err)
			}
		}()
	}
	wg.Wait()
	if wins != 1 || conflicts != racers-1 {
		t.Fatalf("%d wins, %d conflicts; want 1 and %d", wins, conflicts, racers-1)
	}
	if in, _ := d.Len(); in != 2 {
		t.Fatalf("%d inbound SAs, want the old one and one replacement", in)
	}
	if e, _ := d.Get(old.ID); !e.Replaced {
		t.Fatal("the old SA is not marked replaced")
	}

	// A replacement whose add fails changes nothing.
	other := mustAdd(t, d, phone(2, sa.In))
	dup := phone(3, sa.In)
	dup.SPI = other.SA.SPI // the second new SA collides
	if _, err := d.Replace([]sa.ID{other.ID}, []sa.SA{phone(4, sa.In), dup}); !errors.Is(err, ErrExists) {
		t.Fatalf("colliding replacement: %v, want ErrExists", err)
	}
	if e, _ := d.Get(other.ID); e.Replaced {
		t.Fatal("a failed replacement left its old SA claimed")
	}
	if _, ok := d.Get(phone(4, sa.In).ID()); ok {
		t.Fatal("a failed replacement left its first new SA behind")
	}
	if _, err := d.Replace([]sa.ID{{Dir: sa.In, SPI: 0xdead}}, []sa.SA{phone(5, sa.In)}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown old SA: %v", err)
	}
}

// A transport-mode SA is installed only with what the data path needs
// (a core address and one inner.local address); without either it is
// refused at every entry (config load, API, etcd go through Add, AddAll
// and Update) naming the SA, the field and the fix, so none is installed
// to half-work. A transport pair with a core address groups like a
// tunnel phone's (one worker, one binding).
func TestTransportModeNeedsCore(t *testing.T) {
	d := newSAD(t, Options{Workers: 2})
	tr := phone(1, sa.In)
	tr.Mode, tr.InnerLocal, tr.InnerPeer = sa.Transport, netip.MustParsePrefix("10.0.0.1/32"), netip.Prefix{}
	want := `sa "ue1-in": inner.core: invalid SA: a transport-mode SA needs the phone's core address: name one in inner.core or configure core_pool to allocate it`
	if _, err := d.Add(tr); !errors.Is(err, ErrInvalid) || err.Error() != want {
		t.Fatalf("Add: %v", err)
	}
	if err := d.AddAll([]sa.SA{tr}); err == nil || err.Error() != want {
		t.Fatalf("AddAll: %v", err)
	}
	noLocal := tr
	noLocal.Core, noLocal.InnerLocal = netip.MustParseAddr("100.64.0.9"), netip.Prefix{}
	if _, err := d.Add(noLocal); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `sa "ue1-in": inner.local: invalid SA: a transport-mode SA needs the core-side address`) {
		t.Fatalf("Add without inner.local: %v", err)
	}
	mustAdd(t, d, phone(1, sa.In))
	if _, err := d.Update(tr); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Update: %v", err)
	}
	if e, ok := d.GetName("ue1-in"); !ok || e.SA.Mode != sa.Tunnel {
		t.Fatal("the tunnel SA is gone")
	}
	in, out := tr, phone(1, sa.Out)
	in.Name, in.SPI, in.Core = "tr-in", 0x20001, netip.MustParseAddr("100.64.0.9")
	out.Name, out.SPI, out.Mode, out.InnerLocal, out.InnerPeer, out.Core = "tr-out", 0xd0000001, sa.Transport, in.InnerLocal, netip.Prefix{}, in.Core
	if err := d.AddAll([]sa.SA{in, out}); err != nil {
		t.Fatal(err)
	}
	a, _ := d.GetName("tr-in")
	b, _ := d.GetName("tr-out")
	if a.Worker != b.Worker || GroupOf(&a.SA) != GroupOf(&b.SA) {
		t.Fatalf("transport pair split: workers %d %d", a.Worker, b.Worker)
	}
}

// TestAddAllReservedMatchesGrown loads a list large enough for AddAll to
// size the indexes up front (reserve) and checks the SAD is the one that
// small loads, which grow them, build: the same records in the same
// order, found by identity, name and core address, duplicates refused.
func TestAddAllReservedMatchesGrown(t *testing.T) {
	const pairs = reserveMin
	var list []sa.SA
	for i := range pairs {
		for _, dir := range []sa.Direction{sa.In, sa.Out} {
			s := phone(i, dir)
			if i%3 == 0 {
				s.Core = netip.AddrFrom4([4]byte{100, 127, byte(i >> 8), byte(i)})
			}
			list = append(list, s)
		}
	}
	reserved := newSAD(t, Options{Workers: 3})
	if err := reserved.AddAll(list); err != nil {
		t.Fatal(err)
	}
	grown := newSAD(t, Options{Workers: 3})
	for i := 0; i < len(list); i += 100 {
		if err := grown.AddAll(list[i:min(i+100, len(list))]); err != nil {
			t.Fatal(err)
		}
	}
	if in, out := reserved.Len(); in != pairs || out != pairs {
		t.Fatalf("Len %d %d, want %d each", in, out, pairs)
	}
	a, _ := reserved.List(0, len(list)+1, nil)
	b, _ := grown.List(0, len(list)+1, nil)
	if len(a) != len(list) || len(b) != len(list) {
		t.Fatalf("listed %d and %d of %d", len(a), len(b), len(list))
	}
	for i := range a {
		x, y := &a[i], &b[i]
		if x.ID != y.ID || x.Worker != y.Worker || x.Index != y.Index || x.Binding != y.Binding || !x.SA.Equal(&y.SA) {
			t.Fatalf("record %d: %v on worker %d slot %d, grown: %v on worker %d slot %d", i, x.ID, x.Worker, x.Index, y.ID, y.Worker, y.Index)
		}
	}
	for _, i := range []int{0, 1, pairs / 2, pairs - 1} {
		s := phone(i, sa.Out)
		if r, ok := reserved.Get(s.ID()); !ok || r.SA.Name != s.Name {
			t.Errorf("Get %v: %v", s.ID(), ok)
		}
		if _, ok := reserved.GetName(fmt.Sprintf("ue%d-%s", i, sa.In)); !ok {
			t.Errorf("GetName ue%d-in: not found", i)
		}
		if got := len(reserved.Group(s.ID())); got != 2 {
			t.Errorf("group of %v has %d SAs", s.ID(), got)
		}
	}
	c := list[2*3]
	if core, ok := reserved.CoreOf(netip.AddrPortFrom(c.Peer, c.Encap.PeerPort), c.InnerPeer); !ok || core != c.Core {
		t.Errorf("CoreOf phone 3: %v %v, want %v", core, ok, c.Core)
	}
	if _, err := reserved.Add(phone(7, sa.In)); err == nil {
		t.Error("a duplicate of a reserved load's SA was added")
	}
}
