package etcdsrc

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/xesp/xesp/control/config"
)

// DialOptions adjust Dial for tests and tools.
type DialOptions struct {
	// Dialer replaces the TCP dialer (a test dials from inside a
	// network namespace).
	Dialer func(ctx context.Context, addr string) (net.Conn, error)
	// KeepAlive notices a dead member within seconds (the gateway's
	// setting); zero leaves gRPC's default.
	KeepAlive time.Duration
}

// Dial connects to the etcd an etcd section names, with its TLS (CA,
// client certificate) and its username and password. The client
// connects lazily: an unreachable cluster is an error of the first call,
// not of Dial. http endpoints reach Dial only when the section says
// insecure (config validation refuses them otherwise).
func Dial(e *config.Etcd, o DialOptions) (*clientv3.Client, error) {
	cfg := clientv3.Config{Endpoints: e.Endpoints, DialTimeout: e.Dial, Logger: zap.NewNop(),
		DialKeepAliveTime: o.KeepAlive, DialKeepAliveTimeout: o.KeepAlive}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	https := false
	for _, ep := range e.Endpoints {
		https = https || strings.HasPrefix(ep, "https://")
	}
	if https || e.TLS != nil {
		t := &tls.Config{MinVersion: tls.VersionTLS12}
		if e.TLS != nil {
			if e.TLS.CAPath != "" {
				pool, err := config.LoadCertPool(e.TLS.CAPath)
				if err != nil {
					return nil, fmt.Errorf("etcd: tls.ca: %w", err)
				}
				t.RootCAs = pool
			}
			if e.TLS.CertPath != "" {
				if err := config.CheckKeyPair(e.TLS.CertPath, e.TLS.KeyPath); err != nil {
					return nil, fmt.Errorf("etcd: tls: %w", err)
				}
				c, err := tls.LoadX509KeyPair(e.TLS.CertPath, e.TLS.KeyPath)
				if err != nil {
					return nil, fmt.Errorf("etcd: tls: %w", err)
				}
				t.Certificates = []tls.Certificate{c}
			}
		}
		cfg.TLS = t
	}
	if e.Username != "" {
		cfg.Username, cfg.Password = e.Username, string(e.Password)
	}
	if o.Dialer != nil {
		cfg.DialOptions = append(cfg.DialOptions, grpc.WithContextDialer(o.Dialer))
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	return cli, nil
}
