package neigh

import (
	"context"
	"net/netip"
	"time"
)

// Resolved lists the destinations the published snapshot resolves now
// (static entries included). A daemon handing its data path to a
// successor passes them on, so the successor resolves them before its
// workers read the packets that queued up meanwhile: a cold table would
// park hundreds of them at once, beyond what the workers park.
func (r *Resolver) Resolved() []netip.Addr {
	var out []netip.Addr
	for s := range r.shards {
		sh := r.shards[s].Load()
		if sh == nil {
			continue
		}
		for k := range sh.m {
			out = append(out, addrOf(k))
		}
	}
	return out
}

// Warm requests every destination in dsts and waits until all resolve,
// ctx ends or within passes; it returns how many resolved. Run must be
// running. Requests the queue could not take are repeated.
func (r *Resolver) Warm(ctx context.Context, dsts []netip.Addr, within time.Duration) int {
	left := append([]netip.Addr(nil), dsts...)
	deadline := time.Now().Add(within)
	for len(left) > 0 && ctx.Err() == nil {
		var still []netip.Addr
		for _, d := range left {
			if _, ok := r.Lookup(d); !ok {
				r.Request(d)
				still = append(still, d)
			}
		}
		left = still
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	return len(dsts) - len(left)
}
