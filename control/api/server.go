package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/xesp/xesp/control/config"
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
	policy   secagree.Policy
	nattPort uint16

	mu   sync.Mutex
	unix *unixSocket
	tcp  net.Listener
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
	s := &Server{sad: o.SAD, dp: o.DataPath, ev: o.Events, api: o.API, log: o.Log, started: time.Now(), policy: secagree.DefaultPolicy()}
	if o.SecAgree != nil {
		s.policy = *o.SecAgree
	}
	// The data path refuses transport-mode SAs (control/sad) until the
	// core-address model carries them, so sec-agree never chooses
	// mod=trans: a phone offering only it is refused with that reason
	// instead of registering SAs that cannot be installed.
	s.policy.Mods = slices.DeleteFunc(slices.Clone(s.policy.Mods), func(m secagree.Mode) bool { return m == secagree.ModeTrans })
	if o.NATTPort < 0 || o.NATTPort > 65535 {
		return nil, fmt.Errorf("api: natt port %d: want 0..65535", o.NATTPort)
	}
	s.nattPort = uint16(o.NATTPort)
	if len(o.API.BearerToken) > 0 {
		s.tokenSum = sha256.Sum256(o.API.BearerToken)
	}
	s.routes()
	return s, nil
}

// Handler serves the API without authentication, as on the Unix socket.
func (s *Server) Handler() http.Handler { return s.mux }

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
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       30 * time.Second,
			WriteTimeout:      2 * time.Minute, // a 10000-SA page to a slow reader
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    16 << 10,
			ErrorLog:          errLog,
		}
	}
	if ux != nil {
		all = append(all, served{mk(s.Handler()), ux.ln})
	}
	if tcp != nil {
		all = append(all, served{mk(s.AuthHandler()), tcp})
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

// authenticated requires the bearer token, then serves the API.
func (s *Server) authenticated(w http.ResponseWriter, r *http.Request) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if h == "" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="xesp"`)
		writeError(w, http.StatusUnauthorized, "authorization: a bearer token is required on TCP")
		return
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	if !ok || !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(sum[:], s.tokenSum[:]) != 1 {
		w.Header().Set("WWW-Authenticate", `Bearer realm="xesp", error="invalid_token"`)
		writeError(w, http.StatusUnauthorized, "authorization: invalid bearer token")
		return
	}
	s.mux.ServeHTTP(w, r)
}

// drain reads what is left of a body so the connection can be reused.
func drain(r io.Reader) { _, _ = io.Copy(io.Discard, io.LimitReader(r, MaxBody)) }
