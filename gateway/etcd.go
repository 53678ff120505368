package gateway

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/xesp/xesp/control/etcdseq"
	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/manager"
)

// openEtcd connects to the config's etcd (when it has one) and, with
// etcd.sequence on, opens the fleet-wide sequence store. The client
// connects lazily; only the sequence store's first read (the fleet
// secret) needs etcd up at start, since without it no outbound SA could
// be reserved.
func (g *Gateway) openEtcd(ctx context.Context) error {
	e := g.Config.Etcd
	if e == nil {
		return nil
	}
	// TLS and credentials from the config; notice a dead member within
	// seconds and move to another one.
	cli, err := etcdsrc.Dial(e, etcdsrc.DialOptions{KeepAlive: 2 * time.Second})
	if err != nil {
		return err
	}
	g.Etcd = cli
	if e.KEK == nil && g.log != nil {
		g.log.Warn("etcd: no kek_file (etcd.insecure): SA records are read and expected in clear")
	}
	if e.SequenceInEtcd() {
		g.EtcdSeq, err = etcdseq.Open(ctx, cli, etcdseq.Options{Prefix: e.Prefix, Timeout: e.Dial})
		if err != nil {
			return fmt.Errorf("etcd.sequence: %w", err)
		}
	}
	return nil
}

// seqStore is what the manager reserves sequence numbers in.
func (g *Gateway) seqStore() manager.SeqStore {
	if g.EtcdSeq != nil {
		return g.EtcdSeq
	}
	return g.Seq
}

// startEtcdSource follows this node's SA directory. Start waits up to the
// dial timeout for the first listing, so a gateway with etcd up serves
// its phones when Start returns; with etcd down it starts with what the
// config holds and the source keeps trying.
func (g *Gateway) startEtcdSource(ctx context.Context, runCtx context.Context) error {
	e := g.Config.Etcd
	if e == nil {
		return nil
	}
	src, err := etcdsrc.New(etcdsrc.Options{Client: g.Etcd, Prefix: e.Prefix, Node: e.Node, SAD: g.SAD,
		Check: g.Config.CheckSA, Log: g.log, Timeout: e.Dial, KEK: e.KEK})
	if err != nil {
		return err
	}
	g.EtcdSource = src
	g.apiSAs.setEtcd(src)
	g.goRun("etcd SA source", func() error { return src.Run(runCtx) })
	host, _ := os.Hostname()
	alive := fmt.Sprintf("host=%s pid=%d started=%s", host, os.Getpid(), time.Now().UTC().Format(time.RFC3339))
	g.goRun("etcd liveness", func() error {
		return etcdsrc.Announce(runCtx, g.Etcd, e.Prefix, e.Node, alive, e.TTL, g.log)
	})
	t := time.NewTimer(e.Dial)
	defer t.Stop()
	select {
	case <-src.Ready():
		// The listing is in the SAD; have it in the data path too.
		return g.Manager.WaitVersion(ctx, g.SAD.Version())
	case <-t.C:
		g.log.Warn("etcd: no SA listing yet; starting without etcd SAs", "endpoints", e.Endpoints)
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}
