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
// Dirty commands on it, counting the slots they hand out.
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

// ExportChanged returns, with the state the worker exported, only the
// SAs on the workers' dirty lists: inbound ones whose windows changed
// since the previous call, with their windows, and outbound ones that
// sealed, with their counters; the manager keeps no copy of the windows.
func TestExportChangedOnlyChanged(t *testing.T) {
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
		en := f.w.entry(int(e.Worker), e.Index)
		en.SA.Replay().Update(seq)
		en.Counters.Packets.Add(1)
		vw.touch(int(e.Worker), e.Index)
	}
	send := func(i int, n uint64) {
		e, _ := f.d.Get(sa.ID{Dir: sa.Out, SPI: 0x2001 + uint32(i), Peer: mkSA("x", 1, sa.Out, "10.0.0.1/32", byte(100+i)).ID().Peer})
		en := f.w.entry(int(e.Worker), e.Index)
		en.Counters.Packets.Add(n)
		en.Counters.Bytes.Add(100 * n)
		vw.touch(int(e.Worker), e.Index) // a seal lists it, as the worker does
	}
	for i := range pairs {
		update(i, uint64(100+i))
	}
	// want: inbound SPI offset -> top; outbound SPI offset -> packets.
	check := func(round string, exported int, in map[uint32]uint64, out map[uint32]uint64) {
		t.Helper()
		vw.exported = 0
		got, err := m.ExportChanged(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if vw.exported != exported {
			t.Errorf("%s: workers exported %d windows, want %d", round, vw.exported, exported)
		}
		gotIn, gotOut := map[uint32]uint64{}, map[uint32]uint64{}
		for _, c := range got {
			switch {
			case c.ID.Dir == sa.In && c.Replay != nil && (gotIn[c.ID.SPI-0x1001] == 0 || gotIn[c.ID.SPI-0x1001] == c.Replay.Top):
				// (this fake lists an SA installed and touched twice)
				if c.Replay.Bitmap[0]&1 != 1 {
					t.Errorf("%s: %v: bitmap[0] %#x without bit 0", round, c.ID, c.Replay.Bitmap[0])
				}
				gotIn[c.ID.SPI-0x1001] = c.Replay.Top
			case c.ID.Dir == sa.Out && c.Replay == nil && gotOut[c.ID.SPI-0x2001] == 0:
				if c.Bytes != 100*c.Packets {
					t.Errorf("%s: %v: %d bytes for %d packets", round, c.ID, c.Bytes, c.Packets)
				}
				gotOut[c.ID.SPI-0x2001] = c.Packets
			default:
				t.Fatalf("%s: unexpected or repeated state %+v", round, c)
			}
		}
		if fmt.Sprint(gotIn) != fmt.Sprint(in) || fmt.Sprint(gotOut) != fmt.Sprint(out) {
			t.Fatalf("%s: inbound %v outbound %v, want %v %v", round, gotIn, gotOut, in, out)
		}
	}
	all := map[uint32]uint64{}
	for i := range uint32(pairs) {
		all[i] = uint64(100 + i)
	}
	// Installed and updated: each listed twice, exported once.
	check("first", 2*pairs, all, map[uint32]uint64{})
	check("quiet", 0, map[uint32]uint64{}, map[uint32]uint64{})
	update(2, 500)
	update(5, 600)
	send(3, 7)
	check("two changed, one sent", 3, map[uint32]uint64{2: 500, 5: 600}, map[uint32]uint64{3: 7})
	send(3, 1)
	check("one sent", 1, map[uint32]uint64{}, map[uint32]uint64{3: 8})
	check("quiet again", 0, map[uint32]uint64{}, map[uint32]uint64{})
}
