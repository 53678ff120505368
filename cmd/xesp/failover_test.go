package main

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/etcdtest"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/ue"
)

// fleet is a two-gateway deployment in namespaces:
//
//	phones ─ nat (NAPT) ─ rtr ─┬─ gwa ─┬─ core (SIP responder 10.0.0.1)
//	                           └─ gwb ─┘
//	                 ctl (etcd) ── gwa, gwb (management links)
//
// rtr stands for the routers in front of the fleet: it sends 192.0.2.1
// to gwa and 192.0.2.2 to gwb, and moves a failed gateway's address to
// its backup, as an anycast withdrawal or ECMP next-hop removal would.
// core routes each phone's inner address to the gateway serving it.
type fleet struct {
	phones, nat, rtr, core, ctl *netns.NS
	gw                          map[string]*fleetGW
	etcd                        *etcdtest.Server
	dir                         string
	// kek seals the SA records the test (the fleet controller) writes;
	// the gateways read the same file.
	kek *kek.Ring
}

type fleetGW struct {
	name     string
	ns       *netns.NS
	rtrIf    string // rtr's end of the link to this gateway
	pubAddr  string // this gateway's end of that link
	privAddr string // its address on the link to core
	cfg      string
	cfgText  string // cfg's text, with a %s for etcd.tls
	sock     string
}

const fleetPrefix = "/fleet"

func newFleet(t *testing.T) *fleet {
	t.Helper()
	f := &fleet{phones: netns.ForTest(t, "fph"), nat: netns.ForTest(t, "fna"), rtr: netns.ForTest(t, "frt"),
		core: netns.ForTest(t, "fco"), ctl: netns.ForTest(t, "fct"), gw: map[string]*fleetGW{}, dir: t.TempDir()}
	phIf, natIn := netns.VethForTest(t, f.phones, f.nat)
	natOut, rtrNat := netns.VethForTest(t, f.nat, f.rtr)
	f.phones.MustRun("ip", "addr", "add", "192.168.1.10/24", "dev", phIf)
	f.phones.MustRun("ip", "addr", "add", "192.168.1.11/24", "dev", phIf)
	f.phones.MustRun("ip", "addr", "add", "192.168.1.12/24", "dev", phIf)
	f.phones.MustRun("ip", "route", "add", "default", "via", "192.168.1.1")
	f.nat.MustRun("ip", "addr", "add", "192.168.1.1/24", "dev", natIn)
	f.nat.MustRun("ip", "addr", "add", "198.51.100.2/24", "dev", natOut)
	f.nat.MustRun("ip", "route", "add", "default", "via", "198.51.100.1")
	f.nat.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	f.nat.MustRun("nft", "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname "+natOut+" masquerade")
	f.rtr.MustRun("ip", "addr", "add", "198.51.100.1/24", "dev", rtrNat)
	f.rtr.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	f.core.MustRun("ip", "addr", "add", "10.0.0.1/32", "dev", "lo")

	for i, name := range []string{"gwa", "gwb"} {
		g := &fleetGW{name: name, ns: netns.ForTest(t, "f"+name)}
		f.gw[name] = g
		n := i + 1
		pubIf, rtrIf := netns.VethForTest(t, g.ns, f.rtr)
		privIf, coreIf := netns.VethForTest(t, g.ns, f.core)
		mgmtIf, ctlIf := netns.VethForTest(t, g.ns, f.ctl)
		g.rtrIf = rtrIf
		g.pubAddr = fmt.Sprintf("203.0.113.%d", 4*n-2)
		g.privAddr = fmt.Sprintf("10.0.%d.2", n)
		// Either gateway may serve either address: each is the other's
		// backup.
		g.ns.MustRun("ip", "addr", "add", g.pubAddr+"/30", "dev", pubIf)
		g.ns.MustRun("ip", "addr", "add", "192.0.2.1/32", "dev", pubIf)
		g.ns.MustRun("ip", "addr", "add", "192.0.2.2/32", "dev", pubIf)
		g.ns.MustRun("ip", "route", "add", "default", "via", fmt.Sprintf("203.0.113.%d", 4*n-3))
		g.ns.MustRun("ip", "addr", "add", g.privAddr+"/24", "dev", privIf)
		g.ns.MustRun("ip", "route", "add", "10.0.0.0/24", "via", fmt.Sprintf("10.0.%d.1", n))
		g.ns.MustRun("ip", "addr", "add", fmt.Sprintf("172.31.%d.2/24", n), "dev", mgmtIf)
		f.rtr.MustRun("ip", "addr", "add", fmt.Sprintf("203.0.113.%d/30", 4*n-3), "dev", rtrIf)
		f.core.MustRun("ip", "addr", "add", fmt.Sprintf("10.0.%d.1/24", n), "dev", coreIf)
		f.ctl.MustRun("ip", "addr", "add", fmt.Sprintf("172.31.%d.1/24", n), "dev", ctlIf)

		dir := filepath.Join(f.dir, name)
		os.MkdirAll(dir, 0o700)
		g.sock = filepath.Join(dir, "api.sock")
		pin := fmt.Sprintf("/sys/fs/bpf/xesp-fo-%d-%s", os.Getpid(), name)
		t.Cleanup(func() { os.RemoveAll(pin) })
		// etcd over TLS with this gateway's client certificate, SA
		// records sealed under the fleet's KEK: the secure setup.
		g.cfg = filepath.Join(dir, "xesp.yaml")
		g.cfgText = fmt.Sprintf("public: {interface: %s, addresses: [192.0.2.1, 192.0.2.2]}\nprivate: {interface: %s}\nworkers: 1\n"+
			"umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}\n"+
			"pin_dir: %s\nstate_dir: %s\napi: {unix: %s}\nmetrics: {listen: ''}\n"+
			"etcd: {endpoints: [https://172.31.%d.1:2379], node: %s, prefix: %s, dial_timeout: 2s, liveness_ttl: 1s, tls: %%s, kek_file: %s}\n",
			pubIf, privIf, pin, filepath.Join(dir, "state"), g.sock, n, name, fleetPrefix, filepath.Join(f.dir, "kek"))
	}
	f.route("192.0.2.1", "gwa")
	f.route("192.0.2.2", "gwb")
	kekFile := filepath.Join(f.dir, "kek")
	if err := os.WriteFile(kekFile, []byte("fleet-1 "+strings.Repeat("5a", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	if f.kek, err = kek.Load(kekFile); err != nil {
		t.Fatal(err)
	}
	f.etcd = etcdtest.StartInTLS(t, f.ctl, "172.31.1.1", "172.31.2.1")
	for _, g := range f.gw {
		if err := os.WriteFile(g.cfg, fmt.Appendf(nil, g.cfgText, f.etcd.ConfigTLS()), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	startCoreResponder(t, f.core)
	return f
}

// route points the routers at gateway gw for addr (a public address) and
// core at it for the inner addresses of that address's phones.
func (f *fleet) route(addr, gw string) {
	g := f.gw[gw]
	f.rtr.MustRun("ip", "route", "replace", addr+"/32", "via", g.pubAddr)
	inner := map[string][]string{"192.0.2.1": {"10.99.0.1", "10.99.0.2"}, "192.0.2.2": {"10.99.0.3"}}[addr]
	for _, in := range inner {
		f.core.MustRun("ip", "route", "replace", in+"/32", "via", g.privAddr)
	}
}

func (f *fleet) startGW(t *testing.T, name string) *daemon {
	t.Helper()
	d := &daemonTopo{gw: f.gw[name].ns, sock: f.gw[name].sock, cfg: f.gw[name].cfg}
	return d.start(t)
}

// fleetPhone is one phone: its SA pair and where it reaches the fleet.
type fleetPhone struct {
	name      string
	n         int
	gwAddr    string
	spiIn     uint32 // phone → gateway
	spiOut    uint32 // gateway → phone
	p         *ue.Phone
	inner     netip.AddrPort
	seqs      []uint64
	sent, got int
}

func (f *fleet) newPhone(t *testing.T, n int, gwAddr string) *fleetPhone {
	t.Helper()
	ph := &fleetPhone{name: fmt.Sprintf("ue%d", n), n: n, gwAddr: gwAddr, spiIn: 0x1000 + uint32(n), spiOut: 0x2000 + uint32(n),
		inner: netip.MustParseAddrPort(fmt.Sprintf("10.99.0.%d:5060", n))}
	out, in := mustESP(t, ph.spiIn, runKeyIn, 0), mustESP(t, ph.spiOut, runKeyOut, 1<<12)
	if err := f.phones.Do(func() (err error) {
		ph.p, err = ue.New(netip.MustParseAddrPort(fmt.Sprintf("192.168.1.%d:4500", 9+n)), netip.MustParseAddrPort(gwAddr+":4500"), out, in)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ph.p.Close() })
	return ph
}

// specs are the phone's SAs as the fleet's provisioning writes them: the
// peer is the NAT's public address; the port the NAT picked is learnt
// from the phone's first authenticated packet.
func (ph *fleetPhone) specs() []sa.Spec {
	mk := func(dir string, spi uint32, key string) sa.Spec {
		return sa.Spec{Name: fmt.Sprintf("%s-%s", ph.name, dir), SPI: sa.SPIOf(spi), Direction: dir, Mode: "tunnel",
			Proposal: "aes128gcm16", EncKey: key, Local: ph.gwAddr, Peer: "198.51.100.2", Encap: &sa.EncapSpec{},
			Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: ph.inner.Addr().String() + "/32"}}
	}
	return []sa.Spec{mk("in", ph.spiIn, runKeyIn), mk("out", ph.spiOut, runKeyOut)}
}

// exchange sends msg and waits up to wait for its own reply, skipping
// replies to earlier requests; it reports whether the reply came.
func (ph *fleetPhone) exchange(t *testing.T, msg string, wait time.Duration) bool {
	t.Helper()
	if err := ph.p.Send(pkt.UDP4(ph.inner, netip.MustParseAddrPort("10.0.0.1:5060"), []byte(msg))); err != nil {
		t.Fatal(err)
	}
	ph.sent++
	buf := make([]byte, 2048)
	deadline := time.Now().Add(wait)
	for {
		got, seq, err := ph.p.RecvSeq(buf, deadline)
		if err != nil {
			return false
		}
		ph.seqs = append(ph.seqs, seq)
		_, dst, payload, ok := pkt.UDP4Parse(got)
		if !ok || dst != ph.inner {
			t.Fatalf("%s: reply to %v: %x", ph.name, dst, got)
		}
		if string(payload) == "200 OK for "+msg {
			ph.got++
			return true
		}
	}
}

// espCapture records the (SPI, sequence) of every ESP-in-UDP packet a
// gateway sends towards the phones, as rtr receives it.
type espCapture struct {
	mu    sync.Mutex
	pairs map[string][][2]uint32 // gateway → (spi, seq)
	fds   []int
	wg    sync.WaitGroup
}

func (f *fleet) capture(t *testing.T) *espCapture {
	t.Helper()
	c := &espCapture{pairs: map[string][][2]uint32{}}
	for name, g := range f.gw {
		var fd int
		if err := f.rtr.Do(func() error {
			ifi, err := net.InterfaceByName(g.rtrIf)
			if err != nil {
				return err
			}
			proto := int(htons(unix.ETH_P_IP))
			fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
			if err != nil {
				return err
			}
			return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index})
		}); err != nil {
			t.Fatal(err)
		}
		tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		c.fds = append(c.fds, fd)
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			buf := make([]byte, 9000)
			for {
				n, from, err := unix.Recvfrom(fd, buf, 0)
				if err == unix.EAGAIN || err == unix.EINTR {
					continue
				}
				if err != nil {
					return
				}
				if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
					continue
				}
				if spi, seq, ok := espOf(buf[:n]); ok {
					c.mu.Lock()
					c.pairs[name] = append(c.pairs[name], [2]uint32{spi, seq})
					c.mu.Unlock()
				}
			}
		}()
	}
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// espOf parses IPv4/UDP dport-any sport 4500 ESP (not the non-ESP marker
// of IKE, not a keepalive).
func espOf(p []byte) (spi, seq uint32, ok bool) {
	if len(p) < 20 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_UDP {
		return 0, 0, false
	}
	ihl := int(p[0]&0x0f) * 4
	if len(p) < ihl+8+8 || binary.BigEndian.Uint16(p[ihl:]) != 4500 {
		return 0, 0, false
	}
	e := p[ihl+8:]
	spi = binary.BigEndian.Uint32(e)
	if spi == 0 {
		return 0, 0, false
	}
	return spi, binary.BigEndian.Uint32(e[4:]), true
}

func (c *espCapture) stop() map[string][][2]uint32 {
	for _, fd := range c.fds {
		unix.Shutdown(fd, unix.SHUT_RDWR)
		unix.Close(fd)
	}
	c.wg.Wait()
	return c.pairs
}

// Two gateways share SAs and sequence marks through etcd. gwa serves two
// phones behind a NAPT, gwb one; gwa is killed with SIGKILL, the routers
// move its address to gwb and the fleet controller moves its SAs to gwb
// in etcd; gwb serves them from the sequence mark gwa reserved. The time
// from the kill to each phone's first reply is measured (and logged, not
// asserted), and every (SPI, sequence) pair either gateway sent is
// compared: none may repeat.
func TestFleetFailover(t *testing.T) {
	f := newFleet(t)
	ctx := context.Background()
	cli := f.etcd.Client(t)
	phones := []*fleetPhone{f.newPhone(t, 1, "192.0.2.1"), f.newPhone(t, 2, "192.0.2.1"), f.newPhone(t, 3, "192.0.2.2")}
	owner := map[int]string{1: "gwa", 2: "gwa", 3: "gwb"}
	for _, ph := range phones {
		for _, sp := range ph.specs() {
			if err := etcdsrc.PutSealed(ctx, cli, f.kek, fleetPrefix, owner[ph.n], sp); err != nil {
				t.Fatal(err)
			}
		}
	}
	// What etcd holds (and its backups would): no key, in hex or raw.
	all, err := cli.Get(ctx, fleetPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range all.Kvs {
		for _, k := range []string{runKeyIn, runKeyOut} {
			raw, _ := hex.DecodeString(k)
			if strings.Contains(strings.ToLower(string(kv.Value)), k[:16]) || strings.Contains(string(kv.Value), string(raw[:8])) {
				t.Fatalf("etcd key %s holds SA key material: %s", kv.Key, kv.Value)
			}
		}
	}
	capt := f.capture(t)
	gwa := f.startGW(t, "gwa")
	f.startGW(t, "gwb")

	for round := range 5 {
		for _, ph := range phones {
			if !ph.exchange(t, fmt.Sprintf("OPTIONS %s before #%d", ph.name, round), 3*time.Second) {
				t.Fatalf("%s: no reply before the failover (round %d)", ph.name, round)
			}
		}
	}

	// The test is the fleet controller: it watches the gateways'
	// liveness keys, and when gwa's lease expires it moves the route
	// (what an anycast withdrawal does) and gwa's SAs to gwb. Measured:
	// detection (kill → key gone, about the lease TTL) and takeover (key
	// gone → each phone's first reply).
	alive, err := etcdsrc.Alive(ctx, cli, fleetPrefix)
	if err != nil || alive["gwa"] == "" || alive["gwb"] == "" {
		t.Fatalf("liveness keys: %v %v", alive, err)
	}
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	gone := cli.Watch(wctx, etcdsrc.AliveKey(fleetPrefix, "gwa"))
	gwa.cmd.Process.Kill()
	<-gwa.exited
	tKill := time.Now()
	detected := false
	for !detected {
		select {
		case resp := <-gone:
			for _, ev := range resp.Events {
				detected = detected || ev.Type == clientv3.EventTypeDelete
			}
		case <-time.After(20 * time.Second):
			t.Fatal("gwa's liveness key outlived it by 20 s")
		}
	}
	tDetect := time.Since(tKill)
	t0 := time.Now()
	f.route("192.0.2.1", "gwb")
	moved := []string{"ue1-in", "ue1-out", "ue2-in", "ue2-out"}
	if err := etcdsrc.Move(ctx, cli, fleetPrefix, "gwa", "gwb", moved...); err != nil {
		t.Fatal(err)
	}
	tMoved := time.Since(t0)
	const interval = 5 * time.Millisecond
	var mu sync.Mutex
	took := map[string]time.Duration{}
	var wg sync.WaitGroup
	for _, ph := range phones[:2] {
		wg.Go(func() {
			for i := 0; time.Since(t0) < 10*time.Second; i++ {
				if ph.exchange(t, fmt.Sprintf("OPTIONS %s retry #%d", ph.name, i), interval) {
					mu.Lock()
					took[ph.name] = time.Since(t0)
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	for _, ph := range phones[:2] {
		if _, ok := took[ph.name]; !ok {
			t.Fatalf("%s: no reply within 10 s of the failover", ph.name)
		}
	}
	t.Logf("failover: detection (kill → liveness key gone, TTL 1 s asked) %v; takeover: routes and etcd move done %v later, first reply %v (ue1), %v (ue2) after detection, %v / %v after the etcd move (a request every %v); total kill → reply %v",
		tDetect.Round(time.Millisecond), tMoved.Round(time.Millisecond), took["ue1"].Round(time.Millisecond), took["ue2"].Round(time.Millisecond),
		(took["ue1"] - tMoved).Round(time.Millisecond), (took["ue2"] - tMoved).Round(time.Millisecond), interval,
		(tDetect + max(took["ue1"], took["ue2"])).Round(time.Millisecond))

	for round := range 5 {
		for _, ph := range phones {
			if !ph.exchange(t, fmt.Sprintf("OPTIONS %s after #%d", ph.name, round), 3*time.Second) {
				t.Fatalf("%s: no reply after the failover (round %d)", ph.name, round)
			}
		}
	}
	time.Sleep(100 * time.Millisecond) // the capture's last frames
	pairs := capt.stop()

	// The proof: no (SPI, sequence) pair left the fleet twice.
	seen := map[[2]uint32]string{}
	maxSeq := map[string]map[uint32]uint32{"gwa": {}, "gwb": {}}
	minSeq := map[string]map[uint32]uint32{"gwa": {}, "gwb": {}}
	for gw, list := range pairs {
		for _, p := range list {
			if prev, dup := seen[p]; dup {
				t.Fatalf("SPI 0x%08x sequence %d sent by %s and again by %s", p[0], p[1], prev, gw)
			}
			seen[p] = gw
			maxSeq[gw][p[0]] = max(maxSeq[gw][p[0]], p[1])
			if m, ok := minSeq[gw][p[0]]; !ok || p[1] < m {
				minSeq[gw][p[0]] = p[1]
			}
		}
	}
	for _, ph := range phones[:2] {
		a, b := maxSeq["gwa"][ph.spiOut], minSeq["gwb"][ph.spiOut]
		if a == 0 || b == 0 {
			t.Fatalf("%s (SPI 0x%x): gwa sent up to %d, gwb from %d: both should have sent", ph.name, ph.spiOut, a, b)
		}
		if b <= a {
			t.Fatalf("%s: gwb started at %d, not above gwa's %d", ph.name, b, a)
		}
		t.Logf("%s SPI 0x%08x: gwa sent seq 1..%d, gwb continued from %d (gwa's etcd reservation)", ph.name, ph.spiOut, a, b)
	}
	if _, ok := maxSeq["gwa"][phones[2].spiOut]; ok {
		t.Fatal("gwa sent for ue3, which it never owned")
	}
	var summary []string
	for gw, list := range pairs {
		summary = append(summary, fmt.Sprintf("%s %d", gw, len(list)))
	}
	sort.Strings(summary)
	t.Logf("captured ESP packets from the gateways: %s; %d distinct (SPI, seq) pairs, none repeated", strings.Join(summary, ", "), len(seen))
	for _, ph := range phones {
		if !sort.SliceIsSorted(ph.seqs, func(i, j int) bool { return ph.seqs[i] < ph.seqs[j] }) || hasDup(ph.seqs) {
			t.Fatalf("%s received sequence numbers out of order or repeated: %v", ph.name, ph.seqs)
		}
	}
	// gwa's directory is empty, gwb's holds all six SAs.
	for node, want := range map[string]int{"gwa": 0, "gwb": 6} {
		r, err := cli.Get(ctx, etcdsrc.SADir(fleetPrefix, node), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil || int(r.Count) != want {
			t.Fatalf("%s holds %v SAs in etcd (%v), want %d", node, r.Count, err, want)
		}
	}
}

func hasDup(s []uint64) bool {
	for i := 1; i < len(s); i++ {
		if s[i] == s[i-1] {
			return true
		}
	}
	return false
}

// With etcd gone a gateway keeps serving the SAs it has, and once etcd is
// back it picks up what was assigned to it meanwhile or after.
func TestFleetEtcdOutage(t *testing.T) {
	f := newFleet(t)
	ctx := context.Background()
	cli := f.etcd.Client(t)
	f.route("192.0.2.1", "gwb")
	ue1, ue3 := f.newPhone(t, 1, "192.0.2.1"), f.newPhone(t, 3, "192.0.2.2")
	for _, sp := range ue3.specs() {
		if err := etcdsrc.PutSealed(ctx, cli, f.kek, fleetPrefix, "gwb", sp); err != nil {
			t.Fatal(err)
		}
	}
	gwb := f.startGW(t, "gwb")
	if !ue3.exchange(t, "OPTIONS before", 3*time.Second) {
		t.Fatal("no reply with etcd up")
	}
	f.etcd.Stop()
	for i := range 10 {
		if !ue3.exchange(t, fmt.Sprintf("OPTIONS etcd down #%d", i), 3*time.Second) {
			t.Fatalf("no reply with etcd down (#%d)", i)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case <-gwb.exited:
		t.Fatalf("gateway exited with etcd down: %v", gwb.err)
	default:
	}
	f.etcd.Start()
	back := time.Now()
	for _, sp := range ue1.specs() {
		if err := etcdsrc.PutSealed(ctx, cli, f.kek, fleetPrefix, "gwb", sp); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for i := 0; !ue1.exchange(t, fmt.Sprintf("OPTIONS ue1 #%d", i), 50*time.Millisecond); i++ {
		if time.Now().After(deadline) {
			t.Fatal("an SA assigned after etcd came back was not served")
		}
	}
	t.Logf("SA assigned after etcd came back served %v after the restart", time.Since(back).Round(time.Millisecond))
	if !ue3.exchange(t, "OPTIONS after", 3*time.Second) {
		t.Fatal("no reply after etcd came back")
	}
}

// A gateway whose KEK file lacks the key id the fleet's records are
// sealed under serves none of them and says why (log and metric); given
// the right file it serves them.
func TestFleetGatewayWithoutTheKEK(t *testing.T) {
	f := newFleet(t)
	ctx := context.Background()
	cli := f.etcd.Client(t)
	ue3 := f.newPhone(t, 3, "192.0.2.2")
	for _, sp := range ue3.specs() {
		if err := etcdsrc.PutSealed(ctx, cli, f.kek, fleetPrefix, "gwb", sp); err != nil {
			t.Fatal(err)
		}
	}
	g := f.gw["gwb"]
	good, err := os.ReadFile(g.cfg)
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(f.dir, "other.kek")
	os.WriteFile(other, []byte("fleet-2 "+strings.Repeat("6b", 32)+"\n"), 0o600)
	os.WriteFile(g.cfg, []byte(strings.Replace(string(good), filepath.Join(f.dir, "kek"), other, 1)), 0o600)
	gwb := f.startGW(t, "gwb")
	if ue3.exchange(t, "OPTIONS without the KEK", time.Second) {
		t.Fatal("a gateway without the fleet's KEK served its SAs")
	}
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(gwb.logs.String(), `sealed under an unknown key id \"fleet-1\"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no refusal logged:\n%s", gwb.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	gwb.cmd.Process.Signal(syscall.SIGTERM)
	<-gwb.exited
	os.WriteFile(g.cfg, good, 0o600)
	f.startGW(t, "gwb")
	deadline = time.Now().Add(20 * time.Second)
	for i := 0; !ue3.exchange(t, fmt.Sprintf("OPTIONS with the KEK #%d", i), 100*time.Millisecond); i++ {
		if time.Now().After(deadline) {
			t.Fatal("no reply with the right KEK")
		}
	}
}
