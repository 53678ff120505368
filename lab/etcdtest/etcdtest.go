// Package etcdtest runs a real single-member etcd (the etcd binary from
// Debian's etcd-server) for tests: listening only on 127.0.0.1, its data
// in a test temp directory, killed when the test ends. Stop and Start
// keep the data directory and ports, so a test can take etcd away and
// bring it back as an outage would.
//
// StartTLS and StartInTLS serve clients over TLS and require a client
// certificate (--client-cert-auth), with a CA and certificates the test
// generates (lab/testpki): the way a deployment runs it.
package etcdtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/testpki"
)

// Server is one etcd process.
type Server struct {
	t          testing.TB
	dir        string
	clientURL  string // the first of clientURLs
	clientURLs []string
	peerURL    string
	ns         *netns.NS // nil: the host, on 127.0.0.1
	mu         sync.Mutex
	cmd        *exec.Cmd
	done       chan struct{}
	logFile    string
	startCount int

	// With TLS: the CA that signed the server's and the client's
	// certificates, and those certificates.
	CA         *testpki.CA
	ServerCert testpki.Pair
	ClientCert testpki.Pair
	clientTLS  *tls.Config
}

// Binary is where the etcd binary is looked up.
const Binary = "etcd"

// Start runs etcd for t (see requireBinary when the binary is missing).
func Start(t testing.TB) *Server {
	t.Helper()
	requireBinary(t)
	s := &Server{t: t, dir: t.TempDir()}
	s.clientURL = "http://" + freePort(t)
	s.clientURLs = []string{s.clientURL}
	s.peerURL = "http://" + freePort(t)
	s.init()
	return s
}

// StartTLS runs etcd for t serving https on 127.0.0.1 and requiring a
// client certificate signed by s.CA.
func StartTLS(t testing.TB) *Server {
	t.Helper()
	requireBinary(t)
	s := &Server{t: t, dir: t.TempDir()}
	s.clientURL = "https://" + freePort(t)
	s.clientURLs = []string{s.clientURL}
	s.peerURL = "http://" + freePort(t)
	s.makeCerts("127.0.0.1")
	s.init()
	return s
}

// StartInTLS is StartIn with StartTLS's https and client certificates.
func StartInTLS(t testing.TB, ns *netns.NS, hosts ...string) *Server {
	t.Helper()
	requireBinary(t)
	s := &Server{t: t, dir: t.TempDir(), ns: ns, peerURL: "http://127.0.0.1:2380"}
	for _, h := range hosts {
		s.clientURLs = append(s.clientURLs, "https://"+net.JoinHostPort(h, "2379"))
	}
	s.clientURL = s.clientURLs[0]
	s.makeCerts(hosts...)
	s.init()
	return s
}

func (s *Server) makeCerts(hosts ...string) {
	pki := filepath.Join(s.dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		s.t.Fatal(err)
	}
	s.CA = testpki.New(s.t, pki, "etcd")
	s.ServerCert = s.CA.Both(s.t, "etcd-server", hosts...)
	s.ClientCert = s.CA.Client(s.t, "xesp-gateway")
	cert, err := tls.X509KeyPair(s.ClientCert.CertPEM, s.ClientCert.KeyPEM)
	if err != nil {
		s.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(s.CA.Cert)
	s.clientTLS = &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}

// TLS reports whether s serves https with client certificates.
func (s *Server) TLS() bool { return s.CA != nil }

// ConfigTLS is the etcd.tls section of a gateway config for s
// ("" without TLS).
func (s *Server) ConfigTLS() string {
	if !s.TLS() {
		return ""
	}
	return fmt.Sprintf("{ca: %s, cert: %s, key: %s}", s.CA.Path, s.ClientCert.CertPath, s.ClientCert.KeyPath)
}

// ClientTLS is a client TLS config with the client certificate (nil
// without TLS).
func (s *Server) ClientTLS() *tls.Config {
	if s.clientTLS == nil {
		return nil
	}
	return s.clientTLS.Clone()
}

// StartIn runs etcd inside ns (a namespace the test made), serving
// clients on port 2379 of each of hosts (addresses ns holds) and its peer
// port on the namespace's loopback.
func StartIn(t testing.TB, ns *netns.NS, hosts ...string) *Server {
	t.Helper()
	requireBinary(t)
	s := &Server{t: t, dir: t.TempDir(), ns: ns, peerURL: "http://127.0.0.1:2380"}
	for _, h := range hosts {
		s.clientURLs = append(s.clientURLs, "http://"+net.JoinHostPort(h, "2379"))
	}
	s.clientURL = s.clientURLs[0]
	s.init()
	return s
}

// ClientURLs are the URLs clients may use.
func (s *Server) ClientURLs() []string { return s.clientURLs }

func (s *Server) init() {
	t := s.t
	s.logFile = filepath.Join(s.dir, "etcd.log")
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			if b, err := os.ReadFile(s.logFile); err == nil {
				lines := strings.Split(string(b), "\n")
				t.Logf("etcd log (last lines):\n%s", strings.Join(lines[max(0, len(lines)-30):], "\n"))
			}
		}
	})
	s.Start()
}

// dial connects from the host, or from inside the server's namespace.
func (s *Server) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	if s.ns == nil {
		return d.DialContext(ctx, network, addr)
	}
	var c net.Conn
	err := s.ns.Do(func() (err error) {
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// requireBinary stops a test when etcd is missing: under -short it
// skips, otherwise it fails, so a run without etcd cannot pass by testing
// nothing (as netns.RequireRoot does for root).
func requireBinary(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath(Binary); err != nil {
		if testing.Short() {
			t.Skipf("etcd not installed (apt-get install etcd-server; make deps): %v", err)
		}
		t.Fatalf("etcd not installed (apt-get install etcd-server; make deps): %v", err)
	}
}

// Endpoint is the client URL.
func (s *Server) Endpoint() string { return s.clientURL }

// freePort returns a 127.0.0.1 port for etcd to listen on for the whole
// test, Stop and Start included. A port the kernel hands out for port 0
// would be in its ephemeral range, where any outgoing connection (the
// etcd client's own reconnects among them: a TCP self-connect) or another
// test process may take it while etcd is stopped or before it binds. So
// the port comes from below that range, and a lock file held by this
// process until the test ends keeps other test processes from choosing
// it too.
func freePort(t testing.TB) string {
	t.Helper()
	lo, hi := portRange(t)
	dir := filepath.Join(os.TempDir(), "xesp-etcdtest-ports")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	n := hi - lo
	first := rand.IntN(n)
	for i := range n {
		port := lo + (first+i)%n
		lock, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(port)), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
			lock.Close() // another test process holds it
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			lock.Close()
			continue
		}
		l.Close()
		t.Cleanup(func() { lock.Close() })
		return addr
	}
	t.Fatalf("no free port in [%d, %d)", lo, hi)
	return ""
}

// portRange is where freePort picks from: below the kernel's ephemeral
// port range (net.ipv4.ip_local_port_range), above the well-known ports.
func portRange(t testing.TB) (lo, hi int) {
	lo, hi = 20000, 32768
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	var elo, ehi int
	if _, err := fmt.Sscan(string(b), &elo, &ehi); err != nil {
		return lo, hi
	}
	if elo-lo >= 1000 {
		return lo, elo
	}
	if ehi < 64535 {
		return ehi + 1, 65536
	}
	t.Fatalf("ip_local_port_range %d-%d leaves no room for a fixed test port", elo, ehi)
	return 0, 0
}

// Start (re)starts the process and waits until it serves.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return
	}
	log, err := os.OpenFile(s.logFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer log.Close()
	args := []string{
		"--name", "t", "--data-dir", filepath.Join(s.dir, "data"),
		"--listen-client-urls", strings.Join(s.clientURLs, ","), "--advertise-client-urls", strings.Join(s.clientURLs, ","),
		"--listen-peer-urls", s.peerURL, "--initial-advertise-peer-urls", s.peerURL,
		"--initial-cluster", "t=" + s.peerURL, "--initial-cluster-state", "new",
		"--listen-metrics-urls", "", "--enable-pprof=false",
	}
	if s.TLS() {
		args = append(args, "--cert-file", s.ServerCert.CertPath, "--key-file", s.ServerCert.KeyPath,
			"--trusted-ca-file", s.CA.Path, "--client-cert-auth")
	}
	var cmd *exec.Cmd
	if s.ns != nil {
		cmd = s.ns.Command(Binary, args...)
	} else {
		cmd = exec.Command(Binary, args...)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start etcd: %v", err)
	}
	s.cmd, s.done = cmd, make(chan struct{})
	done := s.done
	go func() { cmd.Wait(); close(done) }()
	s.startCount++
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{DialContext: s.dial, TLSClientConfig: s.ClientTLS()}}
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", s.clientURL+"/health", nil)
		resp, err := hc.Do(req)
		if err == nil {
			ok := resp.StatusCode == 200
			resp.Body.Close()
			if ok {
				return
			}
		}
		select {
		case <-done:
			s.t.Fatalf("etcd exited during start (log %s)", s.logFile)
		case <-ctx.Done():
			s.t.Fatalf("etcd not healthy after 20s: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop kills the process (SIGKILL: an outage, not a shutdown) and waits
// for it to go.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

func (s *Server) String() string { return fmt.Sprintf("etcd %s (data %s)", s.clientURL, s.dir) }

// Client returns a client of s, closed when the test ends.
func (s *Server) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: []string{s.clientURL}, DialTimeout: 2 * time.Second, Logger: zap.NewNop(), TLS: s.ClientTLS(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return s.dial(ctx, "tcp", addr)
		})},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}
