// Package lab builds the topology the product exists for, with real SIP
// software at both ends, for the end-to-end tests and the demo:
//
//	ue1..ueN ─┐  (each: xesp's phone on a TUN, sipsak as the SIP client)
//	bulk     ─┼─ napt (nftables masquerade) ── gw (xesp gateway, XDP on both veths) ── core (kamailio)
//	           ┘  (bulk: many Go-driven phones sharing one namespace)
//
// Every namespace is created here with the caller's name prefix and deleted
// by Close, also after a failed Start; no traffic leaves them.
package topo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/examples/kamailio"
	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/ue"
)

// Addresses of the topology (documentation and private prefixes).
var (
	GatewayPublic = netip.MustParseAddr("198.51.100.1")
	NAPTWAN       = netip.MustParseAddr("198.51.100.2")
	GatewayCore   = netip.MustParseAddr("10.0.0.254")
	Core          = netip.MustParseAddr("10.0.0.1")
)

// SIPPort is where kamailio listens in the core.
const SIPPort = 5060

// Tools are the programs the lab runs, with the Debian package of each.
var Tools = [][2]string{
	{"ip", "iproute2"}, {"nft", "nftables"}, {"ethtool", "ethtool"}, {"sysctl", "procps"}, {"conntrack", "conntrack"},
	{"kamailio", "kamailio"}, {"sipsak", "sipsak"},
}

// Options shape the lab.
type Options struct {
	// Prefix starts every namespace name (e.g. "xesp-"); tests use a
	// unique one so parallel runs do not collide.
	Prefix string
	// Phones is the number of TUN phones, each in its own namespace and
	// driven by sipsak. Bulk is the number of Go-driven phones sharing one
	// namespace behind the same NAPT.
	Phones, Bulk int
	// Keepalive for the TUN phones (0: ue.DefaultKeepalive).
	Keepalive time.Duration
	// NoTunnels leaves the TUN phones' namespaces without a tunnel, for a
	// phone run by other means (the xesp-lab ue command): Phone.SAYAML gives
	// it the SAs.
	NoTunnels bool
	// KamailioConfig is the core's config file (default:
	// examples/kamailio/kamailio.cfg, built into the binary).
	KamailioConfig string
	Log            *slog.Logger
}

// Phone is one TUN phone.
type Phone struct {
	N      int
	NS     *netns.NS
	LAN    netip.Addr // behind the NAPT
	Inner  netip.Addr // the TUN's address, the SIP client's source
	SPIIn  uint32     // the gateway's inbound SA: the phone seals with it
	SPIOut uint32     // the gateway's outbound SA: the phone opens with it
	KeyIn  string     // hex key||salt of SPIIn
	KeyOut string
	Tunnel *ue.Tunnel // nil with Options.NoTunnels
	saYAML string
}

// SAYAML is the phone's SA pair as the gateway has it (an SA file, the
// gateway's view: `xesp-lab ue -view gateway` reads it).
func (p *Phone) SAYAML() string { return p.saYAML }

// BulkPhone is a Go-driven phone in the shared bulk namespace.
type BulkPhone struct {
	N             int
	Inner         netip.Addr
	SPIIn, SPIOut uint32
	UE            *ue.Phone
}

// Lab is a running topology.
type Lab struct {
	opts            Options
	NAPT, GW, Core  *netns.NS
	BulkNS          *netns.NS
	Phones          []*Phone
	Bulk            []*BulkPhone
	Gateway         *gateway.Gateway
	Config          *config.Config
	dir             string // kamailio runtime, state, SIP files
	kamailio        *exec.Cmd
	kamailioLog     *syncBuffer
	kamailioStopped chan struct{}
	made            []*netns.NS
	closeOnce       sync.Once
}

// CheckTools says which programs are missing and which Debian packages
// provide them.
func CheckTools() error {
	var missing, pkgs []string
	for _, t := range Tools {
		if _, err := exec.LookPath(t[0]); err != nil {
			missing = append(missing, t[0])
			pkgs = append(pkgs, t[1])
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s (Debian packages: %s; `make deps` installs them)", strings.Join(missing, ", "), strings.Join(pkgs, " "))
	}
	return nil
}

// Start builds the topology, starts kamailio, the gateway and the phones.
// On error everything made so far is removed.
func Start(ctx context.Context, o Options) (l *Lab, err error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Phones > 200 || o.Bulk > 40000 {
		return nil, fmt.Errorf("lab: at most 200 TUN phones and 40000 bulk phones (one UDP port each from 20000)")
	}
	if err := CheckTools(); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l = &Lab{opts: o}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.dir, err = os.MkdirTemp("", "xesp-lab-"); err != nil {
		return l, err
	}
	mk := func(name string) (*netns.NS, error) {
		ns, err := netns.New(o.Prefix + name)
		if err == nil {
			l.made = append(l.made, ns)
		}
		return ns, err
	}
	if l.NAPT, err = mk("napt"); err != nil {
		return l, err
	}
	if l.GW, err = mk("gw"); err != nil {
		return l, err
	}
	if l.Core, err = mk("core"); err != nil {
		return l, err
	}
	if err := netns.Veth(l.NAPT, "wan", l.GW, "pub"); err != nil {
		return l, err
	}
	if err := netns.Veth(l.GW, "priv", l.Core, "eth0"); err != nil {
		return l, err
	}
	steps := []struct {
		ns   *netns.NS
		args string
	}{
		{l.NAPT, "ip link add lan type bridge"},
		{l.NAPT, "ip link set lan up"},
		{l.NAPT, "ip addr add 192.168.1.1/24 dev lan"},
		{l.NAPT, "ip addr add " + NAPTWAN.String() + "/24 dev wan"},
		{l.NAPT, "sysctl -qw net.ipv4.ip_forward=1"},
		{l.GW, "ip addr add " + GatewayPublic.String() + "/24 dev pub"},
		{l.GW, "ip addr add " + GatewayCore.String() + "/24 dev priv"},
		{l.Core, "ip addr add " + Core.String() + "/24 dev eth0"},
		{l.Core, "ip route add 10.99.0.0/16 via " + GatewayCore.String()},
	}
	for _, s := range steps {
		f := strings.Fields(s.args)
		if _, err := s.ns.Run(f[0], f[1:]...); err != nil {
			return l, err
		}
	}
	if err := l.SetMasquerade(""); err != nil {
		return l, err
	}

	var sas strings.Builder
	addSAs := func(name string, inner netip.Addr, spiIn, spiOut uint32, kin, kout string) {
		fmt.Fprintf(&sas, `
  - {name: %[1]s-in,  spi: %[2]d, direction: in,  mode: tunnel, proposal: aes128gcm16, enc_key: %[4]s,
     local: %[6]s, peer: %[7]s, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: %[8]s/32}}
  - {name: %[1]s-out, spi: %[3]d, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: %[5]s,
     local: %[6]s, peer: %[7]s, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: %[8]s/32}}`, name, spiIn, spiOut, kin, kout, GatewayPublic, NAPTWAN, inner)
	}
	gwESP := netip.AddrPortFrom(GatewayPublic, 4500)
	for i := range o.Phones {
		n := i + 1
		ns, err := mk(fmt.Sprintf("ue%d", n))
		if err != nil {
			return l, err
		}
		p := &Phone{N: n, NS: ns, LAN: netip.AddrFrom4([4]byte{192, 168, 1, byte(10 + n)}),
			Inner: netip.AddrFrom4([4]byte{10, 99, 0, byte(n)}), SPIIn: 0x1000 + uint32(n), SPIOut: 0x2000 + uint32(n),
			KeyIn: randHex(20), KeyOut: randHex(20)}
		l.Phones = append(l.Phones, p)
		sasBefore := sas.Len()
		if err := l.plug(ns, fmt.Sprintf("ue%d", n), p.LAN); err != nil {
			return l, err
		}
		addSAs(fmt.Sprintf("ue%d", n), p.Inner, p.SPIIn, p.SPIOut, p.KeyIn, p.KeyOut)
		p.saYAML = "sas:" + sas.String()[sasBefore:] + "\n"
		if o.NoTunnels {
			continue
		}
		out, in, err := phoneSAs(p.SPIIn, p.KeyIn, p.SPIOut, p.KeyOut)
		if err != nil {
			return l, err
		}
		if err := ns.Do(func() (err error) {
			p.Tunnel, err = ue.StartTunnel(ue.TunnelConfig{Local: netip.MustParseAddrPort("0.0.0.0:4500"), Gateway: gwESP,
				Out: out, In: in, TUN: "ims0", Inner: p.Inner, Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
				Keepalive: o.Keepalive})
			return err
		}); err != nil {
			return l, err
		}
	}
	if o.Bulk > 0 {
		if l.BulkNS, err = mk("bulk"); err != nil {
			return l, err
		}
		if err := l.plug(l.BulkNS, "bulk", netip.MustParseAddr("192.168.1.250")); err != nil {
			return l, err
		}
		for i := range o.Bulk {
			n := i + 1
			b := &BulkPhone{N: n, Inner: netip.AddrFrom4([4]byte{10, 99, byte(1 + i/250), byte(1 + i%250)}),
				SPIIn: 0x100000 + uint32(n), SPIOut: 0x200000 + uint32(n)}
			kin, kout := randHex(20), randHex(20)
			addSAs(fmt.Sprintf("bulk%d", n), b.Inner, b.SPIIn, b.SPIOut, kin, kout)
			out, in, err := phoneSAs(b.SPIIn, kin, b.SPIOut, kout)
			if err != nil {
				return l, err
			}
			if err := l.BulkNS.Do(func() (err error) {
				b.UE, err = ue.New(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(20000+i)), gwESP, out, in)
				return err
			}); err != nil {
				return l, err
			}
			l.Bulk = append(l.Bulk, b)
		}
	}

	if err := l.startKamailio(); err != nil {
		return l, err
	}

	state := filepath.Join(l.dir, "state")
	cfgText := fmt.Sprintf("public: {interface: pub, addresses: [%s]}\nprivate: {interface: priv}\nworkers: 2\nstate_dir: %s\n"+
		"umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}\nsas:%s\n", GatewayPublic, state, sas.String())
	if l.Config, err = config.Parse([]byte(cfgText), "lab"); err != nil {
		return l, fmt.Errorf("lab gateway config: %w", err)
	}
	if err := l.GW.Do(func() (err error) {
		l.Gateway, err = gateway.Start(ctx, l.Config, gateway.Options{Log: o.Log, NoPin: true})
		return err
	}); err != nil {
		return l, fmt.Errorf("lab gateway: %w", err)
	}
	return l, nil
}

// plug links a phone namespace to the NAPT's LAN bridge.
func (l *Lab) plug(ns *netns.NS, port string, lan netip.Addr) error {
	if err := netns.Veth(ns, "eth0", l.NAPT, port); err != nil {
		return err
	}
	for _, s := range []struct {
		ns   *netns.NS
		args []string
	}{
		{l.NAPT, []string{"ip", "link", "set", port, "master", "lan"}},
		{ns, []string{"ip", "addr", "add", lan.String() + "/24", "dev", "eth0"}},
		{ns, []string{"ip", "route", "add", "default", "via", "192.168.1.1"}},
	} {
		if _, err := s.ns.Run(s.args[0], s.args[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// SetMasquerade (re)writes the NAPT's one rule: masquerade everything
// leaving on wan, with ports from portRange ("40000-40999") when given.
func (l *Lab) SetMasquerade(portRange string) error {
	rule := "masquerade"
	if portRange != "" {
		rule = "meta l4proto { tcp, udp } masquerade to :" + portRange
	}
	text := fmt.Sprintf("table ip napt\ndelete table ip napt\ntable ip napt {\n  chain post { type nat hook postrouting priority srcnat; oifname \"wan\" %s; }\n}\n", rule)
	cmd := l.NAPT.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", l.NAPT.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// FlushConntrack forgets every NAPT mapping: the next packet of each flow
// gets a new one (a NAT re-mapping, as after a NAT box reboot or timeout).
func (l *Lab) FlushConntrack() error {
	_, err := l.NAPT.Run("conntrack", "-F")
	return err
}

func (l *Lab) startKamailio() error {
	run := filepath.Join(l.dir, "kamailio")
	if err := os.MkdirAll(run, 0o700); err != nil {
		return err
	}
	cfg := l.opts.KamailioConfig
	if cfg == "" {
		cfg = filepath.Join(run, "kamailio.cfg")
		if err := os.WriteFile(cfg, []byte(kamailio.Config), 0o600); err != nil {
			return err
		}
	}
	l.kamailioLog = &syncBuffer{}
	l.kamailio = l.Core.Command("kamailio", "-f", cfg, "-DD", "-E",
		"-l", fmt.Sprintf("udp:%s:%d", Core, SIPPort), "-m", "32", "-M", "4",
		"-Y", run, "-P", filepath.Join(run, "kamailio.pid"), "-w", run)
	l.kamailio.Stdout, l.kamailio.Stderr = l.kamailioLog, l.kamailioLog
	if err := l.kamailio.Start(); err != nil {
		return fmt.Errorf("start kamailio: %w", err)
	}
	l.kamailioStopped = make(chan struct{})
	go func() { l.kamailio.Wait(); close(l.kamailioStopped) }()
	// Up when its UDP socket is bound in the core namespace.
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		select {
		case <-l.kamailioStopped:
			return fmt.Errorf("kamailio exited at start:\n%s", l.kamailioLog.String())
		default:
		}
		out, _ := l.Core.Run("ss", "-Hulnp", "sport", "=", strconv.Itoa(SIPPort))
		if bytes.Contains(out, []byte("kamailio")) {
			return nil
		}
		if time.Now().After(end) {
			return fmt.Errorf("kamailio not listening after 15 s:\n%s", l.kamailioLog.String())
		}
	}
}

// KamailioLog is what kamailio printed so far.
func (l *Lab) KamailioLog() string { return l.kamailioLog.String() }

// Close stops everything and deletes the namespaces.
func (l *Lab) Close() error {
	var errs []error
	l.closeOnce.Do(func() {
		for _, p := range l.Phones {
			if p.Tunnel != nil {
				p.Tunnel.Close()
			}
		}
		for _, b := range l.Bulk {
			b.UE.Close()
		}
		if l.Gateway != nil {
			if err := l.Gateway.Stop(false); err != nil {
				errs = append(errs, err)
			}
		}
		if l.kamailio != nil && l.kamailio.Process != nil {
			l.kamailio.Process.Signal(syscall.SIGTERM)
			select {
			case <-l.kamailioStopped:
			case <-time.After(5 * time.Second):
				l.kamailio.Process.Kill()
				<-l.kamailioStopped
			}
		}
		// Whatever still runs in our namespaces (kamailio's children, a
		// sipsak or tcpdump left by a failed test) was started by us.
		for _, ns := range l.made {
			out, _ := exec.Command("ip", "netns", "pids", ns.Name).Output()
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		for i := len(l.made) - 1; i >= 0; i-- {
			if err := l.made[i].Close(); err != nil {
				errs = append(errs, err)
			}
		}
		if l.dir != "" {
			os.RemoveAll(l.dir)
		}
	})
	return errors.Join(errs...)
}

// InCounters and OutCounters are the gateway's figures for a phone's SAs.
func (l *Lab) InCounters(spiIn uint32) (packets uint64, binding netip.AddrPort) {
	c, _ := l.Gateway.Manager.Counters(sa.ID{Dir: sa.In, SPI: spiIn})
	return c.Packets, c.Binding.Addr
}

// OutPackets is the number of packets the gateway sealed for a phone.
func (l *Lab) OutPackets(spiOut uint32) uint64 {
	c, _ := l.Gateway.Manager.Counters(sa.ID{Dir: sa.Out, SPI: spiOut, Peer: netip.AddrPortFrom(NAPTWAN, 4500)})
	return c.Packets
}

func phoneSAs(spiIn uint32, kin string, spiOut uint32, kout string) (out, in *esp.SA, err error) {
	mk := func(spi uint32, keyHex string, window int) (*esp.SA, error) {
		k, err := hex.DecodeString(keyHex)
		if err != nil {
			return nil, err
		}
		return esp.NewSA(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel})
	}
	if out, err = mk(spiIn, kin, 0); err != nil {
		return nil, nil, err
	}
	in, err = mk(spiOut, kout, 1024)
	return out, in, err
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// syncBuffer collects a child's output while it runs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
