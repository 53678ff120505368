package etcdsrc

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/lab/etcdtest"
)

// BenchmarkSync100k is a gateway's start against etcd (over TLS with a
// client certificate) holding 100k SAs for it: the listing fetched,
// every record opened (sealed) or taken as is (clear), parsed and added
// to the SAD. Both directories sit in the same etcd and are synced in
// the same run, alternately; the clear one is the ceiling.
func BenchmarkSync100k(b *testing.B) {
	const n = 100_000
	srv := etcdtest.StartTLS(b)
	cli := srv.Client(b)
	r, err := kek.Parse([]byte(kekA))
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	var ops []clientv3.Op
	flush := func() {
		if len(ops) == 0 {
			return
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
		ops = ops[:0]
	}
	for i := range n {
		pp := uint16(30000 + i%30000)
		sp := sa.Spec{Name: fmt.Sprintf("ue%d-in", i), SPI: sa.SPIOf(uint32(0x10000 + i)), Direction: "in", Mode: "tunnel",
			Proposal: "aes128gcm16", EncKey: k1, Local: "192.0.2.1", Peer: netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)}).String(),
			Encap: &sa.EncapSpec{PeerPort: &pp},
			Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: netip.AddrFrom4([4]byte{100, byte(64 + i>>16), byte(i >> 8), byte(i)}).String() + "/32"}}
		v, _ := json.Marshal(sp)
		ops = append(ops, clientv3.OpPut(SADir(prefix, "clear")+sp.Name, string(v)),
			clientv3.OpPut(SADir(prefix, "sealed")+sp.Name, string(Seal(r, sp.Name, v))))
		if len(ops) >= 128 {
			flush()
		}
	}
	flush()
	sync := func(node string, ring *kek.Ring) time.Duration {
		d, err := sad.New(sad.Options{Workers: 2, MaxSAs: 2 * n})
		if err != nil {
			b.Fatal(err)
		}
		src, err := New(Options{Client: cli, Prefix: prefix, Node: node, SAD: d, Timeout: time.Minute,
			Log: slog.New(slog.DiscardHandler), KEK: ring})
		if err != nil {
			b.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		t0 := time.Now()
		go func() { src.Run(rctx); close(done) }()
		<-src.Ready()
		el := time.Since(t0)
		cancel()
		<-done
		if in, _ := d.Len(); in != n {
			b.Fatalf("%s: %d SAs loaded, want %d (rejected %d)", node, in, n, src.Stats.Rejected.Load())
		}
		return el
	}
	b.ResetTimer()
	var clear, sealed time.Duration
	for range max(b.N, 2) {
		clear += sync("clear", nil)
		sealed += sync("sealed", r)
	}
	b.StopTimer()
	rounds := time.Duration(max(b.N, 2))
	b.ReportMetric((clear/rounds).Seconds()*1000, "ms-clear")
	b.ReportMetric((sealed/rounds).Seconds()*1000, "ms-sealed")
	b.ReportMetric(float64(sealed)/float64(clear), "sealed/clear")
}
