package lab

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/internal/netns"
)

func startLab(t *testing.T, o Options) *Lab {
	t.Helper()
	netns.RequireRoot(t)
	o.Prefix = netns.UniqueName("lab") + "-"
	l, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kamailio log:\n%s", l.KamailioLog())
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
	return l
}

// register has phone p REGISTER and then send OPTIONS with sipsak and
// checks both answers are kamailio's 200 for this phone's own Call-ID.
func register(t *testing.T, l *Lab, p *Phone, tag string) {
	t.Helper()
	for i, method := range []string{"REGISTER", "OPTIONS"} {
		callID := fmt.Sprintf("%s-ue%d-%s@xesp", tag, p.N, strings.ToLower(method))
		r, err := l.Sipsak(context.Background(), p, method, callID, i+1)
		if err != nil {
			t.Fatalf("ue%d %s: %v", p.N, method, err)
		}
		if !r.OK() || r.CallID != callID || r.CSeq != fmt.Sprintf("%d %s", i+1, method) {
			t.Fatalf("ue%d %s: got %q Call-ID %q CSeq %q, want 200 for Call-ID %q:\n%s", p.N, method, r.Status, r.CallID, r.CSeq, callID, r.Raw)
		}
		if !strings.Contains(r.Raw, "Server: kamailio") {
			t.Fatalf("ue%d %s: reply not from kamailio:\n%s", p.N, method, r.Raw)
		}
	}
}

// Three phones behind one NAPT, each with its own SA pair, run sipsak
// through their TUNs at the same time: every one gets kamailio's 200 OK
// for its own Call-ID (a reply sealed for another phone would not open
// under its SA), the gateway learns a distinct NAPT port per phone, and
// kamailio saw each request from the phone's inner address.
func TestThreePhonesRegister(t *testing.T) {
	l := startLab(t, Options{Phones: 3})
	var wg sync.WaitGroup
	for _, p := range l.Phones {
		wg.Add(1)
		go func() { defer wg.Done(); register(t, l, p, "three") }()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	ports := map[uint16]int{}
	for _, p := range l.Phones {
		in, binding := l.InCounters(p.SPIIn)
		out := l.OutPackets(p.SPIOut)
		if binding.Addr() != NAPTWAN || in < 2 || out < 2 {
			t.Fatalf("ue%d: binding %s, packets in %d out %d", p.N, binding, in, out)
		}
		ports[binding.Port()] = p.N
		c := p.Tunnel.Counters()
		// Every ESP packet the gateway sealed for this phone opened
		// under this phone's inbound SA and reached its TUN.
		if c.Received != out || c.ToTUN != out || len(c.DropList()) != 0 {
			t.Fatalf("ue%d: gateway sealed %d, phone counters %+v", p.N, out, c)
		}
		log := l.KamailioLog()
		for _, m := range []string{"REGISTER", "OPTIONS"} {
			want := fmt.Sprintf("request %s from %s:%d call-id three-ue%d-%s@xesp", m, p.Inner, SIPPort, p.N, strings.ToLower(m))
			if !strings.Contains(log, want) {
				t.Fatalf("kamailio did not log %q:\n%s", want, log)
			}
		}
	}
	if len(ports) != 3 {
		t.Fatalf("phones share NAPT ports: %v", ports)
	}
}

// Many phones behind the one NAPT (Go-driven, sharing a namespace, each
// with its own socket and SA pair) register with kamailio at once; each
// gets the 200 for its own Call-ID and the gateway holds one binding per
// phone.
func TestManyPhonesRegister(t *testing.T) {
	n := 100
	if testing.Short() {
		n = 20
	}
	l := startLab(t, Options{Bulk: n})
	var wg sync.WaitGroup
	errs := make(chan error, n)
	retx := make([]int, n)
	sem := make(chan struct{}, 25) // a burst of 100 new flows at once is not the point
	for i, b := range l.Bulk {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			callID := fmt.Sprintf("many-%d@xesp", b.N)
			r, k, err := l.BulkExchange(b, "REGISTER", callID, 1)
			retx[i] = k
			if err == nil && !r.OK() {
				err = fmt.Errorf("bulk%d: %s", b.N, r.Status)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	ports := map[uint16]bool{}
	total := 0
	for i, b := range l.Bulk {
		in, binding := l.InCounters(b.SPIIn)
		if binding.Addr() != NAPTWAN || in < 1 || in > uint64(1+retx[i]) {
			t.Fatalf("bulk%d: binding %s, %d packets in with %d retransmissions", b.N, binding, in, retx[i])
		}
		ports[binding.Port()] = true
		total += retx[i]
	}
	if len(ports) != n {
		t.Fatalf("%d phones, %d distinct NAPT ports", n, len(ports))
	}
	t.Logf("%d phones registered through one NAPT; %d retransmissions in all", n, total)
}

// NAT re-mapping: after registering, the NAPT forgets its mappings and
// takes ports from a new range. The phone's next request leaves from a
// new port; the gateway authenticates it, moves the binding, and the 200
// reaches the phone at the new port.
func TestNATRemapping(t *testing.T) {
	l := startLab(t, Options{Phones: 2})
	for _, p := range l.Phones {
		register(t, l, p, "before")
	}
	_, before := l.InCounters(l.Phones[0].SPIIn)
	_, other := l.InCounters(l.Phones[1].SPIIn)
	if err := l.SetMasquerade("40000-40999"); err != nil {
		t.Fatal(err)
	}
	if err := l.FlushConntrack(); err != nil {
		t.Fatal(err)
	}
	p := l.Phones[0]
	r, err := l.Sipsak(context.Background(), p, "OPTIONS", "after-remap@xesp", 3)
	if err != nil || !r.OK() || r.CallID != "after-remap@xesp" {
		t.Fatalf("OPTIONS after the re-mapping: %v %q\n%s", err, r.Status, r.Raw)
	}
	_, after := l.InCounters(p.SPIIn)
	if after.Addr() != NAPTWAN || after.Port() < 40000 || after.Port() > 40999 || after == before {
		t.Fatalf("binding %s before, %s after the re-mapping (want a port in 40000-40999)", before, after)
	}
	if _, still := l.InCounters(l.Phones[1].SPIIn); still != other {
		t.Fatalf("the other phone's binding moved from %s to %s without sending", other, still)
	}
	if dp, err := l.Gateway.DataPath(); err == nil {
		if st := dp.Stats(); st.BindingChanges < 1 {
			t.Fatalf("binding changes %d", st.BindingChanges)
		}
	}
	// The other phone follows too once it sends.
	register(t, l, l.Phones[1], "after")
	if _, moved := l.InCounters(l.Phones[1].SPIIn); moved.Port() < 40000 || moved.Port() > 40999 {
		t.Fatalf("second phone's binding %s after it sent", moved)
	}
	_ = time.Second
}
