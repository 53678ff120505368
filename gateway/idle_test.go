package gateway

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/internal/pkt"
)

// Through the real data path (XDP, AF_XDP, the worker): an SA pair's
// ciphers are built by its first packets, released once the pair was
// idle for Options.CipherIdle, and built again by the next packets, which
// go through byte-exact both ways with sequence numbers going on.
func TestGatewayIdleCipherRebuilt(t *testing.T) {
	tp := newTopoWith(t, 1, Options{CipherIdle: time.Second})
	phone := udpSock(t, tp.phone, "192.0.2.10:4500")
	coreUDP := udpSock(t, tp.core, coreAddr.String())
	phoneOut := mustSA(t, spiIn, keyIn, 0)
	phoneIn := mustSA(t, spiOut, keyOut, 1024)
	st := tp.g.Workers[0].Stats()
	buf := make([]byte, 2048)

	round := func(i int) {
		t.Helper()
		inner := pkt.UDP4(phoneInner, coreAddr, []byte(fmt.Sprintf("REGISTER %d", i)))
		if _, err := phone.WriteToUDP(seal(t, phoneOut, inner), gwPublic); err != nil {
			t.Fatal(err)
		}
		coreUDP.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, from, err := coreUDP.ReadFromUDPAddrPort(buf)
		if err != nil || from != phoneInner || !bytes.Equal(buf[:n], inner[28:]) {
			t.Fatalf("round %d: core got %q from %v (%v)", i, buf[:n], from, err)
		}
		reply := []byte(fmt.Sprintf("SIP/2.0 200 OK %d", i))
		if _, err := coreUDP.WriteToUDPAddrPort(reply, phoneInner); err != nil {
			t.Fatal(err)
		}
		phone.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err = phone.Read(buf)
		if err != nil {
			t.Fatalf("round %d: phone: %v", i, err)
		}
		res, err := phoneIn.Open(buf[:n])
		if err != nil || res.Seq != uint64(i) || !bytes.Equal(buf[res.Start+28:res.End], reply) {
			t.Fatalf("round %d: phone opened seq %d %q (%v)", i, res.Seq, buf[res.Start:res.End], err)
		}
		in, _ := tp.g.Manager.Counters(sa.ID{Dir: sa.In, SPI: spiIn})
		out, _ := tp.g.Manager.Counters(sa.ID{Dir: sa.Out, SPI: spiOut, Peer: netip.MustParseAddrPort("192.0.2.10:4500")})
		if in.Seq != uint64(i) || out.Seq != uint64(i) {
			t.Fatalf("round %d: gateway seq in %d out %d", i, in.Seq, out.Seq)
		}
	}
	waitReleases := func(n uint64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for st.CipherReleases.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d cipher releases after 10 s, want %d", st.CipherReleases.Load(), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	round(1)
	if b := st.CipherBuilds.Load(); b != 2 {
		t.Fatalf("%d ciphers built by the first packets, want 2", b)
	}
	waitReleases(2)
	round(2)
	round(3)
	if b := st.CipherBuilds.Load(); b != 4 {
		t.Fatalf("%d ciphers built, want 4 (two after the release)", b)
	}
	waitReleases(4)
	round(4)
}
