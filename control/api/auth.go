package api

// Scoped bearer tokens on the TCP listener. The admin token may do
// everything; the read-only token only the safe methods (GET, HEAD):
// health, stats, SA listings and views (which never hold keys) and
// events. Both are compared as SHA-256 digests in constant time, both
// always, so neither the length of a token nor which one matched leaks
// through timing. Tokens are never logged: a change's log line names
// the scope and the peer, not the credential.

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"strings"
)

// Scope is what a credential may do.
type Scope int

const (
	ScopeNone  Scope = iota
	ScopeRead        // safe methods only
	ScopeAdmin       // everything
)

func (s Scope) String() string {
	switch s {
	case ScopeRead:
		return "read"
	case ScopeAdmin:
		return "admin"
	}
	return "none"
}

// scopeOf returns the scope of a presented token.
func (s *Server) scopeOf(tok string) Scope {
	sum := sha256.Sum256([]byte(tok))
	admin := subtle.ConstantTimeCompare(sum[:], s.tokenSum[:])
	read := subtle.ConstantTimeCompare(sum[:], s.readSum[:]) & s.hasRead
	switch {
	case admin == 1:
		return ScopeAdmin
	case read == 1:
		return ScopeRead
	}
	return ScopeNone
}

// readOnlyMethod says whether a request changes nothing.
func readOnlyMethod(m string) bool { return m == http.MethodGet || m == http.MethodHead }

// authenticated requires a bearer token of the right scope, then serves
// the API.
func (s *Server) authenticated(w http.ResponseWriter, r *http.Request) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if h == "" {
		drain(r.Body)
		w.Header().Set("WWW-Authenticate", `Bearer realm="xesp"`)
		writeError(w, http.StatusUnauthorized, "authorization: a bearer token is required on TCP")
		return
	}
	scope := ScopeNone
	if ok && strings.EqualFold(scheme, "Bearer") {
		scope = s.scopeOf(strings.TrimSpace(tok))
	}
	if scope == ScopeNone {
		drain(r.Body)
		w.Header().Set("WWW-Authenticate", `Bearer realm="xesp", error="invalid_token"`)
		writeError(w, http.StatusUnauthorized, "authorization: invalid bearer token")
		return
	}
	if scope == ScopeRead && !readOnlyMethod(r.Method) {
		drain(r.Body)
		w.Header().Set("WWW-Authenticate", `Bearer realm="xesp", error="insufficient_scope"`)
		writeError(w, http.StatusForbidden, fmt.Sprintf("authorization: the read-only token cannot %s %s: use the admin token", r.Method, r.URL.Path))
		return
	}
	s.mux.ServeHTTP(w, r)
}
