package api

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/secagree"
)

// SecAgreeRequest is POST /v1/secagree: what a P-CSCF knows when the
// phone's unprotected REGISTER has been challenged by the S-CSCF.
type SecAgreeRequest struct {
	// Registration names the SA set: its SAs are named
	// <registration>.in-s, .in-c, .out-s, .out-c and share it as their
	// pair label. A letter, then letters, digits, '.', '_', '-'; at most
	// secagree.MaxNameLen. A re-authentication creates a new set under a
	// new name (TS 33.203 keeps the old SAs until the new ones are in
	// use); the name of a set that exists is refused with 409.
	Registration string `json:"registration"`
	// SecurityClient is the phone's Security-Client header value.
	SecurityClient string `json:"security_client"`
	// CK and IK are the IMS AKA keys, 16 bytes each, hex.
	CK string `json:"ck"`
	IK string `json:"ik"`
	// UE is the phone's address and port as the P-CSCF saw the
	// unprotected REGISTER arrive (after the NAPT): the first NAT binding.
	UE string `json:"ue"`
	// UEInner is the phone's own address (Via sent-by), the inner address
	// of tunnel modes; PCSCF is the P-CSCF's address behind the gateway.
	UEInner string `json:"ue_inner,omitempty"`
	PCSCF   string `json:"pcscf,omitempty"`
	// Local is the gateway's public address the phone sends ESP to.
	Local string `json:"local"`
	// PortC and PortS are the P-CSCF's protected client and server ports.
	PortC uint16 `json:"port_c"`
	PortS uint16 `json:"port_s"`
	// SPIC and SPIS are the P-CSCF's inbound SPIs; 0 lets the server
	// choose free ones at random.
	SPIC uint32 `json:"spi_c,omitempty"`
	SPIS uint32 `json:"spi_s,omitempty"`
	// Replaces names the registration this one re-authenticates (TS
	// 33.203 7.4: the new set is negotiated over the old one and the old
	// one is deleted once the new one is in use). The new SAs join the
	// old set's pair group, so both sets live on one worker and share
	// the phone's NAT binding; UE may then be omitted, the old set's
	// current binding is used (a P-CSCF sees a protected re-REGISTER
	// from the phone's inner address, not from its NAPT mapping). The
	// new set's port_c must differ from the old one's (TS 33.203 7.4:
	// a new protected client port) or the two sets' outbound selectors
	// would overlap.
	Replaces string `json:"replaces,omitempty"`
}

// SecAgreeResponse is the answer to POST /v1/secagree.
type SecAgreeResponse struct {
	Registration string `json:"registration"`
	// SecurityServer is the value to send in the 401's Security-Server.
	SecurityServer string `json:"security_server"`
	// Chosen is the phone's mechanism the SAs were derived from.
	Chosen string `json:"chosen"`
	// SAs are the four SAs, in-s, in-c, out-s, out-c (no keys).
	SAs []SAView `json:"sas"`
	// Core is the phone's core address (docs/addressing.md) when the
	// gateway has a core_pool: the address the SIP core sees the phone
	// at. A re-registration of the same phone (same observed address and
	// port, same inner address) keeps it unless the new set's ports
	// would overlap the current set's.
	Core string `json:"core,omitempty"`
}

// RegistrationView is the answer to GET /v1/secagree/{registration}:
// the SAs of the registration present now, in-s, in-c, out-s, out-c order.
type RegistrationView struct {
	Registration string   `json:"registration"`
	SAs          []SAView `json:"sas"`
}

// RegistrationDeleted is the answer to DELETE /v1/secagree/{registration}:
// the last views of the SAs removed.
type RegistrationDeleted struct {
	Registration string   `json:"registration"`
	SAs          []SAView `json:"sas"`
}

var roles = [...]string{"in-s", "in-c", "out-s", "out-c"}

func (s *Server) secAgreeRoutes(m *http.ServeMux) {
	m.HandleFunc("POST /v1/secagree", s.secAgreeCreate)
	m.HandleFunc("GET /v1/secagree/{registration}", s.secAgreeGet)
	m.HandleFunc("DELETE /v1/secagree/{registration}", s.secAgreeDelete)
	// The same delete as a POST: Kamailio's http_client (5.6, Debian 12)
	// sends only GET and POST from a script.
	m.HandleFunc("POST /v1/secagree/{registration}/delete", s.secAgreeDelete)
	m.HandleFunc("/v1/secagree", methods("POST"))
	m.HandleFunc("/v1/secagree/{registration}", methods("GET, DELETE"))
	m.HandleFunc("/v1/secagree/{registration}/delete", methods("POST"))
}

// secAgreeCreate derives the registration's SAs, installs all four or
// none, waits until the data path holds them and answers with the
// Security-Server value.
func (s *Server) secAgreeCreate(w http.ResponseWriter, r *http.Request) {
	var req SecAgreeRequest
	if !decodeRequest(w, r, &req, "") {
		return
	}
	reg, chosen, errs := s.secAgreeInput(&req)
	if len(errs) > 0 {
		writeErrors(w, http.StatusBadRequest, errs)
		return
	}
	var keepCore netip.Addr
	if req.Replaces != "" {
		old, ok := s.sad.GetName(req.Replaces + ".in-s")
		if !ok {
			writeError(w, http.StatusNotFound, fmt.Sprintf("replaces: registration %q has no SAs (was it deleted or did it expire?)", clipStr(req.Replaces)))
			return
		}
		// The new set is the same phone's: its group (worker, NAT
		// binding), inner addresses and core address are the old set's
		// unless the request names them.
		reg.Pair = old.SA.Pair
		if reg.Pair == "" {
			reg.Pair = req.Replaces
		}
		if !reg.UE.IsValid() {
			b, err := netip.ParseAddrPort(s.view(&old).Binding)
			if err != nil || b.Port() == 0 {
				writeError(w, http.StatusConflict, fmt.Sprintf("replaces: registration %q has no NAT binding to inherit; give ue", clipStr(req.Replaces)))
				return
			}
			reg.UE = b
		}
		if !reg.UEInner.IsValid() && old.SA.InnerPeer.IsValid() {
			reg.UEInner = old.SA.InnerPeer.Addr()
		}
		if !reg.PCSCF.IsValid() && old.SA.InnerLocal.IsValid() {
			reg.PCSCF = old.SA.InnerLocal.Addr()
		}
		keepCore = old.SA.Core
		if oc, ok := s.sad.GetName(req.Replaces + ".in-c"); ok && oc.SA.Ports.Local == req.PortC {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("port_c: %d is the client port of %q: a re-authentication takes a new one (TS 33.203 7.4), or the sets' outbound selectors overlap", req.PortC, clipStr(req.Replaces)))
			return
		}
		if chosen.Mod.Effective() != secagree.ModeTrans && (!reg.UEInner.IsValid() || !reg.PCSCF.IsValid()) {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("ue_inner, pcscf: mod=%s needs both; %q (transport mode) has none to inherit", chosen.Mod.Effective(), clipStr(req.Replaces)))
			return
		}
		if chosen.Mod.Effective() == secagree.ModeTrans && !reg.PCSCF.IsValid() {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("pcscf: mod=trans needs it; %q has none to inherit", clipStr(req.Replaces)))
			return
		}
	}
	for _, role := range roles {
		if _, ok := s.sad.GetName(req.Registration + "." + role); ok {
			writeError(w, http.StatusConflict, fmt.Sprintf("registration %q: exists already: a new SA set (re-authentication) takes a new name; delete the old set once the new one is in use", req.Registration))
			return
		}
	}
	pickSPIs := req.SPIC == 0 && req.SPIS == 0
	if !pickSPIs && (req.SPIC == 0 || req.SPIS == 0 || req.SPIC == req.SPIS) {
		writeError(w, http.StatusBadRequest, "spi_c, spi_s: give both, different, or neither")
		return
	}
	var added []sad.Record
	var server secagree.Mechanism
	tunnel := chosen.Mod.Effective() != secagree.ModeTrans && reg.UEInner.IsValid()
	withCore := s.pool != nil && tunnel && reg.UEInner.Is4() == s.pool.Prefix().Addr().Is4()
	if chosen.Mod.Effective() == secagree.ModeTrans {
		// Transport mode cannot work without a core address: always
		// one from the pool (the policy offers mod=trans only with one;
		// of the wrong family the SAD refuses the set, naming why).
		withCore = s.pool != nil && reg.Local.Is4() == s.pool.Prefix().Addr().Is4()
	}
	locked := false
	if withCore {
		// Allocation and add under one lock: no two registrations get
		// one address, and the check that the new set does not overlap
		// the phone's current set still holds when it is added. Released
		// before the wait for the data path.
		s.coreMu.Lock()
		locked = true
		defer func() {
			if locked {
				s.coreMu.Unlock()
			}
		}()
	} else if reg.Pair == "" {
		reg.Pair = secagree.PhoneLabel(reg.UE, reg.UEInner)
	}
	for attempt := 0; ; attempt++ {
		spiC, spiS := req.SPIC, req.SPIS
		if pickSPIs {
			spiC, spiS = s.freeSPI(0), 0
			spiS = s.freeSPI(spiC)
		}
		server = secagree.Server(chosen, s.policy, spiC, spiS, req.PortC, req.PortS)
		reg.Server = server
		reg.Core = netip.Addr{}
		ds, err := secagree.Derive(reg)
		if err != nil {
			writeErrors(w, http.StatusBadRequest, sa.Flatten(err))
			return
		}
		if errs := s.checkDerived(ds); len(errs) > 0 {
			writeErrors(w, http.StatusBadRequest, errs)
			return
		}
		if withCore && keepCore.IsValid() {
			// A re-authentication keeps the phone's core address: the
			// SIP core knows the phone there. Its new port_c keeps the
			// two sets' selectors apart (checked again by the SAD).
			reg.Core = keepCore
			if ds, err = secagree.Derive(reg); err != nil {
				writeErrors(w, http.StatusBadRequest, sa.Flatten(err))
				return
			}
		} else if withCore {
			if reg.Core, err = s.coreForDerived(reg, ds); err != nil {
				writeError(w, sadStatus(err), err.Error())
				return
			}
			if ds, err = secagree.Derive(reg); err != nil {
				writeErrors(w, http.StatusBadRequest, sa.Flatten(err))
				return
			}
		}
		var addErr error
		var failed int
		added, failed, addErr = s.addAll(ds)
		if addErr == nil {
			break
		}
		// Another request may have taken an SPI picked here in between:
		// pick again. Anything else, or SPIs the client chose, is its
		// answer.
		if !pickSPIs || !errors.Is(addErr, sad.ErrExists) || ds[failed].Spec.Direction != "in" || attempt == 3 {
			writeError(w, sadStatus(addErr), addErr.Error())
			return
		}
	}
	if locked {
		s.coreMu.Unlock()
		locked = false
	}
	if !s.synced(w, r) {
		return
	}
	resp := SecAgreeResponse{Registration: req.Registration, SecurityServer: server.String(), Chosen: chosen.String()}
	if reg.Core.IsValid() {
		resp.Core = reg.Core.String()
	}
	for i := range added {
		resp.SAs = append(resp.SAs, s.view(&added[i]))
	}
	s.log.Info("sec-agree registration created", "registration", req.Registration, "ue", req.UE, "mechanism", resp.SecurityServer, "from", from(r))
	writeJSON(w, http.StatusCreated, resp)
}

// coreForDerived picks the registration's core address (coreFor) for its
// derived SAs.
func (s *Server) coreForDerived(reg secagree.Registration, ds []secagree.DerivedSA) (netip.Addr, error) {
	sas := make([]sa.SA, 0, len(ds))
	for _, d := range ds {
		x, err := d.Spec.Parse(sa.Options{})
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%w: %w", sad.ErrInvalid, err)
		}
		sas = append(sas, x)
	}
	return s.coreFor(netip.AddrPortFrom(sas[0].Peer, encapPort(&sas[0])), sas[0].InnerPeer, sas)
}

// secAgreeInput checks every field and collects every problem, each
// naming its field.
func (s *Server) secAgreeInput(req *SecAgreeRequest) (secagree.Registration, secagree.Mechanism, []error) {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	reg := secagree.Registration{Name: req.Registration, EncapPort: s.nattPort}
	switch {
	case req.Registration == "":
		bad("registration", "required")
	case len(req.Registration) > secagree.MaxNameLen || !sa.ValidName(req.Registration):
		bad("registration", "%q: use 1..%d of A-Z a-z 0-9 . _ - starting with a letter", clipStr(req.Registration), secagree.MaxNameLen)
	}
	var chosen secagree.Mechanism
	if req.SecurityClient == "" {
		bad("security_client", "required (the phone's Security-Client header value)")
	} else if offer, err := secagree.Parse(req.SecurityClient); err != nil {
		bad("security_client", "%v", err)
	} else if chosen, err = secagree.Choose(offer, s.policy); err != nil {
		errs = append(errs, err)
	}
	key := func(field, v string) []byte {
		if v == "" {
			bad(field, "required (16 bytes, hex)")
			return nil
		}
		b, err := hex.DecodeString(strings.TrimPrefix(strings.TrimPrefix(v, "0x"), "0X"))
		if err != nil {
			bad(field, "not hex")
			return nil
		}
		if len(b) != 16 {
			bad(field, "need 16 bytes (IMS AKA), got %d", len(b))
			return nil
		}
		return b
	}
	reg.CK, reg.IK = key("ck", req.CK), key("ik", req.IK)
	if req.Replaces != "" && (len(req.Replaces) > secagree.MaxNameLen || !sa.ValidName(req.Replaces)) {
		bad("replaces", "%q: not a registration name", clipStr(req.Replaces))
	} else if req.Replaces == req.Registration && req.Replaces != "" {
		bad("replaces", "names the registration itself")
	}
	if req.UE == "" {
		if req.Replaces == "" {
			bad("ue", "required (the phone's observed address:port)")
		}
	} else if ap, err := netip.ParseAddrPort(req.UE); err != nil || ap.Port() == 0 {
		bad("ue", "%q: want address:port as observed, e.g. 198.51.100.7:31000", clipStr(req.UE))
	} else {
		reg.UE = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	addr := func(field, v string, required bool) netip.Addr {
		if v == "" {
			if required {
				bad(field, "required")
			}
			return netip.Addr{}
		}
		a, err := netip.ParseAddr(v)
		if err != nil || a.Zone() != "" {
			bad(field, "%q is not an IP address", clipStr(v))
			return netip.Addr{}
		}
		return a.Unmap()
	}
	reg.Local = addr("local", req.Local, true)
	tunnel := chosen.Mod.Effective() != secagree.ModeTrans
	// A re-authentication (replaces) inherits them from the replaced set.
	reg.UEInner = addr("ue_inner", req.UEInner, tunnel && chosen.IsIPsec3GPP() && req.Replaces == "")
	// Transport mode needs the P-CSCF's address too: the phone's segments
	// are delivered there (docs/addressing.md, "Transport mode").
	reg.PCSCF = addr("pcscf", req.PCSCF, chosen.IsIPsec3GPP() && req.Replaces == "")
	if req.PortC == 0 {
		bad("port_c", "required (the P-CSCF's protected client port)")
	}
	if req.PortS == 0 {
		bad("port_s", "required (the P-CSCF's protected server port)")
	}
	if req.PortC != 0 && req.PortC == req.PortS {
		bad("port_s", "%d: must differ from port_c", req.PortS)
	}
	reg.Client = chosen
	return reg, chosen, errs
}

func clipStr(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// freeSPI returns a random inbound SPI the SAD does not hold, other than
// not. SPIs are random so a phone cannot predict the next registration's.
func (s *Server) freeSPI(not uint32) uint32 {
	var b [4]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic(err) // crypto/rand does not fail on Linux
		}
		spi := binary.BigEndian.Uint32(b[:])
		if spi < 256 || spi == not {
			continue
		}
		if _, err := s.sad.Lookup(sa.In, spi); errors.Is(err, sad.ErrNotFound) {
			return spi
		}
	}
}

// checkDerived runs the gateway's checks on the derived SAs. They share
// the request's local address, so a wrong one is reported once, against
// the request's field.
func (s *Server) checkDerived(ds []secagree.DerivedSA) []error {
	var out []error
	seen := map[string]bool{}
	for _, d := range ds {
		x, err := d.Spec.Parse(sa.Options{})
		if err != nil {
			continue // addAll reports it
		}
		for _, e := range s.checkSA(&x) {
			msg := e.Error()
			var fe *sa.FieldError
			if errors.As(e, &fe) && fe.Field == "local" {
				msg = "local: " + fe.Reason
			}
			if !seen[msg] {
				seen[msg] = true
				out = append(out, errors.New(msg))
			}
		}
	}
	return out
}

// addAll installs every derived SA or, on the first failure, removes the
// ones it added and returns the failure.
func (s *Server) addAll(ds []secagree.DerivedSA) ([]sad.Record, int, error) {
	var added []sad.Record
	for i, d := range ds {
		x, err := d.Spec.Parse(sa.Options{})
		if err == nil {
			var e sad.Record
			if e, err = s.sad.Add(x); err == nil {
				added = append(added, e)
				continue
			}
		}
		for _, e := range added {
			_, _ = s.sad.Delete(e.ID)
		}
		return nil, i, err
	}
	return added, 0, nil
}

// DefaultDeleteGrace is how long DELETE /v1/secagree/{registration} keeps
// the outbound SAs after removing the inbound ones: none. A P-CSCF deletes
// right after its sendto of the final response returned, when that
// response may still sit in a worker's receive ring, steered to the
// outbound SA's slot; the data path's removals drain such frames (package
// manager), so it is sealed and sent all the same (the end-to-end test
// lost it in 10 of 30 runs before removals drained, with no grace). A
// caller whose last message may reach the gateway after its delete
// request (another path through the network) asks for ?grace=.
const DefaultDeleteGrace time.Duration = 0

// MaxDeleteGrace bounds ?grace=.
const MaxDeleteGrace = 10 * time.Second

// secAgreeGet shows a registration's SAs: what a P-CSCF (or an
// operator) checks to see whether a registration's protection still
// exists, e.g. after an expiry.
func (s *Server) secAgreeGet(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("registration")
	if !sa.ValidName(name) || len(name) > secagree.MaxNameLen {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("registration: %q: use 1..%d of A-Z a-z 0-9 . _ - starting with a letter", clipStr(name), secagree.MaxNameLen))
		return
	}
	out := RegistrationView{Registration: name}
	for _, role := range roles {
		if cur, ok := s.sad.GetName(name + "." + role); ok {
			out.SAs = append(out.SAs, s.view(&cur))
		}
	}
	if len(out.SAs) == 0 {
		writeError(w, http.StatusNotFound, fmt.Sprintf("registration %q: no SAs", name))
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// secAgreeDelete removes every SA of a registration: inbound at once,
// outbound after the grace (?grace=DURATION, Go syntax, default 0). The
// P-CSCF calls it once the last message that needs the SAs (the final
// response of a de-registration) has left: the SAs are all gone when
// this answers.
func (s *Server) secAgreeDelete(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("registration")
	if !sa.ValidName(name) || len(name) > secagree.MaxNameLen {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("registration: %q: use 1..%d of A-Z a-z 0-9 . _ - starting with a letter", clipStr(name), secagree.MaxNameLen))
		return
	}
	grace := DefaultDeleteGrace
	if v := r.URL.Query().Get("grace"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > MaxDeleteGrace {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("grace: %q: want a duration 0s..%s (e.g. 200ms)", clipStr(v), MaxDeleteGrace))
			return
		}
		grace = d
	}
	out := RegistrationDeleted{Registration: name}
	var present []sad.Record
	for _, role := range roles {
		if cur, ok := s.sad.GetName(name + "." + role); ok {
			present = append(present, cur)
		}
	}
	if len(present) == 0 {
		writeError(w, http.StatusNotFound, fmt.Sprintf("registration %q: no SAs", name))
		return
	}
	for _, dir := range []sa.Direction{sa.In, sa.Out} {
		if dir == sa.Out && grace > 0 {
			t := time.NewTimer(grace)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
			}
		}
		for i := range present {
			cur := &present[i]
			if cur.ID.Dir != dir {
				continue
			}
			// The view is taken just before the delete so its counters
			// are the last the data path had.
			v := s.view(cur)
			if _, err := s.sad.Delete(cur.ID); err != nil {
				if errors.Is(err, sad.ErrNotFound) {
					continue // a concurrent delete got there first
				}
				writeError(w, sadStatus(err), err.Error())
				return
			}
			out.SAs = append(out.SAs, v)
		}
	}
	if !s.synced(w, r) {
		return
	}
	s.log.Info("sec-agree registration deleted", "registration", name, "sas", len(out.SAs), "grace", grace, "from", from(r))
	writeJSON(w, http.StatusOK, out)
}

// SecAgree creates a registration's SAs (POST /v1/secagree) and returns
// the Security-Server value to send.
func (c *Client) SecAgree(ctx context.Context, req SecAgreeRequest) (SecAgreeResponse, error) {
	var r SecAgreeResponse
	err := c.do(ctx, http.MethodPost, "/v1/secagree", req, &r, http.StatusCreated)
	return r, err
}

// Registration returns the SAs a registration holds now.
func (c *Client) Registration(ctx context.Context, registration string) (RegistrationView, error) {
	var r RegistrationView
	err := c.do(ctx, http.MethodGet, "/v1/secagree/"+url.PathEscape(registration), nil, &r, http.StatusOK)
	return r, err
}

// DeleteRegistration removes every SA of a registration, the outbound
// ones after the server's DefaultDeleteGrace.
func (c *Client) DeleteRegistration(ctx context.Context, registration string) (RegistrationDeleted, error) {
	return c.DeleteRegistrationGrace(ctx, registration, -1)
}

// DeleteRegistrationGrace is DeleteRegistration with the grace given;
// negative means the server's default.
func (c *Client) DeleteRegistrationGrace(ctx context.Context, registration string, grace time.Duration) (RegistrationDeleted, error) {
	var r RegistrationDeleted
	path := "/v1/secagree/" + url.PathEscape(registration)
	if grace >= 0 {
		path += "?grace=" + url.QueryEscape(grace.String())
	}
	err := c.do(ctx, http.MethodDelete, path, nil, &r, http.StatusOK)
	return r, err
}
