package api

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

func TestUnixSocketMode(t *testing.T) {
	e := newEnv(t, false, 0)
	st, err := os.Lstat(e.sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want socket 0600", st.Mode())
	}
	// No temporary directory is left next to the socket.
	ents, _ := os.ReadDir(filepath.Dir(e.sock))
	if len(ents) != 1 {
		t.Errorf("socket directory holds %d entries, want 1", len(ents))
	}
	h, err := e.unix.Health(context.Background())
	if err != nil || !h.OK || h.AFXDP != "copy" || h.XDP["pub0"] != "native" || h.Workers != 2 || h.UptimeSeconds <= 0 {
		t.Fatalf("health %+v, %v", h, err)
	}
}

func TestStaleSocket(t *testing.T) {
	dir := shortDir(t)
	path := filepath.Join(dir, "api.sock")
	d, _ := sad.New(sad.Options{Workers: 1})
	newSrv := func() *Server {
		s, err := New(Options{SAD: d, API: config.API{Unix: path}})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}

	// A socket nobody serves on is replaced.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	s := newSrv()
	if err := s.Listen(); err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}

	// A live one is not: a second daemon must not steal the path.
	if err := newSrv().Listen(); err == nil || !strings.Contains(err.Error(), "another process is serving on it") {
		t.Fatalf("second server on a live socket: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Serve(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Serve: %v", err)
	}

	// A regular file is never removed.
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := newSrv().Listen(); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("regular file at socket path: %v", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "x" {
		t.Fatalf("regular file changed: %q %v", b, err)
	}
}

func TestNewRefuses(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1})
	cases := []struct {
		o   Options
		err string
	}{
		{Options{SAD: d, API: config.API{TCP: "127.0.0.1:0"}}, "api: tcp 127.0.0.1:0: refusing to serve TCP without a bearer token (api.token or api.token_file)"},
		{Options{SAD: d}, "api: no listener: set a unix socket path or a TCP address"},
		{Options{API: config.API{Unix: "/x"}}, "api: no SAD"},
	}
	for _, c := range cases {
		if _, err := New(c.o); err == nil || err.Error() != c.err {
			t.Errorf("New(%+v) = %v, want %q", c.o.API, err, c.err)
		}
	}
}

func TestTCPBearerToken(t *testing.T) {
	e := newEnv(t, true, 0)
	if _, err := e.unix.Add(context.Background(), e.spec(1, "in")); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		hdr    []string
		status int
		auth   string
		msg    string
	}{
		{"no token", nil, 401, `Bearer realm="xesp"`, "authorization: a bearer token is required on TCP"},
		{"wrong token", []string{"Authorization", "Bearer " + testToken + "x"}, 401, `Bearer realm="xesp", error="invalid_token"`, "authorization: invalid bearer token"},
		{"prefix of token", []string{"Authorization", "Bearer " + testToken[:10]}, 401, `Bearer realm="xesp", error="invalid_token"`, "authorization: invalid bearer token"},
		{"basic", []string{"Authorization", "Basic " + testToken}, 401, `Bearer realm="xesp", error="invalid_token"`, "authorization: invalid bearer token"},
		{"right token", []string{"Authorization", "Bearer " + testToken}, 200, "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st, h, b := e.do("GET", "/v1/sas/ue1-in", "", nil, append([]string{"tcp"}, c.hdr...)...)
			if st != c.status || h.Get("WWW-Authenticate") != c.auth {
				t.Fatalf("status %d WWW-Authenticate %q, want %d %q: %s", st, h.Get("WWW-Authenticate"), c.status, c.auth, b)
			}
			if c.msg != "" {
				assertError(t, b, c.msg)
			}
		})
	}
	// The client sends the token; without one it refuses to dial TCP.
	v, err := e.client(e.tcp, testToken).Get(context.Background(), "in:0x1001")
	if err != nil || v.Name != "ue1-in" {
		t.Fatalf("client over TCP: %+v %v", v, err)
	}
	if _, err := NewClient(e.tcp, ""); err == nil || !strings.Contains(err.Error(), "TCP needs a bearer token") {
		t.Fatalf("tokenless TCP client: %v", err)
	}
	_, err = e.client(e.tcp, "wrong-token-wrong-token").Stats(context.Background())
	if !IsStatus(err, 401) || err.Error() != "authorization: invalid bearer token" {
		t.Fatalf("wrong token through the client: %v", err)
	}
}

func assertError(t *testing.T, body []byte, want string) {
	t.Helper()
	var eb errorBody
	if err := json.Unmarshal(body, &eb); err != nil {
		t.Fatalf("error body is not JSON: %s", body)
	}
	if eb.Error != want {
		t.Fatalf("error %q\nwant  %q", eb.Error, want)
	}
}

func TestSALifecycle(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	c := e.unix

	in := e.spec(1, "in")
	v, err := c.Add(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	if v.Ref != "in:0x00001001" || v.Name != "ue1-in" || v.Direction != "in" || v.Proposal != "aes128gcm16" ||
		v.Binding != "192.0.2.2:30001" || v.State != "active" || v.Created.IsZero() || v.EncKey != "" ||
		v.Counters == nil || *v.Counters != (SACounters{Packets: 0x1001, Bytes: 0x1001 * 100, Drops: 3, Seq: 7}) {
		t.Fatalf("added view %+v counters %+v", v, v.Counters)
	}
	out := e.spec(1, "out")
	vo, err := c.Add(ctx, out)
	if err != nil {
		t.Fatal(err)
	}
	if vo.Ref != "out:0xc0000001@192.0.2.2:30001" || vo.Worker != v.Worker {
		t.Fatalf("outbound view %+v (pair must share worker %d)", vo, v.Worker)
	}

	// Location names the canonical ref.
	body, _ := json.Marshal(e.spec(2, "in"))
	st, h, b := e.do("POST", "/v1/sas", "application/json; charset=utf-8", body)
	if st != 201 || h.Get("Location") != "/v1/sas/in:0x00001002" || h.Get("Content-Type") != "application/json" {
		t.Fatalf("POST: %d %v %s", st, h, b)
	}

	// Every reference form reaches the same SA.
	for _, ref := range []string{"ue1-out", "out:0xc0000001", "OUT:3221225473", "out:0xc0000001@192.0.2.2:30001"} {
		g, err := c.Get(ctx, ref)
		if err != nil || g.Ref != vo.Ref {
			t.Errorf("get %s: %+v %v", ref, g.Ref, err)
		}
	}
	// IPv6 outbound and plain ESP: brackets are escaped on the wire.
	v6 := e.spec(3, "out")
	v6.Local, v6.Peer, v6.Inner = "2001:db8::20", "2001:db8::3", &sa.InnerSpec{Local: "fd00::/64", Peer: "fd00:1::3"}
	if _, err := c.Add(ctx, v6); err != nil {
		t.Fatal(err)
	}
	plain := e.spec(4, "out")
	plain.Encap = nil
	if _, err := c.Add(ctx, plain); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"out:0xc0000003@[2001:db8::3]:30003", "out:0xc0000004@192.0.2.5"} {
		g, err := c.Get(ctx, ref)
		if err != nil || g.Ref != ref {
			t.Errorf("get %s: %q %v", ref, g.Ref, err)
		}
	}
	st, _, b = e.do("GET", "/v1/sas/out:0xc0000003@%5B2001:db8::3%5D:30003", "", nil)
	if st != 200 || !strings.Contains(string(b), `"ref":"out:0xc0000003@[2001:db8::3]:30003"`) {
		t.Fatalf("escaped IPv6 ref: %d %s", st, b)
	}

	// An SA the data path does not hold yet has no counters.
	late := e.spec(0xee-0x1000+0x1000, "in")
	late.SPI = sa.SPIOf(0x20ee)
	if v, err := c.Add(ctx, late); err != nil || v.Counters != nil {
		t.Fatalf("late SA: %+v %v", v.Counters, err)
	}

	// PUT replaces the SA (new keys, a lifetime, a new name) and keeps
	// the runtime fields.
	upd := e.spec(1, "in")
	upd.Name = "ue1-in-v2"
	upd.Lifetime = &sa.LifetimeSpec{SoftSeconds: 3000, HardSeconds: 3600}
	u, err := c.Update(ctx, "ue1-in", upd)
	if err != nil {
		t.Fatal(err)
	}
	if u.Name != "ue1-in-v2" || u.Lifetime == nil || u.Lifetime.HardSeconds != 3600 || u.Worker != v.Worker || u.Index != v.Index || !u.Created.Equal(v.Created) {
		t.Fatalf("updated %+v, was %+v", u, v)
	}
	ent, _ := e.sad.GetName("ue1-in-v2")
	if got := ent.SA.WithKeys().EncKey; got != upd.EncKey {
		t.Fatalf("SAD holds enc key %s..., want the PUT's", got[:6])
	}
	if _, err := c.Get(ctx, "ue1-in"); !IsStatus(err, 404) || err.Error() != `sa "ue1-in": no such SA` {
		t.Fatalf("old name after rename: %v", err)
	}

	// DELETE answers with the last view, then the SA is gone.
	d, err := c.Delete(ctx, "in:0x1001")
	if err != nil || d.Name != "ue1-in-v2" || d.Counters == nil {
		t.Fatalf("delete: %+v %v", d, err)
	}
	if _, ok := e.sad.Get(sa.ID{Dir: sa.In, SPI: 0x1001}); ok {
		t.Fatal("SA still in the SAD after DELETE")
	}
	if _, err := c.Delete(ctx, "in:0x1001"); !IsStatus(err, 404) {
		t.Fatalf("second delete: %v", err)
	}

	// Stats: the data path's figures, SA counts from the SAD.
	s, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.SAs != (SACount{In: 2, Out: 3}) || s.In.Drops["replay"] != 4 || s.XDP["drop_no_sa"] != 9 || s.BindingChanges != 5 ||
		len(s.Workers) != 2 || s.Workers[0].SAs+s.Workers[1].SAs != 5 || s.Workers[1].DecapPackets != 400 {
		t.Fatalf("stats %+v", s)
	}
	// Health: SA counts from the SAD; 503 when the data path is not ok.
	e.dp.ok.Store(false)
	hl, err := c.Health(ctx)
	if err != nil || hl.OK || hl.SAs != (SACount{In: 2, Out: 3}) || hl.Problems[0] != "public: xdp program detached" {
		t.Fatalf("health %+v %v", hl, err)
	}
	if st, _, _ := e.do("GET", "/v1/health", "", nil); st != 503 {
		t.Fatalf("unhealthy status %d", st)
	}
}

func TestErrors(t *testing.T) {
	e := newEnv(t, false, 3)
	ctx := context.Background()
	for _, i := range []int{1, 5, 6} {
		if _, err := e.unix.Add(ctx, e.spec(i, "in")); err != nil {
			t.Fatal(err)
		}
	}
	// Two peers share outbound SPI 0xc0000001.
	o1, o2 := e.spec(1, "out"), e.spec(2, "out")
	o2.SPI = o1.SPI
	for _, s := range []sa.Spec{o1, o2} {
		if _, err := e.unix.Add(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	js := func(v any) []byte { b, _ := json.Marshal(v); return b }
	edit := func(f func(*sa.Spec)) []byte { s := e.spec(7, "in"); f(&s); return js(s) }
	good := js(e.spec(8, "in"))
	const ct = "application/json"

	cases := []struct {
		name         string
		method, path string
		ctype        string
		body         []byte
		status       int
		msg          string
		hdr          string // expected Allow header
	}{
		{"malformed json", "POST", "/v1/sas", ct, []byte(`{"spi": 4097,`), 400, "json: unexpected EOF", ""},
		{"syntax", "POST", "/v1/sas", ct, []byte("{\n\"spi\": }"), 400, "line 2: invalid character '}' looking for beginning of value", ""},
		{"unknown field", "POST", "/v1/sas", ct, []byte(strings.Replace(string(good), `"spi"`, `"enc-key":"00","spi"`, 1)), 400, `unknown field "enc-key"`, ""},
		{"empty body", "POST", "/v1/sas", ct, nil, 400, "empty document: no SA", ""},
		{"wrong content type", "POST", "/v1/sas", "text/yaml", good, 415, `content type: "text/yaml": send application/json`, ""},
		{"no content type", "POST", "/v1/sas", "", good, 415, `content type: "": send application/json`, ""},
		{"oversize", "POST", "/v1/sas", ct, []byte(`{"name": "` + strings.Repeat("a", MaxBody) + `"}`), 413, "body: larger than 65536 bytes", ""},
		{"short key", "POST", "/v1/sas", ct, edit(func(s *sa.Spec) { s.EncKey = s.EncKey[:32] }), 400, `sa "ue7-in": enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 16`, ""},
		{"bad spi", "POST", "/v1/sas", ct, edit(func(s *sa.Spec) { s.SPI = sa.SPIOf(17) }), 400, `sa "ue7-in": spi: 17 is in the reserved range 1..255 (RFC 4303 2.1)`, ""},
		{"two problems", "POST", "/v1/sas", ct, edit(func(s *sa.Spec) { s.Mode = "tunel"; s.Proposal = "aes-gcm" }), 400,
			"sa \"ue7-in\": mode: \"tunel\": must be tunnel or transport\nsa \"ue7-in\": proposal: " + mustProposalErr(t, "aes-gcm"), ""},
		{"key file refused", "POST", "/v1/sas", ct, edit(func(s *sa.Spec) { s.EncKey, s.EncKeyFile = "", "/etc/shadow" }), 400,
			`sa "ue7-in": enc_key_file: key files are not accepted here; give the key inline`, ""},
		{"list body", "POST", "/v1/sas", ct, []byte("[" + string(edit(func(*sa.Spec) {})) + "," + string(edit(func(s *sa.Spec) { s.Name, s.SPI = "x", sa.SPIOf(0x3000) })) + "]"), 400,
			"body: holds 2 SAs: send exactly one per request", ""},
		{"exists", "POST", "/v1/sas", ct, edit(func(s *sa.Spec) { s.SPI = sa.SPIOf(0x1001) }), 409,
			`sa "ue7-in": already exists: inbound SPI 0x00001001 is used by sa "ue1-in" (the XDP SA map is keyed by SPI alone)`, ""},
		{"name exists", "POST", "/v1/sas", ct, edit(func(s *sa.Spec) { s.Name = "ue1-out" }), 409,
			`sa "ue1-out": already exists: name is used by the out SA 0xc0000001`, ""},
		{"full", "POST", "/v1/sas", ct, good, 507, `sa "ue8-in": SA table full: 3 in SAs`, ""},
		{"not found name", "GET", "/v1/sas/nobody", "", nil, 404, `sa "nobody": no such SA`, ""},
		{"not found spi", "DELETE", "/v1/sas/in:0x9999", "", nil, 404, `in 0x00009999: no such SA`, ""},
		{"not found peer", "GET", "/v1/sas/out:0xc0000001@192.0.2.9:4500", "", nil, 404, `out 0xc0000001 to 192.0.2.9:4500: no such SA`, ""},
		{"ambiguous", "GET", "/v1/sas/out:0xc0000001", "", nil, 409, `out 0xc0000001: several outbound SAs have this SPI; name the peer`, ""},
		{"bad ref", "GET", "/v1/sas/sideways:0x1001", "", nil, 400, `ref "sideways:0x1001": "sideways" before ':' must be in or out`, ""},
		{"bad ref spi", "DELETE", "/v1/sas/in:0xzz", "", nil, 400, `ref "in:0xzz": spi: "0xzz" is not a 32-bit number (0x hex or decimal)`, ""},
		{"bad ref name", "GET", "/v1/sas/1abc", "", nil, 400, `ref "1abc": not an SA name (1..64 of A-Z a-z 0-9 . _ - starting with a letter), in:SPI or out:SPI[@peer[:port]]`, ""},
		{"put not found", "PUT", "/v1/sas/in:0x7777", ct, good, 404, `in 0x00007777: no such SA`, ""},
		{"put identity change", "PUT", "/v1/sas/ue1-in", ct, edit(func(s *sa.Spec) {}), 400,
			`sa "ue7-in": the body is in 0x00001007 but ue1-in names in 0x00001001: direction, spi and (outbound) peer and encap.peer_port are the identity and cannot change; delete and add instead`, ""},
		{"put invalid", "PUT", "/v1/sas/ue1-in", ct, []byte(`{"spi": 4097, "colour": "red"}`), 400,
			"unknown field \"colour\"\nsa 0x00001001: direction: required (in or out)\nsa 0x00001001: mode: required (tunnel or transport)\nsa 0x00001001: proposal: required (e.g. aes128gcm16)\nsa 0x00001001: local: required\nsa 0x00001001: peer: required", ""},
		{"put wrong type", "PUT", "/v1/sas/ue1-in", "application/x-www-form-urlencoded", good, 415, `content type: "application/x-www-form-urlencoded": send application/json`, ""},
		{"limit zero", "GET", "/v1/sas?limit=0", "", nil, 400, `limit: "0": want 1..10000`, ""},
		{"limit big", "GET", "/v1/sas?limit=10001", "", nil, 400, `limit: "10001": want 1..10000`, ""},
		{"cursor", "GET", "/v1/sas?cursor=abc", "", nil, 400, `cursor: "abc": use the next value of the previous page`, ""},
		{"method on collection", "DELETE", "/v1/sas", "", nil, 405, "method DELETE not allowed on /v1/sas: use GET, POST", "GET, POST"},
		{"method on SA", "POST", "/v1/sas/ue1-in", ct, good, 405, "method POST not allowed on /v1/sas/ue1-in: use GET, PUT, DELETE", "GET, PUT, DELETE"},
		{"method on stats", "PUT", "/v1/stats", ct, good, 405, "method PUT not allowed on /v1/stats: use GET", "GET"},
		{"no endpoint", "GET", "/v2/sas", "", nil, 404, "no endpoint /v2/sas (see /v1/health, /v1/stats, /v1/sas)", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st, h, b := e.do(c.method, c.path, c.ctype, c.body)
			if st != c.status {
				t.Fatalf("status %d, want %d: %s", st, c.status, b)
			}
			if h.Get("Content-Type") != "application/json" {
				t.Errorf("content type %q", h.Get("Content-Type"))
			}
			if h.Get("Allow") != c.hdr {
				t.Errorf("Allow %q, want %q", h.Get("Allow"), c.hdr)
			}
			assertError(t, b, c.msg)
			e.record(b)
		})
	}
	// Errors through the client carry the server's message and status.
	_, err := e.unix.Get(ctx, "out:0xc0000001")
	var ae *Error
	if !errors.As(err, &ae) || ae.Status != 409 || ae.Message != "out 0xc0000001: several outbound SAs have this SPI; name the peer" {
		t.Fatalf("client error %#v", err)
	}
	// Nothing bad got in.
	if in, out := e.sad.Len(); in != 3 || out != 2 {
		t.Fatalf("SAD holds %d/%d SAs after the bad requests", in, out)
	}
}

func mustProposalErr(t *testing.T, p string) string {
	_, err := (&sa.Spec{Proposal: p}).Parse(sa.Options{})
	for _, e := range sa.Flatten(err) {
		var fe *sa.FieldError
		if errors.As(e, &fe) && fe.Field == "proposal" {
			return fe.Reason
		}
	}
	t.Fatalf("no proposal error for %q", p)
	return ""
}

func TestPagination(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	const n = 2500
	// Loaded straight into the SAD: the paging is under test, and 2,500
	// POSTs would add nothing but time.
	sas := make([]sa.SA, 0, n)
	for i := range n {
		s, err := func() (sa.SA, error) { sp := e.spec(i, "in"); return sp.Parse(sa.Options{}) }()
		if err != nil {
			t.Fatal(err)
		}
		sas = append(sas, s)
	}
	if err := e.sad.AddAll(sas); err != nil {
		t.Fatal(err)
	}

	walk := func(limit int, during func(page int)) []string {
		var refs []string
		cursor := ""
		for page := 0; ; page++ {
			p, err := e.unix.List(ctx, cursor, limit)
			if err != nil {
				t.Fatal(err)
			}
			want := limit
			if want == 0 {
				want = DefaultLimit
			}
			if len(p.Items) > want {
				t.Fatalf("page of %d items, limit %d", len(p.Items), want)
			}
			for _, v := range p.Items {
				spi := mustSPI(t, v.SPI)
				if spi&0xff == 0xee && v.Counters != nil || spi&0xff != 0xee && (v.Counters == nil || v.Counters.Packets != uint64(spi)) {
					t.Fatalf("%s: counters %+v", v.Ref, v.Counters)
				}
				refs = append(refs, v.Ref)
			}
			if during != nil {
				during(page)
			}
			if p.Next == "" {
				return refs
			}
			cursor = p.Next
		}
	}
	for _, limit := range []int{0, 1000, 10000, 7} {
		refs := walk(limit, nil)
		if len(refs) != n {
			t.Fatalf("limit %d: %d SAs listed, want %d", limit, len(refs), n)
		}
		for i, r := range refs {
			if want := RefOf(sa.ID{Dir: sa.In, SPI: uint32(0x1000 + i)}); r != want {
				t.Fatalf("limit %d: item %d is %s, want %s (creation order)", limit, i, r, want)
			}
		}
	}
	// Deleting behind and ahead of the cursor while paging: every SA
	// that exists throughout is listed exactly once.
	deleted := map[string]bool{}
	refs := walk(100, func(page int) {
		if page == 3 {
			for _, i := range []int{5, 1500, 2499} {
				ref := RefOf(sa.ID{Dir: sa.In, SPI: uint32(0x1000 + i)})
				if _, err := e.unix.Delete(ctx, ref); err != nil {
					t.Fatal(err)
				}
				deleted[ref] = true
			}
		}
	})
	seen := map[string]bool{}
	for _, r := range refs {
		if seen[r] {
			t.Fatalf("%s listed twice", r)
		}
		seen[r] = true
	}
	for i := range n {
		r := RefOf(sa.ID{Dir: sa.In, SPI: uint32(0x1000 + i)})
		if !seen[r] && !deleted[r] {
			t.Fatalf("%s never listed", r)
		}
	}
	if len(refs) != n-2 { // 5 was listed before it was deleted
		t.Fatalf("listed %d, want %d", len(refs), n-2)
	}
	// Each also walks everything.
	count := 0
	if err := e.unix.Each(ctx, func(*SAView) error { count++; return nil }); err != nil || count != n-3 {
		t.Fatalf("Each: %d %v", count, err)
	}
}

func mustSPI(t *testing.T, v sa.SPIValue) uint32 {
	n, err := v.Value()
	if err != nil {
		t.Fatal(err)
	}
	return uint32(n)
}

func TestServeStopsOnCancel(t *testing.T) {
	e := newEnv(t, true, 0)
	// A request on an idle keep-alive connection must not hold up the
	// shutdown the cleanup performs; the cleanup asserts Serve returned
	// nil and the socket file is gone.
	if _, err := e.unix.Stats(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client(e.tcp, testToken).Stats(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Listen(); err == nil {
		t.Fatal("second Listen accepted")
	}
}

// The token requirement belongs to the TCP listener only.
func TestHandlerUnauthenticatedOnlyOnUnix(t *testing.T) {
	e := newEnv(t, true, 0)
	st, _, _ := e.do("GET", "/v1/stats", "", nil, "tcp")
	if st != http.StatusUnauthorized {
		t.Fatalf("TCP without token: %d", st)
	}
	st, _, _ = e.do("GET", "/v1/stats", "", nil)
	if st != http.StatusOK {
		t.Fatalf("unix: %d", st)
	}
}

// slowDP holds Stats until released, to catch a request in flight.
type slowDP struct {
	fakeDP
	entered, release chan struct{}
}

func (d *slowDP) Stats() Stats {
	close(d.entered)
	<-d.release
	return d.fakeDP.Stats()
}

func TestGracefulShutdown(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1})
	sock := filepath.Join(shortDir(t), "api.sock")
	dp := &slowDP{entered: make(chan struct{}), release: make(chan struct{})}
	s, err := New(Options{SAD: d, DataPath: dp, API: config.API{Unix: sock}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }() // Serve listens by itself
	c, err := NewClient(sock, "")
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		st  Stats
		err error
	}
	res := make(chan result, 1)
	go func() {
		var r result
		// The socket appears asynchronously; retry until it answers.
		for range 100 {
			if r.st, r.err = c.Stats(context.Background()); r.err == nil || !strings.Contains(r.err.Error(), "no such file") {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		res <- r
	}()
	select {
	case <-dp.entered:
	case r := <-res:
		t.Fatalf("request finished before reaching the data path: %v", r.err)
	}
	cancel()
	select {
	case err := <-done:
		t.Fatalf("Serve returned %v with a request in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	// New connections are refused while the old request finishes.
	c2, _ := NewClient(sock, "")
	if _, err := c2.Health(context.Background()); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("new request during shutdown: %v", err)
	}
	close(dp.release)
	if r := <-res; r.err != nil || r.st.In.Packets != 1000 {
		t.Fatalf("in-flight request: %+v %v", r.st, r.err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left: %v", err)
	}
	if _, err := c.Stats(context.Background()); err == nil {
		t.Fatal("served after shutdown")
	}
}

// A write is acknowledged only once the data path applied it; when it does
// not catch up the client hears 503 and why, and the change stays stored.
func TestWriteWaitsForDataPath(t *testing.T) {
	e := newEnv(t, false, 0)
	e.dp.stalled.Store(true)
	sp := e.spec(1, "in")
	_, err := e.unix.Add(context.Background(), sp)
	var ae *Error
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || !strings.Contains(ae.Message, "not yet in force") {
		t.Fatalf("add on a stalled data path: %v", err)
	}
	if in, _ := e.sad.Len(); in != 1 {
		t.Fatal("the SA was not stored")
	}
	e.dp.stalled.Store(false)
	if _, err := e.unix.Get(context.Background(), sp.Name); err != nil {
		t.Fatalf("get after the stall: %v", err)
	}
}
