package xsk_test

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/netns"
)

// end is one end of a veth pair.
type end struct {
	ns      *netns.NS
	name    string
	ifindex int
	mac     net.HardwareAddr
	ip      net.IP
}

// topo is peer1 ─ gw.a [gw] gw.b ─ peer2, addressed 10.77.1.0/24 and
// 10.77.2.0/24, each peer routing the other subnet through gw.
type topo struct {
	gw         *netns.NS
	a, b       end
	peer1      end
	peer2      end
	hasSecondB bool
}

func newTopo(t testing.TB, two bool) *topo {
	t.Helper()
	tp := &topo{gw: netns.ForTest(t, "xkg"), hasSecondB: two}
	p1 := netns.ForTest(t, "xk1")
	p1If, aIf := netns.VethForTest(t, p1, tp.gw)
	tp.peer1 = mkEnd(t, p1, p1If, "10.77.1.1")
	tp.a = mkEnd(t, tp.gw, aIf, "10.77.1.2")
	if two {
		p2 := netns.ForTest(t, "xk2")
		p2If, bIf := netns.VethForTest(t, p2, tp.gw)
		tp.peer2 = mkEnd(t, p2, p2If, "10.77.2.1")
		tp.b = mkEnd(t, tp.gw, bIf, "10.77.2.2")
		p1.MustRun("ip", "route", "add", "10.77.2.0/24", "via", "10.77.1.2")
		p2.MustRun("ip", "route", "add", "10.77.1.0/24", "via", "10.77.2.2")
		// Static neighbours: the test's worker writes L2 headers itself
		// and peers must not wait on ARP through an XDP-owned link.
		p2.MustRun("ip", "neigh", "replace", "10.77.2.2", "lladdr", tp.b.mac.String(), "dev", tp.peer2.name)
	}
	p1.MustRun("ip", "neigh", "replace", "10.77.1.2", "lladdr", tp.a.mac.String(), "dev", tp.peer1.name)
	return tp
}

func mkEnd(t testing.TB, ns *netns.NS, name, ip string) end {
	t.Helper()
	ns.MustRun("ip", "addr", "add", ip+"/24", "dev", name)
	e := end{ns: ns, name: name, ip: net.ParseIP(ip).To4()}
	if err := ns.Do(func() error {
		i, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		e.ifindex, e.mac = i.Index, i.HardwareAddr
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return e
}

// attach puts prog on e in native (driver) mode until the test ends.
func attach(t testing.TB, e end, prog *ebpf.Program) {
	t.Helper()
	if err := e.ns.Do(func() error {
		l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: e.ifindex, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach xdp to %s: %w", e.name, err)
		}
		t.Cleanup(func() { l.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// open creates a socket on e's queue 0 from inside e's namespace, where
// bind resolves the ifindex.
func open(t testing.TB, u *xsk.UMEM, e end) *xsk.Socket {
	t.Helper()
	var s *xsk.Socket
	if err := e.ns.Do(func() (err error) {
		s, err = u.Open(e.ifindex, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return s
}

// udpFrom opens a UDP socket in e's namespace bound to port.
func udpFrom(t testing.TB, e end, port int) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := e.ns.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: e.ip, Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// receive polls s (refilling from p) until it has want packets or the
// deadline passes.
func receive(s *xsk.Socket, p *xsk.Pool, want int, timeout time.Duration) ([]xsk.Desc, error) {
	var got []xsk.Desc
	batch := make([]xsk.Desc, 64)
	deadline := time.Now().Add(timeout)
	for len(got) < want && time.Now().Before(deadline) {
		if _, err := s.Refill(p, 0); err != nil {
			return got, err
		}
		n := s.Receive(batch[:min(len(batch), want-len(got))])
		got = append(got, batch[:n]...)
		if n == 0 {
			time.Sleep(200 * time.Microsecond)
		}
	}
	if len(got) < want {
		return got, fmt.Errorf("received %d of %d packets", len(got), want)
	}
	return got, nil
}

// settle drains completions until the UMEM's accounting shows nothing in
// flight in the kernel, then checks the books balance.
func settle(t testing.TB, u *xsk.UMEM, s *xsk.Socket, p *xsk.Pool) xsk.Accounting {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var a xsk.Accounting
	for {
		s.Complete(p)
		a = u.Accounting()
		if (a.TX == 0 && a.KernelTX == 0 && a.Completion == 0) || time.Now().After(deadline) {
			break
		}
		if err := s.Kick(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	if a.Total() != int64(u.Config().FrameCount) {
		t.Fatalf("accounting %+v sums to %d, want %d frames", a, a.Total(), u.Config().FrameCount)
	}
	return a
}
