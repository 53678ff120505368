// Package neigh resolves the Ethernet destination MAC for frames the data
// path transmits itself through AF_XDP, which bypass the kernel's routing
// and neighbour tables.
//
// It owns: an immutable, sharded snapshot dst → next-hop MAC that workers
// read lock-free (Lookup), a non-blocking request queue that workers post
// misses to (Request), and the control-plane loop (Run) that fills the
// snapshot from the kernel: RTM_GETROUTE gives the next hop and output
// interface, RTM_GETNEIGH its MAC, and RTNLGRP_NEIGH/route multicast keeps
// them current. Static per-destination MACs and per-interface default
// next-hop MACs (SetStatic, SetDefault) override the kernel.
//
// It must not: block, allocate or make syscalls on the worker side (Lookup,
// LookupOn, Request); learn MACs from packets (workers learn peers' MACs
// from authenticated inbound frames themselves); or write the kernel's
// neighbour table — resolution is left to the kernel, which already speaks
// ARP and ND correctly (retransmits, unicast probes, RFC 4861 states).
//
// Triggering resolution: when the kernel has no usable entry for a next
// hop, the resolver sends one zero-length UDP datagram to port 9 (discard,
// RFC 863) of the next hop from an unconnected socket bound to the output
// interface (SO_BINDTODEVICE). That makes the kernel run ARP or ND exactly
// as for any locally sent packet and is therefore acceptable: it needs no
// raw sockets and no second ARP implementation, and the cost on the wire is
// the kernel's own ARP/NS exchange plus one 28/48-byte datagram to the next
// hop itself (never to the final destination), which a host discards or
// answers with one rate-limited ICMP port unreachable. The same datagram
// sent to a STALE entry on refresh makes the kernel confirm it with a
// unicast probe, so a next hop that vanished turns FAILED and is withdrawn.
package neigh

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	shardBits    = 6
	numShards    = 1 << shardBits
	pendingSlots = 4096 // coalescing table size; collisions only delay a request
)

// Config tunes a Resolver. Zero fields take the defaults noted.
type Config struct {
	// Ifindexes are the interfaces whose next hops this resolver serves
	// (the AF_XDP TX interfaces). A destination routed out of any other
	// interface is refused and counted (WrongInterface).
	Ifindexes []int
	// QueueLen bounds pending requests (default 1024); Request drops and
	// counts beyond it.
	QueueLen int
	// Retries is how many times a next hop is re-probed before the
	// destinations waiting on it are given up (default 4).
	Retries int
	// RetryBase is the first retry delay; each further one doubles
	// (default 250ms: with 4 retries, 0.25+0.5+1+2+4 s outlasts the
	// kernel's own 3 s of ARP/ND solicitations).
	RetryBase time.Duration
	// HoldDown is how long requests for a given-up destination are ignored,
	// so a flow to a dead address does not keep the kernel probing at line
	// rate (default 5s).
	HoldDown time.Duration
	// Refresh is how often resolved next hops are re-read and, when the
	// kernel no longer holds them REACHABLE, re-probed (default 30s).
	Refresh time.Duration
}

func (c *Config) defaults() {
	if c.QueueLen <= 0 {
		c.QueueLen = 1024
	}
	if c.Retries <= 0 {
		c.Retries = 4
	}
	if c.RetryBase <= 0 {
		c.RetryBase = 250 * time.Millisecond
	}
	if c.HoldDown <= 0 {
		c.HoldDown = 5 * time.Second
	}
	if c.Refresh <= 0 {
		c.Refresh = 30 * time.Second
	}
}

// Stats are the resolver's counters since New.
type Stats struct {
	Requests       uint64 // requests queued
	Coalesced      uint64 // requests merged into one already pending
	QueueFull      uint64 // requests dropped, queue full
	Suppressed     uint64 // requests ignored during a hold-down
	Resolved       uint64 // requested destinations that got a MAC
	Probes         uint64 // trigger datagrams sent
	ProbeErrors    uint64 // trigger datagrams the kernel refused
	Retries        uint64 // re-probes of unresolved next hops
	GaveUp         uint64 // destinations given up after Retries
	RouteErrors    uint64 // destinations without a unicast route
	WrongInterface uint64 // destinations routed out of an interface not served
	MACChanges     uint64 // next hops whose MAC changed
	Withdrawn      uint64 // next hops withdrawn (kernel says FAILED)
	Events         uint64 // neighbour/route notifications processed
	EventOverruns  uint64 // notification socket overflows (full resync)
	Reroutes       uint64 // full route re-resolutions after route changes
	Snapshots      uint64 // snapshot shards published
}

type entry struct {
	mac [6]byte
	oif int32 // 0 for static entries: valid on any interface
}

type shard struct {
	m map[[16]byte]entry
}

type defaultsSnap struct {
	any    [6]byte // what Lookup falls back to
	hasAny bool
	per    map[int][6]byte
}

// Resolver maps destinations to next-hop MACs. Lookup, LookupOn and Request
// are safe for any number of concurrent callers; the rest is control plane.
type Resolver struct {
	cfg    Config
	served map[int]bool

	shards   [numShards]atomic.Pointer[shard]
	defs     atomic.Pointer[defaultsSnap]
	pending  [pendingSlots]atomic.Uint32
	reqs     chan [16]byte
	running  atomic.Bool
	counters counters

	q      *nlConn  // queries
	events *os.File // RTNLGRP_NEIGH + route groups, nonblocking (netpoller)
	probe  map[int]*probeSocks

	mu       sync.Mutex // guards the control state below
	dests    [numShards]map[[16]byte]*dest
	hops     map[hopKey]*nextHop
	static   map[[16]byte][6]byte
	defaults map[int][6]byte
	holddown map[[16]byte]time.Time
	dirty    [numShards]bool
}

type counters struct {
	requests, coalesced, queueFull, suppressed, resolved, probes, probeErrors,
	retries, gaveUp, routeErrors, wrongIf, macChanges, withdrawn, events,
	overruns, reroutes, snapshots atomic.Uint64
}

// New opens the resolver's netlink and trigger sockets in the calling
// thread's network namespace (they stay there; Run may then be called from
// any goroutine) and reads the served interfaces' names.
func New(cfg Config) (_ *Resolver, err error) {
	cfg.defaults()
	if len(cfg.Ifindexes) == 0 {
		return nil, errors.New("neigh: no interfaces to serve")
	}
	r := &Resolver{
		cfg:      cfg,
		served:   map[int]bool{},
		reqs:     make(chan [16]byte, cfg.QueueLen),
		probe:    map[int]*probeSocks{},
		hops:     map[hopKey]*nextHop{},
		static:   map[[16]byte][6]byte{},
		defaults: map[int][6]byte{},
		holddown: map[[16]byte]time.Time{},
	}
	for i := range r.dests {
		r.dests[i] = map[[16]byte]*dest{}
		r.shards[i].Store(&shard{m: map[[16]byte]entry{}})
	}
	r.defs.Store(&defaultsSnap{per: map[int][6]byte{}})
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	if r.q, err = openNL(); err != nil {
		return nil, err
	}
	if r.events, err = openEvents(); err != nil {
		return nil, err
	}
	for _, ifx := range cfg.Ifindexes {
		if r.served[ifx] {
			continue // one-arm mode names the interface twice
		}
		name, _, err := r.q.getLink(ifx)
		if err != nil && name == "" {
			return nil, fmt.Errorf("neigh: interface %d: %w", ifx, err)
		}
		r.served[ifx] = true
		ps, err := openProbe(name)
		if err != nil {
			return nil, fmt.Errorf("neigh: interface %s: %w", name, err)
		}
		r.probe[ifx] = ps
	}
	return r, nil
}

// Close releases the sockets. Run must have returned.
func (r *Resolver) Close() error {
	var errs []error
	if r.q != nil {
		errs = append(errs, r.q.close())
	}
	if r.events != nil {
		errs = append(errs, r.events.Close())
	}
	for _, p := range r.probe {
		p.close()
	}
	return errors.Join(errs...)
}

func key(a netip.Addr) [16]byte { return a.Unmap().As16() }

func addrOf(k [16]byte) netip.Addr { return netip.AddrFrom16(k).Unmap() }

func shardOf(k *[16]byte) int { return int(k[15]^k[14]) & (numShards - 1) }

func slotOf(k *[16]byte) int {
	// Every input bit must reach the low bits: IPv4 addresses differ
	// only in the top bytes of the second word.
	h := binary.LittleEndian.Uint64(k[0:8])*0x9e3779b97f4a7c15 ^ binary.LittleEndian.Uint64(k[8:16])
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return int(h) & (pendingSlots - 1)
}

// Lookup returns the next-hop MAC for dst: a static entry, else what the
// kernel resolved, else the default MAC (SetDefault for interface 0, or for
// the only interface of a one-interface resolver). It never blocks or
// allocates; on a miss the caller drops the frame and calls Request.
func (r *Resolver) Lookup(dst netip.Addr) ([6]byte, bool) {
	k := key(dst)
	if e, ok := r.shards[shardOf(&k)].Load().m[k]; ok {
		return e.mac, true
	}
	if d := r.defs.Load(); d.hasAny {
		return d.any, true
	}
	return [6]byte{}, false
}

// LookupOn is Lookup for a frame about to leave on ifindex: a resolved entry
// counts only if the kernel routes dst out of that interface, and the
// interface's default MAC applies without a Request round trip.
func (r *Resolver) LookupOn(ifindex int, dst netip.Addr) ([6]byte, bool) {
	k := key(dst)
	if e, ok := r.shards[shardOf(&k)].Load().m[k]; ok && (e.oif == 0 || int(e.oif) == ifindex) {
		return e.mac, true
	}
	d := r.defs.Load()
	if mac, ok := d.per[ifindex]; ok {
		return mac, true
	}
	if mac, ok := d.per[0]; ok {
		return mac, true
	}
	return [6]byte{}, false
}

// Request asks Run to resolve dst. It never blocks: a request for a
// destination already pending is coalesced, one that finds the queue full
// is dropped; both are counted. Workers call it on every Lookup miss.
func (r *Resolver) Request(dst netip.Addr) {
	k := key(dst)
	slot := &r.pending[slotOf(&k)]
	if !slot.CompareAndSwap(0, 1) {
		r.counters.coalesced.Add(1)
		return
	}
	select {
	case r.reqs <- k:
		r.counters.requests.Add(1)
	default:
		slot.Store(0)
		r.counters.queueFull.Add(1)
	}
}

// release frees dst's coalescing slot once its request is settled.
func (r *Resolver) release(k [16]byte) { r.pending[slotOf(&k)].Store(0) }

// SetStatic pins dst to mac on every interface, overriding the kernel.
func (r *Resolver) SetStatic(dst netip.Addr, mac [6]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := key(dst)
	r.static[k] = mac
	r.dirty[shardOf(&k)] = true
	r.publish()
}

// DeleteStatic removes a static entry; dst falls back to the kernel.
func (r *Resolver) DeleteStatic(dst netip.Addr) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := key(dst)
	delete(r.static, k)
	r.dirty[shardOf(&k)] = true
	r.publish()
}

// SetDefault makes mac the next hop for every destination routed out of
// ifindex (ifindex 0: out of any served interface) that has no static
// entry, as for a deployment that configures its gateway's MAC: the kernel's
// neighbour table is then not consulted for that interface.
func (r *Resolver) SetDefault(ifindex int, mac [6]byte) error {
	if ifindex != 0 && !r.served[ifindex] {
		return fmt.Errorf("neigh: default for interface %d, which this resolver does not serve", ifindex)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.defaults[ifindex] = mac
	// Destinations already attached to a kernel next hop on that interface
	// switch to the default now.
	for s := range r.dests {
		for _, d := range r.dests[s] {
			if d.hop != nil && (ifindex == 0 || d.oif == ifindex) {
				r.detach(d)
				r.dirty[s] = true
				r.settle(d)
			}
		}
	}
	r.publishDefaults()
	r.publish()
	return nil
}

// Forget drops a destination the control plane no longer sends to (e.g.
// its SA was deleted), so the resolver's state does not grow forever.
func (r *Resolver) Forget(dst netip.Addr) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := key(dst)
	if d, ok := r.dests[shardOf(&k)][k]; ok {
		r.removeDest(d)
		r.publish()
	}
}

// InterfaceMAC returns the Ethernet address of ifindex in the resolver's
// network namespace.
func (r *Resolver) InterfaceMAC(ifindex int) ([6]byte, error) {
	_, mac, err := r.q.getLink(ifindex)
	return mac, err
}

// Stats returns a copy of the counters.
func (r *Resolver) Stats() Stats {
	c := &r.counters
	return Stats{
		Requests: c.requests.Load(), Coalesced: c.coalesced.Load(), QueueFull: c.queueFull.Load(),
		Suppressed: c.suppressed.Load(), Resolved: c.resolved.Load(), Probes: c.probes.Load(),
		ProbeErrors: c.probeErrors.Load(), Retries: c.retries.Load(), GaveUp: c.gaveUp.Load(),
		RouteErrors: c.routeErrors.Load(), WrongInterface: c.wrongIf.Load(), MACChanges: c.macChanges.Load(),
		Withdrawn: c.withdrawn.Load(), Events: c.events.Load(), EventOverruns: c.overruns.Load(),
		Reroutes: c.reroutes.Load(), Snapshots: c.snapshots.Load(),
	}
}

// publish replaces every dirty shard with a fresh immutable map built from
// the control state. Called with mu held. Only dirty shards are copied, so
// one new destination costs 1/numShards of the table, not all of it.
func (r *Resolver) publish() {
	for s := range r.dirty {
		if !r.dirty[s] {
			continue
		}
		r.dirty[s] = false
		m := make(map[[16]byte]entry, len(r.dests[s]))
		for k, d := range r.dests[s] {
			if mac, ok := r.macOf(d); ok {
				m[k] = entry{mac: mac, oif: int32(d.oif)}
			}
		}
		for k, mac := range r.static {
			if shardOf(&k) == s {
				m[k] = entry{mac: mac}
			}
		}
		r.shards[s].Store(&shard{m: m})
		r.counters.snapshots.Add(1)
	}
}

func (r *Resolver) publishDefaults() {
	d := &defaultsSnap{per: make(map[int][6]byte, len(r.defaults))}
	for ifx, mac := range r.defaults {
		d.per[ifx] = mac
	}
	if mac, ok := r.defaults[0]; ok {
		d.any, d.hasAny = mac, true
	} else if len(r.served) == 1 {
		for ifx := range r.served {
			d.any, d.hasAny = r.defaults[ifx]
		}
	}
	r.defs.Store(d)
}

// defaultFor returns the configured default MAC for an output interface.
func (r *Resolver) defaultFor(oif int) ([6]byte, bool) {
	if mac, ok := r.defaults[oif]; ok {
		return mac, true
	}
	mac, ok := r.defaults[0]
	return mac, ok
}

func (r *Resolver) macOf(d *dest) ([6]byte, bool) {
	if d.hop == nil {
		return r.defaultFor(d.oif)
	}
	return d.hop.mac, d.hop.have
}

// openEvents subscribes to neighbour and route changes. The socket is
// nonblocking and wrapped in an os.File so the netpoller can wake the
// reader, and a read deadline can stop it.
func openEvents() (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink event socket: %w", err)
	}
	// Bursts (a flush of thousands of entries) must not overflow it often;
	// when they do, ENOBUFS triggers a resync.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20)
	groups := uint32(1<<(unix.RTNLGRP_NEIGH-1) | 1<<(unix.RTNLGRP_IPV4_ROUTE-1) | 1<<(unix.RTNLGRP_IPV6_ROUTE-1))
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink event bind: %w", err)
	}
	return os.NewFile(uintptr(fd), "netlink-neigh-events"), nil
}
