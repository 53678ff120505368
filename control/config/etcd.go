package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sa"
)

// Etcd makes an etcd cluster one more SA source (`etcd:` in the file;
// absent means none). Each gateway loads the SAs under
// <prefix>/nodes/<node>/sas/ and keeps following them; with Sequence set
// (the default) the outbound sequence high-water marks live in etcd too,
// under <prefix>/seq/, so another gateway can take an SA over without
// reusing a sequence number.
type Etcd struct {
	Endpoints   []string `yaml:"endpoints"`
	Node        string   `yaml:"node"`
	Prefix      string   `yaml:"prefix,omitempty"`
	DialTimeout string   `yaml:"dial_timeout,omitempty"`
	// Sequence keeps the reservations in etcd instead of state_dir. It
	// defaults to true: SAs that can move between gateways need their
	// marks where every gateway sees them.
	Sequence *bool `yaml:"sequence,omitempty"`

	// LivenessTTL is the lease of <prefix>/alive/<node>, the key a fleet
	// controller watches: it vanishes this long after the gateway dies.
	LivenessTTL string `yaml:"liveness_ttl,omitempty"`

	// TLS is required for https endpoints' client certificate and CA;
	// Username with PasswordFile logs in with etcd's own auth.
	TLS          *EtcdTLS `yaml:"tls,omitempty"`
	Username     string   `yaml:"username,omitempty"`
	PasswordFile string   `yaml:"password_file,omitempty"`
	// Insecure allows http:// endpoints (a lab): SA keys and the etcd
	// password would cross the network in clear.
	Insecure bool `yaml:"insecure,omitempty"`
	// KEKFile is the key-encryption key file SA records in etcd are
	// sealed under (control/kek). Required unless Insecure.
	KEKFile string `yaml:"kek_file,omitempty"`

	// Password is read from PasswordFile; KEKPath is KEKFile resolved.
	Password sa.Secret `yaml:"-"`
	KEKPath  string    `yaml:"-"`
	KEK      *kek.Ring `yaml:"-"`
	// NoKEKNeeded lets a tool that never reads or writes SA values
	// (fleet list, move) go without kek_file.
	NoKEKNeeded bool `yaml:"-"`

	// Dial is DialTimeout parsed (default 5s); TTL is LivenessTTL
	// parsed (default 5s).
	Dial time.Duration `yaml:"-"`
	TTL  time.Duration `yaml:"-"`
}

// SequenceInEtcd reports whether the sequence marks live in etcd.
func (e *Etcd) SequenceInEtcd() bool { return e != nil && (e.Sequence == nil || *e.Sequence) }

// DefaultEtcdPrefix is the key prefix when etcd.prefix is omitted.
const DefaultEtcdPrefix = "/xesp"

var etcdNode = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func (c *Config) validateEtcd(errs *errList) {
	e := c.Etcd
	if e == nil {
		return
	}
	if len(e.Endpoints) == 0 {
		errs.add("etcd.endpoints", "at least one endpoint is required (e.g. https://127.0.0.1:2379)")
	}
	for i, ep := range e.Endpoints {
		if err := checkEndpoint(ep, e.Insecure); err != nil {
			errs.add(fmt.Sprintf("etcd.endpoints[%d]", i), "%v", err)
		}
	}
	c.validateEtcdSecurity(errs)
	if !etcdNode.MatchString(e.Node) {
		errs.add("etcd.node", "%q: want 1..63 letters, digits, '.', '_' or '-', starting with a letter or digit", e.Node)
	}
	if e.Prefix == "" {
		e.Prefix = DefaultEtcdPrefix
	}
	switch p := e.Prefix; {
	case !strings.HasPrefix(p, "/"):
		errs.add("etcd.prefix", "%q must start with /", p)
	case len(p) > 1 && strings.HasSuffix(p, "/"):
		errs.add("etcd.prefix", "%q must not end with /", p)
	case strings.Contains(p, "//") || strings.ContainsAny(p, " \t\n\r\x00"):
		errs.add("etcd.prefix", "%q: empty path element or whitespace", p)
	}
	e.TTL = 5 * time.Second
	if s := e.LivenessTTL; s != "" {
		d, err := time.ParseDuration(s)
		switch {
		case err != nil:
			errs.add("etcd.liveness_ttl", "%q: want a duration like 5s", s)
		case d < time.Second || d > 10*time.Minute || d%time.Second != 0:
			// etcd leases count whole seconds.
			errs.add("etcd.liveness_ttl", "%s: must be whole seconds in 1s..10m", d)
		default:
			e.TTL = d
		}
	}
	e.Dial = 5 * time.Second
	if s := e.DialTimeout; s != "" {
		d, err := time.ParseDuration(s)
		switch {
		case err != nil:
			errs.add("etcd.dial_timeout", "%q: want a duration like 5s", s)
		case d < 100*time.Millisecond || d > time.Minute:
			errs.add("etcd.dial_timeout", "%s: must be 100ms..1m", d)
		default:
			e.Dial = d
		}
	}
}

// checkEndpoint accepts https://host:port, and http://host:port or bare
// host:port only when insecure (a lab).
func checkEndpoint(ep string, insecure bool) error {
	hostport := ep
	scheme := "http"
	if strings.Contains(ep, "://") {
		u, err := url.Parse(ep)
		if err != nil {
			return fmt.Errorf("%q: %v", ep, err)
		}
		scheme = u.Scheme
		if scheme != "http" && scheme != "https" {
			return fmt.Errorf("%q: scheme %q: want https (or http with etcd.insecure)", ep, u.Scheme)
		}
		if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
			return fmt.Errorf("%q: want scheme://host:port and nothing else", ep)
		}
		hostport = u.Host
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil || host == "" {
		return fmt.Errorf("%q: want host:port", ep)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("%q: port must be a number 1..65535", ep)
	}
	if scheme == "http" && !insecure {
		return fmt.Errorf("%q: plain http carries SA keys and credentials in clear: use https://, or set etcd.insecure: true for a lab", ep)
	}
	return nil
}

// validateEtcdSecurity checks etcd.tls, the credentials and the KEK.
func (c *Config) validateEtcdSecurity(errs *errList) {
	e := c.Etcd
	if t := e.TLS; t != nil {
		if t.CA != "" {
			t.CAPath = c.resolve(t.CA)
			if _, err := LoadCertPool(t.CAPath); err != nil {
				errs.add("etcd.tls.ca", "%v", err)
			}
		}
		switch {
		case (t.Cert == "") != (t.Key == ""):
			errs.add("etcd.tls", "cert and key go together")
		case t.Cert != "":
			t.CertPath, t.KeyPath = c.resolve(t.Cert), c.resolve(t.Key)
			if err := CheckKeyPair(t.CertPath, t.KeyPath); err != nil {
				errs.add("etcd.tls", "%v", err)
			}
		}
	}
	switch {
	case (e.Username == "") != (e.PasswordFile == ""):
		errs.add("etcd.username", "username and password_file go together")
	case e.PasswordFile != "":
		p := c.resolve(e.PasswordFile)
		if err := privateFile(p); err != nil {
			errs.add("etcd.password_file", "%v", err)
			break
		}
		b, err := readSmallFile(p, maxTokenFile)
		if err != nil {
			errs.add("etcd.password_file", "%v", err)
			break
		}
		e.Password = sa.Secret(strings.TrimSpace(string(b)))
		if len(e.Password) == 0 {
			errs.add("etcd.password_file", "%s is empty", p)
		}
	}
	switch {
	case e.KEKFile != "":
		e.KEKPath = c.resolve(e.KEKFile)
		r, err := kek.Load(e.KEKPath)
		if err != nil {
			errs.add("etcd.kek_file", "%v", err)
		}
		e.KEK = r
	case !e.Insecure && !e.NoKEKNeeded:
		errs.add("etcd.kek_file", "required: SA keys are stored in etcd sealed under this key-encryption key (only etcd.insecure, for a lab, stores them in clear)")
	}
}

// CheckSA is the one set of gateway checks every source of SAs gets: the
// configuration file's own SAs, etcd and the control API. Each rule is
// its own function below, so further rules (selector overlap) join here
// without touching these.
func (c *Config) CheckSA(s *sa.SA) error {
	return c.checkSA(s.Label(), s)
}

func (c *Config) checkSA(label string, s *sa.SA) error {
	var errs []error
	for _, check := range []func(string, *sa.SA) *sa.FieldError{c.checkLocal, c.checkNATTPort} {
		if fe := check(label, s); fe != nil {
			errs = append(errs, fe)
		}
	}
	return errors.Join(errs...)
}

// checkLocal: the SA's local address is one of public.addresses. XDP
// would take the traffic of another address all the same, and the
// outbound packets would leave with a source the gateway does not own
// (or, for another family, one it has no address of at all).
func (c *Config) checkLocal(label string, s *sa.SA) *sa.FieldError {
	for _, a := range c.Public.Addrs {
		if a == s.Local {
			return nil
		}
	}
	reason := fmt.Sprintf("%s is not one of public.addresses", s.Local)
	if !c.hasFamily(s.Local) {
		reason = fmt.Sprintf("%s: the gateway has no %s public address (public.addresses %v)", s.Local, family(s.Local), c.Public.Addrs)
	}
	return &sa.FieldError{SA: label, Field: "local", Reason: reason}
}

func (c *Config) hasFamily(a netip.Addr) bool {
	for _, p := range c.Public.Addrs {
		if p.Is4() == a.Is4() {
			return true
		}
	}
	return false
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// checkTransport: a transport-mode SA carries the phone's segments from
// its core address to inner.local (docs/addressing.md, "Transport mode"),
// so it needs both (the SAD refuses it too; here the error names the
// config path).
func checkTransport(label string, s *sa.SA) *sa.FieldError {
	switch {
	case s.Mode != sa.Transport:
	case !s.InnerLocal.IsValid():
		return &sa.FieldError{SA: label, Field: "inner.local",
			Reason: "required in transport mode: the one core-side address (e.g. the P-CSCF) the phone's packets are delivered to"}
	case !s.Core.IsValid():
		return &sa.FieldError{SA: label, Field: "inner.core",
			Reason: "required in transport mode: the phone's core address; name one, or set core_pool to allocate it"}
	}
	return nil
}

// checkNATTPort: an encapsulated SA's local port is natt_port, the only
// port XDP takes ESP-in-UDP on.
func (c *Config) checkNATTPort(label string, s *sa.SA) *sa.FieldError {
	if s.Encap != nil && int(s.Encap.LocalPort) != c.NATTPort {
		return &sa.FieldError{SA: label, Field: "encap.local_port",
			Reason: fmt.Sprintf("%d differs from natt_port %d: XDP only takes ESP-in-UDP on natt_port", s.Encap.LocalPort, c.NATTPort)}
	}
	return nil
}

// CheckEtcd validates just the etcd section (for tools that take the same
// settings as flags).
func (c *Config) CheckEtcd() error {
	var errs errList
	c.validateEtcd(&errs)
	return errors.Join(errs...)
}
