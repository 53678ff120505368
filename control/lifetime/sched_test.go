package lifetime

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// With rate bounds a pass checks only the SAs that are due: all on the
// first pass, then an SA when the feed changes it or when one of its
// limits could have been reached (its time limits; its packet limit at
// the bounded rate); quiet SAs wait for the hour's recheck. Events come
// exactly as in a full pass.
func TestScheduledChecks(t *testing.T) {
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	clock := start
	u := &usage{m: map[sa.ID]Usage{}}
	e, err := New(Options{SAD: d, Usage: u.get, Now: func() time.Time { return clock }, MaxPacketRate: 1000, MaxByteRate: 1e6})
	if err != nil {
		t.Fatal(err)
	}
	add := func(s sa.SA) sa.ID {
		t.Helper()
		if _, err := d.Add(s); err != nil {
			t.Fatal(err)
		}
		u.set(s.ID(), Usage{})
		return s.ID()
	}
	const quiet = 100
	for i := range quiet {
		add(phoneSA(10+i, sa.Out, sa.Lifetime{}, false))
	}
	byTime := add(phoneSA(1, sa.In, sa.Lifetime{SoftSeconds: 10, HardSeconds: 20}, false))
	byPkts := add(phoneSA(2, sa.In, sa.Lifetime{SoftPackets: 5000, HardPackets: 10000}, false))
	pass := func(step string, wantChecked uint64, wantEvents ...string) {
		t.Helper()
		before, _ := e.Events(0, 1000)
		c0 := e.Checked()
		e.Check()
		if got := e.Checked() - c0; got != wantChecked {
			t.Errorf("%s: %d SAs checked, want %d", step, got, wantChecked)
		}
		evs, _ := e.Events(uint64(len(before)), 1000)
		var got []string
		for _, ev := range evs {
			got = append(got, fmt.Sprintf("%s %s %s", ev.Name, ev.Kind, ev.What))
		}
		if fmt.Sprint(got) != fmt.Sprint(wantEvents) {
			t.Errorf("%s: events %q, want %q", step, got, wantEvents)
		}
	}
	pass("first", quiet+2)
	pass("again", 0)
	clock = start.Add(4 * time.Second)
	pass("4 s: nothing can have expired", 0)
	clock = start.Add(6 * time.Second) // 5000 packets at 1000/s: byPkts could be there
	u.set(byPkts, Usage{Packets: 4000})
	pass("6 s", 1)
	clock = start.Add(7 * time.Second) // 1000 more packets take a second
	u.set(byPkts, Usage{Packets: 5000})
	pass("7 s", 1, "ue2-in soft packets")
	added := add(phoneSA(3, sa.In, sa.Lifetime{HardSeconds: 12}, false))
	pass("added", 2) // the new SA, and byPkts's soft state change (due at 12 s for its hard limit)
	clock = start.Add(11 * time.Second)
	pass("11 s", 1, "ue1-in soft time") // byTime: its soft time
	if _, err := d.Delete(byTime); err != nil {
		t.Fatal(err)
	}
	clock = start.Add(13 * time.Second)
	// The added SA's hard time and byPkts's 5000 packets to go; byTime's
	// deletion is in the feed, and a gone SA is not checked.
	pass("13 s", 2, "ue3-in hard time")
	clock = start.Add(21 * time.Second)
	pass("21 s: byPkts again, byTime is gone", 1)
	clock = start.Add(2 * time.Hour)
	pass("2 h: the hourly recheck", quiet+1)
	if _, ok := d.Get(added); ok {
		t.Error("the SA past its hard time is still in the SAD")
	}
}

// BenchmarkLifetimePass is one lifetime pass over n quiet SAs (no limits
// of their own, the sequence space far away): "sweep" without rate
// bounds checks every SA each pass; "scheduled" with the gateway's rate
// bounds checks the due ones (none).
func BenchmarkLifetimePass(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		d, err := sad.New(sad.Options{Workers: 1, MaxSAs: n})
		if err != nil {
			b.Fatal(err)
		}
		if err := d.AddAll(quietSAs(n)); err != nil {
			b.Fatal(err)
		}
		zero := func(sa.ID) (Usage, bool) { return Usage{}, true }
		for _, c := range []struct {
			name          string
			pkts, byteMax float64
		}{{"sweep", 0, 0}, {"scheduled", GatewayMaxPacketRate, GatewayMaxByteRate}} {
			b.Run(fmt.Sprintf("%s/%d", c.name, n), func(b *testing.B) {
				e, err := New(Options{SAD: d, Usage: zero, MaxPacketRate: c.pkts, MaxByteRate: c.byteMax})
				if err != nil {
					b.Fatal(err)
				}
				e.Check() // the first pass checks all in both modes
				c0 := e.Checked()
				b.ResetTimer()
				for range b.N {
					e.Check()
				}
				b.ReportMetric(float64(e.Checked()-c0)/float64(b.N), "SAs_checked/pass")
			})
		}
	}
}

// The due heap pops the earliest item whatever the push order, with
// pushes and pops interleaved as a pass makes them.
func TestDueHeapOrder(t *testing.T) {
	var h dueHeap
	var ref []int64 // what the heap holds, unordered
	r := rand.New(rand.NewPCG(1, 2))
	pop := func() {
		t.Helper()
		m := 0
		for i := range ref {
			if ref[i] < ref[m] {
				m = i
			}
		}
		if got := h.pop().at; got != ref[m] {
			t.Fatalf("popped %d, the earliest is %d", got, ref[m])
		}
		ref = append(ref[:m], ref[m+1:]...)
	}
	for i := range 3000 {
		at := r.Int64N(1000)
		h.push(dueItem{at: at, ver: uint64(i)})
		ref = append(ref, at)
		if i%3 == 0 {
			pop()
		}
	}
	for len(ref) > 0 {
		pop()
	}
	if len(h) != 0 {
		t.Fatalf("%d items left", len(h))
	}
}

// A stop does not wait for a pass over every SA: a pass whose context has
// ended stops within a page (checkPage SAs), in both modes, and the next
// pass checks what it left.
func TestPassStopsWithItsContext(t *testing.T) {
	const n = 3 * checkPage
	d, err := sad.New(sad.Options{Workers: 1, MaxSAs: 2 * n})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddAll(quietSAs(n)); err != nil {
		t.Fatal(err)
	}
	zero := func(sa.ID) (Usage, bool) { return Usage{}, true }
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, c := range []struct {
		name          string
		pkts, byteMax float64
	}{{"sweep", 0, 0}, {"scheduled", GatewayMaxPacketRate, GatewayMaxByteRate}} {
		e, err := New(Options{SAD: d, Usage: zero, MaxPacketRate: c.pkts, MaxByteRate: c.byteMax})
		if err != nil {
			t.Fatal(err)
		}
		e.checkUntil(ctx)
		if got := e.Checked(); got == 0 || got > checkPage {
			t.Fatalf("%s: a cancelled pass checked %d of %d SAs, want at most a page (%d)", c.name, got, n, checkPage)
		}
		first := e.Checked()
		e.Check()
		if got := e.Checked() - first; got < n-first {
			t.Fatalf("%s: the next pass checked %d, want at least the %d left", c.name, got, n-first)
		}
	}
}

// quietSAs are n outbound SAs with no limits of their own, each its own
// phone (SPI, inner address and NAT port differ).
func quietSAs(n int) []sa.SA {
	sas := make([]sa.SA, n)
	for i := range sas {
		s := phoneSA(1, sa.Out, sa.Lifetime{}, false)
		s.Name = fmt.Sprintf("sa%d", i)
		s.SPI = uint32(0x10000 + i)
		s.InnerPeer = netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}), 32)
		s.Encap = &sa.Encap{LocalPort: 4500, PeerPort: uint16(1024 + i%60000)}
		sas[i] = s
	}
	return sas
}
