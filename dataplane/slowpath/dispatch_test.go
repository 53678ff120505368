package slowpath

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/dataplane/worker"
)

type discard struct{ n int }

func (d *discard) Inject(p []worker.SlowPacket) int { d.n += len(p); return len(p) }

func newDispatcherForTest(t testing.TB) (*dispatcher, []uint32) {
	t.Helper()
	d, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	var spis []uint32
	for i := range 2 {
		if _, err := d.Add(inSA(i)); err != nil {
			t.Fatal(err)
		}
		spis = append(spis, inSA(i).SPI)
	}
	s := &Server{o: Options{SAD: d, Workers: []Injector{&discard{}, &discard{}}, Batch: 16}}
	return s.newDispatcher(), spis
}

// The ESP path allocates nothing per packet: the arena is the only
// allocation, once per 256 KiB of ESP copied.
func TestDispatchDoesNotAllocatePerPacket(t *testing.T) {
	d, spis := newDispatcherForTest(t)
	pkts := [][]byte{espFor(spis[0], 200), espFor(spis[1], 200), espFor(0x4242, 200), {0xff}}
	src := netip.MustParseAddrPort("198.51.100.7:4500")
	allocs := testing.AllocsPerRun(1000, func() {
		for i := range 16 {
			d.classify(nil, pkts[i%len(pkts)], src, gw4)
		}
		d.flush()
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per batch of 16", allocs)
	}
	s := d.s.Stats()
	if s[ESPInjected] == 0 || s[NoSA] == 0 || s[Keepalive] == 0 {
		t.Fatalf("stats %v: the loop did not exercise every class", s)
	}
}

func BenchmarkDispatch(b *testing.B) {
	d, spis := newDispatcherForTest(b)
	p := espFor(spis[0], 1400)
	src := netip.MustParseAddrPort("198.51.100.7:4500")
	b.ReportAllocs()
	b.SetBytes(int64(len(p)))
	for i := 0; b.Loop(); i++ {
		d.classify(nil, p, src, gw4)
		if i%16 == 15 {
			d.flush()
		}
	}
}

func TestNewRejects(t *testing.T) {
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	lo := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	for name, o := range map[string]Options{
		"no address": {SAD: d, Workers: []Injector{&discard{}}},
		"no SAD":     {Addrs: lo, Workers: []Injector{&discard{}}},
		"no workers": {Addrs: lo, SAD: d},
		"bad port":   {Addrs: lo, SAD: d, Workers: []Injector{&discard{}}, Port: 70000},
	} {
		if s, err := New(o); err == nil {
			s.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}
