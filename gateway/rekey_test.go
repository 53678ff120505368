package gateway

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/rekey"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/maps"
)

const (
	keyIn2  = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3" // the rekeyed pair's keys
	keyOut2 = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3"
)

// echoCore answers every datagram to the core's SIP port with "ok " and
// the request, and counts the requests it saw by their number.
type echoCore struct {
	mu   sync.Mutex
	seen tally
}

// tally counts numbered events in a byte per number, so that a long soak
// measures the gateway's heap rather than its own bookkeeping.
type tally struct {
	n        []uint8
	distinct int
}

func (t *tally) add(i int) {
	if i < 0 {
		return
	}
	if i >= len(t.n) {
		t.n = append(t.n, make([]uint8, i+1-len(t.n)+len(t.n)/2)...)
	}
	if t.n[i] == 0 {
		t.distinct++
	}
	if t.n[i] < 255 {
		t.n[i]++
	}
}

// dups is how many numbers were counted more than once.
func (t *tally) dups() (n int) {
	for _, c := range t.n {
		if c > 1 {
			n++
		}
	}
	return n
}

func startEchoCore(t testing.TB, tp *topo) *echoCore {
	c := udpSock(t, tp.core, coreAddr.String())
	e := &echoCore{}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if i, err := strconv.Atoi(strings.TrimPrefix(string(buf[:n]), "req ")); err == nil {
				e.mu.Lock()
				e.seen.add(i)
				e.mu.Unlock()
			}
			c.WriteToUDPAddrPort(append([]byte("ok "), buf[:n]...), from)
		}
	}()
	return e
}

func (e *echoCore) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.seen.distinct
}

// phoneRx opens the gateway's replies with whichever of the phone's
// inbound SAs the SPI names and counts them by request number and SPI.
type phoneRx struct {
	mu     sync.Mutex
	got    tally
	bySPI  map[uint32]int
	bad    int
	lastAt map[uint32]int // highest request number answered under each SPI
}

func startPhoneRx(t testing.TB, c *net.UDPConn, sas ...*esp.Transform) *phoneRx {
	r := &phoneRx{bySPI: map[uint32]int{}, lastAt: map[uint32]int{}}
	bySPI := map[uint32]*esp.Transform{}
	for _, s := range sas {
		bySPI[s.SPI()] = s
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			if n < 8 || bySPI[binary.BigEndian.Uint32(buf)] == nil {
				r.bad++
				r.mu.Unlock()
				continue
			}
			spi := binary.BigEndian.Uint32(buf)
			res, err := bySPI[spi].Open(buf[:n])
			if err != nil {
				r.bad++
				r.mu.Unlock()
				continue
			}
			_, _, payload, ok := pkt.UDP4Parse(buf[res.Start:res.End])
			i, err := strconv.Atoi(strings.TrimPrefix(string(payload), "ok req "))
			if !ok || err != nil {
				r.bad++
			} else {
				r.got.add(i)
				r.bySPI[spi]++
				r.lastAt[spi] = max(r.lastAt[spi], i)
			}
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *phoneRx) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got.distinct
}

// Rekey make-before-break under traffic (issue 7): a phone sends requests
// at a steady rate and the core answers each; midway the SA pair is
// replaced by a new one (new SPIs, new keys) with rekey.Do, and the phone
// switches its outbound SA right after, with its old packets still in
// flight. Every request reaches the core and every reply reaches the
// phone; replies switch from the old outbound SA to the new one; nothing
// is dropped anywhere; afterwards only the new SAs exist, in the SAD and
// in the XDP maps.
func TestGatewayRekeyUnderTrafficLosesNothing(t *testing.T) {
	tp := newTopo(t, 2)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	core := startEchoCore(t, tp)
	oldOut, newOut := mustSA(t, spiIn, keyIn, 0), mustSA(t, 0x1011, keyIn2, 0)
	rx := startPhoneRx(t, phone, mustSA(t, spiOut, keyOut, 4096), mustSA(t, 0x2011, keyOut2, 4096))

	const total, rekeyAt, perTick = 4000, 1500, 4
	var cur atomic.Pointer[esp.Transform]
	cur.Store(oldOut)
	var sent atomic.Int64
	sendDone := make(chan error, 1)
	// The sender does not go past the last 1000 requests before the
	// phone switched, however long the rekey takes on a loaded machine:
	// some replies must come under each outbound SA.
	switched := make(chan struct{})
	go func() {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := 0; i < total; {
			<-tick.C
			if i >= total-1000 {
				select {
				case <-switched:
				case <-time.After(30 * time.Second):
				}
			}
			for k := 0; k < perTick && i < total; k, i = k+1, i+1 {
				inner := pkt.UDP4(phoneInner, coreAddr, []byte(fmt.Sprintf("req %d", i)))
				if _, err := phone.WriteToUDP(seal(t, cur.Load(), inner), gwPublic); err != nil {
					sendDone <- err
					return
				}
				sent.Add(1)
			}
		}
		sendDone <- nil
	}()

	for sent.Load() < rekeyAt {
		time.Sleep(time.Millisecond)
	}
	newSAs, err := sa.ParseBytes([]byte(pairYAML(1, 0x1011, 0x2011, keyIn2, keyOut2, "")), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	oldIn, oldOutID := sa.ID{Dir: sa.In, SPI: spiIn}, sa.ID{Dir: sa.Out, SPI: spiOut, Peer: netip.MustParseAddrPort("192.0.2.10:4500")}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := rekey.Do(ctx, tp.g.SAD, tp.g.Manager.WaitVersion, rekey.Request{
		Old: []sa.ID{oldIn, oldOutID}, New: newSAs, Grace: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cur.Store(newOut) // the phone moves to the new SA as soon as it is told
	switchedAt := sent.Load()
	close(switched)
	if err := <-sendDone; err != nil {
		t.Fatal(err)
	}
	<-res.Done
	eventually(t, "every request answered", func() bool { return core.count() == total && rx.count() == total })

	rx.mu.Lock()
	defer rx.mu.Unlock()
	if rx.bad != 0 || rx.bySPI[spiOut] == 0 || rx.bySPI[0x2011] == 0 || rx.bySPI[spiOut]+rx.bySPI[0x2011] != total {
		t.Fatalf("replies by SPI %v, %d unreadable", rx.bySPI, rx.bad)
	}
	if n := rx.got.dups(); n != 0 {
		t.Fatalf("%d replies arrived more than once", n)
	}
	if rx.lastAt[spiOut] >= int(switchedAt)+perTick*50 {
		t.Fatalf("replies under the old outbound SA until request %d, the phone switched at %d", rx.lastAt[spiOut], switchedAt)
	}
	for _, w := range tp.g.Workers {
		st := w.Stats()
		for _, d := range []*worker.DirStats{&st.Decap, &st.Encap} {
			for r := range d.Drops {
				if n := d.Drops[r].Load(); n != 0 && worker.Drop(r) != worker.Drop(esp.ReasonNone) {
					t.Errorf("worker %d dropped %d packets: %s", w.ID(), n, worker.Drop(r))
				}
			}
		}
	}
	if n := xdpCount(t, tp.g, bpf.DropNoSA) + xdpCount(t, tp.g, bpf.DropNoXSK); n != 0 {
		t.Fatalf("XDP dropped %d packets for want of an SA or socket", n)
	}
	syncDataPath(t, tp.g)
	for _, id := range []sa.ID{oldIn, oldOutID} {
		if _, ok := tp.g.SAD.Get(id); ok {
			t.Fatalf("old SA %s still in the SAD", id)
		}
	}
	if _, err := tp.g.Maps.SAs.Lookup(spiIn); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("old SPI still in the XDP SA map: %v", err)
	}
	if v, err := tp.g.Maps.SAs.Lookup(0x1011); err != nil {
		t.Fatalf("new SPI not in the XDP SA map: %v", err)
	} else if e, _ := tp.g.SAD.Get(sa.ID{Dir: sa.In, SPI: 0x1011}); uint32(e.Index) != v.SaIndex || e.Worker != v.Worker {
		t.Fatalf("XDP steers the new SPI to %d/%d, the SAD has %d/%d", v.Worker, v.SaIndex, e.Worker, e.Index)
	}
	t.Logf("rekey after %d requests, phone switched at %d; replies: %d under the old SA, %d under the new", rekeyAt, switchedAt, rx.bySPI[spiOut], rx.bySPI[0x2011])
}
