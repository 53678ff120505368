package etcdsrc

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// AliveKey is where node announces itself while it runs.
func AliveKey(prefix, node string) string { return prefix + "/alive/" + node }

// Announce keeps AliveKey(prefix, node) present, bound to a lease of ttl
// that this process keeps alive, until ctx ends (then the lease is
// revoked and the key goes at once). A gateway that dies however it dies
// stops renewing, and etcd deletes the key within ttl: that deletion is
// what a fleet controller watches to move the node's SAs elsewhere. When
// etcd is out of reach it retries; the key comes back with the gateway's
// next lease.
func Announce(ctx context.Context, cli *clientv3.Client, prefix, node, value string, ttl time.Duration, log *slog.Logger) error {
	key := AliveKey(prefix, node)
	for ctx.Err() == nil {
		err := announceOnce(ctx, cli, key, value, ttl)
		if ctx.Err() != nil {
			break
		}
		log.Warn("etcd: liveness lease lost; renewing", "key", key, "err", err)
		sleep(ctx, min(ttl/3, time.Second))
	}
	return nil
}

func announceOnce(ctx context.Context, cli *clientv3.Client, key, value string, ttl time.Duration) error {
	gctx, cancel := context.WithTimeout(ctx, ttl)
	lease, err := cli.Grant(gctx, int64(ttl/time.Second))
	cancel()
	if err != nil {
		return fmt.Errorf("grant lease: %w", err)
	}
	defer func() {
		// On shutdown the key goes now rather than after ttl.
		rctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cli.Revoke(rctx, lease.ID)
		cancel()
	}()
	pctx, cancel := context.WithTimeout(ctx, ttl)
	_, err = cli.Put(pctx, key, value, clientv3.WithLease(lease.ID))
	cancel()
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	ka, err := cli.KeepAlive(ctx, lease.ID)
	if err != nil {
		return fmt.Errorf("keep lease alive: %w", err)
	}
	for range ka {
	}
	return fmt.Errorf("lease %x ended", lease.ID)
}

// Alive returns the nodes announcing themselves, with what they announce.
func Alive(ctx context.Context, cli *clientv3.Client, prefix string) (map[string]string, error) {
	dir := prefix + "/alive/"
	resp, err := cli.Get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("etcdsrc: list %s: %w", dir, err)
	}
	out := make(map[string]string, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[strings.TrimPrefix(string(kv.Key), dir)] = string(kv.Value)
	}
	return out, nil
}
