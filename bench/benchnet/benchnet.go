// Package benchnet builds the benchmarks' phone ─ gateway ─ core topology in
// three network namespaces it creates, and holds the two helpers every
// benchmark run needs around it: attaching an XDP program to one end
// (counters, XDP_PASS peers) and pinning the process's threads to a CPU.
// The benchmark harness (bench/harness) and the go test benchmarks of
// gateway/ both use it, so their figures come from the same setup.
//
// Neighbours are static everywhere: the far ends carry XDP counters that
// drop what they count, and nothing should wait on ARP. It must not start
// a gateway or generate traffic: its callers do.
package benchnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/lab/netns"
)

// End is one end of a veth pair: its namespace, name, index and MAC.
type End struct {
	NS    *netns.NS
	Name  string
	Index int
	MAC   net.HardwareAddr
}

// Topo is phone ─ gw ─ core. The phone side is 192.0.2.10 (Ph) ─
// 192.0.2.1 (Pub); the core side 10.0.0.254 (Priv) ─ 10.0.0.1 (Co), and
// the core routes the phones' inner prefixes (10.99.0.0/16,
// 100.64.0.0/10) back through the gateway.
type Topo struct {
	Phone, GW, Core *netns.NS
	Ph, Pub         End
	Priv, Co        End
}

// New creates the topology; its namespaces are named prefix+"p", +"g" and
// +"c" made unique (netns.UniqueName). On error nothing is left behind.
func New(prefix string) (_ *Topo, err error) {
	tp := &Topo{}
	defer func() {
		if err != nil {
			tp.Close()
		}
	}()
	for _, n := range []struct {
		p    **netns.NS
		name string
	}{{&tp.Phone, prefix + "p"}, {&tp.GW, prefix + "g"}, {&tp.Core, prefix + "c"}} {
		if *n.p, err = netns.New(netns.UniqueName(n.name)); err != nil {
			return nil, err
		}
	}
	phIf, pubIf := netns.UniqueName("va"), netns.UniqueName("vb")
	if err := netns.Veth(tp.Phone, phIf, tp.GW, pubIf); err != nil {
		return nil, err
	}
	privIf, coIf := netns.UniqueName("va"), netns.UniqueName("vb")
	if err := netns.Veth(tp.GW, privIf, tp.Core, coIf); err != nil {
		return nil, err
	}
	for _, e := range []struct {
		dst  *End
		ns   *netns.NS
		name string
		cidr string
	}{{&tp.Ph, tp.Phone, phIf, "192.0.2.10/24"}, {&tp.Pub, tp.GW, pubIf, "192.0.2.1/24"},
		{&tp.Priv, tp.GW, privIf, "10.0.0.254/24"}, {&tp.Co, tp.Core, coIf, "10.0.0.1/24"}} {
		if *e.dst, err = endOf(e.ns, e.name, e.cidr); err != nil {
			return nil, err
		}
	}
	for _, c := range []struct {
		ns   *netns.NS
		args []string
	}{
		{tp.Core, []string{"route", "add", "10.99.0.0/16", "via", "10.0.0.254"}},
		{tp.Core, []string{"route", "add", "100.64.0.0/10", "via", "10.0.0.254"}},
		{tp.Core, []string{"neigh", "replace", "10.0.0.254", "lladdr", tp.Priv.MAC.String(), "dev", tp.Co.Name}},
		{tp.Phone, []string{"neigh", "replace", "192.0.2.1", "lladdr", tp.Pub.MAC.String(), "dev", tp.Ph.Name}},
		{tp.GW, []string{"neigh", "replace", "192.0.2.10", "lladdr", tp.Ph.MAC.String(), "dev", tp.Pub.Name}},
		{tp.GW, []string{"neigh", "replace", "10.0.0.1", "lladdr", tp.Co.MAC.String(), "dev", tp.Priv.Name}},
	} {
		if _, err := c.ns.Run("ip", c.args...); err != nil {
			return nil, err
		}
	}
	return tp, nil
}

func endOf(ns *netns.NS, name, cidr string) (End, error) {
	if _, err := ns.Run("ip", "addr", "add", cidr, "dev", name); err != nil {
		return End{}, err
	}
	e := End{NS: ns, Name: name}
	err := ns.Do(func() error {
		i, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		e.Index, e.MAC = i.Index, i.HardwareAddr
		return nil
	})
	return e, err
}

// Close removes the namespaces (and with them the veths).
func (tp *Topo) Close() error {
	// In parallel: each deletion waits for the kernel to tear down the
	// namespace's devices, and a signal's stop (bench/harness) has 2 s in
	// all.
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, n := range []*netns.NS{tp.Phone, tp.GW, tp.Core} {
		if n != nil {
			wg.Go(func() { errs[i] = n.Close() })
		}
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Attach attaches prog to e in driver mode, inside e's namespace.
func Attach(e End, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	err := e.NS.Do(func() (err error) {
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: e.Index, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach xdp to %s: %w", e.Name, err)
		}
		return nil
	})
	return l, err
}

// PinProcess pins every thread of the process to cpu (threads created
// later inherit it from their creator) and returns the undo.
func PinProcess(cpu int) (func(), error) {
	var orig, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	set.Set(cpu)
	apply := func(s *unix.CPUSet) error {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("list threads: %w", err)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			// A thread may exit between listing and pinning.
			if err := unix.SchedSetaffinity(tid, s); err != nil && err != unix.ESRCH {
				return fmt.Errorf("pin thread %d: %w", tid, err)
			}
		}
		return nil
	}
	if err := apply(&set); err != nil {
		apply(&orig)
		return nil, err
	}
	return func() { apply(&orig) }, nil
}
