package manager

import (
	"context"
	"fmt"
	"testing"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/worker"
)

// visitWorkers are recWorkers that also keep a dirty list as the real
// worker does (inbound installs, and the slots a test touches) and run
// Dirty commands on it, counting the windows they hand out.
type visitWorkers struct {
	*recWorkers
	dirty    [][]uint32
	exported int
}

func (v *visitWorkers) Send(ctx context.Context, w int, cmds []worker.Command) error {
	for _, c := range cmds {
		if c.Index != ^uint32(0) {
			if err := v.recWorkers.Send(ctx, w, []worker.Command{c}); err != nil {
				return err
			}
			if c.Entry != nil && c.Entry.Dir == worker.Inbound {
				v.touch(w, c.Index)
			}
			continue
		}
		if c.Dirty != nil {
			v.mu.Lock()
			c.Dirty(v.tables[w], v.dirty[w])
			v.exported += len(v.dirty[w])
			v.dirty[w] = nil
			v.mu.Unlock()
		}
		if c.Done != nil {
			close(c.Done)
		}
	}
	return nil
}

func (v *visitWorkers) touch(w int, index uint32) {
	for len(v.dirty) <= w {
		v.dirty = append(v.dirty, nil)
	}
	v.dirty[w] = append(v.dirty[w], index)
}

// SnapshotInbound returns every inbound SA's window exactly once, with
// its own state (outbound SAs have none), but has the workers export only
// the windows that changed since the previous snapshot: the rest come
// from the manager's copy.
func TestSnapshotInboundOnlyChanged(t *testing.T) {
	f := newFixture(t, 1, "")
	vw := &visitWorkers{recWorkers: f.w}
	m, err := New(Options{SAD: f.d, Maps: f.maps, Workers: vw, Events: make(chan worker.BindingChange)})
	if err != nil {
		t.Fatal(err)
	}
	const pairs = 8
	for i := range pairs {
		inner := fmt.Sprintf("10.99.0.%d/32", i+1)
		if _, err := f.d.Add(mkSA(fmt.Sprintf("in%d", i), 0x1001+uint32(i), sa.In, inner, byte(i))); err != nil {
			t.Fatal(err)
		}
		if _, err := f.d.Add(mkSA(fmt.Sprintf("out%d", i), 0x2001+uint32(i), sa.Out, inner, byte(100+i))); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	update := func(i int, seq uint64) {
		e, _ := f.d.Get(sa.ID{Dir: sa.In, SPI: 0x1001 + uint32(i)})
		f.w.entry(int(e.Worker), e.Index).SA.Replay().Update(seq)
		vw.touch(int(e.Worker), e.Index)
	}
	for i := range pairs {
		update(i, uint64(100+i))
	}
	check := func(round string, exported int, top func(i uint32) uint64) {
		t.Helper()
		vw.exported = 0
		states, err := m.SnapshotInbound(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		if vw.exported != exported {
			t.Errorf("%s: workers exported %d windows, want %d", round, vw.exported, exported)
		}
		seen := map[uint32]bool{}
		for _, st := range states {
			if st.ID.Dir != sa.In || seen[st.ID.SPI] {
				t.Fatalf("%s: unexpected or repeated state for %v", round, st.ID)
			}
			seen[st.ID.SPI] = true
			if want := top(st.ID.SPI - 0x1001); st.Replay.Top != want || st.Replay.Bitmap[0]&1 != 1 {
				t.Errorf("%s: %v: top %d bitmap[0] %#x, want top %d and bit 0", round, st.ID, st.Replay.Top, st.Replay.Bitmap[0], want)
			}
		}
		if len(seen) != pairs {
			t.Fatalf("%s: %d states, want %d", round, len(seen), pairs)
		}
	}
	// Installed and updated: each listed twice, exported on both.
	check("first", 2*pairs, func(i uint32) uint64 { return uint64(100 + i) })
	check("quiet", 0, func(i uint32) uint64 { return uint64(100 + i) })
	update(2, 500)
	update(5, 600)
	check("two changed", 2, func(i uint32) uint64 {
		switch i {
		case 2:
			return 500
		case 5:
			return 600
		}
		return uint64(100 + i)
	})
}
