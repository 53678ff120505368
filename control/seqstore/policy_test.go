package seqstore

import (
	"math"
	"testing"
)

func TestStartSeq(t *testing.T) {
	for _, tc := range []struct{ persisted, want uint64 }{
		{0, 1}, {1, 1}, {2, 2}, {1 << 20, 1 << 20}, {math.MaxUint64, math.MaxUint64},
	} {
		if got := StartSeq(tc.persisted); got != tc.want {
			t.Errorf("StartSeq(%d) = %d, want %d", tc.persisted, got, tc.want)
		}
	}
}

func TestNextBlock(t *testing.T) {
	const b = 1000
	for _, tc := range []struct {
		name       string
		next, high uint64
		wantHigh   uint64
		wantExtend bool
	}{
		{name: "install, fresh key", next: 1, high: 0, wantHigh: 1 + b, wantExtend: true},
		{name: "install above persisted mark", next: 5000, high: 0, wantHigh: 6000, wantExtend: true},
		{name: "just reserved", next: 1, high: 1001, wantHigh: 1001},
		{name: "more than half left", next: 500, high: 1001, wantHigh: 1001},
		{name: "exactly half left", next: 501, high: 1001, wantHigh: 2001, wantExtend: true},
		{name: "at the mark (stalled)", next: 1001, high: 1001, wantHigh: 2001, wantExtend: true},
		{name: "past the mark", next: 1500, high: 1001, wantHigh: 2500, wantExtend: true},
		{name: "saturates", next: math.MaxUint64 - 10, high: math.MaxUint64 - 5, wantHigh: math.MaxUint64, wantExtend: true},
		{name: "saturated", next: math.MaxUint64 - 1, high: math.MaxUint64, wantHigh: math.MaxUint64},
	} {
		got, ext := NextBlock(tc.next, tc.high, b)
		if got != tc.wantHigh || ext != tc.wantExtend {
			t.Errorf("%s: NextBlock(%d, %d, %d) = %d, %v; want %d, %v",
				tc.name, tc.next, tc.high, b, got, ext, tc.wantHigh, tc.wantExtend)
		}
		if ext && got <= tc.high {
			t.Errorf("%s: extension to %d does not raise %d", tc.name, got, tc.high)
		}
	}
}

// Drives the policy as the manager will, against a real store: an SA sends,
// the manager extends at the midpoint, the gateway "restarts" (reopen) and
// the SA resumes. No sequence number may be sent twice or at/above the
// durable mark.
func TestPolicyAcrossRestarts(t *testing.T) {
	s := open(t, t.TempDir(), Options{Block: 64})
	k := testKey(7)
	sent := map[uint64]bool{}
	for restart := range 5 {
		persisted, _ := s.High(k)
		next := StartSeq(persisted)
		high, _ := s.High(k)
		for range 300 {
			if h, ext := NextBlock(next, high, s.Block()); ext {
				if err := s.Reserve([]Reservation{{k, h}}); err != nil {
					t.Fatal(err)
				}
				high = h
			}
			durable, _ := s.High(k)
			if next >= durable {
				t.Fatalf("restart %d: would send %d at/above durable mark %d", restart, next, durable)
			}
			if sent[next] {
				t.Fatalf("restart %d: sequence %d sent twice", restart, next)
			}
			sent[next] = true
			next++
		}
		s = reopen(t, s, Options{Block: 64})
	}
}
