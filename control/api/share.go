package api

import (
	"net"
	"net/http"

	"github.com/xesp/xesp/control/sa"
)

// The exports below let another process's control API (the emulated
// phone's, lab/ueapi) take requests and answer errors exactly as
// the gateway's does, so one client and one set of rules serve both.

// DecodeSA reads one SA in the SA format from a request's JSON body, with
// the gateway API's rules: application/json, at most MaxBody bytes,
// exactly one SA, no key files. On failure it returns the status to
// answer with and the problems, each naming the SA and field.
func DecodeSA(w http.ResponseWriter, r *http.Request) (sa.SA, int, []error) {
	return (&Server{}).decodeSA(w, r) // no gateway checks: the phone has none
}

// WriteJSON answers with v as JSON.
func WriteJSON(w http.ResponseWriter, status int, v any) { writeJSON(w, status, v) }

// WriteError answers with the API's error body.
func WriteError(w http.ResponseWriter, status int, msg string) { writeError(w, status, msg) }

// WriteErrors answers with the API's error body listing every problem.
func WriteErrors(w http.ResponseWriter, status int, errs []error) { writeErrors(w, status, errs) }

// MethodNotAllowed answers other methods on a path with a JSON 405.
func MethodNotAllowed(allow string) http.HandlerFunc { return methods(allow) }

// ListenUnix binds a Unix socket at path as the gateway's API does: mode
// 0600 from the start, a stale socket replaced, a live one refused.
// Closing the returned function removes the file if it is still ours.
func ListenUnix(path string) (net.Listener, func(), error) {
	u, err := listenUnix(path)
	if err != nil {
		return nil, nil, err
	}
	return u.ln, u.close, nil
}
