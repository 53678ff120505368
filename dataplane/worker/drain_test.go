package worker

import "testing"

// A Drain removal leaves the entry in place until the frames queued
// before it (here: slow-path packets) are taken; Done and Visit come
// then. A later command for the same slot ends the wait at once; a
// removal of an empty slot is done at once.
func TestDrainWaitsForQueuedFrames(t *testing.T) {
	w := &Worker{inject: make(chan SlowPacket, 4)}
	e := newEntry(t, 0x1001, Inbound)
	w.apply([]Command{{Index: 2, Entry: e}})
	w.inject <- SlowPacket{Index: 2}
	w.inject <- SlowPacket{Index: 2}

	done := make(chan struct{})
	visited := false
	w.apply([]Command{{Index: 2, Drain: true, Done: done, Visit: func([]*Slot) { visited = true }}})
	w.settle()
	if w.pipe.table[2] != e || isClosed(done) || visited {
		t.Fatal("removed before the queued frames were taken")
	}
	<-w.inject
	w.injTaken++
	w.settle()
	if w.pipe.table[2] != e || isClosed(done) {
		t.Fatal("removed with a queued frame left")
	}
	<-w.inject
	w.injTaken++
	w.settle()
	if w.pipe.table[2] != nil || !isClosed(done) || !visited || len(w.drains) != 0 || w.stats.Drained.Load() != 1 {
		t.Fatalf("not removed once drained: entry %v done %v visited %v", w.pipe.table[2], isClosed(done), visited)
	}

	// A later install at the slot completes a pending drain first.
	w.apply([]Command{{Index: 2, Entry: e}})
	w.inject <- SlowPacket{Index: 2}
	done2 := make(chan struct{})
	e2 := newEntry(t, 0x1002, Inbound)
	w.apply([]Command{{Index: 2, Drain: true, Done: done2}, {Index: 2, Entry: e2}})
	if !isClosed(done2) || w.pipe.table[2] != e2 || len(w.drains) != 0 {
		t.Fatal("a later command for the slot did not end the drain")
	}

	// An empty slot: nothing to wait for.
	done3 := make(chan struct{})
	w.apply([]Command{{Index: 7, Drain: true, Done: done3}})
	if !isClosed(done3) {
		t.Fatal("drain of an empty slot pending")
	}

	// Stopping completes what is pending.
	done4 := make(chan struct{})
	w.apply([]Command{{Index: 2, Drain: true, Done: done4}})
	w.finishAll()
	if !isClosed(done4) || w.pipe.table[2] != nil {
		t.Fatal("finishAll left a drain pending")
	}
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
