// Package config owns the daemon's configuration file (`xesp run --config
// xesp.yaml`): its schema, its defaults (in Defaults, and nowhere else),
// its validation, and the redacted effective view an operator can print.
//
// It reads the files the config names (SA files, key files, the API token
// file) so that a bad reference is reported with the rest, but it opens no
// sockets, touches no interface and loads nothing into the kernel: the
// daemon acts on a Config, this package only vouches for it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/xesp/xesp/internal/safefile"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/xesp/xesp/control/corepool"
	"github.com/xesp/xesp/control/sa"
)

// Config is the daemon configuration. The yaml-tagged fields are the file
// as written (after defaults); the `yaml:"-"` fields are what validation
// derived from them, ready for the daemon to use.
type Config struct {
	Public  Public  `yaml:"public"`
	Private Private `yaml:"private"`
	// Workers is the number of ESP workers (goroutines locked to threads,
	// one AF_XDP socket each per queue).
	Workers  int    `yaml:"workers"`
	NATTPort int    `yaml:"natt_port"`
	XDPMode  string `yaml:"xdp_mode"` // native | generic
	PinDir   string `yaml:"pin_dir"`  // bpffs directory for pinned maps and links
	// MaxSAs is the capacity of the inbound SA map and of the outbound
	// policy map, each.
	MaxSAs   int       `yaml:"max_sas"`
	UMEM     UMEM      `yaml:"umem"`
	StateDir string    `yaml:"state_dir"` // sequence-number high-water marks
	API      API       `yaml:"api"`
	Metrics  Metrics   `yaml:"metrics"`
	SlowPath SlowPath  `yaml:"slow_path"`
	SAs      []sa.Spec `yaml:"sas,omitempty"`
	// SAFiles are SA files (sa.ParseFile shapes), relative to the config.
	SAFiles []string `yaml:"sa_files,omitempty"`
	// Etcd, when set, adds the SAs assigned to this node in etcd.
	Etcd *Etcd `yaml:"etcd,omitempty"`
	// CorePool is the prefix core addresses are allocated from
	// (docs/addressing.md) for tunnel-mode SAs whose inner.peer is one
	// address and for transport-mode SAs, that name no inner.core, and
	// for sec-agree registrations. Empty: no allocation (tunnel SAs
	// without a core address are steered by inner prefix, as before;
	// transport SAs must name one).
	CorePool   string       `yaml:"core_pool,omitempty"`
	CorePrefix netip.Prefix `yaml:"-"`
	// Tunnel is how the gateway behaves as a router between the tunnels
	// and the core: outer TTL, DSCP, ICMP errors.
	Tunnel Tunnel `yaml:"tunnel"`
	// Idle is dead-phone detection.
	Idle Idle `yaml:"idle"`

	// Path is the file the config came from ("" when parsed from bytes
	// without a name); relative references resolve against its directory.
	Path string `yaml:"-"`
	// SAList holds every SA, validated: the inline ones in order, then
	// each SA file's in order.
	SAList []sa.SA `yaml:"-"`
	// Warnings are problems that do not stop the daemon (key files
	// others can read); it logs each at start.
	Warnings []string `yaml:"-"`
}

// Tunnel configures the router behaviour of the tunnels
// (docs/operations.md "DSCP/ECN/TTL", "ICMP and MTU").
type Tunnel struct {
	// OuterTTL is the TTL/hop limit of outer headers (1..255).
	OuterTTL int `yaml:"outer_ttl"`
	// DSCP is "copy" (the inner DSCP goes to the outer header, RFC 4301
	// 5.1.2.1) or a fixed DSCP 0..63 for SAs without their own dscp.
	DSCP string `yaml:"dscp"`
	// ICMPRate is the most ICMP errors (Time Exceeded, Fragmentation
	// Needed / Packet Too Big) each worker sends per second; 0 sends none.
	ICMPRate int `yaml:"icmp_rate"`
	// FixedDSCP and HasDSCP are DSCP parsed.
	FixedDSCP uint8 `yaml:"-"`
	HasDSCP   bool  `yaml:"-"`
}

// Idle configures dead-phone detection (docs/operations.md "Idle phones").
type Idle struct {
	// Timeout is how long an inbound SA may go without an authenticated
	// packet before an sa_idle event is raised ("0s": off); an SA's
	// idle_timeout overrides it.
	Timeout string `yaml:"timeout"`
	// Remove deletes the idle SA and its partners (the SA pair or
	// registration sharing its binding) when the event is raised.
	Remove bool `yaml:"remove,omitempty"`
	// Every is Timeout parsed.
	Every time.Duration `yaml:"-"`
	// CipherRelease is how long an SA carries no packet before its worker
	// drops the SA's cipher state (~0.77 KB for AES-GCM), rebuilt from the
	// key on its next packet ("": 30s). A million mostly quiet phones then
	// cost the gateway only their keys and counters.
	CipherRelease string `yaml:"cipher_release,omitempty"`
	// CipherAfter is CipherRelease parsed (0: the worker's default).
	CipherAfter time.Duration `yaml:"-"`
}

// VLAN puts a side on one VLAN of its interface (docs/operations.md
// "VLANs"): XDP takes only frames with that tag there and the workers
// tag what they send, so both directions match.
type VLAN struct {
	// ID is the VLAN ID, 1..4094; 0: untagged.
	ID int `yaml:"vlan,omitempty"`
	// Proto is 802.1q (default) or 802.1ad.
	Proto string `yaml:"vlan_proto,omitempty"`
	// Interface is the kernel's VLAN device on it (e.g. eth0.100), which
	// holds the side's addresses: neighbours are resolved there.
	Interface string `yaml:"vlan_interface,omitempty"`
	// TPID is Proto as the tag's EtherType.
	TPID uint16 `yaml:"-"`
}

// Public is the untrusted side facing the phones.
type Public struct {
	Interface string `yaml:"interface"`
	// MTU overrides the interface's MTU (0: the interface's): the
	// size sealed packets must fit.
	MTU       int          `yaml:"mtu,omitempty"`
	VLAN      VLAN         `yaml:",inline"`
	Addresses []string     `yaml:"addresses"` // outer addresses of this gateway; every SA's local is one
	Addrs     []netip.Addr `yaml:"-"`
	// Flood is the budget of packets that fail authentication (see
	// docs/operations.md "Flood budgets").
	Flood Flood `yaml:"flood"`
}

// Flood sets the public side's budgets of failed authentications. Once
// an SA's (or a foreign source's) budget is spent, XDP drops the SA's
// packets from every source but its current NAT binding until it refills.
type Flood struct {
	// Disabled turns the budgets off: every forged packet then costs a
	// verification on its SA's worker.
	Disabled bool `yaml:"disabled"`
	// SA is per SA, over all sources; Source per foreign address:port,
	// over all SAs.
	SA     Budget `yaml:"sa"`
	Source Budget `yaml:"source"`
}

// Budget is a token bucket: Rate failures a second sustained, Burst at
// once.
type Budget struct {
	Rate  float64 `yaml:"rate"`
	Burst int     `yaml:"burst"`
}

// Private is the side facing the SIP core. It may name the same interface
// as Public (one-arm mode).
type Private struct {
	Interface string `yaml:"interface"`
	// MTU overrides the interface's MTU (0: the interface's): the
	// largest decrypted packet forwarded to the core.
	MTU  int  `yaml:"mtu,omitempty"`
	VLAN VLAN `yaml:",inline"`
	// NextHopMAC overrides the neighbour-table lookup for frames sent on
	// the private side.
	NextHopMAC string           `yaml:"next_hop_mac,omitempty"`
	NextHop    net.HardwareAddr `yaml:"-"`
}

// UMEM sizes the shared AF_XDP packet buffer and the socket rings.
type UMEM struct {
	Frames         int `yaml:"frames"`
	FrameSize      int `yaml:"frame_size"`
	FillRing       int `yaml:"fill_ring"`
	CompletionRing int `yaml:"completion_ring"`
	RXRing         int `yaml:"rx_ring"`
	TXRing         int `yaml:"tx_ring"`
}

// API is the control API's listeners. An empty Unix disables the socket;
// TCP is off unless set, and then needs TLS (or, on a loopback address
// only, Insecure) and a bearer token (see security.go).
type API struct {
	Unix      string `yaml:"unix"`
	TCP       string `yaml:"tcp,omitempty"`
	Token     string `yaml:"token,omitempty"`
	TokenFile string `yaml:"token_file,omitempty"` // relative to the config
	// ReadToken / ReadTokenFile give a read-only credential: health,
	// stats, SA listings (never keys) and events, no changes.
	ReadToken     string `yaml:"read_token,omitempty"`
	ReadTokenFile string `yaml:"read_token_file,omitempty"`
	// TLS serves TCP over TLS 1.2+; required unless Insecure.
	TLS *APITLS `yaml:"tls,omitempty"`
	// Insecure serves plain HTTP on TCP; accepted only for a loopback
	// address (tests, a local sidecar).
	Insecure bool `yaml:"insecure,omitempty"`
	// MaxConns and MaxConnsPerSource cap the TCP listener's concurrent
	// connections (before any authentication), so a flood cannot take
	// the file descriptors the data path, the Unix socket and the state
	// snapshots need.
	MaxConns          int `yaml:"max_conns,omitempty"`
	MaxConnsPerSource int `yaml:"max_conns_per_source,omitempty"`
	// BearerToken is the admin token from Token or TokenFile;
	// ReadBearerToken the read-only one.
	BearerToken     sa.Secret `yaml:"-"`
	ReadBearerToken sa.Secret `yaml:"-"`
}

// Metrics is the Prometheus listener; an empty Listen disables it.
type Metrics struct {
	Listen string `yaml:"listen"`
}

// SlowPath configures what XDP passes up on the NAT-T port.
type SlowPath struct {
	// IKEForward is where IKE packets (non-ESP marker) are relayed, e.g.
	// a local charon on 127.0.0.1:4501. Empty: counted and dropped.
	IKEForward     string         `yaml:"ike_forward,omitempty"`
	IKEForwardAddr netip.AddrPort `yaml:"-"`
}

// Limits checked by validation.
const (
	// MaxConfigSize bounds the config file itself; large SA sets belong in
	// sa_files.
	MaxConfigSize = 64 << 20
	MaxWorkers    = 64
	// MaxMaxSAs bounds max_sas: beyond it the BPF maps alone need
	// gigabytes, which is more likely a typo than a plan.
	MaxMaxSAs    = 1 << 24
	maxUMEMBytes = 1 << 30
	minTokenLen  = 16
	maxTokenFile = 4096
)

// Defaults returns the configuration an empty file gives. The UMEM and
// ring sizes hold over 10 ms of traffic: the Go loop on small VMs stalls
// for 3-8 ms now and then and a smaller fill ring then drops packets.
func Defaults() Config {
	return Config{
		Workers:  min(runtime.NumCPU(), MaxWorkers),
		NATTPort: sa.DefaultNATTPort,
		XDPMode:  "native",
		PinDir:   "/sys/fs/bpf/xesp",
		MaxSAs:   1 << 20,
		UMEM: UMEM{
			Frames: 16384, FrameSize: 4096,
			FillRing: 8192, CompletionRing: 8192, RXRing: 8192, TXRing: 8192,
		},
		StateDir: "/var/lib/xesp",
		// A phone authenticates every packet it sends: a sustained failure
		// rate is an attack or a broken peer. 1000 failures a second cost a
		// worker about 0.3 ms of verification a second.
		Public:  Public{Flood: Flood{SA: Budget{Rate: 1000, Burst: 1000}, Source: Budget{Rate: 1000, Burst: 1000}}},
		API:     API{Unix: "/run/xesp/api.sock", MaxConns: DefaultMaxConns, MaxConnsPerSource: DefaultMaxConnsPerSource},
		Metrics: Metrics{Listen: "127.0.0.1:9109"},
		Tunnel:  Tunnel{OuterTTL: 64, DSCP: "copy", ICMPRate: 100},
		Idle:    Idle{Timeout: "0s"},
	}
}

// Load reads and validates the config file at path. Every problem found
// is returned at once, each as `config <path>: <field path>: <reason>`.
func Load(path string) (*Config, error) {
	data, err := safefile.Read(path, MaxConfigSize)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(data, path)
}

// Parse validates config text; path names it in errors and anchors
// relative references (SA files, key files, token file).
func Parse(data []byte, path string) (*Config, error) {
	c := Defaults()
	c.Path = path
	prefix := "config"
	if path != "" {
		prefix = "config " + path
	}
	errs, fatal := decode(data, &c)
	if fatal != nil {
		return nil, fmt.Errorf("%s: %w", prefix, fatal)
	}
	errs = append(errs, c.validate()...)
	if len(errs) > 0 {
		out := make([]error, len(errs))
		for i, e := range errs {
			out[i] = fmt.Errorf("%s: %w", prefix, e)
		}
		return nil, errors.Join(out...)
	}
	return &c, nil
}

var yamlUnknownField = regexp.MustCompile(`field (\S+) not found in type \S+`)

// decode fills c over its defaults: what the file omits keeps its default,
// what it sets explicitly (even to zero) is validated as written.
func decode(data []byte, c *Config) (errs []error, fatal error) {
	defer func() {
		if r := recover(); r != nil {
			errs, fatal = nil, fmt.Errorf("yaml decoder failed on this input: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	err := dec.Decode(c)
	var te *yaml.TypeError
	switch {
	case errors.Is(err, io.EOF):
		// An empty file is all defaults; validation says what is missing.
	case errors.As(err, &te):
		for _, m := range te.Errors {
			errs = append(errs, errors.New(yamlUnknownField.ReplaceAllString(m, `unknown field "$1"`)))
		}
	case err != nil:
		return nil, err
	}
	if err == nil {
		var extra yaml.Node
		if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
			return nil, errors.New("more than one YAML document")
		}
	}
	return errs, nil
}

func (c *Config) dir() string {
	if c.Path == "" {
		return "."
	}
	return filepath.Dir(c.Path)
}

func (c *Config) resolve(p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.dir(), p)
}

type errList []error

func (l *errList) add(field, format string, args ...any) {
	*l = append(*l, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
}

func (c *Config) validate() []error {
	var errs errList
	c.validateSides(&errs)
	if c.Workers < 1 || c.Workers > MaxWorkers {
		errs.add("workers", "must be 1..%d, got %d", MaxWorkers, c.Workers)
	}
	if c.NATTPort < 1 || c.NATTPort > 65535 {
		errs.add("natt_port", "must be 1..65535, got %d", c.NATTPort)
	}
	switch c.XDPMode {
	case "native", "generic":
	default:
		errs.add("xdp_mode", "%q: must be native or generic", c.XDPMode)
	}
	absPath(&errs, "pin_dir", c.PinDir, false)
	absPath(&errs, "state_dir", c.StateDir, false)
	if c.MaxSAs < 1 || c.MaxSAs > MaxMaxSAs {
		errs.add("max_sas", "must be 1..%d, got %d", MaxMaxSAs, c.MaxSAs)
	}
	c.validateUMEM(&errs)
	c.validateAPI(&errs)
	if c.Metrics.Listen != "" {
		if err := checkListen(c.Metrics.Listen); err != nil {
			errs.add("metrics.listen", "%v", err)
		}
	}
	if s := c.SlowPath.IKEForward; s != "" {
		ap, err := netip.ParseAddrPort(s)
		switch {
		case err != nil:
			errs.add("slow_path.ike_forward", "%q: want ip:port (e.g. 127.0.0.1:4501 or [::1]:4501)", s)
		case ap.Port() == 0:
			errs.add("slow_path.ike_forward", "%s: port 0", s)
		default:
			c.SlowPath.IKEForwardAddr = ap
		}
	}
	if c.CorePool != "" {
		p, err := netip.ParsePrefix(c.CorePool)
		switch {
		case err != nil:
			errs.add("core_pool", "%q is not a prefix (e.g. 100.64.0.0/10)", c.CorePool)
		case p.Masked() != p:
			errs.add("core_pool", "%s has host bits set; did you mean %s?", p, p.Masked())
		case p.Addr().Is4In6():
			errs.add("core_pool", "%s: write IPv4 prefixes as a.b.c.d/n", p)
		default:
			c.CorePrefix = p
		}
	}
	c.validateSAs(&errs)
	c.validateEtcd(&errs)
	c.validateFlood(&errs)
	c.validateTunnel(&errs)
	c.warnPermissions()
	return errs
}

func (c *Config) validateFlood(errs *errList) {
	for _, b := range []struct {
		field string
		b     Budget
	}{{"public.flood.sa", c.Public.Flood.SA}, {"public.flood.source", c.Public.Flood.Source}} {
		if b.b.Rate <= 0 || b.b.Rate > 1e9 {
			errs.add(b.field+".rate", "%v: want failed authentications per second, above 0 and at most 1e9", b.b.Rate)
		}
		if b.b.Burst < 1 || b.b.Burst > 1<<24 {
			errs.add(b.field+".burst", "%d: want 1..%d", b.b.Burst, 1<<24)
		}
	}
}
func (c *Config) validateTunnel(errs *errList) {
	for _, m := range []struct {
		field string
		v     int
	}{{"public.mtu", c.Public.MTU}, {"private.mtu", c.Private.MTU}} {
		if m.v != 0 && (m.v < 576 || m.v > 65535) {
			errs.add(m.field, "%d: want 576..65535, or 0 for the interface's MTU", m.v)
		}
	}
	for _, v := range []struct {
		side string
		v    *VLAN
	}{{"public", &c.Public.VLAN}, {"private", &c.Private.VLAN}} {
		if v.v.ID < 0 || v.v.ID > 4094 {
			errs.add(v.side+".vlan", "%d: want 1..4094, or 0 for untagged", v.v.ID)
		}
		switch strings.ToLower(v.v.Proto) {
		case "", "802.1q":
			v.v.TPID = 0x8100
		case "802.1ad":
			v.v.TPID = 0x88a8
		default:
			errs.add(v.side+".vlan_proto", "%q: want 802.1q or 802.1ad", v.v.Proto)
		}
		if v.v.ID == 0 && (v.v.Proto != "" || v.v.Interface != "") {
			errs.add(v.side+".vlan", "required with vlan_proto or vlan_interface")
		}
		if v.v.Interface != "" {
			ifname(errs, v.side+".vlan_interface", v.v.Interface)
		}
	}
	t := &c.Tunnel
	if t.OuterTTL < 1 || t.OuterTTL > 255 {
		errs.add("tunnel.outer_ttl", "%d: want 1..255", t.OuterTTL)
	}
	switch d := strings.ToLower(t.DSCP); d {
	case "copy", "":
		t.HasDSCP = false
	default:
		n, err := strconv.Atoi(d)
		if err != nil || n < 0 || n > 63 {
			errs.add("tunnel.dscp", "%q: want copy or a DSCP 0..63 (e.g. 26 for AF31, 46 for EF)", t.DSCP)
		} else {
			t.FixedDSCP, t.HasDSCP = uint8(n), true
		}
	}
	if t.ICMPRate < 0 || t.ICMPRate > 1_000_000 {
		errs.add("tunnel.icmp_rate", "%d: want 0..1000000 per second per worker", t.ICMPRate)
	}
	d, err := time.ParseDuration(c.Idle.Timeout)
	switch {
	case c.Idle.Timeout == "":
		c.Idle.Every = 0
	case err != nil || d < 0:
		errs.add("idle.timeout", "%q: want a duration such as 90s or 5m (0s: off)", c.Idle.Timeout)
	case d != 0 && d < time.Second:
		errs.add("idle.timeout", "%s: below 1s, keepalives (20 s by RFC 3948) could never keep a phone alive", d)
	default:
		c.Idle.Every = d
	}
	if c.Idle.CipherRelease != "" {
		d, err := time.ParseDuration(c.Idle.CipherRelease)
		switch {
		case err != nil:
			errs.add("idle.cipher_release", "%q: want a duration such as 30s or 5m", c.Idle.CipherRelease)
		case d < time.Second || d > 24*time.Hour:
			errs.add("idle.cipher_release", "%s: want 1s..24h (a release more often than a keepalive would rebuild ciphers all the time)", d)
		default:
			c.Idle.CipherAfter = d
		}
	}
}

// ifname mirrors the kernel's dev_valid_name: at most 15 bytes, no '/',
// ':' or whitespace, not "." or "..".
func ifname(errs *errList, field, name string) {
	switch {
	case name == "":
		errs.add(field, "required")
	case len(name) > 15:
		errs.add(field, "%q is longer than 15 bytes", name)
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n\r\x00"):
		errs.add(field, "%q is not a valid interface name", name)
	}
}

func (c *Config) validateSides(errs *errList) {
	ifname(errs, "public.interface", c.Public.Interface)
	ifname(errs, "private.interface", c.Private.Interface)
	if len(c.Public.Addresses) == 0 {
		errs.add("public.addresses", "at least one address is required (the outer addresses SAs use as local)")
	}
	c.Public.Addrs = nil
	seen := map[netip.Addr]bool{}
	for i, s := range c.Public.Addresses {
		field := fmt.Sprintf("public.addresses[%d]", i)
		a, err := netip.ParseAddr(s)
		switch {
		case err != nil:
			errs.add(field, "%q is not an IP address", s)
		case a.Zone() != "" || a.Is4In6() || a.IsUnspecified() || a.IsMulticast():
			errs.add(field, "%s: want a unicast address without zone", s)
		case seen[a]:
			errs.add(field, "%s is listed twice", a)
		default:
			seen[a] = true
			c.Public.Addrs = append(c.Public.Addrs, a)
		}
	}
	if s := c.Private.NextHopMAC; s != "" {
		mac, err := net.ParseMAC(s)
		switch {
		case err != nil || len(mac) != 6:
			errs.add("private.next_hop_mac", "%q: want an Ethernet address like 02:00:5e:10:00:01", s)
		case mac[0]&1 != 0:
			errs.add("private.next_hop_mac", "%s is a multicast or broadcast address", mac)
		case bytes.Equal(mac, make([]byte, 6)):
			errs.add("private.next_hop_mac", "%s is the zero address", mac)
		default:
			c.Private.NextHop = mac
		}
	}
}

func absPath(errs *errList, field, p string, emptyOK bool) {
	switch {
	case p == "" && emptyOK:
	case p == "":
		errs.add(field, "required")
	case !filepath.IsAbs(p):
		errs.add(field, "%q must be an absolute path", p)
	}
}

func pow2(n int) bool { return n > 0 && n&(n-1) == 0 }

func (c *Config) validateUMEM(errs *errList) {
	u := c.UMEM
	if u.Frames < 64 || u.Frames > 1<<22 {
		errs.add("umem.frames", "must be 64..%d, got %d", 1<<22, u.Frames)
	}
	if u.FrameSize != 2048 && u.FrameSize != 4096 {
		errs.add("umem.frame_size", "must be 2048 or 4096, got %d", u.FrameSize)
	} else if u.Frames*u.FrameSize > maxUMEMBytes {
		errs.add("umem.frames", "%d frames of %d bytes exceed %d MiB", u.Frames, u.FrameSize, maxUMEMBytes>>20)
	}
	for _, r := range []struct {
		field string
		n     int
	}{{"umem.fill_ring", u.FillRing}, {"umem.completion_ring", u.CompletionRing}, {"umem.rx_ring", u.RXRing}, {"umem.tx_ring", u.TXRing}} {
		switch {
		case !pow2(r.n) || r.n < 64 || r.n > 1<<18:
			// The kernel refuses ring sizes that are not powers of two.
			errs.add(r.field, "must be a power of two in 64..%d, got %d", 1<<18, r.n)
		case r.n > u.Frames && u.Frames >= 64:
			errs.add(r.field, "%d entries exceed umem.frames %d", r.n, u.Frames)
		}
	}
}

// checkListen accepts host:port with a numeric port; the host may be a
// name ("localhost") or empty (all addresses).
func checkListen(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q: want host:port", s)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: port must be a number 0..65535", s)
	}
	if strings.ContainsAny(host, " /\t\n") {
		return fmt.Errorf("%q: invalid host", s)
	}
	return nil
}

func (c *Config) validateAPI(errs *errList) {
	a := &c.API
	absPath(errs, "api.unix", a.Unix, true)
	if a.TCP == "" {
		if a.Token != "" || a.TokenFile != "" || a.ReadToken != "" || a.ReadTokenFile != "" {
			errs.add("api.token", "set but api.tcp is not: the unix socket is guarded by its file mode, not a token")
		}
		if a.TLS != nil {
			errs.add("api.tls", "set but api.tcp is not: the unix socket needs no TLS")
		}
		return
	}
	if err := checkListen(a.TCP); err != nil {
		errs.add("api.tcp", "%v", err)
	}
	c.validateAPITransport(errs)
	if a.Token == "" && a.TokenFile == "" {
		errs.add("api.tcp", "needs api.token or api.token_file: the TCP listener only serves bearer-token requests")
	} else {
		a.BearerToken = c.token(errs, "api.token", a.Token, "api.token_file", a.TokenFile)
	}
	if a.ReadToken != "" || a.ReadTokenFile != "" {
		a.ReadBearerToken = c.token(errs, "api.read_token", a.ReadToken, "api.read_token_file", a.ReadTokenFile)
		if len(a.ReadBearerToken) > 0 && bytes.Equal(a.ReadBearerToken, a.BearerToken) {
			errs.add("api.read_token", "equals the admin token: give the read-only credential its own value")
		}
	}
}

// token reads one bearer token, inline or from a file (which must not be
// readable by group or others).
func (c *Config) token(errs *errList, field, inline, fileField, file string) sa.Secret {
	switch {
	case inline != "" && file != "":
		errs.add(field, "give %s or %s, not both", field, fileField)
	case inline != "":
		if len(inline) < minTokenLen {
			errs.add(field, "too short: at least %d characters", minTokenLen)
			return nil
		}
		return sa.Secret(inline)
	default:
		path := c.resolve(file)
		if err := privateFile(path); err != nil {
			errs.add(fileField, "%v", err)
			return nil
		}
		tok, err := readSmallFile(path, maxTokenFile)
		if err != nil {
			errs.add(fileField, "%v", err)
			return nil
		}
		tok = bytes.TrimSpace(tok)
		if len(tok) < minTokenLen {
			errs.add(fileField, "%s: token too short: at least %d characters", path, minTokenLen)
			return nil
		}
		return sa.Secret(tok)
	}
	return nil
}

func readSmallFile(path string, limit int64) ([]byte, error) {
	return safefile.Read(path, limit)
}

// validateSAs parses inline SAs and SA files, then checks them together:
// names and identities unique across all sources, locals among the public
// addresses, encapsulated SAs on the NAT-T port, counts within max_sas.
//
// It is built for a million phones in one SA file: the file is parsed on
// every CPU (sa.ParseFile), its SAs are not copied again when it is the
// only source, and an SA's label is made only when a message names it.
func (c *Config) validateSAs(errs *errList) {
	c.SAList = nil
	// src says where the SAs of SAList come from: SAList[src[k].from:]
	// up to the next source's from are source k's.
	type source struct {
		from  int
		field string // "" for inline SAs
		path  string
	}
	var srcs []source
	var inline []int // c.SAs index of each inline SA in SAList
	for i := range c.SAs {
		sp := &c.SAs[i]
		pos := fmt.Sprintf("sas[%d]", i)
		s, err := sp.Parse(sa.Options{KeyFileDir: c.dir(), Label: pos})
		if err != nil {
			*errs = append(*errs, sa.Flatten(err)...)
			continue
		}
		c.SAList = append(c.SAList, s)
		inline = append(inline, i)
	}
	if len(c.SAList) > 0 {
		srcs = append(srcs, source{})
	}
	for i, p := range c.SAFiles {
		field := fmt.Sprintf("sa_files[%d]", i)
		if p == "" {
			errs.add(field, "empty path")
			continue
		}
		list, err := sa.ParseFile(c.resolve(p), sa.Options{})
		for _, e := range sa.Flatten(err) {
			*errs = append(*errs, fmt.Errorf("%s: %w", field, e))
		}
		if len(list) == 0 {
			continue
		}
		srcs = append(srcs, source{from: len(c.SAList), field: field, path: c.resolve(p)})
		if c.SAList == nil {
			c.SAList = list // the only source so far: no copy of a million SAs
		} else {
			c.SAList = append(c.SAList, list...)
		}
	}
	label := func(i int) string {
		k := sort.Search(len(srcs), func(k int) bool { return srcs[k].from > i }) - 1
		if srcs[k].field == "" {
			pos := fmt.Sprintf("sas[%d]", inline[i])
			if n := c.SAList[i].Name; n != "" {
				return fmt.Sprintf("%s %q", pos, n)
			}
			return pos
		}
		return fmt.Sprintf("%s: %s: %s", srcs[k].field, srcs[k].path, c.SAList[i].Label())
	}

	// One source has been checked for duplicates by its parser already.
	var d sa.Dedup
	dedup := len(srcs) > 1
	var in, out int
	for i := range c.SAList {
		s := &c.SAList[i]
		if dedup {
			if err := d.Add(s, label(i)); err != nil {
				*errs = append(*errs, sa.Flatten(err)...)
			}
		}
		// With no public address that is its own error already.
		if len(c.Public.Addrs) > 0 && !c.isPublic(s.Local) {
			*errs = append(*errs, c.checkLocal(label(i), s))
		}
		if s.Encap != nil && int(s.Encap.LocalPort) != c.NATTPort {
			*errs = append(*errs, c.checkNATTPort(label(i), s))
		}
		if s.Direction == sa.In {
			in++
		} else {
			out++
		}
	}
	if in > c.MaxSAs || out > c.MaxSAs {
		errs.add("max_sas", "%d inbound and %d outbound SAs do not fit in %d map entries each", in, out, c.MaxSAs)
	}
	if c.CorePrefix.IsValid() {
		if err := c.allocateCores(inline); err != nil {
			errs.add("core_pool", "%v", err)
		}
	}
	for i := range c.SAList {
		if s := &c.SAList[i]; s.Mode == sa.Transport {
			if fe := checkTransport(label(i), s); fe != nil {
				*errs = append(*errs, fe)
			}
		}
	}
	*errs = append(*errs, sa.CheckOverlapsFunc(c.SAList, label)...)
}

// isPublic says whether a is one of public.addresses.
func (c *Config) isPublic(a netip.Addr) bool {
	for _, p := range c.Public.Addrs {
		if p == a {
			return true
		}
	}
	return false
}

// allocateCores gives every tunnel-mode SA with a one-address inner.peer,
// and every transport-mode SA, that names no inner.core a core address
// from core_pool, one per pair group
// (pair label, else peer, encap port and inner peer: the SAD's pairing
// rule), in file order from the bottom of the pool. The inline SAs'
// specs get it too, so --print-config shows it; name it in the file to
// keep it fixed when SAs are added before it.
func (c *Config) allocateCores(inline []int) error {
	pool, err := corepool.New(c.CorePrefix)
	if err != nil {
		return err
	}
	taken := make(map[netip.Addr]bool)
	for i := range c.SAList {
		if a := c.SAList[i].Core; a.IsValid() {
			taken[a] = true
		}
	}
	type groupKey struct {
		label string
		peer  netip.AddrPort
		inner netip.Prefix
	}
	groups := make(map[groupKey]netip.Addr)
	for i := range c.SAList {
		s := &c.SAList[i]
		if s.Core.IsValid() || s.Mode == sa.Tunnel && !s.InnerPeer.IsSingleIP() {
			continue
		}
		fam := s.InnerPeer.Addr()
		if s.Mode == sa.Transport {
			// No inner.peer: the phone is its outer address, and the
			// core address replaces it in the outer header's family.
			fam = s.Local
		}
		k := groupKey{label: s.Pair}
		if s.Pair == "" {
			var port uint16
			if s.Encap != nil {
				port = s.Encap.PeerPort
			}
			k = groupKey{peer: netip.AddrPortFrom(s.Peer, port), inner: s.InnerPeer}
		}
		a, ok := groups[k]
		if !ok {
			if a, err = pool.Next(func(a netip.Addr) bool { return taken[a] }); err != nil {
				return err
			}
			if a.Is4() != fam.Is4() {
				if s.Mode == sa.Transport {
					return fmt.Errorf("%s: %s: transport mode over %s needs a core address of that family; the pool is not", c.CorePool, s.Label(), s.Local)
				}
				return fmt.Errorf("%s: %s: inner.peer %s is not of the pool's address family", c.CorePool, s.Label(), s.InnerPeer)
			}
			taken[a] = true
			groups[k] = a
		}
		s.Core = a
		if i < len(inline) {
			sp := &c.SAs[inline[i]]
			var in sa.InnerSpec
			if sp.Inner != nil {
				in = *sp.Inner
			}
			in.Core = a.String()
			sp.Inner = &in
		}
	}
	return nil
}

// Effective renders the configuration in force, defaults included, as
// YAML, with key material and the API token replaced by "[redacted]".
// SAs from sa_files are counted, not listed.
func (c *Config) Effective() ([]byte, error) {
	r := *c
	r.SAs = make([]sa.Spec, len(c.SAs))
	for i, sp := range c.SAs {
		if sp.EncKey != "" {
			sp.EncKey = "[redacted]"
		}
		if sp.AuthKey != "" {
			sp.AuthKey = "[redacted]"
		}
		r.SAs[i] = sp
	}
	if r.API.Token != "" {
		r.API.Token = "[redacted]"
	}
	if r.API.ReadToken != "" {
		r.API.ReadToken = "[redacted]"
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# effective configuration")
	if c.Path != "" {
		fmt.Fprintf(&buf, " from %s", c.Path)
	}
	fmt.Fprintf(&buf, "; %d SAs (%d inline, %d from sa_files)\n", len(c.SAList), len(c.SAs), len(c.SAList)-len(c.SAs))
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&r); err != nil {
		return nil, fmt.Errorf("render effective config: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("render effective config: %w", err)
	}
	return buf.Bytes(), nil
}
