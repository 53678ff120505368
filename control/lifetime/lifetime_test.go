package lifetime

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/dataplane/esp"
)

func phoneSA(i int, dir sa.Direction, l sa.Lifetime, esn bool) sa.SA {
	spi := uint32(0x1000 + i)
	if dir == sa.Out {
		spi = uint32(0x2000 + i)
	}
	win := uint32(0)
	if dir == sa.In {
		win = 64
	}
	return sa.SA{
		Name: fmt.Sprintf("ue%d-%s", i, dir), SPI: spi, Direction: dir, Mode: sa.Tunnel, Proposal: esp.AES128GCM16,
		EncKey: make(sa.Secret, 20), ReplayWindow: win, ESN: esn,
		Local: netip.MustParseAddr("192.0.2.1"), Peer: netip.MustParseAddr("192.0.2.10"),
		Encap:      &sa.Encap{LocalPort: 4500, PeerPort: uint16(4500 + i)},
		InnerLocal: netip.MustParsePrefix("10.0.0.0/24"),
		InnerPeer:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(i)}), 32),
		Lifetime:   l,
	}
}

// usage stands in for the manager's per-SA counters.
type usage struct {
	mu sync.Mutex
	m  map[sa.ID]Usage
}

func (u *usage) get(id sa.ID) (Usage, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	v, ok := u.m[id]
	return v, ok
}

func (u *usage) set(id sa.ID, v Usage) {
	u.mu.Lock()
	u.m[id] = v
	u.mu.Unlock()
}

// Each limit, soft then hard, on its own SA: soft marks the SA and raises
// one event (not repeated on later checks), hard deletes it; SAs under
// their limits and SAs without limits are untouched.
func TestSoftThenHard(t *testing.T) {
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	clock := now
	u := &usage{m: map[sa.ID]Usage{}}
	e, err := New(Options{SAD: d, Usage: u.get, Now: func() time.Time { return clock }})
	if err != nil {
		t.Fatal(err)
	}
	add := func(s sa.SA) sa.ID {
		if _, err := d.Add(s); err != nil {
			t.Fatal(err)
		}
		u.set(s.ID(), Usage{})
		return s.ID()
	}
	byTime := add(phoneSA(1, sa.In, sa.Lifetime{SoftSeconds: 10, HardSeconds: 20}, false))
	byBytes := add(phoneSA(2, sa.Out, sa.Lifetime{SoftBytes: 1000, HardBytes: 2000}, false))
	byPkts := add(phoneSA(3, sa.In, sa.Lifetime{SoftPackets: 5, HardPackets: 10}, false))
	bySeq := add(phoneSA(4, sa.Out, sa.Lifetime{}, false))
	bySeqESN := add(phoneSA(5, sa.Out, sa.Lifetime{}, true))
	free := add(phoneSA(6, sa.In, sa.Lifetime{}, false))

	state := func(id sa.ID) string {
		ent, ok := d.Get(id)
		if !ok {
			return "deleted"
		}
		return ent.State.String()
	}
	expect := func(step string, want map[sa.ID]string) {
		t.Helper()
		for id, w := range want {
			if got := state(id); got != w {
				t.Fatalf("%s: %s is %s, want %s", step, id, got, w)
			}
		}
	}

	e.Check()
	expect("nothing used", map[sa.ID]string{byTime: "active", byBytes: "active", byPkts: "active", bySeq: "active", bySeqESN: "active", free: "active"})

	clock = now.Add(11 * time.Second) // SAD creation times are a little after now
	u.set(byBytes, Usage{Bytes: 999})
	u.set(byPkts, Usage{Packets: 5})
	u.set(bySeq, Usage{Seq: SeqSoft32})
	u.set(bySeqESN, Usage{Seq: SeqHard32}) // 2^32-1 is nothing special with ESN
	u.set(free, Usage{Packets: 1 << 40, Bytes: 1 << 50})
	e.Check()
	e.Check() // a second pass raises nothing new
	expect("soft", map[sa.ID]string{byTime: "soft-expired", byBytes: "active", byPkts: "soft-expired", bySeq: "soft-expired", bySeqESN: "active", free: "active"})

	u.set(byBytes, Usage{Bytes: 1000})
	u.set(byPkts, Usage{Packets: 9})
	e.Check()
	expect("bytes soft", map[sa.ID]string{byBytes: "soft-expired", byPkts: "soft-expired"})

	clock = now.Add(21 * time.Second)
	u.set(byBytes, Usage{Bytes: 2000})
	u.set(byPkts, Usage{Packets: 10})
	u.set(bySeq, Usage{Seq: SeqHard32})
	u.set(bySeqESN, Usage{Seq: SeqSoft64})
	e.Check()
	expect("hard", map[sa.ID]string{byTime: "deleted", byBytes: "deleted", byPkts: "deleted", bySeq: "deleted", bySeqESN: "soft-expired", free: "active"})

	evs, next := e.Events(0, 100)
	var got []string
	for _, ev := range evs {
		got = append(got, fmt.Sprintf("%s %s %s", ev.Name, ev.Kind, ev.What))
	}
	want := []string{
		"ue1-in soft time", "ue3-in soft packets", "ue4-out soft seq",
		"ue2-out soft bytes",
		"ue1-in hard time", "ue2-out hard bytes", "ue3-in hard packets", "ue4-out hard seq", "ue5-out soft seq",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("events\n got %q\nwant %q", got, want)
	}
	if next != 9 || evs[8].Num != 9 {
		t.Fatalf("next %d", next)
	}
	if more, n := e.Events(next, 10); len(more) != 0 || n != next {
		t.Fatalf("events after the last: %v %d", more, n)
	}
	c := e.Counts()
	if c["soft/time"] != 1 || c["hard/seq"] != 1 || c["soft/seq"] != 2 || c["hard/packets"] != 1 || c["soft/bytes"] != 1 || c["hard/bytes"] != 1 {
		t.Fatalf("counts %v", c)
	}
}

// The time limit applies even before the data path reports the SA; the
// traffic limits only once it does.
func TestUnreportedSA(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1})
	clock := time.Now().Add(time.Hour)
	e, _ := New(Options{SAD: d, Usage: func(sa.ID) (Usage, bool) { return Usage{}, false }, Now: func() time.Time { return clock }})
	old := phoneSA(1, sa.In, sa.Lifetime{HardSeconds: 60}, false)
	young := phoneSA(2, sa.In, sa.Lifetime{HardPackets: 1}, false)
	if _, err := d.Add(old); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Add(young); err != nil {
		t.Fatal(err)
	}
	e.Check()
	if _, ok := d.Get(old.ID()); ok {
		t.Fatal("an SA past its hard time survived")
	}
	if _, ok := d.Get(young.ID()); !ok {
		t.Fatal("an SA without usage figures was expired by packets")
	}
}

// An SA continued across a restart counts its time from when it was
// first created (Usage.Since), not from the new SAD's creation time.
func TestSinceCarriesAge(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1})
	s := phoneSA(1, sa.In, sa.Lifetime{HardSeconds: 60}, false)
	if _, err := d.Add(s); err != nil {
		t.Fatal(err)
	}
	born := time.Now().Add(-time.Minute)
	e, _ := New(Options{SAD: d, Usage: func(sa.ID) (Usage, bool) { return Usage{Since: born}, false }})
	e.Check()
	if _, ok := d.Get(s.ID()); ok {
		t.Fatal("an SA first created a minute ago survived its 60 s hard lifetime")
	}
}

// Readers see events in order across the ring's wrap and can wait for the
// next one.
func TestEventRingAndWait(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1})
	e, _ := New(Options{SAD: d, Usage: func(sa.ID) (Usage, bool) { return Usage{}, false }, Keep: 4})
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- e.Wait(ctx, 0)
	}()
	for i := 0; i < 6; i++ {
		e.raise(Event{Name: fmt.Sprint(i), Kind: Soft, What: Bytes})
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	evs, next := e.Events(0, 10)
	if len(evs) != 4 || evs[0].Num != 3 || evs[0].Name != "2" || evs[3].Num != 6 || next != 6 {
		t.Fatalf("after a wrap: %+v next %d", evs, next)
	}
	evs, _ = e.Events(4, 1)
	if len(evs) != 1 || evs[0].Num != 5 {
		t.Fatalf("from 4: %+v", evs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := e.Wait(ctx, 6); err == nil {
		t.Fatal("Wait returned without a new event")
	}
}

// Idle phones: an inbound SA with no authenticated packet and no
// keepalive for its idle timeout raises one idle event (not one per
// pass); a packet or a keepalive from the binding ends the silence; an
// SA's idle_timeout overrides the global one; with IdleRemove the SA's
// whole group (its pair) is deleted.
func TestIdlePhones(t *testing.T) {
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	clock := time.Now()
	u := &usage{m: map[sa.ID]Usage{}}
	var kaMu sync.Mutex
	ka := map[sa.ID]time.Time{}
	lastKA := func(id sa.ID) time.Time { kaMu.Lock(); defer kaMu.Unlock(); return ka[id] }
	o := Options{SAD: d, Usage: u.get, Now: func() time.Time { return clock }, IdleTimeout: 60 * time.Second, LastKeepalive: lastKA}
	e, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	add := func(s sa.SA) sa.ID {
		if _, err := d.Add(s); err != nil {
			t.Fatal(err)
		}
		u.set(s.ID(), Usage{})
		return s.ID()
	}
	in1 := add(phoneSA(1, sa.In, sa.Lifetime{}, false))
	add(phoneSA(1, sa.Out, sa.Lifetime{}, false)) // outbound SAs are never idle themselves
	short := phoneSA(2, sa.In, sa.Lifetime{}, false)
	short.IdleTimeout = 10
	in2 := add(short)
	idles := func() (names []string) {
		evs, _ := e.Events(0, 100)
		for _, ev := range evs {
			if ev.Kind == Idle {
				names = append(names, fmt.Sprintf("%s after %ds", ev.Name, ev.Threshold))
			}
		}
		return names
	}

	clock = clock.Add(30 * time.Second)
	u.set(in1, Usage{LastSeen: clock})
	e.Check()
	if got := idles(); len(got) != 1 || got[0] != "ue2-in after 10s" || e.IdleNow() != 1 {
		t.Fatalf("at 30 s: %v (idle now %d)", got, e.IdleNow())
	}
	clock = clock.Add(50 * time.Second) // ue1 last seen 50 s ago: not yet
	e.Check()
	if got := idles(); len(got) != 1 {
		t.Fatalf("at 80 s: %v", got)
	}
	clock = clock.Add(20 * time.Second)
	kaMu.Lock()
	ka[in1] = clock.Add(-5 * time.Second) // a keepalive keeps ue1 alive
	kaMu.Unlock()
	e.Check()
	e.Check()
	if got := idles(); len(got) != 1 {
		t.Fatalf("keepalive did not count: %v", got)
	}
	clock = clock.Add(61 * time.Second)
	e.Check()
	if got := idles(); len(got) != 2 || got[1] != "ue1-in after 60s" || e.IdleNow() != 2 {
		t.Fatalf("ue1 silent 66 s: %v", got)
	}
	u.set(in2, Usage{LastSeen: clock}) // ue2 is back
	e.Check()
	if e.IdleNow() != 1 {
		t.Fatalf("idle now %d after ue2's packet, want 1", e.IdleNow())
	}
	if n := e.Counts()["idle/idle"]; n != 2 {
		t.Fatalf("idle/idle count %d", n)
	}

	// IdleRemove: the silent phone's pair goes.
	o.IdleRemove = true
	e2, _ := New(o)
	clock = clock.Add(61 * time.Second)
	u.set(in2, Usage{LastSeen: clock})
	e2.started = time.Time{}
	e2.Check()
	if _, ok := d.Get(in1); ok {
		t.Fatal("idle SA not removed")
	}
	if _, ok := d.GetName("ue1-out"); ok {
		t.Fatal("its outbound partner not removed")
	}
	if _, ok := d.Get(in2); !ok {
		t.Fatal("the live phone's SA was removed")
	}
}
