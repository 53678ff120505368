package neigh

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/xesp/xesp/lab/netns"
)

// loResolver is a Resolver in a fresh namespace serving its loopback (no
// traffic needed) with n static entries 10.x.y.z, as a gateway's snapshot
// of n destinations would look.
func loResolver(tb testing.TB, n int) (*Resolver, []netip.Addr) {
	tb.Helper()
	ns := netns.ForTest(tb, "ngx")
	var r *Resolver
	if err := ns.Do(func() (err error) {
		r, err = New(Config{Ifindexes: []int{1}})
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { r.Close() })
	addrs := make([]netip.Addr, n)
	for i := range addrs {
		addrs[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		r.static[key(addrs[i])] = [6]byte{2, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)}
	}
	for s := range r.dirty {
		r.dirty[s] = true
	}
	r.publish()
	return r, addrs
}

// The worker-side calls never allocate.
func TestHotPathAllocs(t *testing.T) {
	r, addrs := loResolver(t, 1000)
	hit, miss := addrs[7], netip.MustParseAddr("2001:db8::1")
	if mac, ok := r.Lookup(hit); !ok || mac != [6]byte{2, 0, 0, 0, 0, 7} {
		t.Fatalf("Lookup(%s) = %x %v", hit, mac, ok)
	}
	for name, f := range map[string]func(){
		"Lookup hit":  func() { r.Lookup(hit) },
		"Lookup miss": func() { r.Lookup(miss) },
		"LookupOn":    func() { r.LookupOn(1, hit) },
		"Request":     func() { r.Request(miss) }, // queued once, then coalesced
	} {
		if n := testing.AllocsPerRun(1000, f); n != 0 {
			t.Errorf("%s: %v allocs per call", name, n)
		}
	}
}

// Random access over the whole table: with 100k entries most lookups miss
// the CPU caches, the worst case; a batch of one busy flow is the best.
func BenchmarkLookupHit(b *testing.B) {
	for _, n := range []int{16, 1000, 100000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			r, addrs := loResolver(b, n)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := r.Lookup(addrs[i]); !ok {
					b.Fatal("miss")
				}
				i = (i + 7919) % len(addrs)
			}
		})
	}
}

func BenchmarkLookupMiss(b *testing.B) {
	r, _ := loResolver(b, 100000)
	miss := [...]netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, ok := r.Lookup(miss[i&1]); ok {
			b.Fatal("hit")
		}
		i++
	}
}

func BenchmarkLookupHitParallel(b *testing.B) {
	r, addrs := loResolver(b, 100000)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			r.Lookup(addrs[i])
			i = (i + 7919) % len(addrs)
		}
	})
}

// A worker that keeps missing on one destination: the coalesced Request.
func BenchmarkRequestCoalesced(b *testing.B) {
	r, _ := loResolver(b, 0)
	dst := netip.MustParseAddr("192.0.2.1")
	r.Request(dst)
	b.ReportAllocs()
	for b.Loop() {
		r.Request(dst)
	}
}
