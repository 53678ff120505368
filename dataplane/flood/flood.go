// Package flood keeps the budgets for packets that fail authentication
// (issue 18). A forged ESP packet for a known SPI passes everything XDP
// can check and costs its worker a full AEAD or HMAC verification; a
// flood of them on one SA starves every other phone on that worker. The
// worker charges each failed authentication to two GCRA buckets, the SA's
// and the sending (foreign) source's, and publishes a spent budget to the
// XDP maps (flood_sas, flood_srcs; see bpf/xesp.h), where xesp_public
// then drops packets for the SA from any source but its current binding
// before they reach a worker.
//
// What it owns: the bucket arithmetic and when to publish. It must not
// look at packets (the worker hands it SPI and addresses) or decide what
// XDP does with a published budget (bpf/xesp.c flood_check does). One
// Guard per worker: it is not safe for concurrent use, and per-SA state
// is only ever written by the SA's own worker.
package flood

import (
	"fmt"
	"net/netip"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
)

// Budget is a token bucket for failed authentications: Rate per second
// sustained, Burst at once.
type Budget struct {
	Rate  float64 `yaml:"rate" json:"rate"`
	Burst int     `yaml:"burst" json:"burst"`
}

// Config holds the two budgets.
type Config struct {
	// SA bounds the failures charged to one SA from all sources; once
	// spent, XDP drops the SA's packets from every source but its
	// binding.
	SA Budget `yaml:"sa" json:"sa"`
	// Source bounds the failures one foreign address:port causes over
	// all SAs; once spent, XDP drops its packets (except to an SA whose
	// binding it is).
	Source Budget `yaml:"source" json:"source"`
}

// Defaults: a phone authenticates every packet it sends, so any sustained
// failure rate is an attack or a broken peer. 1000 failures a second cost
// a worker about 0.3 ms of verification a second, under 0.1 %.
var Defaults = Config{SA: Budget{Rate: 1000, Burst: 1000}, Source: Budget{Rate: 1000, Burst: 1000}}

// Check validates a budget (field names the config path for errors).
func (b Budget) Check(field string) error {
	if b.Rate <= 0 || b.Rate > 1e9 {
		return fmt.Errorf("%s.rate: %v: want failures per second, above 0 and at most 1e9", field, b.Rate)
	}
	if b.Burst < 1 || b.Burst > 1<<24 {
		return fmt.Errorf("%s.burst: %d: want 1..%d", field, b.Burst, 1<<24)
	}
	return nil
}

func (b Budget) gcra() (interval, tolerance int64) {
	interval = int64(1e9 / b.Rate)
	if interval < 1 {
		interval = 1
	}
	return interval, interval * int64(b.Burst)
}

// Publisher is where a Guard writes spent budgets for XDP (maps.Flood).
type Publisher interface {
	PutSA(spi uint32, v *bpf.FloodSA) error
	PutSrc(k *bpf.FloodSrcKey, v *bpf.FloodSrc) error
}

// Stats are a Guard's figures, read by metrics.
type Stats struct {
	Failures      atomic.Uint64 // failed authentications charged
	Published     atomic.Uint64 // map writes (a budget spent, a binding moved)
	PublishErrors atomic.Uint64
}

type bucket struct {
	tat       int64 // theoretical arrival time of the next failure
	published int64 // tat XDP holds (0: none)
}

type saState struct {
	bucket
	binding netip.AddrPort
}

// Guard charges one worker's failed authentications.
type Guard struct {
	pub            Publisher
	saIvl, saTol   int64
	srcIvl, srcTol int64
	sas            map[uint32]*saState
	srcs           map[netip.AddrPort]*bucket
	now            func() int64
	stats          Stats
	saVal          bpf.FloodSA
	srcKey         bpf.FloodSrcKey
	srcVal         bpf.FloodSrc
	sweepAt        int
}

// Now is CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
func Now() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// New returns a Guard writing to pub; now is the clock (nil: Now).
func New(cfg Config, pub Publisher, now func() int64) (*Guard, error) {
	if err := cfg.SA.Check("flood.sa"); err != nil {
		return nil, err
	}
	if err := cfg.Source.Check("flood.source"); err != nil {
		return nil, err
	}
	if now == nil {
		now = Now
	}
	g := &Guard{pub: pub, now: now, sas: make(map[uint32]*saState), srcs: make(map[netip.AddrPort]*bucket), sweepAt: 4096}
	g.saIvl, g.saTol = cfg.SA.gcra()
	g.srcIvl, g.srcTol = cfg.Source.gcra()
	return g, nil
}

// Stats returns the Guard's live figures.
func (g *Guard) Stats() *Stats { return &g.stats }

// charge adds one failure at now and reports whether the budget is spent
// and XDP does not know yet (so the caller publishes).
func (b *bucket) charge(now, ivl, tol int64) bool {
	b.tat = max(b.tat, now) + ivl
	return b.tat > now+tol && b.published <= now+tol
}

// Failed charges a failed authentication of the inbound SA spi, whose
// current binding is binding, received from src.
func (g *Guard) Failed(spi uint32, binding, src netip.AddrPort) {
	now := g.now()
	g.stats.Failures.Add(1)
	s := g.sas[spi]
	if s == nil {
		g.sweep(now)
		s = &saState{}
		g.sas[spi] = s
	}
	moved := s.binding != binding
	s.binding = binding
	if s.charge(now, g.saIvl, g.saTol) || moved && s.published > 0 {
		g.publishSA(spi, s)
	}
	if src == binding {
		return // the binding has no source budget: it is never dropped
	}
	b := g.srcs[src]
	if b == nil {
		b = &bucket{}
		g.srcs[src] = b
	}
	if b.charge(now, g.srcIvl, g.srcTol) {
		b.published = b.tat
		g.srcKey = bpf.FloodSrcKey{Addr: addr16(src.Addr()), Port: htons(src.Port())}
		g.srcVal = bpf.FloodSrc{Tat: uint64(b.tat), Tolerance: uint64(g.srcTol)}
		g.count(g.pub.PutSrc(&g.srcKey, &g.srcVal))
	}
}

// Rebound tells the Guard that SA spi's binding moved (an authenticated
// packet from a new source): if XDP holds a budget for the SA, it learns
// the new binding, which it must never drop.
func (g *Guard) Rebound(spi uint32, binding netip.AddrPort) {
	s := g.sas[spi]
	if s == nil || s.binding == binding {
		return
	}
	s.binding = binding
	if s.published > 0 {
		g.publishSA(spi, s)
	}
}

func (g *Guard) publishSA(spi uint32, s *saState) {
	s.published = s.tat
	g.saVal = bpf.FloodSA{Tat: uint64(s.tat), Tolerance: uint64(g.saTol), BindAddr: addr16(s.binding.Addr()), BindPort: htons(s.binding.Port())}
	g.count(g.pub.PutSA(spi, &g.saVal))
}

func (g *Guard) count(err error) {
	if err != nil {
		g.stats.PublishErrors.Add(1)
		return
	}
	g.stats.Published.Add(1)
}

// sweep forgets buckets that are idle (tat in the past: a fresh bucket
// would be the same) once the maps grow, so memory follows the sources
// and SAs failing now, not all that ever failed.
func (g *Guard) sweep(now int64) {
	if len(g.sas)+len(g.srcs) < g.sweepAt {
		return
	}
	for k, s := range g.sas {
		if s.tat < now && s.published < now {
			delete(g.sas, k)
		}
	}
	for k, b := range g.srcs {
		if b.tat < now && b.published < now {
			delete(g.srcs, k)
		}
	}
	g.sweepAt = max(4096, 2*(len(g.sas)+len(g.srcs)))
}

// addr16 is a as XDP writes packet sources: IPv4 as ::ffff:a.b.c.d.
func addr16(a netip.Addr) [16]uint8 { return a.As16() }

// Addr16 is addr16 for other packages' tests and tools.
func Addr16(a netip.Addr) [16]uint8 { return addr16(a) }

// htons gives a port the layout XDP compares with the UDP header's field:
// network byte order read as a host-order (little-endian) __u16.
func htons(p uint16) uint16 { return p<<8 | p>>8 }

// Htons is htons for tests and tools.
func Htons(p uint16) uint16 { return htons(p) }
