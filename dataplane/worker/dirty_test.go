package worker

import (
	"fmt"
	"runtime"
	"slices"
	"testing"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// The dirty list holds an inbound slot once from its install or its first
// authenticated packet, and an outbound one from its first sealed packet,
// until a Dirty command takes it: a failed packet does not list it, a
// quiet SA is never handed out again, and a second packet before the
// export does not list it twice.
func TestDirtyList(t *testing.T) {
	f := newPipeFixture(t)
	w := &Worker{pipe: *f.p}
	w.pipe.table = nil
	w.apply([]Command{{Index: 0, Entry: f.in}, {Index: 1, Entry: f.out}})
	take := func() []uint32 {
		var got []uint32
		w.apply([]Command{{Index: ^uint32(0), Dirty: func(table []*Slot, slots []uint32) {
			got = append(got, slots...)
		}}})
		return got
	}
	if got := take(); !slices.Equal(got, []uint32{0}) {
		t.Fatalf("after install: dirty %v, want [0] (the inbound SA only)", got)
	}
	if got := take(); len(got) != 0 {
		t.Fatalf("nothing happened: dirty %v", got)
	}
	f.p = &w.pipe // the fixture's frames go through the worker's pipeline
	phone := mustESP(t, pipeSPIIn, 0)
	req := pkt.UDP4(pipeInner, pipeCore, []byte("REGISTER sip:ims"))
	bad := f.espFrame(phone, req, pipePhHW, 4500)
	f.u.Packet(bad)[bad.Len-1] ^= 1
	if tx, _ := w.pipe.decap([]xsk.Desc{bad}, nil, nil); len(tx) != 0 {
		t.Fatal("a bad ICV was forwarded")
	}
	if got := take(); len(got) != 0 {
		t.Fatalf("after a failed packet: dirty %v", got)
	}
	rx := []xsk.Desc{f.espFrame(phone, req, pipePhHW, 4500), f.espFrame(phone, req, pipePhHW, 4500)}
	if tx, _ := w.pipe.decap(rx, nil, nil); len(tx) != 2 {
		t.Fatalf("forwarded %d of 2", len(tx))
	}
	if got := take(); !slices.Equal(got, []uint32{0}) {
		t.Fatalf("after two packets: dirty %v, want [0] once", got)
	}
	// A sealed packet moves the outbound SA's counters: listed once too.
	resp := pkt.UDP4(pipeCore, pipeInner, []byte("SIP/2.0 200 OK"))
	if tx, _ := w.pipe.encap([]xsk.Desc{f.clearFrame(1, resp), f.clearFrame(1, resp)}, nil, nil); len(tx) != 2 {
		t.Fatalf("sealed %d of 2", len(tx))
	}
	if got := take(); !slices.Equal(got, []uint32{1}) {
		t.Fatalf("after two sealed packets: dirty %v, want [1] once", got)
	}
}

// BenchmarkSnapshotWorkerTime is the worker thread's share of one
// replay-window snapshot (the gateway takes one a second) with n inbound
// SAs installed: "sweep" exports every window, as the snapshot did before
// the dirty list; "active1pct" exports the 1% of windows that took a
// packet since the last snapshot; "idle" is a snapshot with none. One op
// is one snapshot, in DirtyChunk-sized commands.
func BenchmarkSnapshotWorkerTime(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		p := &pipeline{table: make([]*Slot, n)}
		for i := range p.table {
			s, err := esp.NewTransform(esp.Config{SPI: uint32(i + 1), Proposal: esp.AES128GCM16, EncKey: pipeKey, Mode: esp.ModeTunnel, ReplayWindow: 64})
			if err != nil {
				b.Fatal(err)
			}
			s.Replay().Update(uint64(i%1000 + 1))
			p.table[i] = &Slot{SA: s, Dir: Inbound, index: uint32(i)}
		}
		sink := make([]esp.ReplayState, 0, DirtyChunk)
		export := func(table []*Slot, slots []uint32) {
			sink = sink[:0]
			for _, i := range slots {
				sink = append(sink, table[i].SA.Replay().Export())
			}
		}
		b.Run(fmt.Sprintf("sweep/%d", n), func(b *testing.B) {
			for range b.N {
				for lo := 0; lo < n; lo += DirtyChunk {
					sink = sink[:0]
					for _, e := range p.table[lo:min(n, lo+DirtyChunk)] {
						sink = append(sink, e.SA.Replay().Export())
					}
				}
			}
		})
		for _, c := range []struct {
			name   string
			active int
		}{{"active1pct", n / 100}, {"idle", 0}} {
			b.Run(fmt.Sprintf("%s/%d", c.name, n), func(b *testing.B) {
				for it := range b.N {
					b.StopTimer()
					for k := range c.active {
						e := p.table[(it*7919+k*101)%n]
						if e.marks&markDirty == 0 {
							p.markDirty(e)
						}
					}
					b.StartTimer()
					for len(p.dirty) > 0 {
						p.takeDirty(export)
					}
					p.takeDirty(export)
				}
			})
		}
		p.table = nil
		runtime.GC()
	}
}
