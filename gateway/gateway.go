// Package gateway assembles a running xesp data path from a validated
// configuration: it loads and attaches the XDP programs, creates the
// shared UMEM and every worker's AF_XDP sockets, starts the workers, the
// neighbour resolver and the manager, loads the configured SAs, and tears
// it all down again in the reverse order, or hands the running data path
// to a successor process (handover.go) and takes one over
// (Options.Upgrade). `xesp run` and the end-to-end tests use it; it holds
// no packet logic of its own.
package gateway

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/etcdseq"
	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/manager"
	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/flood"
	"github.com/xesp/xesp/dataplane/neigh"
	"github.com/xesp/xesp/dataplane/slowpath"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/instlock"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

// warmMax bounds how many destinations a hand-over start resolves before
// its workers read: the old daemon's next hops, then the SAs' bindings
// (the peer MACs its workers had learnt are not handed over).
const warmMax = 4096

// neighWarmup bounds how long a hand-over start waits for the next hops
// the old daemon had resolved; the kernel usually has them all cached.
const neighWarmup = 500 * time.Millisecond

// floodInterval is how often flood_drops is read for events.
const floodInterval = time.Second

// Gateway is a running data path.
type Gateway struct {
	Config  *config.Config
	Loader  *loader.Instance
	Maps    *maps.Set
	UMEM    *xsk.UMEM
	Workers worker.Set
	// Sockets[w] are worker w's public and private sockets it transmits
	// on (on RX queue w mod the side's queue count); RX is every socket,
	// one per worker on every RX queue of each side.
	Sockets   [][2]*xsk.Socket
	RX        []QueueSocket
	Neighbors *neigh.Resolver
	SAD       *sad.SAD
	// Persisted counts the periodic state snapshots completed (journal
	// append or base, and the API-SA flush after it).
	Persisted atomic.Uint64
	Manager   *manager.Manager
	// Seq holds the outbound sequence reservations in Config.StateDir.
	Seq *seqstore.Store
	// Etcd is the client of the config's etcd (nil without one); EtcdSeq
	// keeps the sequence reservations there instead of in Seq when
	// etcd.sequence is on, and EtcdSource feeds this node's SAs.
	Etcd       *clientv3.Client
	EtcdSeq    *etcdseq.Store
	EtcdSource *etcdsrc.Source
	// SlowPath serves the NAT-T port for what XDP passes up: reassembled
	// fragments and IKE.
	SlowPath *slowpath.Server
	// Lifetime enforces the SAs' soft and hard lifetimes and the
	// sequence-number space.
	Lifetime *lifetime.Enforcer
	// Flood are the workers' flood-budget guards (none when
	// public.flood.disabled), for their figures.
	Flood []*flood.Guard
	// Restored is what Start took over from the previous run's replay
	// window and binding snapshot (state_dir/rx.state).
	Restored Restored
	Started  time.Time

	log     *slog.Logger
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	errs    chan error
	failure atomic.Pointer[error] // the first component failure, for health
	once    sync.Once
	rest    *restorer  // the previous run's state, handed out once per SA
	apiSAs  *apiSAs    // state_dir's copy of the SAs added through the API
	floods  floodWatch // SAs under flood, from flood_drops
	// stateLock is state_dir's instance lock, held from before anything
	// shared is touched until the very end of teardown.
	stateLock *instlock.Lock
	// upgrade is the hand-over this gateway started from; until start
	// succeeds, its teardown must leave the sockets, XSK slots and XDP
	// programs alone (the predecessor's, still in use).
	upgrade *Upgrade
	// handoverState is the memfd of the replay windows handed to a
	// successor, held until the hand-over ends; handoverSnap the same
	// snapshot, written to state_dir if the successor fails.
	handoverState int
	handoverSnap  *rxstate.Snapshot
}

// Options change how Start behaves beyond the configuration.
type Options struct {
	Log *slog.Logger
	// NoPin keeps nothing in bpffs (tests, dry runs).
	NoPin bool
	// LifetimeInterval is how often SA lifetimes are checked (1 s).
	LifetimeInterval time.Duration
	// StateInterval is how often the replay windows and NAT bindings are
	// snapshotted to state_dir (DefaultStateInterval); after a crash,
	// what an SA accepted in the last interval can be replayed once.
	StateInterval time.Duration
	// CipherIdle is how long an SA carries no packet before its worker
	// drops its cipher, rebuilt from the key on its next packet
	// (worker.Config.CipherIdle; 0: worker.DefaultCipherIdle).
	CipherIdle time.Duration

	// Upgrade continues a running daemon's data path handed over by it
	// (Handover) instead of building one: its sockets stay bound and
	// steered throughout. Start owns its descriptors.
	Upgrade *Upgrade

	// Prepared is what Prepare built for this config ahead of the start.
	Prepared *Prepared

	pinLock *instlock.Lock // handed over by a previous process
}

// Prepared is the part of a start that needs nothing of a running
// daemon: the SA database with the configured SAs placed on their
// workers. A successor in a hitless upgrade builds it before it asks for
// the hand-over, so it stays out of the gap the RX rings must bridge (at
// a million SA pairs it is seconds).
type Prepared struct {
	cfg *config.Config
	sad *sad.SAD
}

// Prepare builds cfg's SA database for a Start with cfg.
func Prepare(cfg *config.Config) (*Prepared, error) {
	d, err := sad.New(sad.Options{Workers: cfg.Workers, MaxSAs: cfg.MaxSAs})
	if err != nil {
		return nil, err
	}
	if err := d.AddAll(cfg.SAList); err != nil {
		return nil, fmt.Errorf("load configured SAs: %w", err)
	}
	return &Prepared{cfg: cfg, sad: d}, nil
}

// Start brings the data path up. On error everything it built is torn
// down again.
//
// Every error names what failed by its config path and how to fix it, in
// one line: an operator's mistake at start is never a stack trace.
func Start(ctx context.Context, cfg *config.Config, o Options) (*Gateway, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if cfg.Public.Interface == cfg.Private.Interface {
		return nil, fmt.Errorf("config: private.interface: one-arm mode (%s on both sides) is not supported: the XDP programs need one interface each", cfg.Public.Interface)
	}
	// g stays set when start returns an error (its named result would
	// be nil), so the teardown of what was built always has a receiver.
	g := &Gateway{Config: cfg, log: o.Log, errs: make(chan error, 16)}
	// The instance lock comes before anything shared is touched (pinned
	// maps, links, XSK slots, sockets): a second daemon on the same
	// state_dir or pin directory stops here and leaves the running one
	// alone. The loader takes the pin directory's lock.
	var err error
	if u := o.Upgrade; u != nil {
		g.upgrade = u
		if err := u.check(cfg); err != nil {
			u.closeFDs()
			return nil, err
		}
		g.stateLock, o.pinLock, err = u.locks(cfg)
		if err == nil {
			err = g.start(ctx, o)
		}
		if err != nil {
			u.closeFDs()
			if o.pinLock != nil && g.Loader == nil {
				o.pinLock.Release()
			}
			g.teardown(true)
			return nil, err
		}
		return g, nil
	}
	if g.stateLock, err = instlock.StateDir(cfg.StateDir); err != nil {
		if errors.Is(err, instlock.ErrHeld) {
			return nil, err
		}
		return nil, fmt.Errorf("%w (state_dir must be a directory root can create and write, not open to others)", err)
	}
	if err := g.start(ctx, o); err != nil {
		g.teardown(false)
		return nil, err
	}
	return g, nil
}

// interfaceByName finds the interface a config field names, or says
// which field to fix.
func interfaceByName(field, name string) (*net.Interface, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return nil, fmt.Errorf("%s: %q: no such network interface (list them with `ip link`, fix %s in the config)", field, name, field)
	}
	return ifi, nil
}

func (g *Gateway) start(ctx context.Context, o Options) (err error) {
	cfg := g.Config
	pubIf, err := interfaceByName("public.interface", cfg.Public.Interface)
	if err != nil {
		return err
	}
	privIf, err := interfaceByName("private.interface", cfg.Private.Interface)
	if err != nil {
		return err
	}

	g.Loader, err = loader.Load(loader.Options{
		Public: cfg.Public.Interface, Private: cfg.Private.Interface,
		Generic: cfg.XDPMode == "generic", PinRoot: cfg.PinDir, NoPin: o.NoPin, Lock: o.pinLock,
		SACapacity: uint32(cfg.MaxSAs), PolicyCapacity: uint32(cfg.MaxSAs),
	})
	var held *instlock.HeldError
	if errors.As(err, &held) {
		// One line naming pin_dir, the holder's pid and both ways out.
		return fmt.Errorf("%w, or give this one another pin_dir", held)
	}
	if err != nil {
		return fmt.Errorf("pin_dir %s: %w", cfg.PinDir, err)
	}
	g.Maps = g.Loader.Maps
	if err := g.Maps.Config.Set(bpf.Config{NattPort: uint16(cfg.NATTPort), Workers: uint16(cfg.Workers),
		PublicVlan: uint16(cfg.Public.VLAN.ID), PrivateVlan: uint16(cfg.Private.VLAN.ID)}); err != nil {
		return fmt.Errorf("write XDP config: %w", err)
	}
	// Sockets on every RX queue of both sides: RSS spreads UDP 4500 by
	// ports, so any queue may carry any SA's packets.
	var queues [2]int
	for i, ifi := range []*net.Interface{pubIf, privIf} {
		if queues[i], err = rxQueues(ifi.Name); err != nil {
			return err
		}
		if n := queues[i] * cfg.Workers; n > loader.DefaultXSKSlots {
			return fmt.Errorf("workers: %d workers × %d RX queues of %s = %d AF_XDP sockets exceed the XSK map's %d slots: lower workers or the queue count (ethtool -L)",
				cfg.Workers, queues[i], ifi.Name, n, loader.DefaultXSKSlots)
		}
	}
	var adopted []*xsk.Socket
	if g.upgrade != nil {
		// A hand-over passes a socket per worker on every RX queue the
		// predecessor served, and this process serves the same queues.
		if err := compareQueues(queues, g.upgrade.queues(), g.upgrade.Handover.PID); err != nil {
			return err
		}
		// The slots hold the predecessor's sockets, which are ours now.
		if g.UMEM, adopted, err = g.upgrade.adoptUMEM(); err != nil {
			return fmt.Errorf("upgrade: %w", err)
		}
		for w := range cfg.Workers {
			for side, ifi := range []*net.Interface{pubIf, privIf} {
				for q := range queues[side] {
					i := handoverIndex(w, side, q, queues)
					if s := adopted[i]; s.Ifindex() != ifi.Index || s.Queue() != q {
						return fmt.Errorf("upgrade: handed-over socket %d is on ifindex %d queue %d, want worker %d's on %s (ifindex %d) queue %d", i, s.Ifindex(), s.Queue(), w, ifi.Name, ifi.Index, q)
					}
				}
			}
		}
	} else {
		// Clear sockets a previous process left in pinned XSK maps: their
		// fds are gone, and a stale slot would swallow packets.
		for i := uint32(0); i < loader.DefaultXSKSlots; i++ {
			g.Maps.XSKPublic.Delete(i)
			g.Maps.XSKPrivate.Delete(i)
		}
		g.UMEM, err = xsk.New(xsk.Config{
			FrameSize: uint32(cfg.UMEM.FrameSize), FrameCount: uint32(cfg.UMEM.Frames),
			FillSize:       uint32(fillRingFor(cfg.UMEM.FillRing, cfg.UMEM.Frames, queues[0]+queues[1])),
			CompletionSize: uint32(cfg.UMEM.CompletionRing),
			RxSize:         uint32(cfg.UMEM.RXRing), TxSize: uint32(cfg.UMEM.TXRing),
		})
		if err != nil {
			return fmt.Errorf("create UMEM: %w", err)
		}
	}

	served := []int{pubIf.Index, privIf.Index}
	for _, v := range []struct {
		field string
		vlan  config.VLAN
	}{{"public.vlan_interface", cfg.Public.VLAN}, {"private.vlan_interface", cfg.Private.VLAN}} {
		if v.vlan.Interface != "" {
			ifi, err := interfaceByName(v.field, v.vlan.Interface)
			if err != nil {
				return err
			}
			served = append(served, ifi.Index) // its neighbours are the side's next hops
		}
	}
	g.Neighbors, err = neigh.New(neigh.Config{Ifindexes: served})
	if err != nil {
		return fmt.Errorf("neighbour resolver: %w", err)
	}
	if len(cfg.Private.NextHop) == 6 {
		if err := g.Neighbors.SetDefault(privIf.Index, [6]byte(cfg.Private.NextHop)); err != nil {
			return fmt.Errorf("private next hop: %w", err)
		}
	}
	pubMAC, err := neigh.InterfaceMAC(pubIf.Index)
	if err != nil {
		return fmt.Errorf("public interface MAC: %w", err)
	}
	privMAC, err := neigh.InterfaceMAC(privIf.Index)
	if err != nil {
		return fmt.Errorf("private interface MAC: %w", err)
	}

	g.Seq, err = seqstore.Open(filepath.Join(cfg.StateDir, "seq"), seqstore.Options{})
	if errors.Is(err, seqstore.ErrLocked) {
		return fmt.Errorf("state_dir %s: %w: another xesp daemon uses it; stop it, or give this one another state_dir", cfg.StateDir, err)
	}
	if err != nil {
		return fmt.Errorf("state_dir %s: %w (state_dir must be a directory root can create and write, not open to others)", cfg.StateDir, err)
	}
	var snap *rxstate.Snapshot
	if g.upgrade != nil {
		// Taken with the predecessor's workers stopped: exact.
		if snap, err = g.upgrade.rxState(); err != nil {
			return fmt.Errorf("upgrade: %w", err)
		}
	} else {
		var info rxstate.LoadInfo
		snap, info, err = rxstate.LoadDetail(filepath.Join(cfg.StateDir, rxStateFile))
		g.Restored.JournalRecords, g.Restored.TornBytes = info.JournalRecords, info.TornBytes
	}
	if err != nil {
		return fmt.Errorf("state_dir: %w (remove the file to start with fresh replay windows, which accepts replays of earlier traffic)", err)
	}
	rest := newRestorer(g.Seq, snap)
	g.rest = rest
	g.Restored.Clean = snap.Clean
	if err := g.openEtcd(ctx); err != nil {
		return err
	}
	pubMTU, privMTU := pubIf.MTU, privIf.MTU
	if cfg.Public.MTU != 0 {
		pubMTU = cfg.Public.MTU
	}
	if cfg.Private.MTU != 0 {
		privMTU = cfg.Private.MTU
	}
	addrIf := privIf // where the private side's addresses live: the VLAN device if any
	if v := cfg.Private.VLAN.Interface; v != "" {
		if addrIf, err = interfaceByName("private.vlan_interface", v); err != nil {
			return err
		}
	}
	privAddrs, err := interfaceAddrs(addrIf)
	if err != nil {
		return fmt.Errorf("private side %s: addresses: %w", addrIf.Name, err)
	}
	events := make(chan worker.BindingChange, 4096)
	seqReqs := make(chan worker.SeqRequest, 4096)
	// socks[side][queue][worker]. The first socket opened on a queue owns
	// its fill and completion rings: opening queue q's from worker
	// q mod workers on spreads ring ownership over the workers, and with
	// queues ≥ workers each worker owns the rings of the queue it
	// transmits on, so its completions come back to its own pool.
	var socks [2][][]*xsk.Socket
	for side, ifi := range []*net.Interface{pubIf, privIf} {
		socks[side] = make([][]*xsk.Socket, queues[side])
		for q := range queues[side] {
			socks[side][q] = make([]*xsk.Socket, cfg.Workers)
			for k := range cfg.Workers {
				w := (q + k) % cfg.Workers
				var s *xsk.Socket
				if adopted != nil {
					s = adopted[handoverIndex(w, side, q, queues)]
				} else if s, err = g.UMEM.Open(ifi.Index, q); err != nil {
					return fmt.Errorf("worker %d: AF_XDP socket on %s queue %d: %w", w, ifi.Name, q, err)
				}
				socks[side][q][w] = s
				g.RX = append(g.RX, QueueSocket{Private: side == 1, Queue: q, Worker: w, XSK: s})
			}
		}
	}
	for w := 0; w < cfg.Workers; w++ {
		// Worker w transmits on queue w mod queues of each side and
		// receives on all of them.
		var home [2]*xsk.Socket
		var others [2][]*xsk.Socket
		for side := range socks {
			hq := w % queues[side]
			home[side] = socks[side][hq][w]
			for q := range socks[side] {
				if q != hq {
					others[side] = append(others[side], socks[side][q][w])
				}
			}
		}
		pub, priv := home[0], home[1]
		g.Sockets = append(g.Sockets, home)
		var guard *flood.Guard
		if fc := cfg.Public.Flood; !fc.Disabled {
			guard, err = flood.New(flood.Config{
				SA:     flood.Budget{Rate: fc.SA.Rate, Burst: fc.SA.Burst},
				Source: flood.Budget{Rate: fc.Source.Rate, Burst: fc.Source.Burst},
			}, g.Maps.Flood, nil)
			if err != nil {
				return fmt.Errorf("config: public.%w", err)
			}
			g.Flood = append(g.Flood, guard)
		}
		wk, err := worker.New(worker.Config{
			Flood: guard,
			ID:    w, UMEM: g.UMEM, Public: pub, Private: priv, PublicRX: others[0], PrivateRX: others[1],
			PublicMAC: pubMAC, PrivateMAC: privMAC,
			PublicMTU: pubMTU, PrivateMTU: privMTU, Workers: cfg.Workers,
			PrivateAddrs: privAddrs, OuterTTL: uint8(cfg.Tunnel.OuterTTL),
			PublicVLAN: uint16(cfg.Public.VLAN.ID), PublicTPID: cfg.Public.VLAN.TPID,
			PrivateVLAN: uint16(cfg.Private.VLAN.ID), PrivateTPID: cfg.Private.VLAN.TPID,
			DSCP: cfg.Tunnel.FixedDSCP, FixDSCP: cfg.Tunnel.HasDSCP, ICMPRate: cfg.Tunnel.ICMPRate,
			Neighbors: g.Neighbors, BindingEvents: events, SeqRequests: seqReqs,
			// Handed-over RX rings hold packets already: nothing is read
			// before the SAs are installed (Release below).
			Held:       adopted != nil,
			CipherIdle: cmp.Or(o.CipherIdle, cfg.Idle.CipherAfter),
		})
		if err != nil {
			return err
		}
		g.Workers = append(g.Workers, wk)
	}

	if p := o.Prepared; p != nil {
		if p.cfg != cfg {
			return errors.New("gateway: Prepared was built for another config")
		}
		g.SAD = p.sad
	} else if g.SAD, err = sad.New(sad.Options{Workers: cfg.Workers, MaxSAs: cfg.MaxSAs}); err != nil {
		return err
	}
	g.Manager, err = manager.New(manager.Options{SAD: g.SAD, Maps: g.Maps, Workers: g.Workers, Events: events,
		EventsLost: g.bindingEventsLost, Seq: g.seqStore(), SeqRequests: seqReqs, Restore: rest.entry, Log: o.Log})
	if err != nil {
		return err
	}

	runCtx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	g.goRun("neighbour resolver", func() error { return g.Neighbors.Run(runCtx) })
	for _, wk := range g.Workers {
		g.goRun(fmt.Sprintf("worker %d", wk.ID()), func() error { return wk.Run(runCtx) })
	}
	// Sockets go into the XSK maps only once their worker runs and has
	// filled the fill rings, so XDP never redirects into a socket nobody
	// serves.
	for _, wk := range g.Workers {
		if err := wk.Sync(ctx); err != nil {
			return err
		}
	}
	for _, s := range g.RX {
		m, side := g.Maps.XSKPublic, "public"
		if s.Private {
			m, side = g.Maps.XSKPrivate, "private"
		}
		if err := m.Set(s.Index(cfg.Workers), s.XSK.FD()); err != nil {
			return fmt.Errorf("worker %d: publish %s socket of queue %d: %w", s.Worker, side, s.Queue, err)
		}
	}
	if o.Prepared == nil {
		if err := g.SAD.AddAll(cfg.SAList); err != nil {
			return fmt.Errorf("load configured SAs: %w", err)
		}
	}
	// Before the bindings and the first sync, so the SAs added through the
	// API in an earlier run continue their state as the config's do.
	g.apiSAs = newAPISAs(g)
	if g.Restored.APISAs, err = g.apiSAs.restore(); err != nil {
		return err
	}
	g.Restored.Bindings = rest.bindings(g.SAD)
	if err := g.Manager.Sync(ctx); err != nil {
		return fmt.Errorf("install configured SAs: %w", err)
	}
	if g.upgrade != nil {
		// Resolve the next hops first: the queued packets arrive in a
		// burst, more than the workers park while waiting for one.
		g.Restored.Neighbors = g.Neighbors.Warm(ctx, g.warmList(), neighWarmup)
	}
	for _, wk := range g.Workers {
		wk.Release()
	}
	rest.mu.Lock()
	g.Restored.Windows, g.Restored.Counters = rest.windows, rest.counted
	rest.mu.Unlock()
	// Adopted maps may hold what the previous process published for SAs
	// this one does not have.
	if g.Loader.AdoptedMaps {
		if g.Restored.StaleSAs, g.Restored.StalePolicies, err = g.Manager.PruneStale(); err != nil {
			return fmt.Errorf("prune adopted maps: %w", err)
		}
	}
	g.goRun("manager", func() error { return g.Manager.Run(runCtx) })
	g.Lifetime, err = lifetime.New(lifetime.Options{SAD: g.SAD, Interval: o.LifetimeInterval, Log: o.Log,
		Usage: func(id sa.ID) (lifetime.Usage, bool) {
			c, ok := g.Manager.Counters(id)
			return lifetime.Usage{Packets: c.Packets, Bytes: c.Bytes, Seq: c.Seq, Since: rest.since(id), LastSeen: c.LastSeen}, ok
		},
		IdleTimeout: cfg.Idle.Every, IdleRemove: cfg.Idle.Remove, LastKeepalive: g.Manager.LastKeepalive,
		// Quiet SAs are not rechecked every second (control/lifetime).
		MaxPacketRate: lifetime.GatewayMaxPacketRate, MaxByteRate: lifetime.GatewayMaxByteRate})
	if err != nil {
		return err
	}
	g.goRun("lifetime", func() error { return g.Lifetime.Run(runCtx) })
	every := o.StateInterval
	if every <= 0 {
		every = DefaultStateInterval
	}
	g.goRun("state snapshot", func() error { return g.persistState(runCtx, every) })
	if len(g.Flood) > 0 {
		g.goRun("flood watch", func() error { return g.watchFloods(runCtx, floodInterval) })
	}
	if err := g.startEtcdSource(ctx, runCtx); err != nil {
		return err
	}
	// Before XDP attaches, so a fragment passed up never meets a closed
	// port (the kernel would answer ICMP port unreachable).
	injectors := make([]slowpath.Injector, len(g.Workers))
	for i, wk := range g.Workers {
		injectors[i] = wk
	}
	g.SlowPath, err = slowpath.New(slowpath.Options{
		Addrs: cfg.Public.Addrs, Port: cfg.NATTPort, SAD: g.SAD, Workers: injectors,
		IKEForward: cfg.SlowPath.IKEForwardAddr, Log: o.Log,
	})
	if err != nil {
		return err
	}
	g.goRun("slow path", func() error { return g.SlowPath.Run(runCtx) })
	if err := g.Loader.Attach(); err != nil {
		if cfg.XDPMode != "generic" && errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("xdp_mode: native: %w: the driver has no native XDP; set xdp_mode: generic", err)
		}
		return fmt.Errorf("xdp_mode: %s: %w", cfg.XDPMode, err)
	}
	g.Started = time.Now()
	g.upgrade = nil // from here this gateway owns what it was handed
	o.Log.Info("xesp data path up", "upgraded_from", upgradedFrom(o.Upgrade),
		"public", fmt.Sprintf("%s (xdp %s)", pubIf.Name, g.Loader.Public.Mode),
		"private", fmt.Sprintf("%s (xdp %s)", privIf.Name, g.Loader.Private.Mode),
		"public_rx_queues", queues[0], "private_rx_queues", queues[1],
		"af_xdp", g.Sockets[0][0].Mode().String(), "workers", cfg.Workers, "sas", len(cfg.SAList), "api_sas", g.Restored.APISAs,
		"restored_windows", g.Restored.Windows, "restored_bindings", g.Restored.Bindings, "restored_counters", g.Restored.Counters, "clean_snapshot", g.Restored.Clean, "journal_records", g.Restored.JournalRecords, "journal_torn_bytes", g.Restored.TornBytes,
		"warmed_neighbors", g.Restored.Neighbors, "pruned_sas", g.Restored.StaleSAs, "pruned_policies", g.Restored.StalePolicies)
	return nil
}

// warmList is what a hand-over start resolves first: the next hops the
// old daemon had resolved and the outbound SAs' bindings, at most warmMax.
func (g *Gateway) warmList() []netip.Addr {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	add := func(a netip.Addr) {
		if a.IsValid() && !seen[a] && len(out) < warmMax {
			seen[a] = true
			out = append(out, a)
		}
	}
	for _, a := range g.upgrade.Handover.Neighbors {
		add(a)
	}
	var page []sad.Record
	var cur uint64
	for len(out) < warmMax {
		page, cur = g.SAD.List(cur, 1024, page[:0])
		for i := range page {
			if page[i].ID.Dir == sa.Out {
				add(page[i].Binding.Addr())
			}
		}
		if cur == 0 {
			break
		}
	}
	return out
}

func upgradedFrom(u *Upgrade) int {
	if u == nil {
		return 0
	}
	return u.Handover.PID
}

// interfaceAddrs are ifi's unicast addresses, global ones first: the
// sources of the ICMP errors the workers send.
func interfaceAddrs(ifi *net.Interface) ([]netip.Addr, error) {
	as, err := ifi.Addrs()
	if err != nil {
		return nil, err
	}
	var global, local []netip.Addr
	for _, a := range as {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() {
			local = append(local, ip)
		} else {
			global = append(global, ip)
		}
	}
	return append(global, local...), nil
}

func (g *Gateway) goRun(what string, f func() error) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		if err := f(); err != nil {
			err = fmt.Errorf("%s: %w", what, err)
			g.failure.CompareAndSwap(nil, &err)
			select {
			case g.errs <- err:
			default:
			}
		}
	}()
}

// bindingEventsLost sums the binding changes the workers could not queue
// for the manager.
func (g *Gateway) bindingEventsLost() uint64 {
	var n uint64
	for _, w := range g.Workers {
		n += w.Stats().BindingEventsLost.Load()
	}
	return n
}

// Errors reports a component that stopped with an error; the daemon
// shuts down on the first one.
func (g *Gateway) Errors() <-chan error { return g.errs }

// Stop drains and tears the data path down. keepPinned leaves the XDP
// programs attached and the maps pinned for a restarted daemon to adopt.
func (g *Gateway) Stop(keepPinned bool) error {
	var err error
	g.once.Do(func() { err = g.teardown(keepPinned) })
	return err
}

func (g *Gateway) teardown(keepPinned bool) error {
	var errs []error
	if g.upgrade != nil {
		// A failed hand-over start: what was handed over stays as it is
		// for the predecessor (or the next start) to deal with.
		keepPinned = true
	}
	// Unsteer first so nothing is redirected to sockets about to close.
	if g.Maps != nil && g.upgrade == nil {
		for _, s := range g.RX {
			if s.Private {
				g.Maps.XSKPrivate.Delete(s.Index(g.Config.Workers))
			} else {
				g.Maps.XSKPublic.Delete(s.Index(g.Config.Workers))
			}
		}
	}
	if g.cancel != nil {
		g.cancel()
	}
	g.wg.Wait()
	// With the workers stopped the windows are exact: the next run
	// continues them (a failed start leaves the last snapshot alone).
	if !g.Started.IsZero() && g.Manager != nil && g.Seq != nil {
		if err := g.saveState(context.Background()); err != nil {
			errs = append(errs, err)
		}
		if err := g.apiSAs.flush(g.SAD.Version()); err != nil {
			errs = append(errs, err)
		}
	}
	if g.apiSAs != nil {
		g.apiSAs.close()
	}
	// The slow path injects into workers: it stops before they close.
	if g.SlowPath != nil {
		g.SlowPath.Close()
	}
	for _, w := range g.Workers {
		w.Close()
	}
	if g.upgrade != nil && g.UMEM != nil {
		g.UMEM.Abandon() // the sockets' Close is a no-op after it
	}
	for _, s := range g.RX {
		if err := s.XSK.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if g.UMEM != nil {
		if err := g.UMEM.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if g.Neighbors != nil {
		g.Neighbors.Close()
	}
	if g.Seq != nil {
		errs = append(errs, g.Seq.Close())
	}
	if g.Etcd != nil {
		g.Etcd.Close()
	}
	if g.Loader != nil {
		if keepPinned {
			errs = append(errs, g.Loader.Close())
		} else {
			errs = append(errs, g.Loader.Detach())
		}
	}
	g.stateLock.Release()
	return errors.Join(errs...)
}
