package api

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/corepool"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/secagree"
)

// Limits of the server.
const (
	MaxBody      = 64 << 10 // request body bytes
	DefaultLimit = 100      // SAs per page when ?limit is omitted
	MaxLimit     = 10000    // SAs per page at most
	// shutdownGrace is how long Serve waits for requests in flight when
	// its context ends before it closes their connections.
	shutdownGrace = 5 * time.Second
)

// Options configures a Server.
type Options struct {
	SAD *sad.SAD
	// DataPath may be nil while no data path runs: views then carry no
	// counters and health is not ok.
	DataPath DataPath
	// API holds the listeners: Unix ("" disables it), TCP ("" disables
	// it) and BearerToken, which TCP requires.
	API config.API
	// Events serves SA lifetime events on GET /v1/events; nil answers 503.
	Events EventSource
	// Log receives one line per change and per failed listener; nil
	// discards.
	Log *slog.Logger
	// SecAgree is the P-CSCF's sec-agree preference for POST
	// /v1/secagree; nil means secagree.DefaultPolicy.
	SecAgree *secagree.Policy
	// NATTPort is the gateway's NAT-T port, the local end of UDP-enc-tun
	// SAs; 0 means 4500.
	NATTPort int
	// CorePool is config core_pool: core addresses for sec-agree
	// registrations and for tunnel SAs added without inner.core
	// (docs/addressing.md). Invalid: none are allocated.
	CorePool netip.Prefix
	// Check is the gateway's validation every source of SAs gets
	// (config.Config.CheckSA: local address, NAT-T port, ...). Every SA
	// the API adds, updates, rekeys in or derives for sec-agree passes
	// it first; nil accepts whatever sa.Parse accepts.
	Check func(*sa.SA) error
	// TLSPoll is how often the TLS files are checked for a change (0:
	// DefaultTLSPoll).
	TLSPoll time.Duration
	// Timeouts guard against slow clients; zero fields take
	// DefaultTimeouts' values.
	Timeouts Timeouts
}

// Timeouts of every connection (both listeners): reading a request's
// header (and, on TLS, the handshake), reading the whole request,
// writing the response, and an idle keep-alive connection.
type Timeouts struct {
	ReadHeader, Read, Write, Idle time.Duration
}

// DefaultTimeouts are the server's timeouts when Options leaves them 0.
var DefaultTimeouts = Timeouts{
	ReadHeader: 10 * time.Second,
	Read:       30 * time.Second,
	Write:      2 * time.Minute, // a 10000-SA page to a slow reader
	Idle:       2 * time.Minute,
}

// Server is the control API. Create it with New, then Listen (optional:
// Serve listens itself) and Serve.
type Server struct {
	sad     *sad.SAD
	dp      DataPath
	ev      EventSource
	api     config.API
	log     *slog.Logger
	started time.Time
	mux     *http.ServeMux
	// tokenSum is the SHA-256 of the bearer token: comparing fixed-size
	// digests in constant time hides the token's length as well.
	tokenSum [sha256.Size]byte
	// readSum is the read-only token's digest; hasRead is 1 when there
	// is one (so an all-zero digest never matches an empty slot).
	readSum  [sha256.Size]byte
	hasRead  int
	policy   secagree.Policy
	nattPort uint16
	// pool allocates core addresses; coreMu serialises an allocation
	// with the add that takes the address, so two requests never get the
	// same one.
	pool     *corepool.Pool
	coreMu   sync.Mutex
	check    func(*sa.SA) error
	tls      *tlsState // nil: plain TCP (loopback, insecure) or no TCP
	tlsPoll  time.Duration
	timeouts Timeouts

	mu    sync.Mutex
	unix  *unixSocket
	tcp   net.Listener
	limit *limitListener
}

// New checks the options and builds the server; it opens nothing.
func New(o Options) (*Server, error) {
	if o.SAD == nil {
		return nil, errors.New("api: no SAD")
	}
	if o.API.Unix == "" && o.API.TCP == "" {
		return nil, errors.New("api: no listener: set a unix socket path or a TCP address")
	}
	if o.API.TCP != "" && len(o.API.BearerToken) == 0 {
		return nil, fmt.Errorf("api: tcp %s: refusing to serve TCP without a bearer token (api.token or api.token_file)", o.API.TCP)
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{sad: o.SAD, dp: o.DataPath, ev: o.Events, api: o.API, log: o.Log, started: time.Now(), policy: secagree.DefaultPolicy(), tlsPoll: o.TLSPoll, timeouts: o.Timeouts, check: o.Check}
	for _, p := range []struct{ v, def *time.Duration }{{&s.timeouts.ReadHeader, &DefaultTimeouts.ReadHeader},
		{&s.timeouts.Read, &DefaultTimeouts.Read}, {&s.timeouts.Write, &DefaultTimeouts.Write}, {&s.timeouts.Idle, &DefaultTimeouts.Idle}} {
		if *p.v <= 0 {
			*p.v = *p.def
		}
	}
	if o.API.TCP != "" {
		if err := s.checkTransport(); err != nil {
			return nil, err
		}
	}
	if o.SecAgree != nil {
		s.policy = *o.SecAgree
	}
	// Transport-mode SAs need a core address per phone
	// (docs/addressing.md, "Transport mode"), which a registration gets
	// only from core_pool: without one, sec-agree never chooses mod=trans
	// and a phone offering only it is told why, instead of registering
	// SAs the SAD would refuse.
	if !o.CorePool.IsValid() {
		s.policy.Mods = slices.DeleteFunc(slices.Clone(s.policy.Mods), func(m secagree.Mode) bool { return m == secagree.ModeTrans })
		s.policy.TransRefused = "transport-mode SAs need a core address for each phone and this gateway has no core_pool (offer mod=UDP-enc-tun or mod=tun)"
	}
	if o.NATTPort < 0 || o.NATTPort > 65535 {
		return nil, fmt.Errorf("api: natt port %d: want 0..65535", o.NATTPort)
	}
	s.nattPort = uint16(o.NATTPort)
	if o.CorePool.IsValid() {
		p, err := corepool.New(o.CorePool)
		if err != nil {
			return nil, fmt.Errorf("api: %w", err)
		}
		s.pool = p.FromMiddle()
	}
	if len(o.API.BearerToken) > 0 {
		s.tokenSum = sha256.Sum256(o.API.BearerToken)
	}
	if len(o.API.ReadBearerToken) > 0 {
		s.readSum, s.hasRead = sha256.Sum256(o.API.ReadBearerToken), 1
	}
	s.routes()
	return s, nil
}

// Handler serves the API without authentication, as on the Unix socket.
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serveClean) }

// serveClean refuses a path with a ".", ".." or empty segment before the
// mux sees it: the mux would answer with a redirect to the cleaned path
// (HTML, and method-preserving, so DELETE /v1/secagree/../sas/X would
// delete /v1/sas/X once followed). A request names its resource exactly.
func (s *Server) serveClean(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if !strings.HasPrefix(p, "/") {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("path %q: must start with /", p))
		return
	}
	segs := strings.Split(p[1:], "/")
	for i, seg := range segs {
		if seg == "." || seg == ".." || (seg == "" && i < len(segs)-1) {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("path %q: no \".\", \"..\" or empty segments: name the resource directly", p))
			return
		}
	}
	s.mux.ServeHTTP(w, r)
}

// AuthHandler serves the API to bearer-token holders only, as on TCP.
func (s *Server) AuthHandler() http.Handler { return http.HandlerFunc(s.authenticated) }

// Listen opens the configured listeners. Serve calls it when it has not
// been called; calling it first reports a bad address before serving
// starts and makes TCPAddr known.
func (s *Server) Listen() (err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unix != nil || s.tcp != nil {
		return errors.New("api: already listening")
	}
	if s.api.Unix != "" {
		if s.unix, err = listenUnix(s.api.Unix); err != nil {
			return err
		}
	}
	if s.api.TCP != "" {
		if s.tcp, err = net.Listen("tcp", s.api.TCP); err != nil {
			if s.unix != nil {
				s.unix.close()
				s.unix = nil
			}
			return fmt.Errorf("api: listen tcp %s: %w", s.api.TCP, err)
		}
		s.tcp = s.wrapTCP(s.tcp)
	}
	return nil
}

// TCPAddr is the bound TCP address (useful with port 0), nil without TCP.
func (s *Server) TCPAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tcp == nil {
		return nil
	}
	return s.tcp.Addr()
}

// Serve serves until ctx ends, then stops accepting, lets requests in
// flight finish (for a few seconds at most), closes the listeners and
// removes the socket file. It returns nil after a shutdown asked for by
// ctx, or the error that stopped a listener.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	listening := s.unix != nil || s.tcp != nil
	s.mu.Unlock()
	if !listening {
		if err := s.Listen(); err != nil {
			return err
		}
	}
	s.mu.Lock()
	ux, tcp := s.unix, s.tcp
	s.mu.Unlock()

	type served struct {
		srv *http.Server
		ln  net.Listener
	}
	var all []served
	errLog := slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
	mk := func(h http.Handler) *http.Server {
		return &http.Server{
			Handler:           h,
			ReadHeaderTimeout: s.timeouts.ReadHeader,
			ReadTimeout:       s.timeouts.Read,
			WriteTimeout:      s.timeouts.Write,
			IdleTimeout:       s.timeouts.Idle,
			MaxHeaderBytes:    16 << 10,
			ErrorLog:          errLog,
		}
	}
	if ux != nil {
		all = append(all, served{mk(s.Handler()), jsonErrors{ux.ln}})
	}
	if tcp != nil {
		// net/http's own protocol errors are rewritten to JSON on the
		// connection; on TLS that would hide the *tls.Conn net/http needs
		// (handshake state, client certificates), so there they stay
		// net/http's plain text.
		if s.tls == nil {
			tcp = jsonErrors{tcp}
		}
		all = append(all, served{mk(s.AuthHandler()), tcp})
		if s.tls != nil {
			wctx, cancel := context.WithCancel(ctx)
			defer cancel()
			go s.tls.watch(wctx, s.tlsPoll)
		}
	}

	errc := make(chan error, len(all))
	for _, x := range all {
		go func() {
			err := x.srv.Serve(x.ln)
			if errors.Is(err, http.ErrServerClosed) {
				err = nil
			} else if err != nil {
				err = fmt.Errorf("api: serve %s: %w", x.ln.Addr(), err)
			}
			errc <- err
		}()
	}

	var first error
	select {
	case <-ctx.Done():
	case first = <-errc:
		s.log.Error("api listener failed", "err", first)
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	for _, x := range all {
		if err := x.srv.Shutdown(shutCtx); err != nil {
			// Requests still running after the grace period are cut.
			x.srv.Close()
		}
	}
	// Collect every goroutine so none outlives Serve.
	n := len(all)
	if first != nil {
		n--
	}
	for range n {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	s.mu.Lock()
	if s.unix != nil {
		s.unix.close()
		s.unix = nil
	}
	if s.tcp != nil {
		s.tcp.Close()
		s.tcp = nil
	}
	s.mu.Unlock()
	return first
}

// drain reads what is left of a body so the connection can be reused.
func drain(r io.Reader) { _, _ = io.Copy(io.Discard, io.LimitReader(r, MaxBody)) }
