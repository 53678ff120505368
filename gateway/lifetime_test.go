package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/maps"
)

// pairYAML is phone n's SA pair in the SA format: inbound spiIn, outbound
// spiOut, behind NAPT port 4500+n-1, inner address 10.99.0.n; extra is
// appended to both SAs' flow mappings (e.g. a lifetime).
func pairYAML(n int, spiIn, spiOut uint32, keyIn, keyOut, extra string) string {
	one := func(name string, spi uint32, dir, key string) string {
		return fmt.Sprintf(`- {name: %s, spi: %d, direction: %s, mode: tunnel, proposal: aes128gcm16, enc_key: %s,
   local: 192.0.2.1, peer: 192.0.2.10, encap: {local_port: 4500, peer_port: %d},
   inner: {local: 10.0.0.0/24, peer: 10.99.0.%d/32}%s}
`, name, spi, dir, key, 4500+n-1, n, extra)
	}
	return one(fmt.Sprintf("ue%d-in-%x", n, spiIn), spiIn, "in", keyIn) + one(fmt.Sprintf("ue%d-out-%x", n, spiOut), spiOut, "out", keyOut)
}

// addSAs adds SAs in the SA format to the running gateway and waits until
// the data path carries them, as the API does.
func addSAs(t testing.TB, g *Gateway, yaml string) {
	t.Helper()
	sas, err := sa.ParseBytes([]byte(yaml), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.SAD.AddAll(sas); err != nil {
		t.Fatal(err)
	}
	syncDataPath(t, g)
}

func syncDataPath(t testing.TB, g *Gateway) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := g.Manager.WaitVersion(ctx, g.SAD.Version()); err != nil {
		t.Fatal(err)
	}
}

// Lifetimes through the running gateway (issue 7): an inbound SA with a
// soft and a hard packet limit carries real packets; at the soft limit it
// is marked soft-expired and an event is raised and counted; at the hard
// limit it is removed from the SAD, the worker table and the XDP SA map,
// counted, and its next packet is dropped by XDP as drop_no_sa, never
// reaching the core. Its outbound partner (hard byte limit above what it
// carried) and the other phone are untouched.
func TestGatewayLifetimeEnforced(t *testing.T) {
	tp := newTopo(t, 1)
	const in2, out2 = 0x1002, 0x2002
	addSAs(t, tp.g, pairYAML(2, in2, out2, keyIn, keyOut, ", lifetime: {soft_packets: 2, hard_packets: 4, hard_bytes: 1000000}"))
	phone := udpSock(t, tp.phone, "192.0.2.10:4501")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, in2, keyIn, 0)
	inner2 := netip.MustParseAddrPort("10.99.0.2:5060")
	buf := make([]byte, 2048)
	send := func(msg string) error {
		if _, err := phone.WriteToUDP(seal(t, phoneOut, pkt.UDP4(inner2, coreAddr, []byte(msg))), gwPublic); err != nil {
			t.Fatal(err)
		}
		coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := coreUDP.Read(buf)
		if err == nil && string(buf[:n]) != msg {
			t.Fatalf("core got %q, want %q", buf[:n], msg)
		}
		return err
	}
	idIn := sa.ID{Dir: sa.In, SPI: in2}
	idOut := sa.ID{Dir: sa.Out, SPI: out2, Peer: netip.MustParseAddrPort("192.0.2.10:4501")}
	state := func(id sa.ID) string {
		e, ok := tp.g.SAD.Get(id)
		if !ok {
			return "gone"
		}
		return e.State.String()
	}
	lt := tp.g.Lifetime

	for i := 1; i <= 2; i++ {
		if err := send(fmt.Sprintf("REGISTER %d", i)); err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
	}
	lt.Check()
	if s := state(idIn); s != "soft-expired" {
		t.Fatalf("after 2 packets the SA is %s, want soft-expired", s)
	}
	evs, next := lt.Events(0, 10)
	if len(evs) != 1 || evs[0].ID != idIn || evs[0].Kind != lifetime.Soft || evs[0].What != lifetime.Packets || evs[0].Value != 2 {
		t.Fatalf("events after the soft limit: %+v", evs)
	}
	// Soft expiry is a warning: the SA still carries traffic.
	for i := 3; i <= 4; i++ {
		if err := send(fmt.Sprintf("REGISTER %d", i)); err != nil {
			t.Fatalf("soft-expired SA dropped packet %d: %v", i, err)
		}
	}
	lt.Check()
	if s := state(idIn); s != "gone" {
		t.Fatalf("after 4 packets the SA is %s, want removed", s)
	}
	evs, _ = lt.Events(next, 10)
	if len(evs) != 1 || evs[0].Kind != lifetime.Hard || evs[0].What != lifetime.Packets || evs[0].Value != 4 {
		t.Fatalf("events after the hard limit: %+v", evs)
	}
	syncDataPath(t, tp.g)
	if _, err := tp.g.Maps.SAs.Lookup(in2); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("SPI %#x still in the XDP SA map: %v", in2, err)
	}
	if _, ok := tp.g.Manager.Counters(idIn); ok {
		t.Fatal("the worker still holds the expired SA")
	}
	noSA := xdpCount(t, tp.g, bpf.DropNoSA)
	if err := send("REGISTER 5"); err == nil {
		t.Fatal("a packet under the hard-expired SA reached the core")
	}
	eventually(t, "drop_no_sa for the expired SPI", func() bool { return xdpCount(t, tp.g, bpf.DropNoSA) == noSA+1 })

	if s := state(idOut); s != "active" {
		t.Fatalf("the outbound partner is %s, want active", s)
	}
	if c := lt.Counts(); c["soft/packets"] != 1 || c["hard/packets"] != 1 || c["hard/bytes"] != 0 {
		t.Fatalf("lifetime counts %v", c)
	}
	// The first phone's SAs have no limits and still work.
	ue1 := udpSock(t, tp.phone, "192.0.2.10:4500")
	if _, err := ue1.WriteToUDP(seal(t, mustSA(t, spiIn, keyIn, 0), pkt.UDP4(phoneInner, coreAddr, []byte("OPTIONS"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := coreUDP.Read(buf); err != nil {
		t.Fatalf("the other phone's SA stopped working: %v", err)
	}
}

// Hard packet lifetimes hold per packet, not per lifetime sweep (RFC 4301
// 4.4.2.1: an SA past its hard lifetime must not be used). With the sweep
// effectively off, an inbound SA with hard_packets 3 carries exactly 3
// packets to the core and the worker drops the 4th as lifetime_expired;
// its outbound partner with hard_packets 2 seals exactly 2 replies and
// drops the 3rd the same way. Both SAs are still in the SAD (the sweep
// removes them), yet no packet passes.
func TestGatewayHardLifetimePerPacket(t *testing.T) {
	tp := newTopoWith(t, 1, Options{LifetimeInterval: time.Hour})
	const in2, out2 = 0x1002, 0x2002
	sas, err := sa.ParseBytes([]byte(pairYAML(2, in2, out2, keyIn, keyOut, "")), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sas[0].Lifetime.HardPackets = 3
	sas[1].Lifetime.HardPackets = 2
	if err := tp.g.SAD.AddAll(sas); err != nil {
		t.Fatal(err)
	}
	syncDataPath(t, tp.g)
	phone := udpSock(t, tp.phone, "192.0.2.10:4501")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, in2, keyIn, 0)
	inner2 := netip.MustParseAddrPort("10.99.0.2:5060")
	buf := make([]byte, 2048)
	lifetimeDrops := func(enc bool) uint64 {
		st := tp.g.Workers[0].Stats()
		if enc {
			return st.Encap.Drops[worker.DropLifetime].Load()
		}
		return st.Decap.Drops[worker.DropLifetime].Load()
	}
	for i := 1; i <= 4; i++ {
		msg := fmt.Sprintf("REGISTER %d", i)
		if _, err := phone.WriteToUDP(seal(t, phoneOut, pkt.UDP4(inner2, coreAddr, []byte(msg))), gwPublic); err != nil {
			t.Fatal(err)
		}
		coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := coreUDP.Read(buf)
		switch {
		case i <= 3 && err != nil:
			t.Fatalf("packet %d under the hard limit 3 did not reach the core: %v", i, err)
		case i <= 3 && string(buf[:n]) != msg:
			t.Fatalf("core got %q, want %q", buf[:n], msg)
		case i == 4 && err == nil:
			t.Fatalf("packet 4 passed an SA with hard_packets 3: core got %q", buf[:n])
		}
	}
	eventually(t, "decap lifetime_expired drop", func() bool { return lifetimeDrops(false) == 1 })
	if c, _ := tp.g.Manager.Counters(sa.ID{Dir: sa.In, SPI: in2}); c.Packets != 3 {
		t.Fatalf("inbound SA carried %d packets, want 3", c.Packets)
	}

	for i := 1; i <= 3; i++ {
		msg := fmt.Sprintf("200 OK %d", i)
		if _, err := coreUDP.WriteToUDPAddrPort([]byte(msg), inner2); err != nil {
			t.Fatal(err)
		}
		phone.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err := phone.Read(buf)
		switch {
		case i <= 2 && err != nil:
			t.Fatalf("reply %d under the hard limit 2 did not reach the phone: %v", i, err)
		case i == 3 && err == nil:
			t.Fatal("reply 3 passed an SA with hard_packets 2")
		}
	}
	eventually(t, "encap lifetime_expired drop", func() bool { return lifetimeDrops(true) == 1 })
	if worker.DropLifetime.String() != "lifetime_expired" {
		t.Fatalf("drop reason label %q", worker.DropLifetime)
	}
	for _, id := range []sa.ID{{Dir: sa.In, SPI: in2}, {Dir: sa.Out, SPI: out2, Peer: netip.MustParseAddrPort("192.0.2.10:4501")}} {
		if _, ok := tp.g.SAD.Get(id); !ok {
			t.Fatalf("%s left the SAD before any sweep: the drop must come from the worker", id)
		}
	}
	if st := tp.g.Workers[0].Stats(); st.Decap.Drops[esp.ReasonNoSA].Load() != 0 {
		t.Fatal("a packet was dropped as no_sa: the SA was removed, not enforced per packet")
	}
}
