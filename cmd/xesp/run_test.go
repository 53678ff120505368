package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/ue"
)

// TestMain lets the test binary stand in for the xesp binary: the daemon
// tests start it as a separate process inside a namespace.
func TestMain(m *testing.M) {
	if os.Getenv("XESP_TEST_AS_MAIN") == "1" {
		os.Args = append([]string{"xesp"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// xespCmd is the xesp binary (this test binary in disguise) run in ns, or
// on the host when ns is nil.
func xespCmd(ns *netns.NS, args ...string) *exec.Cmd {
	var c *exec.Cmd
	if ns == nil {
		c = exec.Command(os.Args[0], args...)
	} else {
		c = ns.Command(os.Args[0], args...)
	}
	c.Env = append(os.Environ(), "XESP_TEST_AS_MAIN=1")
	return c
}

const (
	runKeyIn  = "606162636465666768696a6b6c6d6e6f70717273"
	runKeyOut = "808182838485868788898a8b8c8d8e8f90919293"
)

func mustESP(t *testing.T, spi uint32, key string, window int) *esp.Transform {
	t.Helper()
	k, _ := hex.DecodeString(key)
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func saYAML(name string, spi uint32, dir, key string, inner int) string {
	return fmt.Sprintf(`  - {name: %s, spi: %d, direction: %s, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
     local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.%d/32}}
`, name, spi, dir, key, inner)
}

// daemonTopo is phone ─ gw ─ core with a SIP echo responder in the core and
// a config for one phone's SA pair; start runs `xesp run` in gw.
type daemonTopo struct {
	phone, gw, core *netns.NS
	pubIf, privIf   string
	dir, sock, cfg  string
}

func newDaemonTopo(t *testing.T) *daemonTopo {
	t.Helper()
	return newDaemonTopoQueues(t, 1, saYAML("ue1-in", 0x1001, "in", runKeyIn, 1)+saYAML("ue1-out", 0x2001, "out", runKeyOut, 1))
}

// newDaemonTopoQueues is newDaemonTopo with queues TX and RX queues on
// every veth end and sas (YAML list items) as the configured SAs.
func newDaemonTopoQueues(t *testing.T, queues int, sas string) *daemonTopo {
	t.Helper()
	d := &daemonTopo{phone: netns.ForTest(t, "rph"), gw: netns.ForTest(t, "rgw"), core: netns.ForTest(t, "rco")}
	phIf, pubIf := netns.VethQueuesForTest(t, d.phone, d.gw, queues)
	privIf, coreIf := netns.VethQueuesForTest(t, d.gw, d.core, queues)
	d.pubIf, d.privIf = pubIf, privIf
	d.phone.MustRun("ip", "addr", "add", "192.0.2.10/24", "dev", phIf)
	d.gw.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", pubIf)
	d.gw.MustRun("ip", "addr", "add", "10.0.0.254/24", "dev", privIf)
	d.core.MustRun("ip", "addr", "add", "10.0.0.1/24", "dev", coreIf)
	d.core.MustRun("ip", "route", "add", "10.99.0.0/16", "via", "10.0.0.254")

	d.dir = t.TempDir()
	d.sock = filepath.Join(d.dir, "api.sock")
	cfg := fmt.Sprintf("public: {interface: %s, addresses: [192.0.2.1]}\nprivate: {interface: %s}\nworkers: 2\n"+
		"umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}\n"+
		"pin_dir: /sys/fs/bpf/xesp-test-%d\nstate_dir: %s\napi: {unix: %s}\nmetrics: {listen: 127.0.0.1:19109}\nsas:\n%s",
		pubIf, privIf, os.Getpid(), filepath.Join(d.dir, "state"), d.sock, sas)
	d.cfg = filepath.Join(d.dir, "xesp.yaml")
	if err := os.WriteFile(d.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}

	startCoreResponder(t, d.core)
	return d
}

// startCoreResponder runs a SIP stand-in on 10.0.0.1:5060 in core that
// answers each datagram to its sender with "200 OK for " and the request,
// so a test can tell every reply's request apart; closed at cleanup.
func startCoreResponder(t *testing.T, core *netns.NS) {
	t.Helper()
	var conn *net.UDPConn
	if err := core.Do(func() (err error) {
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 5060})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			conn.WriteToUDPAddrPort(append([]byte("200 OK for "), buf[:n]...), from)
		}
	}()
}

// daemon is one running `xesp run` process; exited closes when it ends,
// with its exit error in err.
type daemon struct {
	cmd    *exec.Cmd
	logs   *logBuf
	exited chan struct{}
	err    error
}

// logBuf holds a daemon's output; tests read it while the daemon writes.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (d *daemonTopo) start(t *testing.T) *daemon {
	t.Helper()
	dm := d.launch(t, "run", "--config", d.cfg)
	d.waitAPI(t, dm)
	return dm
}

// launch starts `xesp args...` in gw without waiting for it; it is
// killed at cleanup if still running, and its log shown if the test
// failed.
func (d *daemonTopo) launch(t *testing.T, args ...string) *daemon {
	t.Helper()
	return launchCmd(t, xespCmd(d.gw, args...))
}

// launchCmd is launch for a command the caller built (a wrapper such as
// prlimit around the xesp binary).
func launchCmd(t *testing.T, cmd *exec.Cmd) *daemon {
	t.Helper()
	dm := &daemon{cmd: cmd, logs: &logBuf{}, exited: make(chan struct{})}
	dm.cmd.Stdout, dm.cmd.Stderr = dm.logs, dm.logs
	if err := dm.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { dm.err = dm.cmd.Wait(); close(dm.exited) }()
	t.Cleanup(func() {
		select {
		case <-dm.exited:
		default:
			dm.cmd.Process.Kill()
			<-dm.exited
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", dm.logs.String())
		}
	})
	return dm
}

// waitAPI waits until the control API's socket accepts connections.
func (d *daemonTopo) waitAPI(t *testing.T, dm *daemon) {
	t.Helper()
	// A daemon loads and verifies its XDP programs before it listens: on
	// a loaded CI host that alone can take seconds.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", d.sock); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up:\n%s", dm.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *daemonTopo) newPhone(t *testing.T, port int, out, in *esp.Transform) *ue.Phone {
	t.Helper()
	var p *ue.Phone
	if err := d.phone.Do(func() (err error) {
		p, err = ue.New(netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), uint16(port)), netip.MustParseAddrPort("192.0.2.1:4500"), out, in)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// talk sends msg from the phone's inner address to the core and checks the
// reply; it returns the reply's ESP sequence number.
// waitSnapshot waits until the daemon's periodic rx-state snapshot
// (state_dir/rx.state) holds a record that satisfies cond: the state a
// test means to survive a kill -9 is on disk, without sleeping past the
// snapshot interval.
func (d *daemonTopo) waitSnapshot(t *testing.T, what string, cond func(rxstate.Record) bool) {
	t.Helper()
	path := filepath.Join(d.dir, "state", "rx.state")
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if s, err := rxstate.Load(path); err == nil {
			for _, r := range s.Records {
				if cond(r) {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot in %s with %s", path, what)
		}
	}
}

func talk(t *testing.T, p *ue.Phone, inner netip.AddrPort, msg string) uint64 {
	t.Helper()
	if err := p.Send(pkt.UDP4(inner, netip.MustParseAddrPort("10.0.0.1:5060"), []byte(msg))); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	got, seq, err := p.RecvSeq(buf, time.Now().Add(3*time.Second))
	if err != nil {
		t.Fatalf("%s: %v", msg, err)
	}
	if _, dst, payload, ok := pkt.UDP4Parse(got); !ok || dst != inner || string(payload) != "200 OK for "+msg {
		t.Fatalf("%s: got %q to %v", msg, payload, dst)
	}
	return seq
}

// The daemon as an operator runs it: `xesp run` in its own process, SIP-ish
// traffic from a phone through it, the CLI over the control API, an SA
// added at runtime, /metrics, and a clean SIGTERM that detaches XDP.
func TestRunDaemon(t *testing.T) {
	d := newDaemonTopo(t)
	dm := d.start(t)
	gw, pubIf, privIf, dir, sock := d.gw, d.pubIf, d.privIf, d.dir, d.sock
	cli := func(args ...string) string {
		t.Helper()
		out, err := xespCmd(nil, append(args, "--api", "unix:"+sock)...).CombinedOutput()
		if err != nil {
			t.Fatalf("xesp %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	ue1 := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 1024))
	talk(t, ue1, netip.MustParseAddrPort("10.99.0.1:5060"), "REGISTER ue1")

	list := cli("sa", "list")
	for _, want := range []string{"ue1-in", "ue1-out", "0x00001001"} {
		if !strings.Contains(list, want) {
			t.Fatalf("sa list lacks %q:\n%s", want, list)
		}
	}
	if show := cli("sa", "show", "ue1-in", "--json"); !strings.Contains(show, `"packets": 1`) || strings.Contains(show, runKeyIn[:16]) {
		t.Fatalf("sa show: want 1 packet and no key:\n%s", show)
	}

	// A second phone's SAs arrive through the API while traffic runs.
	saFile := filepath.Join(dir, "ue2.yaml")
	os.WriteFile(saFile, []byte("sas:\n"+strings.ReplaceAll(saYAML("ue2-in", 0x1002, "in", runKeyIn, 2)+saYAML("ue2-out", 0x2002, "out", runKeyOut, 2), "peer_port: 4500", "peer_port: 4501")), 0o600)
	cli("sa", "add", saFile)
	ue2 := d.newPhone(t, 4501, mustESP(t, 0x1002, runKeyIn, 0), mustESP(t, 0x2002, runKeyOut, 1024))
	talk(t, ue2, netip.MustParseAddrPort("10.99.0.2:5060"), "REGISTER ue2")
	talk(t, ue1, netip.MustParseAddrPort("10.99.0.1:5060"), "OPTIONS ue1")

	stats := cli("stats")
	if !strings.Contains(stats, "redirect_esp_udp") {
		t.Fatalf("stats lack XDP verdicts:\n%s", stats)
	}
	scrape := scrapeIn(t, d)
	for _, want := range []string{`xesp_packets_total{direction="decap",result="ok"} 3`, `xesp_packets_total{direction="encap",result="ok"} 3`,
		`xesp_slowpath_packets_total{result="esp_injected"} 0`} {
		if !strings.Contains(scrape, want) {
			t.Fatalf("/metrics lacks %s", want)
		}
	}

	cli("sa", "del", "ue2-in", "ue2-out")
	if err := ue2.Send(pkt.UDP4(netip.MustParseAddrPort("10.99.0.2:5060"), netip.MustParseAddrPort("10.0.0.1:5060"), []byte("after delete"))); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ue2.Recv(make([]byte, 2048), time.Now().Add(300*time.Millisecond)); err == nil {
		t.Fatal("a deleted SA still carried traffic")
	}

	dm.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-dm.exited:
		if dm.err != nil {
			t.Fatalf("daemon exit: %v\n%s", dm.err, dm.logs.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("daemon did not exit on SIGTERM")
	}
	for _, ifname := range []string{pubIf, privIf} {
		out, _ := gw.Run("ip", "-d", "link", "show", "dev", ifname)
		if strings.Contains(string(out), "prog/xdp") {
			t.Fatalf("XDP still attached to %s after shutdown:\n%s", ifname, out)
		}
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("API socket left behind: %v", err)
	}
}

// IV safety across a crash (issue 7): replies before a kill -9 and after
// the restart, under the same SA and key, never share a sequence number —
// GCM's IV is the sequence number.
func TestRunDaemonKill9NeverReusesSequence(t *testing.T) {
	d := newDaemonTopo(t)
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	seen := map[uint64]bool{}
	record := func(seq uint64) {
		if seen[seq] {
			t.Fatalf("outbound sequence number %d sent twice under one key", seq)
		}
		seen[seq] = true
	}
	out, in := mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 4096)
	ph := d.newPhone(t, 4500, out, in)
	var last uint64
	for round := 0; round < 3; round++ {
		dm := d.start(t)
		for i := 0; i < 5; i++ {
			last = talk(t, ph, inner, fmt.Sprintf("OPTIONS round %d #%d", round, i))
			record(last)
		}
		dm.cmd.Process.Kill() // SIGKILL: no shutdown path runs
		<-dm.exited
	}
	if len(seen) != 15 {
		t.Fatalf("%d distinct sequence numbers, want 15", len(seen))
	}
	if last < 2<<20 {
		t.Fatalf("after two restarts the gateway sent %d; each restart must start above the previous run's reservation", last)
	}
}

// The daemon hands its core_pool to the API: a sec-agree registration
// gets a core address (the P-CSCF then sees the phone there, docs/pcscf.md).
func TestRunDaemonSecAgreeCorePool(t *testing.T) {
	d := newDaemonTopo(t)
	f, err := os.OpenFile(d.cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(f, "core_pool: 100.64.0.0/16")
	f.Close()
	d.start(t)
	out, err := xespCmd(nil, "secagree", "create", "--api", "unix:"+d.sock, "--registration", "alice", "--json",
		"--ck", "000102030405060708090a0b0c0d0e0f", "--ik", "f0e1d2c3b4a5968778695a4b3c2d1e0f",
		"--security-client", "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064",
		"--ue", "192.0.2.10:4500", "--ue-inner", "192.168.1.10", "--pcscf", "10.0.0.1", "--local", "192.0.2.1",
		"--port-c", "5063", "--port-s", "5065").CombinedOutput()
	if err != nil {
		t.Fatalf("xesp secagree create: %v\n%s", err, out)
	}
	var resp struct {
		Core string `json:"core"`
	}
	err = json.Unmarshal(out, &resp)
	core, perr := netip.ParseAddr(resp.Core)
	if err != nil || perr != nil || !netip.MustParsePrefix("100.64.0.0/16").Contains(core) {
		t.Fatalf("no core address from core_pool: %v\n%s", err, out)
	}
}
