package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/netip"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// Limits of POST /v1/sas/batch. A batch is applied under one SAD lock
// and waited for as one, so it is bounded like a page: 10,000 SAs are
// ~3 MB of JSON and a fraction of a second of installing at the rates of
// docs/benchmarking.md, well inside syncTimeout. Provisioning a million
// phones is a hundred such requests (`xesp sa import`).
const (
	MaxBatch     = 10000
	MaxBatchBody = 8 << 20
)

// BatchResult is the answer to POST /v1/sas/batch: every SA of the
// request was added, in request order.
type BatchResult struct {
	Added int      `json:"added"`
	Refs  []string `json:"refs"`
}

// addBatch serves POST /v1/sas/batch: a JSON list of SAs in the SA format,
// added all or none. Every problem found before anything changes is
// reported at once, each naming the item by its index in the list
// ("[3]: sa 0x00001001: enc_key: ...", "[7]: line 9: replay_window: a
// JSON string where ..."); then the SAD adds them in one atomic step
// (sad.Replace with nothing to replace), so a conflict that appears
// between the checks and the add still leaves nothing installed.
func (s *Server) addBatch(w http.ResponseWriter, r *http.Request) {
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		drain(r.Body)
		writeError(w, http.StatusUnsupportedMediaType, fmt.Sprintf("content type: %q: send application/json", ct))
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBatchBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body: larger than %d bytes: send at most %d SAs per batch", MaxBatchBody, MaxBatch))
			return
		}
		writeError(w, http.StatusBadRequest, "body: "+err.Error())
		return
	}
	sas, idx, itemErrs, err := sa.ParseList(body, sa.JSON, sa.Options{})
	if err != nil {
		writeError(w, http.StatusBadRequest, "body: "+err.Error()+" (want a JSON list of SAs: [{...}, {...}])")
		return
	}
	n := len(sas) + countItems(itemErrs)
	switch {
	case n == 0:
		writeError(w, http.StatusBadRequest, "body: an empty list: send at least one SA")
		return
	case n > MaxBatch:
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body: %d SAs: send at most %d per batch", n, MaxBatch))
		return
	}
	errs := make([]error, 0, len(itemErrs))
	for _, e := range itemErrs {
		errs = append(errs, e)
	}
	for i := range sas {
		for _, e := range s.checkSA(&sas[i]) {
			errs = append(errs, &sa.ItemError{Index: idx[i], Err: e})
		}
	}
	if len(errs) > 0 {
		writeErrors(w, http.StatusBadRequest, errs)
		return
	}
	// The batch among itself: two outbound SAs of one request that could
	// claim one packet (the SAD checks them against what it holds).
	label := func(i int) string { return fmt.Sprintf("[%d]: %s", idx[i], sas[i].Label()) }
	if errs := sa.CheckOverlapsFunc(sas, label); len(errs) > 0 {
		writeErrors(w, http.StatusConflict, errs)
		return
	}
	// An allocation and the add that takes the addresses are one step;
	// the wait for the data path below is not part of it, so batches
	// sent side by side overlap there.
	if s.pool != nil {
		s.coreMu.Lock()
		if err := s.batchCores(sas, idx); err != nil {
			s.coreMu.Unlock()
			writeError(w, sadStatus(err), err.Error())
			return
		}
	}
	unlock := func() {
		if s.pool != nil {
			s.coreMu.Unlock()
		}
	}
	// Against the SAD, naming the item; the add below re-checks all of
	// it atomically.
	var status int
	for i := range sas {
		if err := s.conflicts(&sas[i]); err != nil {
			errs = append(errs, &sa.ItemError{Index: idx[i], Err: err})
			if status == 0 || sadStatus(err) != http.StatusConflict {
				status = sadStatus(err)
			}
		}
	}
	if len(errs) > 0 {
		unlock()
		writeErrors(w, status, errs)
		return
	}
	recs, err := s.sad.Replace(nil, sas)
	unlock()
	if err != nil {
		writeError(w, sadStatus(err), "nothing added: "+err.Error())
		return
	}
	if !s.synced(w, r) {
		return
	}
	out := BatchResult{Added: len(recs), Refs: make([]string, len(recs))}
	for i := range recs {
		out.Refs[i] = RefOf(recs[i].ID)
	}
	s.log.Info("sas added in a batch", "sas", len(recs), "first", out.Refs[0], "from", from(r))
	writeJSON(w, http.StatusCreated, out)
}

// countItems counts the distinct items errs are about.
func countItems(errs []*sa.ItemError) int {
	seen := make(map[int]bool, len(errs))
	for _, e := range errs {
		seen[e.Index] = true
	}
	return len(seen)
}

// conflicts says why the SAD would refuse x now: its identity or name
// taken, or its selectors overlapping an SA it holds.
func (s *Server) conflicts(x *sa.SA) error {
	if _, ok := s.sad.Get(x.ID()); ok {
		return fmt.Errorf("%s: %s: %w", x.Label(), x.ID(), sad.ErrExists)
	}
	if x.Name != "" {
		if _, ok := s.sad.GetName(x.Name); ok {
			return fmt.Errorf("%s: name %q: %w", x.Label(), x.Name, sad.ErrExists)
		}
	}
	if x.Direction == sa.Out {
		return s.sad.Overlap(x)
	}
	return nil
}

// batchCores gives the batch's SAs that need one a core address from
// core_pool, as POST /v1/sas would one by one: a phone's SAs (same peer,
// encap port and inner peer) share one, its current one if it has SAs
// already. Callers hold coreMu.
func (s *Server) batchCores(sas []sa.SA, idx []int) error {
	type phone struct {
		peer  netip.AddrPort
		inner netip.Prefix
	}
	groups := make(map[phone][]sa.SA)
	for i := range sas {
		if x := &sas[i]; s.needsCore(x) {
			k := phone{netip.AddrPortFrom(x.Peer, encapPort(x)), x.InnerPeer}
			groups[k] = append(groups[k], *x)
		}
	}
	given := make(map[phone]netip.Addr, len(groups))
	taken := make(map[netip.Addr]bool, len(groups))
	for i := range sas {
		x := &sas[i]
		if !s.needsCore(x) {
			continue
		}
		k := phone{netip.AddrPortFrom(x.Peer, encapPort(x)), x.InnerPeer}
		a, ok := given[k]
		if !ok {
			var err error
			if a, err = s.coreForBatch(k.peer, k.inner, groups[k], taken); err != nil {
				return fmt.Errorf("[%d]: %s: inner.core: %w", idx[i], x.Label(), err)
			}
			given[k], taken[a] = a, true
		}
		x.Core = a
	}
	return nil
}

// coreForBatch is coreFor that also skips the addresses given to other
// phones of the same batch (not in the SAD yet).
func (s *Server) coreForBatch(peer netip.AddrPort, inner netip.Prefix, group []sa.SA, taken map[netip.Addr]bool) (netip.Addr, error) {
	if cur, ok := s.sad.CoreOf(peer, inner); ok && s.fits(cur, group) {
		return cur, nil
	}
	inUse := func(a netip.Addr) bool { return taken[a] || s.sad.CoreInUse(a) }
	for range 64 {
		a, err := s.pool.Next(inUse)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%w: %w", sad.ErrFull, err)
		}
		if s.fits(a, group) {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("core_pool %s: 64 free addresses in a row overlap other SAs' selectors: %w", s.pool.Prefix(), sad.ErrOverlap)
}

// AddBatch adds specs all or none through POST /v1/sas/batch (at most
// MaxBatch of them).
func (c *Client) AddBatch(ctx context.Context, specs []sa.Spec) (BatchResult, error) {
	var out BatchResult
	err := c.do(ctx, http.MethodPost, "/v1/sas/batch", specs, &out, http.StatusCreated)
	return out, err
}
