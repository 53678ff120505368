package gateway

import (
	"context"
	"fmt"
	"sync"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

// DataPath answers the control API's questions about the running data
// path (api.DataPath).
func (g *Gateway) DataPath() (api.DataPath, error) {
	ctr, err := maps.NewCounters(g.Loader.Objects.Counters)
	if err != nil {
		return nil, fmt.Errorf("api: %w", err)
	}
	return &dataPath{g: g, ctr: ctr}, nil
}

type dataPath struct {
	g   *Gateway
	mu  sync.Mutex // maps.Counters reuses one read buffer
	ctr *maps.Counters
}

func (d *dataPath) SACounters(id sa.ID) (api.SACounters, bool) {
	c, ok := d.g.Manager.Counters(id)
	if !ok {
		return api.SACounters{}, false
	}
	out := api.SACounters{Packets: c.Packets, Bytes: c.Bytes, Drops: c.Drops, Seq: c.Seq}
	if !c.LastSeen.IsZero() {
		t := c.LastSeen.UTC()
		out.LastSeen = &t
	}
	if id.Dir == sa.In {
		if ka := d.g.Manager.LastKeepalive(id); !ka.IsZero() {
			ka = ka.UTC()
			out.LastKeepalive = &ka
		}
	}
	return out, true
}

func dirStats(get func(*worker.Stats) *worker.DirStats, ws worker.Set) api.DirStats {
	out := api.DirStats{Drops: map[string]uint64{}}
	for _, w := range ws {
		s := get(w.Stats())
		out.Packets += s.Packets.Load()
		out.Bytes += s.Bytes.Load()
		for r := range s.Drops {
			if n := s.Drops[r].Load(); n > 0 && worker.Drop(r) != worker.Drop(esp.ReasonNone) {
				out.Drops[worker.Drop(r).String()] += n
			}
		}
	}
	return out
}

func (d *dataPath) Stats() api.Stats {
	ws := d.g.Workers
	st := api.Stats{
		In:  dirStats(func(s *worker.Stats) *worker.DirStats { return &s.Decap }, ws),
		Out: dirStats(func(s *worker.Stats) *worker.DirStats { return &s.Encap }, ws),
		XDP: map[string]uint64{},
	}
	for _, w := range ws {
		s := w.Stats()
		var drops uint64
		for r := range s.Decap.Drops {
			drops += s.Decap.Drops[r].Load() + s.Encap.Drops[r].Load()
		}
		bc := s.BindingChanges.Load()
		st.BindingChanges += bc
		st.Workers = append(st.Workers, api.WorkerStats{Worker: w.ID(), DecapPackets: s.Decap.Packets.Load(),
			EncapPackets: s.Encap.Packets.Load(), Drops: drops, BindingChanges: bc})
	}
	var snap maps.Snapshot
	d.mu.Lock()
	err := d.ctr.Read(&snap)
	d.mu.Unlock()
	if err == nil {
		for r := range snap {
			if snap[r].Packets > 0 {
				st.XDP[bpf.Reason(r).String()] = snap[r].Packets
			}
		}
	}
	return st
}

// Synced also makes the change durable: an SA the API acknowledged is in
// state_dir before the client hears back, so it survives kill -9.
func (d *dataPath) Synced(ctx context.Context, version uint64) error {
	if err := d.g.Manager.WaitVersion(ctx, version); err != nil {
		return err
	}
	return d.g.apiSAs.flush(version)
}

func (d *dataPath) Health() api.Health {
	g := d.g
	h := api.Health{OK: true, XDP: map[string]string{}, Workers: len(g.Workers)}
	if a := g.Loader.Public; a != nil {
		h.XDP[g.Config.Public.Interface] = a.Mode.String()
	}
	if a := g.Loader.Private; a != nil {
		h.XDP[g.Config.Private.Interface] = a.Mode.String()
	}
	if len(g.Sockets) > 0 {
		h.AFXDP = g.Sockets[0][0].Mode().String()
	}
	if err := g.failure.Load(); err != nil {
		h.OK = false
		h.Problems = append(h.Problems, (*err).Error())
	}
	for _, p := range g.dataPathProblems() {
		h.OK = false
		h.Problems = append(h.Problems, p)
	}
	return h
}

// dataPathProblems checks what another process (or an operator's
// bpftool) can take away under a running daemon: the XDP programs on
// the interfaces and this daemon's sockets in the XSK maps. Without them
// nothing is forwarded however healthy the workers are.
func (g *Gateway) dataPathProblems() []string {
	var out []string
	for _, a := range []*loader.Attachment{g.Loader.Public, g.Loader.Private} {
		if a == nil {
			continue
		}
		if ok, err := a.Attached(); err != nil {
			out = append(out, fmt.Sprintf("xdp on %s: %v", a.Ifname, err))
		} else if !ok {
			out = append(out, fmt.Sprintf("xdp on %s (%s): detached", a.Ifname, a.Side))
		}
	}
	for _, s := range g.RX {
		idx := s.Index(g.Config.Workers)
		side := "public"
		if s.Private {
			side = "private"
		}
		ok, err := g.Loader.XSKPresent(s.Private, idx)
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("worker %d: %s socket of queue %d: %v", s.Worker, side, s.Queue, err))
		case !ok:
			out = append(out, fmt.Sprintf("worker %d: %s AF_XDP socket missing from xsks_%s slot %d (RX queue %d): XDP drops its packets (no_xsk)", s.Worker, side, side, idx, s.Queue))
		}
	}
	return out
}
