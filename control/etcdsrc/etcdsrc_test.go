package etcdsrc

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/lab/etcdtest"
)

const prefix = "/fleet"

func spec(name string, spi uint32, dir, key string, phone int) sa.Spec {
	return sa.Spec{Name: name, SPI: sa.SPIOf(spi), Direction: dir, Mode: "tunnel", Proposal: "aes128gcm16",
		EncKey: key, Local: "192.0.2.1", Peer: fmt.Sprintf("198.51.100.%d", phone), Encap: &sa.EncapSpec{},
		Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: fmt.Sprintf("10.99.0.%d/32", phone)}}
}

const (
	k1 = "000102030405060708090a0b0c0d0e0f10111213"
	k2 = "202122232425262728292a2b2c2d2e2f30313233"
)

func put(t *testing.T, cli *clientv3.Client, node string, sp sa.Spec) {
	t.Helper()
	if err := Put(context.Background(), cli, prefix, node, sp); err != nil {
		t.Fatal(err)
	}
}

// start runs a Source for node over a fresh SAD until the test ends.
func start(t *testing.T, cli *clientv3.Client, node string) (*Source, *sad.SAD) {
	t.Helper()
	d, err := sad.New(sad.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	local := netip.MustParseAddr("192.0.2.1")
	src, err := New(Options{Client: cli, Prefix: prefix, Node: node, SAD: d, Retry: 100 * time.Millisecond,
		Timeout: 2 * time.Second, Log: slog.New(slog.DiscardHandler),
		Check: func(s *sa.SA) error {
			if s.Local != local {
				return &sa.FieldError{SA: s.Label(), Field: "local", Reason: "not ours"}
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { src.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-src.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("source never listed")
	}
	return src, d
}

// names returns the SAD's SA names in creation order.
func names(d *sad.SAD) []string {
	page, _ := d.List(0, 1000, nil)
	var out []string
	for _, e := range page {
		out = append(out, e.SA.Name)
	}
	return out
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func has(d *sad.SAD, want ...string) func() bool {
	return func() bool { return fmt.Sprint(names(d)) == fmt.Sprint(want) }
}

// A gateway loads its own node's SAs, not another's, and follows adds,
// updates and deletes; bad values are rejected with the field named and
// change nothing; SAs from other sources are never touched.
func TestFollowsNodeDirectory(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	put(t, cli, "gw1", spec("ue1-in", 0x1001, "in", k1, 1))
	put(t, cli, "gw1", spec("ue1-out", 0x2001, "out", k2, 1))
	put(t, cli, "gw2", spec("ue2-in", 0x1002, "in", k1, 2))
	src, d := start(t, cli, "gw1")
	if got := names(d); fmt.Sprint(got) != "[ue1-in ue1-out]" {
		t.Fatalf("after the first listing the SAD holds %v", got)
	}

	// An SA from the config file or the API lives beside them.
	cfgSpec := spec("cfg-in", 0x1009, "in", k1, 9)
	cfgSA, err := cfgSpec.Parse(sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Add(cfgSA); err != nil {
		t.Fatal(err)
	}

	put(t, cli, "gw1", spec("ue3-in", 0x1003, "in", k1, 3))
	eventually(t, "ue3-in added", has(d, "ue1-in", "ue1-out", "cfg-in", "ue3-in"))

	// Updated in place: same identity, new key.
	sp := spec("ue3-in", 0x1003, "in", k2, 3)
	put(t, cli, "gw1", sp)
	want, _ := hex.DecodeString(k2)
	eventually(t, "ue3-in rekeyed", func() bool {
		e, ok := d.GetName("ue3-in")
		return ok && bytes.Equal(e.SA.EncKey, want)
	})

	// A new identity under the same key replaces the SA it gave.
	old, _ := d.GetName("ue3-in")
	put(t, cli, "gw1", spec("ue3-in", 0x1013, "in", k2, 3))
	eventually(t, "ue3-in re-keyed to a new SPI", func() bool {
		e, ok := d.GetName("ue3-in")
		return ok && e.SA.SPI == 0x1013
	})
	if _, ok := d.Get(old.ID); ok {
		t.Fatal("the replaced identity is still in the SAD")
	}

	// Bad values: rejected, counted, nothing else changes.
	rejected := src.Stats.Rejected.Load()
	bad := map[string]string{
		"bad-json":  `{"name": "bad-json", "spi": `,
		"bad-field": `{"name":"bad-field","spi":"0x1004","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"zz","local":"192.0.2.1","peer":"198.51.100.4","encap":{}}`,
		"not-local": `{"name":"not-local","spi":"0x1005","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"` + k1 + `","local":"192.0.2.77","peer":"198.51.100.5","encap":{}}`,
		// Same identity as the config's SA: the other source keeps it.
		"clash":    `{"name":"clash","spi":"0x1009","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"` + k1 + `","local":"192.0.2.1","peer":"198.51.100.9","encap":{}}`,
		"misnamed": `{"name":"other","spi":"0x1006","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"` + k1 + `","local":"192.0.2.1","peer":"198.51.100.6","encap":{}}`,
	}
	for k, v := range bad {
		if _, err := cli.Put(context.Background(), SADir(prefix, "gw1")+k, v); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "bad values rejected", func() bool { return src.Stats.Rejected.Load() == rejected+uint64(len(bad)) })
	if got := names(d); fmt.Sprint(got) != "[ue1-in ue1-out cfg-in ue3-in]" {
		t.Fatalf("bad values changed the SAD: %v", got)
	}
	if err := src.lastParseError(SADir(prefix, "gw1")+"bad-field", bad["bad-field"]); err == nil || !bytes.Contains([]byte(err.Error()), []byte("enc_key")) {
		t.Fatalf("bad-field error does not name enc_key: %v", err)
	}

	// A valid SA replacing a broken value loads; deleting keys removes
	// exactly their SAs.
	put(t, cli, "gw1", spec("bad-field", 0x1004, "in", k1, 4))
	eventually(t, "fixed value loaded", has(d, "ue1-in", "ue1-out", "cfg-in", "ue3-in", "bad-field"))
	for _, k := range []string{"ue1-in", "bad-field", "clash"} {
		if _, err := cli.Delete(context.Background(), SADir(prefix, "gw1")+k); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "deletes applied", has(d, "ue1-out", "cfg-in", "ue3-in"))
	if _, ok := d.GetName("cfg-in"); !ok {
		t.Fatal("deleting the clashing etcd key removed the config's SA")
	}
}

// With etcd gone the SAD keeps every SA (the data path keeps forwarding);
// once it is back, what changed meanwhile or right after is applied, and
// a compaction that outran the watch is caught up by listing again.
func TestEtcdOutageKeepsSAs(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	put(t, cli, "gw1", spec("ue1-in", 0x1001, "in", k1, 1))
	put(t, cli, "gw1", spec("ue1-out", 0x2001, "out", k2, 1))
	src, d := start(t, cli, "gw1")

	srv.Stop()
	// The source's client has seen etcd go (its watch waits for the
	// reconnect rather than failing, so there is no retry to count).
	eventually(t, "the client to lose etcd", func() bool {
		return cli.ActiveConnection().GetState() != connectivity.Ready
	})
	if got := names(d); fmt.Sprint(got) != "[ue1-in ue1-out]" {
		t.Fatalf("with etcd down the SAD holds %v", got)
	}
	srv.Start()
	// A fresh client acts at once, while the source's is still in its
	// reconnect backoff; compacting past the changes then leaves its
	// watch nothing to resume from, so it must list again.
	cli = srv.Client(t)
	ctx := context.Background()
	if _, err := cli.Delete(ctx, SADir(prefix, "gw1")+"ue1-out"); err != nil {
		t.Fatal(err)
	}
	put(t, cli, "gw1", spec("ue2-in", 0x1002, "in", k1, 2))
	r, err := cli.Get(ctx, "/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, r.Header.Revision); err != nil {
		t.Fatal(err)
	}
	eventually(t, "changes after the outage applied", has(d, "ue1-in", "ue2-in"))
	t.Logf("listings %d, revision %d", src.Stats.Listings.Load(), src.Stats.Revision.Load())
	if src.Stats.Listings.Load() < 2 {
		t.Log("the watch resumed before the compaction: the relisting path was not taken this run")
	}

	// A compaction while the watch is up, then more changes: still
	// followed.
	put(t, cli, "gw1", spec("ue3-in", 0x1003, "in", k1, 3))
	eventually(t, "ue3-in", has(d, "ue1-in", "ue2-in", "ue3-in"))
}

// Move hands a phone's SA pair from one gateway to another in one
// transaction: the first loses both, the second gains both.
func TestMoveBetweenNodes(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	put(t, cli, "gw1", spec("ue1-in", 0x1001, "in", k1, 1))
	put(t, cli, "gw1", spec("ue1-out", 0x2001, "out", k2, 1))
	put(t, cli, "gw1", spec("ue2-in", 0x1002, "in", k1, 2))
	_, d1 := start(t, cli, "gw1")
	_, d2 := start(t, cli, "gw2")
	if err := Move(context.Background(), cli, prefix, "gw1", "gw2", "ue1-in", "ue1-out"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "gw2 has the pair", has(d2, "ue1-in", "ue1-out"))
	eventually(t, "gw1 lost the pair", has(d1, "ue2-in"))
	err := Move(context.Background(), cli, prefix, "gw1", "gw2", "ue1-in")
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("moving an SA the node does not hold: %v", err)
	}
}

// The listing a broken watch falls back to reconciles: keys gone are
// deleted, changed ones updated, unchanged ones left as they are (their
// SAD version does not move, so the data path is not touched).
func TestRelistReconciles(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	put(t, cli, "gw1", spec("ue1-in", 0x1001, "in", k1, 1))
	put(t, cli, "gw1", spec("ue1-out", 0x2001, "out", k2, 1))
	put(t, cli, "gw1", spec("ue2-in", 0x1002, "in", k1, 2))
	d, _ := sad.New(sad.Options{Workers: 1})
	src, err := New(Options{Client: cli, Prefix: prefix, Node: "gw1", SAD: d, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := src.list(ctx); err != nil {
		t.Fatal(err)
	}
	before, _ := d.GetName("ue1-in")
	// What a watch would have missed:
	cli.Delete(ctx, SADir(prefix, "gw1")+"ue1-out")
	put(t, cli, "gw1", spec("ue2-in", 0x1002, "in", k2, 2))
	put(t, cli, "gw1", spec("ue3-in", 0x1003, "in", k1, 3))
	if _, err := src.list(ctx); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(names(d)); got != "[ue1-in ue2-in ue3-in]" {
		t.Fatalf("after relisting: %s", got)
	}
	if after, _ := d.GetName("ue1-in"); after.Version != before.Version {
		t.Fatalf("unchanged SA touched: version %d → %d", before.Version, after.Version)
	}
	want, _ := hex.DecodeString(k2)
	if e, _ := d.GetName("ue2-in"); !bytes.Equal(e.SA.EncKey, want) {
		t.Fatal("changed SA not updated")
	}
	if n := src.Owned(); n != 3 {
		t.Fatalf("owns %d, want 3", n)
	}
}

// A running gateway's liveness key is present; a clean stop revokes it at
// once (a killed gateway's expires with its lease: TestFleetFailover).
func TestAnnounce(t *testing.T) {
	const ttl = 4 * time.Second
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		Announce(ctx, cli, prefix, "gw1", "pid=1", ttl, slog.New(slog.DiscardHandler))
		close(done)
	}()
	eventually(t, "gw1 announced", func() bool {
		a, err := Alive(context.Background(), cli, prefix)
		return err == nil && a["gw1"] == "pid=1"
	})
	// Kept alive: the key's lease is renewed (its remaining TTL goes
	// back up) before it lapses, rather than waiting out the TTL. etcd
	// reports whole seconds and the client renews at a third of the TTL:
	// with 4 s the remaining time crosses a second boundary every cycle.
	r, err := cli.Get(context.Background(), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var lease clientv3.LeaseID
	for _, kv := range r.Kvs {
		if kv.Lease != 0 {
			lease = clientv3.LeaseID(kv.Lease)
		}
	}
	if lease == 0 {
		t.Fatal("the liveness key has no lease")
	}
	low := int64(1 << 62)
	eventually(t, "the lease renewed", func() bool {
		ttl, err := cli.TimeToLive(context.Background(), lease)
		if err != nil || ttl.TTL < 0 {
			t.Fatalf("liveness lease lapsed while its gateway runs: %v, ttl %v", err, ttl)
		}
		renewed := ttl.TTL > low
		low = min(low, ttl.TTL)
		return renewed
	})
	cancel()
	<-done
	if a, _ := Alive(context.Background(), cli, prefix); len(a) != 0 {
		t.Fatalf("after a clean stop: %v", a)
	}
}
