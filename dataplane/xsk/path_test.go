package xsk_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/lab/xsktest"
)

// transmitAll puts descs on s's TX ring and kicks until all are taken,
// recycling completions into p meanwhile.
func transmitAll(t testing.TB, s *xsk.Socket, p *xsk.Pool, descs []xsk.Desc) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(descs) > 0 {
		n, err := s.Transmit(descs)
		if err != nil {
			t.Fatal(err)
		}
		descs = descs[n:]
		if err := s.Kick(); err != nil {
			t.Fatal(err)
		}
		s.Complete(p)
		if time.Now().After(deadline) {
			t.Fatalf("tx ring stayed full with %d descriptors left", len(descs))
		}
	}
}

func readUDPErr(c *net.UDPConn, n int) (msgs [][]byte, from []*net.UDPAddr, err error) {
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 4096)
	for len(msgs) < n {
		k, a, err := c.ReadFromUDP(buf)
		if err != nil {
			return msgs, from, fmt.Errorf("after %d of %d datagrams: %w", len(msgs), n, err)
		}
		msgs = append(msgs, append([]byte(nil), buf[:k]...))
		from = append(from, a)
	}
	return msgs, from, nil
}

// sendAndRead transmits tx on s in batches of 64 and reads each batch
// from c before sending the next: the receiving UDP socket's buffer holds
// only ~256 of these datagrams and a loaded machine may not schedule a
// concurrent reader in time.
func sendAndRead(t testing.TB, s *xsk.Socket, p *xsk.Pool, tx []xsk.Desc, c *net.UDPConn) (msgs [][]byte, from []*net.UDPAddr) {
	t.Helper()
	for len(tx) > 0 {
		n := min(64, len(tx))
		transmitAll(t, s, p, tx[:n])
		m, f, err := readUDPErr(c, n)
		if err != nil {
			t.Fatalf("after %d datagrams: %v", len(msgs), err)
		}
		msgs, from = append(msgs, m...), append(from, f...)
		tx = tx[n:]
	}
	return msgs, from
}

// RX → TX on the same device: the worker wraps each received IP packet
// in a new Ethernet/IPv4/UDP header written into the headroom in front of
// it, so TX starts 28 bytes before where RX put the Ethernet header. The
// peer's ordinary UDP socket gets the original IP packets back.
func TestReflectSameDevice(t *testing.T) {
	const count = 200
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{FrameCount: 2048, FillSize: 512, CompletionSize: 512, RxSize: 512, TxSize: 512})
	st := steer(t, 1)
	s := open(t, u, tp.a)
	p := u.NewPool()
	if err := st.Set(0, 0, s.FD()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Refill(p, 0); err != nil {
		t.Fatal(err)
	}
	attach(t, tp.a, st.Prog)
	c := udpFrom(t, tp.peer1, 5556)
	dst := &net.UDPAddr{IP: tp.a.ip, Port: testPort}
	for i := 0; i < count; i++ {
		if _, err := c.WriteToUDP([]byte(fmt.Sprintf("\x00reflect me %d", i)), dst); err != nil {
			t.Fatal(err)
		}
	}
	got, err := receive(s, p, count, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var sent [][]byte
	tx := make([]xsk.Desc, len(got))
	for i, d := range got {
		inner := append([]byte(nil), u.Packet(d)[14:]...)
		sent = append(sent, inner)
		reply := xsktest.UDPFrame(tp.peer1.mac, tp.a.mac, tp.a.ip, tp.peer1.ip, testPort, 5556, inner)
		start := d.Addr + 14 - 42
		copy(u.Frame(start)[start-u.FrameBase(start):], reply)
		tx[i] = xsk.Desc{Addr: start, Len: uint32(len(reply))}
	}
	msgs, from := sendAndRead(t, s, p, tx, c)
	for i := range msgs {
		if !bytes.Equal(msgs[i], sent[i]) || from[i].Port != testPort || !from[i].IP.Equal(tp.a.ip) {
			t.Fatalf("reply %d from %v: %x, want %x", i, from[i], msgs[i], sent[i])
		}
	}
	a := settle(t, u, s, p)
	if a.Worker != 0 || a.TX != 0 || a.KernelTX != 0 || a.Completion != 0 || a.Lost != 0 {
		t.Errorf("after reflecting %d packets: %+v", count, a)
	}
}

// RX on device A → TX on device B without a copy: one UMEM holds both
// sockets, each (device, queue) with its own fill and completion ring.
// peer1 sends UDP whose payload is an inner IPv4/UDP packet for peer2;
// the worker drops the outer 42 bytes, writes an Ethernet header in front
// of the inner packet (TX at RX address + 28) and sends it on B. peer2's
// UDP socket receives the inner payload from the inner source.
func TestCrossDeviceSharedUMEM(t *testing.T) {
	const count = 300
	tp := newTopo(t, true)
	u := newUMEM(t, xsk.Config{FrameCount: 2048, FillSize: 512, CompletionSize: 512, RxSize: 512, TxSize: 512})
	st := steer(t, 1)
	sa := open(t, u, tp.a)
	sb := open(t, u, tp.b)
	if sb.Mode() != sa.Mode() {
		t.Errorf("modes differ: A %v, B %v", sa.Mode(), sb.Mode())
	}
	p := u.NewPool()
	if err := st.Set(0, 0, sa.FD()); err != nil {
		t.Fatal(err)
	}
	if _, err := sa.Refill(p, 0); err != nil {
		t.Fatal(err)
	}
	attach(t, tp.a, st.Prog)

	// A frame may be sent from any offset, but not across its end.
	if n, err := sb.Transmit([]xsk.Desc{{Addr: uint64(u.FrameSize()) - 10, Len: 20}}); n != 0 || !errors.Is(err, xsk.ErrInvalidDesc) {
		t.Fatalf("descriptor across a frame boundary: n=%d err=%v", n, err)
	}

	c := udpFrom(t, tp.peer1, 5557)
	srv := udpFrom(t, tp.peer2, 9999)
	dst := &net.UDPAddr{IP: tp.a.ip, Port: testPort}
	for i := 0; i < count; i++ {
		inner := xsktest.IPv4UDP(tp.peer1.ip, tp.peer2.ip, 6000, 9999, []byte(fmt.Sprintf("inner %d", i)))
		if _, err := c.WriteToUDP(append([]byte{0}, inner...), dst); err != nil {
			t.Fatal(err)
		}
	}
	got, err := receive(sa, p, count, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tx := make([]xsk.Desc, len(got))
	for i, d := range got {
		// Outer eth 14 + IP 20 + UDP 8 + the steering byte = 43.
		start := d.Addr + 43 - 14
		f := u.Frame(start)[start-u.FrameBase(start):]
		copy(f[0:6], tp.peer2.mac)
		copy(f[6:12], tp.b.mac)
		f[12], f[13] = 0x08, 0x00
		tx[i] = xsk.Desc{Addr: start, Len: d.Len - 29}
	}
	msgs, from := sendAndRead(t, sb, p, tx, srv)
	for i := range msgs {
		if want := fmt.Sprintf("inner %d", i); string(msgs[i]) != want || from[i].Port != 6000 || !from[i].IP.Equal(tp.peer1.ip) {
			t.Fatalf("peer2 datagram %d from %v: %q, want %q", i, from[i], msgs[i], want)
		}
	}
	a := settle(t, u, sb, p)
	if a.Worker != 0 || a.TX != 0 || a.KernelTX != 0 || a.Completion != 0 || a.Lost != 0 {
		t.Errorf("after forwarding %d packets: %+v", count, a)
	}
	if a.Fill == 0 {
		t.Errorf("fill ring of A empty after refills: %+v", a)
	}
}

// With 8 frames on the fill ring and 40 packets arriving, 8 are received
// and the other 32 show in the fill-ring-empty statistic, and the books
// still balance.
func TestFillRingStarved(t *testing.T) {
	const given, sent = 8, 40
	tp := newTopo(t, false)
	u := newUMEM(t, xsk.Config{FrameCount: 512, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
	st := steer(t, 1)
	s := open(t, u, tp.a)
	p := u.NewPool()
	if err := st.Set(0, 0, s.FD()); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Refill(p, given); n != given || err != nil {
		t.Fatalf("refill %d: %d, %v", given, n, err)
	}
	attach(t, tp.a, st.Prog)
	c := udpFrom(t, tp.peer1, 5558)
	for i := 0; i < sent; i++ {
		if _, err := c.WriteToUDP([]byte{0, byte(i)}, &net.UDPAddr{IP: tp.a.ip, Port: testPort}); err != nil {
			t.Fatal(err)
		}
	}
	// Receive until every packet sent is accounted for (received, or
	// counted against the empty fill ring), however long the kernel takes
	// to deliver them on a loaded machine; then the counts must be exact.
	var got []xsk.Desc
	var stats xsk.Stats
	batch := make([]xsk.Desc, 64)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		n := s.Receive(batch)
		got = append(got, batch[:n]...)
		var err error
		if stats, err = s.Stats(); err != nil {
			t.Fatal(err)
		}
		if uint64(len(got))+stats.RxFillRingEmptyDescs >= sent || time.Now().After(deadline) {
			break
		}
	}
	if len(got) != given {
		t.Fatalf("received %d packets with %d frames on the fill ring", len(got), given)
	}
	for i, d := range got {
		if pl := u.Packet(d)[42:]; !bytes.Equal(pl, []byte{0, byte(i)}) {
			t.Errorf("packet %d payload %x", i, pl)
		}
	}
	t.Logf("stats with a starved fill ring: %+v", stats)
	if stats.RxFillRingEmptyDescs != sent-given {
		t.Errorf("fill ring empty %d times, want %d", stats.RxFillRingEmptyDescs, sent-given)
	}
	a := u.Accounting()
	if a.Worker != given || a.Fill != 0 || a.Total() != int64(u.Config().FrameCount) {
		t.Errorf("accounting %+v (total %d)", a, a.Total())
	}
	p.PutDescs(got)
	settle(t, u, s, p)
}

func fdCount(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// xskMappings counts this process's mappings of AF_XDP rings.
func xskMappings(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "XDP") || strings.Contains(l, "socket:") {
			n++
		}
	}
	return n
}

// Closing one socket of a queue returns its frames and keeps the others
// working; a new socket on the same queue works; closing the UMEM leaves
// no fd and no mapping behind, twice; a new UMEM then works again.
func TestCloseAndReopen(t *testing.T) {
	tp := newTopo(t, false)
	st := steer(t, 2)
	attach(t, tp.a, st.Prog)
	c := udpFrom(t, tp.peer1, 5559)
	dst := &net.UDPAddr{IP: tp.a.ip, Port: testPort}
	send := func(worker byte, n int) {
		for i := 0; i < n; i++ {
			if _, err := c.WriteToUDP([]byte{worker, byte(i)}, dst); err != nil {
				t.Fatal(err)
			}
		}
	}
	fds, maps := fdCount(t), xskMappings(t)

	for round := 0; round < 2; round++ {
		u, err := xsk.New(xsk.Config{FrameCount: 1024, FillSize: 256, CompletionSize: 256, RxSize: 256, TxSize: 256})
		if err != nil {
			t.Fatal(err)
		}
		s0, s1 := open(t, u, tp.a), open(t, u, tp.a)
		if got := xskMappings(t) - maps; got == 0 {
			t.Fatalf("round %d: ring mappings not visible in /proc/self/maps", round)
		}
		p := u.NewPool()
		for w, s := range []*xsk.Socket{s0, s1} {
			if err := st.Set(0, w, s.FD()); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := s0.Refill(p, 0); err != nil {
			t.Fatal(err)
		}
		send(0, 10)
		send(1, 10)
		d0, err := receive(s0, p, 10, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		p.PutDescs(d0)
		// s1 has 10 packets waiting on its RX ring: closing it must give
		// their frames back.
		time.Sleep(50 * time.Millisecond)
		if err := st.Clear(0, 1); err != nil {
			t.Fatal(err)
		}
		if err := s1.Close(); err != nil {
			t.Fatal(err)
		}
		if err := s1.Close(); err != nil {
			t.Fatalf("second close: %v", err)
		}
		a := settle(t, u, s0, p)
		if a.RX != 0 || a.Worker != 0 || a.Lost != 0 {
			t.Errorf("round %d after closing a socket with packets queued: %+v", round, a)
		}
		s1 = open(t, u, tp.a)
		if err := st.Set(0, 1, s1.FD()); err != nil {
			t.Fatal(err)
		}
		send(1, 5)
		d1, err := receive(s1, p, 5, 2*time.Second)
		if err != nil {
			t.Fatalf("round %d, reopened socket: %v", round, err)
		}
		p.PutDescs(d1)
		settle(t, u, s1, p)
		for w := 0; w < 2; w++ {
			if err := st.Clear(0, w); err != nil {
				t.Fatal(err)
			}
		}
		if err := u.Close(); err != nil {
			t.Fatal(err)
		}
		if err := u.Close(); err != nil {
			t.Fatalf("second umem close: %v", err)
		}
		if f, m := fdCount(t), xskMappings(t); f != fds || m != maps {
			t.Fatalf("round %d after close: %d fds (was %d), %d ring mappings (was %d)", round, f, fds, m, maps)
		}
	}
}
