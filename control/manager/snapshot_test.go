package manager

import (
	"context"
	"fmt"
	"testing"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/worker"
)

// visitWorkers are recWorkers that also run Visit commands (Index
// ^0) on their tables and count them, as the real worker does between
// batches.
type visitWorkers struct {
	*recWorkers
	visits int
}

func (v *visitWorkers) Send(ctx context.Context, w int, cmds []worker.Command) error {
	for _, c := range cmds {
		if c.Index != ^uint32(0) {
			if err := v.recWorkers.Send(ctx, w, []worker.Command{c}); err != nil {
				return err
			}
		} else if c.Visit != nil {
			v.mu.Lock()
			c.Visit(v.tables[w])
			v.visits++
			v.mu.Unlock()
		}
		if c.Done != nil {
			close(c.Done)
		}
	}
	return nil
}

// SnapshotInbound exports in chunks of snapshotChunk windows, one Visit
// each, and still returns every inbound SA's window exactly once, with
// its own state; outbound SAs have none.
func TestSnapshotInboundChunks(t *testing.T) {
	defer func(n int) { snapshotChunk = n }(snapshotChunk)
	snapshotChunk = 3
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
	for i := range pairs {
		e, _ := f.d.Get(sa.ID{Dir: sa.In, SPI: 0x1001 + uint32(i)})
		f.w.entry(int(e.Worker), e.Index).SA.Replay().Update(uint64(100 + i))
	}
	states, err := m.SnapshotInbound(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if vw.visits != 3 { // 8 windows in chunks of 3
		t.Errorf("%d visits, want 3", vw.visits)
	}
	seen := map[uint32]bool{}
	for _, st := range states {
		if st.ID.Dir != sa.In || seen[st.ID.SPI] {
			t.Fatalf("unexpected or repeated state for %v", st.ID)
		}
		seen[st.ID.SPI] = true
		if want := uint64(100 + st.ID.SPI - 0x1001); st.Replay.Top != want || st.Replay.Bitmap[0] != 1 {
			t.Errorf("%v: top %d bitmap[0] %#x, want top %d bitmap[0] 1", st.ID, st.Replay.Top, st.Replay.Bitmap[0], want)
		}
	}
	if len(seen) != pairs {
		t.Fatalf("%d states, want %d", len(seen), pairs)
	}
}
