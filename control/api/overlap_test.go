package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

// Two outbound SAs whose selectors overlap: the second is refused with
// 409 and a JSON error naming both SAs and the shared selector; the SAD
// keeps only the first.
func TestAddOverlapRefused(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	a, b := e.spec(1, "out"), e.spec(2, "out")
	a.Name, b.Name = "a-out", "b-out"
	// A prefix as inner.peer: no core address is allocated for it.
	a.Inner.Peer, b.Inner.Peer = "192.168.1.0/24", "192.168.1.0/25"
	if _, err := e.unix.Add(ctx, a); err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(b)
	status, _, resp := e.do("POST", "/v1/sas", "application/json", body)
	var eb struct{ Error string }
	if err := json.Unmarshal(resp, &eb); err != nil {
		t.Fatalf("not JSON: %s", resp)
	}
	if status != http.StatusConflict || !strings.Contains(eb.Error, `sa "b-out": selectors overlap sa "a-out"`) ||
		!strings.Contains(eb.Error, "destination 192.168.1.0/25 from 10.0.0.0/24, local port any, peer port any") {
		t.Fatalf("%d %s", status, resp)
	}
	if _, ok := e.sad.GetName("b-out"); ok {
		t.Fatal("refused SA in the SAD")
	}
	// Distinct port selectors make the same prefixes unambiguous.
	a2, b2 := e.spec(3, "out"), e.spec(4, "out")
	a2.Inner.Peer, b2.Inner.Peer = "192.168.2.0/24", "192.168.2.0/24"
	a2.Ports, b2.Ports = &sa.PortsSpec{Peer: 5060}, &sa.PortsSpec{Peer: 5062}
	for _, s := range []sa.Spec{a2, b2} {
		if _, err := e.unix.Add(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	// An update that would create an overlap is refused too.
	b2.Ports.Peer = 5060
	if _, err := e.unix.Update(ctx, b2.Name, b2); !IsStatus(err, http.StatusConflict) {
		t.Fatalf("overlapping update: %v", err)
	}
}

// With core_pool, tunnel SAs with one inner address and no inner.core get
// one: both SAs of a pair (same peer, encap port, inner peer) the same,
// and two phones sharing inner address 192.168.1.10 different ones.
func TestAddAllocatesCore(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	core := map[string]string{}
	for i, peer := range []string{"203.0.113.7", "203.0.113.8"} {
		for _, dir := range []string{"in", "out"} {
			s := e.spec(10+i, dir)
			s.Peer, s.Inner.Peer = peer, "192.168.1.10"
			v, err := e.unix.Add(ctx, s)
			if err != nil {
				t.Fatal(err)
			}
			if v.Inner == nil || v.Inner.Core == "" {
				t.Fatalf("%s: no core address in the view", s.Name)
			}
			core[s.Name] = v.Inner.Core
		}
	}
	if core["ue10-in"] != core["ue10-out"] || core["ue11-in"] != core["ue11-out"] || core["ue10-out"] == core["ue11-out"] {
		t.Fatalf("cores %v", core)
	}
	if !strings.HasPrefix(core["ue10-in"], "100.") {
		t.Fatalf("core %s not from the pool", core["ue10-in"])
	}
	// A PUT of the original spec (no inner.core) keeps the address.
	s := e.spec(10, "out")
	s.Peer, s.Inner.Peer = "203.0.113.7", "192.168.1.10"
	s.Lifetime = &sa.LifetimeSpec{HardPackets: 1000}
	v, err := e.unix.Update(ctx, s.Name, s)
	if err != nil || v.Inner == nil || v.Inner.Core != core["ue10-out"] {
		t.Fatalf("update: %+v %v", v.Inner, err)
	}
}

// Sec-agree: one core address per registration (all four SAs), returned
// in the response; a re-registration of the same phone keeps it; two
// phones with the same inner address and ports get different ones; a
// re-registration whose ports would overlap the current set gets a fresh
// one instead of an ambiguous pair.
func TestSecAgreeCores(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	r1, err := e.unix.SecAgree(ctx, e.secAgreeRequest("reg1"))
	if err != nil {
		t.Fatal(err)
	}
	if r1.Core == "" {
		t.Fatal("no core in the response")
	}
	for _, v := range r1.SAs {
		if v.Inner == nil || v.Inner.Core != r1.Core {
			t.Fatalf("%s: core %+v, want %s", v.Name, v.Inner, r1.Core)
		}
	}
	offer := func(spiC, spiS, portC int) string {
		return fmt.Sprintf("ipsec-3gpp;q=0.5;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=%d;spi-s=%d;port-c=%d;port-s=5064", spiC, spiS, portC)
	}
	// Re-registration (TS 33.203 7.4): same phone, new SPIs, new UE
	// client port, new P-CSCF client port.
	req := e.secAgreeRequest("reg2")
	req.SecurityClient = offer(3333, 4444, 5066)
	req.PortC = 5073
	r2, err := e.unix.SecAgree(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Core != r1.Core {
		t.Fatalf("re-registration core %s, want %s", r2.Core, r1.Core)
	}
	w1, _ := e.sad.GetName("reg1.out-s")
	w2, _ := e.sad.GetName("reg2.out-s")
	if w1.Worker != w2.Worker {
		t.Fatalf("the phone's sets on workers %d and %d", w1.Worker, w2.Worker)
	}
	// Another phone behind another NAPT, same inner address, same ports.
	req = e.secAgreeRequest("other")
	req.UE = "198.51.100.8:31000"
	r3, err := e.unix.SecAgree(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if r3.Core == r1.Core || r3.Core == "" {
		t.Fatalf("second phone core %q, first %q", r3.Core, r1.Core)
	}
	// Same phone again with reg2's ports: its core would make reg2's and
	// reg3's SAs ambiguous, so reg3 gets a fresh core address.
	req = e.secAgreeRequest("reg3")
	req.SecurityClient = offer(5555, 6666, 5066)
	req.PortC = 5073
	r4, err := e.unix.SecAgree(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if r4.Core == r1.Core || r4.Core == r3.Core {
		t.Fatalf("ambiguous allocation: reg3 core %s (reg1/2 %s, other %s)", r4.Core, r1.Core, r3.Core)
	}
}
