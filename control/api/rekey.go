package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/xesp/xesp/control/rekey"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// RekeyRequest is the body of POST /v1/rekey: replace the Old SAs
// (references) by the New ones make-before-break (package rekey).
type RekeyRequest struct {
	Old []string          `json:"old"`
	New []json.RawMessage `json:"new"` // SAs in the SA format
	// Grace is how long the old inbound SAs keep accepting packets, a Go
	// duration ("5s" when empty, at most MaxGrace).
	Grace string `json:"grace,omitempty"`
}

// MaxGrace bounds RekeyRequest.Grace.
const MaxGrace = 10 * time.Minute

// RekeyResult is the answer to POST /v1/rekey.
type RekeyResult struct {
	New      []SAView `json:"new"`
	Retired  []string `json:"retired"`  // old outbound SAs, deleted at once (frames already steered to them are still sealed)
	Draining []string `json:"draining"` // old inbound SAs, deleted after the grace period
	Grace    string   `json:"grace"`
}

func (s *Server) rekey(w http.ResponseWriter, r *http.Request) {
	var req RekeyRequest
	if !decodeRequest(w, r, &req, ` (want {"old": [refs], "new": [SAs], "grace": "5s"})`) {
		return
	}
	if len(req.Old) == 0 || len(req.New) == 0 {
		writeError(w, http.StatusBadRequest, "body: old and new must each name at least one SA")
		return
	}
	grace := rekey.DefaultGrace
	if req.Grace != "" {
		var err error
		if grace, err = time.ParseDuration(req.Grace); err != nil || grace < 0 || grace > MaxGrace {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("grace: %q: want a duration from 0s to %s", req.Grace, MaxGrace))
			return
		}
		if grace == 0 {
			grace = -1 // rekey: negative means none
		}
	}
	var errs []error
	var rq rekey.Request
	var oldCores []sa.SA // the replaced SAs that carry a core address
	rq.Grace = grace
	status := http.StatusNotFound // while every problem is an unknown old SA
	replaced := -1                // an old SA another rekey already replaced
	for i, ref := range req.Old {
		e, st, err := s.resolve(ref)
		if err != nil {
			errs = append(errs, fmt.Errorf("old[%d]: %w", i, err))
			if st != http.StatusNotFound {
				status = http.StatusBadRequest
			}
			continue
		}
		if e.Replaced && replaced < 0 {
			replaced = i
		}
		rq.Old = append(rq.Old, e.ID)
		if e.SA.Core.IsValid() {
			oldCores = append(oldCores, e.SA)
		}
	}
	// A request that lost the race to another rekey of the same SAs is a
	// conflict, even when the winner has already deleted some of them.
	if replaced >= 0 && status == http.StatusNotFound {
		writeError(w, http.StatusConflict, fmt.Sprintf("old[%d]: %s: %v", replaced, req.Old[replaced], sad.ErrConflict))
		return
	}
	for i, raw := range req.New {
		sas, err := sa.ParseBytes(raw, sa.JSON, sa.Options{})
		if err != nil || len(sas) != 1 {
			status = http.StatusBadRequest
		}
		if err != nil {
			for _, e := range sa.Flatten(err) {
				errs = append(errs, fmt.Errorf("new[%d]: %w", i, e))
			}
			continue
		}
		if len(sas) != 1 {
			errs = append(errs, fmt.Errorf("new[%d]: holds %d SAs, want one", i, len(sas)))
			continue
		}
		if cerrs := s.checkSA(&sas[0]); len(cerrs) > 0 {
			status = http.StatusBadRequest
			for _, e := range cerrs {
				errs = append(errs, fmt.Errorf("new[%d]: %w", i, e))
			}
			continue
		}
		inheritCore(s, &sas[0], oldCores)
		rq.New = append(rq.New, sas[0])
	}
	if len(errs) > 0 {
		writeErrors(w, status, errs)
		return
	}
	wait := func(context.Context, uint64) error { return nil }
	if s.dp != nil {
		wait = s.dp.Synced
	}
	ctx, cancel := context.WithTimeout(r.Context(), syncTimeout)
	defer cancel()
	res, err := rekey.Do(ctx, s.sad, wait, rq)
	if err != nil && len(res.Added) == 0 {
		writeError(w, sadStatus(err), err.Error())
		return
	}
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	out := RekeyResult{Grace: max(grace, 0).String(), Retired: []string{}, Draining: []string{}}
	for i := range res.Added {
		out.New = append(out.New, s.view(&res.Added[i]))
	}
	for _, id := range res.Retired {
		out.Retired = append(out.Retired, RefOf(id))
	}
	for _, id := range res.Draining {
		out.Draining = append(out.Draining, RefOf(id))
	}
	s.log.Info("sas rekeyed", "new", len(out.New), "retired", out.Retired, "draining", out.Draining, "grace", out.Grace, "from", from(r))
	writeJSON(w, http.StatusOK, out)
}

// Rekey replaces the old SAs (references) by new ones make-before-break;
// the old inbound SAs keep accepting packets for grace (0: not at all).
func (c *Client) Rekey(ctx context.Context, old []string, specs []sa.Spec, grace time.Duration) (RekeyResult, error) {
	req := RekeyRequest{Old: old, Grace: grace.String()}
	for _, sp := range specs {
		b, err := json.Marshal(sp)
		if err != nil {
			return RekeyResult{}, fmt.Errorf("encode SA: %w", err)
		}
		req.New = append(req.New, b)
	}
	var out RekeyResult
	err := c.do(ctx, http.MethodPost, "/v1/rekey", req, &out, http.StatusOK)
	return out, err
}

// inheritCore gives a rekey's new SA that names no inner.core the core
// address of the SA it replaces for the same phone (same inner peer): the
// SIP core knows the phone by that address, and a rekey must not move it.
// The replaced SAs are exempt from the overlap rule, so the address fits.
func inheritCore(s *Server, x *sa.SA, old []sa.SA) {
	if !s.needsCore(x) {
		return
	}
	for i := range old {
		if old[i].InnerPeer == x.InnerPeer {
			x.Core = old[i].Core
			return
		}
	}
}
