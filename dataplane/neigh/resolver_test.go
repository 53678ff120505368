package neigh

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/lab/netns"
)

// topo is two namespaces joined by a veth: the resolver runs in a.
type topo struct {
	a, b       *netns.NS
	aIf, bIf   string
	aIdx       int
	aMAC, bMAC [6]byte
}

func newTopo(t *testing.T) *topo {
	t.Helper()
	tp := &topo{a: netns.ForTest(t, "nga"), b: netns.ForTest(t, "ngb")}
	tp.aIf, tp.bIf = netns.VethForTest(t, tp.a, tp.b)
	tp.a.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", tp.aIf)
	tp.b.MustRun("ip", "addr", "add", "192.0.2.2/24", "dev", tp.bIf)
	tp.a.MustRun("ip", "-6", "addr", "add", "2001:db8::1/64", "dev", tp.aIf, "nodad")
	tp.b.MustRun("ip", "-6", "addr", "add", "2001:db8::2/64", "dev", tp.bIf, "nodad")
	tp.b.MustRun("ip", "-6", "addr", "add", "fe80::b/64", "dev", tp.bIf, "nodad")
	for _, w := range []struct {
		ns   *netns.NS
		addr string
	}{{tp.a, "2001:db8::1"}, {tp.b, "2001:db8::2"}, {tp.b, "fe80::b"}} {
		if err := w.ns.WaitLocalRoute(netip.MustParseAddr(w.addr), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := tp.a.Do(func() error {
		ifc, err := net.InterfaceByName(tp.aIf)
		if err != nil {
			return err
		}
		tp.aIdx = ifc.Index
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	tp.aMAC = sysMAC(t, tp.a, tp.aIf)
	tp.bMAC = sysMAC(t, tp.b, tp.bIf)
	// Start from an empty neighbour table so resolution has to be triggered.
	tp.a.MustRun("ip", "neigh", "flush", "dev", tp.aIf)
	tp.a.MustRun("ip", "-6", "neigh", "flush", "dev", tp.aIf)
	return tp
}

// sysMAC reads an interface's MAC from sysfs, independently of this package.
func sysMAC(t *testing.T, ns *netns.NS, ifname string) [6]byte {
	t.Helper()
	out, err := ns.Run("cat", "/sys/class/net/"+ifname+"/address")
	if err != nil {
		t.Fatal(err)
	}
	hw, err := net.ParseMAC(strings.TrimSpace(string(out)))
	if err != nil || len(hw) != 6 {
		t.Fatalf("parse %q: %v", out, err)
	}
	return [6]byte(hw)
}

// resolver creates a Resolver in a (sockets bound there) and runs it until
// the test ends.
func (tp *topo) resolver(t *testing.T, cfg Config, run bool) *Resolver {
	t.Helper()
	if cfg.Ifindexes == nil {
		cfg.Ifindexes = []int{tp.aIdx}
	}
	var r *Resolver
	if err := tp.a.Do(func() (err error) {
		r, err = New(cfg)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	if run {
		go func() { done <- r.Run(ctx) }()
	} else {
		done <- nil
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// kernelNeigh returns `ip neigh show` for addr on a's veth.
func (tp *topo) kernelNeigh(t *testing.T, addr string) string {
	t.Helper()
	out, err := tp.a.Run("ip", "neigh", "show", addr, "dev", tp.aIf)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// waitFor polls cond; resolution involves a real ARP/ND round trip.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func resolveOK(t *testing.T, r *Resolver, dst string, want [6]byte) {
	t.Helper()
	a := netip.MustParseAddr(dst)
	if mac, ok := r.Lookup(a); ok {
		t.Fatalf("Lookup(%s) = %x before any request", dst, mac)
	}
	r.Request(a)
	waitFor(t, "resolution of "+dst, func() bool { _, ok := r.Lookup(a); return ok })
	if mac, _ := r.Lookup(a); mac != want {
		t.Fatalf("Lookup(%s) = %x, want %x", dst, mac, want)
	}
}

func macString(m [6]byte) string { return net.HardwareAddr(m[:]).String() }

// The core path for both families: the kernel has no entry, the resolver
// makes it resolve (ARP / ND on the veth), reads the entry and publishes
// B's MAC; destinations behind B as a gateway get B's MAC too, including
// through an IPv6 link-local gateway (which needs the zone on the probe).
func TestResolve(t *testing.T) {
	tp := newTopo(t)
	tp.a.MustRun("ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.2")
	tp.a.MustRun("ip", "-6", "route", "add", "2001:db8:ff::/64", "via", "2001:db8::2")
	tp.a.MustRun("ip", "-6", "route", "add", "2001:db8:ee::/64", "via", "fe80::b", "dev", tp.aIf)
	for _, c := range []struct{ name, dst, nexthop string }{
		{"v4 on-link", "192.0.2.2", "192.0.2.2"},
		{"v4 via gateway", "198.51.100.7", "192.0.2.2"},
		{"v6 on-link", "2001:db8::2", "2001:db8::2"},
		{"v6 via gateway", "2001:db8:ff::42", "2001:db8::2"},
		{"v6 via link-local gateway", "2001:db8:ee::9", "fe80::b"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A fresh resolver each time: the next hops repeat.
			r := tp.resolver(t, Config{Refresh: time.Hour}, true)
			tp.a.MustRun("ip", "neigh", "flush", "dev", tp.aIf)
			tp.a.MustRun("ip", "-6", "neigh", "flush", "dev", tp.aIf)
			if got := tp.kernelNeigh(t, c.nexthop); got != "" {
				t.Fatalf("neighbour %s present before the test: %q", c.nexthop, got)
			}
			before := r.Stats()
			resolveOK(t, r, c.dst, tp.bMAC)
			if got := tp.kernelNeigh(t, c.nexthop); !strings.Contains(got, "lladdr "+macString(tp.bMAC)) {
				t.Fatalf("kernel neighbour for %s = %q, want lladdr %s", c.nexthop, got, macString(tp.bMAC))
			}
			after := r.Stats()
			if after.Resolved != before.Resolved+1 || after.Probes <= before.Probes {
				t.Fatalf("stats before %+v after %+v: want one more resolved and a probe", before, after)
			}
		})
	}

	// A second destination behind the same, now known, gateway costs no
	// probe: the next hop is shared.
	tp.a.MustRun("ip", "neigh", "flush", "dev", tp.aIf)
	r := tp.resolver(t, Config{Refresh: time.Hour}, true)
	resolveOK(t, r, "198.51.100.7", tp.bMAC)
	before := r.Stats()
	resolveOK(t, r, "198.51.100.8", tp.bMAC)
	if after := r.Stats(); after.Probes != before.Probes {
		t.Fatalf("probes %d → %d for a known next hop", before.Probes, after.Probes)
	}
}

// Requests for one destination coalesce until it is settled, and a full
// queue drops rather than blocks. No Run: nothing drains the queue.
func TestRequestCoalescesAndDrops(t *testing.T) {
	tp := newTopo(t)
	r := tp.resolver(t, Config{QueueLen: 2}, false)
	a, b, c := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.11"), netip.MustParseAddr("2001:db8::12")
	for range 3 {
		r.Request(a)
	}
	r.Request(b)
	r.Request(c) // queue (2) is full
	s := r.Stats()
	if s.Requests != 2 || s.Coalesced != 2 || s.QueueFull != 1 {
		t.Fatalf("stats %+v: want 2 queued, 2 coalesced, 1 dropped", s)
	}
	// The dropped request freed its slot: it is retried, not coalesced.
	r.Request(c)
	if s := r.Stats(); s.QueueFull != 2 || s.Coalesced != 2 {
		t.Fatalf("stats %+v after re-request", s)
	}
}

// A next hop that never answers: no entry is published, it is re-probed
// Retries times and given up, and later requests are held down. A
// destination without a route and one routed out of an interface the
// resolver does not serve are refused and counted.
func TestUnreachable(t *testing.T) {
	tp := newTopo(t)
	// A second link in a that the resolver does not serve (no dummy
	// driver here: a veth pair with both ends in a).
	other := netns.UniqueName("vo")
	tp.a.MustRun("ip", "link", "add", other, "type", "veth", "peer", "name", other+"p")
	tp.a.MustRun("ip", "link", "set", other, "up")
	tp.a.MustRun("ip", "addr", "add", "10.9.0.1/24", "dev", other)
	r := tp.resolver(t, Config{Retries: 2, RetryBase: 40 * time.Millisecond, HoldDown: time.Hour, Refresh: time.Hour}, true)

	dead := netip.MustParseAddr("192.0.2.99")
	r.Request(dead)
	waitFor(t, "give-up", func() bool { return r.Stats().GaveUp == 1 })
	if mac, ok := r.Lookup(dead); ok {
		t.Fatalf("Lookup(dead) = %x", mac)
	}
	s := r.Stats()
	if s.Retries != 2 || s.Probes != 3 || s.Resolved != 0 {
		t.Fatalf("stats %+v: want 2 retries, 3 probes, nothing resolved", s)
	}
	// The probes really made the kernel solicit: its entry is unresolved.
	if got := tp.kernelNeigh(t, "192.0.2.99"); !strings.Contains(got, "INCOMPLETE") && !strings.Contains(got, "FAILED") {
		t.Fatalf("kernel neighbour for the dead next hop = %q, want INCOMPLETE or FAILED", got)
	}

	r.Request(dead)
	waitFor(t, "hold-down", func() bool { return r.Stats().Suppressed == 1 })

	r.Request(netip.MustParseAddr("203.0.113.5")) // no default route in a
	waitFor(t, "route error", func() bool { return r.Stats().RouteErrors == 1 })
	r.Request(netip.MustParseAddr("10.9.0.5")) // out of the other link
	waitFor(t, "wrong interface", func() bool { return r.Stats().WrongInterface == 1 })
	r.Request(netip.MustParseAddr("192.0.2.1")) // a's own address
	waitFor(t, "local address", func() bool { return r.Stats().RouteErrors == 2 })

	// Nothing was published for any of them, and the resolver still works.
	for _, d := range []string{"203.0.113.5", "10.9.0.5", "192.0.2.1"} {
		if mac, ok := r.Lookup(netip.MustParseAddr(d)); ok {
			t.Fatalf("Lookup(%s) = %x", d, mac)
		}
	}
	resolveOK(t, r, "192.0.2.2", tp.bMAC)
}

// Static entries win over the kernel; defaults cover everything else.
func TestStaticAndDefault(t *testing.T) {
	tp := newTopo(t)
	r := tp.resolver(t, Config{Refresh: time.Hour}, true)
	b := netip.MustParseAddr("192.0.2.2")
	pinned := [6]byte{0x02, 0, 0x5e, 0x10, 0, 0x01}

	r.SetStatic(b, pinned)
	if mac, ok := r.Lookup(b); !ok || mac != pinned {
		t.Fatalf("Lookup after SetStatic = %x %v", mac, ok)
	}
	// A request for it neither resolves nor replaces it.
	r.Request(b)
	kb := key(b)
	waitFor(t, "request settled", func() bool { return r.Stats().Requests == 1 && r.pending[slotOf(&kb)].Load() == 0 })
	if mac, _ := r.Lookup(b); mac != pinned {
		t.Fatalf("static entry replaced by %x", mac)
	}
	// Resolved first, pinned later: the pin still wins.
	r.DeleteStatic(b)
	resolveOK(t, r, "192.0.2.2", tp.bMAC)
	r.SetStatic(b, pinned)
	if mac, _ := r.Lookup(b); mac != pinned {
		t.Fatalf("Lookup = %x, want the static %x over the resolved", mac, pinned)
	}
	if mac, ok := r.LookupOn(tp.aIdx+100, b); !ok || mac != pinned {
		t.Fatalf("LookupOn(other interface) = %x %v: static entries apply everywhere", mac, ok)
	}
	r.DeleteStatic(b)
	if mac, _ := r.Lookup(b); mac != tp.bMAC {
		t.Fatalf("after DeleteStatic Lookup = %x, want the resolved %x", mac, tp.bMAC)
	}

	// The interface default: any destination, no request needed.
	gw := [6]byte{0x02, 0, 0x5e, 0x10, 0, 0x02}
	if err := r.SetDefault(tp.aIdx+100, gw); err == nil {
		t.Fatal("SetDefault accepted an interface the resolver does not serve")
	}
	if err := r.SetDefault(tp.aIdx, gw); err != nil {
		t.Fatal(err)
	}
	far := netip.MustParseAddr("2001:db8:77::1")
	if mac, ok := r.Lookup(far); !ok || mac != gw {
		t.Fatalf("Lookup(far) = %x %v, want the default %x", mac, ok, gw)
	}
	if mac, ok := r.LookupOn(tp.aIdx, far); !ok || mac != gw {
		t.Fatalf("LookupOn(far) = %x %v", mac, ok)
	}
	// The default also replaced the kernel's answer for b.
	if mac, _ := r.Lookup(b); mac != gw {
		t.Fatalf("Lookup(b) = %x, want the default %x", mac, gw)
	}
}

// MAC changes reach the snapshot through RTNLGRP_NEIGH, and route changes
// move destinations to their new next hop, without polling (Refresh is an
// hour).
func TestFollowsKernelChanges(t *testing.T) {
	tp := newTopo(t)
	tp.a.MustRun("ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.2")
	r := tp.resolver(t, Config{Refresh: time.Hour}, true)
	resolveOK(t, r, "198.51.100.7", tp.bMAC)
	far := netip.MustParseAddr("198.51.100.7")

	moved := [6]byte{0x02, 0, 0, 0, 0xbe, 0xef}
	tp.a.MustRun("ip", "neigh", "replace", "192.0.2.2", "lladdr", macString(moved), "dev", tp.aIf, "nud", "permanent")
	waitFor(t, "MAC change", func() bool { mac, _ := r.Lookup(far); return mac == moved })
	if s := r.Stats(); s.MACChanges != 1 {
		t.Fatalf("MACChanges = %d", s.MACChanges)
	}

	other := [6]byte{0x02, 0, 0, 0, 0, 0x33}
	tp.a.MustRun("ip", "neigh", "add", "192.0.2.3", "lladdr", macString(other), "dev", tp.aIf, "nud", "permanent")
	tp.a.MustRun("ip", "route", "replace", "198.51.100.0/24", "via", "192.0.2.3")
	waitFor(t, "reroute", func() bool { mac, _ := r.Lookup(far); return mac == other })
	if s := r.Stats(); s.Reroutes == 0 {
		t.Fatalf("stats %+v: no reroute counted", s)
	}

	// The route goes away: the destination is withdrawn.
	tp.a.MustRun("ip", "route", "del", "198.51.100.0/24")
	waitFor(t, "withdrawal", func() bool { _, ok := r.Lookup(far); return !ok })
}

// InterfaceMAC agrees with sysfs, both as a function (calling thread's
// namespace) and on the resolver (its own namespace).
func TestInterfaceMAC(t *testing.T) {
	tp := newTopo(t)
	var got [6]byte
	if err := tp.a.Do(func() (err error) {
		got, err = InterfaceMAC(tp.aIdx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got != tp.aMAC {
		t.Fatalf("InterfaceMAC = %x, want %x", got, tp.aMAC)
	}
	r := tp.resolver(t, Config{}, false)
	if got, err := r.InterfaceMAC(tp.aIdx); err != nil || got != tp.aMAC {
		t.Fatalf("Resolver.InterfaceMAC = %x, %v", got, err)
	}
	if _, err := r.InterfaceMAC(1 << 30); err == nil {
		t.Fatal("InterfaceMAC of a missing interface gave no error")
	}
}

// A next hop that stops answering: refresh asks the kernel to confirm the
// STALE entry, the kernel's unicast probes fail, the FAILED notification
// withdraws the MAC, re-resolution fails and the destination is given up.
// The kernel's ARP timers in a are shortened so this takes seconds.
func TestDeadNextHopWithdrawn(t *testing.T) {
	tp := newTopo(t)
	for k, v := range map[string]string{
		"base_reachable_time_ms": "300", "delay_first_probe_time": "1",
		"retrans_time_ms": "100", "ucast_solicit": "2", "mcast_solicit": "2",
	} {
		tp.a.MustRun("sysctl", "-qw", "net.ipv4.neigh."+tp.aIf+"."+k+"="+v)
	}
	r := tp.resolver(t, Config{Retries: 2, RetryBase: 50 * time.Millisecond, Refresh: 200 * time.Millisecond, HoldDown: time.Hour}, true)
	resolveOK(t, r, "192.0.2.2", tp.bMAC)

	tp.b.MustRun("ip", "addr", "flush", "dev", tp.bIf) // b no longer answers ARP for .2
	dst := netip.MustParseAddr("192.0.2.2")
	waitFor(t, "withdrawal", func() bool { _, ok := r.Lookup(dst); return !ok })
	waitFor(t, "give-up", func() bool { return r.Stats().GaveUp == 1 })
	if s := r.Stats(); s.Withdrawn != 1 {
		t.Fatalf("stats %+v: want one withdrawal", s)
	}
}
