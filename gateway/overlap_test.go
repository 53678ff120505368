package gateway

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
)

// The overlap topology (issue 12): every NAPT numbers its LAN alike, and
// its phone is 192.168.1.10 with SIP on 5060.
//
//	ph0 192.168.1.10 ─ napt0 (198.51.100.7) ─┐
//	ph1 192.168.1.10 ─ napt1 (198.51.100.8) ─┴ gw (198.51.100.1 | 10.0.0.254) ─ core 10.0.0.1
//
// The core routes the core_pool (100.64.0.0/24) to the gateway; it never
// sees 192.168.1.10.
var (
	ovPhone  = netip.MustParseAddr("192.168.1.10")
	ovGW     = netip.MustParseAddr("198.51.100.1")
	ovCore   = netip.MustParseAddr("10.0.0.1")
	ovGWESP  = netip.AddrPortFrom(ovGW, 4500)
	ovPool   = "100.64.0.0/24"
	ovPhones = 2
)

func ovWAN(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 51, 100, byte(7 + i)}) }

type ovTopo struct {
	phones        []*netns.NS
	napts         []*netns.NS
	gw, core      *netns.NS
	pubIf, privIf string
	g             *Gateway
	api           *api.Client
}

// newOvTopo builds the namespaces and starts the gateway with workers
// workers, core_pool ovPool (none when noPool) and the given SA YAML
// list, plus the control API.
func newOvTopo(t *testing.T, workers int, sas string, noPool ...bool) *ovTopo {
	t.Helper()
	tp := &ovTopo{gw: netns.ForTest(t, "ogw"), core: netns.ForTest(t, "oco")}
	// The NAPTs' WAN links and the gateway's public link meet on a bridge
	// in an access namespace, as phones' NAPTs meet in an access network.
	acc := netns.ForTest(t, "oac")
	acc.MustRun("ip", "link", "add", "obr", "type", "bridge")
	acc.MustRun("ip", "link", "set", "obr", "up")
	for i := range ovPhones {
		ph, napt := netns.ForTest(t, "oph"), netns.ForTest(t, "ont")
		tp.phones, tp.napts = append(tp.phones, ph), append(tp.napts, napt)
		phIf, lanIf := netns.VethForTest(t, ph, napt)
		ph.MustRun("ip", "addr", "add", ovPhone.String()+"/24", "dev", phIf)
		ph.MustRun("ip", "route", "add", "default", "via", "192.168.1.1")
		napt.MustRun("ip", "addr", "add", "192.168.1.1/24", "dev", lanIf)
		wanIf, accIf := netns.VethForTest(t, napt, acc)
		acc.MustRun("ip", "link", "set", accIf, "master", "obr", "up")
		napt.MustRun("ip", "addr", "add", ovWAN(i).String()+"/24", "dev", wanIf)
		napt.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
		nft := napt.Command("nft", "-f", "-")
		nft.Stdin = strings.NewReader(fmt.Sprintf("table ip napt {\n chain post { type nat hook postrouting priority srcnat; oifname %q masquerade; }\n}\n", wanIf))
		if out, err := nft.CombinedOutput(); err != nil {
			t.Fatalf("nft: %v: %s", err, out)
		}
	}
	var accPub string
	tp.pubIf, accPub = netns.VethForTest(t, tp.gw, acc)
	acc.MustRun("ip", "link", "set", accPub, "master", "obr", "up")
	tp.gw.MustRun("ip", "addr", "add", ovGW.String()+"/24", "dev", tp.pubIf)
	var coreIf string
	tp.privIf, coreIf = netns.VethForTest(t, tp.gw, tp.core)
	tp.gw.MustRun("ip", "addr", "add", "10.0.0.254/24", "dev", tp.privIf)
	tp.core.MustRun("ip", "addr", "add", ovCore.String()+"/24", "dev", coreIf)
	pool := "core_pool: " + ovPool
	if len(noPool) > 0 && noPool[0] {
		// Without core addresses the core sees the phones' own addresses.
		pool = ""
		tp.core.MustRun("ip", "route", "add", "192.168.1.0/24", "via", "10.0.0.254")
	} else {
		tp.core.MustRun("ip", "route", "add", ovPool, "via", "10.0.0.254")
	}

	dir := shortTemp(t)
	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [%s]}
private: {interface: %s}
workers: %d
state_dir: %s
%s
umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}
%s`, tp.pubIf, ovGW, tp.privIf, workers, filepath.Join(dir, "state"), pool, sas)
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.gw.Do(func() (err error) {
		tp.g, err = Start(context.Background(), cfg, Options{NoPin: true})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	dp, err := tp.g.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	srv, err := api.New(api.Options{SAD: tp.g.SAD, DataPath: dp, API: config.API{Unix: sock}, NATTPort: cfg.NATTPort, CorePool: cfg.CorePrefix})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	if tp.api, err = api.NewClient(sock, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tp.api.Close()
		cancel()
		if err := <-served; err != nil {
			t.Errorf("api: %v", err)
		}
		if t.Failed() {
			(&topo{g: tp.g}).dump(t)
		}
		if err := tp.g.Stop(false); err != nil {
			t.Errorf("stop gateway: %v", err)
		}
	})
	return tp
}

// emuPhone is a phone in test code: an ESP socket on 192.168.1.10:4500
// behind its NAPT, its outbound SAs (the gateway's inbound ones) and its
// inbound SAs by SPI (the gateway's outbound ones). It counts every ESP
// packet it cannot open with its own SAs (foreign SPI or failed
// authentication: another phone's traffic) and every opened packet not
// addressed to it.
type emuPhone struct {
	name    string
	esp     *net.UDPConn
	mu      sync.Mutex
	in      map[uint32]*esp.Transform
	foreign int
	notMine int
	got     chan ovMsg
}

type ovMsg struct {
	src, dst netip.AddrPort
	payload  string
	spi      uint32
}

func newEmuPhone(t *testing.T, name string, ns *netns.NS) *emuPhone {
	ph := &emuPhone{name: name, esp: udpSock(t, ns, netip.AddrPortFrom(ovPhone, 4500).String()), in: map[uint32]*esp.Transform{}, got: make(chan ovMsg, 64)}
	go ph.read()
	return ph
}

func (ph *emuPhone) addIn(spi uint32, s *esp.Transform) {
	ph.mu.Lock()
	ph.in[spi] = s
	ph.mu.Unlock()
}

func (ph *emuPhone) counts() (foreign, notMine int) {
	ph.mu.Lock()
	defer ph.mu.Unlock()
	return ph.foreign, ph.notMine
}

func (ph *emuPhone) read() {
	buf := make([]byte, 65536)
	for {
		n, from, err := ph.esp.ReadFromUDPAddrPort(buf)
		if err != nil {
			close(ph.got)
			return
		}
		if from != ovGWESP || n < 8 {
			continue
		}
		spi := binary.BigEndian.Uint32(buf)
		ph.mu.Lock()
		s := ph.in[spi]
		ph.mu.Unlock()
		var res esp.Result
		if s != nil {
			res, err = s.Open(buf[:n])
		}
		if s == nil || err != nil {
			ph.mu.Lock()
			ph.foreign++
			ph.mu.Unlock()
			continue
		}
		ip := buf[res.Start:res.End]
		src, dst, payload, ok := pkt.UDP4Parse(ip)
		// The inner packet must be intact: IPv4 header and UDP checksums
		// as the worker rewrote them.
		if !ok || dst.Addr() != ovPhone || pkt.Fold(pkt.Sum(ip[:20], 0)) != 0xffff || !udpChecksumOK(ip) {
			ph.mu.Lock()
			ph.notMine++
			ph.mu.Unlock()
			continue
		}
		ph.got <- ovMsg{src: src, dst: dst, payload: string(payload), spi: spi}
	}
}

func udpChecksumOK(ip []byte) bool {
	ihl := int(ip[0]&0xf) * 4
	u := ip[ihl:binary.BigEndian.Uint16(ip[2:])]
	if binary.BigEndian.Uint16(u[6:]) == 0 {
		return true
	}
	return pkt.Fold(pkt.Sum(u, pkt.Sum(ip[12:20], 17+uint64(len(u))))) == 0xffff
}

// send seals a UDP datagram from the phone's sport to the core's dport
// with s and sends it to the gateway.
func (ph *emuPhone) send(t *testing.T, s *esp.Transform, sport uint16, dport uint16, payload string) {
	t.Helper()
	inner := pkt.UDP4(netip.AddrPortFrom(ovPhone, sport), netip.AddrPortFrom(ovCore, dport), []byte(payload))
	if _, err := ph.esp.WriteToUDPAddrPort(seal(t, s, inner), ovGWESP); err != nil {
		t.Fatal(err)
	}
}

// expect waits for the next message the phone opened and checks it.
func (ph *emuPhone) expect(t *testing.T, src, dst uint16, payload string) ovMsg {
	t.Helper()
	select {
	case m := <-ph.got:
		if m.src != netip.AddrPortFrom(ovCore, src) || m.dst != netip.AddrPortFrom(ovPhone, dst) || m.payload != payload {
			t.Fatalf("%s: got %s -> %s %q, want %d -> %d %q", ph.name, m.src, m.dst, m.payload, src, dst, payload)
		}
		return m
	case <-time.After(3 * time.Second):
		f, nm := ph.counts()
		t.Fatalf("%s: nothing arrived (want %q); foreign %d, not mine %d", ph.name, payload, f, nm)
	}
	return ovMsg{}
}

func ovKey(i, dir int) string { return fmt.Sprintf("%02x%02x%036x", i, dir, 0x5a5a) }

// Two phones behind different NAPTs, both 192.168.1.10 and both on SIP
// port 5060, each with its own SA pair and no core address written: the
// gateway gives each a core address from core_pool. The core sees each
// phone at its own address, answers each and then sends each an OPTIONS
// of its own (core-initiated), and every phone gets exactly its own two
// packets: zero cross-delivery, counted at the phones (foreign SPI or
// failed authentication, or an inner packet not for it).
func TestOverlappingPhonesEachGetTheirOwn(t *testing.T) {
	var sas strings.Builder
	sas.WriteString("sas:\n")
	for i := range ovPhones {
		for dir, d := range []string{"in", "out"} {
			// Both phones chose the same outbound SPI: only the NAT
			// binding and the keys tell them apart.
			spi := 0x1001 + i
			if d == "out" {
				spi = 0x2001
			}
			fmt.Fprintf(&sas, "  - {name: ph%d-%s, spi: %d, direction: %s, mode: tunnel, proposal: aes128gcm16, enc_key: %s, local: %s, peer: %s, encap: {}, inner: {local: 10.0.0.0/24, peer: %s}}\n",
				i, d, spi, d, ovKey(i, dir), ovGW, ovWAN(i), ovPhone)
		}
	}
	tp := newOvTopo(t, 2, sas.String())
	coreSock := udpSock(t, tp.core, netip.AddrPortFrom(ovCore, 5060).String())
	phones := make([]*emuPhone, ovPhones)
	outs := make([]*esp.Transform, ovPhones)
	cores := make([]netip.Addr, ovPhones)
	for i := range phones {
		phones[i] = newEmuPhone(t, fmt.Sprintf("ph%d", i), tp.phones[i])
		outs[i] = mustSA(t, uint32(0x1001+i), ovKey(i, 0), 0)
		phones[i].addIn(0x2001, mustSA(t, 0x2001, ovKey(i, 1), 1024))
		e, ok := tp.g.SAD.GetName(fmt.Sprintf("ph%d-out", i))
		if !ok || !e.SA.Core.IsValid() {
			t.Fatalf("ph%d-out: no core address allocated: %+v", i, e.SA)
		}
		cores[i] = e.SA.Core
	}
	if cores[0] == cores[1] {
		t.Fatalf("both phones got core address %s", cores[0])
	}

	// 1. Each phone registers; the core sees it at its core address, port
	// 5060 kept. A NAPT may lose a new flow's first packet: retransmit.
	for i, ph := range phones {
		want := "REGISTER from " + ph.name
		var from netip.AddrPort
		var got string
		for try := 0; ; try++ {
			ph.send(t, outs[i], 5060, 5060, want)
			coreSock.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 2048)
			n, f, err := coreSock.ReadFromUDPAddrPort(buf)
			if err == nil {
				from, got = f, string(buf[:n])
				break
			}
			if try == 9 {
				t.Fatalf("%s: REGISTER never reached the core", ph.name)
			}
		}
		if got != want || from != netip.AddrPortFrom(cores[i], 5060) {
			t.Fatalf("core got %q from %s, want %q from %s:5060", got, from, want, cores[i])
		}
	}
	// 2. Replies, then core-initiated OPTIONS, interleaved between phones.
	xdpBefore := xdpCount(t, tp.g, bpf.PrivRedirectCore)
	const rounds = 5
	msg := func(i, k int) string {
		if k == 0 {
			return fmt.Sprintf("SIP/2.0 200 OK for ph%d", i)
		}
		return fmt.Sprintf("OPTIONS sip:ph%d #%d", i, k)
	}
	for k := range rounds {
		for i := range phones {
			if _, err := coreSock.WriteToUDPAddrPort([]byte(msg(i, k)), netip.AddrPortFrom(cores[i], 5060)); err != nil {
				t.Fatal(err)
			}
		}
		for i, ph := range phones {
			ph.expect(t, 5060, 5060, msg(i, k))
		}
	}
	for _, ph := range phones {
		if f, nm := ph.counts(); f != 0 || nm != 0 {
			t.Fatalf("%s: %d foreign packets, %d not addressed to it", ph.name, f, nm)
		}
		select {
		case m := <-ph.got:
			t.Fatalf("%s: extra packet %q", ph.name, m.payload)
		default:
		}
	}
	if got := xdpCount(t, tp.g, bpf.PrivRedirectCore) - xdpBefore; got != uint64(rounds*ovPhones) {
		t.Fatalf("xdp priv_redirect_core %d, want %d", got, rounds*ovPhones)
	}
	// 3. The phone's own address is not a way in: cleartext to
	// 192.168.1.10 has no SA (no trie entry for it), XDP passes it.
	noPolicy := xdpCount(t, tp.g, bpf.PrivPassNoPolicy)
	tp.core.MustRun("ip", "route", "add", "192.168.1.0/24", "via", "10.0.0.254")
	if _, err := coreSock.WriteToUDPAddrPort([]byte("to the shared address"), netip.AddrPortFrom(ovPhone, 5060)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "cleartext to 192.168.1.10 passed by XDP", func() bool { return xdpCount(t, tp.g, bpf.PrivPassNoPolicy) > noPolicy })
	for _, ph := range phones {
		if f, nm := ph.counts(); f != 0 || nm != 0 {
			t.Fatalf("%s: %d foreign, %d not mine after the shared-address packet", ph.name, f, nm)
		}
	}
}

// ovReg is one sec-agree registration as the emulated phone holds it.
type ovReg struct {
	name       string
	uc, pc     uint16         // the phone's and the P-CSCF's client ports
	spiC, spiS uint32         // the phone's SPIs (its inbound SAs)
	toPS, toPC *esp.Transform // phone -> P-CSCF server port (in-s), client port (in-c)
	core       netip.Addr
	pcSock     *net.UDPConn
}

const (
	ovUS = 5064 // the phone's protected server port, kept across registrations
	ovPS = 5065 // the P-CSCF's protected server port
)

// register runs POST /v1/secagree for registration k of phone i and
// gives the phone its side of the four SAs.
func (tp *ovTopo) register(t *testing.T, ph *emuPhone, i, k int) *ovReg {
	t.Helper()
	r := &ovReg{name: fmt.Sprintf("ph%d-reg%d", i, k), uc: uint16(5062 + 10*k), pc: uint16(5063 + 10*k + 1000*i),
		spiC: uint32(0x3000 + 0x100*i + 2*k), spiS: uint32(0x3001 + 0x100*i + 2*k)}
	offer := fmt.Sprintf("ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=%d;spi-s=%d;port-c=%d;port-s=%d", r.spiC, r.spiS, r.uc, ovUS)
	resp, err := tp.api.SecAgree(context.Background(), api.SecAgreeRequest{
		Registration: r.name, SecurityClient: offer, CK: ovKey(i, k)[:32], IK: ovKey(i, k+7)[:32],
		UE: netip.AddrPortFrom(ovWAN(i), 4500).String(), UEInner: ovPhone.String(), PCSCF: ovCore.String(), Local: ovGW.String(),
		PortC: r.pc, PortS: ovPS,
	})
	if err != nil {
		t.Fatalf("%s: %v", r.name, err)
	}
	r.core = ovPhone // without a core_pool the core sees the phone's own address
	if resp.Core != "" {
		if r.core, err = netip.ParseAddr(resp.Core); err != nil {
			t.Fatalf("%s: core %q", r.name, resp.Core)
		}
	}
	mk := func(role string, window int) *esp.Transform {
		e, ok := tp.g.SAD.GetName(r.name + "." + role)
		if !ok {
			t.Fatalf("%s.%s not in the SAD", r.name, role)
		}
		s, err := esp.NewTransform(esp.Config{SPI: e.SA.SPI, Proposal: e.SA.Proposal, EncKey: e.SA.EncKey, AuthKey: e.SA.AuthKey, ReplayWindow: window, Mode: esp.ModeTunnel})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	r.toPS, r.toPC = mk("in-s", 0), mk("in-c", 0)
	ph.addIn(r.spiC, mk("out-c", 1024))
	ph.addIn(r.spiS, mk("out-s", 1024))
	r.pcSock = udpSock(t, tp.core, netip.AddrPortFrom(ovCore, r.pc).String())
	return r
}

func (tp *ovTopo) worker(t *testing.T, name string) uint16 {
	e, ok := tp.g.SAD.GetName(name)
	if !ok {
		t.Fatalf("%s not in the SAD", name)
	}
	return e.Worker
}

// Re-registration with 2 workers, repeated (issue 12): the phone's new
// sec-agree set works beside its current set until the current one is
// deleted. The 401 to a re-REGISTER sent on the old pair is delivered on
// the old pair, the 200 on the new pair, and the P-CSCF's own requests
// from its old and its new client port to the phone's server port (one
// XDP key: core address and port-s) each leave on their own set's out-s.
// Each round, the least-loaded worker is the other one (another phone
// sharing 192.168.1.10, and a filler SA), so a set placed by load alone
// would land apart from the current set. The phone keeps its core
// address across registrations, the other phone has its own.
//
// Without a core_pool (one phone; the core sees 192.168.1.10) the same
// holds: the phone's sets share a pair label derived from the phone.
func TestReRegistrationTwoWorkers(t *testing.T) {
	t.Run("core_pool", func(t *testing.T) { testReRegistration(t, true) })
	t.Run("no_pool", func(t *testing.T) { testReRegistration(t, false) })
}

func testReRegistration(t *testing.T, withPool bool) {
	tp := newOvTopo(t, 2, "", !withPool)
	ps := udpSock(t, tp.core, netip.AddrPortFrom(ovCore, ovPS).String())
	ph := newEmuPhone(t, "ph0", tp.phones[0])
	other := newEmuPhone(t, "ph1", tp.phones[1])
	cur := tp.register(t, ph, 0, 0)
	var oreg *ovReg
	if withPool {
		oreg = tp.register(t, other, 1, 0)
		if oreg.core == cur.core {
			t.Fatalf("two phones share core address %s", cur.core)
		}
	}
	fspec := fmt.Sprintf(`{"name":"filler","spi":"0x7777","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"%s","local":"%s","peer":"198.51.100.99","encap":{},"inner":{"local":"10.0.0.0/24","peer":"10.99.9.0/24"}}`, ovKey(9, 9), ovGW)
	if err := addRaw(tp, fspec); err != nil {
		t.Fatal(err)
	}
	// A request from the phone on a set, answered by the P-CSCF's
	// server port; it arrives from the phone's core address.
	exchange := func(r *ovReg, what string) {
		t.Helper()
		req := what + " via " + r.name
		var from netip.AddrPort
		var got string
		for try := 0; ; try++ {
			ph.send(t, r.toPS, r.uc, ovPS, req)
			ps.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 2048)
			n, f, err := ps.ReadFromUDPAddrPort(buf)
			if err == nil {
				from, got = f, string(buf[:n])
				break
			}
			if try == 9 {
				t.Fatalf("%s never reached the P-CSCF", req)
			}
		}
		if got != req || from != netip.AddrPortFrom(r.core, r.uc) {
			t.Fatalf("P-CSCF got %q from %s, want %q from %s:%d", got, from, req, r.core, r.uc)
		}
		answer := "SIP/2.0 " + what + " answer on " + r.name
		if _, err := ps.WriteToUDPAddrPort([]byte(answer), from); err != nil {
			t.Fatal(err)
		}
		if m := ph.expect(t, ovPS, r.uc, answer); m.spi != r.spiC {
			t.Fatalf("%q sealed with SPI 0x%x, want the set's out-c 0x%x", answer, m.spi, r.spiC)
		}
	}
	// The P-CSCF's own request from the set's client port to the phone's
	// server port.
	notify := func(r *ovReg) {
		t.Helper()
		msg := "NOTIFY on " + r.name
		if _, err := r.pcSock.WriteToUDPAddrPort([]byte(msg), netip.AddrPortFrom(r.core, ovUS)); err != nil {
			t.Fatal(err)
		}
		if m := ph.expect(t, r.pc, ovUS, msg); m.spi != r.spiS {
			t.Fatalf("%q sealed with SPI 0x%x, want the set's out-s 0x%x", msg, m.spi, r.spiS)
		}
	}
	exchange(cur, "REGISTER")
	const rounds = 4
	for k := 1; k <= rounds; k++ {
		next := tp.register(t, ph, 0, k)
		if next.core != cur.core {
			t.Fatalf("round %d: re-registration moved the phone from core %s to %s", k, cur.core, next.core)
		}
		if w, wn := tp.worker(t, cur.name+".out-s"), tp.worker(t, next.name+".out-s"); w != wn {
			t.Fatalf("round %d: the sets on workers %d and %d", k, w, wn)
		}
		exchange(cur, "re-REGISTER 401")
		exchange(next, "REGISTER 200")
		notify(cur)
		notify(next)
		exchange(cur, "late 200")
		if _, err := tp.api.DeleteRegistration(context.Background(), cur.name); err != nil {
			t.Fatal(err)
		}
		cur.pcSock.Close()
		notify(next)
		exchange(next, "after delete")
		cur = next
	}
	if !withPool {
		if f, nm := ph.counts(); f != 0 || nm != 0 {
			t.Fatalf("%s: %d foreign packets, %d not addressed to it", ph.name, f, nm)
		}
		return
	}
	// The other phone, same inner address and ports, was never disturbed.
	for try := 0; ; try++ {
		other.send(t, oreg.toPS, oreg.uc, ovPS, "other phone")
		ps.SetReadDeadline(time.Now().Add(time.Second))
		buf := make([]byte, 2048)
		n, f, err := ps.ReadFromUDPAddrPort(buf)
		if err == nil {
			if string(buf[:n]) != "other phone" || f != netip.AddrPortFrom(oreg.core, oreg.uc) {
				t.Fatalf("P-CSCF got %q from %s", buf[:n], f)
			}
			break
		}
		if try == 9 {
			t.Fatal("the other phone's request never arrived")
		}
	}
	if _, err := ps.WriteToUDPAddrPort([]byte("for the other phone"), netip.AddrPortFrom(oreg.core, oreg.uc)); err != nil {
		t.Fatal(err)
	}
	other.expect(t, ovPS, oreg.uc, "for the other phone")
	for _, p := range []*emuPhone{ph, other} {
		if f, nm := p.counts(); f != 0 || nm != 0 {
			t.Fatalf("%s: %d foreign packets, %d not addressed to it", p.name, f, nm)
		}
	}
}

// addRaw posts one SA (JSON) through the API.
func addRaw(tp *ovTopo, spec string) error {
	var s sa.Spec
	if err := json.Unmarshal([]byte(spec), &s); err != nil {
		return err
	}
	_, err := tp.api.Add(context.Background(), s)
	return err
}
