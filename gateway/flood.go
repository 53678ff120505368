package gateway

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/sa"
)

// floodWatch turns XDP's per-SA flood drops (flood_drops) into events:
// a log line naming the SA when its budget starts being enforced and
// when the flood ends, and the list GET /v1/floods serves.
type floodWatch struct {
	mu   sync.Mutex
	seen map[uint32]*floodState
}

type floodState struct {
	drops  uint64
	active bool
	since  time.Time
}

// watchFloods polls flood_drops every interval until ctx ends.
func (g *Gateway) watchFloods(ctx context.Context, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			g.pollFloods(now)
		}
	}
}

func (g *Gateway) pollFloods(now time.Time) {
	w := &g.floods
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.seen == nil {
		w.seen = make(map[uint32]*floodState)
	}
	touched := make(map[uint32]bool)
	err := g.Maps.Flood.AllDrops(func(spi uint32, drops uint64) {
		touched[spi] = true
		st := w.seen[spi]
		if st == nil {
			st = &floodState{}
			w.seen[spi] = st
		}
		grew := drops > st.drops
		st.drops = drops
		switch {
		case grew && !st.active:
			st.active, st.since = true, now
			g.log.Warn("flood: failed authentications spent an SA's budget; XDP drops its packets from sources other than its binding",
				"sa", g.floodLabel(spi), "spi", fmt.Sprintf("0x%08x", spi), "xdp_drops", drops)
		case !grew && st.active:
			st.active = false
			g.log.Info("flood: ended", "sa", g.floodLabel(spi), "spi", fmt.Sprintf("0x%08x", spi), "xdp_drops", drops,
				"lasted", now.Sub(st.since).Round(time.Millisecond))
		}
	})
	if err != nil {
		g.log.Error("flood: read flood_drops", "err", err)
	}
	for spi := range w.seen {
		if !touched[spi] {
			delete(w.seen, spi)
		}
	}
}

func (g *Gateway) floodLabel(spi uint32) string {
	if e, err := g.SAD.Lookup(sa.In, spi); err == nil {
		return e.SA.Label()
	}
	return "(deleted SA)"
}

// Floods lists the SAs XDP dropped flood packets for (api.FloodReporter).
func (d *dataPath) Floods() []api.Flood {
	g := d.g
	g.floods.mu.Lock()
	defer g.floods.mu.Unlock()
	var out []api.Flood
	for spi, st := range g.floods.seen {
		f := api.Flood{SPI: fmt.Sprintf("0x%08x", spi), XDPDrops: st.drops, Active: st.active}
		if st.active {
			f.Since = st.since
		}
		if e, err := g.SAD.Lookup(sa.In, spi); err == nil {
			f.SA, f.Name, f.Binding = api.RefOf(e.ID), e.SA.Name, e.Binding.String()
			if c, ok := g.Manager.Counters(e.ID); ok {
				f.SADrops = c.Drops
			}
		}
		out = append(out, f)
	}
	return out
}

// floodsActive counts the SAs under a flood at the last check.
func (g *Gateway) floodsActive() int {
	g.floods.mu.Lock()
	defer g.floods.mu.Unlock()
	n := 0
	for _, st := range g.floods.seen {
		if st.active {
			n++
		}
	}
	return n
}

// FloodFailures is the failed authentications the workers charged.
func (g *Gateway) FloodFailures() uint64 {
	var n uint64
	for _, fg := range g.Flood {
		n += fg.Stats().Failures.Load()
	}
	return n
}
