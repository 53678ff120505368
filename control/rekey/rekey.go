// Package rekey replaces a phone's SAs by new ones make-before-break
// (RFC 7296 2.8, TS 33.203 7.4): the new SAs are installed and in force
// before anything old goes, so no packet is lost.
//
//  1. The new SAs are added (all or none) and the call waits until the
//     data path carries them. From then on the new inbound SAs accept
//     traffic alongside the old ones, and each new outbound SA serves its
//     selector: the manager points the XDP policy entry at the newest
//     outbound SA for a prefix, one map update, so the outbound direction
//     switches atomically between two packets.
//  2. The old outbound SAs are deleted at once: no new packet is steered
//     to them, and the frames XDP steered to them just before the switch,
//     still in a worker's RX ring, are sealed by them before the data path
//     lets them go (the manager's removals drain: see package manager).
//  3. The old inbound SAs stay for Grace, so packets the phone sent under
//     them before it switched, still in flight or queued, are accepted;
//     then they are deleted.
//
// New SAs join the old ones' pairing group when they share its peer,
// encap port and inner prefix (or pair label), so they live on the same
// worker and share the NAT binding the old ones learnt.
package rekey

import (
	"context"
	"fmt"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// Waiter returns once the data path reflects a SAD version
// (manager.Manager.WaitVersion).
type Waiter func(ctx context.Context, version uint64) error

// DefaultGrace is how long old inbound SAs outlive a rekey.
const DefaultGrace = 5 * time.Second

// Request is one rekey.
type Request struct {
	Old []sa.ID
	New []sa.SA
	// Grace is how long the old inbound SAs keep accepting packets after
	// the new SAs are in force (DefaultGrace when 0; negative: none).
	Grace time.Duration
}

// Result says what the rekey did.
type Result struct {
	Added []sad.Record
	// Retired are the old outbound SAs, deleted before Do returns;
	// Draining are the old inbound SAs, deleted after the grace period.
	Retired, Draining []sa.ID
	// Done closes once every old SA is deleted.
	Done <-chan struct{}
}

// Do runs step 1 and schedules steps 2 and 3; ctx bounds the wait for
// the data path only.
func Do(ctx context.Context, d *sad.SAD, wait Waiter, r Request) (Result, error) {
	if len(r.New) == 0 {
		return Result{}, fmt.Errorf("rekey: no new SAs: %w", sad.ErrInvalid)
	}
	grace := r.Grace
	if grace == 0 {
		grace = DefaultGrace
	}
	var res Result
	for _, id := range r.Old {
		for i := range r.New {
			if r.New[i].ID() == id {
				return Result{}, fmt.Errorf("rekey: new SA %s has the identity of an old one (a rekey needs a new SPI): %w", r.New[i].Label(), sad.ErrInvalid)
			}
		}
		if id.Dir == sa.Out {
			res.Retired = append(res.Retired, id)
		} else {
			res.Draining = append(res.Draining, id)
		}
	}
	// One atomic claim-and-add: of concurrent rekeys of one old SA exactly
	// one gets here; the others fail with sad.ErrConflict having changed
	// nothing.
	added, err := d.Replace(r.Old, r.New)
	if err != nil {
		return Result{}, fmt.Errorf("rekey: %w", err)
	}
	res.Added = added
	if err := wait(ctx, d.Version()); err != nil {
		// The new SAs are stored and will apply; keep the old ones, which
		// still work, rather than risk a gap.
		return res, fmt.Errorf("rekey: new SAs not in force yet, old SAs kept: %w", err)
	}
	// The new outbound SAs serve the selectors now; one already gone
	// (API, lifetime) is nothing to do.
	for _, id := range res.Retired {
		d.Delete(id)
	}
	done := make(chan struct{})
	res.Done = done
	go func() {
		defer close(done)
		time.Sleep(max(grace, 0))
		for _, id := range res.Draining {
			d.Delete(id)
		}
	}()
	return res, nil
}
