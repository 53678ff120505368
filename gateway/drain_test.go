package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/maps"
)

// Deleting an SA under traffic loses none of the packets XDP had already
// steered to its worker (make before break for removal). One side sends at
// a steady rate through the SA; the SA's worker is held busy (as a
// preempted worker would be) so the frames XDP steers pile up in its RX
// ring, and the SA is deleted through the SAD while they sit there. Every
// frame XDP redirected before the delete must be processed by the SA (its
// own counter) and delivered, the worker must drop none (no no_sa), and
// after the delete XDP no longer steers: inbound packets are dropped as
// drop_no_sa, outbound cleartext finds no policy.
func TestGatewayDeleteDrainsSteeredPackets(t *testing.T) {
	t.Run("inbound", func(t *testing.T) { testDeleteDrains(t, sa.In) })
	t.Run("outbound", func(t *testing.T) { testDeleteDrains(t, sa.Out) })
}

func testDeleteDrains(t *testing.T, dir sa.Direction) {
	tp := newTopo(t, 2)
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreConn := udpSock(t, tp.core, coreAddr.String())
	var delivered func() int
	var send func(i int) error
	var id sa.ID
	var steeredBy, afterBy bpf.Reason
	if dir == sa.In {
		var mu sync.Mutex
		var seen tally
		go func() {
			buf := make([]byte, 2048)
			for {
				n, err := coreConn.Read(buf)
				if err != nil {
					return
				}
				if i, err := strconv.Atoi(strings.TrimPrefix(string(buf[:n]), "req ")); err == nil {
					mu.Lock()
					seen.add(i)
					mu.Unlock()
				}
			}
		}()
		delivered = func() int {
			mu.Lock()
			defer mu.Unlock()
			return seen.distinct
		}
		out := mustSA(t, spiIn, keyIn, 0)
		send = func(i int) error {
			inner := pkt.UDP4(phoneInner, coreAddr, []byte(fmt.Sprintf("req %d", i)))
			_, err := phone.WriteToUDP(seal(t, out, inner), gwPublic)
			return err
		}
		id, steeredBy, afterBy = sa.ID{Dir: sa.In, SPI: spiIn}, bpf.RedirectESPUDP, bpf.DropNoSA
	} else {
		rx := startPhoneRx(t, phone, mustSA(t, spiOut, keyOut, 4096))
		delivered = rx.count
		send = func(i int) error {
			_, err := coreConn.WriteToUDPAddrPort([]byte(fmt.Sprintf("ok req %d", i)), phoneInner)
			return err
		}
		id = sa.ID{Dir: sa.Out, SPI: spiOut, Peer: netip.MustParseAddrPort("192.0.2.10:4500")}
		steeredBy, afterBy = bpf.PrivRedirect, bpf.PrivPassNoPolicy
	}
	e, ok := tp.g.SAD.Get(id)
	if !ok {
		t.Fatalf("%s not in the SAD", id)
	}
	w := tp.g.Workers[e.Worker]
	afterBase := xdpCount(t, tp.g, afterBy)

	// The sender runs at 2 packets per millisecond, pauses once frames
	// have piled up behind the held worker (so its RX ring cannot
	// overflow however long the delete takes on a loaded machine), and
	// resumes after the delete for 200 more packets, which XDP must no
	// longer steer. Every step waits for an event, not for a time.
	const perTick, after = 2, 200
	var sent, stopAt atomic.Int64
	var paused atomic.Bool
	stopAt.Store(1 << 62)
	sendDone := make(chan error, 1)
	go func() {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := int64(0); i < stopAt.Load(); {
			<-tick.C
			for k := 0; k < perTick && !paused.Load() && i < stopAt.Load(); k, i = k+1, i+1 {
				if err := send(int(i)); err != nil {
					sendDone <- err
					return
				}
				sent.Add(1)
			}
		}
		sendDone <- nil
	}()
	for sent.Load() < 200 {
		time.Sleep(time.Millisecond)
	}

	// Hold the worker on its own thread and keep the SA's entry, whose
	// counters outlive the delete.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	held, release := make(chan struct{}), make(chan struct{})
	var entry *worker.Slot
	if err := w.Send(ctx, []worker.Command{{Index: ^uint32(0), Visit: func(table []*worker.Slot) {
		entry = table[e.Index]
		close(held)
		<-release
	}}}); err != nil {
		t.Fatal(err)
	}
	<-held
	// Frames pile up in the RX ring: wait until XDP steered 20 more to
	// the held worker, then pause the sender.
	pile := xdpCount(t, tp.g, steeredBy) + 20
	for xdpCount(t, tp.g, steeredBy) < pile {
		if ctx.Err() != nil {
			close(release)
			t.Fatal("no frames reached the held worker's RX ring")
		}
		time.Sleep(time.Millisecond)
	}
	paused.Store(true)

	deleted := make(chan error, 1)
	go func() {
		_, err := tp.g.SAD.Delete(id)
		if err == nil {
			err = tp.g.Manager.WaitVersion(ctx, tp.g.SAD.Version())
		}
		deleted <- err
	}()
	// Release the worker only once XDP no longer steers to the SA and its
	// removal is queued behind the hold: the frames in the ring meet the
	// removal, as they would when a busy worker gets a delete.
	unpublished := func() bool {
		var err error
		if dir == sa.In {
			_, err = tp.g.Maps.SAs.Lookup(spiIn)
		} else {
			_, err = tp.g.Maps.Policies.Lookup(phoneInner.Addr())
		}
		return errors.Is(err, maps.ErrNotFound)
	}
	for !unpublished() || w.Pending() == 0 {
		if ctx.Err() != nil {
			close(release)
			t.Fatal("the delete never reached the worker")
		}
		time.Sleep(time.Millisecond)
	}
	steered := xdpCount(t, tp.g, steeredBy)
	stopAt.Store(sent.Load() + after)
	paused.Store(false)
	close(release)
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	if err := <-sendDone; err != nil {
		t.Fatal(err)
	}
	total := uint64(sent.Load())
	eventually(t, "every packet counted by XDP", func() bool {
		return xdpCount(t, tp.g, steeredBy)+xdpCount(t, tp.g, afterBy)-afterBase >= total
	})
	if got := xdpCount(t, tp.g, steeredBy); got != steered {
		t.Fatalf("XDP steered %d packets to the SA, %d of them after it was unpublished", got, got-steered)
	}
	if steered < 200 || steered >= total {
		t.Fatalf("XDP steered %d of %d packets: the delete did not happen mid-stream", steered, total)
	}

	st := w.Stats()
	ds := &st.Decap
	if dir == sa.Out {
		ds = &st.Encap
	}
	if n := ds.Drops[esp.ReasonNoSA].Load(); n != 0 {
		t.Errorf("worker dropped %d steered packets as no_sa", n)
	}
	for r := range ds.Drops {
		if n := ds.Drops[r].Load(); n != 0 {
			t.Errorf("worker %d dropped %d packets: %s", w.ID(), n, worker.Drop(r))
		}
	}
	if n := entry.Counters.Packets.Load(); n != steered {
		t.Errorf("the SA processed %d packets, XDP steered %d to it", n, steered)
	}
	eventually(t, "every steered packet delivered", func() bool { return uint64(delivered()) == steered })
	if st.Drained.Load() == 0 {
		t.Error("no removal waited for its frames")
	}
	t.Logf("%d of %d packets steered before the delete, all delivered; %d counted as %s after it",
		steered, total, xdpCount(t, tp.g, afterBy)-afterBase, afterBy)
}
