// Package ims is the lab's IMS path with a real P-CSCF: Kamailio running
// examples/kamailio/pcscf.cfg drives xesp through the sec-agree API, phones
// behind several NAPTs register over sec-agree (UDP-enc-tun), for the
// end-to-end test and `xesp-lab demo -ims`:
//
//	home1 (ue1..) ─ napt1 ─┐
//	home2 (ue..)  ─ napt2 ─┼─ inet (bridge) ─ gw: xesp (XDP+AF_XDP), public 198.51.100.1,
//	 ...                   ┘                   nft: 198.51.100.1:5060 DNAT -> P-CSCF, nothing else in
//	                                          │  xesp API: HTTPS (mTLS + token) on 10.0.0.254
//	                                          └─ core: Kamailio P-CSCF 10.0.0.1 (5060, 5063/5067, 5065),
//	                                             S-CSCF stand-in 10.0.0.2:5060
//
// What is real: xesp's data path and control API, Kamailio (P-CSCF), the
// NAPTs (nftables masquerade), the API link: Kamailio's http_client calls
// the API across the core link over TLS, verifying xesp's certificate
// against a CA made for the run (lab/testpki) and presenting a client
// certificate (api.tls.client_ca) plus the admin token. What is a stand-in, said plainly: the
// S-CSCF/HSS (SCSCF: Go, non-Milenage AKA vectors) and the phones' IMS
// stacks (UE: Go). No Go code plays the P-CSCF.
//
// Every NAPT numbers its LAN alike (192.168.1.0/24, first phone .10, SIP
// on 5060): phones share private addresses and ports. xesp gives each
// registration a core address from core_pool (CorePool); the P-CSCF sees
// and reaches each phone at its core address. Everything is created here
// under the caller's prefix and removed by Close, also after a failed
// Start; no traffic leaves the namespaces.
//
// It must not be linked by cmd/xesp.
package ims

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/examples/kamailio"
	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/lab/kamproc"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/testpki"
)

// Addresses of the topology.
var (
	Public    = netip.MustParseAddr("198.51.100.1") // xesp's public address
	PCSCF     = netip.MustParseAddr("10.0.0.1")     // Kamailio, behind xesp
	SCSCFAddr = netip.MustParseAddr("10.0.0.2")     // the stand-in registrar
	GWCore    = netip.MustParseAddr("10.0.0.254")
	// CorePool is xesp's core_pool: one core address per phone.
	CorePool = netip.MustParsePrefix("100.64.0.0/16")
)

// P-CSCF protected ports (pcscf.cfg PORT_S, PORT_C1, PORT_C2).
const (
	PortS  = 5065
	PortC1 = 5063
	PortC2 = 5067
)

// Options shape the lab.
type Options struct {
	// Prefix starts every namespace name; tests use netns.UniqueName.
	Prefix string
	// NAPTs and PhonesPerNAPT: phones ue1.. are spread over the NAPTs.
	NAPTs, PhonesPerNAPT int
	// PCSCFConfig replaces examples/kamailio/pcscf.cfg when set.
	PCSCFConfig string
	Log         *slog.Logger
}

// Lab is a running IMS topology.
type Lab struct {
	opts     Options
	Inet, GW *netns.NS
	Core     *netns.NS
	NAPT     []*netns.NS
	Homes    []*netns.NS
	UEs      []*UE
	Gateway  *gateway.Gateway
	// API is a client on the API's Unix socket; APISocket its path (the
	// one `xesp sa list --api unix:...` reads). Kamailio uses the TLS
	// listener on the gateway's core address, APIURL.
	API       *api.Client
	APISocket string
	APIURL    string
	// PKI is the run's TLS material: APICA signed the API's certificate
	// and PCSCFCert, the P-CSCF's client certificate (api.tls.client_ca
	// is APICA too).
	APICA     string
	PCSCFCert testpki.Pair
	SCSCF     *SCSCF

	dir       string
	made      []*netns.NS
	apiCancel context.CancelFunc
	apiDone   chan error
	kamailio  *kamproc.Process
	closeOnce sync.Once
}

// Tools the lab runs, with the Debian package of each.
var Tools = [][2]string{{"ip", "iproute2"}, {"nft", "nftables"}, {"ethtool", "ethtool"}, {"sysctl", "procps"}, {"kamailio", "kamailio"}}

// KamailioModules are the modules pcscf.cfg loads from packages other than
// kamailio itself.
var KamailioModules = [][2]string{{"http_client.so", "kamailio-utils-modules"}, {"jansson.so", "kamailio-extra-modules"}}

// CheckTools says what is missing and which packages provide it.
func CheckTools() error {
	var missing, pkgs []string
	for _, t := range Tools {
		if _, err := exec.LookPath(t[0]); err != nil {
			missing, pkgs = append(missing, t[0]), append(pkgs, t[1])
		}
	}
	for _, m := range KamailioModules {
		// Debian's multiarch directory, or a plain one.
		a, _ := filepath.Glob("/usr/lib/*/kamailio/modules/" + m[0])
		b, _ := filepath.Glob("/usr/lib/kamailio/modules/" + m[0])
		if len(a)+len(b) == 0 {
			missing, pkgs = append(missing, "kamailio module "+m[0]), append(pkgs, m[1])
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s (Debian packages: %s; `make deps` installs them)", strings.Join(missing, ", "), strings.Join(pkgs, " "))
	}
	return nil
}

// Start builds the topology and starts xesp, its API, Kamailio, the
// S-CSCF stand-in and the phones (not yet registered). On error
// everything made so far is removed.
func Start(ctx context.Context, o Options) (l *Lab, err error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.NAPTs < 1 || o.NAPTs > 200 || o.PhonesPerNAPT < 1 || o.PhonesPerNAPT > 200 {
		return nil, errors.New("ims lab: 1..200 NAPTs with 1..200 phones each")
	}
	if err := CheckTools(); err != nil {
		return nil, fmt.Errorf("ims lab: %w", err)
	}
	l = &Lab{opts: o}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.dir, err = os.MkdirTemp("", "xesp-ims-"); err != nil {
		return l, err
	}
	mk := func(name string) (*netns.NS, error) {
		ns, err := netns.New(o.Prefix + name)
		if err == nil {
			l.made = append(l.made, ns)
		}
		return ns, err
	}
	for _, x := range []struct {
		p    **netns.NS
		name string
	}{{&l.Inet, "inet"}, {&l.GW, "gw"}, {&l.Core, "core"}} {
		if *x.p, err = mk(x.name); err != nil {
			return l, err
		}
	}
	run := func(ns *netns.NS, cmd string) error {
		f := strings.Fields(cmd)
		_, err := ns.Run(f[0], f[1:]...)
		return err
	}
	if err := netns.Veth(l.GW, "pub", l.Inet, "g0"); err != nil {
		return l, err
	}
	if err := netns.Veth(l.GW, "priv", l.Core, "eth0"); err != nil {
		return l, err
	}
	for _, c := range []struct {
		ns  *netns.NS
		cmd string
	}{
		{l.Inet, "ip link add inetbr type bridge"}, {l.Inet, "ip link set inetbr up"}, {l.Inet, "ip link set g0 master inetbr"},
		{l.GW, "ip addr add " + Public.String() + "/24 dev pub"},
		{l.GW, "ip addr add " + GWCore.String() + "/24 dev priv"},
		{l.GW, "sysctl -qw net.ipv4.ip_forward=1"},
		{l.Core, "ip addr add " + PCSCF.String() + "/24 dev eth0"},
		{l.Core, "ip addr add " + SCSCFAddr.String() + "/24 dev eth0"},
		{l.Core, "ip route add default via " + GWCore.String()},
		{l.Core, "ip route add " + CorePool.String() + " via " + GWCore.String()},
	} {
		if err := run(c.ns, c.cmd); err != nil {
			return l, err
		}
	}
	// The gateway's kernel forwards exactly one thing from the public
	// side: unprotected SIP to the P-CSCF (DNAT from the public address);
	// it takes no TCP from there (the API listens on the core side).
	// Protected SIP reaches the P-CSCF only as xesp's decapsulated output
	// (AF_XDP, which bypasses this filter).
	nft := fmt.Sprintf(`table ip xesp_pcscf {
  chain pre { type nat hook prerouting priority dstnat; iifname "pub" ip daddr %[1]s udp dport 5060 dnat to %[2]s:5060; }
  chain forward_pub { type filter hook forward priority filter; policy drop;
    iifname "pub" ip saddr 10.0.0.0/8 drop;
    iifname "priv" accept;
    iifname "pub" ct status dnat ip daddr %[2]s udp dport 5060 accept;
  }
  # The API (TCP, on the core-side address) is for the core side only.
  chain input_pub { type filter hook input priority filter; iifname "pub" ip protocol tcp drop; }
}
`, Public, PCSCF)
	cmd := l.GW.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(nft)
	if out, err := cmd.CombinedOutput(); err != nil {
		return l, fmt.Errorf("nft in %s: %w: %s", l.GW.Name, err, bytes.TrimSpace(out))
	}

	for k := 1; k <= o.NAPTs; k++ {
		napt, err := mk(fmt.Sprintf("napt%d", k))
		if err != nil {
			return l, err
		}
		home, err := mk(fmt.Sprintf("home%d", k))
		if err != nil {
			return l, err
		}
		l.NAPT, l.Homes = append(l.NAPT, napt), append(l.Homes, home)
		if err := netns.Veth(napt, "wan", l.Inet, fmt.Sprintf("n%d", k)); err != nil {
			return l, err
		}
		if err := netns.Veth(home, "eth0", napt, "lan"); err != nil {
			return l, err
		}
		router := "192.168.1.1"
		cmds := []struct {
			ns  *netns.NS
			cmd string
		}{
			{l.Inet, fmt.Sprintf("ip link set n%d master inetbr", k)},
			{napt, fmt.Sprintf("ip addr add 198.51.100.%d/24 dev wan", 10+k)},
			{napt, "ip addr add " + router + "/24 dev lan"},
			{napt, "sysctl -qw net.ipv4.ip_forward=1"},
		}
		for j := 0; j < o.PhonesPerNAPT; j++ {
			cmds = append(cmds, struct {
				ns  *netns.NS
				cmd string
			}{home, fmt.Sprintf("ip addr add 192.168.1.%d/24 dev eth0", 10+j)})
		}
		cmds = append(cmds, struct {
			ns  *netns.NS
			cmd string
		}{home, "ip route add default via " + router})
		for _, c := range cmds {
			if err := run(c.ns, c.cmd); err != nil {
				return l, err
			}
		}
		text := "table ip napt {\n  chain post { type nat hook postrouting priority srcnat; oifname \"wan\" masquerade; }\n}\n"
		cmd := napt.Command("nft", "-f", "-")
		cmd.Stdin = strings.NewReader(text)
		if out, err := cmd.CombinedOutput(); err != nil {
			return l, fmt.Errorf("nft in %s: %w: %s", napt.Name, err, bytes.TrimSpace(out))
		}
	}

	// xesp: the data path with no SAs; the P-CSCF creates them.
	cfgText := fmt.Sprintf("public: {interface: pub, addresses: [%s]}\nprivate: {interface: priv}\nworkers: 2\nstate_dir: %s\ncore_pool: %s\n"+
		"umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}\n", Public, filepath.Join(l.dir, "state"), CorePool)
	cfg, err := config.Parse([]byte(cfgText), "ims-lab")
	if err != nil {
		return l, fmt.Errorf("ims lab gateway config: %w", err)
	}
	if err := l.GW.Do(func() (err error) {
		l.Gateway, err = gateway.Start(ctx, cfg, gateway.Options{Log: o.Log, NoPin: true})
		return err
	}); err != nil {
		return l, fmt.Errorf("ims lab gateway: %w", err)
	}
	token := randHex(24)
	if err := l.startAPI(cfg, token); err != nil {
		return l, err
	}
	if err := l.startKamailio(token); err != nil {
		return l, err
	}
	var sconn *net.UDPConn
	if err := l.Core.Do(func() (err error) {
		sconn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(SCSCFAddr, 5060)))
		return err
	}); err != nil {
		return l, fmt.Errorf("s-cscf socket: %w", err)
	}
	l.SCSCF = StartSCSCF(sconn, netip.AddrPortFrom(PCSCF, 5060))

	n := 0
	for k := 1; k <= o.NAPTs; k++ {
		for j := 0; j < o.PhonesPerNAPT; j++ {
			n++
			lan := netip.AddrFrom4([4]byte{192, 168, 1, byte(10 + j)})
			var u *UE
			if err := l.Homes[k-1].Do(func() (err error) {
				u, err = NewUE(fmt.Sprintf("ue%d", n), lan, PCSCF, Public)
				return err
			}); err != nil {
				return l, err
			}
			l.UEs = append(l.UEs, u)
		}
	}
	return l, nil
}

func (l *Lab) startAPI(cfg *config.Config, token string) error {
	dp, err := l.Gateway.DataPath()
	if err != nil {
		return err
	}
	// The PKI of the API link, as an operator sets it up: a CA, the
	// API's server certificate for the address Kamailio dials, and a
	// client certificate for the P-CSCF signed by the CA that api.tls
	// accepts client certificates from.
	pki := filepath.Join(l.dir, "pki")
	if err := os.Mkdir(pki, 0o700); err != nil {
		return err
	}
	ca, err := testpki.Make(pki, "xesp-api")
	if err != nil {
		return err
	}
	server, err := ca.Issue("api", []string{GWCore.String()}, x509.ExtKeyUsageServerAuth)
	if err != nil {
		return err
	}
	if l.PCSCFCert, err = ca.Issue("pcscf", nil, x509.ExtKeyUsageClientAuth); err != nil {
		return err
	}
	l.APICA = ca.Path
	l.APISocket = filepath.Join(l.dir, "api.sock")
	srv, err := api.New(api.Options{SAD: l.Gateway.SAD, DataPath: dp, NATTPort: cfg.NATTPort, Log: l.opts.Log, CorePool: cfg.CorePrefix,
		API: config.API{Unix: l.APISocket, TCP: netip.AddrPortFrom(GWCore, 0).String(), BearerToken: sa.Secret(token),
			TLS: &config.APITLS{CertPath: server.CertPath, KeyPath: server.KeyPath, ClientCAPath: ca.Path}}})
	if err != nil {
		return err
	}
	// The listeners open in the gateway's namespace: Kamailio reaches
	// the TCP one across the core link, as from another host.
	if err := l.GW.Do(srv.Listen); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.apiCancel, l.apiDone = cancel, make(chan error, 1)
	go func() { l.apiDone <- srv.Serve(ctx) }()
	l.API, err = api.NewClient("unix:"+l.APISocket, "")
	if err != nil {
		return err
	}
	l.APIURL = "https://" + srv.TCPAddr().String()
	// pcscf-local.cfg holds the token and names the client key: 0600.
	return os.WriteFile(filepath.Join(l.dir, "pcscf-local.cfg"), []byte(fmt.Sprintf(`# written by lab/ims for this run
#!substdef "!PCSCF_IP!%s!g"
#!substdef "!PUBLIC_IP!%s!g"
#!substdef "!SCSCF_IP!%s!g"
#!substdef "!SCSCF_PORT!5060!g"
#!substdef "!XESP_API!%s!g"
#!substdef "!XESP_TOKEN!%s!g"
#!substdef "!XESP_CA!%s!g"
#!substdef "!XESP_CERT!%s!g"
#!substdef "!XESP_KEY!%s!g"
#!substdef "!PORT_S!%d!g"
#!substdef "!PORT_C1!%d!g"
#!substdef "!PORT_C2!%d!g"
`, PCSCF, Public, SCSCFAddr, l.APIURL, token, ca.Path, l.PCSCFCert.CertPath, l.PCSCFCert.KeyPath, PortS, PortC1, PortC2)), 0o600)
}

func (l *Lab) startKamailio(token string) error {
	cfgPath := filepath.Join(l.dir, "pcscf.cfg")
	text := kamailio.PCSCF
	if l.opts.PCSCFConfig != "" {
		b, err := os.ReadFile(l.opts.PCSCFConfig)
		if err != nil {
			return err
		}
		text = string(b)
	}
	if err := os.WriteFile(cfgPath, []byte(text), 0o600); err != nil {
		return err
	}
	rundir := filepath.Join(l.dir, "run")
	if err := os.MkdirAll(rundir, 0o700); err != nil {
		return err
	}
	p, err := kamproc.Start(l.Core, l.dir, PortS, "-f", cfgPath, "-DD", "-E", "-m", "64", "-M", "8",
		"-Y", rundir, "-P", filepath.Join(rundir, "kamailio.pid"), "-w", rundir)
	if err != nil {
		return err
	}
	l.kamailio = p
	return nil
}

// KamailioLog is what the P-CSCF printed so far.
func (l *Lab) KamailioLog() string { return l.kamailio.Log() }

// Dir is the lab's working directory (Kamailio's config, the API socket).
func (l *Lab) Dir() string { return l.dir }

// Close stops everything and deletes the namespaces.
func (l *Lab) Close() error {
	var errs []error
	l.closeOnce.Do(func() {
		for _, u := range l.UEs {
			u.Close()
		}
		if l.SCSCF != nil {
			l.SCSCF.Close()
		}
		l.kamailio.Stop()
		if l.API != nil {
			l.API.Close()
		}
		if l.apiCancel != nil {
			l.apiCancel()
			if err := <-l.apiDone; err != nil {
				errs = append(errs, err)
			}
		}
		if l.Gateway != nil {
			if err := l.Gateway.Stop(false); err != nil {
				errs = append(errs, err)
			}
		}
		// Whatever still runs in our namespaces was started by us.
		for _, ns := range l.made {
			ns.KillAll()
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

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
