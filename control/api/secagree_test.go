package api

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/control/secagree"
)

// The phone offers two mechanisms; the server prefers UDP-enc-tun with
// aes-cbc even though the phone gave it a lower q.
const testOffer = "ipsec-3gpp;q=0.9;alg=hmac-sha-1-96;ealg=null;mod=trans;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064, " +
	"ipsec-3gpp;q=0.5;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064"

func (e *env) secAgreeRequest(reg string) SecAgreeRequest {
	return SecAgreeRequest{
		Registration: reg, SecurityClient: testOffer, CK: e.key(16), IK: e.key(16),
		UE: "198.51.100.7:31000", UEInner: "192.168.1.11", PCSCF: "10.0.0.1", Local: "192.0.2.1",
		PortC: 5063, PortS: 5065,
	}
}

func TestSecAgreeCreateAndDelete(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	req := e.secAgreeRequest("reg1")
	resp, err := e.unix.SecAgree(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := secagree.Parse(resp.SecurityServer)
	if err != nil || len(ms) != 1 {
		t.Fatalf("security_server %q: %v", resp.SecurityServer, err)
	}
	m := ms[0]
	if m.Alg != "hmac-sha-1-96" || m.Ealg != "aes-cbc" || m.Mod != secagree.ModeUDPEncTun || m.Prot != "esp" ||
		m.PortC != 5063 || m.PortS != 5065 || m.SPIC < 256 || m.SPIS < 256 || m.SPIC == m.SPIS {
		t.Fatalf("security_server %q", resp.SecurityServer)
	}
	if !strings.Contains(resp.Chosen, "mod=UDP-enc-tun") || resp.Registration != "reg1" {
		t.Fatalf("response %+v", resp)
	}
	// The four SAs, with the right SPIs, in the SAD and in the answer.
	want := map[string]struct {
		dir string
		spi uint32
	}{"reg1.in-s": {"in", m.SPIS}, "reg1.in-c": {"in", m.SPIC}, "reg1.out-s": {"out", 2222}, "reg1.out-c": {"out", 1111}}
	if len(resp.SAs) != 4 {
		t.Fatalf("%d SAs in the answer", len(resp.SAs))
	}
	for _, v := range resp.SAs {
		w, ok := want[v.Name]
		if !ok || v.Direction != w.dir || mustSPI(t, v.SPI) != w.spi || v.Pair != "reg1" || v.Proposal != "aes128-sha1" ||
			v.Mode != "tunnel" || v.Encap == nil || *v.Encap.LocalPort != 4500 || *v.Encap.PeerPort != 31000 ||
			v.Binding != "198.51.100.7:31000" || v.Inner.Peer != "192.168.1.11/32" || v.Inner.Local != "10.0.0.1/32" ||
			v.Ports == nil || v.Ports.Local != map[string]uint16{"reg1.in-s": 5065, "reg1.in-c": 5063, "reg1.out-s": 5063, "reg1.out-c": 5065}[v.Name] {
			b, _ := json.Marshal(v)
			t.Errorf("SA %s", b)
		}
		got, err := e.unix.Get(ctx, v.Name)
		if err != nil || got.Ref != v.Ref {
			t.Errorf("get %s: %v", v.Name, err)
		}
	}
	// The inbound SAs carry the Annex I keys: compare through the SAD.
	ent, ok := e.sad.GetName("reg1.in-s")
	if !ok {
		t.Fatal("reg1.in-s not in the SAD")
	}
	if got := string(ent.SA.EncKey); got != string(mustHexBytes(t, req.CK)) {
		t.Error("enc key is not CK")
	}
	if got := string(ent.SA.AuthKey); got != string(append(mustHexBytes(t, req.IK), 0, 0, 0, 0)) {
		t.Error("auth key is not IK||0^32")
	}
	if in, out := e.sad.Len(); in != 2 || out != 2 {
		t.Fatalf("SAD holds %d/%d", in, out)
	}

	// A second registration gets other SPIs; the first is untouched by
	// deleting the second.
	req2 := e.secAgreeRequest("reg2")
	req2.UE = "198.51.100.7:31001"
	resp2, err := e.unix.SecAgree(ctx, req2)
	if err != nil {
		t.Fatal(err)
	}
	if resp2.SecurityServer == resp.SecurityServer {
		t.Fatal("two registrations got the same SPIs")
	}
	del, err := e.unix.DeleteRegistration(ctx, "reg2")
	if err != nil || len(del.SAs) != 4 {
		t.Fatalf("delete reg2: %+v %v", del, err)
	}
	if in, out := e.sad.Len(); in != 2 || out != 2 {
		t.Fatalf("after deleting reg2 the SAD holds %d/%d", in, out)
	}
	del, err = e.unix.DeleteRegistration(ctx, "reg1")
	if err != nil || len(del.SAs) != 4 || del.Registration != "reg1" {
		t.Fatalf("delete reg1: %+v %v", del, err)
	}
	if in, out := e.sad.Len(); in != 0 || out != 0 {
		t.Fatalf("after deleting reg1 the SAD holds %d/%d", in, out)
	}
	if _, err := e.unix.DeleteRegistration(ctx, "reg1"); !IsStatus(err, http.StatusNotFound) || !strings.Contains(err.Error(), `registration "reg1": no SAs`) {
		t.Fatalf("second delete: %v", err)
	}
}

func mustHexBytes(t *testing.T, s string) []byte {
	t.Helper()
	b := make([]byte, len(s)/2)
	for i := range b {
		var x byte
		for _, c := range s[2*i : 2*i+2] {
			x <<= 4
			switch {
			case c >= '0' && c <= '9':
				x |= byte(c - '0')
			case c >= 'a' && c <= 'f':
				x |= byte(c-'a') + 10
			default:
				t.Fatalf("not hex: %q", s)
			}
		}
		b[i] = x
	}
	return b
}

// Bad requests: 4xx with a message naming the field; nothing installed.
func TestSecAgreeBadRequests(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	mut := func(f func(r *SecAgreeRequest)) SecAgreeRequest {
		r := e.secAgreeRequest("reg1")
		f(&r)
		return r
	}
	cases := []struct {
		name string
		req  SecAgreeRequest
		want []string
	}{
		{"nothing", SecAgreeRequest{}, []string{"registration: required", "security_client: required", "ck: required", "ik: required", "ue: required", "local: required", "port_c: required", "port_s: required"}},
		{"registration", mut(func(r *SecAgreeRequest) { r.Registration = "1x" }), []string{`registration: "1x": use 1..58`}},
		{"long registration", mut(func(r *SecAgreeRequest) { r.Registration = "r" + strings.Repeat("x", 58) }), []string{"registration: "}},
		{"header", mut(func(r *SecAgreeRequest) {
			r.SecurityClient = "ipsec-3gpp;alg=hmac-sha-1-96;spi-c=x;spi-s=1;port-c=1;port-s=2"
		}),
			[]string{`security_client: mechanism 1 (ipsec-3gpp): spi-c: "x" is not a decimal number`}},
		{"nothing acceptable", mut(func(r *SecAgreeRequest) {
			r.SecurityClient = "ipsec-3gpp;alg=hmac-md5-96;ealg=des-ede3-cbc;mod=UDP-enc-tun;spi-c=1000;spi-s=1001;port-c=1;port-s=2"
		}), []string{"security-client: no acceptable ipsec-3gpp mechanism: mechanism 1: ealg=des-ede3-cbc is not accepted"}},
		{"ck hex", mut(func(r *SecAgreeRequest) { r.CK = "zz" }), []string{"ck: not hex"}},
		{"ik length", mut(func(r *SecAgreeRequest) { r.IK = "0011" }), []string{"ik: need 16 bytes (IMS AKA), got 2"}},
		{"ue", mut(func(r *SecAgreeRequest) { r.UE = "198.51.100.7" }), []string{`ue: "198.51.100.7": want address:port`}},
		{"ue port 0", mut(func(r *SecAgreeRequest) { r.UE = "198.51.100.7:0" }), []string{"ue: "}},
		{"inner missing for a tunnel mode", mut(func(r *SecAgreeRequest) { r.UEInner, r.PCSCF = "", "" }), []string{"ue_inner: required", "pcscf: required"}},
		{"local", mut(func(r *SecAgreeRequest) { r.Local = "gw" }), []string{`local: "gw" is not an IP address`}},
		{"ports equal", mut(func(r *SecAgreeRequest) { r.PortS = r.PortC }), []string{"port_s: 5063: must differ from port_c"}},
		{"one spi", mut(func(r *SecAgreeRequest) { r.SPIC = 5000 }), []string{"spi_c, spi_s: give both, different, or neither"}},
		{"reserved spi", mut(func(r *SecAgreeRequest) { r.SPIC, r.SPIS = 5, 6 }), []string{`sa "reg1.in-s": spi: 6 is in the reserved range`}},
		{"phone's reserved spi", mut(func(r *SecAgreeRequest) {
			r.SecurityClient = "ipsec-3gpp;alg=hmac-sha-1-96;mod=UDP-enc-tun;spi-c=0;spi-s=2222;port-c=1;port-s=2"
		}), []string{`sa "reg1.out-c": spi: 0 is reserved`}},
		{"families", mut(func(r *SecAgreeRequest) { r.UE = "[2001:db8::7]:31000" }), []string{"different address families"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.unix.SecAgree(ctx, c.req)
			if !IsStatus(err, http.StatusBadRequest) {
				t.Fatalf("got %v, want 400", err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nlacks %q", err, w)
				}
			}
		})
	}
	// Transport mode (mod=trans, also an absent mod) with a core_pool:
	// the P-CSCF's address is required (the phone's segments go there);
	// with it, four plain-ESP transport SAs with inner.local = the
	// P-CSCF and one allocated core address (docs/addressing.md).
	r := e.secAgreeRequest("reg-trans")
	r.SecurityClient = "ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064"
	r.UEInner, r.PCSCF = "", ""
	if _, err := e.unix.SecAgree(ctx, r); !IsStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), "pcscf: required") {
		t.Fatalf("transport without pcscf: %v", err)
	}
	if _, ok := e.sad.GetName("reg-trans.in-c"); ok {
		t.Fatal("refused transport registration left SAs behind")
	}
	r.PCSCF = "10.0.0.1"
	resp, err := e.unix.SecAgree(ctx, r)
	if err != nil || !strings.Contains(resp.SecurityServer, "mod=trans") || len(resp.SAs) != 4 || resp.Core == "" {
		t.Fatalf("transport: %+v %v", resp, err)
	}
	for _, v := range resp.SAs {
		if v.Mode != "transport" || v.Encap != nil || v.Inner == nil || v.Inner.Local != "10.0.0.1/32" || v.Inner.Core != resp.Core || v.Inner.Peer != "" {
			t.Fatalf("%s: mode %s encap %v inner %+v (core %s)", v.Name, v.Mode, v.Encap, v.Inner, resp.Core)
		}
	}
	if _, err := e.unix.DeleteRegistration(ctx, "reg-trans"); err != nil {
		t.Fatal(err)
	}
	// A phone that offers only hmac-md5-96 is served (RFC 2403 SAs).
	r = e.secAgreeRequest("reg-md5")
	r.SecurityClient = "ipsec-3gpp;alg=hmac-md5-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064"
	if resp, err := e.unix.SecAgree(ctx, r); err != nil || !strings.Contains(resp.SecurityServer, "ealg=aes-cbc;alg=hmac-md5-96") || len(resp.SAs) != 4 || resp.SAs[0].Proposal != "aes128-md5" {
		t.Fatalf("md5: %+v %v", resp, err)
	}
	if _, err := e.unix.DeleteRegistration(ctx, "reg-md5"); err != nil {
		t.Fatal(err)
	}

	raw := []struct {
		name, method, path, ctype, body string
		status                          int
		msg                             string
	}{
		{"unknown field", "POST", "/v1/secagree", "application/json", `{"registration":"r","sec_client":"x"}`, 400, `body: unknown field "sec_client"`},
		{"type names the JSON field", "POST", "/v1/secagree", "application/json", `{"registration":"r","spi_c":"x"}`, 400, `body: spi_c: a JSON string where an integer from 0 to 4294967295 is wanted`},
		{"not json", "POST", "/v1/secagree", "application/json", `{`, 400, "body: unexpected EOF"},
		{"two objects", "POST", "/v1/secagree", "application/json", `{} {}`, 400, "body: data after the JSON object"},
		{"content type", "POST", "/v1/secagree", "text/plain", `{}`, 415, `content type: "text/plain": send application/json`},
		{"too big", "POST", "/v1/secagree", "application/json", `{"registration":"` + strings.Repeat("a", MaxBody) + `"}`, 413, "body: larger than 65536 bytes"},
		{"method", "GET", "/v1/secagree", "", ``, 405, "method GET not allowed on /v1/secagree: use POST"},
		{"delete bad name", "DELETE", "/v1/secagree/9bad", "", ``, 400, `registration: "9bad": use 1..58 of A-Z a-z 0-9 . _ - starting with a letter`},
		{"delete unknown", "DELETE", "/v1/secagree/nobody", "", ``, 404, `registration "nobody": no SAs`},
	}
	for _, c := range raw {
		st, _, b := e.do(c.method, c.path, c.ctype, []byte(c.body))
		if st != c.status {
			t.Errorf("%s: status %d, want %d: %s", c.name, st, c.status, b)
			continue
		}
		assertError(t, b, c.msg)
	}
	if in, out := e.sad.Len(); in != 0 || out != 0 {
		t.Fatalf("bad requests left %d/%d SAs", in, out)
	}
}

// A conflict halfway (the phone's outbound SPI to the same NAT mapping
// exists already) rolls back what was added: all four or none.
func TestSecAgreeAllOrNothing(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	if _, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg1")); err != nil {
		t.Fatal(err)
	}
	// The same name again: 409 before anything is derived.
	if _, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg1")); !IsStatus(err, http.StatusConflict) || !strings.Contains(err.Error(), `registration "reg1": exists already`) {
		t.Fatalf("same name: %v", err)
	}
	// Same phone SPIs, same observed address and port: out-s collides.
	_, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg2"))
	if !IsStatus(err, http.StatusConflict) || !strings.Contains(err.Error(), `sa "reg2.out-s"`) {
		t.Fatalf("got %v, want 409 naming reg2.out-s", err)
	}
	if in, out := e.sad.Len(); in != 2 || out != 2 {
		t.Fatalf("SAD holds %d/%d after the failed registration, want reg1's 2/2", in, out)
	}
	if _, ok := e.sad.GetName("reg2.in-s"); ok {
		t.Fatal("reg2.in-s left behind")
	}
	// SPIs the P-CSCF chose itself that are taken: 409, nothing added.
	ent, _ := e.sad.GetName("reg1.in-s")
	r := e.secAgreeRequest("reg3")
	r.UE = "198.51.100.8:4500"
	r.SPIC, r.SPIS = 7777, ent.SA.SPI
	if _, err := e.unix.SecAgree(ctx, r); !IsStatus(err, http.StatusConflict) {
		t.Fatalf("taken SPI: %v", err)
	}
	if in, out := e.sad.Len(); in != 2 || out != 2 {
		t.Fatalf("SAD holds %d/%d", in, out)
	}
	// The same request with free SPIs works and uses them.
	r.SPIS = 7778
	resp, err := e.unix.SecAgree(ctx, r)
	if err != nil || !strings.Contains(resp.SecurityServer, "spi-c=7777;spi-s=7778") {
		t.Fatalf("%+v %v", resp, err)
	}
	if _, ok := e.sad.Get(sa.ID{Dir: sa.In, SPI: 7778}); !ok {
		t.Fatal("in SA 7778 missing")
	}
}

// Deleting a registration removes the inbound SAs at once and the
// outbound ones only after the grace, so a final response already steered
// to an outbound SA is still sealed.
func TestSecAgreeDeleteGrace(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	if _, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg1")); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	var del RegistrationDeleted
	go func() {
		var err error
		del, err = e.unix.DeleteRegistrationGrace(ctx, "reg1", 2*time.Second)
		done <- err
	}()
	deadline := time.Now().Add(2 * time.Second)
	for {
		if in, _ := e.sad.Len(); in == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("inbound SAs not removed at once")
		}
		time.Sleep(time.Millisecond)
	}
	if _, out := e.sad.Len(); out != 2 {
		t.Fatalf("%d outbound SAs during the grace, want 2", out)
	}
	select {
	case err := <-done:
		t.Fatalf("delete answered during the grace: %v", err)
	default:
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if in, out := e.sad.Len(); in != 0 || out != 0 || len(del.SAs) != 4 || del.SAs[0].Direction != "in" || del.SAs[3].Direction != "out" {
		t.Fatalf("after the delete: SAD %d/%d, answer %+v", in, out, del)
	}
	// grace=0 removes everything at once; bad graces are 400.
	if _, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg2")); err != nil {
		t.Fatal(err)
	}
	for _, g := range []string{"x", "-1s", "11s"} {
		st, _, b := e.do("DELETE", "/v1/secagree/reg2?grace="+g, "", nil)
		if st != 400 {
			t.Fatalf("grace=%s: %d %s", g, st, b)
		}
		assertError(t, b, `grace: "`+g+`": want a duration 0s..10s (e.g. 200ms)`)
	}
	if del, err := e.unix.DeleteRegistrationGrace(ctx, "reg2", 0); err != nil || len(del.SAs) != 4 {
		t.Fatalf("grace 0: %+v %v", del, err)
	}
}

// FuzzSecAgreeRequest: arbitrary bodies to POST /v1/secagree never panic
// and never get a 5xx: 201 with four SAs, or a 4xx with a JSON error, and
// a failed request leaves nothing behind.
func FuzzSecAgreeRequest(f *testing.F) {
	f.Add([]byte(`{"registration":"r1","security_client":"ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064","ck":"000102030405060708090a0b0c0d0e0f","ik":"000102030405060708090a0b0c0d0e0f","ue":"198.51.100.7:31000","ue_inner":"192.168.1.11","pcscf":"10.0.0.1","local":"192.0.2.1","port_c":5063,"port_s":5065}`))
	f.Add([]byte(`{"registration":"r1","security_client":"ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064","ck":"00","ik":"000102030405060708090a0b0c0d0e0f","ue":"[2001:db8::1]:1","local":"2001:db8::2","port_c":1,"port_s":2,"spi_c":300,"spi_s":301}`))
	f.Add([]byte(`{"registration":"r1","security_client":"ipsec-3gpp;alg=hmac-sha-1-96;spi-c=0;spi-s=1;port-c=1;port-s=1"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		d, err := sad.New(sad.Options{Workers: 2, MaxSAs: 3, LogSize: 16})
		if err != nil {
			t.Fatal(err)
		}
		s, err := New(Options{SAD: d, API: config.API{Unix: "/nonexistent/api.sock"}})
		if err != nil {
			t.Fatal(err)
		}
		req := httptest.NewRequest("POST", "/v1/secagree", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, req)
		in, out := d.Len()
		if rec.Code == http.StatusCreated {
			if in != 2 || out != 2 {
				t.Fatalf("201 with %d/%d SAs", in, out)
			}
			return
		}
		if rec.Code < 400 || rec.Code > 499 {
			t.Fatalf("status %d for %q: %s", rec.Code, body, rec.Body)
		}
		if in != 0 || out != 0 {
			t.Fatalf("status %d left %d/%d SAs", rec.Code, in, out)
		}
		var eb errorBody
		if err := json.Unmarshal(rec.Body.Bytes(), &eb); err != nil || eb.Error == "" {
			t.Fatalf("status %d without a JSON error: %q", rec.Code, rec.Body)
		}
	})
}

// A re-authentication (TS 33.203 7.4) through "replaces": the new set
// joins the old set's pair group (one worker, one NAT binding), inherits
// its binding when ue is omitted, must take a new port_c; GET shows a
// registration's SAs; the POST form of the delete (Kamailio 5.6 sends only
// GET and POST) removes a set, and the other stays.
func TestSecAgreeReplacesGetAndPostDelete(t *testing.T) {
	e := newEnv(t, true, 0)
	ctx := context.Background()
	oldResp, err := e.unix.SecAgree(ctx, e.secAgreeRequest("old"))
	if err != nil {
		t.Fatal(err)
	}
	if oldResp.Core == "" {
		t.Fatal("no core address from the pool")
	}
	// A P-CSCF sees a protected re-REGISTER from the core address: the
	// new set inherits the NAT binding, inner addresses and core.
	req := e.secAgreeRequest("new")
	req.Replaces, req.UE, req.UEInner, req.PCSCF = "old", "", "", ""
	req.SecurityClient = strings.ReplaceAll(testOffer, "spi-c=1111;spi-s=2222;port-c=5062", "spi-c=3333;spi-s=4444;port-c=5066")
	if _, err := e.unix.SecAgree(ctx, req); err == nil || !strings.Contains(err.Error(), "port_c: 5063") {
		t.Fatalf("same port_c as the replaced set: %v", err)
	}
	req.PortC = 5067
	resp, err := e.unix.SecAgree(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Core != oldResp.Core {
		t.Fatalf("re-authentication moved the phone's core address %s to %s", oldResp.Core, resp.Core)
	}
	old, _ := e.sad.GetName("old.out-c")
	for _, v := range resp.SAs {
		ent, _ := e.sad.GetName(v.Name)
		if v.Pair != old.SA.Pair || v.Inner == nil || v.Inner.Peer != "192.168.1.11/32" || v.Inner.Local != "10.0.0.1/32" || ent.Worker != old.Worker || v.Binding != "198.51.100.7:31000" {
			t.Errorf("%s: pair %q worker %d binding %s; want the old set's group (worker %d) and binding", v.Name, v.Pair, ent.Worker, v.Binding, old.Worker)
		}
	}
	req.Registration, req.Replaces, req.PortC = "other", "gone", 5063
	if _, err := e.unix.SecAgree(ctx, req); err == nil || !strings.Contains(err.Error(), `replaces: registration "gone"`) {
		t.Fatalf("replacing a registration without SAs: %v", err)
	}

	got, err := e.unix.Registration(ctx, "new")
	if err != nil || len(got.SAs) != 4 || got.SAs[0].Name != "new.in-s" || got.SAs[3].Name != "new.out-c" {
		t.Fatalf("GET new: %+v %v", got, err)
	}
	// Over TCP with the token, the way the Kamailio example calls it.
	st, _, body := e.do("POST", "/v1/secagree/old/delete", "application/json", []byte("{}"), "tcp", "Authorization", "Bearer "+testToken)
	var del RegistrationDeleted
	if st != http.StatusOK || json.Unmarshal(body, &del) != nil || len(del.SAs) != 4 {
		t.Fatalf("POST delete: %d %s", st, body)
	}
	if st, _, body := e.do("GET", "/v1/secagree/old", "", nil); st != http.StatusNotFound || !strings.Contains(string(body), `no SAs`) {
		t.Fatalf("GET after delete: %d %s", st, body)
	}
	if st, _, _ := e.do("POST", "/v1/secagree/old/delete", "application/json", []byte("{}")); st != http.StatusNotFound {
		t.Fatalf("second POST delete: %d", st)
	}
	if st, hdr, _ := e.do("PUT", "/v1/secagree/new", "application/json", []byte("{}")); st != http.StatusMethodNotAllowed || hdr.Get("Allow") != "GET, DELETE" {
		t.Fatalf("PUT registration: %d %v", st, hdr)
	}
	if in, out := e.sad.Len(); in != 2 || out != 2 {
		t.Fatalf("SAD holds %d/%d after deleting the old set, want the new set's 2/2", in, out)
	}
}

// Without a core_pool a registration has no core address, which
// transport mode needs: sec-agree does not choose mod=trans and tells a
// phone offering only it why; a plain POST of a transport SA without
// inner.core is refused naming the field and the fix.
func TestTransportWithoutCorePool(t *testing.T) {
	d, err := sad.New(sad.Options{Workers: 1, LogSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Options{SAD: d, API: config.API{Unix: "/nonexistent/api.sock"}})
	if err != nil {
		t.Fatal(err)
	}
	post := func(path, body string) *httptest.ResponseRecorder {
		req := httptest.NewRequest("POST", path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, req)
		return rec
	}
	key := strings.Repeat("ab", 16)
	rec := post("/v1/secagree", `{"registration":"r1","security_client":"ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064","ck":"`+key+`","ik":"`+key+`","ue":"198.51.100.7:5062","pcscf":"10.0.0.1","local":"192.0.2.1","port_c":5063,"port_s":5065}`)
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "mod=trans is not accepted: transport-mode SAs need a core address for each phone and this gateway has no core_pool") {
		t.Fatalf("sec-agree: %d %s", rec.Code, rec.Body)
	}
	rec = post("/v1/sas", `{"name":"t-in","spi":4097,"direction":"in","mode":"transport","proposal":"null-sha1","auth_key":"`+strings.Repeat("ab", 20)+`","local":"192.0.2.1","peer":"192.0.2.2","inner":{"local":"10.0.0.1"}}`)
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), `sa \"t-in\": inner.core: invalid SA: a transport-mode SA needs the phone's core address: name one in inner.core or configure core_pool to allocate it`) {
		t.Fatalf("POST transport SA: %d %s", rec.Code, rec.Body)
	}
	rec = post("/v1/sas", `{"name":"t-in","spi":4097,"direction":"in","mode":"transport","proposal":"null-sha1","auth_key":"`+strings.Repeat("ab", 20)+`","local":"192.0.2.1","peer":"192.0.2.2","inner":{"local":"10.0.0.1","core":"100.64.0.9"}}`)
	if rec.Code != http.StatusCreated {
		t.Fatalf("POST transport SA with inner.core: %d %s", rec.Code, rec.Body)
	}
}
