package gateway

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/fdpass"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/loader"
	"golang.org/x/sys/unix"
)

// A hand-over whose replay state is larger than one socket message can
// carry: 250k SA pairs beside the test phone's encode to more than 48 MiB
// of windows and bindings, which inline as base64 JSON would pass the
// 64 MiB message limit (the hand-over used to fail there, and the running
// daemon stopped). An older successor, which takes the state inline, is
// refused before anything stops, naming the size. A current one gets the
// state as a sealed memfd over a real fdpass socket, the JSON stays small,
// and the successor continues the phone's replay window (the last packet
// the old daemon accepted is a replay to the new one) and forwards the
// next packet.
func TestHandOverLargeState(t *testing.T) {
	const pairs = 250_000
	tp := newTopo(t, 1)
	cfg := *tp.g.Config
	if err := tp.g.Stop(false); err != nil {
		t.Fatal(err)
	}
	big, err := pktgen.SAsRange(0, pairs, pktgen.DefaultNet())
	if err != nil {
		t.Fatal(err)
	}
	cfg.SAList = append(slices.Clone(cfg.SAList), big...)
	big = nil
	cfg.MaxSAs = max(cfg.MaxSAs, 1<<20)
	cfg.PinDir = "/sys/fs/bpf/" + netns.UniqueName("xesp-ho")
	t.Cleanup(func() {
		tp.gw.Do(func() error {
			return loader.DetachPinned(loader.Options{Public: cfg.Public.Interface, PinRoot: cfg.PinDir})
		})
		os.RemoveAll(cfg.PinDir)
	})
	tp.startWith(t, &cfg, Options{StateInterval: 200 * time.Millisecond})

	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	core := udpSock(t, tp.core, coreAddr.String())
	out := mustSA(t, spiIn, keyIn, 0)
	buf := make([]byte, 2048)
	var last []byte
	for i := range 3 {
		last = seal(t, out, pkt.UDP4(phoneInner, coreAddr, []byte{'a' + byte(i)}))
		if _, err := phone.WriteToUDP(last, gwPublic); err != nil {
			t.Fatal(err)
		}
		core.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, _, err := core.ReadFromUDPAddrPort(buf); err != nil || n != 1 || buf[0] != 'a'+byte(i) {
			t.Fatalf("packet %d before the hand-over: %q, %v", i, buf[:n], err)
		}
	}

	// The refusal reads the state files' size: wait for the first base.
	eventually(t, "the first state snapshot", func() bool { return tp.g.Persisted.Load() > 0 })
	next := ShapeOf(&cfg)
	next.RXQueues = [2]int{1, 1}
	if err := tp.g.CheckSuccessor(next); err == nil || !strings.Contains(err.Error(), "MiB") || !strings.Contains(err.Error(), "stop and start") {
		t.Fatalf("an older successor (state inline) for %d SAs: %v, want a refusal naming the size", 2*pairs+2, err)
	}
	next.StateFD = true
	if err := tp.g.CheckSuccessor(next); err != nil {
		t.Fatalf("a current successor: %v", err)
	}

	// As `xesp run --upgrade-from` does: the SA database is built
	// before the running gateway is asked.
	prepared, err := Prepare(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	h, fds, err := tp.g.HandOver(context.Background(), next)
	if err != nil {
		t.Fatal(err)
	}
	if !h.RxStateFD || len(h.RxState) != 0 {
		t.Fatalf("hand-over: state by descriptor %v, %d bytes inline", h.RxStateFD, len(h.RxState))
	}
	var st unix.Stat_t
	if err := unix.Fstat(fds[len(fds)-1], &st); err != nil {
		t.Fatal(err)
	}
	if inline := st.Size * 4 / 3; inline <= fdpass.MaxMessage {
		t.Fatalf("the replay state is %d bytes (%d as base64): under the message limit, the test proves nothing", st.Size, inline)
	}
	msg, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	if len(msg) > 1<<20 {
		t.Fatalf("hand-over JSON of %d bytes, want under 1 MiB with the state in a descriptor", len(msg))
	}
	a, b := unixPair(t)
	errc := make(chan error, 1)
	go func() { errc <- fdpass.Send(a, msg, fds) }()
	got, gotFDs, err := fdpass.Recv(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	up := &Upgrade{FDs: gotFDs}
	if err := json.Unmarshal(got, &up.Handover); err != nil {
		t.Fatal(err)
	}
	old := tp.g
	tp.startWith(t, &cfg, Options{Upgrade: up, Prepared: prepared})
	old.FinishHandOver()
	t.Logf("%d SAs: %d bytes of replay state in the memfd, %d of JSON", 2*pairs+2, st.Size, len(msg))

	if _, err := phone.WriteToUDP(last, gwPublic); err != nil {
		t.Fatal(err)
	}
	if _, err := phone.WriteToUDP(seal(t, out, pkt.UDP4(phoneInner, coreAddr, []byte("d"))), gwPublic); err != nil {
		t.Fatal(err)
	}
	core.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _, err := core.ReadFromUDPAddrPort(buf); err != nil || string(buf[:n]) != "d" {
		t.Fatalf("after the hand-over the core got %q (%v), want the new packet and not the replay", buf[:n], err)
	}
	if n := workerDrops(tp, decapOf, worker.Drop(esp.ReasonReplay)); n != 1 {
		t.Fatalf("the successor counted %d replays, want 1 (the old daemon's last packet)", n)
	}
}

// unixPair is a connected pair of Unix stream sockets, closed at cleanup.
func unixPair(t *testing.T) (a, b *net.UnixConn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if a, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"}); err != nil {
		t.Fatal(err)
	}
	if b, err = ln.AcceptUnix(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}
