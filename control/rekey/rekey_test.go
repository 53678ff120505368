package rekey

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/dataplane/esp"
)

func pair(spiIn, spiOut uint32) []sa.SA {
	mk := func(spi uint32, dir sa.Direction) sa.SA {
		win := uint32(0)
		if dir == sa.In {
			win = 64
		}
		return sa.SA{Name: fmt.Sprintf("%s-%x", dir, spi), SPI: spi, Direction: dir, Mode: sa.Tunnel, Proposal: esp.AES128GCM16,
			EncKey: make(sa.Secret, 20), ReplayWindow: win,
			Local: netip.MustParseAddr("192.0.2.1"), Peer: netip.MustParseAddr("192.0.2.10"),
			Encap:      &sa.Encap{LocalPort: 4500, PeerPort: 4500},
			InnerLocal: netip.MustParsePrefix("10.0.0.0/24"), InnerPeer: netip.MustParsePrefix("10.99.0.1/32")}
	}
	return []sa.SA{mk(spiIn, sa.In), mk(spiOut, sa.Out)}
}

func ids(s []sa.SA) []sa.ID { return []sa.ID{s[0].ID(), s[1].ID()} }

var noWait = func(context.Context, uint64) error { return nil }

// The order of a rekey: new SAs first (same worker as the old, sharing
// the group), old outbound at once, old inbound after the grace period.
func TestOrder(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 4})
	old := pair(0x1001, 0x2001)
	if err := d.AddAll(old); err != nil {
		t.Fatal(err)
	}
	var atWait []sa.ID
	wait := func(context.Context, uint64) error {
		in, out := d.Len()
		if in != 2 || out != 2 {
			t.Errorf("data path waited on with %d in, %d out; want old and new together", in, out)
		}
		atWait = append(atWait, old[0].ID())
		return nil
	}
	res, err := Do(context.Background(), d, wait, Request{Old: ids(old), New: pair(0x1011, 0x2011), Grace: time.Second})
	if err != nil || len(atWait) != 1 {
		t.Fatal(err)
	}
	// The data path drains the frames already steered to it.
	if _, ok := d.Get(old[1].ID()); ok {
		t.Fatal("old outbound SA still there once the new ones are in force")
	}
	if _, ok := d.Get(old[0].ID()); !ok {
		t.Fatal("old inbound SA removed before its grace period")
	}
	oldIn, _ := d.Get(old[0].ID())
	for _, e := range res.Added {
		if e.Worker != oldIn.Worker {
			t.Fatalf("new SA %s on worker %d, the old pair on %d", e.ID, e.Worker, oldIn.Worker)
		}
	}
	<-res.Done
	if _, ok := d.Get(old[0].ID()); ok {
		t.Fatal("old inbound SA survived its grace period")
	}
}

// A rekey that cannot add every new SA adds none and keeps the old ones;
// one whose new SAs do not come into force keeps the old ones too.
func TestAllOrNothing(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1, MaxSAs: 2})
	old := pair(0x1001, 0x2001)
	if err := d.AddAll(old); err != nil {
		t.Fatal(err)
	}
	other := pair(0x1002, 0x2002)[1]
	other.InnerPeer = netip.MustParsePrefix("10.99.0.2/32")
	// Outbound full; the new inbound SA fits and must be rolled back.
	if _, err := d.Add(other); err != nil {
		t.Fatal(err)
	}
	if _, err := Do(context.Background(), d, noWait, Request{Old: ids(old), New: pair(0x1011, 0x2011)}); !errors.Is(err, sad.ErrFull) {
		t.Fatalf("rekey into a full table: %v", err)
	}
	if in, out := d.Len(); in != 1 || out != 2 {
		t.Fatalf("after a failed rekey: %d in, %d out", in, out)
	}
	if _, err := Do(context.Background(), d, noWait, Request{Old: []sa.ID{{Dir: sa.In, SPI: 0x9999}}, New: pair(0x1011, 0x2011)}); !errors.Is(err, sad.ErrNotFound) {
		t.Fatalf("unknown old SA: %v", err)
	}
	if _, err := Do(context.Background(), d, noWait, Request{Old: ids(old), New: old[:1]}); !errors.Is(err, sad.ErrInvalid) {
		t.Fatalf("new SA with an old identity: %v", err)
	}

	d2, _ := sad.New(sad.Options{Workers: 1})
	d2.AddAll(old)
	stalled := func(context.Context, uint64) error { return errors.New("stalled") }
	res, err := Do(context.Background(), d2, stalled, Request{Old: ids(old), New: pair(0x1011, 0x2011)})
	if err == nil || len(res.Added) != 2 {
		t.Fatalf("stalled data path: %v, %d added", err, len(res.Added))
	}
	for _, id := range ids(old) {
		if _, ok := d2.Get(id); !ok {
			t.Fatalf("old SA %s removed although the new ones were not in force", id)
		}
	}
}
