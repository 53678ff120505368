package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
)

// Issue 18: the API applies the gateway's SA checks (config.CheckSA, the
// same as the config file's and etcd's SAs get) to every SA it adds,
// updates, rekeys in or derives for sec-agree: a 400 naming the field,
// and nothing changes.
func TestAPIAppliesGatewaySAChecks(t *testing.T) {
	gw := &config.Config{NATTPort: 4500}
	gw.Public.Addrs = []netip.Addr{netip.MustParseAddr("198.51.100.20"), netip.MustParseAddr("192.0.2.1")}
	e := newEnvChecked(t, false, 0, gw.CheckSA)
	ctx := context.Background()

	type mutation struct {
		name, want string
		mut        func(*sa.Spec)
	}
	port := func(p uint16) *uint16 { return &p }
	cases := []mutation{
		{"foreign outbound local", `local: 203.0.113.99 is not one of public.addresses`, func(s *sa.Spec) { s.Direction = "out"; s.Local = "203.0.113.99" }},
		{"loopback local", `local: 127.0.0.1 is not one of public.addresses`, func(s *sa.Spec) { s.Direction = "out"; s.Local = "127.0.0.1" }},
		{"IPv6 local on an IPv4-only gateway", `local: 2001:db8::1: the gateway has no IPv6 public address`, func(s *sa.Spec) {
			s.Local, s.Peer = "2001:db8::1", "2001:db8::10"
			s.Inner = &sa.InnerSpec{Local: "2001:db8:1::/64", Peer: "2001:db8:2::1"}
		}},
		{"encap local port", `encap.local_port: 4501 differs from natt_port 4500`, func(s *sa.Spec) { s.Encap.LocalPort = port(4501) }},
	}
	for _, c := range cases {
		sp := e.spec(1, "in")
		c.mut(&sp)
		_, err := e.unix.Add(ctx, sp)
		if !IsStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("add with %s: %v, want 400 with %q", c.name, err, c.want)
		}
	}
	if in, out := e.sad.Len(); in != 0 || out != 0 {
		t.Fatalf("refused adds changed the SAD: %d in, %d out", in, out)
	}

	// Update and rekey take the same checks.
	good := e.spec(1, "in")
	if _, err := e.unix.Add(ctx, good); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.Encap = &sa.EncapSpec{LocalPort: port(4501), PeerPort: good.Encap.PeerPort}
	code, _, body := e.do("PUT", "/v1/sas/"+good.Name, "application/json", mustJSON(t, bad))
	if code != http.StatusBadRequest || !strings.Contains(string(body), "encap.local_port") {
		t.Errorf("update with encap.local_port 4501: %d %s", code, body)
	}
	repl := e.spec(2, "in")
	repl.Local = "203.0.113.99"
	if _, err := e.unix.Rekey(ctx, []string{good.Name}, []sa.Spec{repl}, time.Second); !IsStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), "new[0]") || !strings.Contains(err.Error(), "local: 203.0.113.99") {
		t.Errorf("rekey to a foreign local: %v, want 400 naming new[0] local", err)
	}

	// Sec-agree: the request's local must be the gateway's.
	req := e.secAgreeRequest("reg1")
	req.Local = "203.0.113.7"
	if _, err := e.unix.SecAgree(ctx, req); !IsStatus(err, http.StatusBadRequest) || !strings.HasPrefix(err.Error(), "local: 203.0.113.7 is not one of public.addresses") {
		t.Errorf("sec-agree with a foreign local: %v, want 400 naming local", err)
	}
	if in, out := e.sad.Len(); in != 1 || out != 0 {
		t.Fatalf("refused changes changed the SAD: %d in, %d out", in, out)
	}
	// And what passes the checks still works.
	if _, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg2")); err != nil {
		t.Fatalf("sec-agree with the gateway's local: %v", err)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
