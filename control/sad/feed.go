package sad

import (
	"fmt"
	"net/netip"

	"github.com/xesp/xesp/control/sa"
)

// Op is what a Change did.
type Op uint8

// Change kinds.
const (
	OpAdd     Op = iota + 1
	OpUpdate     // parameters changed; Worker/Index may differ from PrevWorker/PrevIndex
	OpDelete     // Worker/Index are the slot just freed
	OpBinding    // the NAT binding changed (Get the SA for the new one)
	OpState      // the lifecycle state changed
)

func (o Op) String() string {
	switch o {
	case OpAdd:
		return "add"
	case OpUpdate:
		return "update"
	case OpDelete:
		return "delete"
	case OpBinding:
		return "binding"
	case OpState:
		return "state"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Change is one entry of the change feed. It carries where the SA sits
// (and sat, for updates and deletes) so a consumer can clear an old slot
// without keeping its own copy; everything else it reads with Get, which
// makes replaying a change idempotent.
type Change struct {
	Version    uint64
	ID         sa.ID
	Index      uint32
	PrevIndex  uint32
	Worker     uint16
	PrevWorker uint16
	Op         Op
}

// record appends a change; the caller holds the write lock.
func (d *SAD) record(e *entry, op Op, prevWorker uint16, prevIndex uint32) {
	d.version++
	e.version = d.version
	d.log[d.version%uint64(len(d.log))] = Change{
		Version: d.version, ID: e.id(), Op: op,
		Worker: e.worker, Index: e.index, PrevWorker: prevWorker, PrevIndex: prevIndex,
	}
}

func (d *SAD) wake() {
	select {
	case d.notify <- struct{}{}:
	default:
	}
}

// Notify returns a channel that receives (without blocking the writers,
// coalescing bursts into one wake-up) after changes. A consumer loops:
// wait on Notify, then Changes(since).
func (d *SAD) Notify() <-chan struct{} { return d.notify }

// Version is the number of the latest change (0 for a new SAD).
func (d *SAD) Version() uint64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.version
}

// Changes appends to dst[:0] every change after version since and returns
// them with the version they reach. When the log has dropped changes the
// consumer has not seen, it returns ErrResync: read Version, List
// everything, apply it, then continue with Changes from that version
// (changes made while listing are replayed, which Get makes harmless).
func (d *SAD) Changes(since uint64, dst []Change) ([]Change, uint64, error) {
	out := dst[:0]
	d.mu.RLock()
	defer d.mu.RUnlock()
	n := uint64(len(d.log))
	switch {
	case since > d.version:
		return out, d.version, fmt.Errorf("changes since %d: the SAD is only at version %d: %w", since, d.version, ErrResync)
	case d.version-since > n:
		return out, d.version, fmt.Errorf("changes since %d: log holds %d..%d: %w", since, d.version-n+1, d.version, ErrResync)
	}
	for v := since + 1; v <= d.version; v++ {
		out = append(out, d.log[v%n])
	}
	return out, d.version, nil
}

// SetBinding records a NAT binding change a worker learnt from an
// authenticated, in-window packet of the SA id. Every SA of id's pairing
// group takes the binding (they share the phone's NAT mapping). It returns
// how many SAs changed.
func (d *SAD) SetBinding(id sa.ID, b netip.AddrPort) (int, error) {
	if !b.IsValid() {
		return 0, fmt.Errorf("set binding of %s: invalid address %v", id, b)
	}
	d.mu.Lock()
	e := d.lookup(id)
	ok := e != nil
	if !ok {
		d.mu.Unlock()
		return 0, fmt.Errorf("set binding of %s: %w", id, ErrNotFound)
	}
	n := 0
	nb := bindingOf(b)
	for m := d.groups.get(e.group()); m != nil; m = m.nextPeer {
		if m.bind != nb {
			m.bind = nb
			d.record(m, OpBinding, m.worker, m.index)
			n++
		}
	}
	d.mu.Unlock()
	if n > 0 {
		d.wake()
	}
	return n, nil
}

// SetState records a lifecycle state change.
func (d *SAD) SetState(id sa.ID, st State) error {
	d.mu.Lock()
	e := d.lookup(id)
	ok := e != nil
	changed := ok && e.state != st
	if changed {
		e.state = st
		d.record(e, OpState, e.worker, e.index)
	}
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("set state of %s: %w", id, ErrNotFound)
	}
	if changed {
		d.wake()
	}
	return nil
}

// Len returns the number of inbound and outbound SAs.
func (d *SAD) Len() (in, out int) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.in, d.out
}

// WorkerLoad is one worker's share of the SAD.
type WorkerLoad struct {
	SAs int
	// IndexLimit bounds the indexes ever handed to this worker: a worker
	// table of this many slots holds every SA it owns.
	IndexLimit uint32
}

// Workers reports each worker's load, indexed by worker number.
func (d *SAD) Workers() []WorkerLoad {
	d.mu.RLock()
	defer d.mu.RUnlock()
	out := make([]WorkerLoad, len(d.workers))
	for i, w := range d.workers {
		out[i] = WorkerLoad{SAs: w.sas, IndexLimit: w.next}
	}
	return out
}

// ChangedSince counts the SAs whose last change is newer than version: a
// consumer whose feed overran (ErrResync) tells from it whether to
// re-read only those (List, skipping Version <= version) or everything.
func (d *SAD) ChangedSince(version uint64) int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	n := 0
	for _, e := range d.order {
		if !e.deleted && e.version > version {
			n++
		}
	}
	return n
}
