package harness

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/gateway"
)

// benchCipherIdle keeps every SA's cipher built for the whole run. The
// scenarios measure SAs that all carry traffic: an NDR search over a
// million SAs comes back to each one only every 20-40 s (its trials and
// the interleaved ceiling's), past the daemon's default idle.cipher_release,
// so with the default every packet would rebuild its SA's cipher, which
// measures the release policy, not forwarding. The heap figure of such a
// run is therefore per active SA (docs/benchmarking.md).
const benchCipherIdle = 24 * time.Hour

// startGateway runs the real daemon's data path (gateway.Start, as `xesp
// run` does) on the topology's gateway namespace, with no SAs yet.
func startGateway(tp *topo, workers int, stateDir string) (*gateway.Gateway, error) {
	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [192.0.2.1]}
private: {interface: %s, next_hop_mac: "%s"}
workers: %d
max_sas: %d
state_dir: %s
`, tp.pub.name, tp.priv.name, tp.co.mac, workers, 1<<21, stateDir)
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		return nil, err
	}
	return startConfigured(context.Background(), tp, cfg)
}

// startConfigured starts the real data path with cfg in the topology's
// gateway namespace, unpinned.
func startConfigured(ctx context.Context, tp *topo, cfg *config.Config) (*gateway.Gateway, error) {
	return startConfiguredPin(ctx, tp, cfg, true)
}

// startConfiguredPin is startConfigured, pinning the maps in cfg's
// pin_dir unless noPin.
func startConfiguredPin(ctx context.Context, tp *topo, cfg *config.Config, noPin bool) (*gateway.Gateway, error) {
	var g *gateway.Gateway
	err := tp.gw.Do(func() (err error) {
		g, err = gateway.Start(ctx, cfg, gateway.Options{NoPin: noPin, CipherIdle: benchCipherIdle})
		return err
	})
	return g, err
}

// load adds pairs from..n-1 and waits until the workers and the XDP SA
// map hold them all. It adds in chunks and checks ctx between them and
// while it waits, so a signal stops a million-SA load within moments.
func (gu *gatewayUnder) load(ctx context.Context, from, n int, nw pktgen.Net) error {
	const chunk = 4096
	for i := from; i < n; i += chunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		part, err := pktgen.SAsRange(i, min(n, i+chunk), nw)
		if err != nil {
			return err
		}
		if err := gu.g.SAD.AddAll(part); err != nil {
			return fmt.Errorf("add SA pairs %d..%d: %w", i, min(n, i+chunk), err)
		}
	}
	// The manager counts an SA installed once its worker holds it and
	// publishes to the BPF maps after that, the inbound SA map last.
	deadline := time.Now().Add(10 * time.Minute)
	for gu.g.Manager.Installed() < 2*n {
		if err := ctx.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("manager installed %d of %d SAs in 10 minutes", gu.g.Manager.Installed(), 2*n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	keys, vals := make([]uint32, 1<<16), make([]bpf.SASteer, 1<<16)
	for {
		c, err := countMap(gu.g.Maps.SAs.Map(), keys, vals)
		if err != nil {
			return err
		}
		if c >= n {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("SA map holds %d of %d SAs after 10 minutes", c, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func countMap(m *ebpf.Map, keys []uint32, vals []bpf.SASteer) (int, error) {
	var cur ebpf.MapBatchCursor
	total := 0
	for {
		n, err := m.BatchLookup(&cur, keys, vals, nil)
		total += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return total, fmt.Errorf("count SA map: %w", err)
		}
	}
}

// figures are what the workers counted, to explain a scenario's loss.
type figures struct {
	decap, encap uint64
	drops        map[string]uint64
}

func (gu *gatewayUnder) snapshot() figures {
	f := figures{drops: map[string]uint64{}}
	for _, w := range gu.g.Workers {
		st := w.Stats()
		f.decap += st.Decap.Packets.Load()
		f.encap += st.Encap.Packets.Load()
		for dir, d := range map[string]*worker.DirStats{"decap": &st.Decap, "encap": &st.Encap} {
			for r := range d.Drops {
				if n := d.Drops[r].Load(); n > 0 {
					f.drops[dir+" "+worker.Drop(r).String()] += n
				}
			}
		}
	}
	return f
}

// explain says what the workers forwarded and dropped since before, and
// what the sockets' rings dropped, so a lossy figure comes with its cause.
func (gu *gatewayUnder) explain(before figures) string {
	now := gu.snapshot()
	parts := []string{fmt.Sprintf("workers: decap %d encap %d", now.decap-before.decap, now.encap-before.encap)}
	for k, v := range now.drops {
		if d := v - before.drops[k]; d > 0 {
			parts = append(parts, fmt.Sprintf("drop %s %d", k, d))
		}
	}
	var rxDrop, fillEmpty uint64
	for _, s := range gu.g.Sockets {
		for _, sock := range s {
			if st, err := sock.Stats(); err == nil {
				rxDrop += st.RxDropped + st.RxRingFull
				fillEmpty += st.RxFillRingEmptyDescs
			}
		}
	}
	if rxDrop+fillEmpty > 0 {
		parts = append(parts, fmt.Sprintf("sockets (cumulative): rx dropped/ring full %d, fill empty %d", rxDrop, fillEmpty))
	}
	return strings.Join(parts, "; ")
}
