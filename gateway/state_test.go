package gateway

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

// canonicalState is s's records sorted by key, encoded, clean or not:
// two states that restore alike have equal bytes.
func canonicalState(t *testing.T, s *rxstate.Snapshot) []byte {
	t.Helper()
	c := &rxstate.Snapshot{Records: slices.Clone(s.Records)}
	slices.SortFunc(c.Records, func(a, b rxstate.Record) int { return bytes.Compare(a.Key[:], b.Key[:]) })
	b, err := rxstate.Encode(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The periodic snapshot through a running gateway: after each interval
// of mixed changes (phones' packets moving windows and counters, the
// core's packets moving outbound counters, a binding learnt, SA pairs
// added, deleted and added again, a compaction), the state on disk (base
// plus journal) restores exactly what a full snapshot of every SA taken
// at that moment restores, and a quiet interval appends nothing.
func TestPeriodicSnapshotRestoresAsFull(t *testing.T) {
	tp := newTopoWith(t, 1, Options{StateInterval: time.Hour}) // the test drives the snapshots
	p := newPersister(tp.g)
	defer p.close()
	ctx := context.Background()
	path := filepath.Join(tp.g.Config.StateDir, rxStateFile)
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	buf := make([]byte, 2048)
	socks := map[int]*net.UDPConn{}
	sock := func(port int) *net.UDPConn {
		if socks[port] == nil {
			socks[port] = udpSock(t, tp.phone, fmt.Sprintf("192.0.2.10:%d", port))
		}
		return socks[port]
	}
	sealers := map[int]*esp.Transform{} // sequence numbers go on across calls
	// phone n sends k packets from port (0: its NAPT port).
	phoneSends := func(n, k, port int) {
		t.Helper()
		if port == 0 {
			port = 4500 + n - 1
		}
		if sealers[n] == nil {
			sealers[n] = mustSA(t, uint32(0x1000+n), keyIn, 0)
		}
		tf := sealers[n]
		for range k {
			inner := pkt.UDP4(netip.MustParseAddrPort(fmt.Sprintf("10.99.0.%d:5060", n)), coreAddr, []byte("REGISTER"))
			if _, err := sock(port).WriteToUDP(seal(t, tf, inner), gwPublic); err != nil {
				t.Fatal(err)
			}
			coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := coreUDP.Read(buf); err != nil {
				t.Fatalf("phone %d's packet: %v", n, err)
			}
		}
	}
	// the core sends k packets to phone n, received at port.
	coreSends := func(n, k, port int) {
		t.Helper()
		if port == 0 {
			port = 4500 + n - 1
		}
		for range k {
			if _, err := coreUDP.WriteToUDPAddrPort([]byte("NOTIFY"), netip.MustParseAddrPort(fmt.Sprintf("10.99.0.%d:5060", n))); err != nil {
				t.Fatal(err)
			}
			sock(port).SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := sock(port).Read(buf); err != nil {
				t.Fatalf("core's packet to phone %d: %v", n, err)
			}
		}
	}
	deletePair := func(n int) {
		t.Helper()
		for _, id := range []sa.ID{{Dir: sa.In, SPI: uint32(0x1000 + n)}} {
			if _, err := tp.g.SAD.Delete(id); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := tp.g.SAD.DeleteName(fmt.Sprintf("ue%d-out-%x", n, 0x2000+n)); err != nil {
			t.Fatal(err)
		}
		syncDataPath(t, tp.g)
	}
	check := func(round string) {
		t.Helper()
		if err := p.snapshot(ctx); err != nil {
			t.Fatalf("%s: %v", round, err)
		}
		got, err := rxstate.Load(path)
		if err != nil {
			t.Fatalf("%s: %v", round, err)
		}
		full, err := tp.g.snapshotState(ctx, true) // windows read directly: the data path is quiet
		if err != nil {
			t.Fatal(err)
		}
		if g, w := canonicalState(t, got), canonicalState(t, full); !bytes.Equal(g, w) {
			t.Fatalf("%s: restore of base+journal (%d records) differs from the full snapshot's (%d records)\n got %+v\nwant %+v",
				round, len(got.Records), len(full.Records), got.Records, full.Records)
		}
		t.Logf("%s: %+v, %d SAs", round, p.last, len(full.Records))
	}

	phoneSends(1, 2, 0)
	check("first (base)")
	if !p.last.Full {
		t.Fatal("the run's first snapshot was not a base")
	}
	addSAs(t, tp.g, pairYAML(2, 0x1002, 0x2002, keyIn, keyOut, "")+pairYAML(3, 0x1003, 0x2003, keyIn, keyOut, "")+
		pairYAML(4, 0x1004, 0x2004, keyIn, keyOut, ""))
	phoneSends(1, 1, 0)
	phoneSends(2, 2, 0)
	coreSends(1, 2, 0)
	check("adds and traffic")
	if p.last.Full || p.last.Records == 0 {
		t.Fatalf("adds: %+v, want journal records", p.last)
	}
	phoneSends(1, 1, 40000) // the binding moves
	deletePair(3)
	coreSends(2, 1, 0)
	check("binding moved, pair 3 deleted")
	addSAs(t, tp.g, pairYAML(3, 0x1003, 0x2003, keyIn, keyOut, "")) // same identity and keys
	phoneSends(3, 1, 0)
	deletePair(4)
	check("pair 3 added again, pair 4 deleted")
	check("quiet")
	if p.last.Records != 0 || p.last.Full {
		t.Fatalf("a quiet interval wrote %+v", p.last)
	}
	if err := p.j.Compact(); err != nil {
		t.Fatal(err)
	}
	phoneSends(2, 3, 0)
	coreSends(1, 1, 40000)
	check("after a compaction")
	if p.last.Records != 2 { // phone 2's window and counters, phone 1's outbound counters
		t.Fatalf("after a compaction: %d records, want 2", p.last.Records)
	}
	// A change feed overrun (forced: the version the persister continues
	// from is past the SAD's) journals every SA between sweep marks,
	// which also drops the pair deleted meanwhile.
	deletePair(2)
	addSAs(t, tp.g, pairYAML(5, 0x1005, 0x2005, keyIn, keyOut, ""))
	phoneSends(5, 1, 0)
	p.version = tp.g.SAD.Version() + 1000
	check("feed overrun")
	if in, out := tp.g.SAD.Len(); p.last.Records < in+out+2 {
		t.Fatalf("feed overrun: %d records for %d SAs, want a sweep of all", p.last.Records, in+out)
	}
}

// A crash after journal appends: the next start restores the base with
// the journal applied and its torn tail ignored. The state files are
// taken as a crash would leave them (after the last append, before any
// shutdown snapshot), with half a record appended; the new gateway
// restores the window of the journal's last append (every packet of the
// first run is a replay, from any port), the binding learnt after the
// base, and accepts the phone's next packet.
func TestRestartFromJournalAfterCrash(t *testing.T) {
	tp := newTopoWith(t, 1, Options{StateInterval: time.Hour})
	p := newPersister(tp.g)
	ctx := context.Background()
	home := udpSock(t, tp.phone, "192.0.2.10:4500")
	moved := udpSock(t, tp.phone, "192.0.2.10:40000")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	buf := make([]byte, 2048)
	var captured [][]byte
	send := func(c *net.UDPConn) {
		t.Helper()
		pk := seal(t, phoneOut, pkt.UDP4(phoneInner, coreAddr, []byte("REGISTER")))
		captured = append(captured, pk)
		if _, err := c.WriteToUDP(pk, gwPublic); err != nil {
			t.Fatal(err)
		}
		coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := coreUDP.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	send(home)
	send(home)
	if err := p.snapshot(ctx); err != nil || !p.last.Full {
		t.Fatalf("base: %v %+v", err, p.last)
	}
	send(moved)
	send(moved)
	movedTo := netip.MustParseAddrPort("192.0.2.10:40000")
	eventually(t, "binding at port 40000", func() bool { e, _ := tp.g.SAD.Get(sa.ID{Dir: sa.In, SPI: spiIn}); return e.Binding == movedTo })
	if err := p.snapshot(ctx); err != nil || p.last.Full || p.last.Records == 0 {
		t.Fatalf("journal append: %v %+v", err, p.last)
	}
	p.close()
	path := filepath.Join(tp.g.Config.StateDir, rxStateFile)
	base, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	journal, err := os.ReadFile(rxstate.JournalPath(path))
	if err != nil {
		t.Fatal(err)
	}
	torn := []byte{100, 0, 0, 0, 1, 0xaa, 0xbb, 0xcc} // a record's length, kind and a little of its body
	journal = append(journal, torn...)

	cfg := *tp.g.Config
	if err := tp.g.Stop(false); err != nil {
		t.Fatal(err)
	}
	for f, b := range map[string][]byte{path: base, rxstate.JournalPath(path): journal} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tp.startWith(t, &cfg, Options{NoPin: true, StateInterval: time.Hour})
	r := tp.g.Restored
	if r.Clean || r.Windows != 1 || r.Bindings != 1 || r.JournalRecords == 0 || r.TornBytes != int64(len(torn)) {
		t.Fatalf("restored %+v: want an unclean state, 1 window, 1 binding, journal records and %d torn bytes", r, len(torn))
	}
	// The core's packet goes to the binding learnt after the base.
	if _, err := coreUDP.WriteToUDPAddrPort([]byte("NOTIFY"), phoneInner); err != nil {
		t.Fatal(err)
	}
	moved.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := moved.Read(buf); err != nil {
		t.Fatalf("the reply after the restart did not reach the port learnt after the base: %v", err)
	}
	sent := 0
	for _, c := range []*net.UDPConn{home, moved} {
		for _, pk := range captured {
			c.WriteToUDP(pk, gwPublic)
			sent++
		}
	}
	st := tp.g.Workers[0].Stats()
	eventually(t, "the replays dropped", func() bool { return st.Decap.Drops[esp.ReasonReplay].Load() == uint64(sent) })
	send(moved) // the phone's next packet is accepted
}
