package worker

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

func newEntry(t *testing.T, spi uint32, dir Direction) *Slot {
	t.Helper()
	window := 0
	if dir == Inbound {
		window = 1024
	}
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: make([]byte, 20), ReplayWindow: window, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	return &Slot{SA: s, Dir: dir, Binding: NewBinding(Peer{})}
}

// withSel is e after SetSelectors(innerPeer, core), for tests that
// build slots as literals.
func withSel(e *Slot, innerPeer netip.Prefix, core netip.Addr) *Slot {
	e.SetSelectors(innerPeer, core)
	return e
}

// A replacing install with Inherit continues the old entry's sequence
// counter, replay window and counters; without Inherit, or for another SPI
// or direction, it starts fresh.
func TestApplyInherit(t *testing.T) {
	w := &Worker{}
	old := newEntry(t, 0x2001, Outbound)
	old.SA.SetNextSeq(4242)
	old.Counters.Packets.Store(4241)
	w.apply([]Command{{Index: 3, Entry: old}})
	if w.pipe.table[3] != old || old.index != 3 {
		t.Fatal("install did not land at index 3")
	}

	repl := newEntry(t, 0x2001, Outbound)
	w.apply([]Command{{Index: 3, Entry: repl, Inherit: true}})
	if repl.SA.NextSeq() != 4242 || repl.Counters.Packets.Load() != 4241 {
		t.Fatalf("inherited next seq %d packets %d, want 4242 and 4241", repl.SA.NextSeq(), repl.Counters.Packets.Load())
	}

	in := newEntry(t, 0x1001, Inbound)
	in.SA.Replay().Update(900)
	w.apply([]Command{{Index: 4, Entry: in}})
	in2 := newEntry(t, 0x1001, Inbound)
	w.apply([]Command{{Index: 4, Entry: in2, Inherit: true}})
	if in2.SA.Replay().Top() != 900 {
		t.Fatalf("inherited window top %d, want 900", in2.SA.Replay().Top())
	}

	fresh := newEntry(t, 0x2001, Outbound)
	w.apply([]Command{{Index: 3, Entry: fresh}})
	other := newEntry(t, 0x2002, Outbound)
	w.apply([]Command{{Index: 3, Entry: other, Inherit: true}})
	if fresh.SA.NextSeq() != 1 || other.SA.NextSeq() != 1 {
		t.Fatalf("state leaked: next %d and %d, want 1 and 1", fresh.SA.NextSeq(), other.SA.NextSeq())
	}

	done := make(chan struct{})
	w.apply([]Command{{Index: 3}, {Index: 99}, {Index: ^uint32(0), Done: done}})
	if w.pipe.table[3] != nil {
		t.Fatal("remove left the entry")
	}
	select {
	case <-done:
	default:
		t.Fatal("Done not closed")
	}
}

// A 3000-byte outer IPv4 packet on a 1500-byte MTU leaves as three
// fragments that reassemble to the original: one ID, MF on all but the
// last, 8-byte-aligned offsets, valid header checksums. With no spare
// frame the packet is refused whole.
func TestFragment4(t *testing.T) {
	u, err := xsk.New(xsk.Config{FrameCount: 64, FillSize: 64, CompletionSize: 64, RxSize: 64, TxSize: 64, PoolSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	pool := u.NewPool()
	defer pool.Close()
	f := fragmenter{mtu: 1500, stride: 1, pool: pool, mem: u, rxOff: uint64(u.RxOffset())}

	var addr [1]uint64
	if pool.Get(addr[:]) != 1 {
		t.Fatal("no frame")
	}
	d := xsk.Desc{Addr: addr[0] + uint64(u.RxOffset()), Len: 14 + 3000}
	frame := u.Frame(d.Addr)[u.RxOffset():]
	eth := []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 8, 0}
	copy(frame, eth)
	payload := make([]byte, 3000-28)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	copy(frame[14+28:], payload)
	o := esp.Outer{Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("192.0.2.10"), Encap: true, SrcPort: 4500, DstPort: 4500, ID: f.nextIPID()}
	if _, err := esp.PutOuter(frame[:14+3000], 14+28, 14+3000, &o); err != nil {
		t.Fatal(err)
	}
	orig := append([]byte(nil), frame[14:14+3000]...)

	tx, ok := f.fragment4(d, nil)
	if !ok || len(tx) != 3 {
		t.Fatalf("fragment4: ok %v, %d fragments; want 3", ok, len(tx))
	}
	var re []byte
	for i, fd := range tx {
		fr := u.Frame(fd.Addr)[fd.Addr-u.FrameBase(fd.Addr):][:fd.Len]
		if !bytes.Equal(fr[:14], eth) {
			t.Fatalf("fragment %d Ethernet %x", i, fr[:14])
		}
		h := fr[14:34]
		if pkt.Checksum(h) != 0 {
			t.Fatalf("fragment %d header checksum bad", i)
		}
		if binary.BigEndian.Uint16(h[4:]) != o.ID || o.ID == 0 {
			t.Fatalf("fragment %d id %#x, want %#x", i, binary.BigEndian.Uint16(h[4:]), o.ID)
		}
		ff := binary.BigEndian.Uint16(h[6:])
		if mf := ff&0x2000 != 0; mf != (i < 2) || ff&0x4000 != 0 {
			t.Fatalf("fragment %d flags %#x", i, ff)
		}
		if off := int(ff&0x1fff) * 8; off != len(re) {
			t.Fatalf("fragment %d offset %d, want %d", i, off, len(re))
		}
		if tot := int(binary.BigEndian.Uint16(h[2:])); tot != len(fr)-14 || tot > 1500 {
			t.Fatalf("fragment %d total length %d for %d bytes", i, tot, len(fr)-14)
		}
		re = append(re, fr[34:]...)
	}
	if !bytes.Equal(re, orig[20:]) {
		t.Fatal("fragments do not reassemble to the original payload")
	}

	// No spare frames: refused whole, nothing taken.
	var all [64]uint64
	n := pool.Get(all[:])
	before := pool.Len()
	if _, ok := f.fragment4(d, nil); ok {
		t.Fatal("fragmented without spare frames")
	}
	if pool.Len() != before {
		t.Fatalf("pool %d after a refused split, want %d", pool.Len(), before)
	}
	pool.Put(all[:n])
}

// IP IDs skip zero, never repeat within a cycle, and stay in their
// worker's residue class, also after the 16-bit wrap (65536 is not a
// multiple of 3).
func TestIPIDPartition(t *testing.T) {
	const workers = 3
	per := 65536 / workers
	var fs [workers]fragmenter
	for w := range fs {
		fs[w] = fragmenter{stride: workers, worker: uint16(w)}
	}
	seen := map[uint16]bool{}
	for i := 0; i < 3*per; i++ {
		for w := range fs {
			id := fs[w].nextIPID()
			if id == 0 {
				t.Fatal("zero IP ID")
			}
			if int(id)%workers != w {
				t.Fatalf("worker %d handed out id %d (call %d)", w, id, i)
			}
			if i < per-1 {
				if seen[id] {
					t.Fatalf("id %d reused within one cycle", id)
				}
				seen[id] = true
			}
		}
	}
}
