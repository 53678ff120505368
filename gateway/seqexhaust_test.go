package gateway

import (
	"encoding/binary"
	"encoding/hex"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/seqstore"
	"github.com/xesp/xesp/dataplane/esp"
)

// Sequence-number exhaustion in the running gateway (issue 7): an
// outbound SA without ESN whose earlier runs reserved up to 2^32-3 sends
// its last three numbers, 2^32-3 .. 2^32-1, and then nothing: the next
// reply is dropped and counted (seq_cycled), never sealed with a wrapped
// number (which would reuse GCM IVs 0, 1, ...). The lifetime check then
// removes the SA from the SAD and the data path, with one hard "seq"
// event.
func TestGatewaySeqExhaustionNeverWraps(t *testing.T) {
	tp := newTopo(t, 1)
	const last = 1<<32 - 1
	cfg := *tp.g.Config
	if err := tp.g.Stop(false); err != nil {
		t.Fatal(err)
	}
	{
		st, err := seqstore.Open(filepath.Join(cfg.StateDir, "seq"), seqstore.Options{})
		if err != nil {
			t.Fatal(err)
		}
		k, _ := hex.DecodeString(keyOut)
		key := st.KeyFor("out", spiOut, netip.MustParseAddrPort("192.0.2.10:4500"), esp.AES128GCM16.String(), k, nil)
		if err := st.Reserve([]seqstore.Reservation{{Key: key, High: last - 2}}); err != nil {
			t.Fatal(err)
		}
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// Lifetimes are checked when the test says so only.
	tp.startWith(t, &cfg, Options{NoPin: true, LifetimeInterval: time.Hour})
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneIn := mustSA(t, spiOut, keyOut, 64)
	buf := make([]byte, 2048)
	for i, want := range []uint32{last - 2, last - 1, last} {
		if _, err := coreUDP.WriteToUDPAddrPort([]byte("NOTIFY"), phoneInner); err != nil {
			t.Fatal(err)
		}
		phone.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := phone.Read(buf)
		if err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		if seq := binary.BigEndian.Uint32(buf[4:]); seq != want {
			t.Fatalf("reply %d under sequence number %d, want %d", i, seq, want)
		}
		if _, err := phoneIn.Open(buf[:n]); err != nil {
			t.Fatal(err)
		}
	}
	// The data path itself refuses the next one.
	if _, err := coreUDP.WriteToUDPAddrPort([]byte("NOTIFY"), phoneInner); err != nil {
		t.Fatal(err)
	}
	phone.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := phone.Read(buf); err == nil {
		t.Fatalf("a reply after the last sequence number: seq %d", binary.BigEndian.Uint32(buf[4:n]))
	}
	st := tp.g.Workers[0].Stats()
	eventually(t, "the seq_cycled drop", func() bool { return st.Encap.Drops[esp.ReasonSeqCycled].Load() == 1 })
	if st.Encap.Packets.Load() != 3 {
		t.Fatalf("sealed %d packets, want 3", st.Encap.Packets.Load())
	}

	outID := sa.ID{Dir: sa.Out, SPI: spiOut, Peer: netip.MustParseAddrPort("192.0.2.10:4500")}
	tp.g.Lifetime.Check()
	if e, ok := tp.g.SAD.Get(outID); ok {
		t.Fatalf("the exhausted SA is still in the SAD (%s)", e.State)
	}
	evs, _ := tp.g.Lifetime.Events(0, 10)
	if len(evs) != 1 || evs[0].ID != outID || evs[0].Kind != lifetime.Hard || evs[0].What != lifetime.Seq || evs[0].Value != last {
		t.Fatalf("lifetime events %+v, want one hard seq expiry at %d", evs, uint64(last))
	}
	syncDataPath(t, tp.g)
	if _, ok := tp.g.Manager.Counters(outID); ok {
		t.Fatal("the exhausted SA is still installed")
	}
}
