package harness

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

// topo is phone ─ gw ─ core in three namespaces it creates, with static
// neighbours everywhere: the far ends carry XDP counters that drop what
// they count, and nobody should wait on ARP.
type topo struct {
	phone, gw, core *netns.NS
	ph, pub         end
	priv, co        end
}

type end struct {
	ns    *netns.NS
	name  string
	index int
	mac   net.HardwareAddr
}

func newTopo() (_ *topo, err error) {
	tp := &topo{}
	defer func() {
		if err != nil {
			tp.close()
		}
	}()
	for _, n := range []struct {
		p      **netns.NS
		prefix string
	}{{&tp.phone, "xbp"}, {&tp.gw, "xbg"}, {&tp.core, "xbc"}} {
		if *n.p, err = netns.New(netns.UniqueName(n.prefix)); err != nil {
			return nil, err
		}
	}
	phIf, pubIf := netns.UniqueName("va"), netns.UniqueName("vb")
	if err := netns.Veth(tp.phone, phIf, tp.gw, pubIf); err != nil {
		return nil, err
	}
	privIf, coIf := netns.UniqueName("va"), netns.UniqueName("vb")
	if err := netns.Veth(tp.gw, privIf, tp.core, coIf); err != nil {
		return nil, err
	}
	for _, e := range []struct {
		dst  *end
		ns   *netns.NS
		name string
		cidr string
	}{{&tp.ph, tp.phone, phIf, "192.0.2.10/24"}, {&tp.pub, tp.gw, pubIf, "192.0.2.1/24"},
		{&tp.priv, tp.gw, privIf, "10.0.0.254/24"}, {&tp.co, tp.core, coIf, "10.0.0.1/24"}} {
		if *e.dst, err = endOf(e.ns, e.name, e.cidr); err != nil {
			return nil, err
		}
	}
	for _, c := range []struct {
		ns   *netns.NS
		args []string
	}{
		{tp.core, []string{"route", "add", "100.64.0.0/10", "via", "10.0.0.254"}},
		{tp.core, []string{"neigh", "replace", "10.0.0.254", "lladdr", tp.priv.mac.String(), "dev", tp.co.name}},
		{tp.phone, []string{"neigh", "replace", "192.0.2.1", "lladdr", tp.pub.mac.String(), "dev", tp.ph.name}},
		{tp.gw, []string{"neigh", "replace", "192.0.2.10", "lladdr", tp.ph.mac.String(), "dev", tp.pub.name}},
		{tp.gw, []string{"neigh", "replace", "10.0.0.1", "lladdr", tp.co.mac.String(), "dev", tp.priv.name}},
	} {
		if _, err := c.ns.Run("ip", c.args...); err != nil {
			return nil, err
		}
	}
	return tp, nil
}

func endOf(ns *netns.NS, name, cidr string) (end, error) {
	if _, err := ns.Run("ip", "addr", "add", cidr, "dev", name); err != nil {
		return end{}, err
	}
	e := end{ns: ns, name: name}
	err := ns.Do(func() error {
		i, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		e.index, e.mac = i.Index, i.HardwareAddr
		return nil
	})
	return e, err
}

// close removes the namespaces (and with them the veths).
func (tp *topo) close() error {
	// In parallel: each deletion waits for the kernel to tear down the
	// namespace's devices, and a signal's stop has 2 s in all.
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, n := range []*netns.NS{tp.phone, tp.gw, tp.core} {
		if n != nil {
			wg.Go(func() { errs[i] = n.Close() })
		}
	}
	wg.Wait()
	return errors.Join(errs...)
}

// attach attaches prog to e in driver mode.
func attach(e end, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	err := e.ns.Do(func() (err error) {
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: e.index, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach xdp to %s: %w", e.name, err)
		}
		return nil
	})
	return l, err
}

// pinProcess pins every thread of the process to cpu (threads created
// later inherit it from their creator) and returns the undo.
func pinProcess(cpu int) (func(), error) {
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
