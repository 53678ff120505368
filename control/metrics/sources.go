package metrics

import (
	"time"

	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/maps"
)

// Sources is everything the collector reads at scrape time. Nil or empty
// fields leave their metrics out (or, for the worker figures, at zero), so
// a partial daemon, a test or the CLI can expose what it has. The slices
// are read, never modified, and must not change after New.
type Sources struct {
	// Version is the build's version for xesp_build_info; empty takes the
	// main module's version from the binary's build information.
	Version string
	// Start is when the daemon started, for xesp_uptime_seconds; zero
	// means the time New was called.
	Start time.Time
	// Workers are the workers' live figures; the index is the worker ID.
	Workers []*worker.Stats
	// XDP reads the verdict counters (a *maps.Counters). The collector
	// serializes its calls, since maps.Counters reuses one buffer; give it
	// a Counters of its own so the CLI or the manager never shares it.
	XDP CounterReader
	// Sockets are the AF_XDP sockets of every worker on both sides.
	// (Side, Queue, Worker) must be unique.
	Sockets []Socket
	// UMEM reports where the frames are (an *xsk.UMEM).
	UMEM FrameAccountant
	// SAs counts the SAs by direction and state; it is called once per
	// scrape and must not block on the data path.
	SAs func() []SACount
	// SlowPath reports the NAT-T socket's outcomes by name (reassembled
	// ESP handed to workers, IKE relayed or dropped, keepalives, ...).
	SlowPath func() map[string]uint64
	// Lifetime reports SA lifetime expiries keyed "kind/limit" ("soft/bytes",
	// "hard/time", ...; lifetime.Enforcer.Counts).
	Lifetime func() map[string]uint64
	// Flood reports how many SAs are under a flood now (their budget
	// enforced in XDP within the last check) and the failed
	// authentications charged so far; nil without flood budgets.
	Flood func() (active int, failures uint64)
	// EtcdRejected reports the etcd SA records refused, by reason
	// (unknown_key: sealed under a key id the KEK file lacks; unsealable:
	// in clear where sealing is required, or not authenticating;
	// invalid: the rest).
	EtcdRejected func() map[string]uint64
	// APIConns reports the API's TCP listener: connections held now and
	// connections closed at accept for their source's share.
	APIConns func() (open int64, refused uint64)
	// Idle is how many inbound SAs are idle now (lifetime.Enforcer.IdleNow).
	Idle func() int64
}

// CounterReader is what the collector needs of maps.Counters.
type CounterReader interface {
	Read(dst *maps.Snapshot) error
}

// FrameAccountant is what the collector needs of xsk.UMEM.
type FrameAccountant interface {
	Accounting() xsk.Accounting
}

// XSK is what the collector needs of an xsk.Socket.
type XSK interface {
	Stats() (xsk.Stats, error)
	RxOccupancy() int
	FillOccupancy() int
	TxPending() int
	Ifindex() int
	Queue() int
}

var _ XSK = (*xsk.Socket)(nil)
var _ FrameAccountant = (*xsk.UMEM)(nil)
var _ CounterReader = (*maps.Counters)(nil)

// Side is the interface a socket is bound to.
type Side uint8

// Sides.
const (
	Public  Side = iota // phones, ESP-in-UDP
	Private             // the SIP core, cleartext
)

// String is the label value.
func (s Side) String() string {
	if s == Private {
		return "private"
	}
	return "public"
}

// Socket is one worker's AF_XDP socket on one side.
type Socket struct {
	Side   Side
	Worker int
	XSK    XSK
}

// SACount is how many SAs have one direction and state. Direction and
// State are label values, as packages sa and sad spell them ("in", "out";
// "active", "soft-expired", "hard-expired").
type SACount struct {
	Direction, State string
	Count            int
}
