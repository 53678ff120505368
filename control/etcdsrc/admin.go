package etcdsrc

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/sa"
)

// Put assigns one SA to node: it writes the Spec (JSON, keys inline)
// under the node's directory, named after the SA.
func Put(ctx context.Context, cli *clientv3.Client, prefix, node string, sp sa.Spec) error {
	if sp.Name == "" {
		return fmt.Errorf("etcdsrc: put SA %s: a name is required (it is the key)", sp.SPI)
	}
	b, err := json.Marshal(sp)
	if err != nil {
		return fmt.Errorf("etcdsrc: encode SA %q: %w", sp.Name, err)
	}
	if _, err := cli.Put(ctx, SADir(prefix, node)+sp.Name, string(b)); err != nil {
		return fmt.Errorf("etcdsrc: put SA %q on %s: %w", sp.Name, node, err)
	}
	return nil
}

// Move hands the named SAs from one node to another in one transaction:
// it succeeds only if every name exists under from, and then no watcher
// ever sees an SA on both nodes or on neither. It is what a fleet
// controller does when a gateway dies (and its phones' traffic is routed
// to another one).
func Move(ctx context.Context, cli *clientv3.Client, prefix, from, to string, names ...string) error {
	src, dst := SADir(prefix, from), SADir(prefix, to)
	var gets []clientv3.Op
	for _, n := range names {
		gets = append(gets, clientv3.OpGet(src+n))
	}
	resp, err := cli.Txn(ctx).Then(gets...).Commit()
	if err != nil {
		return fmt.Errorf("etcdsrc: read SAs of %s: %w", from, err)
	}
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for i, n := range names {
		kvs := resp.Responses[i].GetResponseRange().Kvs
		if len(kvs) != 1 {
			return fmt.Errorf("etcdsrc: move %q: not assigned to %s", n, from)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(src+n), "=", kvs[0].ModRevision))
		ops = append(ops, clientv3.OpDelete(src+n), clientv3.OpPut(dst+n, string(kvs[0].Value)))
	}
	t, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("etcdsrc: move %d SAs %s → %s: %w", len(names), from, to, err)
	}
	if !t.Succeeded {
		return fmt.Errorf("etcdsrc: move %d SAs %s → %s: changed meanwhile, try again", len(names), from, to)
	}
	return nil
}

// List returns, per node, the names of the SAs assigned to it.
func List(ctx context.Context, cli *clientv3.Client, prefix string) (map[string][]string, error) {
	dir := prefix + "/nodes/"
	resp, err := cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("etcdsrc: list %s: %w", dir, err)
	}
	out := map[string][]string{}
	for _, kv := range resp.Kvs {
		node, name, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), dir), "/sas/")
		if ok && node != "" && name != "" {
			out[node] = append(out[node], name)
		}
	}
	return out, nil
}
