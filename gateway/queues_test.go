package gateway

import (
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/internal/pkt"
)

// An SA's packets reach its worker whatever RX queue they arrive on, in
// both directions: 4-queue veths, senders on 16 ports each (the sender's
// flow hash picks the TX queue, and a veth delivers on the RX queue of
// that number, like RSS by ports on a NIC), 2 workers with a socket on
// every queue of each side. Every packet is delivered, none is dropped for
// want of a socket, and more than one queue carried traffic each way.
func TestGatewayEveryRXQueue(t *testing.T) {
	const queues, workers, flows, rounds = 4, 2, 16, 8
	tp := newTopoQueues(t, workers, queues, Options{}, "", nil)
	if got := len(tp.g.RX); got != 2*queues*workers {
		t.Fatalf("%d AF_XDP sockets, want %d (queues × workers per side)", got, 2*queues*workers)
	}
	owners := map[[2]int]int{}
	for _, s := range tp.g.RX {
		side := 0
		if s.Private {
			side = 1
		}
		if s.XSK.OwnsRings() {
			owners[[2]int{side, s.Queue}]++
		}
	}
	if len(owners) != 2*queues {
		t.Fatalf("ring owners %v: want exactly one per (side, queue)", owners)
	}
	for k, n := range owners {
		if n != 1 {
			t.Fatalf("side/queue %v has %d ring owners", k, n)
		}
	}

	phones := make([]*net.UDPConn, flows)
	for i := range phones {
		phones[i] = udpSock(t, tp.phone, fmt.Sprintf("192.0.2.10:%d", 4500+i))
	}
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	buf := make([]byte, 2048)

	// Decap: round by round, so reordering across queues stays inside
	// the replay window.
	sent := 0
	for r := 0; r < rounds; r++ {
		for i, c := range phones {
			inner := pkt.UDP4(phoneInner, coreAddr, fmt.Appendf(nil, "decap %d/%d", r, i))
			if _, err := c.WriteToUDP(seal(t, phoneOut, inner), gwPublic); err != nil {
				t.Fatal(err)
			}
			sent++
		}
		for i := 0; i < flows; i++ {
			coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, _, err := coreUDP.ReadFromUDPAddrPort(buf); err != nil {
				t.Fatalf("round %d: core got %d of %d: %v", r, i, flows, err)
			}
		}
	}
	// Bring the phone's binding back to port 4500 for the replies.
	inner := pkt.UDP4(phoneInner, coreAddr, []byte("last"))
	if _, err := phones[0].WriteToUDP(seal(t, phoneOut, inner), gwPublic); err != nil {
		t.Fatal(err)
	}
	sent++
	coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, _, err := coreUDP.ReadFromUDPAddrPort(buf); err != nil || string(buf[:n]) != "last" {
		t.Fatalf("core got %q (%v), want the last decap packet", buf[:n], err)
	}

	// Encap: the core answers from 16 ports.
	cores := make([]*net.UDPConn, flows)
	for i := range cores {
		cores[i] = udpSock(t, tp.core, fmt.Sprintf("10.0.0.1:%d", 6000+i))
	}
	replies := 0
	for r := 0; r < rounds; r++ {
		for i, c := range cores {
			if _, err := c.WriteToUDPAddrPort(fmt.Appendf(nil, "encap %d/%d", r, i), phoneInner); err != nil {
				t.Fatal(err)
			}
			replies++
		}
		for i := 0; i < flows; i++ {
			phones[0].SetReadDeadline(time.Now().Add(3 * time.Second))
			n, err := phones[0].Read(buf)
			if err != nil {
				t.Fatalf("round %d: phone got %d of %d: %v", r, i, flows, err)
			}
			if n < 8 || binary.BigEndian.Uint32(buf[:4]) != spiOut {
				t.Fatalf("round %d: phone got %x, want ESP of SPI %#x", r, buf[:n], spiOut)
			}
		}
	}

	for _, r := range []bpf.Reason{bpf.DropNoXSK, bpf.PrivDropNoXSK} {
		if n := xdpCount(t, tp.g, r); n != 0 {
			t.Errorf("xdp %s: %d, want 0", r, n)
		}
	}
	var decap, encap uint64
	for _, w := range tp.g.Workers {
		st := w.Stats()
		decap += st.Decap.Packets.Load()
		encap += st.Encap.Packets.Load()
	}
	if decap != uint64(sent) || encap != uint64(replies) {
		t.Errorf("workers forwarded decap %d encap %d, want %d and %d", decap, encap, sent, replies)
	}
	// Which queues carried traffic: the RX producer index of each socket
	// counts what the kernel queued there.
	used := [2]map[int]uint32{{}, {}}
	for _, s := range tp.g.RX {
		side := 0
		if s.Private {
			side = 1
		}
		if prod, _ := s.XSK.RxPositions(); prod > 0 {
			used[side][s.Queue] += prod
		}
	}
	t.Logf("packets per RX queue: public %v, private %v", used[0], used[1])
	if len(used[0]) < 2 || len(used[1]) < 2 {
		t.Errorf("traffic on public queues %v and private queues %v: want at least two of each", used[0], used[1])
	}
}

// Each queue's fill ring gets at most an equal share of the UMEM, as a
// power of two, never more than configured and never under 64.
func TestFillRingFor(t *testing.T) {
	for _, c := range []struct{ configured, frames, queues, want int }{
		{8192, 16384, 2, 8192}, // the defaults, one queue per side: unchanged
		{8192, 16384, 8, 2048},
		{8192, 16384, 6, 2048}, // 2730 rounds down
		{1024, 65536, 4, 1024}, // the configured size caps
		{4096, 256, 16, 64},    // floor
	} {
		if got := fillRingFor(c.configured, c.frames, c.queues); got != c.want {
			t.Errorf("fillRingFor(%d, %d, %d) = %d, want %d", c.configured, c.frames, c.queues, got, c.want)
		}
	}
}

// A hand-over lists every socket once, worker by worker, and with one
// queue per side in the order the one-queue exporters used (worker 0's
// public and private socket, then worker 1's), so it goes both ways
// between versions.
func TestHandoverIndex(t *testing.T) {
	for _, c := range []struct{ workers, pub, priv int }{{2, 1, 1}, {2, 4, 4}, {3, 4, 2}, {1, 8, 1}} {
		queues := [2]int{c.pub, c.priv}
		n := c.workers * (c.pub + c.priv)
		seen := make([]bool, n)
		for w := range c.workers {
			for side := range 2 {
				for q := range queues[side] {
					i := handoverIndex(w, side, q, queues)
					if i < 0 || i >= n || seen[i] {
						t.Fatalf("%+v: worker %d side %d queue %d at %d: outside 0..%d or taken", c, w, side, q, i, n-1)
					}
					seen[i] = true
				}
			}
		}
	}
	for w := range 3 {
		for side := range 2 {
			if got := handoverIndex(w, side, 0, [2]int{1, 1}); got != 2*w+side {
				t.Errorf("one queue per side: worker %d side %d at %d, want %d", w, side, got, 2*w+side)
			}
		}
	}
}

// The queue counts a successor reports must be the running sockets'; one
// that reports none (an older xesp) can take over one queue per side only.
func TestCompareQueues(t *testing.T) {
	for _, c := range []struct {
		next, running [2]int
		want          string
	}{
		{[2]int{4, 4}, [2]int{4, 4}, ""},
		{[2]int{1, 1}, [2]int{1, 1}, ""},
		{[2]int{}, [2]int{1, 1}, ""},
		{[2]int{}, [2]int{4, 4}, "does not say how many RX queues"},
		{[2]int{8, 4}, [2]int{4, 4}, "public.interface has 8 RX queues now and the running daemon (pid 7) serves 4"},
		{[2]int{4, 2}, [2]int{4, 4}, "private.interface has 2 RX queues"},
	} {
		err := compareQueues(c.next, c.running, 7)
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("compareQueues(%v, %v) = %v, want %q", c.next, c.running, err, c.want)
		}
	}
}
