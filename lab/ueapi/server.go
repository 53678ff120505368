// Package ueapi is the emulated phone's control API: a test harness or a
// phone-side sec-agree client installs, replaces and removes the phone's
// SAs while its tunnel runs, in the one SA format (docs/sa-format.md) and with
// the gateway API's request rules, errors and client (control/api).
//
//	POST   /v1/sas        add one SA (phone's view: out seals toward the
//	                      gateway). A second outbound SA replaces the
//	                      first at once (rekey); inbound SAs accumulate,
//	                      so the old one keeps opening until deleted.
//	GET    /v1/sas/{ref}  show one (ref: name, in:SPI or out:SPI[@peer])
//	DELETE /v1/sas/{ref}  remove one
//	GET    /v1/sas        list them, never with keys
//	GET    /v1/stats      the tunnel's counters
//
// It serves on a Unix socket only (0600): the phone is a test tool.
package ueapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"sync"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/lab/ue"
)

// Server serves one tunnel's API.
type Server struct {
	t  *ue.Tunnel
	gw string

	// mu orders changes: the tunnel and the table below change together.
	mu  sync.Mutex
	sas map[sa.ID]entry
	mux *http.ServeMux
}

type entry struct {
	spec    sa.SA
	esp     *esp.Transform
	created time.Time
}

// New returns the API of t. initial lists the SAs t was started with (in
// the phone's view), so they are listed and can be deleted like the rest;
// each must be the SA t holds under its direction and SPI.
func New(t *ue.Tunnel, gateway string, initial ...sa.SA) (*Server, error) {
	s := &Server{t: t, gw: gateway, sas: map[sa.ID]entry{}}
	out, in := t.SAs()
	for _, sp := range initial {
		var e *esp.Transform
		if sp.Direction == sa.Out && out != nil && out.SPI() == sp.SPI {
			e = out
		}
		for _, i := range in {
			if sp.Direction == sa.In && i.SPI() == sp.SPI {
				e = i
			}
		}
		if e == nil {
			return nil, fmt.Errorf("ueapi: %s is not installed in the tunnel", sp.Label())
		}
		s.sas[sp.ID()] = entry{spec: sp, esp: e, created: time.Now()}
	}
	m := http.NewServeMux()
	m.HandleFunc("GET /v1/sas", s.list)
	m.HandleFunc("POST /v1/sas", s.add)
	m.HandleFunc("GET /v1/sas/{ref}", s.get)
	m.HandleFunc("DELETE /v1/sas/{ref}", s.del)
	m.HandleFunc("GET /v1/stats", s.stats)
	m.HandleFunc("/v1/sas", api.MethodNotAllowed("GET, POST"))
	m.HandleFunc("/v1/sas/{ref}", api.MethodNotAllowed("GET, DELETE"))
	m.HandleFunc("/v1/stats", api.MethodNotAllowed("GET"))
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		api.WriteError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s on the phone (see /v1/sas, /v1/stats)", r.URL.Path))
	})
	s.mux = m
	return s, nil
}

// Handler is the API's HTTP handler.
func (s *Server) Handler() http.Handler { return s.mux }

// Serve listens on the Unix socket at path (0600) until ctx ends. ready,
// if not nil, is called once the socket accepts connections.
func (s *Server) Serve(ctx context.Context, path string, ready func()) error {
	ln, closeLn, err := api.ListenUnix(path)
	if err != nil {
		return fmt.Errorf("phone api: %w", err)
	}
	hs := &http.Server{Handler: s.mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() { done <- hs.Serve(ln) }()
	if ready != nil {
		ready()
	}
	select {
	case <-ctx.Done():
	case err := <-done:
		closeLn()
		return fmt.Errorf("phone api: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = hs.Shutdown(sctx)
	closeLn()
	<-done
	return err
}

func (s *Server) add(w http.ResponseWriter, r *http.Request) {
	in, status, errs := api.DecodeSA(w, r)
	if errs != nil {
		api.WriteErrors(w, status, errs)
		return
	}
	window := 0
	if in.Direction == sa.In {
		window = int(in.ReplayWindow)
	}
	mode := esp.ModeTunnel
	if in.Mode == sa.Transport {
		mode = esp.ModeTransport
	}
	if mode != s.t.Mode() {
		api.WriteError(w, http.StatusBadRequest, fmt.Sprintf("%s: mode: %s, but the phone's tunnel runs in %s mode", in.Label(), mode, s.t.Mode()))
		return
	}
	e, err := esp.NewTransform(esp.Config{Name: in.Name, SPI: in.SPI, Proposal: in.Proposal, EncKey: in.EncKey,
		AuthKey: in.AuthKey, ESN: in.ESN, ReplayWindow: window, Mode: mode})
	if err != nil {
		api.WriteError(w, http.StatusBadRequest, fmt.Sprintf("%s: %v", in.Label(), err))
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if in.Name != "" {
		cur, _ := s.t.SAs()
		for _, x := range s.sas {
			// A rekey may keep the name of the outbound SA it replaces.
			if x.spec.Name == in.Name && !(in.Direction == sa.Out && x.esp == cur) {
				api.WriteError(w, http.StatusConflict, fmt.Sprintf("sa %q: name: already used by %s", in.Name, api.RefOf(x.spec.ID())))
				return
			}
		}
	}
	if in.Direction == sa.Out {
		var old *esp.Transform
		if old, err = s.t.SetOut(e); err == nil && old != nil {
			for id, x := range s.sas {
				if x.esp == old {
					delete(s.sas, id)
				}
			}
		}
	} else {
		err = s.t.AddIn(e)
	}
	if err != nil {
		api.WriteError(w, changeStatus(err), fmt.Sprintf("%s: %v", in.Label(), err))
		return
	}
	x := entry{spec: in, esp: e, created: time.Now()}
	s.sas[in.ID()] = x
	w.Header().Set("Location", "/v1/sas/"+url.PathEscape(api.RefOf(in.ID())))
	api.WriteJSON(w, http.StatusCreated, s.view(&x))
}

// find resolves a reference among the phone's SAs; s.mu must be held.
// It answers the request itself when it fails.
func (s *Server) find(w http.ResponseWriter, r *http.Request) (entry, sa.ID, bool) {
	ref, err := api.ParseRef(r.PathValue("ref"))
	if err != nil {
		api.WriteError(w, http.StatusBadRequest, err.Error())
		return entry{}, sa.ID{}, false
	}
	for k, x := range s.sas {
		if (ref.Name != "" && x.spec.Name == ref.Name) ||
			(ref.Name == "" && k.Dir == ref.ID.Dir && k.SPI == ref.ID.SPI && (!ref.ID.Peer.IsValid() || k.Peer == ref.ID.Peer)) {
			return x, k, true
		}
	}
	api.WriteError(w, http.StatusNotFound, fmt.Sprintf("ref %s: %v", r.PathValue("ref"), ue.ErrSANotFound))
	return entry{}, sa.ID{}, false
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if x, _, ok := s.find(w, r); ok {
		api.WriteJSON(w, http.StatusOK, s.view(&x))
	}
}

func (s *Server) del(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	found, id, ok := s.find(w, r)
	if !ok {
		return
	}
	var err error
	if id.Dir == sa.Out {
		_, err = s.t.DeleteOut(id.SPI)
	} else {
		_, err = s.t.DeleteIn(id.SPI)
	}
	if err != nil {
		api.WriteError(w, changeStatus(err), err.Error())
		return
	}
	delete(s.sas, id)
	api.WriteJSON(w, http.StatusOK, s.view(&found))
}

func (s *Server) list(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	p := api.Page{Items: make([]api.SAView, 0, len(s.sas))}
	for _, x := range s.sas {
		p.Items = append(p.Items, s.view(&x))
	}
	s.mu.Unlock()
	sort.Slice(p.Items, func(i, j int) bool { return p.Items[i].Ref < p.Items[j].Ref })
	api.WriteJSON(w, http.StatusOK, p)
}

// view is what the API shows of an SA: the public spec, never keys.
func (s *Server) view(x *entry) api.SAView {
	return api.SAView{Spec: x.spec.Public(), Ref: api.RefOf(x.spec.ID()), State: "active", Binding: s.gw, Created: x.created.UTC()}
}

// Stats is GET /v1/stats: the tunnel's counters.
type Stats struct {
	FromTUN            uint64            `json:"from_tun"`
	Sent               uint64            `json:"esp_sent"`
	Received           uint64            `json:"esp_received"`
	ToTUN              uint64            `json:"to_tun"`
	KeepalivesSent     uint64            `json:"keepalives_sent"`
	KeepalivesReceived uint64            `json:"keepalives_received"`
	Drops              map[string]uint64 `json:"drops,omitempty"`
	SAs                api.SACount       `json:"sas"`
	// OutSPI is the SPI the phone seals with now, 0 when it has none.
	OutSPI uint32 `json:"out_spi"`
}

// StatsOf summarises a tunnel's counters.
func StatsOf(t *ue.Tunnel) Stats {
	c := t.Counters()
	st := Stats{FromTUN: c.FromTUN, Sent: c.Sent, Received: c.Received, ToTUN: c.ToTUN,
		KeepalivesSent: c.KeepalivesSent, KeepalivesReceived: c.KeepalivesReceived}
	for _, d := range c.DropList() {
		if st.Drops == nil {
			st.Drops = map[string]uint64{}
		}
		st.Drops[d.Reason] = d.N
	}
	out, in := t.SAs()
	st.SAs.In = len(in)
	if out != nil {
		st.SAs.Out, st.OutSPI = 1, out.SPI()
	}
	return st
}

func (s *Server) stats(w http.ResponseWriter, _ *http.Request) {
	api.WriteJSON(w, http.StatusOK, StatsOf(s.t))
}

func changeStatus(err error) int {
	switch {
	case errors.Is(err, ue.ErrSAExists):
		return http.StatusConflict
	case errors.Is(err, ue.ErrSANotFound):
		return http.StatusNotFound
	case errors.Is(err, ue.ErrSAMode):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}
