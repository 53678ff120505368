package api

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/xesp/xesp/control/lifetime"
)

// EventSource is what the API reads of SA lifetime events
// (lifetime.Enforcer).
type EventSource interface {
	Events(since uint64, max int) ([]lifetime.Event, uint64)
	Wait(ctx context.Context, since uint64) error
}

// Limits of GET /v1/events.
const (
	MaxEvents    = 1000             // events per response
	MaxEventWait = 30 * time.Second // longest ?wait
)

// Event is one SA lifetime event: a soft limit reached (the SA is
// soft-expired: rekey it) or a hard one (the SA was removed).
type Event struct {
	Num   uint64    `json:"num"`
	Time  time.Time `json:"time"`
	SA    string    `json:"sa"` // reference of the SA, as in SAView.Ref
	Name  string    `json:"name,omitempty"`
	Kind  string    `json:"kind"`  // soft, hard
	Limit string    `json:"limit"` // time, bytes, packets, seq
	// Value is the SA's figure when checked, Threshold the limit reached
	// (seconds, bytes, packets, sequence number).
	Value     uint64 `json:"value"`
	Threshold uint64 `json:"threshold"`
}

// Events is the body of GET /v1/events.
type Events struct {
	Items []Event `json:"items"`
	// Next is the ?since of the following request.
	Next uint64 `json:"next"`
}

// events serves GET /v1/events?since=N&wait=D: the events numbered above
// N (0: all kept), waiting up to D (a Go duration, at most MaxEventWait)
// for one when there is none yet.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	if s.ev == nil {
		writeError(w, http.StatusServiceUnavailable, "no lifetime events: no data path is running")
		return
	}
	q := r.URL.Query()
	var since uint64
	if v := q.Get("since"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("since: %q: want the next value of the previous response", v))
			return
		}
		since = n
	}
	if v := q.Get("wait"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > MaxEventWait {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("wait: %q: want a duration from 0s to %s", v, MaxEventWait))
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), d)
		s.ev.Wait(ctx, since) // a timeout simply answers with no events
		cancel()
	}
	evs, next := s.ev.Events(since, MaxEvents)
	out := Events{Items: make([]Event, len(evs)), Next: next}
	for i, e := range evs {
		out.Items[i] = Event{Num: e.Num, Time: e.Time.UTC(), SA: RefOf(e.ID), Name: e.Name, Kind: e.Kind.String(),
			Limit: e.What.String(), Value: e.Value, Threshold: e.Threshold}
	}
	writeJSON(w, http.StatusOK, out)
}

// Events returns the lifetime events numbered above since, waiting up to
// wait for one.
func (c *Client) Events(ctx context.Context, since uint64, wait time.Duration) (Events, error) {
	var out Events
	q := url.Values{"since": {strconv.FormatUint(since, 10)}, "wait": {wait.String()}}
	err := c.do(ctx, http.MethodGet, "/v1/events?"+q.Encode(), nil, &out, http.StatusOK)
	return out, err
}
