package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/cli"
	"github.com/xesp/xesp/lab/ue"
	"github.com/xesp/xesp/lab/ueapi"
)

func init() {
	register(cli.Command{Name: "ue", Summary: "emulate a phone: a TUN device whose packets go out as UDP-encapsulated ESP (root)", Run: runUE})
}

// ueOptions are the flags of xesp-lab ue.
type ueOptions struct {
	saFile    string
	view      string // "phone" or "gateway": whose point of view the SA file is written from
	spiIn     uint32 // select the phone's inbound SA (0: the only one)
	spiOut    uint32
	local     string
	gateway   string
	tun       string
	inner     string
	routes    string
	mtu       int
	keepalive time.Duration
	stats     time.Duration
	api       string // the phone's control API socket; empty: none
	mode      string // tunnel or transport, when no SA file gives it
	ports     string // the phone's inner ports, for the misdelivery counts
	sipUser   string // the phone's SIP user, for the misdelivery counts
}

func runUE(args []string) error {
	var o ueOptions
	fs := flag.NewFlagSet("ue", flag.ContinueOnError)
	fs.StringVar(&o.saFile, "sa", "", "SA file or xesp config (docs/sa-format.md) holding the phone's SA pair (required)")
	fs.StringVar(&o.view, "view", "phone", "the SA file's point of view: phone (out = phone to gateway) or gateway (the gateway's own SAs, mirrored)")
	spiIn := fs.String("spi-in", "", "SPI of the SA the phone opens replies with, when the file has several")
	spiOut := fs.String("spi-out", "", "SPI of the SA the phone seals with, when the file has several")
	fs.StringVar(&o.local, "local", "", "UDP address to send from (default 0.0.0.0 and the SA's encapsulation port of the phone)")
	fs.StringVar(&o.gateway, "gateway", "", "gateway address:port (default from the SA's addresses and encapsulation port)")
	fs.StringVar(&o.tun, "tun", "", "TUN device name (default: the kernel picks tunN)")
	fs.StringVar(&o.inner, "inner", "", "the phone's inner address (default: the phone's tunnel selector when it is one address)")
	fs.StringVar(&o.routes, "route", "", "comma-separated prefixes routed into the TUN (default: the gateway-side tunnel selector)")
	fs.IntVar(&o.mtu, "mtu", ue.DefaultMTU, "TUN MTU")
	fs.DurationVar(&o.keepalive, "keepalive", ue.DefaultKeepalive, "NAT keepalive interval (RFC 3948); 0 disables")
	fs.DurationVar(&o.stats, "stats", 0, "print counters this often (0: only on exit)")
	fs.StringVar(&o.api, "api", "", "serve the phone's control API on this Unix socket (0600): add, replace (rekey) and delete its SAs at run time (POST/GET /v1/sas, DELETE /v1/sas/REF, GET /v1/stats; `xesp sa --api unix:PATH` talks to it); with -api, -sa is optional")
	fs.StringVar(&o.mode, "mode", "", "ESP mode without -sa: tunnel (default) or transport")
	fs.StringVar(&o.ports, "ports", "", "comma-separated inner UDP/TCP ports the phone listens on: a decrypted packet to another port is counted and dropped as misdelivered (selector); default any")
	fs.StringVar(&o.sipUser, "sip-user", "", "the phone's SIP user: a decrypted SIP message naming another user (Request-URI, or To of a response) is counted and dropped as misdelivered (other_phone); phones behind different NAPTs share inner address and port, so only this tells them apart")
	if err := fs.Parse(args); err != nil {
		return errors.Join(errUsage, err)
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	for _, f := range []struct {
		text string
		dst  *uint32
		name string
	}{{*spiIn, &o.spiIn, "-spi-in"}, {*spiOut, &o.spiOut, "-spi-out"}} {
		if f.text == "" {
			continue
		}
		v, err := strconv.ParseUint(f.text, 0, 32)
		if err != nil || v == 0 {
			return fmt.Errorf("%w: %s %q: want a non-zero 32-bit SPI (decimal or 0x hex)", errUsage, f.name, f.text)
		}
		*f.dst = uint32(v)
	}
	cfg, initial, err := ueSetup(o)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return serveUE(ctx, cfg, ueServe{every: o.stats, api: o.api, initial: initial}, os.Stdout)
}

// ueConfig is ueSetup without the SAs' specs.
func ueConfig(o ueOptions) (ue.TunnelConfig, error) {
	cfg, _, err := ueSetup(o)
	return cfg, err
}

// ueSetup reads the SA file and turns the selected pair into a tunnel
// configuration; everything the flags leave open comes from the SAs. It
// also returns the pair in the phone's view, for the phone's API to list.
// With -api and no -sa the phone starts without SAs and the flags say
// everything.
func ueSetup(o ueOptions) (ue.TunnelConfig, []sa.SA, error) {
	cfg, initial, err := ueSetupSAs(o)
	if err != nil {
		return cfg, nil, err
	}
	// The phone's identity, for the misdelivery counts.
	if o.ports != "" {
		for _, f := range strings.Split(o.ports, ",") {
			v, err := strconv.ParseUint(strings.TrimSpace(f), 10, 16)
			if err != nil || v == 0 {
				return cfg, nil, fmt.Errorf("%w: -ports %q: %q is not a port (1-65535)", errUsage, o.ports, f)
			}
			cfg.Ports = append(cfg.Ports, uint16(v))
		}
	}
	if o.sipUser != "" {
		cfg.Claim = ue.SIPClaim(o.sipUser)
	}
	return cfg, initial, nil
}

func ueSetupSAs(o ueOptions) (ue.TunnelConfig, []sa.SA, error) {
	var cfg ue.TunnelConfig
	if o.saFile == "" && o.api == "" {
		return cfg, nil, fmt.Errorf("%w: -sa is required unless -api is given", errUsage)
	}
	if o.saFile == "" {
		cfg, err := ueBare(o)
		return cfg, nil, err
	}
	if o.mode != "" {
		return cfg, nil, fmt.Errorf("%w: -mode is for a phone without -sa: the SAs give the mode", errUsage)
	}
	if o.view != "phone" && o.view != "gateway" {
		return cfg, nil, fmt.Errorf("%w: -view %q: want phone or gateway", errUsage, o.view)
	}
	list, err := sa.ParseFile(o.saFile, sa.Options{})
	if err != nil {
		// A gateway's whole config file carries its SAs too.
		c, cerr := config.Load(o.saFile)
		if cerr != nil {
			return cfg, nil, err
		}
		list = c.SAList
	}
	// Seen from the phone: out seals toward the gateway. A gateway-view
	// file names the same SA "in"; its local address is the gateway's.
	phoneDir := func(s sa.SA) sa.Direction {
		if o.view == "gateway" {
			if s.Direction == sa.In {
				return sa.Out
			}
			return sa.In
		}
		return s.Direction
	}
	pick := func(dir sa.Direction, spi uint32, flag string) (sa.SA, error) {
		var found []sa.SA
		for _, s := range list {
			if phoneDir(s) == dir && (spi == 0 || s.SPI == spi) {
				found = append(found, s)
			}
		}
		switch {
		case len(found) == 1:
			return found[0], nil
		case len(found) == 0 && spi != 0:
			return sa.SA{}, fmt.Errorf("%s: no %s SA (phone's view) with SPI 0x%08x", o.saFile, dir, spi)
		case len(found) == 0:
			return sa.SA{}, fmt.Errorf("%s: no %s SA (phone's view; -view %s)", o.saFile, dir, o.view)
		}
		return sa.SA{}, fmt.Errorf("%w: %s holds %d %s SAs (phone's view): choose one with %s", errUsage, o.saFile, len(found), dir, flag)
	}
	out, err := pick(sa.Out, o.spiOut, "-spi-out")
	if err != nil {
		return cfg, nil, err
	}
	in, err := pick(sa.In, o.spiIn, "-spi-in")
	if err != nil {
		return cfg, nil, err
	}
	if out.Mode != in.Mode {
		return cfg, nil, fmt.Errorf("%s: %s is %s mode but %s is %s mode", o.saFile, out.Label(), out.Mode, in.Label(), in.Mode)
	}
	if out.Encap == nil {
		return cfg, nil, fmt.Errorf("%s: %s has no encap: the emulated phone speaks UDP-encapsulated ESP only", o.saFile, out.Label())
	}
	// Addresses and ports from the phone's side. The phone's own outer
	// address is not used: behind a NAPT it is not what the gateway
	// sees, so the socket binds the wildcard unless -local says otherwise.
	gwAddr := out.Peer
	phonePort, gwPort := out.Encap.LocalPort, out.Encap.PeerPort
	phoneSel, gwSel := out.InnerLocal, out.InnerPeer
	if o.view == "gateway" {
		gwAddr = out.Local
		phonePort, gwPort = out.Encap.PeerPort, out.Encap.LocalPort
		phoneSel, gwSel = out.InnerPeer, out.InnerLocal
	}
	if err := ueFlags(o, &cfg, netip.AddrPortFrom(gwAddr, gwPort), phonePort, phoneSel, gwSel); err != nil {
		return cfg, nil, err
	}
	if cfg.Out, err = engineSA(out, 0); err != nil {
		return cfg, nil, fmt.Errorf("%s: %w", o.saFile, err)
	}
	window := int(in.ReplayWindow)
	if o.view == "gateway" {
		// The gateway's outbound SA has no window; the phone opening it
		// wants the format's default.
		window = esp.DefaultReplayWindow
	}
	if cfg.In, err = engineSA(in, window); err != nil {
		return cfg, nil, fmt.Errorf("%s: %w", o.saFile, err)
	}
	if o.view == "gateway" {
		out, in = mirrorSA(out), mirrorSA(in)
		in.ReplayWindow = uint32(window)
	}
	return cfg, []sa.SA{out, in}, nil
}

// ueBare is the configuration of a phone started without SAs: they come
// later through its API, so the flags must say what the SAs would have.
func ueBare(o ueOptions) (ue.TunnelConfig, error) {
	var cfg ue.TunnelConfig
	switch o.mode {
	case "", "tunnel":
		cfg.Mode = esp.ModeTunnel
	case "transport":
		cfg.Mode = esp.ModeTransport
	default:
		return cfg, fmt.Errorf("%w: -mode %q: want tunnel or transport", errUsage, o.mode)
	}
	if o.gateway == "" {
		return cfg, fmt.Errorf("%w: -gateway is required without -sa", errUsage)
	}
	if o.inner == "" {
		return cfg, fmt.Errorf("%w: -inner is required without -sa", errUsage)
	}
	if o.routes == "" {
		return cfg, fmt.Errorf("%w: -route is required without -sa: nothing would enter the TUN", errUsage)
	}
	return cfg, ueFlags(o, &cfg, netip.AddrPort{}, 4500, netip.Prefix{}, netip.Prefix{})
}

// ueFlags fills cfg's addresses, routes and timers from the flags, with
// defaults from the SAs (zero values when there are none). The phone's
// own outer address is not used: behind a NAPT it is not what the
// gateway sees, so the socket binds the wildcard unless -local says
// otherwise.
func ueFlags(o ueOptions, cfg *ue.TunnelConfig, gw netip.AddrPort, phonePort uint16, phoneSel, gwSel netip.Prefix) error {
	var err error
	cfg.Gateway = gw
	if o.gateway != "" {
		if cfg.Gateway, err = netip.ParseAddrPort(o.gateway); err != nil {
			return fmt.Errorf("%w: -gateway: %v", errUsage, err)
		}
	}
	cfg.Local = netip.AddrPortFrom(netip.IPv4Unspecified(), phonePort)
	if cfg.Gateway.Addr().Is6() {
		cfg.Local = netip.AddrPortFrom(netip.IPv6Unspecified(), phonePort)
	}
	if o.local != "" {
		if cfg.Local, err = netip.ParseAddrPort(o.local); err != nil {
			return fmt.Errorf("%w: -local: %v", errUsage, err)
		}
	}
	switch {
	case o.inner != "":
		if cfg.Inner, err = netip.ParseAddr(o.inner); err != nil {
			return fmt.Errorf("%w: -inner: %v", errUsage, err)
		}
	case phoneSel.IsValid() && phoneSel.IsSingleIP():
		cfg.Inner = phoneSel.Addr()
	default:
		return fmt.Errorf("%w: -inner is required: the phone's selector (%v) is not a single address", errUsage, phoneSel)
	}
	if o.routes != "" {
		for _, r := range strings.Split(o.routes, ",") {
			p, err := netip.ParsePrefix(strings.TrimSpace(r))
			if err != nil {
				return fmt.Errorf("%w: -route: %v", errUsage, err)
			}
			cfg.Routes = append(cfg.Routes, p)
		}
	} else if gwSel.IsValid() {
		cfg.Routes = []netip.Prefix{gwSel}
	}
	cfg.TUN, cfg.MTU = o.tun, o.mtu
	cfg.Keepalive = o.keepalive
	if o.keepalive == 0 {
		cfg.Keepalive = -1
	} else if o.keepalive < 0 {
		return fmt.Errorf("%w: -keepalive %v: negative", errUsage, o.keepalive)
	}
	return nil
}

// mirrorSA turns a gateway's SA into the phone's view of it: the other
// direction, the two sides' addresses, ports and selectors swapped.
func mirrorSA(s sa.SA) sa.SA {
	if s.Direction == sa.In {
		s.Direction = sa.Out
	} else {
		s.Direction = sa.In
	}
	s.Local, s.Peer = s.Peer, s.Local
	if s.Encap != nil {
		e := *s.Encap
		e.LocalPort, e.PeerPort = e.PeerPort, e.LocalPort
		s.Encap = &e
	}
	s.InnerLocal, s.InnerPeer = s.InnerPeer, s.InnerLocal
	s.Ports.Local, s.Ports.Peer = s.Ports.Peer, s.Ports.Local
	s.ReplayWindow = 0
	// The core address is how the gateway shows the phone to the SIP
	// core; the phone itself only ever sees its own inner address.
	s.Core = netip.Addr{}
	return s
}

func engineSA(s sa.SA, window int) (*esp.Transform, error) {
	mode := esp.ModeTunnel
	if s.Mode == sa.Transport {
		mode = esp.ModeTransport
	}
	return esp.NewTransform(esp.Config{Name: s.Name, SPI: s.SPI, Proposal: s.Proposal, EncKey: s.EncKey,
		AuthKey: s.AuthKey, ESN: s.ESN, ReplayWindow: window, Mode: mode})
}

// ueServe says how serveUE runs besides the tunnel.
type ueServe struct {
	every   time.Duration // print counters this often (0: only on exit)
	api     string        // the phone's API socket; empty: none
	initial []sa.SA       // the SAs the tunnel starts with, phone's view
}

// serveUE runs the tunnel (and its API) until ctx ends and prints its
// counters.
func serveUE(ctx context.Context, cfg ue.TunnelConfig, o ueServe, w io.Writer) error {
	t, err := ue.StartTunnel(cfg)
	if err != nil {
		return err
	}
	sas := "no SAs yet"
	if cfg.Out != nil && cfg.In != nil {
		sas = fmt.Sprintf("SPI out 0x%08x, in 0x%08x", cfg.Out.SPI(), cfg.In.SPI())
	}
	apiDone := make(chan error, 1)
	apiCtx, stopAPI := context.WithCancel(ctx)
	defer stopAPI()
	apiText := ""
	if o.api != "" {
		srv, err := ueapi.New(t, cfg.Gateway.String(), o.initial...)
		if err != nil {
			t.Close()
			return err
		}
		ready := make(chan struct{})
		go func() { apiDone <- srv.Serve(apiCtx, o.api, func() { close(ready) }) }()
		select {
		case <-ready:
		case err := <-apiDone:
			t.Close()
			return err
		}
		apiText = ", API on " + o.api
	}
	fmt.Fprintf(w, "phone up: %s inner %s, ESP %s mode from %s to %s (%s), keepalive %v%s\n",
		t.TUNName(), cfg.Inner, t.Mode(), t.LocalAddr(), cfg.Gateway, sas, keepaliveText(cfg.Keepalive), apiText)
	var tick <-chan time.Time
	if o.every > 0 {
		tk := time.NewTicker(o.every)
		defer tk.Stop()
		tick = tk.C
	}
	for {
		select {
		case <-tick:
			printUECounters(w, t.Counters())
		case err := <-apiDone:
			t.Close()
			printUECounters(w, t.Counters())
			return fmt.Errorf("phone api stopped: %w", err)
		case <-ctx.Done():
			stopAPI()
			var aerr error
			if o.api != "" {
				aerr = <-apiDone
			}
			err := errors.Join(aerr, t.Close())
			printUECounters(w, t.Counters())
			return err
		}
	}
}

func keepaliveText(d time.Duration) string {
	if d < 0 {
		return "off"
	}
	return d.String()
}

func printUECounters(w io.Writer, c ue.Counters) {
	fmt.Fprintf(w, "from TUN %d, ESP sent %d, ESP received %d, to TUN %d, keepalives sent %d received %d",
		c.FromTUN, c.Sent, c.Received, c.ToTUN, c.KeepalivesSent, c.KeepalivesReceived)
	for _, d := range c.DropList() {
		fmt.Fprintf(w, ", dropped %s %d", d.Reason, d.N)
	}
	fmt.Fprintln(w)
}
