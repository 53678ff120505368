// Package lifetime enforces RFC 4301 SA lifetimes (section 4.4.2.1): soft
// and hard limits by time, bytes and packets, plus the sequence-number
// space (2^32 without ESN, 2^64 with), which RFC 4303 says must never
// cycle. A soft limit marks the SA soft-expired in the SAD and raises an
// event (the API serves them, the metrics count them) so the key
// management can rekey in time; a hard limit deletes the SA from the SAD,
// and with it, through the manager, from the worker tables and the BPF
// maps.
//
// It reads the SAD and the data path's per-SA counters periodically and
// writes only through the SAD, so the manager stays the one writer of the
// data path. Limits are checked once per Interval: a hard bytes or
// packets limit can be overrun by what the SA carries in one interval.
//
// Without rate bounds (Options.MaxPacketRate, MaxByteRate) every pass
// checks every SA. With them, a pass checks only the SAs that are due: an
// SA is checked when it is added or changed (the SAD's change feed), and
// then again at the earliest moment one of its limits could be reached:
// its soft or hard time, its idle deadline, or the time its traffic
// counters need at the bounded rates to reach a limit (a min-heap of
// those moments). So a million quiet SAs cost a pass almost nothing.
// The sequence space itself is never overrun: the ESP engine refuses to
// seal past it (esp.ReasonSeqCycled) whatever this package does.
package lifetime

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// Kind says whether a soft or a hard limit was reached.
type Kind uint8

// Kinds.
const (
	Soft Kind = iota
	Hard
	// Idle: an inbound SA saw neither an authenticated packet nor a
	// NAT-keepalive from its binding for its idle timeout (What is Idle).
	Idle
	numKinds
)

var kindNames = [numKinds]string{"soft", "hard", "idle"}

func (k Kind) String() string {
	if k < numKinds {
		return kindNames[k]
	}
	return "soft"
}

// Limit is what ran out.
type Limit uint8

// Limits.
const (
	Time Limit = iota
	Bytes
	Packets
	Seq // sequence-number space
	// IdleTime is Idle's figure: seconds since the phone was last seen.
	IdleTime
	numLimits
)

var limitNames = [numLimits]string{"time", "bytes", "packets", "seq", "idle"}

func (l Limit) String() string {
	if l < numLimits {
		return limitNames[l]
	}
	return fmt.Sprintf("limit(%d)", uint8(l))
}

// Seq thresholds: soft at three quarters of the space, so a rekey has a
// quarter of it to complete; hard when the last number is used.
const (
	SeqSoft32 = 3 << 30
	SeqHard32 = 1<<32 - 1
	SeqSoft64 = 3 << 62
	SeqHard64 = 1<<64 - 1
)

// Event is one soft or hard expiry.
type Event struct {
	// Num numbers events from 1 in the order they happened.
	Num  uint64
	Time time.Time
	ID   sa.ID
	Name string
	Kind Kind
	What Limit
	// Value is the SA's figure when it was checked; Threshold the limit
	// it reached (seconds, bytes, packets or sequence number).
	Value, Threshold uint64
}

// Usage is what the data path reports of one SA.
type Usage struct {
	Packets, Bytes, Seq uint64
	// Since, when not zero, is when the SA's lifetime started if that was
	// before the SAD's creation time (an SA continued across a restart).
	Since time.Time
	// LastSeen is when the last authenticated packet arrived (inbound
	// SAs; zero: none yet).
	LastSeen time.Time
}

// UsageFunc returns an SA's usage; false when the data path does not
// hold it (yet): its traffic limits are then not checked (Since still
// counts).
type UsageFunc func(sa.ID) (Usage, bool)

// Options wire an Enforcer.
type Options struct {
	SAD   *sad.SAD
	Usage UsageFunc
	// Interval between checks (1 s).
	Interval time.Duration
	// Now is the clock (time.Now); tests move it.
	Now func() time.Time
	// Keep is how many events are kept for readers (4096).
	Keep int
	Log  *slog.Logger
	// IdleTimeout raises an Idle event for an inbound SA that saw no
	// authenticated packet and no keepalive for this long (0: off); an
	// SA's own idle_timeout overrides it. IdleRemove then deletes the SA
	// and its group (the pair or registration sharing its binding).
	IdleTimeout time.Duration
	IdleRemove  bool
	// LastKeepalive returns when the SA's current binding last sent a
	// NAT-keepalive (zero: never, or unknown). Asked only for SAs that are
	// otherwise idle, so its cost does not grow with busy phones.
	LastKeepalive func(sa.ID) time.Time
	// MaxPacketRate and MaxByteRate bound what one SA can carry per
	// second (a worker's ceiling is far below 10^7 packets/s). With both
	// set, an SA is rechecked only when its counters could have reached a
	// limit at these rates (see the package doc); 0: every pass checks
	// every SA.
	MaxPacketRate, MaxByteRate float64
}

// GatewayMaxPacketRate and GatewayMaxByteRate are the rate bounds the
// gateway uses: no SA of one worker thread gets near 10^7 packets/s, and
// 12.5 GB/s is a 100 Gb/s link's worth.
const (
	GatewayMaxPacketRate = 1e7
	GatewayMaxByteRate   = 12.5e9
)

// notInstalledRecheck is the longest a scheduled pass waits to look again
// at an SA the data path did not hold yet.
const notInstalledRecheck = time.Minute

// maxRecheck bounds how long a scheduled SA waits for its next check,
// whatever its limits: a safety net for figures that move without a
// change in the feed.
const maxRecheck = time.Hour

// Enforcer checks every SA's lifetime each Interval.
type Enforcer struct {
	o      Options
	counts [numKinds][numLimits]atomic.Uint64
	checks atomic.Uint64

	mu     sync.Mutex
	events []Event // ring of the last Keep events
	num    uint64  // events so far
	wake   chan struct{}

	checkMu sync.Mutex // one pass at a time (Run and callers of Check)
	page    []sad.Record
	// idle holds, per SA an Idle event was raised for, the last-seen
	// time it was raised at: one event per silence, not one per pass.
	idle    map[sa.ID]time.Time
	idleN   atomic.Int64 // SAs idle now (a gauge)
	started time.Time    // last-seen stamps live in memory: none before this

	// Scheduled mode (rate bounds set): a heap of the moments SAs are
	// next checked, each stamped with the SA's SAD version when it was
	// scheduled. Any change to an SA comes through the feed and makes it
	// due at once, so an item whose stamp is not the SA's version any
	// more is stale and skipped: no per-SA map beside the heap (40
	// bytes per SA, no pointers). ver is the feed version read.
	heap    dueHeap
	ver     uint64
	synced  bool
	chg     []sad.Change
	dueNow  map[sa.Key]struct{} // this pass's changed SAs, made due once each
	checked atomic.Uint64
}

// New checks o and returns an Enforcer; Run starts it.
func New(o Options) (*Enforcer, error) {
	if o.SAD == nil || o.Usage == nil {
		return nil, errors.New("lifetime: SAD and usage source are required")
	}
	if o.Interval <= 0 {
		o.Interval = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Keep <= 0 {
		o.Keep = 4096
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &Enforcer{o: o, wake: make(chan struct{}), idle: make(map[sa.ID]time.Time), started: o.Now()}, nil
}

// Run checks every Interval until ctx ends.
func (e *Enforcer) Run(ctx context.Context) error {
	t := time.NewTicker(e.o.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			e.checkUntil(ctx)
		}
	}
}

// Check runs one pass now: over the whole SAD, or with rate bounds over
// the SAs that are due.
func (e *Enforcer) Check() { e.checkUntil(context.Background()) }

// checkPage is how many SAs a pass checks between looks at its context.
const checkPage = 4096

// checkUntil is Check that stops early once ctx ends: the first pass
// after a start checks every SA (1.4 s at 2M SAs), and a stop must not
// wait for it. What it left unchecked is due at the next pass.
func (e *Enforcer) checkUntil(ctx context.Context) {
	e.checkMu.Lock()
	defer e.checkMu.Unlock()
	e.checks.Add(1)
	now := e.o.Now()
	if e.scheduled() {
		e.checkDue(ctx, now)
		return
	}
	var cur uint64
	for {
		e.page, cur = e.o.SAD.List(cur, checkPage, e.page[:0])
		for i := range e.page {
			e.check(&e.page[i], now)
		}
		if cur == 0 || ctx.Err() != nil {
			return
		}
	}
}

func (e *Enforcer) check(ent *sad.Record, now time.Time) {
	e.checkNext(ent, now)
}

// checkNext checks ent and returns when it should be checked again
// (zero: it was deleted).
func (e *Enforcer) checkNext(ent *sad.Record, now time.Time) time.Time {
	e.checked.Add(1)
	l := ent.SA.Lifetime
	seqSoft, seqHard := uint64(SeqSoft32), uint64(SeqHard32)
	if ent.SA.ESN {
		seqSoft, seqHard = SeqSoft64, SeqHard64
	}
	u, ok := e.o.Usage(ent.ID)
	born := ent.Created
	if !u.Since.IsZero() && u.Since.Before(born) {
		born = u.Since
	}
	age := uint64(max(now.Sub(born), 0) / time.Second)
	type test struct {
		what              Limit
		value, soft, hard uint64
	}
	tests := [4]test{{Time, age, l.SoftSeconds, l.HardSeconds}}
	n := 1
	if ok {
		tests[1] = test{Bytes, u.Bytes, l.SoftBytes, l.HardBytes}
		tests[2] = test{Packets, u.Packets, l.SoftPackets, l.HardPackets}
		tests[3] = test{Seq, u.Seq, seqSoft, seqHard}
		n = 4
	}
	var idleAt time.Time
	if ent.ID.Dir == sa.In {
		var gone bool
		if idleAt, gone = e.checkIdle(ent, u, born, now); gone {
			return time.Time{}
		}
	}
	for _, t := range tests[:n] {
		if t.hard != 0 && t.value >= t.hard {
			if _, err := e.o.SAD.Delete(ent.ID); err != nil {
				// Deleted meanwhile (API, rekey): nothing to enforce.
				return time.Time{}
			}
			e.raise(Event{Time: now, ID: ent.ID, Name: ent.SA.Name, Kind: Hard, What: t.what, Value: t.value, Threshold: t.hard})
			return time.Time{}
		}
	}
	soft := ent.State == sad.Active
	if soft {
		for _, t := range tests[:n] {
			if t.soft != 0 && t.value >= t.soft {
				if err := e.o.SAD.SetState(ent.ID, sad.SoftExpired); err == nil {
					e.raise(Event{Time: now, ID: ent.ID, Name: ent.SA.Name, Kind: Soft, What: t.what, Value: t.value, Threshold: t.soft})
				}
				soft = false
				break
			}
		}
	}
	if !e.scheduled() {
		return now
	}
	// The earliest moment a limit could be reached.
	next := now.Add(maxRecheck)
	at := func(t time.Time) {
		if t.Before(next) {
			next = t
		}
	}
	if !idleAt.IsZero() {
		at(idleAt)
	}
	if !ok {
		// Not on the data path yet (the manager installs it shortly):
		// no traffic yet, so its traffic limits are as far as from zero.
		// (An update's inherited counters show through the version still
		// installed, which Usage reports.) A state restored at install
		// could be nearer: look again within notInstalledRecheck.
		at(now.Add(notInstalledRecheck))
		tests[1] = test{Bytes, 0, l.SoftBytes, l.HardBytes}
		tests[2] = test{Packets, 0, l.SoftPackets, l.HardPackets}
		tests[3] = test{Seq, 0, seqSoft, seqHard}
		n = 4
	}
	for i, t := range tests[:n] {
		for _, lim := range [2]uint64{t.soft, t.hard} {
			if lim == 0 || lim <= t.value || (!soft && lim == t.soft) {
				continue
			}
			// Beyond maxRecheck the cap decides (and a Duration would
			// overflow for the 64-bit sequence space).
			if i == 0 { // time: seconds since born
				if d := time.Duration(lim-t.value) * time.Second; lim-t.value < uint64(maxRecheck/time.Second) {
					at(now.Add(d))
				}
				continue
			}
			rate := e.o.MaxPacketRate
			if t.what == Bytes {
				rate = e.o.MaxByteRate
			}
			if secs := float64(lim-t.value) / rate; secs < maxRecheck.Seconds() {
				at(now.Add(time.Duration(secs * float64(time.Second))))
			}
		}
	}
	return next
}

func (e *Enforcer) scheduled() bool { return e.o.MaxPacketRate > 0 && e.o.MaxByteRate > 0 }

// Checked is how many SA checks all passes made (a pass over the whole
// SAD adds one per SA; a scheduled pass one per due SA).
func (e *Enforcer) Checked() uint64 { return e.checked.Load() }

// checkDue is a scheduled pass: the SAs the feed changed since the last
// pass (all of them on the first pass, or when the feed dropped changes),
// then those whose next check is due.
func (e *Enforcer) checkDue(ctx context.Context, now time.Time) {
	clear(e.dueNow)
	var err error
	if e.synced {
		var v uint64
		e.chg, v, err = e.o.SAD.Changes(e.ver, e.chg[:0])
		if err == nil {
			e.ver = v
			for i := range e.chg {
				e.due(e.chg[i].ID.Key(), now)
			}
		}
	}
	if !e.synced || err != nil {
		// Read the version before listing: changes made meanwhile are
		// replayed next pass, which a check makes harmless. Only the SAs
		// changed since the version read last become due (all of them
		// on the first pass): the others are scheduled already, and a
		// bulk add that overflows the feed every pass must not make
		// every SA due every pass.
		since := e.ver
		if !e.synced {
			since = 0
		}
		e.ver = e.o.SAD.Version()
		var cur uint64
		for {
			e.page, cur = e.o.SAD.ListChanged(since, cur, 4096, e.page[:0])
			for i := range e.page { // each SA once: no dueNow
				e.heap.push(dueItem{at: now.UnixNano(), ver: dueAny, key: e.page[i].ID.Key()})
			}
			if cur == 0 {
				break
			}
		}
		clear(e.page) // no key slices of deleted SAs kept alive
		e.synced = true
	}
	for n := 1; len(e.heap) > 0 && e.heap[0].at <= now.UnixNano(); n++ {
		if n%checkPage == 0 && ctx.Err() != nil {
			return // the rest stay due
		}
		it := e.heap.pop()
		id := it.key.ID()
		ent, ok := e.o.SAD.Get(id)
		if !ok {
			e.unidle(id)
			continue
		}
		if it.ver != dueAny && it.ver != ent.Version {
			continue // changed since: the change made it due with a new item
		}
		next := e.checkNext(&ent, now)
		if next.IsZero() {
			continue
		}
		if !next.After(now) {
			// Due again at once (idle, or not installed yet): next pass.
			next = now.Add(time.Nanosecond)
		}
		e.heap.push(dueItem{at: next.UnixNano(), ver: ent.Version, key: it.key})
	}
	if cap(e.heap) > 1024 && len(e.heap) < cap(e.heap)/4 {
		e.heap = append(dueHeap(nil), e.heap...) // give back what mass deletes freed
	}
}

// dueAny stamps an item made due by a change: checked whatever the SA's
// version by then.
const dueAny = 0

// due makes k due now, once per pass.
func (e *Enforcer) due(k sa.Key, now time.Time) {
	if e.dueNow == nil {
		e.dueNow = make(map[sa.Key]struct{})
	}
	if _, ok := e.dueNow[k]; ok {
		return
	}
	e.dueNow[k] = struct{}{}
	e.heap.push(dueItem{at: now.UnixNano(), ver: dueAny, key: k})
}

// dueItem is one scheduled check.
type dueItem struct {
	at  int64  // Unix ns: 16 bytes less per SA than a time.Time
	ver uint64 // the SA's SAD version when scheduled, or dueAny
	key sa.Key
}

// dueHeap is a min-heap of checks by time, typed (container/heap's
// interface would box every item pushed or popped: an allocation each).
type dueHeap []dueItem

func (h *dueHeap) push(it dueItem) {
	*h = append(*h, it)
	q := *h
	for i := len(q) - 1; i > 0; {
		p := (i - 1) / 2
		if q[p].at <= q[i].at {
			break
		}
		q[p], q[i] = q[i], q[p]
		i = p
	}
}

func (h *dueHeap) pop() dueItem {
	q := *h
	top := q[0]
	n := len(q) - 1
	q[0] = q[n]
	q = q[:n]
	for i := 0; ; {
		l, m := 2*i+1, i
		if l < n && q[l].at < q[m].at {
			m = l
		}
		if r := l + 1; r < n && q[r].at < q[m].at {
			m = r
		}
		if m == i {
			break
		}
		q[i], q[m] = q[m], q[i]
		i = m
	}
	*h = q
	return top
}

// checkIdle raises an Idle event for an inbound SA whose phone was last
// seen (authenticated packet, else keepalive, else the SA's birth) more
// than its idle timeout ago, once per silence; with IdleRemove it deletes
// the SA's group and reports gone. at is when it could next turn idle
// (zero: no idle timeout), now when it is idle (so a scheduled pass
// watches for its phone's return).
func (e *Enforcer) checkIdle(ent *sad.Record, u Usage, born, now time.Time) (at time.Time, gone bool) {
	timeout := e.o.IdleTimeout
	if s := ent.SA.IdleTimeout; s != 0 {
		timeout = time.Duration(s) * time.Second
	}
	if timeout <= 0 {
		return time.Time{}, false
	}
	seen := born
	if e.started.After(seen) {
		seen = e.started // an SA continued across a restart: its phone gets a full timeout
	}
	if u.LastSeen.After(seen) {
		seen = u.LastSeen
	}
	if now.Sub(seen) < timeout {
		e.unidle(ent.ID)
		return seen.Add(timeout), false
	}
	if e.o.LastKeepalive != nil {
		if ka := e.o.LastKeepalive(ent.ID); ka.After(seen) {
			seen = ka
			if now.Sub(seen) < timeout {
				e.unidle(ent.ID)
				return seen.Add(timeout), false
			}
		}
	}
	if at, raised := e.idle[ent.ID]; raised && !seen.After(at) {
		return now, false
	}
	if _, raised := e.idle[ent.ID]; !raised {
		e.idleN.Add(1)
	}
	e.idle[ent.ID] = seen
	e.raise(Event{Time: now, ID: ent.ID, Name: ent.SA.Name, Kind: Idle, What: IdleTime,
		Value: uint64(now.Sub(seen) / time.Second), Threshold: uint64(timeout / time.Second)})
	if !e.o.IdleRemove {
		return now, false
	}
	for _, id := range e.o.SAD.Group(ent.ID) {
		e.o.SAD.Delete(id)
	}
	e.unidle(ent.ID)
	return time.Time{}, true
}

func (e *Enforcer) unidle(id sa.ID) {
	if _, ok := e.idle[id]; ok {
		delete(e.idle, id)
		e.idleN.Add(-1)
	}
}

// IdleNow is how many inbound SAs are idle (an event was raised and no
// packet or keepalive came since).
func (e *Enforcer) IdleNow() int64 { return e.idleN.Load() }

func (e *Enforcer) raise(ev Event) {
	e.counts[ev.Kind][ev.What].Add(1)
	e.mu.Lock()
	e.num++
	ev.Num = e.num
	if len(e.events) < e.o.Keep {
		e.events = append(e.events, ev)
	} else {
		e.events[(ev.Num-1)%uint64(e.o.Keep)] = ev
	}
	close(e.wake)
	e.wake = make(chan struct{})
	e.mu.Unlock()
	if ev.Kind == Idle {
		e.o.Log.Warn("phone idle", "sa", ev.ID, "name", ev.Name, "idle_seconds", ev.Value, "timeout_seconds", ev.Threshold, "removed", e.o.IdleRemove)
		return
	}
	e.o.Log.Warn("SA lifetime reached", "sa", ev.ID, "name", ev.Name, "kind", ev.Kind.String(),
		"limit", ev.What.String(), "value", ev.Value, "threshold", ev.Threshold)
}

// Events returns up to max events numbered above since, oldest first, and
// the number to ask from next time. Events older than the last Keep are
// gone; the first one returned then has a Num above since+1.
func (e *Enforcer) Events(since uint64, max int) ([]Event, uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	k := uint64(e.o.Keep)
	first := since + 1
	if e.num > k && first <= e.num-k {
		first = e.num - k + 1
	}
	var out []Event
	for n := first; n <= e.num && len(out) < max; n++ {
		out = append(out, e.events[(n-1)%k])
	}
	if len(out) == 0 {
		return nil, since
	}
	return out, out[len(out)-1].Num
}

// Wait returns once an event numbered above since exists, or ctx ends.
func (e *Enforcer) Wait(ctx context.Context, since uint64) error {
	for {
		e.mu.Lock()
		n, ch := e.num, e.wake
		e.mu.Unlock()
		if n > since {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Counts returns how many soft and hard expiries happened per limit,
// keyed "soft/bytes", "hard/time", ... (every key present).
func (e *Enforcer) Counts() map[string]uint64 {
	out := make(map[string]uint64, int(numKinds)*int(numLimits))
	for k := Kind(0); k < numKinds; k++ {
		for l := Limit(0); l < numLimits; l++ {
			if (k == Idle) != (l == IdleTime) {
				continue // idle events have one limit, expiries the others
			}
			out[k.String()+"/"+l.String()] = e.counts[k][l].Load()
		}
	}
	return out
}

// Checks is how many passes have run.
func (e *Enforcer) Checks() uint64 { return e.checks.Load() }
