package slowpath

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/lab/netns"
)

var (
	gw4 = netip.MustParseAddr("192.0.2.1")
	gw6 = netip.MustParseAddr("2001:db8::1")
)

// recorder stands in for a worker's inject queue: it takes up to accept
// packets per call (all when negative) and copies them, as the worker
// does when it dequeues.
type recorder struct {
	mu     sync.Mutex
	accept int
	got    []worker.SlowPacket
}

func (r *recorder) Inject(pkts []worker.SlowPacket) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := len(pkts)
	if r.accept >= 0 {
		n = min(n, r.accept)
	}
	for _, p := range pkts[:n] {
		p.ESP = slices.Clone(p.ESP)
		r.got = append(r.got, p)
	}
	return n
}

func (r *recorder) packets() []worker.SlowPacket {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// inSA is phone i's inbound SA; distinct peers make distinct SAD groups,
// so consecutive phones land on alternating workers.
func inSA(i int) sa.SA {
	return sa.SA{
		Name: fmt.Sprintf("ue%d-in", i), SPI: uint32(0x1000 + i), Direction: sa.In, Mode: sa.Tunnel,
		Proposal: esp.AES128GCM16, EncKey: make(sa.Secret, 20), ReplayWindow: 1024,
		Local: gw4, Peer: netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}),
		Encap:      &sa.Encap{LocalPort: 4500, PeerPort: 4500},
		InnerLocal: netip.MustParsePrefix("10.0.0.0/24"),
		InnerPeer:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(i)}), 32),
	}
}

type env struct {
	ns   *netns.NS
	sad  *sad.SAD
	recs []*recorder
	srv  *Server
	ents []sad.Record // ents[i] is inSA(i)
}

// newEnv runs a Server on 192.0.2.1:4500 and [2001:db8::1]:4500 (on lo)
// in a fresh namespace, with two recording workers and phones 0 and 1's
// inbound SAs.
func newEnv(t *testing.T, o Options, setup ...string) *env {
	t.Helper()
	e := &env{ns: netns.ForTest(t, "slp")}
	e.ns.MustRun("ip", "link", "set", "lo", "up")
	e.ns.MustRun("ip", "addr", "add", "192.0.2.1/32", "dev", "lo")
	e.ns.MustRun("ip", "addr", "add", "2001:db8::1/128", "dev", "lo", "nodad")
	if err := e.ns.WaitLocalRoute(gw6, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if len(setup) > 0 {
		e.ns.MustRun(setup[0], setup[1:]...)
	}
	var err error
	if e.sad, err = sad.New(sad.Options{Workers: 2}); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		ent, err := e.sad.Add(inSA(i))
		if err != nil {
			t.Fatal(err)
		}
		e.ents = append(e.ents, ent)
	}
	if e.ents[0].Worker == e.ents[1].Worker {
		t.Fatalf("both SAs on worker %d; the test wants one per worker", e.ents[0].Worker)
	}
	e.recs = []*recorder{{accept: -1}, {accept: -1}}
	o.Addrs, o.Port, o.SAD = []netip.Addr{gw4, gw6}, 4500, e.sad
	o.Workers = []Injector{e.recs[0], e.recs[1]}
	if err := e.ns.Do(func() (err error) {
		e.srv, err = New(o)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return e
}

func (e *env) udp(t *testing.T, laddr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := e.ns.Do(func() error {
		a, err := net.ResolveUDPAddr("udp", laddr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP("udp", a)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func send(t *testing.T, c *net.UDPConn, to netip.AddrPort, p []byte) {
	t.Helper()
	if _, err := c.WriteToUDPAddrPort(p, to); err != nil {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if f() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func wantStats(t *testing.T, s *Server, want map[Counter]uint64) {
	t.Helper()
	var w Stats
	for c, v := range want {
		w[c] = v
	}
	eventually(t, fmt.Sprintf("stats %v", w), func() bool { return s.Stats() == w })
}

// espFor is a datagram that looks like ESP for spi: SPI, sequence number,
// then filler. The slow path never opens it, so the bytes need not
// authenticate; the worker's opening is the gateway tests' business.
func espFor(spi uint32, n int) []byte {
	p := make([]byte, n)
	binary.BigEndian.PutUint32(p, spi)
	binary.BigEndian.PutUint32(p[4:], 1)
	for i := 8; i < n; i++ {
		p[i] = byte(i*7 + 3)
	}
	return p
}

var (
	nat4 = netip.AddrPortFrom(gw4, 4500)
	nat6 = netip.AddrPortFrom(gw6, 4500)
)

// Every RFC 3948 class over both address families: keepalive, runts of
// each shape, IKE without an endpoint, unknown SPI, and known SPIs that
// reach the right worker with their source, destination and SA index.
func TestClassifyAndDispatch(t *testing.T) {
	e := newEnv(t, Options{})
	ph4 := e.udp(t, "192.0.2.1:0")
	ph6 := e.udp(t, "[2001:db8::1]:0")

	send(t, ph4, nat4, []byte{0xff})
	send(t, ph6, nat6, []byte{0xff})
	send(t, ph4, nat4, []byte{0x00})                   // 1 byte, not a keepalive
	send(t, ph4, nat4, []byte{0x00, 0x00, 0x00})       // too short for a marker
	send(t, ph4, nat4, espFor(e.ents[0].SA.SPI, 15))   // one byte short of ESP
	send(t, ph4, nat4, []byte{0, 0, 0, 0, 1, 2, 3, 4}) // IKE, no endpoint
	send(t, ph4, nat4, espFor(0x9999, 100))
	esp0 := espFor(e.ents[0].SA.SPI, 200)
	esp1 := espFor(e.ents[1].SA.SPI, 16)
	send(t, ph4, nat4, esp0)
	send(t, ph6, nat6, esp1)

	wantStats(t, e.srv, map[Counter]uint64{Keepalive: 2, Runt: 3, IKEDropped: 1, NoSA: 1, ESPInjected: 2})
	for i, c := range []struct {
		esp []byte
		src netip.AddrPort
		dst netip.Addr
	}{
		{esp0, ph4.LocalAddr().(*net.UDPAddr).AddrPort(), gw4},
		{esp1, ph6.LocalAddr().(*net.UDPAddr).AddrPort(), gw6},
	} {
		got := e.recs[e.ents[i].Worker].packets()
		if len(got) != 1 {
			t.Fatalf("worker %d got %d packets, want 1", e.ents[i].Worker, len(got))
		}
		p := got[0]
		if !bytes.Equal(p.ESP, c.esp) || p.Src != c.src || p.Dst != c.dst || p.Index != e.ents[i].Index {
			t.Errorf("SA %d: injected %d bytes from %v to %v index %d; want %d bytes from %v to %v index %d (bytes equal: %v)",
				i, len(p.ESP), p.Src, p.Dst, p.Index, len(c.esp), c.src, c.dst, e.ents[i].Index, bytes.Equal(p.ESP, c.esp))
		}
	}
}

// Datagrams larger than the MTU are fragmented by the sender and
// reassembled by the kernel before the socket sees them: the slow path
// gets them whole, up to the largest UDP payload there is.
func TestReassembledDatagramsArriveWhole(t *testing.T) {
	e := newEnv(t, Options{}, "ip", "link", "set", "lo", "mtu", "1500")
	ph := e.udp(t, "192.0.2.1:0")
	sizes := []int{3000, 9000, 65507} // 65507: IPv4's largest UDP payload
	for _, n := range sizes {
		send(t, ph, nat4, espFor(e.ents[0].SA.SPI, n))
	}
	wantStats(t, e.srv, map[Counter]uint64{ESPInjected: uint64(len(sizes))})
	if n := e.reasmOK(t); n != uint64(len(sizes)) {
		t.Fatalf("kernel reassembled %d datagrams, want %d: the test did not fragment", n, len(sizes))
	}
	got := e.recs[e.ents[0].Worker].packets()
	for i, n := range sizes {
		if !bytes.Equal(got[i].ESP, espFor(e.ents[0].SA.SPI, n)) {
			t.Errorf("datagram %d: got %d bytes, want the %d sent", i, len(got[i].ESP), n)
		}
	}
}

// reasmOK reads the namespace's Ip ReasmOKs counter.
func (e *env) reasmOK(t *testing.T) uint64 {
	t.Helper()
	var snmp []byte
	if err := e.ns.Do(func() (err error) {
		snmp, err = os.ReadFile("/proc/thread-self/net/snmp")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(snmp), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "Ip:" || len(values) != len(names) {
			continue
		}
		for j, n := range names {
			if n == "ReasmOKs" {
				v, err := strconv.ParseUint(values[j], 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
		}
	}
	t.Fatal("no Ip ReasmOKs in /proc/net/snmp")
	return 0
}

// A worker whose queue is full takes nothing; the slow path counts every
// packet it could not hand over and keeps serving.
func TestInjectFullCounted(t *testing.T) {
	e := newEnv(t, Options{})
	w := e.ents[0].Worker
	e.recs[w].mu.Lock()
	e.recs[w].accept = 0
	e.recs[w].mu.Unlock()
	ph := e.udp(t, "192.0.2.1:0")
	for range 5 {
		send(t, ph, nat4, espFor(e.ents[0].SA.SPI, 64))
	}
	send(t, ph, nat4, espFor(e.ents[1].SA.SPI, 64))
	wantStats(t, e.srv, map[Counter]uint64{InjectFull: 5, ESPInjected: 1})
}

// ikeDaemon is a UDP socket in the namespace standing in for the IKE
// daemon's port-4500 socket.
func (e *env) ikeDaemon(t *testing.T) (*net.UDPConn, netip.AddrPort) {
	c := e.udp(t, "127.0.0.1:0")
	return c, c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func readFrom(t *testing.T, c *net.UDPConn) ([]byte, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 70000)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("%v: %v", c.LocalAddr(), err)
	}
	return buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
}

func ike(tag string) []byte { return append([]byte{0, 0, 0, 0}, "IKE_SA_INIT "+tag...) }

// Each phone gets its own relay socket: the daemon receives each phone's
// datagrams verbatim (marker included) from a distinct source, and its
// answers reach the right phone from the NAT-T address the phone used.
func TestIKERelayPerPhone(t *testing.T) {
	e := newEnv(t, Options{})
	daemon, daemonAddr := e.ikeDaemon(t)
	e.srv.SetIKEForward(daemonAddr)
	phones := []struct {
		c  *net.UDPConn
		to netip.AddrPort
	}{
		{e.udp(t, "192.0.2.1:0"), nat4},
		{e.udp(t, "192.0.2.1:0"), nat4},
		{e.udp(t, "[2001:db8::1]:0"), nat6},
	}
	relayOf := map[netip.AddrPort]int{}
	for round := range 2 {
		for i, ph := range phones {
			msg := ike(fmt.Sprintf("phone %d round %d", i, round))
			send(t, ph.c, ph.to, msg)
			got, from := readFrom(t, daemon)
			if !bytes.Equal(got, msg) {
				t.Fatalf("daemon got %q, want %q", got, msg)
			}
			if j, seen := relayOf[from]; seen && j != i {
				t.Fatalf("phones %d and %d share relay %v", i, j, from)
			}
			relayOf[from] = i
			answer := append(ike(fmt.Sprintf("answer %d/%d", i, round)), make([]byte, 3000)...)
			if _, err := daemon.WriteToUDPAddrPort(answer, from); err != nil {
				t.Fatal(err)
			}
			back, src := readFrom(t, ph.c)
			if !bytes.Equal(back, answer) || src != ph.to {
				t.Fatalf("phone %d got %q from %v, want the daemon's answer from %v", i, back[:min(len(back), 40)], src, ph.to)
			}
		}
	}
	if len(relayOf) != len(phones) || e.srv.Relays() != len(phones) {
		t.Fatalf("%d relay sources seen, %d relays open; want %d each", len(relayOf), e.srv.Relays(), len(phones))
	}
	wantStats(t, e.srv, map[Counter]uint64{IKERelayed: 6, IKEReturned: 6})

	// A new endpoint closes the relays bound to the old one.
	daemon2, daemon2Addr := e.ikeDaemon(t)
	e.srv.SetIKEForward(daemon2Addr)
	if n := e.srv.Relays(); n != 0 {
		t.Fatalf("%d relays survived the endpoint change", n)
	}
	send(t, phones[0].c, nat4, ike("again"))
	if got, _ := readFrom(t, daemon2); !bytes.Equal(got, ike("again")) {
		t.Fatalf("new endpoint got %q", got)
	}
}

// The relay table is bounded (new phones are refused, counted as
// ike_dropped, while it is full) and idle relays close.
func TestIKERelayBoundedAndExpires(t *testing.T) {
	e := newEnv(t, Options{MaxRelays: 1, RelayIdle: 200 * time.Millisecond})
	daemon, daemonAddr := e.ikeDaemon(t)
	e.srv.SetIKEForward(daemonAddr)
	a, b := e.udp(t, "192.0.2.1:0"), e.udp(t, "192.0.2.1:0")

	send(t, a, nat4, ike("a"))
	readFrom(t, daemon)
	send(t, b, nat4, ike("b"))
	wantStats(t, e.srv, map[Counter]uint64{IKERelayed: 1, IKEDropped: 1})

	eventually(t, "the idle relay to close", func() bool { return e.srv.Relays() == 0 })
	send(t, b, nat4, ike("b again"))
	if got, _ := readFrom(t, daemon); !bytes.Equal(got, ike("b again")) {
		t.Fatalf("daemon got %q", got)
	}
	wantStats(t, e.srv, map[Counter]uint64{IKERelayed: 2, IKEDropped: 1})
}

// An endpoint that is not listening: the relay reports the error rather
// than losing the datagram silently.
func TestIKERelayEndpointDown(t *testing.T) {
	e := newEnv(t, Options{})
	daemon, daemonAddr := e.ikeDaemon(t)
	daemon.Close()
	e.srv.SetIKEForward(daemonAddr)
	ph := e.udp(t, "192.0.2.1:0")
	// The first datagram leaves; the ICMP port unreachable it draws is
	// reported to the relay socket's reader.
	send(t, ph, nat4, ike("1"))
	eventually(t, "relay_errors", func() bool { return e.srv.Stats()[RelayErrors] >= 1 })
	if s := e.srv.Stats(); s[IKEReturned] != 0 {
		t.Fatalf("stats %v", s)
	}
}

// Relays the endpoint never answered (what a spoofed-source flood
// creates) expire after halfOpenIdle; answered ones last RelayIdle.
func TestHalfOpenRelaysExpireFirst(t *testing.T) {
	e := newEnv(t, Options{RelayIdle: time.Hour})
	daemon, daemonAddr := e.ikeDaemon(t)
	e.srv.SetIKEForward(daemonAddr)
	answered, spoofed := e.udp(t, "192.0.2.1:0"), e.udp(t, "192.0.2.1:0")
	send(t, answered, nat4, ike("real"))
	_, relay := readFrom(t, daemon)
	if _, err := daemon.WriteToUDPAddrPort(ike("answer"), relay); err != nil {
		t.Fatal(err)
	}
	readFrom(t, answered)
	send(t, spoofed, nat4, ike("spoofed"))
	readFrom(t, daemon)
	if n := e.srv.Relays(); n != 2 {
		t.Fatalf("%d relays, want 2", n)
	}
	e.srv.relays.expire(time.Now().Add(halfOpenIdle+time.Second), time.Hour)
	if n := e.srv.Relays(); n != 1 {
		t.Fatalf("%d relays after the half-open timeout, want 1", n)
	}
	send(t, answered, nat4, ike("still here"))
	if got, from := readFrom(t, daemon); !bytes.Equal(got, ike("still here")) || from != relay {
		t.Fatalf("daemon got %q from %v, want it from the surviving relay %v", got, from, relay)
	}
	e.srv.relays.expire(time.Now().Add(time.Hour+time.Second), time.Hour)
	if n := e.srv.Relays(); n != 0 {
		t.Fatalf("%d relays after RelayIdle, want 0", n)
	}
}

// Close ends Run without its context being cancelled.
func TestCloseEndsRun(t *testing.T) {
	ns := netns.ForTest(t, "slp")
	ns.MustRun("ip", "link", "set", "lo", "up")
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	var s *Server
	if err := ns.Do(func() (err error) {
		s, err = New(Options{Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, SAD: d, Workers: []Injector{&recorder{accept: -1}}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if a := s.LocalAddrs(); len(a) != 1 || a[0].Port() == 0 {
		t.Fatalf("bound to %v", a)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	s.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Run did not return after Close")
	}
}
