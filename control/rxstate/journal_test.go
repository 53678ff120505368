package rxstate

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
)

// model is the state a full snapshot would hold: one record per live SA.
type model map[seqstore.Key]Record

func (m model) snapshot() *Snapshot {
	s := &Snapshot{}
	for _, r := range m {
		s.Records = append(s.Records, r)
	}
	return s
}

// canonical is s's records sorted by key, encoded: two snapshots that
// restore alike have equal canonical bytes.
func canonical(t *testing.T, s *Snapshot) []byte {
	t.Helper()
	c := &Snapshot{Clean: s.Clean, Records: slices.Clone(s.Records)}
	slices.SortFunc(c.Records, func(a, b Record) int { return bytes.Compare(a.Key[:], b.Key[:]) })
	b, err := encode(c, 0)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sameState(t *testing.T, what string, got, want *Snapshot) {
	t.Helper()
	if g, w := canonical(t, got), canonical(t, want); !bytes.Equal(g, w) {
		t.Fatalf("%s: restore differs from the full snapshot's: %d records (clean %v) against %d (clean %v)",
			what, len(got.Records), got.Clean, len(want.Records), want.Clean)
	}
}

func window(r *rand.Rand) *esp.ReplayState {
	w := &esp.ReplayState{Top: r.Uint64N(1 << 40), Bitmap: make([]uint64, 17)}
	for i := range w.Bitmap {
		w.Bitmap[i] = r.Uint64()
	}
	return w
}

// churn applies one interval of random changes to m and journals them
// in b the way the gateway does: deletions, sets of the identity fields
// of SAs added, updated (new keys) or whose binding moved, then sets of
// windows and counters of SAs that carried traffic.
func churn(t *testing.T, r *rand.Rand, m model, ids *[]seqstore.Key, next *int, b *Batch) {
	t.Helper()
	ident := uint8(HasKey | HasBinding | HasCounters | HasCreated)
	for range 1 + r.IntN(40) {
		switch op := r.IntN(10); {
		case op < 2 || len(*ids) == 0: // add (sometimes an identity deleted before)
			var id seqstore.Key
			if len(*ids) > 0 && r.IntN(3) == 0 {
				id = (*ids)[r.IntN(len(*ids))]
				if _, live := m[id]; live {
					continue
				}
			} else {
				*next++
				id = seqstore.Key{0xa0, byte(*next), byte(*next >> 8)}
				*ids = append(*ids, id)
			}
			rec := Record{ID: id, Key: seqstore.Key{0x50, id[1], id[2], byte(r.IntN(2))}, Created: r.Int64()}
			if r.IntN(2) == 0 {
				rec.Binding = netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(r.IntN(250))}), uint16(r.IntN(65535)))
			}
			m[id] = rec
			if err := b.Set(&rec, ident); err != nil {
				t.Fatal(err)
			}
			if r.IntN(2) == 0 { // inbound: its first export
				rec.Replay = window(r)
				m[id] = rec
				if err := b.Set(&rec, HasReplay|HasCounters); err != nil {
					t.Fatal(err)
				}
			}
		default:
			id := (*ids)[r.IntN(len(*ids))]
			rec, live := m[id]
			if !live {
				continue
			}
			switch op {
			case 2: // delete
				delete(m, id)
				b.Delete(id)
			case 3: // update: new keys, window carried over
				rec.Key[5]++
				m[id] = rec
				if err := b.Set(&rec, ident); err != nil {
					t.Fatal(err)
				}
			case 4: // binding learnt
				rec.Binding = netip.AddrPortFrom(netip.MustParseAddr("2001:db8::7"), uint16(r.IntN(65535)))
				m[id] = rec
				if err := b.Set(&rec, ident); err != nil {
					t.Fatal(err)
				}
			default: // traffic: counters, and the window if inbound
				rec.Packets += 1 + r.Uint64N(100)
				rec.Bytes += 1 + r.Uint64N(10000)
				mask := uint8(HasCounters)
				if rec.Replay != nil {
					rec.Replay = window(r)
					mask |= HasReplay
				}
				m[id] = rec
				if err := b.Set(&rec, mask); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
}

// churned is a journal test's moving state: a model changed interval by
// interval (churn) and the journal that follows it.
type churned struct {
	r    *rand.Rand
	m    model
	ids  []seqstore.Key
	next int
	b    Batch
	j    *Journal
}

// newChurned churns a first interval into an empty model (the PCG seeds
// s1, s2), then opens the journal at path with that state as its base.
func newChurned(t *testing.T, path string, s1, s2 uint64) *churned {
	t.Helper()
	c := &churned{r: rand.New(rand.NewPCG(s1, s2)), m: model{}}
	churn(t, c.r, c.m, &c.ids, &c.next, &c.b)
	c.j = OpenJournal(path)
	t.Cleanup(func() { c.j.Close() })
	if err := c.j.Rebase(c.m.snapshot()); err != nil {
		t.Fatal(err)
	}
	return c
}

// appendInterval churns one more interval and appends it to the journal.
func (c *churned) appendInterval(t *testing.T) {
	t.Helper()
	c.b.Reset()
	churn(t, c.r, c.m, &c.ids, &c.next, &c.b)
	if err := c.j.Append(&c.b); err != nil {
		t.Fatal(err)
	}
}

// After each of many intervals of mixed changes (adds, deletions, SAs
// added again under a deleted identity, key updates, bindings, windows,
// counters), the base and journal restore exactly what a full snapshot
// of the same moment restores; compactions on the way change nothing.
func TestJournalRestoresAsFullSnapshot(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	c := newChurned(t, path, 13, 1)
	j, m := c.j, c.m
	j.Floor = 0
	compactions := 0
	for interval := range 200 {
		c.appendInterval(t)
		if j.Due() {
			if err := j.Compact(); err != nil {
				t.Fatal(err)
			}
			compactions++
		}
		got, err := Load(path)
		if err != nil {
			t.Fatal(err)
		}
		sameState(t, "interval "+string(rune('0'+interval%10)), got, m.snapshot())
	}
	if compactions < 3 {
		t.Fatalf("%d compactions in 200 intervals: the test did not exercise them", compactions)
	}
	t.Logf("%d SAs live of %d identities, %d compactions", len(m), len(c.ids), compactions)
}

// A crash while appending leaves a torn last record: whatever the length
// of the tail and whichever of its bytes is damaged, the state loads, and
// holds exactly the records written whole before it.
func TestJournalTornTailIgnored(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	c := newChurned(t, path, 7, 7)
	c.appendInterval(t)
	j, m, ids, b := c.j, c.m, c.ids, &c.b
	before := canonical(t, m.snapshot())
	// The last append: one window set, whole or torn.
	id := ids[0]
	rec := m[id]
	if _, live := m[id]; !live {
		rec = Record{ID: id, Key: seqstore.Key{1, 2, 3}}
		if err := b.Set(&rec, HasKey); err != nil {
			t.Fatal(err)
		}
	}
	rec.Replay = &esp.ReplayState{Top: 1 << 50, Bitmap: []uint64{1, 2, 3}}
	b.Reset()
	if err := b.Set(&rec, HasReplay|HasKey); err != nil {
		t.Fatal(err)
	}
	if err := j.Append(b); err != nil {
		t.Fatal(err)
	}
	m[id] = rec
	after := canonical(t, m.snapshot())
	jp := JournalPath(path)
	whole, err := os.ReadFile(jp)
	if err != nil {
		t.Fatal(err)
	}
	last := len(whole) - b.Bytes()
	load := func(what string, data []byte, want []byte) {
		t.Helper()
		if err := os.WriteFile(jp, data, 0o600); err != nil {
			t.Fatal(err)
		}
		s, info, err := load(path)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !bytes.Equal(canonical(t, s), want) {
			t.Fatalf("%s: loaded state is not the one before the torn record", what)
		}
		if s.Clean {
			t.Fatalf("%s: a journalled state loads as clean", what)
		}
		if !bytes.Equal(want, after) && info.TornBytes != int64(len(data)-last) {
			t.Fatalf("%s: %d torn bytes reported, want %d", what, info.TornBytes, len(data)-last)
		}
	}
	for n := last; n < len(whole); n++ {
		load("cut", whole[:n], before)
	}
	for i := last; i < len(whole); i++ {
		c := slices.Clone(whole)
		c[i] ^= 0x10
		load("flipped", c, before)
	}
	load("whole", whole, after)
	// Garbage after a whole journal (a torn append of a larger batch).
	load("garbage", append(slices.Clone(whole), 0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 5, 6), after)
}

// A deleted SA is not restored, whether the deletion is still in the
// journal or compacted; an SA added again under its identity (and the
// same keys) starts without the deleted one's window.
func TestJournalDeletionNotResurrected(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	id, key := seqstore.Key{0xaa}, seqstore.Key{0xbb}
	old := Record{ID: id, Key: key, Replay: &esp.ReplayState{Top: 900, Bitmap: []uint64{^uint64(0)}}, Packets: 9, Created: 5}
	other := Record{ID: seqstore.Key{0xcc}, Key: seqstore.Key{0xdd}, Packets: 1}
	j := OpenJournal(path)
	defer j.Close()
	if err := j.Rebase(&Snapshot{Records: []Record{old, other}}); err != nil {
		t.Fatal(err)
	}
	var b Batch
	b.Delete(id)
	if err := j.Append(&b); err != nil {
		t.Fatal(err)
	}
	want := &Snapshot{Records: []Record{other}}
	for _, step := range []string{"journalled", "compacted"} {
		got, err := Load(path)
		if err != nil {
			t.Fatal(err)
		}
		sameState(t, step, got, want)
		if err := j.Compact(); err != nil {
			t.Fatal(err)
		}
	}
	// Added again: identity fields only, its window not yet exported.
	again := Record{ID: id, Key: key, Created: 7}
	b.Reset()
	if err := b.Set(&again, HasKey|HasBinding|HasCounters|HasCreated); err != nil {
		t.Fatal(err)
	}
	if err := j.Append(&b); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	sameState(t, "added again", got, &Snapshot{Records: []Record{other, again}})
	// A delete and an add again in one batch, on a record with a window.
	b.Reset()
	withWin := again
	withWin.Replay = &esp.ReplayState{Top: 5, Bitmap: []uint64{1}}
	b.Set(&withWin, HasReplay)
	b.Delete(id)
	b.Set(&again, HasKey|HasBinding|HasCounters|HasCreated)
	if err := j.Append(&b); err != nil {
		t.Fatal(err)
	}
	got, _ = Load(path)
	sameState(t, "deleted and added in one batch", got, &Snapshot{Records: []Record{other, again}})
}

// A crash anywhere in a compaction restores the same state: before the
// new base is renamed into place (the old base and journal), and after it
// but before the new journal (the new base and the old journal, stale).
func TestJournalCrashMidCompaction(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	c := newChurned(t, path, 3, 4)
	for range 5 {
		c.appendInterval(t)
	}
	want := c.m.snapshot()
	merged, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	// Crash before the rename: a partial new base beside the old one.
	if err := os.WriteFile(path+".tmp", []byte("XESPRX\x00\x03 half a base"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	sameState(t, "new base not yet renamed", got, want)
	// Crash after the rename, before the journal was restarted.
	oldJournal, err := os.ReadFile(JournalPath(path))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeBase(path, merged); err != nil {
		t.Fatal(err)
	}
	if cur, _ := os.ReadFile(JournalPath(path)); !bytes.Equal(cur, oldJournal) {
		t.Fatal("writing the base touched the journal")
	}
	got, info, err := load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !info.StaleJournal {
		t.Fatal("the old journal was not recognised as stale against the new base")
	}
	sameState(t, "new base, old journal", got, want)
	// A clean base written at shutdown restores clean, with no journal.
	want.Clean = true
	if err := Save(path, want); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(JournalPath(path)); !os.IsNotExist(err) {
		t.Fatalf("journal after a clean save: %v", err)
	}
	got, _ = Load(path)
	sameState(t, "clean", got, want)
}

// A failed append keeps its records: the next append (or a compaction)
// writes them, so no window exported in that interval is lost.
func TestJournalFailedAppendKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	j := OpenJournal(path)
	defer j.Close()
	if err := j.Rebase(&Snapshot{}); err != nil {
		t.Fatal(err)
	}
	first := Record{ID: seqstore.Key{9}, Key: seqstore.Key{8}}
	var b Batch
	b.Set(&first, HasKey)
	if err := j.Append(&b); err != nil { // starts the journal
		t.Fatal(err)
	}
	rec := Record{ID: seqstore.Key{1}, Key: seqstore.Key{2}, Replay: &esp.ReplayState{Top: 77, Bitmap: []uint64{3}}}
	b.Reset()
	b.Set(&rec, HasKey|HasReplay)
	f := j.f
	ro, err := os.Open(JournalPath(path)) // a descriptor writes fail on
	if err != nil {
		t.Fatal(err)
	}
	j.f = ro
	if err := j.Append(&b); err == nil {
		t.Fatal("append on a read-only descriptor succeeded")
	}
	ro.Close()
	j.f = f
	b.Reset()
	if err := j.Append(&b); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	sameState(t, "after the retried append", got, &Snapshot{Records: []Record{first, rec}})
}

// A sweep (the gateway's answer to a change-feed overrun) keeps exactly
// the records set between its marks, with the fields they did not set
// (windows) as they were.
func TestJournalSweep(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	win := &esp.ReplayState{Top: 42, Bitmap: []uint64{7}}
	a := Record{ID: seqstore.Key{1}, Key: seqstore.Key{11}, Replay: win, Packets: 3}
	bRec := Record{ID: seqstore.Key{2}, Key: seqstore.Key{12}}
	c := Record{ID: seqstore.Key{3}, Key: seqstore.Key{13}, Replay: win}
	j := OpenJournal(path)
	defer j.Close()
	if err := j.Rebase(&Snapshot{Records: []Record{a, bRec, c}}); err != nil {
		t.Fatal(err)
	}
	var b Batch
	b.SweepBegin()
	a.Packets = 4
	if err := b.Set(&Record{ID: a.ID, Key: a.Key, Packets: 4}, HasKey|HasBinding|HasCounters|HasCreated); err != nil {
		t.Fatal(err)
	}
	d := Record{ID: seqstore.Key{4}, Key: seqstore.Key{14}}
	if err := b.Set(&d, HasKey|HasBinding|HasCounters|HasCreated); err != nil {
		t.Fatal(err)
	}
	b.SweepEnd()
	if err := j.Append(&b); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	sameState(t, "swept", got, &Snapshot{Records: []Record{a, d}})
}

// A stop overtaking a periodic rewrite of the base (RebaseContext,
// CompactContext with its context cancelled) leaves the state on disk as
// it was: the old base and its journal restore the same records, and the
// journal keeps what was pending for the next compaction.
func TestRebaseCancelledKeepsState(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	path := filepath.Join(t.TempDir(), "rx.state")
	m, ids, next := model{}, []seqstore.Key(nil), 0
	j := OpenJournal(path)
	var b Batch
	churn(t, r, m, &ids, &next, &b)
	if err := j.Rebase(m.snapshot()); err != nil {
		t.Fatal(err)
	}
	b.Reset()
	churn(t, r, m, &ids, &next, &b)
	if err := j.Append(&b); err != nil {
		t.Fatal(err)
	}
	want := m.snapshot()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := j.CompactContext(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("compact with a cancelled context: %v", err)
	}
	if err := j.RebaseContext(ctx, &Snapshot{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("rebase with a cancelled context: %v", err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	sameState(t, "after cancelled rewrites", got, want)
}
