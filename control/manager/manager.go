// Package manager keeps the data path in step with the SA database. It is
// the only writer of the BPF SA map, the policy trie and the cores map and the only sender of
// worker commands: it follows the SAD's change feed, builds each SA's
// cipher state once (esp.NewTransform), installs it in its worker's table, then
// publishes it to XDP; on delete it unpublishes first, waits for the XDP
// runs in flight to end, then has the worker uninstall it once it has
// processed the frames already steered to it. That order means XDP never
// steers a packet to a slot its worker has not filled yet, and no packet
// steered before a delete is dropped for want of its SA. It also carries NAT bindings the workers learn back into the
// SAD, and answers the API's per-SA questions.
//
// It must not touch packets or sockets, and it never blocks a worker: all
// hand-over is by Commands applied between batches and by atomics.
package manager

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/maps"
)

// Workers is what the manager needs of the data-path workers.
type Workers interface {
	Send(ctx context.Context, w int, cmds []worker.Command) error
	Sync(ctx context.Context, w int) error
	Len() int
}

// SeqStore keeps outbound sequence reservations: *seqstore.Store on one
// machine, or a fleet-wide store (etcdseq) with the same contract.
type SeqStore interface {
	KeyFor(dir string, spi uint32, peer netip.AddrPort, proposal string, encKey, authKey []byte) seqstore.Key
	Block() uint64
	High(seqstore.Key) (uint64, bool)
	Reserve([]seqstore.Reservation) error
}

// prefetcher is a SeqStore whose High costs a round trip (a shared store):
// reserve lets it read a whole batch's marks at once first.
type prefetcher interface{ Prefetch([]seqstore.Key) }

// Options wires a Manager.
type Options struct {
	SAD     *sad.SAD
	Maps    *maps.Set
	Workers Workers
	// Events carries binding changes from the workers.
	Events <-chan worker.BindingChange
	// EventsLost, when set, counts the binding changes the workers could
	// not queue on Events (worker.Stats BindingEventsLost, summed): the
	// manager then checks every binding once. Without it, it does so
	// every 30 s.
	EventsLost func() uint64
	// Seq, when set, keeps every outbound SA's sequence numbers durably
	// reserved ahead of use (no IV reuse across restarts); SeqRequests
	// carries the workers' requests for more.
	Seq         SeqStore
	SeqRequests <-chan worker.SeqRequest
	// Restore, when set, may load persisted state (an inbound SA's replay
	// window, its counters) into an entry before its first install, after
	// a restart. Updates and moves then carry the entry's state over.
	Restore func(id sa.ID, s *sa.SA, e *worker.Slot)
	// Retry, when set, paces the retries of failed reservations and
	// installs instead of a one-second ticker (tests step it).
	Retry <-chan time.Time
	Log   *slog.Logger
}

// installed is one SA installed in the data path: only what the manager
// needs to find, replace and remove it (the SA itself is in the SAD, its
// data-path state in the worker's slot).
type installed struct {
	key    saKey // its sa.ID, compact (id())
	entry  *worker.Slot
	shared *sharedBinding // its pair group's binding on its worker
	seqKey seqstore.Key   // outbound: its reservation record
	policy policyKey      // outbound: the XDP entry (trie prefix or core key) this SA serves
	index  uint32
	// seen is the resync pass that last listed the SA (resync removes
	// those an older pass listed).
	seen   uint32
	worker uint16
	encap  bool
}

// id is the SA's identity.
func (s *installed) id() sa.ID { return s.key.id() }

func (k policyKey) String() string {
	if k.isCore() {
		return fmt.Sprintf("core %s port %d", k.core(), k.port)
	}
	return k.prefix().String()
}

// putPolicy points k's XDP entry at pol. The first core entry with a
// port (without one) turns on xesp_private's (address, port) (address,
// any port) lookup, bpf.CoreFlagPort (CoreFlagAny) in core_cfg; it stays
// on, so a deployment without core addresses never pays for the lookups
// and one with only one kind pays one miss in front of the trie.
func (m *Manager) putPolicy(k policyKey, pol bpf.Policy) error {
	if k.isCore() {
		flag := bpf.CoreFlagAny
		if k.port != 0 {
			flag = bpf.CoreFlagPort
		}
		if m.coreFlags&flag == 0 {
			cur, err := m.o.Maps.Cores.Kinds()
			if err == nil {
				err = m.o.Maps.Cores.SetKinds(cur | flag)
			}
			if err != nil {
				return fmt.Errorf("turn on the exact-match step: %w", err)
			}
			m.coreFlags |= flag
		}
		return m.o.Maps.Cores.Put(k.core(), k.port, pol)
	}
	return m.o.Maps.Policies.Put(k.prefix(), pol)
}

// deletePolicy removes k's XDP entry.
func (m *Manager) deletePolicy(k policyKey) error {
	if k.isCore() {
		return m.o.Maps.Cores.Delete(k.core(), k.port)
	}
	return m.o.Maps.Policies.Delete(k.prefix())
}

type groupRef struct {
	worker uint16
	key    sad.GroupKey
}

// sharedBinding is a pair group's binding on one worker, shared by the
// group's installed SAs; ref() is its entry in Manager.bindings. The
// groupRef is kept as its two fields so that worker and refs share one
// word.
type sharedBinding struct {
	b    worker.Binding // in line: one allocation per group, not two
	next *sharedBinding // bindingTable chain
	// ka is the peer whose address this group holds registered in the
	// keepalives map (nil: none); Run's goroutine only. Peers are never
	// changed once stored, so a pointer compare tells a move.
	ka     *worker.Peer
	group  sad.GroupKey
	worker uint16
	refs   int32
	kaSAs  int32 // installed inbound UDP-encapsulated SAs of the group
	kaMark bool  // on Manager.kaCheck
}

func newShared(k groupRef) *sharedBinding { return &sharedBinding{group: k.key, worker: k.worker} }

// ref is the table key sb is filed under.
func (sb *sharedBinding) ref() groupRef { return groupRef{worker: sb.worker, key: sb.group} }

// Manager mirrors a SAD into the data path.
type Manager struct {
	o   Options
	log *slog.Logger

	mu       sync.RWMutex // guards live (read by the API)
	live     liveSet
	slots    [][]*installed // [worker][index], for binding events
	bindings bindingTable
	// policies is, per XDP key (inner prefix or core key), the newest
	// outbound SA that serves it, which the map entry points at; older
	// holds the others, in install order, for the (rare) keys served by
	// more than one. So a rekeyed SA takes over and the older one takes
	// back over if the newer goes first. Several SAs on one key are also
	// a phone's SAs that differ by local port only (a re-registration's
	// new set beside the current one): they share a worker (the SAD
	// groups a phone's SAs by core address), which picks by ports.
	// Apart, the common key of one SA costs a pointer, not a slice and
	// its one-element array.
	policies map[policyKey]*installed
	older    map[policyKey][]*installed

	// coreFlags are the bpf.CoreFlag* bits set in core_cfg (putPolicy).
	coreFlags uint32
	// pass numbers resyncs (installed.seen).
	pass uint32

	version uint64
	changes []sad.Change
	// retryInstall holds SAs whose sequence reservation failed; Run
	// installs them again from the SAD every second (guarded by mu).
	retryInstall map[sa.ID]struct{}

	// synced is the SAD version the data path reflects; waiters watch
	// syncedCh, which is closed and replaced at every advance.
	syncMu   sync.Mutex
	synced   uint64
	syncedCh chan struct{}

	// kaRef counts, per binding registered in the keepalives map, the
	// groups holding it (Run's goroutine only). kaCheck lists the groups
	// whose registration may be stale (installs, removals, moves; under
	// mu): each tick looks at those only, so the work follows changes,
	// never the SAs installed. kaLost is the workers' lost-event count
	// last seen: a move whose event was lost is found by one full pass.
	kaRef   map[netip.AddrPort]int32
	kaCheck []*sharedBinding
	kaLost  uint64
}

// New returns a Manager; Sync or Run start mirroring.
func New(o Options) (*Manager, error) {
	if o.SAD == nil || o.Maps == nil || o.Workers == nil {
		return nil, errors.New("manager: SAD, maps and workers are required")
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if s, ok := o.Seq.(*seqstore.Store); ok && s == nil {
		o.Seq = nil // a nil *Store means no store, as before SeqStore was an interface
	}
	return &Manager{
		o: o, log: o.Log, syncedCh: make(chan struct{}),
		live:     newLiveSet(0, 0),
		slots:    make([][]*installed, o.Workers.Len()),
		bindings: newBindingTable(),
		policies: make(map[policyKey]*installed),
		older:    make(map[policyKey][]*installed),

		retryInstall: make(map[sa.ID]struct{}),
		kaRef:        make(map[netip.AddrPort]int32),
	}, nil
}

// Run follows the SAD until ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	// A failed SA is reported and the rest carry on, on the first round
	// as on every later one: changes that arrived since the caller's own
	// Sync (an etcd listing, an API call) must not stop the data path.
	if err := m.Sync(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		m.log.Error("sync data path with SA database", "err", err)
	}
	// Extensions that failed for want of the store (a shared one out of
	// reach) are retried: the worker asks once per block and would
	// otherwise stall at its limit for good. Fenced ones are not.
	retry := make(map[worker.SeqRequest]struct{})
	ticks := m.o.Retry
	if ticks == nil {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		ticks = tick.C
	}
	m.syncKeepalives()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return nil
		case <-ticks:
			// Bindings in the keepalives map follow installs, removals and
			// moves within a tick.
			if m.o.EventsLost == nil && n%30 == 0 {
				m.mu.Lock()
				for sb := range m.bindings.all() {
					m.kaQueue(sb)
				}
				m.mu.Unlock()
			}
			m.syncKeepalives()
			m.retryInstalls(ctx)
			for req := range retry {
				err := m.extend(req)
				if err == nil || errors.Is(err, seqstore.ErrFenced) {
					delete(retry, req)
					m.log.Info("reserve sequence numbers: retried", "worker", req.Worker, "index", req.Index, "err", err)
				}
			}
		case <-m.o.SAD.Notify():
			if err := m.Sync(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				m.log.Error("sync data path with SA database", "err", err)
			}
		case ev := <-m.o.Events:
			m.bindingChanged(ev)
		case req := <-m.o.SeqRequests:
			if err := m.extend(req); err != nil {
				m.log.Error("reserve sequence numbers", "err", err)
				if !errors.Is(err, seqstore.ErrFenced) {
					retry[req] = struct{}{}
				}
			}
		}
	}
}

// retryInstalls installs again the SAs whose reservation failed, as the
// SAD has them now (deleted ones are dropped).
func (m *Manager) retryInstalls(ctx context.Context) {
	m.mu.Lock()
	if len(m.retryInstall) == 0 {
		m.mu.Unlock()
		return
	}
	ids := make([]sa.ID, 0, len(m.retryInstall))
	for id := range m.retryInstall {
		ids = append(ids, id)
	}
	clear(m.retryInstall)
	m.mu.Unlock()
	var b batch
	for _, id := range ids {
		if e, ok := m.o.SAD.Get(id); ok {
			b.adds = append(b.adds, e)
		}
	}
	if err := m.commit(ctx, &b, nil); err != nil {
		m.log.Error("install SAs again", "sas", len(b.adds), "err", err)
		return
	}
	m.log.Info("installed SAs whose reservation had failed", "sas", len(b.adds))
}

// Sync applies every SAD change made so far and returns once the data
// path reflects them.
func (m *Manager) Sync(ctx context.Context) error {
	var err error
	var next uint64
	m.changes, next, err = m.o.SAD.Changes(m.version, m.changes)
	if errors.Is(err, sad.ErrResync) {
		return m.resync(ctx)
	}
	if err != nil {
		return fmt.Errorf("read SA changes: %w", err)
	}
	if len(m.changes) == 0 {
		return nil
	}
	// Commit in pages, as resync does: a load of a million SAs is a
	// million changes, and one batch of them would hold the manager (and
	// a shutdown waiting for it) for minutes without a look at ctx.
	// Each page's BPF writes overlap the next page's build and install
	// (pipeline); all are done before the version advances.
	var pl pipeline
	var errs []error
	for from := 0; from < len(m.changes); from += resyncPage {
		var b batch
		for _, c := range m.changes[from:min(len(m.changes), from+resyncPage)] {
			m.plan(&b, c)
		}
		if err := m.commit(ctx, &b, &pl); err != nil {
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			return errors.Join(append(errs, pl.wait())...)
		}
	}
	err = errors.Join(append(errs, pl.wait())...)
	// SAs that failed to build or publish are reported, not retried:
	// waiting on them would stall every later change.
	m.advance(next)
	return err
}

// advance records that the data path reflects SAD version v.
func (m *Manager) advance(v uint64) {
	m.version = v
	m.syncMu.Lock()
	if v > m.synced {
		m.synced = v
		close(m.syncedCh)
		m.syncedCh = make(chan struct{})
	}
	m.syncMu.Unlock()
}

// WaitVersion returns once the data path reflects SAD version v, i.e.
// every change up to it is installed and published (or failed and was
// logged). The API uses it so that an SA it added carries traffic by the
// time the caller hears back.
func (m *Manager) WaitVersion(ctx context.Context, v uint64) error {
	for {
		m.syncMu.Lock()
		done, ch := m.synced >= v, m.syncedCh
		m.syncMu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the data path to apply SA database version %d: %w", v, ctx.Err())
		}
	}
}

// resync rebuilds the data path from a full listing: what the SAD holds is
// installed page by page (an SA already live and changed since the version
// applied is updated in place; one unchanged is left alone), then what it
// no longer holds is removed. Committing per page bounds memory
// and lets the data path fill up progressively on a large initial load.
func (m *Manager) resync(ctx context.Context) error {
	version := m.o.SAD.Version()
	in, out := m.o.SAD.Len()
	m.mu.Lock()
	// fresh: nothing is installed yet (the initial load), so nothing can
	// be stale and the pass needs no stamps.
	fresh := m.live.len() == 0
	if fresh {
		m.live = newLiveSet(in, out)
		m.policies = make(map[policyKey]*installed, out)
	}
	// Each pass stamps what it lists, so what an older pass stamped is
	// what the SAD no longer holds: no set of a million IDs on the side.
	m.pass++
	pass := m.pass
	m.mu.Unlock()
	// Each page's BPF writes overlap the next page's listing, build and
	// install (pipeline); all are done before the version advances.
	var pl pipeline
	var errs []error
	var page, changed []sad.Record
	var cur uint64
	applied := m.version
	for {
		page, cur = m.o.SAD.List(cur, resyncPage, page[:0])
		adds := page
		if !fresh {
			// An SA live from a version the data path already applied is
			// unchanged: rebuilding it would only throw away its cipher
			// (adding 10^5 SAs to a running gateway overflows the feed and
			// used to reinstall every SA it held). What failed to install
			// stays failed until its next change, as on the feed.
			changed = changed[:0]
			m.mu.RLock()
			for i := range page {
				if page[i].Version > applied || m.live.get(page[i].ID) == nil {
					changed = append(changed, page[i])
				}
			}
			m.mu.RUnlock()
			adds = changed
		}
		if err := m.commit(ctx, &batch{adds: adds, fresh: fresh}, &pl); err != nil {
			if ctx.Err() != nil {
				return errors.Join(err, pl.wait())
			}
			errs = append(errs, err)
		}
		if !fresh {
			m.mu.Lock()
			for _, e := range page {
				if s := m.live.get(e.ID); s != nil {
					s.seen = pass
				}
			}
			m.mu.Unlock()
		}
		if cur == 0 {
			break
		}
	}
	if err := pl.wait(); err != nil {
		errs = append(errs, err)
	}
	if !fresh {
		var b batch
		m.mu.RLock()
		for s := range m.live.all() {
			if s.seen != pass {
				b.removes = append(b.removes, s)
			}
		}
		m.mu.RUnlock()
		if err := m.commit(ctx, &b, nil); err != nil {
			errs = append(errs, err)
		}
	}
	m.advance(version)
	return errors.Join(errs...)
}

// pipeline runs one commit's publish (its BPF map writes, a syscall per
// few thousand entries that the kernel spends ~1 µs an entry on) beside
// the next commit's build and install, on the other CPU. Publishes stay
// in commit order, one at a time, and each starts only after its own
// commit's install: XDP still never steers to a slot its worker has not
// filled. A commit that unpublishes (a remove, an update that replaces a
// live SA) waits for the publish in flight first, so a map entry is never
// written from an older picture of the policies than its removal's.
type pipeline struct {
	done chan error // the publish in flight; nil: none
}

// wait returns once the publish in flight (if any) is done, with its
// error.
func (p *pipeline) wait() error {
	if p == nil || p.done == nil {
		return nil
	}
	err := <-p.done
	p.done = nil
	return err
}

// resyncPage is how many SAs one resync commit (or one page of Sync's
// changes) handles; a variable so tests can page a few SAs.
var resyncPage = 16384

// batch is one round of changes, applied in the safe order by commit.
type batch struct {
	removes  []*installed // unpublish, then uninstall
	adds     []sad.Record // install, then publish (also updates)
	bindings []sa.ID
	// fresh: no add is live (a page of the resync that loads an empty
	// data path, which lists each SA once), so none is looked up.
	fresh bool
}

func (m *Manager) plan(b *batch, c sad.Change) {
	switch c.Op {
	case sad.OpAdd, sad.OpUpdate:
		if e, ok := m.o.SAD.Get(c.ID); ok {
			b.adds = append(b.adds, e)
		}
	case sad.OpDelete:
		m.mu.RLock()
		s := m.live.get(c.ID)
		m.mu.RUnlock()
		if s != nil {
			b.removes = append(b.removes, s)
		}
	case sad.OpBinding:
		b.bindings = append(b.bindings, c.ID)
	case sad.OpState:
		// Lifetime enforcement acts through Delete; nothing to mirror.
	}
}

// commit applies a batch in the order that keeps XDP and the workers
// consistent: unpublish what goes away, uninstall it, install, publish.
// An updated SA that keeps its slot is replaced by one command that makes
// its worker carry the sequence counter and replay window over, so it
// loses no packet. One that moves (another worker or index) is
// unpublished and uninstalled first, and its state, quiescent by then,
// carried over by the manager.
//
// With a pipeline, the publish runs in the background (see pipeline) and
// its error comes from the pipeline's next wait; without one (nil),
// commit returns once everything is published.
func (m *Manager) commit(ctx context.Context, b *batch, pl *pipeline) error {
	var errs []error
	if len(b.removes) > 0 {
		if err := pl.wait(); err != nil {
			errs = append(errs, err)
		}
	}
	// Only this goroutine installs: with nothing live (or a fresh page),
	// no add replaces anything and the million lookups of an initial
	// load are skipped.
	m.mu.RLock()
	empty := b.fresh || m.live.len() == 0
	m.mu.RUnlock()

	var installs, olds []*installed
	// repl maps an update to the version it replaces; the worker
	// inherits that one's state in place when both have the same slot
	// (inPlace).
	var repl map[*installed]*installed
	for i := range b.adds {
		e := &b.adds[i]
		s, err := m.build(e)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var old *installed
		if !empty {
			m.mu.RLock()
			old = m.live.get(e.ID)
			m.mu.RUnlock()
		}
		if old != nil {
			// old may be in the publish in flight; it is unpublished or
			// taken off its policy below.
			if err := pl.wait(); err != nil {
				errs = append(errs, err)
			}
			if inPlace(s, old) {
				if old.entry.Dir == worker.Outbound && old.policy != s.policy {
					// The update moved the SA to another XDP key (a core
					// address given or changed, another inner prefix):
					// the old key goes to the SA left on it, or away.
					if err := m.unpublish(old); err != nil {
						errs = append(errs, err)
					}
				} else {
					m.dropPolicy(old)
				}
			} else {
				olds = append(olds, old)
			}
			if repl == nil {
				repl = make(map[*installed]*installed)
			}
			repl[s] = old
		}
		installs = append(installs, s)
	}
	// 1. Unpublish deleted SAs and updated SAs that move, so XDP stops
	// steering to their slots.
	for _, s := range append(b.removes[:len(b.removes):len(b.removes)], olds...) {
		if err := m.unpublish(s); err != nil {
			errs = append(errs, err)
		}
	}
	// 2. Let the XDP runs in flight end: after that, every frame steered
	// to those slots is in an RX ring. Then uninstall them once their
	// workers have processed those frames (make before break), and wait
	// until no worker touches those entries. Their indices are free for
	// installs only after that, so no drained frame meets another SA.
	var out []*installed
	out = append(append(out, b.removes...), olds...)
	if len(out) > 0 {
		m.settle()
	}
	if err := m.send(ctx, out, false, nil); err != nil {
		return err
	}
	// 3. Moved SAs continue where the old version stopped; every outbound
	// SA gets durably reserved sequence numbers before its first packet.
	for s, old := range repl {
		if !inPlace(s, old) {
			worker.Inherit(s.entry, old.entry)
		}
	}
	installs, err := m.reserve(installs, &errs)
	if err != nil {
		// Nothing of this batch is installed. A shared store out of
		// reach (or a takeover race) is passing, so Run tries these SAs
		// again rather than leave them in the SAD but off the data path.
		m.mu.Lock()
		for _, s := range installs {
			m.release(s)
			m.retryInstall[s.id()] = struct{}{}
		}
		m.mu.Unlock()
		return errors.Join(append(errs, err)...)
	}
	// 4. Install.
	if err := m.send(ctx, installs, true, repl); err != nil {
		return err
	}
	m.mu.Lock()
	for _, s := range out {
		m.forget(s)
	}
	for _, s := range installs {
		if old := repl[s]; old != nil && inPlace(s, old) {
			m.forget(old)
		}
		m.remember(s)
	}
	m.mu.Unlock()
	// 5. Publish: from now on XDP steers to the filled slots.
	if pl == nil {
		if err := m.publish(installs); err != nil {
			errs = append(errs, err)
		}
	} else {
		if err := pl.wait(); err != nil {
			errs = append(errs, err)
		}
		if len(installs) > 0 {
			done := make(chan error, 1)
			go func() { done <- m.publish(installs) }()
			pl.done = done
		}
	}
	for _, id := range b.bindings {
		m.applyBinding(id)
	}
	return errors.Join(errs...)
}

// inPlace says the update s takes the slot of old, the version it
// replaces: its worker then carries old's state over (Command.Inherit).
func inPlace(s, old *installed) bool { return old.worker == s.worker && old.index == s.index }

// send installs (or removes) slots in their workers' tables and returns
// once every worker concerned has applied the commands. repl: the
// versions installs replace (commit).
func (m *Manager) send(ctx context.Context, slots []*installed, install bool, repl map[*installed]*installed) error {
	if len(slots) == 0 {
		return nil
	}
	// Each worker's commands in one exact allocation.
	per := make([]int, m.o.Workers.Len())
	for _, s := range slots {
		if int(s.worker) < len(per) {
			per[s.worker]++
		}
	}
	cmds := make(map[uint16][]worker.Command)
	for w, n := range per {
		if n > 0 {
			cmds[uint16(w)] = make([]worker.Command, 0, n)
		}
	}
	var drained []chan struct{}
	for _, s := range slots {
		c := worker.Command{Index: s.index}
		if install {
			old := repl[s]
			c.Entry, c.Inherit = s.entry, old != nil && inPlace(s, old)
		} else {
			// Removals wait for the frames already steered to the slot.
			c.Drain, c.Done = true, make(chan struct{})
			drained = append(drained, c.Done)
		}
		cmds[s.worker] = append(cmds[s.worker], c)
	}
	for w, c := range cmds {
		if err := m.o.Workers.Send(ctx, int(w), c); err != nil {
			return fmt.Errorf("send to worker %d: %w", w, err)
		}
	}
	if !install {
		for _, done := range drained {
			select {
			case <-done:
			case <-ctx.Done():
				return fmt.Errorf("wait for workers to drain %d removed SAs: %w", len(slots), ctx.Err())
			}
		}
		return nil
	}
	for w := range cmds {
		if err := m.o.Workers.Sync(ctx, int(w)); err != nil {
			return fmt.Errorf("sync worker %d: %w", w, err)
		}
	}
	return nil
}

// settleFallback is how long settle waits when the kernel refuses the
// RCU barrier maps: NAPI polls last microseconds, so this bounds the XDP
// runs in flight by a wide margin.
const settleFallback = 20 * time.Millisecond

var rcuBarrier struct {
	once sync.Once
	b    *maps.Barrier
}

// settle returns once no XDP run that may have read the maps before the
// caller's unpublish is still going, and so every frame it redirected is
// in an AF_XDP RX ring (see maps.Barrier). One barrier serves the process.
func (m *Manager) settle() {
	rcuBarrier.once.Do(func() {
		b, err := maps.NewBarrier()
		if err != nil {
			m.log.Warn("no RCU barrier for SA removal, waiting a fixed time instead", "wait", settleFallback, "err", err)
			return
		}
		rcuBarrier.b = b
	})
	if b := rcuBarrier.b; b != nil {
		err := b.Wait()
		if err == nil {
			return
		}
		m.log.Warn("RCU barrier for SA removal", "err", err)
	}
	time.Sleep(settleFallback)
}

// build makes the worker entry for an SAD entry: one allocation holds
// the slot, its Transform and its replay window (worker.NewSlot); the
// cipher is built by the worker on the SA's first packet. e is read, not
// kept (by value it was a ~400-byte copy on the heap per SA).
func (m *Manager) build(e *sad.Record) (*installed, error) {
	s := &e.SA
	mode := esp.ModeTunnel
	if s.Mode == sa.Transport {
		mode = esp.ModeTransport
	}
	ent, err := worker.NewSlot(esp.Config{
		Name: s.Name, SPI: s.SPI, Proposal: s.Proposal,
		EncKey: s.EncKey, AuthKey: s.AuthKey, ESN: s.ESN,
		ReplayWindow: int(s.ReplayWindow), Mode: mode,
	})
	if err != nil {
		return nil, err
	}
	sl := &installed{key: keyOf(e.ID), worker: e.Worker, index: e.Index, encap: s.Encap != nil}
	// What the gateway's SAs share is interned (worker.Scope).
	scope := worker.Scope{Local: s.Local, InnerLocal: s.InnerLocal,
		HardPackets: s.Lifetime.HardPackets, HardBytes: s.Lifetime.HardBytes}
	ent.PortLocal, ent.PortPeer = s.Ports.Local, s.Ports.Peer
	ent.Proto, ent.DSCP, ent.FixDSCP = s.Ports.Proto, s.DSCP, s.HasDSCP
	if s.Encap != nil {
		ent.LocalPort = s.Encap.LocalPort
	}
	innerPeer := s.InnerPeer
	if s.Direction == sa.In {
		ent.Dir = worker.Inbound
	} else {
		if m.o.Seq != nil {
			// The configured peer, not the current binding: the binding
			// moves, the SA (and its key) stay the same.
			sl.seqKey = m.o.Seq.KeyFor("out", s.SPI, e.ID.Peer, s.Proposal.String(), s.EncKey, s.AuthKey)
		}
		ent.Dir = worker.Outbound
		if !innerPeer.IsValid() {
			// Transport mode: cleartext for the phone is addressed to the
			// phone itself.
			innerPeer = netip.PrefixFrom(s.Peer, s.Peer.BitLen())
		}
		sl.policy = prefixKey(innerPeer)
		if s.Core.IsValid() {
			sl.policy = coreKey(s.Core, s.Ports.Peer)
		}
	}
	// The worker translates between the phone's inner address
	// (InnerPeer's) and its core address (both directions).
	ent.SetSelectors(innerPeer, s.Core)
	if s.Mode == sa.Transport {
		// The gateway is the endpoint: segments go from the core address
		// to inner.local's one address and back (dataplane/worker
		// transport.go); the SAD made sure both are set.
		ent.Transport = true
		if s.Direction == sa.In {
			scope.Dest = s.InnerLocal.Addr()
		}
	}
	ent.SetScope(scope)
	if m.o.Restore != nil {
		m.o.Restore(e.ID, s, ent)
	}
	key := groupRef{worker: e.Worker, key: sad.GroupOf(s)}
	m.mu.Lock()
	sb := m.bindings.get(key)
	if sb == nil {
		sb = newShared(key)
		sb.b.Set(worker.Peer{Addr: e.Binding})
		m.bindings.add(sb)
	}
	sb.refs++
	if sl.kaCounted(s) {
		sb.kaSAs++
		m.kaQueue(sb)
	}
	m.mu.Unlock()
	ent.Binding = &sb.b
	sl.shared = sb
	sl.entry = ent
	return sl, nil
}

// reserve starts each outbound SA above every sequence number it may
// ever have sent under its key and durably reserves a block ahead (one
// fsync for the batch). SAs whose space is exhausted are left out with an
// error; nothing is installed when the reservation cannot be written.
func (m *Manager) reserve(installs []*installed, errs *[]error) ([]*installed, error) {
	if m.o.Seq == nil {
		return installs, nil
	}
	block := m.o.Seq.Block()
	if p, ok := m.o.Seq.(prefetcher); ok {
		var keys []seqstore.Key
		for _, s := range installs {
			if s.entry.Dir == worker.Outbound {
				keys = append(keys, s.seqKey)
			}
		}
		p.Prefetch(keys)
	}
	var batch []seqstore.Reservation
	keep := installs[:0]
	for _, s := range installs {
		if s.entry.Dir != worker.Outbound {
			keep = append(keep, s)
			continue
		}
		persisted, _ := m.o.Seq.High(s.seqKey)
		next := max(s.entry.SA.NextSeq(), seqstore.StartSeq(persisted))
		if next != s.entry.SA.NextSeq() {
			if err := s.entry.SA.SetNextSeq(next); err != nil {
				*errs = append(*errs, fmt.Errorf("%s: sequence space used up by earlier runs, rekey: %w", s.id(), err))
				m.mu.Lock()
				m.release(s)
				m.mu.Unlock()
				continue
			}
		}
		high, _ := seqstore.NextBlock(next, next, block)
		batch = append(batch, seqstore.Reservation{Key: s.seqKey, High: high})
		s.entry.Limit.Store(high)
		s.entry.ExtendAt.Store(high - block/2)
		keep = append(keep, s)
	}
	if err := m.o.Seq.Reserve(batch); err != nil {
		return keep, fmt.Errorf("reserve sequence numbers for %d outbound SAs: %w", len(batch), err)
	}
	return keep, nil
}

// extend reserves the next block for an outbound SA whose worker passed
// the midpoint of its current one.
func (m *Manager) extend(req worker.SeqRequest) error {
	if m.o.Seq == nil {
		return nil
	}
	m.mu.RLock()
	var s *installed
	if req.Worker < len(m.slots) && int(req.Index) < len(m.slots[req.Worker]) {
		s = m.slots[req.Worker][req.Index]
	}
	m.mu.RUnlock()
	if s == nil || s.entry.Dir != worker.Outbound {
		return nil
	}
	block := m.o.Seq.Block()
	limit := s.entry.Limit.Load()
	high, more := seqstore.NextBlock(s.entry.Counters.Seq.Load()+1, limit, block)
	if !more {
		return nil
	}
	if err := m.o.Seq.Reserve([]seqstore.Reservation{{Key: s.seqKey, High: high}}); err != nil {
		return fmt.Errorf("%s: %w", s.id(), err)
	}
	s.entry.Limit.Store(high)
	s.entry.ExtendAt.Store(high - block/2)
	return nil
}

func (m *Manager) remember(s *installed) {
	m.live.put(s)
	ws := m.slots[s.worker]
	if int(s.index) >= len(ws) {
		ws = append(ws, make([]*installed, int(s.index)+1-len(ws))...)
		m.slots[s.worker] = ws
	}
	ws[s.index] = s
	if s.entry.Dir == worker.Outbound {
		if cur := m.policies[s.policy]; cur != nil {
			m.older[s.policy] = append(m.older[s.policy], cur)
		}
		m.policies[s.policy] = s
	}
}

// release drops a built slot that will not be installed.
func (m *Manager) release(s *installed) {
	m.unshare(s)
	s.entry.SA.Wipe() // never reached a worker: its keys go here
}

// unshare drops s's reference to its group's binding.
func (m *Manager) unshare(s *installed) {
	if sb := s.shared; sb != nil {
		s.shared = nil
		if s.encap && s.entry.Dir == worker.Inbound {
			sb.kaSAs--
			m.kaQueue(sb)
		}
		if sb.refs--; sb.refs == 0 {
			m.bindings.del(sb)
		}
	}
}

func (m *Manager) forget(s *installed) {
	m.live.del(s)
	if ws := m.slots[s.worker]; int(s.index) < len(ws) && ws[s.index] == s {
		ws[s.index] = nil
	}
	m.unshare(s)
}

// publish writes installed slots to the BPF maps.
func (m *Manager) publish(installs []*installed) error {
	nIn := 0
	for _, s := range installs {
		if s.entry.Dir == worker.Inbound {
			nIn++
		}
	}
	// Sized once: a page of installs is thousands of entries.
	spis := make([]uint32, 0, nIn)
	vals := make([]bpf.SASteer, 0, nIn)
	prefixes := make([]netip.Prefix, 0, len(installs)-nIn) // trie policies, written in batches
	pols := make([]bpf.Policy, 0, len(installs)-nIn)
	var errs []error
	// Which outbound SAs are their key's newest, read under one lock: a
	// publish runs beside the next page's build (pipeline), which takes
	// the lock once per SA, and a read lock per SA here made the two
	// hand the lock over a million times (futex wake-ups: a 1M-pair
	// config load took 1.5x as long).
	newest := make([]bool, len(installs))
	m.mu.RLock()
	for i, s := range installs {
		newest[i] = s.entry.Dir != worker.Inbound && m.policies[s.policy] == s
	}
	m.mu.RUnlock()
	for i, s := range installs {
		if s.entry.Dir == worker.Inbound {
			var flags uint16
			if s.encap {
				flags = bpf.SAFlagEncap
			}
			spis = append(spis, s.key.spi)
			vals = append(vals, bpf.SASteer{SaIndex: s.index, Worker: s.worker, Flags: flags})
			continue
		}
		if newest[i] {
			pol := bpf.Policy{SaIndex: s.index, Worker: s.worker}
			if !s.policy.isCore() {
				prefixes, pols = append(prefixes, s.policy.prefix()), append(pols, pol)
				continue
			}
			if err := m.putPolicy(s.policy, pol); err != nil {
				errs = append(errs, fmt.Errorf("publish policy %s for %s: %w", s.policy, s.id(), err))
			}
		}
	}
	if len(prefixes) > 0 {
		if err := m.o.Maps.Policies.PutBatch(prefixes, pols); err != nil {
			errs = append(errs, fmt.Errorf("publish %d policies: %w", len(prefixes), err))
		}
	}
	if len(spis) > 0 {
		if err := m.o.Maps.SAs.PutBatch(spis, vals); err != nil {
			errs = append(errs, fmt.Errorf("publish %d inbound SAs: %w", len(spis), err))
		}
	}
	return errors.Join(errs...)
}

// unpublish stops XDP steering to s. For a policy served by several SAs
// it hands the prefix back to the newest remaining one.
func (m *Manager) unpublish(s *installed) error {
	if s.entry.Dir == worker.Inbound {
		if err := m.o.Maps.SAs.Delete(s.key.spi); err != nil && !errors.Is(err, maps.ErrNotFound) {
			return fmt.Errorf("unpublish %s: %w", s.id(), err)
		}
		return nil
	}
	if n := m.dropPolicy(s); n != nil {
		return m.putPolicy(s.policy, bpf.Policy{SaIndex: n.index, Worker: n.worker})
	}
	if err := m.deletePolicy(s.policy); err != nil && !errors.Is(err, maps.ErrNotFound) {
		return fmt.Errorf("unpublish policy %s of %s: %w", s.policy, s.id(), err)
	}
	return nil
}

// dropPolicy takes s off the SAs serving its policy key and returns the
// newest one left (nil: none).
func (m *Manager) dropPolicy(s *installed) *installed {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := s.policy
	list := m.older[k]
	if m.policies[k] == s {
		// The next newest takes over.
		if len(list) == 0 {
			delete(m.policies, k)
			return nil
		}
		m.policies[k] = list[len(list)-1]
		list = list[: len(list)-1 : len(list)-1]
	} else {
		for i, x := range list {
			if x == s {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
	}
	if len(list) == 0 {
		delete(m.older, k)
	} else {
		m.older[k] = list
	}
	return m.policies[k]
}

// bindingChanged records a binding a worker learnt in the SAD, where the
// API shows it and the SA's later entries start from it.
func (m *Manager) bindingChanged(ev worker.BindingChange) {
	m.mu.Lock()
	var s *installed
	if ev.Worker < len(m.slots) && int(ev.Index) < len(m.slots[ev.Worker]) {
		s = m.slots[ev.Worker][ev.Index]
	}
	if s != nil && s.shared != nil {
		m.kaQueue(s.shared)
	}
	m.mu.Unlock()
	if s == nil {
		return
	}
	if _, err := m.o.SAD.SetBinding(s.id(), ev.Peer.Addr); err != nil && !errors.Is(err, sad.ErrNotFound) {
		m.log.Warn("record NAT binding", "sa", s.id(), "err", err)
	}
}

// applyBinding pushes a binding set in the SAD (by the API, or echoed from
// a worker) to the data path if it differs.
func (m *Manager) applyBinding(id sa.ID) {
	e, ok := m.o.SAD.Get(id)
	if !ok {
		return
	}
	m.mu.RLock()
	s := m.live.get(id)
	m.mu.RUnlock()
	if s == nil {
		return
	}
	if cur := s.entry.Binding.Load(); cur.Addr != e.Binding {
		s.entry.Binding.Set(worker.Peer{Addr: e.Binding})
		m.mu.Lock()
		if s.shared != nil {
			m.kaQueue(s.shared)
		}
		m.mu.Unlock()
	}
}

// kaCounted says whether s's binding is registered for keepalives: XDP
// stamps the NAT-keepalives of UDP-encapsulated phones (RFC 3948 2.2),
// and an inbound SA is what a phone's keepalive arrives beside.
func (s *installed) kaCounted(spec *sa.SA) bool {
	return s.encap && spec.Direction == sa.In
}

// kaQueue lists sb for the next keepalive pass (m.mu held).
func (m *Manager) kaQueue(sb *sharedBinding) {
	if !sb.kaMark {
		sb.kaMark = true
		m.kaCheck = append(m.kaCheck, sb)
	}
}

// syncKeepalives brings the keepalives map in step with the bindings of
// the groups listed since the last pass, so XDP stamps the keepalives
// each phone sends (idle-phone detection). A binding is registered while
// at least one group holds it (phones behind one NAPT address and port
// never share one, but an operator's binding may). A failed write is
// logged and the group listed again, so the next pass retries it. When
// the workers lost binding events since the last pass, every group is
// listed once: a move whose event was lost is not otherwise seen.
func (m *Manager) syncKeepalives() {
	ka := m.o.Maps.Keepalives
	m.mu.Lock()
	if m.o.EventsLost != nil {
		if lost := m.o.EventsLost(); lost != m.kaLost {
			m.kaLost = lost
			for sb := range m.bindings.all() {
				m.kaQueue(sb)
			}
		}
	}
	check := m.kaCheck
	m.kaCheck = nil
	var want []*worker.Peer
	for _, sb := range check {
		sb.kaMark = false
		var p *worker.Peer
		if sb.kaSAs > 0 {
			if cur := sb.b.Load(); cur != nil && cur.Addr.Port() != 0 {
				p = cur
			}
		}
		want = append(want, p)
	}
	m.mu.Unlock()
	if ka == nil {
		return
	}
	var retry []*sharedBinding
	for i, sb := range check {
		old, nw := sb.ka, want[i]
		if old == nw || (old != nil && nw != nil && old.Addr == nw.Addr) {
			sb.ka = nw
			continue
		}
		if nw != nil {
			if m.kaRef[nw.Addr] == 0 {
				if err := ka.Add(nw.Addr); err != nil {
					m.log.Warn("register binding for keepalives", "err", err)
					retry = append(retry, sb)
					continue
				}
			}
			m.kaRef[nw.Addr]++
		}
		if old != nil {
			if m.kaRef[old.Addr]--; m.kaRef[old.Addr] <= 0 {
				delete(m.kaRef, old.Addr)
				if err := ka.Delete(old.Addr); err != nil && !errors.Is(err, maps.ErrNotFound) {
					// Left registered: a stray entry only holds a slot.
					m.log.Warn("unregister binding for keepalives", "err", err)
				}
			}
		}
		sb.ka = nw
	}
	if len(retry) > 0 {
		m.mu.Lock()
		for _, sb := range retry {
			m.kaQueue(sb)
		}
		m.mu.Unlock()
	}
}

// LastKeepalive is when the binding of the inbound SA id last sent a
// NAT-keepalive (zero: never seen, not installed, or plain ESP).
func (m *Manager) LastKeepalive(id sa.ID) time.Time {
	ka := m.o.Maps.Keepalives
	m.mu.RLock()
	s := m.live.get(id)
	m.mu.RUnlock()
	if ka == nil || s == nil || !s.encap || s.entry.Dir != worker.Inbound {
		return time.Time{}
	}
	v, ok := ka.Lookup(s.entry.Binding.Load().Addr)
	if !ok || v.LastNs == 0 {
		return time.Time{}
	}
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(ts.Nano() - int64(v.LastNs)))
}

// SACounters are one SA's live figures.
type SACounters struct {
	Packets, Bytes, Drops, Seq uint64
	Binding                    worker.Peer
	// LastSeen is when the last authenticated packet arrived (inbound;
	// zero: none since install).
	LastSeen time.Time
}

// Counters returns the live figures of an installed SA.
func (m *Manager) Counters(id sa.ID) (SACounters, bool) {
	m.mu.RLock()
	s := m.live.get(id)
	m.mu.RUnlock()
	if s == nil {
		return SACounters{}, false
	}
	return countersOf(s), true
}

// countersOf reads s's counters from its entry.
func countersOf(s *installed) SACounters {
	c := &s.entry.Counters
	out := SACounters{Packets: c.Packets.Load(), Bytes: c.Bytes.Load(), Drops: c.Drops.Load(),
		Seq: c.Seq.Load(), Binding: *s.entry.Binding.Load()}
	if ns := c.LastSeen.Load(); ns != 0 {
		out.LastSeen = time.Unix(0, ns)
	}
	return out
}

// Installed is the number of SAs in the data path.
func (m *Manager) Installed() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.live.len()
}
