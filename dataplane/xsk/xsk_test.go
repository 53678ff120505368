package xsk_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/xsktest"
)

const testPort = 7777

func newUMEM(t testing.TB, cfg xsk.Config) *xsk.UMEM {
	t.Helper()
	netns.RequireRoot(t)
	u, err := xsk.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := u.Close(); err != nil {
			t.Errorf("close umem: %v", err)
		}
	})
	return u
}

func steer(t testing.TB, workers int) *xsktest.Steer {
	t.Helper()
	s, err := xsktest.NewSteer(testPort, workers, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// Three worker sockets share queue 0 of one veth (XDP_SHARED_UMEM, one
// fill and completion ring); the XDP program steers each datagram by its
// first payload byte. Every socket gets exactly its own datagrams, byte
// for byte, with the program's metadata just before the packet.
func TestSteerSharedQueueAndMetadata(t *testing.T) {
	const workers, perWorker = 3, 20
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{Headroom: 64, FrameCount: 1024, FillSize: 512, CompletionSize: 512, RxSize: 256, TxSize: 256})
	st := steer(t, workers)
	socks := make([]*xsk.Socket, workers)
	pools := make([]*xsk.Pool, workers)
	for w := range socks {
		socks[w] = open(t, u, tp.a)
		pools[w] = u.NewPool()
		if err := st.Set(0, w, socks[w].FD()); err != nil {
			t.Fatal(err)
		}
		if m := socks[w].Mode(); m != xsk.ModeCopy {
			t.Errorf("socket %d mode %v: veth offers only copy mode (docs/platform.md)", w, m)
		}
		if !socks[w].TxBudgetSet() {
			t.Logf("socket %d: XDP_MAX_TX_SKB_BUDGET not supported by this kernel", w)
		}
	}
	if _, err := socks[0].Refill(pools[0], 0); err != nil {
		t.Fatal(err)
	}
	attach(t, tp.a, st.Prog)

	c := udpFrom(t, tp.peer1, 5555)
	dst := &net.UDPAddr{IP: tp.a.ip, Port: testPort}
	for i := 0; i < workers*perWorker; i++ {
		msg := []byte(fmt.Sprintf("%c datagram %03d for worker %d", byte(i%workers), i, i%workers))
		if _, err := c.WriteToUDP(msg, dst); err != nil {
			t.Fatal(err)
		}
	}

	want := func(i int) []byte {
		return xsktest.UDPFrame(tp.a.mac, tp.peer1.mac, tp.peer1.ip, tp.a.ip, 5555, testPort,
			[]byte(fmt.Sprintf("%c datagram %03d for worker %d", byte(i%workers), i, i%workers)))
	}
	for w, s := range socks {
		got, err := receive(s, pools[w], perWorker, 3*time.Second)
		if err != nil {
			t.Fatalf("worker %d: %v", w, err)
		}
		for k, d := range got {
			i := k*workers + w
			pkt := u.Packet(d)
			// IP ID, DF and so the header checksum are the sender stack's
			// choice; compare around them.
			if exp := want(i); len(pkt) != len(exp) || !bytes.Equal(pkt[:18], exp[:18]) || !bytes.Equal(pkt[22:24], exp[22:24]) ||
				!bytes.Equal(pkt[26:], exp[26:]) {
				t.Fatalf("worker %d packet %d:\n got %x\nwant %x", w, k, pkt, exp)
			}
			if off := d.Addr - u.FrameBase(d.Addr); off != uint64(u.RxOffset()) {
				t.Errorf("rx packet at frame offset %d, want headroom 64 + XDP_PACKET_HEADROOM 256 = %d", off, u.RxOffset())
			}
			if w == 0 && k == 0 {
				t.Logf("32 bytes before the first packet: %x", u.Meta(d.Addr, 32))
			}
			meta := u.Meta(d.Addr, xsktest.MetaLen)
			var wantMeta [8]byte
			binary.BigEndian.PutUint16(wantMeta[0:], 5555)
			wantMeta[2], wantMeta[3] = 0, byte(w)
			binary.LittleEndian.PutUint32(wantMeta[4:], xsktest.MetaMagic)
			if !bytes.Equal(meta, wantMeta[:]) {
				t.Errorf("worker %d packet %d: metadata before the packet %x, want %x (16 bytes before: %x)",
					w, k, meta, wantMeta, u.Meta(d.Addr, 16))
			}
		}
		pools[w].PutDescs(got)
		if n := s.Receive(make([]xsk.Desc, 8)); n != 0 {
			t.Errorf("worker %d got %d packets more than it was sent", w, n)
		}
	}
	a := settle(t, u, socks[0], pools[0])
	if a.Worker != 0 || a.RX != 0 || a.KernelRX != 0 {
		t.Errorf("after draining: %+v", a)
	}
	for w, s := range socks {
		st, err := s.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if st != (xsk.Stats{}) {
			t.Errorf("worker %d stats %+v, want all zero", w, st)
		}
	}
}
