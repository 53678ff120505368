package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

func (s *Server) routes() {
	m := http.NewServeMux()
	m.HandleFunc("GET /v1/health", s.health)
	m.HandleFunc("GET /v1/stats", s.stats)
	m.HandleFunc("GET /v1/sas", s.list)
	m.HandleFunc("POST /v1/sas", s.add)
	m.HandleFunc("POST /v1/sas/batch", s.addBatch)
	m.HandleFunc("GET /v1/sas/{ref}", s.get)
	m.HandleFunc("PUT /v1/sas/{ref}", s.update)
	m.HandleFunc("DELETE /v1/sas/{ref}", s.del)
	m.HandleFunc("GET /v1/events", s.events)
	m.HandleFunc("POST /v1/rekey", s.rekey)
	m.HandleFunc("GET /v1/floods", s.floods)
	// Method-less patterns catch the other methods, so a 405 is JSON
	// like every other error; the mux prefers the patterns above.
	m.HandleFunc("/v1/health", methods("GET"))
	m.HandleFunc("/v1/stats", methods("GET"))
	m.HandleFunc("/v1/sas", methods("GET, POST"))
	m.HandleFunc("/v1/sas/{ref}", methods("GET, PUT, DELETE"))
	s.secAgreeRoutes(m)
	m.HandleFunc("/v1/events", methods("GET"))
	m.HandleFunc("/v1/rekey", methods("POST"))
	m.HandleFunc("/v1/floods", methods("GET"))
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s (see /v1/health, /v1/stats, /v1/sas)", r.URL.Path))
	})
	s.mux = m
}

func methods(allow string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, allow))
	}
}

func (s *Server) health(w http.ResponseWriter, _ *http.Request) {
	var h Health
	if s.dp != nil {
		h = s.dp.Health()
	} else {
		h.Problems = append(h.Problems, "no data path is running")
	}
	h.SAs.In, h.SAs.Out = s.sad.Len()
	h.UptimeSeconds = time.Since(s.started).Seconds()
	status := http.StatusOK
	if !h.OK {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, h)
}

// floods serves GET /v1/floods: the SAs under attack by name, which the
// metrics only count (an SA is not a Prometheus label).
func (s *Server) floods(w http.ResponseWriter, _ *http.Request) {
	fr, ok := s.dp.(FloodReporter)
	if !ok {
		writeError(w, http.StatusServiceUnavailable, "no flood budgets: no data path is running")
		return
	}
	out := Floods{Items: fr.Floods()}
	if out.Items == nil {
		out.Items = []Flood{}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) stats(w http.ResponseWriter, _ *http.Request) {
	var st Stats
	if s.dp != nil {
		st = s.dp.Stats()
	}
	st.SAs.In, st.SAs.Out = s.sad.Len()
	loads := s.sad.Workers()
	for len(st.Workers) < len(loads) {
		st.Workers = append(st.Workers, WorkerStats{Worker: len(st.Workers)})
	}
	for i := range st.Workers {
		if w := st.Workers[i].Worker; w >= 0 && w < len(loads) {
			st.Workers[i].SAs = loads[w].SAs
		}
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := DefaultLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxLimit {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("limit: %q: want 1..%d", v, MaxLimit))
			return
		}
		limit = n
	}
	var cursor uint64
	if v := q.Get("cursor"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("cursor: %q: use the next value of the previous page", v))
			return
		}
		cursor = n
	}
	entries, next := s.sad.List(cursor, limit, make([]sad.Record, 0, limit))
	p := Page{Items: make([]SAView, len(entries))}
	for i := range entries {
		p.Items[i] = s.view(&entries[i])
	}
	if next != 0 {
		p.Next = strconv.FormatUint(next, 10)
	}
	writeJSON(w, http.StatusOK, p)
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	e, status, err := s.resolve(r.PathValue("ref"))
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, s.view(&e))
}

func (s *Server) add(w http.ResponseWriter, r *http.Request) {
	in, status, errs := s.decodeSA(w, r)
	if errs != nil {
		writeErrors(w, status, errs)
		return
	}
	e, err := s.addWithCore(in)
	if err != nil {
		writeError(w, sadStatus(err), err.Error())
		return
	}
	if !s.synced(w, r) {
		return
	}
	s.log.Info("sa added", "sa", e.SA.Label(), "ref", RefOf(e.ID), "worker", e.Worker, "from", from(r))
	w.Header().Set("Location", "/v1/sas/"+url.PathEscape(RefOf(e.ID)))
	writeJSON(w, http.StatusCreated, s.view(&e))
}

func (s *Server) update(w http.ResponseWriter, r *http.Request) {
	cur, status, err := s.resolve(r.PathValue("ref"))
	if err != nil {
		drain(r.Body)
		writeError(w, status, err.Error())
		return
	}
	in, status, errs := s.decodeSA(w, r)
	if errs != nil {
		writeErrors(w, status, errs)
		return
	}
	if id := in.ID(); id != cur.ID {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("%s: the body is %s but %s names %s: direction, spi and (outbound) peer and encap.peer_port are the identity and cannot change; delete and add instead",
			in.Label(), id, r.PathValue("ref"), cur.ID))
		return
	}
	if s.needsCore(&in) && cur.SA.Core.IsValid() && cur.SA.InnerPeer == in.InnerPeer {
		// A body without inner.core (an SA file written before the
		// allocation) keeps the phone's allocated address.
		in.Core = cur.SA.Core
	}
	e, err := s.sad.Update(in)
	if err != nil {
		writeError(w, sadStatus(err), err.Error())
		return
	}
	if !s.synced(w, r) {
		return
	}
	s.log.Info("sa updated", "sa", e.SA.Label(), "ref", RefOf(e.ID), "worker", e.Worker, "from", from(r))
	writeJSON(w, http.StatusOK, s.view(&e))
}

func (s *Server) del(w http.ResponseWriter, r *http.Request) {
	cur, status, err := s.resolve(r.PathValue("ref"))
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	// The view is taken before the delete so its counters are the last
	// the data path had.
	v := s.view(&cur)
	e, err := s.sad.Delete(cur.ID)
	if err != nil {
		writeError(w, sadStatus(err), err.Error())
		return
	}
	if !s.synced(w, r) {
		return
	}
	s.log.Info("sa deleted", "sa", e.SA.Label(), "ref", RefOf(e.ID), "from", from(r))
	writeJSON(w, http.StatusOK, v)
}

// syncTimeout bounds how long a write waits for the data path.
const syncTimeout = 5 * time.Second

// synced waits until the data path reflects the SAD as it is now, so the
// change just made is in force when the client hears back. On timeout it
// answers 503: the change is stored and will apply, but is not in force.
func (s *Server) synced(w http.ResponseWriter, r *http.Request) bool {
	if s.dp == nil {
		return true
	}
	ctx, cancel := context.WithTimeout(r.Context(), syncTimeout)
	defer cancel()
	if err := s.dp.Synced(ctx, s.sad.Version()); err != nil {
		writeError(w, http.StatusServiceUnavailable, "stored, but not yet in force in the data path: "+err.Error())
		return false
	}
	return true
}

// resolve finds the SA a reference names.
func (s *Server) resolve(ref string) (sad.Record, int, error) {
	rf, err := ParseRef(ref)
	if err != nil {
		return sad.Record{}, http.StatusBadRequest, err
	}
	switch {
	case rf.Name != "":
		if e, ok := s.sad.GetName(rf.Name); ok {
			return e, 0, nil
		}
		return sad.Record{}, http.StatusNotFound, fmt.Errorf("sa %q: %w", rf.Name, sad.ErrNotFound)
	case rf.ID.Dir == sa.Out && rf.ID.Peer.IsValid():
		if e, ok := s.sad.Get(rf.ID); ok {
			return e, 0, nil
		}
		return sad.Record{}, http.StatusNotFound, fmt.Errorf("%s: %w", rf.ID, sad.ErrNotFound)
	}
	e, err := s.sad.Lookup(rf.ID.Dir, rf.ID.SPI)
	if err != nil {
		return sad.Record{}, sadStatus(err), err
	}
	return e, 0, nil
}

// view builds what the API shows of an entry: never its keys.
func (s *Server) view(e *sad.Record) SAView {
	v := SAView{
		Spec:    e.SA.Public(),
		Ref:     RefOf(e.ID),
		Worker:  e.Worker,
		Index:   e.Index,
		State:   e.State.String(),
		Binding: e.Binding.String(),
		Created: e.Created.UTC(),
	}
	if s.dp != nil {
		if c, ok := s.dp.SACounters(e.ID); ok {
			v.Counters = &c
		}
	}
	return v
}

// readJSON reads a request's JSON body, bounded by MaxBody. On failure it
// returns the status to answer with and a message naming what was wrong.
func readJSON(w http.ResponseWriter, r *http.Request) ([]byte, int, error) {
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		drain(r.Body)
		return nil, http.StatusUnsupportedMediaType, fmt.Errorf("content type: %q: send application/json", ct)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("body: larger than %d bytes", MaxBody)
		}
		return nil, http.StatusBadRequest, fmt.Errorf("body: %w", err)
	}
	return body, 0, nil
}

// decodeRequest reads a JSON body into v, refusing unknown fields and
// anything after the object; usage says what a valid body looks like.
// It answers the request itself and returns false on any failure.
func decodeRequest(w http.ResponseWriter, r *http.Request, v any, usage string) bool {
	body, status, err := readJSON(w, r)
	if err != nil {
		writeError(w, status, err.Error())
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		msg := err.Error()
		var ue *json.UnmarshalTypeError
		if errors.As(err, &ue) {
			msg = sa.DescribeJSONTypeError(ue) // JSON field names, not Go's
		} else {
			msg = strings.TrimPrefix(msg, "json: ")
		}
		writeError(w, http.StatusBadRequest, "body: "+msg+usage)
		return false
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, "body: data after the JSON object")
		return false
	}
	return true
}

// decodeSA reads one SA in the SA format from a JSON body. Key files are
// refused (zero Options): a request must not make the daemon read files.
// checkSA runs the gateway's checks (Options.Check) on one SA.
func (s *Server) checkSA(x *sa.SA) []error {
	if s.check == nil {
		return nil
	}
	return sa.Flatten(s.check(x))
}

func (s *Server) decodeSA(w http.ResponseWriter, r *http.Request) (sa.SA, int, []error) {
	body, status, err := readJSON(w, r)
	if err != nil {
		return sa.SA{}, status, []error{err}
	}
	sas, err := sa.ParseBytes(body, sa.JSON, sa.Options{})
	if err != nil {
		return sa.SA{}, http.StatusBadRequest, sa.Flatten(err)
	}
	if len(sas) != 1 {
		return sa.SA{}, http.StatusBadRequest, []error{fmt.Errorf("body: holds %d SAs: send exactly one per request", len(sas))}
	}
	if errs := s.checkSA(&sas[0]); len(errs) > 0 {
		return sa.SA{}, http.StatusBadRequest, errs
	}
	return sas[0], 0, nil
}

// sadStatus maps the SAD's errors to HTTP statuses. An ambiguous
// outbound SPI is a conflict with the SAD's state (the same reference
// works while one peer uses the SPI); a full table is 507, the server
// being out of room for this representation.
func sadStatus(err error) int {
	switch {
	case errors.Is(err, sad.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, sad.ErrExists), errors.Is(err, sad.ErrAmbiguous), errors.Is(err, sad.ErrOverlap), errors.Is(err, sad.ErrConflict):
		return http.StatusConflict
	case errors.Is(err, sad.ErrFull):
		return http.StatusInsufficientStorage
	case errors.Is(err, sad.ErrInvalid):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

// from says who made a change, for the log.
func from(r *http.Request) string {
	if strings.HasPrefix(r.RemoteAddr, "@") || r.RemoteAddr == "" {
		return "unix"
	}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		// mTLS: the client certificate says who, the address where.
		return r.RemoteAddr + " cn=" + r.TLS.PeerCertificates[0].Subject.CommonName
	}
	return r.RemoteAddr
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "encode response: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeErrors(w, status, []error{errors.New(msg)})
}

func writeErrors(w http.ResponseWriter, status int, errs []error) {
	body := errorBody{}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	body.Error = strings.Join(msgs, "\n")
	if len(msgs) > 1 {
		body.Errors = msgs
	}
	b, _ := json.Marshal(body)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
