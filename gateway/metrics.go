package gateway

import (
	"fmt"

	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/dataplane/slowpath"
	"github.com/xesp/xesp/maps"
)

// MetricsSources is everything of this gateway that /metrics reports. The
// XDP counters get a reader of their own (the collector serializes its
// reads; the manager and CLI keep theirs).
func (g *Gateway) MetricsSources(version string) (metrics.Sources, error) {
	ctr, err := maps.NewCounters(g.Loader.Objects.Counters)
	if err != nil {
		return metrics.Sources{}, fmt.Errorf("metrics: %w", err)
	}
	src := metrics.Sources{
		Version: version,
		Start:   g.Started,
		XDP:     ctr,
		UMEM:    g.UMEM,
		SAs: func() []metrics.SACount {
			in, out := g.SAD.Len()
			return []metrics.SACount{{Direction: "in", State: "active", Count: in}, {Direction: "out", State: "active", Count: out}}
		},
	}
	if g.Lifetime != nil {
		src.Lifetime = g.Lifetime.Counts
		src.Idle = g.Lifetime.IdleNow
	}
	if g.SlowPath != nil {
		src.SlowPath = func() map[string]uint64 {
			st := g.SlowPath.Stats()
			out := make(map[string]uint64, len(st))
			for i, n := range st {
				out[slowpath.Counter(i).String()] = n
			}
			return out
		}
	}
	if len(g.Flood) > 0 {
		src.Flood = func() (int, uint64) { return g.floodsActive(), g.FloodFailures() }
	}
	if e := g.EtcdSource; e != nil {
		src.EtcdRejected = func() map[string]uint64 {
			unknown, unsealable := e.Stats.UnknownKey.Load(), e.Stats.Unsealable.Load()
			return map[string]uint64{"unknown_key": unknown, "unsealable": unsealable,
				"invalid": e.Stats.Rejected.Load() - unknown - unsealable}
		}
	}
	for _, w := range g.Workers {
		src.Workers = append(src.Workers, w.Stats())
	}
	for _, s := range g.RX {
		side := metrics.Public
		if s.Private {
			side = metrics.Private
		}
		src.Sockets = append(src.Sockets, metrics.Socket{Side: side, Worker: s.Worker, XSK: s.XSK})
	}
	return src, nil
}
