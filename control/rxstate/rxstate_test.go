package rxstate

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
)

func TestSaveLoadRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	if s, err := Load(path); err != nil || len(s.Records) != 0 || s.Clean {
		t.Fatalf("missing file: %+v, %v", s, err)
	}
	w, _ := esp.NewReplayWindow(128, false)
	for _, seq := range []uint64{1, 2, 5, 130, 129} {
		w.Update(seq)
	}
	rs := w.Export()
	want := &Snapshot{Clean: true, Records: []Record{
		{Key: seqstore.Key{1}, Binding: netip.MustParseAddrPort("192.0.2.10:40000"), Replay: &rs, Packets: 5, Bytes: 500, Created: 1764700000123456789},
		{Key: seqstore.Key{2}, Binding: netip.MustParseAddrPort("[2001:db8::1]:4500"), Packets: 1 << 40},
		{Key: seqstore.Key{3}, Replay: &esp.ReplayState{Top: 0, Bitmap: []uint64{0}}},
	}}
	if err := Save(path, want); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip\n got %+v\nwant %+v", got, want)
	}
	// The restored window rejects what the saved one had seen.
	w2, _ := esp.NewReplayWindow(128, false)
	if err := w2.Import(*got.Records[0].Replay); err != nil {
		t.Fatal(err)
	}
	for _, seq := range []uint32{5, 129, 130} {
		if _, r := w2.Check(seq); r != esp.ReasonReplay {
			t.Fatalf("restored window accepts %d (%v)", seq, r)
		}
	}
	if _, r := w2.Check(6); r != esp.ReasonNone {
		t.Fatalf("restored window rejects the unseen 6: %v", r)
	}
	Distrust(got.Records[0].Replay)
	w3, _ := esp.NewReplayWindow(128, false)
	w3.Import(*got.Records[0].Replay)
	if _, r := w3.Check(6); r != esp.ReasonReplay {
		t.Fatalf("distrusted window accepts 6: %v", r)
	}
	if _, r := w3.Check(131); r != esp.ReasonNone {
		t.Fatalf("distrusted window rejects 131: %v", r)
	}
}

// Every truncation and every flipped byte of a snapshot is refused; a
// snapshot is never half-applied.
func TestCorruptRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rx.state")
	rs := esp.ReplayState{Top: 77, Bitmap: []uint64{0xff, 1}}
	if err := Save(path, &Snapshot{Records: []Record{{Key: seqstore.Key{9}, Binding: netip.MustParseAddrPort("192.0.2.10:4500"), Replay: &rs}}}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	for n := 0; n < len(b); n++ {
		if _, err := Decode(b[:n]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d: %v", n, err)
		}
	}
	for i := range b {
		c := append([]byte(nil), b...)
		c[i] ^= 0x40
		if _, err := Decode(c); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	rs := esp.ReplayState{Top: 77, Bitmap: []uint64{0xff, 1}}
	dir := f.TempDir()
	Save(filepath.Join(dir, "s"), &Snapshot{Records: []Record{{Key: seqstore.Key{9}, Binding: netip.MustParseAddrPort("192.0.2.10:4500"), Replay: &rs}}})
	b, _ := os.ReadFile(filepath.Join(dir, "s"))
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, gen, err := decode(b)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to the same bytes (a version-2
		// file re-encodes as version 3, to the same snapshot).
		again, err := encode(s, gen)
		if err != nil {
			t.Fatal(err)
		}
		if string(b[:8]) == magicV2 {
			s2, _, err := decode(again)
			if err != nil || !reflect.DeepEqual(s, s2) {
				t.Fatalf("version 2 re-encoded as 3: %v", err)
			}
			return
		}
		if string(again) != string(b) {
			t.Fatalf("re-encoding differs")
		}
	})
}

// A version-2 file (written by the previous release: no generation, no
// identity tags, no journal) is read as it was, and a journal beside it
// is not applied.
func TestLoadVersion2(t *testing.T) {
	rs := esp.ReplayState{Top: 300, Bitmap: []uint64{0xf0f0, 3}}
	want := &Snapshot{Clean: true, Records: []Record{
		{Key: seqstore.Key{7}, Binding: netip.MustParseAddrPort("192.0.2.10:40000"), Replay: &rs, Packets: 5, Bytes: 500, Created: 99},
		{Key: seqstore.Key{8}, Packets: 1},
	}}
	// The version-2 layout, written out field by field.
	b := []byte(magicV2)
	b = binary.LittleEndian.AppendUint32(b, 1)
	b = binary.LittleEndian.AppendUint32(b, 2)
	for _, r := range want.Records {
		b = append(b, r.Key[:]...)
		b = appendBinding(b, r.Binding)
		b = binary.LittleEndian.AppendUint64(b, r.Packets)
		b = binary.LittleEndian.AppendUint64(b, r.Bytes)
		b = binary.LittleEndian.AppendUint64(b, uint64(r.Created))
		if r.Replay == nil {
			b = append(b, 0)
			continue
		}
		b = append(b, 1)
		b, _ = appendReplay(b, r.Replay)
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	path := filepath.Join(t.TempDir(), "rx.state")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(JournalPath(path), journalHeaderFor(0, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("version 2\n got %+v\nwant %+v", got, want)
	}
}
