package api

// TLS of the TCP listener: the certificate and key (and the client CA
// of mTLS) come from files, are checked before anything is served, and
// are re-read on Reload (SIGHUP) and when a file changes, so renewing a
// certificate never needs a restart. A reload that fails keeps serving
// the material that works and says why.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/xesp/xesp/control/config"
)

// DefaultTLSPoll is how often the certificate files are checked for a
// change when Options.TLSPoll is 0.
const DefaultTLSPoll = 5 * time.Second

// tlsState is the listener's current TLS material.
type tlsState struct {
	files config.APITLS
	log   *slog.Logger
	cur   atomic.Pointer[tlsMaterial]
	mu    sync.Mutex // serialises reloads
	// Reloads counts successful loads after the first; Failed counts
	// attempts that kept the previous material.
	reloads, failed atomic.Uint64
}

type tlsMaterial struct {
	cfg   *tls.Config
	stamp string // the files' identities when loaded
}

func newTLSState(files config.APITLS, log *slog.Logger) (*tlsState, error) {
	if files.CertPath == "" {
		files.CertPath, files.KeyPath, files.ClientCAPath = files.Cert, files.Key, files.ClientCA
	}
	s := &tlsState{files: files, log: log}
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	s.cur.Store(m)
	return s, nil
}

// stamp identifies the files' current versions (inode, size, mtime).
func (s *tlsState) stamp() string {
	var out string
	for _, p := range []string{s.files.CertPath, s.files.KeyPath, s.files.ClientCAPath} {
		if p == "" {
			continue
		}
		st, err := os.Stat(p)
		if err != nil {
			out += p + ":missing;"
			continue
		}
		var ino uint64
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			ino = sys.Ino
		}
		out += fmt.Sprintf("%s:%d:%d:%d;", p, ino, st.Size(), st.ModTime().UnixNano())
	}
	return out
}

func (s *tlsState) load() (*tlsMaterial, error) {
	stamp := s.stamp()
	if err := config.CheckKeyPair(s.files.CertPath, s.files.KeyPath); err != nil {
		return nil, fmt.Errorf("api: tls: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(s.files.CertPath, s.files.KeyPath)
	if err != nil {
		return nil, fmt.Errorf("api: tls: %s, %s: %w", s.files.CertPath, s.files.KeyPath, err)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"http/1.1"},
	}
	if s.files.ClientCAPath != "" {
		pool, err := config.LoadCertPool(s.files.ClientCAPath)
		if err != nil {
			return nil, fmt.Errorf("api: tls: client_ca: %w", err)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return &tlsMaterial{cfg: cfg, stamp: stamp}, nil
}

// config is what the listener hands every handshake: the material
// current at the time of the ClientHello.
func (s *tlsState) config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return s.cur.Load().cfg, nil
		},
	}
}

// reload re-reads the files; force reloads even when they look unchanged
// (SIGHUP). On failure the previous material stays.
func (s *tlsState) reload(force bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !force && s.stamp() == s.cur.Load().stamp {
		return nil
	}
	m, err := s.load()
	if err != nil {
		s.failed.Add(1)
		s.log.Error("api: TLS reload failed; still serving the previous certificate", "err", err)
		return err
	}
	s.cur.Store(m)
	s.reloads.Add(1)
	s.log.Info("api: TLS certificate reloaded", "cert", s.files.CertPath, "client_ca", s.files.ClientCAPath)
	return nil
}

// watch reloads on a change of the files until ctx ends.
func (s *tlsState) watch(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.reload(false)
		}
	}
}

// ReloadTLS re-reads the TCP listener's certificate, key and client CA
// (the daemon calls it on SIGHUP). On an error the listener keeps the
// material it had.
func (s *Server) ReloadTLS() error {
	if s.tls == nil {
		return errors.New("api: no TLS listener")
	}
	return s.tls.reload(true)
}

// TLSReloads returns how many reloads succeeded and failed so far.
func (s *Server) TLSReloads() (ok, failed uint64) {
	if s.tls == nil {
		return 0, 0
	}
	return s.tls.reloads.Load(), s.tls.failed.Load()
}

// ClientTLS builds the client side: caFile verifies the server (empty:
// the system pool), certFile and keyFile are presented when the server
// asks for a client certificate.
func ClientTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := config.LoadCertPool(caFile)
		if err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("a client certificate needs both cert and key")
	}
	if certFile != "" {
		if err := config.PrivateFile(keyFile); err != nil {
			return nil, err
		}
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate %s, %s: %w", certFile, keyFile, err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg, nil
}

// checkTransport applies the rule of the TCP listener: TLS, or plain
// HTTP on a loopback address when the config says insecure; and it
// loads the TLS material so a bad certificate stops the start.
func (s *Server) checkTransport() error {
	a := s.api
	if a.MaxConns < 0 || a.MaxConnsPerSource < 0 {
		return errNoLimits
	}
	switch {
	case a.TLS != nil:
		st, err := newTLSState(*a.TLS, s.log)
		if err != nil {
			return err
		}
		s.tls = st
	case !a.Insecure:
		return fmt.Errorf("api: tcp %s: refusing plain HTTP: configure api.tls (or api.insecure on a loopback address)", a.TCP)
	case !config.LoopbackListen(a.TCP):
		return fmt.Errorf("api: tcp %s: refusing plain HTTP off loopback: configure api.tls", a.TCP)
	}
	if s.tlsPoll <= 0 {
		s.tlsPoll = DefaultTLSPoll
	}
	return nil
}

// wrapTCP puts the connection limits, then TLS, on the TCP listener: a
// source over its share is closed before any handshake work.
func (s *Server) wrapTCP(ln net.Listener) net.Listener {
	total, per := s.api.MaxConns, s.api.MaxConnsPerSource
	if total == 0 {
		total = config.DefaultMaxConns
	}
	if per == 0 {
		per = min(config.DefaultMaxConnsPerSource, total)
	}
	s.limit = newLimitListener(ln, total, per)
	if s.tls == nil {
		return s.limit
	}
	return tls.NewListener(s.limit, s.tls.config())
}
