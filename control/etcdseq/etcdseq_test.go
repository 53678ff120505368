package etcdseq

import (
	"context"
	"errors"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/lab/etcdtest"
)

func open(t *testing.T, srv *etcdtest.Server, block uint64) *Store {
	t.Helper()
	s, err := Open(context.Background(), srv.Client(t), Options{Prefix: "/fleet", Block: block, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var peer = netip.MustParseAddrPort("198.51.100.7:4500")

// Two gateways derive the same record key for the same SA: the secret is
// the fleet's, made once.
func TestSharedSecretSameKeys(t *testing.T) {
	srv := etcdtest.Start(t)
	a, b := open(t, srv, 100), open(t, srv, 100)
	ka := a.KeyFor("out", 0x2001, peer, "aes128gcm16", []byte("key-material-0123456"), nil)
	kb := b.KeyFor("out", 0x2001, peer, "aes128gcm16", []byte("key-material-0123456"), nil)
	if ka != kb {
		t.Fatalf("gateways disagree on the key: %s vs %s", ka, kb)
	}
	if kc := b.KeyFor("out", 0x2001, peer, "aes128gcm16", []byte("key-material-0123457"), nil); kc == ka {
		t.Fatal("different key material, same record key")
	}
	// A secret that is not 32 bytes is refused, never replaced.
	cli := srv.Client(t)
	if _, err := cli.Put(context.Background(), "/bad/seq/secret", "short"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), cli, Options{Prefix: "/bad"}); err == nil {
		t.Fatal("Open accepted a damaged secret")
	}
	r, err := cli.Get(context.Background(), "/bad/seq/secret")
	if err != nil || string(r.Kvs[0].Value) != "short" {
		t.Fatalf("damaged secret was rewritten: %v %q", err, r.Kvs[0].Value)
	}
	// A deleted secret is not made anew while marks named by the old one
	// exist.
	k := a.KeyFor("out", 7, peer, "aes128gcm16", []byte("k"), nil)
	a.High(k)
	if err := a.Reserve([]seqstore.Reservation{{Key: k, High: 100}}); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Delete(context.Background(), "/fleet/seq/secret"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), cli, Options{Prefix: "/fleet"}); err == nil || !strings.Contains(err.Error(), "marks exist") {
		t.Fatalf("Open after the secret was deleted: %v", err)
	}
}

// Both gateways read the same mark and ask for the range above it: one
// gets it, the other is refused; and the loser, once it has reserved
// above, fences the winner's next extension.
func TestSecondReserverLoses(t *testing.T) {
	srv := etcdtest.Start(t)
	a, b := open(t, srv, 100), open(t, srv, 100)
	k := a.KeyFor("out", 1, peer, "aes128gcm16", []byte("k"), nil)
	if h, ok := a.High(k); h != 0 || ok {
		t.Fatalf("fresh key: High %d %v", h, ok)
	}
	if h, ok := b.High(k); h != 0 || ok {
		t.Fatalf("fresh key: High %d %v", h, ok)
	}
	if err := a.Reserve([]seqstore.Reservation{{Key: k, High: 101}}); err != nil {
		t.Fatal(err)
	}
	err := b.Reserve([]seqstore.Reservation{{Key: k, High: 101}})
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("second reservation of [1,101): %v, want ErrConflict", err)
	}
	// b takes the SA over: it reads the mark a left and reserves above.
	if h, ok := b.High(k); h != 101 || !ok {
		t.Fatalf("takeover reads %d %v, want 101", h, ok)
	}
	if err := b.Reserve([]seqstore.Reservation{{Key: k, High: 201}}); err != nil {
		t.Fatal(err)
	}
	// a still thinks it holds up to 101 and extends: fenced.
	if err := a.Reserve([]seqstore.Reservation{{Key: k, High: 201}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale owner's extension: %v, want ErrConflict", err)
	}
	// Retrying does not launder it: the refusal is not a new base.
	if err := a.Reserve([]seqstore.Reservation{{Key: k, High: 251}}); !errors.Is(err, seqstore.ErrFenced) {
		t.Fatalf("stale owner's second try: %v, want ErrFenced", err)
	}
	if h, _ := b.High(k); h != 201 {
		t.Fatalf("mark %d after the fenced extensions, want 201", h)
	}
}

// A mark read for an install that then failed is not what a later
// extension builds on: the extension of the SA still running on its old
// grant must be refused once another gateway reserved past that grant.
func TestReadIsNotAnExtensionBase(t *testing.T) {
	srv := etcdtest.Start(t)
	a, b := open(t, srv, 100), open(t, srv, 100)
	k := a.KeyFor("out", 1, peer, "aes128gcm16", []byte("k"), nil)
	other := a.KeyFor("out", 2, peer, "aes128gcm16", []byte("k"), nil)
	a.High(k)
	if err := a.Reserve([]seqstore.Reservation{{Key: k, High: 101}}); err != nil {
		t.Fatal(err)
	}
	b.High(k)
	if err := b.Reserve([]seqstore.Reservation{{Key: k, High: 201}}); err != nil {
		t.Fatal(err)
	}
	// a reads the new mark for a re-install that does not happen (its
	// batch reserves something else), then its old slot, still limited
	// at 101, asks for the next block.
	if h, _ := a.High(k); h != 201 {
		t.Fatalf("High %d, want 201", h)
	}
	a.High(other)
	if err := a.Reserve([]seqstore.Reservation{{Key: other, High: 101}}); err != nil {
		t.Fatal(err)
	}
	if err := a.Reserve([]seqstore.Reservation{{Key: k, High: 251}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("extension on the old grant after another gateway's: %v, want ErrConflict", err)
	}
}

// Many gateways race to reserve blocks of the same keys; every granted
// range must be disjoint from every other, and together they must tile
// [1, final mark) with no gap.
func TestConcurrentReservationsDisjoint(t *testing.T) {
	srv := etcdtest.Start(t)
	const gateways, rounds, block = 4, 40, 10
	stores := make([]*Store, gateways)
	for i := range stores {
		stores[i] = open(t, srv, block)
	}
	keys := []seqstore.Key{
		stores[0].KeyFor("out", 1, peer, "aes128gcm16", []byte("a"), nil),
		stores[0].KeyFor("out", 2, peer, "aes128gcm16", []byte("b"), nil),
	}
	type grant struct{ lo, hi uint64 }
	var mu sync.Mutex
	granted := map[seqstore.Key][]grant{}
	conflicts := 0
	var wg sync.WaitGroup
	for _, s := range stores {
		wg.Go(func() {
			for range rounds {
				high, _ := s.High(keys[0])
				h2, _ := s.High(keys[1])
				lo, lo2 := seqstore.StartSeq(high), seqstore.StartSeq(h2)
				err := s.Reserve([]seqstore.Reservation{{Key: keys[0], High: lo + block}, {Key: keys[1], High: lo2 + block}})
				mu.Lock()
				switch {
				case err == nil:
					granted[keys[0]] = append(granted[keys[0]], grant{lo, lo + block})
					granted[keys[1]] = append(granted[keys[1]], grant{lo2, lo2 + block})
				case errors.Is(err, ErrConflict):
					conflicts++
				default:
					t.Error(err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for _, k := range keys {
		g := granted[k]
		sort.Slice(g, func(i, j int) bool { return g[i].lo < g[j].lo })
		next := uint64(1)
		for _, r := range g {
			if r.lo != next {
				t.Fatalf("key %s: range [%d,%d) after %d: overlap or gap", k, r.lo, r.hi, next)
			}
			next = r.hi
		}
		if h, _ := stores[0].High(k); h != next {
			t.Fatalf("key %s: mark %d, grants end at %d", k, h, next)
		}
		t.Logf("key %s: %d grants tile [1,%d)", k, len(g), next)
	}
	t.Logf("%d conflicts refused", conflicts)
	if len(granted[keys[0]]) == 0 {
		t.Fatal("nothing was granted")
	}
}

// With etcd down a reservation fails (the SA would stall, not reuse), the
// mark survives etcd's crash, and the same store carries on once it is
// back.
func TestEtcdDownAndBack(t *testing.T) {
	srv := etcdtest.Start(t)
	s := open(t, srv, 100)
	k := s.KeyFor("out", 9, peer, "aes128gcm16", []byte("k"), nil)
	s.High(k)
	if err := s.Reserve([]seqstore.Reservation{{Key: k, High: 101}}); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	s.opts.Timeout = 500 * time.Millisecond
	if h, ok := s.High(k); h != 101 || !ok {
		t.Fatalf("etcd down: High %d %v, want the last seen 101", h, ok)
	}
	if err := s.Reserve([]seqstore.Reservation{{Key: k, High: 201}}); err == nil {
		t.Fatal("reservation succeeded with etcd down")
	}
	srv.Start()
	s.opts.Timeout = 5 * time.Second
	if h, _ := s.High(k); h != 101 {
		t.Fatalf("after etcd restart the mark is %d, want 101", h)
	}
	if err := s.Reserve([]seqstore.Reservation{{Key: k, High: 201}}); err != nil {
		t.Fatalf("after etcd is back: %v", err)
	}
}

// A batch larger than one transaction is split and all of it lands.
func TestLargeBatch(t *testing.T) {
	srv := etcdtest.Start(t)
	s := open(t, srv, 100)
	var batch []seqstore.Reservation
	for i := range 300 {
		k := s.KeyFor("out", uint32(i+1), peer, "aes128gcm16", []byte("k"), nil)
		s.High(k)
		batch = append(batch, seqstore.Reservation{Key: k, High: uint64(100 + i)})
	}
	if err := s.Reserve(batch); err != nil {
		t.Fatal(err)
	}
	o := open(t, srv, 100)
	for _, r := range batch {
		if h, _ := o.High(r.Key); h != r.High {
			t.Fatalf("%s: %d, want %d", r.Key, h, r.High)
		}
	}
}

// Prefetched marks are what High returns, and a reservation built on them
// is still refused if the mark moved after the prefetch.
func TestPrefetch(t *testing.T) {
	srv := etcdtest.Start(t)
	a, b := open(t, srv, 100), open(t, srv, 100)
	var keys []seqstore.Key
	var batch []seqstore.Reservation
	for i := range 100 {
		k := a.KeyFor("out", uint32(i+1), peer, "aes128gcm16", []byte("k"), nil)
		keys = append(keys, k)
		a.High(k)
		batch = append(batch, seqstore.Reservation{Key: k, High: uint64(10 + i)})
	}
	if err := a.Reserve(batch); err != nil {
		t.Fatal(err)
	}
	b.Prefetch(keys)
	for i, k := range keys {
		if h, ok := b.High(k); h != uint64(10+i) || !ok {
			t.Fatalf("key %d: prefetched %d %v, want %d", i, h, ok, 10+i)
		}
	}
	// a moves key 0 after b's prefetch: b's reservation on it fails.
	b.Prefetch(keys[:1])
	a.High(keys[0])
	if err := a.Reserve([]seqstore.Reservation{{Key: keys[0], High: 50}}); err != nil {
		t.Fatal(err)
	}
	if h, _ := b.High(keys[0]); h != 10 {
		t.Fatalf("High after prefetch %d, want the prefetched 10", h)
	}
	if err := b.Reserve([]seqstore.Reservation{{Key: keys[0], High: 110}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("reservation on a stale prefetch: %v, want ErrConflict", err)
	}
}

// Installing a batch of outbound SAs: one High round trip per SA, or a
// Prefetch of the whole batch first (what the manager does). The figure
// to compare is the ratio of the two ns/op in one run.
func BenchmarkInstall(b *testing.B) {
	srv := etcdtest.Start(b)
	s, err := Open(context.Background(), srv.Client(b), Options{Prefix: "/bench", Block: 100})
	if err != nil {
		b.Fatal(err)
	}
	const batch = 256
	spi := uint32(0)
	for _, prefetch := range []bool{false, true} {
		b.Run(map[bool]string{false: "high-each", true: "prefetch"}[prefetch], func(b *testing.B) {
			for range b.N {
				keys := make([]seqstore.Key, batch)
				res := make([]seqstore.Reservation, batch)
				for i := range keys {
					spi++
					keys[i] = s.KeyFor("out", spi, peer, "aes128gcm16", []byte("k"), nil)
				}
				if prefetch {
					s.Prefetch(keys)
				}
				for i, k := range keys {
					h, _ := s.High(k)
					res[i] = seqstore.Reservation{Key: k, High: seqstore.StartSeq(h) + 100}
				}
				if err := s.Reserve(res); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/SA")
		})
	}
}
