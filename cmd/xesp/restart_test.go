package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/rxstate"
	"github.com/xesp/xesp/lab/netns"
)

// espOnWire is one ESP-in-UDP packet seen on the phone's link.
type espOnWire struct {
	src, dst netip.AddrPort
	spi      uint32
	seq      uint32
	payload  []byte // the UDP payload: SPI onwards
}

// capturePhoneLink records every ESP-in-UDP frame on the phone's only
// link, both directions, until the test ends; stop returns them, with
// every frame the link carried before stop was called.
func capturePhoneLink(t *testing.T, ns *netns.NS) (stop func() []espOnWire) {
	t.Helper()
	var fd int
	if err := ns.Do(func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		var idx int
		for _, i := range ifs {
			if i.Flags&net.FlagLoopback == 0 {
				idx = i.Index
			}
		}
		proto := 0x0300 // htons(ETH_P_ALL): a protocol-specific socket misses outgoing frames
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: idx})
	}); err != nil {
		t.Fatal(err)
	}
	// Room for a few seconds of 8000 packets/s in case the reader is
	// not scheduled for a while (the default ~200 KB holds ~250 frames).
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20)
	tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	done := make(chan struct{})
	out := make(chan []espOnWire, 1)
	go func() {
		var got []espOnWire
		buf := make([]byte, 9000)
		for {
			flags := 0
			select {
			case <-done:
				// Stopped: take what is already queued, then end.
				flags = unix.MSG_DONTWAIT
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, flags)
			if flags != 0 && err != nil {
				unix.Close(fd)
				out <- got
				return
			}
			if err != nil {
				continue
			}
			f := buf[:n]
			if len(f) < 14+20+8+8 || f[12] != 0x08 || f[13] != 0 || f[14]>>4 != 4 || f[14+9] != 17 {
				continue
			}
			ihl := int(f[14]&0xf) * 4
			udp := f[14+ihl:]
			if len(udp) < 16 {
				continue
			}
			sport, dport := binary.BigEndian.Uint16(udp), binary.BigEndian.Uint16(udp[2:])
			esp := udp[8:]
			spi := binary.BigEndian.Uint32(esp)
			if spi == 0 || (dport != 4500 && sport != 4500) {
				continue // IKE (non-ESP marker) or not NAT-T
			}
			got = append(got, espOnWire{
				src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(f[14+12:])), sport),
				dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(f[14+16:])), dport),
				spi:     spi,
				seq:     binary.BigEndian.Uint32(esp[4:]),
				payload: append([]byte(nil), esp...),
			})
		}
	}()
	var stopped bool
	var result []espOnWire
	stop = func() []espOnWire {
		if !stopped {
			stopped = true
			close(done)
			result = <-out
		}
		return result
	}
	t.Cleanup(func() { stop() })
	return stop
}

// Crash safety of both directions (issue 7): traffic, then kill -9 after
// the periodic snapshot, then a new daemon. Captured on the phone's link
// over the whole run, no (SPI, sequence number) pair the gateway sent
// repeats (no GCM IV reuse); every phone packet of the first run replayed
// at the new daemon, from the phone's port and from another, is dropped
// as a replay (the window was restored) and answered by nothing; the
// phone's new packets still get through.
func TestRunDaemonKill9KeepsReplayWindow(t *testing.T) {
	d := newDaemonTopo(t)
	stopCapture := capturePhoneLink(t, d.phone)
	inner := netip.MustParseAddrPort("10.99.0.1:5060")
	ph := d.newPhone(t, 4500, mustESP(t, 0x1001, runKeyIn, 0), mustESP(t, 0x2001, runKeyOut, 4096))

	dm := d.start(t)
	for i := 0; i < 5; i++ {
		talk(t, ph, inner, fmt.Sprintf("OPTIONS before #%d", i))
	}
	d.waitSnapshot(t, "the phone's five packets in a replay window", func(r rxstate.Record) bool { return r.Replay != nil && r.Replay.Top >= 5 })
	dm.cmd.Process.Kill()
	<-dm.exited
	before := stopCapture()
	stopCapture = capturePhoneLink(t, d.phone)

	d.start(t)
	var other *net.UDPConn
	if err := d.phone.Do(func() (err error) {
		other, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 10), Port: 4600})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	gw := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4500}
	replayed := 0
	for _, p := range before {
		if p.spi == 0x1001 {
			other.WriteToUDP(p.payload, gw)
			replayed++
		}
	}
	if replayed != 5 {
		t.Fatalf("captured %d phone packets before the crash, want 5", replayed)
	}
	c, err := api.NewClient("unix:"+d.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var st api.Stats
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if st, err = c.Stats(context.Background()); err != nil {
			t.Fatal(err)
		}
		if st.In.Drops["replay"] >= uint64(replayed) || time.Now().After(deadline) {
			break
		}
	}
	if st.In.Drops["replay"] != uint64(replayed) || st.In.Packets != 0 {
		t.Fatalf("after the crash the replays were not all dropped: %d replay drops, %d forwarded", st.In.Drops["replay"], st.In.Packets)
	}
	other.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := other.Read(make([]byte, 2048)); err == nil {
		t.Fatalf("the replaying socket got %d bytes: a replay was answered", n)
	}
	for i := 0; i < 5; i++ {
		talk(t, ph, inner, fmt.Sprintf("OPTIONS after #%d", i))
	}
	all := append(before, stopCapture()...)

	type pair struct {
		spi uint32
		seq uint32
	}
	fromGW := map[pair]int{}
	n := 0
	for _, p := range all {
		if p.src.Addr() == netip.MustParseAddr("192.0.2.1") {
			fromGW[pair{p.spi, p.seq}]++
			n++
		}
	}
	if n != 10 {
		t.Fatalf("captured %d gateway packets, want 10 replies", n)
	}
	for k, c := range fromGW {
		if c != 1 {
			t.Fatalf("the gateway sent SPI %#x sequence %d %d times", k.spi, k.seq, c)
		}
	}
}
