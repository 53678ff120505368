// Package topo builds the topology the product exists for, with real SIP
// software at both ends, for the end-to-end tests and the demo:
//
//	napt1 LAN 192.168.1.0/24: ue1 192.168.1.10, ue2 .11 ...─ napt1 (nftables masquerade, 198.51.100.2) ─┐
//	napt2 LAN 192.168.1.0/24: ueP+1 192.168.1.10, ...      ─ napt2 (198.51.100.3)                    ─┼─ inet (bridge) ── gw (xesp, XDP) ── core (kamailio)
//	...                                                                                                ─┘
//	bulk (optional, behind napt1): many Go-driven phones sharing one namespace
//
// Every NAPT numbers its LAN alike and every phone speaks SIP from port
// 5060, so phones behind different NAPTs share their private address AND
// port. In UDP-enc-tun style a phone's inner address is its LAN address.
// Each phone's SA pair carries a core address (docs/lab.md): the gateway
// shows the phone to the SIP core at it, unique per phone.
//
// Every namespace is created here with the caller's name prefix and deleted
// by Close, also after a failed Start; no traffic leaves them. It must not
// judge delivery from the gateway's side: whether a phone got its own
// traffic is measured at the phones (ue.Misdelivered) and by the SIP
// software at both ends.
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
	"strings"
	"sync"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/examples/kamailio"
	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/lab/kamproc"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/ue"
)

// Addresses of the topology (documentation and private prefixes).
var (
	GatewayPublic = netip.MustParseAddr("198.51.100.1")
	NAPTWAN       = netip.MustParseAddr("198.51.100.2") // the first NAPT's public address; NAPT k has 198.51.100.(1+k)
	GatewayCore   = netip.MustParseAddr("10.0.0.254")
	Core          = netip.MustParseAddr("10.0.0.1")
	// LAN is every NAPT's LAN; its first phone has FirstPhone.
	LAN        = netip.MustParsePrefix("192.168.1.0/24")
	FirstPhone = netip.MustParseAddr("192.168.1.10")
	// CorePool is the gateway's core_pool in CorePool mode; explicit
	// core addresses (CoreExplicit) are 100.64.k.(9+j) for phone j of
	// NAPT k, inside it.
	CorePool = netip.MustParsePrefix("100.64.0.0/16")
)

// SIPPort is where kamailio listens in the core, and every phone's SIP port.
const SIPPort = 5060

// Tools are the programs the lab runs, with the Debian package of each.
var Tools = [][2]string{
	{"ip", "iproute2"}, {"nft", "nftables"}, {"ethtool", "ethtool"}, {"sysctl", "procps"}, {"conntrack", "conntrack"},
	{"kamailio", "kamailio"}, {"kamcmd", "kamailio"}, {"sipsak", "sipsak"},
}

// CoreMode says how each phone's SA pair gets its core address.
type CoreMode int

const (
	// CoreExplicit names it in the SAs (inner.core: 100.64.k.(9+j)).
	CoreExplicit CoreMode = iota
	// CoreFromPool leaves it out and gives the gateway core_pool
	// (CorePool), which allocates one per pair.
	CoreFromPool
	// CoreMixed names it for odd-numbered phones (as CoreExplicit) and
	// lets core_pool allocate it for the others, around the named ones.
	CoreMixed
	// CoreNone gives the phones none: the SIP core sees the phones'
	// private addresses, which phones behind different NAPTs share. This
	// is the misdelivery the core address exists to prevent; the lab
	// offers it to show the phones' counters see it.
	CoreNone
)

func (m CoreMode) String() string {
	switch m {
	case CoreExplicit:
		return "explicit inner.core"
	case CoreFromPool:
		return "core_pool " + CorePool.String()
	case CoreMixed:
		return "inner.core for odd phones, core_pool " + CorePool.String() + " for the others"
	case CoreNone:
		return "none (private addresses reach the core)"
	}
	return fmt.Sprintf("CoreMode(%d)", int(m))
}

// Options shape the lab.
type Options struct {
	// Prefix starts every namespace name (e.g. "xesp-"); tests use a
	// unique one so parallel runs do not collide.
	Prefix string
	// NAPTs is the number of NAPTs (0: 1), each with its own public
	// address and the same LAN numbering.
	NAPTs int
	// Phones is the number of TUN phones behind each NAPT, each in its own
	// namespace and driven by sipsak. Bulk is the number of Go-driven
	// phones sharing one namespace behind the first NAPT (unique inner
	// addresses 10.99.x.y; a core address only when the gateway has a
	// core_pool, else the LPM path).
	Phones, Bulk int
	// Core says where the phones' core addresses come from.
	Core CoreMode
	// Workers is the gateway's worker count (0: 2).
	Workers int
	// Keepalive for the TUN phones (0: ue.DefaultKeepalive).
	Keepalive time.Duration
	// NoTunnels leaves the TUN phones' namespaces without a tunnel, for a
	// phone run by other means (the xesp-lab ue command): Phone.SAYAML gives
	// it the SAs.
	NoTunnels bool
	// CrossSAs, when set to two phone numbers, deliberately gives each of
	// the two phones' tunnels the other's inbound SA: every ESP packet the
	// gateway sends them arrives under an SPI that is not their own. It
	// exists to prove the misdelivery counters count.
	CrossSAs [2]int
	// Direct is the number of TUN phones on the public segment itself,
	// no NAPT in front (phone k at DirectAddr(k), its TUN at
	// 192.168.2.(9+k)), sending plain ESP (IP protocol 50): the case
	// UDP encapsulation is not needed for.
	Direct int
	// Transport gives the TUN phones transport-mode SA pairs
	// (docs/addressing.md, "Transport mode"): each phone's segments go to
	// the gateway and on to kamailio (inner.local) from the phone's core
	// address. Needs core addresses (not CoreNone). Bulk phones stay in
	// tunnel mode.
	Transport bool
	// KamailioConfig is the core's config file (default:
	// examples/kamailio/kamailio.cfg, built into the binary).
	KamailioConfig string
	Log            *slog.Logger
}

// Phone is one TUN phone.
type Phone struct {
	N       int    // 1..NAPTs*Phones, unique in the lab
	User    string // its SIP user, "ue<N>"
	NAPT    int    // 1..NAPTs; 0 for a direct phone
	Direct  bool   // on the public segment, no NAPT, plain ESP (Options.Direct)
	NAPTWAN netip.Addr
	NS      *netns.NS
	LAN     netip.Addr // behind the NAPT
	Inner   netip.Addr // the TUN's address, the SIP client's source: the LAN address (UDP-enc-tun)
	Core    netip.Addr // the address the SIP core sees the phone at; invalid with CoreNone
	SPIIn   uint32     // the gateway's inbound SA: the phone seals with it
	SPIOut  uint32     // the gateway's outbound SA: the phone opens with it
	KeyIn   string     // hex key||salt of SPIIn
	KeyOut  string
	Tunnel  *ue.Tunnel // nil with Options.NoTunnels
	UAS     *UAS       // the phone's SIP listener while Listen runs
	saYAML  string
}

// SeenAt is the address the SIP core sees the phone at: its core address,
// or its inner address when it has none.
func (p *Phone) SeenAt() netip.Addr {
	if p.Core.IsValid() {
		return p.Core
	}
	return p.Inner
}

// SAYAML is the phone's SA pair as the gateway has it (an SA file, the
// gateway's view: `xesp-lab ue -view gateway` reads it).
func (p *Phone) SAYAML() string { return p.saYAML }

// BulkPhone is a Go-driven phone in the shared bulk namespace.
type BulkPhone struct {
	N             int
	Inner         netip.Addr
	Core          netip.Addr // from core_pool when the gateway has one; else none (the gateway's LPM path)
	SPIIn, SPIOut uint32
	UE            *ue.Phone
}

// Lab is a running topology.
type Lab struct {
	opts      Options
	NAPT      *netns.NS   // the first NAPT
	NAPTs     []*netns.NS // all of them, NAPTs[k-1] is NAPT k
	Inet      *netns.NS   // the public segment: a bridge joining the NAPTs and the gateway
	GW, Core  *netns.NS
	BulkNS    *netns.NS
	Phones    []*Phone
	Bulk      []*BulkPhone
	Gateway   *gateway.Gateway
	Config    *config.Config
	outPeer   map[uint32]netip.AddrPort // outbound SPI -> its configured peer (NAPT's public address:4500, or a direct phone's address:0)
	dir       string                    // kamailio runtime, state, SIP files
	kamailio  *kamproc.Process
	made      []*netns.NS
	closeOnce sync.Once
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

// NAPTAddr is NAPT k's public address.
// DirectAddr is direct phone k's public address (Options.Direct).
func DirectAddr(k int) netip.Addr { return netip.AddrFrom4([4]byte{198, 51, 100, byte(100 + k)}) }

func NAPTAddr(k int) netip.Addr { return netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + k)}) }

// Start builds the topology, starts kamailio, the gateway and the phones.
// On error everything made so far is removed.
func Start(ctx context.Context, o Options) (l *Lab, err error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.NAPTs <= 0 {
		o.NAPTs = 1
	}
	if o.Workers <= 0 {
		o.Workers = 2
	}
	if o.NAPTs > 50 || o.NAPTs*o.Phones+o.Direct > 200 || o.Direct > 50 || o.Phones > 200 || o.Bulk > 40000 {
		return nil, fmt.Errorf("lab: at most 50 NAPTs, 200 TUN phones in all and 40000 bulk phones (one UDP port each from 20000)")
	}
	if o.Transport && o.Core == CoreNone {
		return nil, fmt.Errorf("lab: transport mode needs core addresses (Core: %s)", o.Core)
	}
	if err := CheckTools(); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l = &Lab{opts: o, outPeer: map[uint32]netip.AddrPort{}}
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
	if l.Inet, err = mk("inet"); err != nil {
		return l, err
	}
	if l.GW, err = mk("gw"); err != nil {
		return l, err
	}
	if l.Core, err = mk("core"); err != nil {
		return l, err
	}
	if err := netns.Veth(l.GW, "pub", l.Inet, "gw"); err != nil {
		return l, err
	}
	if err := netns.Veth(l.GW, "priv", l.Core, "eth0"); err != nil {
		return l, err
	}
	type step struct {
		ns   *netns.NS
		args string
	}
	steps := []step{
		{l.Inet, "ip link add sw type bridge"},
		{l.Inet, "ip link set sw up"},
		{l.Inet, "ip link set gw master sw"},
		{l.GW, "ip addr add " + GatewayPublic.String() + "/24 dev pub"},
		{l.GW, "ip addr add " + GatewayCore.String() + "/24 dev priv"},
		{l.Core, "ip addr add " + Core.String() + "/24 dev eth0"},
		// Core addresses, and the phones' own addresses where they
		// reach the core untranslated (CoreNone, the bulk phones).
		{l.Core, "ip route add 100.64.0.0/10 via " + GatewayCore.String()},
		{l.Core, "ip route add " + LAN.String() + " via " + GatewayCore.String()},
		{l.Core, "ip route add 10.99.0.0/16 via " + GatewayCore.String()},
		{l.Core, "ip route add 192.168.2.0/24 via " + GatewayCore.String()}, // direct phones' TUNs
	}
	for k := 1; k <= o.NAPTs; k++ {
		ns, err := mk(fmt.Sprintf("napt%d", k))
		if err != nil {
			return l, err
		}
		l.NAPTs = append(l.NAPTs, ns)
		if err := netns.Veth(ns, "wan", l.Inet, fmt.Sprintf("napt%d", k)); err != nil {
			return l, err
		}
		steps = append(steps,
			step{l.Inet, fmt.Sprintf("ip link set napt%d master sw", k)},
			step{ns, "ip link add lan type bridge"},
			step{ns, "ip link set lan up"},
			step{ns, "ip addr add 192.168.1.1/24 dev lan"},
			step{ns, "ip addr add " + NAPTAddr(k).String() + "/24 dev wan"},
			step{ns, "sysctl -qw net.ipv4.ip_forward=1"})
	}
	l.NAPT = l.NAPTs[0]
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
	addSAs := func(name string, wan, inner, core netip.Addr, spiIn, spiOut uint32, kin, kout string, transport, plain bool) {
		encap := "encap: {local_port: 4500, peer_port: 4500}, "
		if plain {
			encap = ""
		}
		mode := "tunnel"
		in := "{local: 10.0.0.0/24, peer: " + inner.String() + "/32}"
		if core.IsValid() {
			in = "{local: 10.0.0.0/24, peer: " + inner.String() + "/32, core: " + core.String() + "}"
		}
		if transport {
			// The phone's segments go to kamailio from its core address.
			mode, in = "transport", "{local: "+Core.String()+"}"
			if core.IsValid() {
				in = "{local: " + Core.String() + ", core: " + core.String() + "}"
			}
		}
		fmt.Fprintf(&sas, `
  - {name: %[1]s-in,  pair: %[1]s, spi: %[2]d, direction: in,  mode: %[9]s, proposal: aes128gcm16, enc_key: %[4]s,
     local: %[6]s, peer: %[7]s, %[10]sinner: %[8]s}
  - {name: %[1]s-out, pair: %[1]s, spi: %[3]d, direction: out, mode: %[9]s, proposal: aes128gcm16, enc_key: %[5]s,
     local: %[6]s, peer: %[7]s, %[10]sinner: %[8]s}`, name, spiIn, spiOut, kin, kout, GatewayPublic, wan, in, mode, encap)
		l.outPeer[spiOut] = netip.AddrPortFrom(wan, 4500)
		if plain {
			l.outPeer[spiOut] = netip.AddrPortFrom(wan, 0)
		}
	}
	gwESP := netip.AddrPortFrom(GatewayPublic, 4500)
	for i := range o.NAPTs * o.Phones {
		n, k, j := i+1, i/o.Phones+1, i%o.Phones+1
		ns, err := mk(fmt.Sprintf("ue%d", n))
		if err != nil {
			return l, err
		}
		lan := netip.AddrFrom4([4]byte{192, 168, 1, byte(9 + j)})
		p := &Phone{N: n, User: fmt.Sprintf("ue%d", n), NAPT: k, NAPTWAN: NAPTAddr(k), NS: ns, LAN: lan, Inner: lan,
			SPIIn: 0x1000 + uint32(n), SPIOut: 0x2000 + uint32(n), KeyIn: randHex(20), KeyOut: randHex(20)}
		if o.Core == CoreExplicit || (o.Core == CoreMixed && n%2 == 1) {
			p.Core = netip.AddrFrom4([4]byte{100, 64, byte(k), byte(9 + j)})
		}
		l.Phones = append(l.Phones, p)
		if err := l.plug(l.NAPTs[k-1], ns, fmt.Sprintf("ue%d", j), p.LAN); err != nil {
			return l, err
		}
		sasBefore := sas.Len()
		addSAs(p.User, p.NAPTWAN, p.Inner, p.Core, p.SPIIn, p.SPIOut, p.KeyIn, p.KeyOut, o.Transport, false)
		p.saYAML = "sas:" + sas.String()[sasBefore:] + "\n"
	}
	for d := 1; d <= o.Direct; d++ {
		n := len(l.Phones) + 1
		ns, err := mk(fmt.Sprintf("ue%d", n))
		if err != nil {
			return l, err
		}
		wan := DirectAddr(d)
		p := &Phone{N: n, User: fmt.Sprintf("ue%d", n), NAPTWAN: wan, NS: ns, LAN: wan, Direct: true,
			Inner: netip.AddrFrom4([4]byte{192, 168, 2, byte(9 + d)}),
			SPIIn: 0x1000 + uint32(n), SPIOut: 0x2000 + uint32(n), KeyIn: randHex(20), KeyOut: randHex(20)}
		if o.Core == CoreExplicit || (o.Core == CoreMixed && n%2 == 1) {
			p.Core = netip.AddrFrom4([4]byte{100, 64, 200, byte(9 + d)})
		}
		l.Phones = append(l.Phones, p)
		if err := netns.Veth(ns, "wan", l.Inet, fmt.Sprintf("d%d", d)); err != nil {
			return l, err
		}
		for _, st := range []step{{l.Inet, fmt.Sprintf("ip link set d%d master sw", d)}, {ns, "ip addr add " + wan.String() + "/24 dev wan"}} {
			f := strings.Fields(st.args)
			if _, err := st.ns.Run(f[0], f[1:]...); err != nil {
				return l, err
			}
		}
		sasBefore := sas.Len()
		addSAs(p.User, wan, p.Inner, p.Core, p.SPIIn, p.SPIOut, p.KeyIn, p.KeyOut, o.Transport, true)
		p.saYAML = "sas:" + sas.String()[sasBefore:] + "\n"
	}
	if !o.NoTunnels {
		for _, p := range l.Phones {
			if err := l.startTunnel(p, gwESP); err != nil {
				return l, err
			}
		}
	}
	if o.Bulk > 0 {
		if l.BulkNS, err = mk("bulk"); err != nil {
			return l, err
		}
		if err := l.plug(l.NAPT, l.BulkNS, "bulk", netip.MustParseAddr("192.168.1.250")); err != nil {
			return l, err
		}
		for i := range o.Bulk {
			n := i + 1
			b := &BulkPhone{N: n, Inner: netip.AddrFrom4([4]byte{10, 99, byte(1 + i/250), byte(1 + i%250)}),
				SPIIn: 0x100000 + uint32(n), SPIOut: 0x200000 + uint32(n)}
			kin, kout := randHex(20), randHex(20)
			addSAs(fmt.Sprintf("bulk%d", n), NAPTWAN, b.Inner, netip.Addr{}, b.SPIIn, b.SPIOut, kin, kout, false, false)
			out, in, err := phoneSAs(b.SPIIn, kin, b.SPIOut, kout, esp.ModeTunnel)
			if err != nil {
				return l, err
			}
			if err := l.BulkNS.Do(func() (err error) {
				b.UE, err = ue.New(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(20000+i)), gwESP, out, in)
				return err
			}); err != nil {
				return l, err
			}
			b.UE.Expect(b.Inner, []uint16{SIPPort}, ue.SIPClaim(fmt.Sprintf("bulk%d", n)))
			l.Bulk = append(l.Bulk, b)
		}
	}

	if err := l.startKamailio(); err != nil {
		return l, err
	}

	state := filepath.Join(l.dir, "state")
	pool := ""
	if o.Core == CoreFromPool || o.Core == CoreMixed {
		pool = "core_pool: " + CorePool.String() + "\n"
	}
	cfgText := fmt.Sprintf("public: {interface: pub, addresses: [%s]}\nprivate: {interface: priv}\nworkers: %d\nstate_dir: %s\n%s"+
		"umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}\nsas:%s\n", GatewayPublic, o.Workers, state, pool, sas.String())
	if l.Config, err = config.Parse([]byte(cfgText), "lab"); err != nil {
		return l, fmt.Errorf("lab gateway config: %w", err)
	}
	if o.Core == CoreFromPool || o.Core == CoreMixed {
		// The gateway allocated them at config load; the phones' SA
		// files show them too.
		cores := map[uint32]netip.Addr{}
		for _, s := range l.Config.SAList {
			if s.Direction == sa.In {
				cores[s.SPI] = s.Core
			}
		}
		for _, p := range l.Phones {
			if p.Core.IsValid() {
				if cores[p.SPIIn] != p.Core {
					return l, fmt.Errorf("lab: %s named core address %s, the gateway has %s", p.User, p.Core, cores[p.SPIIn])
				}
				continue
			}
			if p.Core = cores[p.SPIIn]; !p.Core.IsValid() {
				return l, fmt.Errorf("lab: the gateway allocated no core address for %s", p.User)
			}
			p.saYAML = strings.ReplaceAll(p.saYAML, "peer: "+p.Inner.String()+"/32}", "peer: "+p.Inner.String()+"/32, core: "+p.Core.String()+"}")
			p.saYAML = strings.ReplaceAll(p.saYAML, "inner: {local: "+Core.String()+"}", "inner: {local: "+Core.String()+", core: "+p.Core.String()+"}")
		}
		for _, b := range l.Bulk {
			b.Core = cores[b.SPIIn]
		}
	}
	if err := l.GW.Do(func() (err error) {
		l.Gateway, err = gateway.Start(ctx, l.Config, gateway.Options{Log: o.Log, NoPin: true})
		return err
	}); err != nil {
		return l, fmt.Errorf("lab gateway: %w", err)
	}
	return l, nil
}

// startTunnel starts phone p's TUN tunnel in its namespace: inner address
// its LAN address, SIP port 5060, misdelivery counted by SPI, inner
// destination and SIP user.
func (l *Lab) startTunnel(p *Phone, gw netip.AddrPort) error {
	mode := esp.ModeTunnel
	if l.opts.Transport {
		mode = esp.ModeTransport
	}
	out, in, err := phoneSAs(p.SPIIn, p.KeyIn, p.SPIOut, p.KeyOut, mode)
	if err != nil {
		return err
	}
	for i, n := range l.opts.CrossSAs {
		if n == p.N && l.opts.CrossSAs[1-i] != 0 {
			// The other phone's inbound SA in place of this one's.
			o := l.opts.CrossSAs[1-i]
			if o < 1 || o > len(l.Phones) {
				return fmt.Errorf("lab: CrossSAs names phone %d of %d", o, len(l.Phones))
			}
			q := l.Phones[o-1]
			if _, in, err = phoneSAs(q.SPIIn, q.KeyIn, q.SPIOut, q.KeyOut, mode); err != nil {
				return err
			}
		}
	}
	return p.NS.Do(func() (err error) {
		local := netip.MustParseAddrPort("0.0.0.0:4500")
		if p.Direct {
			local = netip.AddrPortFrom(p.LAN, 0)
		}
		p.Tunnel, err = ue.StartTunnel(ue.TunnelConfig{Local: local, Gateway: gw, PlainESP: p.Direct,
			Out: out, In: in, TUN: "ims0", Inner: p.Inner, Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
			Keepalive: l.opts.Keepalive, Ports: []uint16{SIPPort}, Claim: ue.SIPClaim(p.User)})
		return err
	})
}

// plug links a phone namespace to a NAPT's LAN bridge.
func (l *Lab) plug(napt, ns *netns.NS, port string, lan netip.Addr) error {
	if err := netns.Veth(ns, "eth0", napt, port); err != nil {
		return err
	}
	for _, s := range []struct {
		ns   *netns.NS
		args []string
	}{
		{napt, []string{"ip", "link", "set", port, "master", "lan"}},
		{ns, []string{"ip", "addr", "add", lan.String() + "/24", "dev", "eth0"}},
		{ns, []string{"ip", "route", "add", "default", "via", "192.168.1.1"}},
	} {
		if _, err := s.ns.Run(s.args[0], s.args[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// SetMasquerade (re)writes every NAPT's one rule: masquerade everything
// leaving on wan, with ports from portRange ("40000-40999") when given.
func (l *Lab) SetMasquerade(portRange string) error {
	for _, ns := range l.NAPTs {
		if err := setMasquerade(ns, portRange); err != nil {
			return err
		}
	}
	return nil
}

func setMasquerade(napt *netns.NS, portRange string) error {
	rule := "masquerade"
	if portRange != "" {
		rule = "meta l4proto { tcp, udp } masquerade to :" + portRange
	}
	text := fmt.Sprintf("table ip napt\ndelete table ip napt\ntable ip napt {\n  chain post { type nat hook postrouting priority srcnat; oifname \"wan\" %s; }\n}\n", rule)
	cmd := napt.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", napt.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// FlushConntrack forgets every NAPT mapping: the next packet of each flow
// gets a new one (a NAT re-mapping, as after a NAT box reboot or timeout).
func (l *Lab) FlushConntrack() error {
	for _, ns := range l.NAPTs {
		if _, err := ns.Run("conntrack", "-F"); err != nil {
			return err
		}
	}
	return nil
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
	p, err := kamproc.Start(l.Core, "", SIPPort, "-f", cfg, "-DD", "-E",
		"-l", fmt.Sprintf("udp:%s:%d", Core, SIPPort), "-m", "32", "-M", "4",
		"-Y", run, "-P", filepath.Join(run, "kamailio.pid"), "-w", run)
	if err != nil {
		return err
	}
	l.kamailio = p
	return nil
}

// KamailioLog is what kamailio printed so far.
func (l *Lab) KamailioLog() string { return l.kamailio.Log() }

// Close stops everything and deletes the namespaces.
func (l *Lab) Close() error {
	var errs []error
	l.closeOnce.Do(func() {
		for _, p := range l.Phones {
			if p.UAS != nil {
				p.UAS.Close()
			}
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
		l.kamailio.Stop()
		// Whatever still runs in our namespaces (kamailio's children, a
		// sipsak or tcpdump left by a failed test) was started by us.
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

// InCounters and OutCounters are the gateway's figures for a phone's SAs.
func (l *Lab) InCounters(spiIn uint32) (packets uint64, binding netip.AddrPort) {
	c, _ := l.Gateway.Manager.Counters(sa.ID{Dir: sa.In, SPI: spiIn})
	return c.Packets, c.Binding.Addr
}

// OutPackets is the number of packets the gateway sealed for a phone.
func (l *Lab) OutPackets(spiOut uint32) uint64 {
	c, _ := l.Gateway.Manager.Counters(sa.ID{Dir: sa.Out, SPI: spiOut, Peer: l.outPeer[spiOut]})
	return c.Packets
}

func phoneSAs(spiIn uint32, kin string, spiOut uint32, kout string, mode esp.Mode) (out, in *esp.Transform, err error) {
	mk := func(spi uint32, keyHex string, window int) (*esp.Transform, error) {
		k, err := hex.DecodeString(keyHex)
		if err != nil {
			return nil, err
		}
		return esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: mode})
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
