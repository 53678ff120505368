package config

// The security settings: TLS and connection limits of the API's TCP
// listener, TLS and authentication towards etcd, the key-encryption key
// of the SAs kept in etcd, and the permission checks of the files that
// hold secrets. docs/security.md explains the design.

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"os"
)

// Connection caps of the API's TCP listener when the file sets none.
// 256 connections stay far below the descriptor limit the daemon runs
// with (Go raises the soft limit to the hard one, 1024 at the least), so
// the data path's sockets, the Unix socket and the snapshots keep
// headroom; 16 per source leave room for several operators' tools.
const (
	DefaultMaxConns          = 256
	DefaultMaxConnsPerSource = 16
	maxMaxConns              = 1 << 16
	maxPEMFile               = 1 << 20
)

// APITLS is the TLS of the API's TCP listener. Cert and Key are PEM files
// (relative to the config), re-read on SIGHUP and when they change;
// ClientCA, when set, makes the listener require a client certificate
// signed by one of its certificates (mTLS), on top of the bearer token.
type APITLS struct {
	Cert     string `yaml:"cert"`
	Key      string `yaml:"key"`
	ClientCA string `yaml:"client_ca,omitempty"`
	// The same, resolved against the config's directory.
	CertPath, KeyPath, ClientCAPath string `yaml:"-"`
}

// EtcdTLS is the TLS towards etcd: CA verifies the members' certificates
// (empty: the system pool), Cert and Key are this gateway's client
// certificate when etcd asks for one (--client-cert-auth).
type EtcdTLS struct {
	CA   string `yaml:"ca,omitempty"`
	Cert string `yaml:"cert,omitempty"`
	Key  string `yaml:"key,omitempty"`
	// The same, resolved against the config's directory.
	CAPath, CertPath, KeyPath string `yaml:"-"`
}

// validateAPITransport checks api.tls / api.insecure and the connection
// caps of a TCP listener.
func (c *Config) validateAPITransport(errs *errList) {
	a := &c.API
	if a.MaxConns < 1 || a.MaxConns > maxMaxConns {
		errs.add("api.max_conns", "must be 1..%d, got %d", maxMaxConns, a.MaxConns)
	}
	if a.MaxConnsPerSource < 1 || a.MaxConnsPerSource > a.MaxConns {
		errs.add("api.max_conns_per_source", "must be 1..api.max_conns (%d), got %d", a.MaxConns, a.MaxConnsPerSource)
	}
	switch {
	case a.TLS != nil && a.Insecure:
		errs.add("api.insecure", "set together with api.tls: choose one")
	case a.TLS == nil && !a.Insecure:
		errs.add("api.tcp", "needs api.tls (cert and key): the API carries SA keys; plain HTTP is accepted only with api.insecure: true on a loopback address")
	case a.Insecure:
		if !LoopbackListen(a.TCP) {
			errs.add("api.insecure", "%s is not a loopback address: plain HTTP is refused off the host (use api.tls)", a.TCP)
		}
	default:
		t := a.TLS
		t.CertPath, t.KeyPath = c.resolve(t.Cert), c.resolve(t.Key)
		if t.Cert == "" || t.Key == "" {
			errs.add("api.tls", "cert and key are both required")
			return
		}
		if err := CheckKeyPair(t.CertPath, t.KeyPath); err != nil {
			errs.add("api.tls", "%v", err)
		}
		if t.ClientCA != "" {
			t.ClientCAPath = c.resolve(t.ClientCA)
			if _, err := LoadCertPool(t.ClientCAPath); err != nil {
				errs.add("api.tls.client_ca", "%v", err)
			}
		}
	}
}

// LoopbackListen reports whether a host:port listens on loopback only:
// a loopback IP or "localhost" (an empty host means every address).
func LoopbackListen(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// CheckKeyPair loads a PEM certificate and key as the listener will,
// refusing a key file others can read.
func CheckKeyPair(certPath, keyPath string) error {
	if err := privateFile(keyPath); err != nil {
		return err
	}
	cb, err := readSmallFile(certPath, maxPEMFile)
	if err != nil {
		return fmt.Errorf("cert: %w", err)
	}
	kb, err := readSmallFile(keyPath, maxPEMFile)
	if err != nil {
		return fmt.Errorf("key: %w", err)
	}
	if _, err := tls.X509KeyPair(cb, kb); err != nil {
		// The error never quotes the key's bytes.
		return fmt.Errorf("%s, %s: %w", certPath, keyPath, err)
	}
	return nil
}

// LoadCertPool reads a PEM file of CA certificates.
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := readSmallFile(path, maxPEMFile)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", path)
	}
	return p, nil
}

// privateFile refuses a file that group or others may read or write: it
// holds a secret (a token, a private key, the KEK, a password).
func privateFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if m := st.Mode().Perm(); m&0o077 != 0 {
		return fmt.Errorf("%s: mode %04o lets group or others read a secret; chmod 600 it", path, m)
	}
	return nil
}

// PrivateFile is privateFile for the tools (the CLI's --kek, --key).
func PrivateFile(path string) error { return privateFile(path) }

// warnPermissions notes secret-holding files others can read that the
// daemon still accepts: SA key files and SA files (the examples ship
// 0644, and git cannot record 0600), and the config itself when it
// holds keys or a token inline.
func (c *Config) warnPermissions() {
	warn := func(what, path string) {
		st, err := os.Stat(path)
		if err != nil {
			return // a missing file is an error reported elsewhere
		}
		if m := st.Mode().Perm(); m&0o077 != 0 {
			c.Warnings = append(c.Warnings, fmt.Sprintf("%s %s: mode %04o lets group or others read key material; chmod 600 it", what, path, m))
		}
	}
	inline := c.API.Token != "" || c.API.ReadToken != ""
	for i := range c.SAs {
		sp := &c.SAs[i]
		inline = inline || sp.EncKey != "" || sp.AuthKey != ""
		for _, f := range []string{sp.EncKeyFile, sp.AuthKeyFile} {
			if f != "" {
				warn(fmt.Sprintf("sas[%d] key file", i), c.resolve(f))
			}
		}
	}
	for i, f := range c.SAFiles {
		if f != "" {
			warn(fmt.Sprintf("sa_files[%d]", i), c.resolve(f))
		}
	}
	if inline && c.Path != "" {
		warn("config (holds keys or a token inline)", c.Path)
	}
}
