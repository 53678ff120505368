package topo

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

// Transport mode through the NAPT topology with kamailio
// (docs/addressing.md, "Transport mode"): two phones, both 192.168.1.10
// behind their own NAPT, with UDP-encapsulated transport-mode SA pairs,
// and a third on the public segment without a NAPT sending plain ESP
// (protocol 50); core addresses from core_pool. Each registers with sipsak (REGISTER and
// OPTIONS, kamailio's 200 for its own Call-ID); kamailio saw each REGISTER
// from the phone's core address and keeps it in its location table; then
// the core sends OPTIONS through kamailio to each registered phone, and
// each phone's own UAS answers. Every packet the gateway sealed for a
// phone opened there (transport segment, Next Header UDP) and reached its
// TUN: nothing misdelivered.
func TestTransportPhonesWithKamailio(t *testing.T) {
	l := startLab(t, Options{NAPTs: 2, Phones: 1, Direct: 1, Core: CoreFromPool, Transport: true})
	if len(l.Phones) != 3 || !l.Phones[2].Direct {
		t.Fatalf("%d phones", len(l.Phones))
	}
	if e, ok := l.Gateway.SAD.GetName(l.Phones[2].User + "-out"); !ok || e.SA.Encap != nil {
		t.Fatalf("%s-out: not plain ESP", l.Phones[2].User)
	}
	if l.Phones[0].Inner != l.Phones[1].Inner || l.Phones[0].Core == l.Phones[1].Core {
		t.Fatalf("phones %s/%s at cores %s/%s", l.Phones[0].Inner, l.Phones[1].Inner, l.Phones[0].Core, l.Phones[1].Core)
	}
	for _, p := range l.Phones {
		if e, ok := l.Gateway.SAD.GetName(p.User + "-in"); !ok || e.SA.Mode.String() != "transport" {
			t.Fatalf("%s-in: not a transport SA", p.User)
		}
		register(t, l, p, "trans")
	}
	regs, err := l.Registrations()
	if err != nil {
		t.Fatal(err)
	}
	klog := l.KamailioLog()
	for _, p := range l.Phones {
		if got, want := regs[p.User], fmt.Sprintf("sip:%s:%d", p.Core, SIPPort); len(got) != 1 || got[0] != want {
			t.Fatalf("%s in kamailio's location table: received %v, want [%s]", p.User, got, want)
		}
		if want := fmt.Sprintf("request REGISTER from %s:%d call-id trans-%s-register@xesp", p.Core, SIPPort, p.User); !strings.Contains(klog, want) {
			t.Errorf("kamailio did not log %q", want)
		}
		if err := l.Listen(p); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range l.Phones {
		r, err := l.CoreOptions(context.Background(), p, "core-trans-"+p.User+"@core")
		if err != nil || !r.AnsweredBy(p) {
			t.Fatalf("core OPTIONS to %s: %v %q answered by %q", p.User, err, r.Status, r.Server)
		}
	}
	for _, p := range l.Phones {
		c := p.Tunnel.Counters()
		out := l.OutPackets(p.SPIOut)
		_, binding := l.InCounters(p.SPIIn)
		if m := c.Misdelivered(); m.Total() != 0 || out < 3 || c.Received != out || c.ToTUN != out || len(c.DropList()) != 0 || p.UAS.Foreign() != 0 {
			t.Errorf("%s: gateway out %d; phone %+v drops %v misdelivered %+v", p.User, out, c, c.DropList(), m)
		}
		if binding.Addr() != p.NAPTWAN || p.Direct && binding.Port() != 0 {
			t.Errorf("%s: binding %s, want NAPT %s", p.User, binding, p.NAPTWAN)
		}
	}
}
