package neigh

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// hopKey names a next hop: an address on a link.
type hopKey struct {
	oif  int
	addr netip.Addr
}

// nextHop is a neighbour that destinations are sent through. Many
// destinations share one (everything behind the default gateway), so
// resolution, retries and MAC changes are per next hop.
type nextHop struct {
	key      hopKey
	mac      [6]byte
	have     bool
	dests    map[*dest]struct{}
	inflight bool // resolution under way: probes sent, retry at due
	attempts int
	due      time.Time
	recheck  time.Time // non-zero: the kernel dropped its entry; confirm then
}

const recheckDelay = time.Second

// dest is a destination the data path asked for.
type dest struct {
	k       [16]byte
	oif     int
	hop     *nextHop // nil: the interface's default MAC serves it
	waiting bool     // a Request owns the coalescing slot until settled
}

type event struct {
	neigh   neighEntry
	isNeigh bool
	del     bool
	route   bool
	overrun bool
}

// Run resolves requested destinations and keeps the snapshot current until
// ctx ends. One Run at a time.
func (r *Resolver) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("neigh: Run is already running")
	}
	defer r.running.Store(false)

	evc := make(chan event, 256)
	stop, readerDone := make(chan struct{}), make(chan struct{})
	if err := r.events.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	go r.readEvents(evc, stop, readerDone)
	defer func() {
		close(stop)
		_ = r.events.SetReadDeadline(time.Now()) // wakes the reader
		<-readerDone
	}()

	tickEvery := max(r.cfg.RetryBase/4, 10*time.Millisecond)
	tick := time.NewTicker(tickEvery)
	defer tick.Stop()
	refresh := time.NewTicker(r.cfg.Refresh)
	defer refresh.Stop()
	var rerouteAt time.Time

	for {
		select {
		case <-ctx.Done():
			return nil
		case k := <-r.reqs:
			r.mu.Lock()
			now := time.Now()
			r.handleRequest(k, now)
			// Take whatever else is queued before publishing once.
		drain:
			for range 255 {
				select {
				case k := <-r.reqs:
					r.handleRequest(k, now)
				default:
					break drain
				}
			}
			r.publish()
			r.mu.Unlock()
		case ev := <-evc:
			r.counters.events.Add(1)
			r.mu.Lock()
			now := time.Now()
			switch {
			case ev.overrun:
				r.counters.overruns.Add(1)
				r.refresh(now)
				rerouteAt = now
			case ev.route:
				// Routes change in bursts; re-resolve once after it settles.
				if rerouteAt.IsZero() {
					rerouteAt = now.Add(100 * time.Millisecond)
				}
			case ev.isNeigh:
				r.onNeigh(ev.neigh, ev.del, now)
			}
			r.publish()
			r.mu.Unlock()
		case now := <-tick.C:
			r.mu.Lock()
			if !rerouteAt.IsZero() && !now.Before(rerouteAt) {
				rerouteAt = time.Time{}
				r.reroute(now)
			}
			r.retryDue(now)
			r.publish()
			r.mu.Unlock()
		case now := <-refresh.C:
			r.mu.Lock()
			r.refresh(now)
			for k, until := range r.holddown {
				if now.After(until) {
					delete(r.holddown, k)
				}
			}
			r.publish()
			r.mu.Unlock()
		}
	}
}

func (r *Resolver) readEvents(evc chan<- event, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	buf := make([]byte, 1<<16)
	send := func(ev event) bool {
		select {
		case evc <- ev:
			return true
		case <-stop:
			return false
		}
	}
	for {
		n, err := r.events.Read(buf)
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				if !send(event{overrun: true}) {
					return
				}
				continue
			}
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, os.ErrClosed) {
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond): // do not spin on a broken socket
			}
			continue
		}
		b := buf[:n]
		for len(b) >= nlmsgHdrLen {
			l := int(ne.Uint32(b[0:4]))
			if l < nlmsgHdrLen || l > len(b) {
				break
			}
			typ, payload := ne.Uint16(b[4:6]), b[nlmsgHdrLen:l]
			b = b[(l+3)&^3:]
			var ev event
			switch typ {
			case unix.RTM_NEWNEIGH, unix.RTM_DELNEIGH:
				e, ok := parseNeigh(payload)
				if !ok {
					continue
				}
				ev = event{neigh: e, isNeigh: true, del: typ == unix.RTM_DELNEIGH}
			case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
				ev = event{route: true}
			default:
				continue
			}
			if !send(ev) {
				return
			}
		}
	}
}

// The methods below run with r.mu held.

func (r *Resolver) handleRequest(k [16]byte, now time.Time) {
	if until, ok := r.holddown[k]; ok {
		if now.Before(until) {
			r.counters.suppressed.Add(1)
			r.release(k)
			return
		}
		delete(r.holddown, k)
	}
	s := shardOf(&k)
	if d, ok := r.dests[s][k]; ok {
		if _, has := r.macOf(d); has {
			r.release(k) // answered since the worker looked
		} else {
			d.waiting = true // its next hop is being (re-)resolved
		}
		return
	}
	if _, ok := r.static[k]; ok {
		r.release(k)
		return
	}
	rt, err := r.q.getRoute(addrOf(k))
	if err != nil {
		r.counters.routeErrors.Add(1)
		r.holddown[k] = now.Add(r.cfg.HoldDown)
		r.release(k)
		return
	}
	if !r.served[rt.oif] {
		r.counters.wrongIf.Add(1)
		r.holddown[k] = now.Add(r.cfg.HoldDown)
		r.release(k)
		return
	}
	d := &dest{k: k, oif: rt.oif, waiting: true}
	r.dests[s][k] = d
	if _, ok := r.defaultFor(rt.oif); ok {
		r.dirty[s] = true
		r.settle(d)
		return
	}
	r.attach(d, hopKey{oif: rt.oif, addr: rt.nexthop}, now)
}

// settle completes a destination's pending request.
func (r *Resolver) settle(d *dest) {
	if d.waiting {
		d.waiting = false
		r.counters.resolved.Add(1)
		r.release(d.k)
	}
}

func (r *Resolver) attach(d *dest, hk hopKey, now time.Time) {
	h, ok := r.hops[hk]
	if !ok {
		h = &nextHop{key: hk, dests: map[*dest]struct{}{}}
		r.hops[hk] = h
	}
	h.dests[d] = struct{}{}
	d.hop = h
	switch {
	case h.have:
		r.dirty[shardOf(&d.k)] = true
		r.settle(d)
	case !h.inflight:
		r.resolve(h, now)
	}
}

func (r *Resolver) detach(d *dest) {
	if h := d.hop; h != nil {
		delete(h.dests, d)
		if len(h.dests) == 0 {
			delete(r.hops, h.key)
		}
		d.hop = nil
	}
}

func (r *Resolver) removeDest(d *dest) {
	r.detach(d)
	s := shardOf(&d.k)
	delete(r.dests[s], d.k)
	r.dirty[s] = true
	if d.waiting {
		d.waiting = false
		r.release(d.k)
	}
}

// resolve takes the kernel's entry if usable, else makes the kernel
// resolve and schedules a retry.
func (r *Resolver) resolve(h *nextHop, now time.Time) {
	e, ok, err := r.q.getNeigh(h.key.oif, h.key.addr)
	if err == nil && ok && e.usable() {
		r.setMAC(h, e.mac)
		return
	}
	r.probe1(h)
	h.inflight, h.attempts, h.due = true, 0, now.Add(r.cfg.RetryBase)
}

func (r *Resolver) probe1(h *nextHop) {
	if err := r.probe[h.key.oif].send(h.key.oif, h.key.addr); err != nil {
		r.counters.probeErrors.Add(1)
		return
	}
	r.counters.probes.Add(1)
}

func (r *Resolver) setMAC(h *nextHop, mac [6]byte) {
	changed := !h.have || h.mac != mac
	if h.have && changed {
		r.counters.macChanges.Add(1)
	}
	h.mac, h.have, h.inflight = mac, true, false
	for d := range h.dests {
		if changed {
			r.dirty[shardOf(&d.k)] = true
		}
		r.settle(d)
	}
}

func (r *Resolver) retryDue(now time.Time) {
	for _, h := range r.hops {
		if !h.recheck.IsZero() && !now.Before(h.recheck) {
			h.recheck = time.Time{}
			r.refreshHop(h, now)
		}
		if !h.inflight || now.Before(h.due) {
			continue
		}
		e, ok, err := r.q.getNeigh(h.key.oif, h.key.addr)
		if err == nil && ok && e.usable() {
			r.setMAC(h, e.mac)
			continue
		}
		if h.attempts >= r.cfg.Retries {
			r.giveUp(h, now)
			continue
		}
		h.attempts++
		r.counters.retries.Add(1)
		r.probe1(h)
		h.due = now.Add(r.cfg.RetryBase << h.attempts)
	}
}

// giveUp drops every destination behind an unresolvable next hop and holds
// their requests down for a while.
func (r *Resolver) giveUp(h *nextHop, now time.Time) {
	for d := range h.dests {
		r.counters.gaveUp.Add(1)
		r.holddown[d.k] = now.Add(r.cfg.HoldDown)
		r.removeDest(d)
	}
	delete(r.hops, h.key)
}

// withdraw stops sending to a next hop the kernel found dead and starts
// resolving it again; if that fails its destinations are given up.
func (r *Resolver) withdraw(h *nextHop, now time.Time) {
	r.counters.withdrawn.Add(1)
	h.have = false
	for d := range h.dests {
		r.dirty[shardOf(&d.k)] = true
	}
	r.resolve(h, now)
}

func (r *Resolver) onNeigh(e neighEntry, del bool, now time.Time) {
	h, ok := r.hops[hopKey{oif: e.ifindex, addr: e.addr}]
	if !ok {
		return
	}
	switch {
	case del:
		// Often the kernel's GC of an entry our bypassing traffic never
		// confirms, or an operator's flush. Keep the MAC and have the
		// kernel re-learn it a little later (a dead neighbour then shows
		// up as FAILED); probing at once would re-create the entry under
		// `ip neigh flush`, which then never completes.
		if h.have && h.recheck.IsZero() {
			h.recheck = now.Add(recheckDelay)
		}
	case e.usable():
		r.setMAC(h, e.mac)
	case e.state&unix.NUD_FAILED != 0 && h.have && !h.inflight:
		r.withdraw(h, now)
	}
}

// refresh re-reads every resolved next hop and asks the kernel to confirm
// the ones it no longer holds REACHABLE.
func (r *Resolver) refresh(now time.Time) {
	for _, h := range r.hops {
		r.refreshHop(h, now)
	}
}

func (r *Resolver) refreshHop(h *nextHop, now time.Time) {
	if !h.have || h.inflight {
		return
	}
	e, ok, err := r.q.getNeigh(h.key.oif, h.key.addr)
	switch {
	case err != nil:
		return
	case !ok:
		r.probe1(h)
	case e.usable():
		r.setMAC(h, e.mac)
		if e.state&(unix.NUD_REACHABLE|unix.NUD_PERMANENT) == 0 {
			r.probe1(h)
		}
	case e.state&unix.NUD_FAILED != 0:
		r.withdraw(h, now)
	default:
		r.probe1(h)
	}
}

// reroute re-resolves every destination's route after the routing table
// changed, moving it to its new next hop.
func (r *Resolver) reroute(now time.Time) {
	r.counters.reroutes.Add(1)
	for s := range r.dests {
		for _, d := range r.dests[s] {
			rt, err := r.q.getRoute(addrOf(d.k))
			switch {
			case err != nil:
				r.counters.routeErrors.Add(1)
				r.removeDest(d)
				continue
			case !r.served[rt.oif]:
				r.counters.wrongIf.Add(1)
				r.removeDest(d)
				continue
			}
			if _, ok := r.defaultFor(rt.oif); ok {
				if d.hop != nil || d.oif != rt.oif {
					r.detach(d)
					d.oif = rt.oif
					r.dirty[s] = true
					r.settle(d)
				}
				continue
			}
			hk := hopKey{oif: rt.oif, addr: rt.nexthop}
			if d.hop != nil && d.hop.key == hk {
				continue
			}
			r.detach(d)
			d.oif = rt.oif
			r.dirty[s] = true
			r.attach(d, hk, now)
		}
	}
}
