package topo

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/lab/netns"
)

func startLab(t *testing.T, o Options) *Lab {
	t.Helper()
	netns.RequireRoot(t)
	o.Prefix = netns.UniqueName("lab") + "-"
	l, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kamailio log:\n%s", l.KamailioLog())
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
	return l
}

// register has phone p REGISTER and then send OPTIONS with sipsak and
// checks both answers are kamailio's 200 for this phone's own Call-ID.
func register(t *testing.T, l *Lab, p *Phone, tag string) {
	t.Helper()
	for i, method := range []string{"REGISTER", "OPTIONS"} {
		callID := fmt.Sprintf("%s-%s-%s@xesp", tag, p.User, strings.ToLower(method))
		r, err := l.Sipsak(context.Background(), p, method, callID, i+1)
		if err != nil {
			t.Fatalf("ue%d %s: %v", p.N, method, err)
		}
		if !r.OK() || r.CallID != callID || r.CSeq != fmt.Sprintf("%d %s", i+1, method) {
			t.Fatalf("ue%d %s: got %q Call-ID %q CSeq %q, want 200 for Call-ID %q:\n%s", p.N, method, r.Status, r.CallID, r.CSeq, callID, r.Raw)
		}
		if !strings.Contains(r.Raw, "Server: kamailio") {
			t.Fatalf("ue%d %s: reply not from kamailio:\n%s", p.N, method, r.Raw)
		}
	}
}

// Three phones behind one NAPT, each with its own SA pair, run sipsak
// through their TUNs at the same time: every one gets kamailio's 200 OK
// for its own Call-ID (a reply sealed for another phone would not open
// under its SA), the gateway learns a distinct NAPT port per phone, and
// kamailio saw each request from the phone's inner address.
func TestThreePhonesRegister(t *testing.T) {
	l := startLab(t, Options{Phones: 3})
	var wg sync.WaitGroup
	for _, p := range l.Phones {
		wg.Add(1)
		go func() { defer wg.Done(); register(t, l, p, "three") }()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	ports := map[uint16]int{}
	for _, p := range l.Phones {
		in, binding := l.InCounters(p.SPIIn)
		out := l.OutPackets(p.SPIOut)
		if binding.Addr() != NAPTWAN || in < 2 || out < 2 {
			t.Fatalf("ue%d: binding %s, packets in %d out %d", p.N, binding, in, out)
		}
		ports[binding.Port()] = p.N
		c := p.Tunnel.Counters()
		// Every ESP packet the gateway sealed for this phone opened
		// under this phone's inbound SA and reached its TUN.
		if c.Received != out || c.ToTUN != out || len(c.DropList()) != 0 {
			t.Fatalf("ue%d: gateway sealed %d, phone counters %+v", p.N, out, c)
		}
		log := l.KamailioLog()
		for _, m := range []string{"REGISTER", "OPTIONS"} {
			want := fmt.Sprintf("request %s from %s:%d call-id three-ue%d-%s@xesp", m, p.SeenAt(), SIPPort, p.N, strings.ToLower(m))
			if !strings.Contains(log, want) {
				t.Fatalf("kamailio did not log %q:\n%s", want, log)
			}
		}
	}
	if len(ports) != 3 {
		t.Fatalf("phones share NAPT ports: %v", ports)
	}
}

// Many phones behind the one NAPT (Go-driven, sharing a namespace, each
// with its own socket and SA pair) register with kamailio at once; each
// gets the 200 for its own Call-ID and the gateway holds one binding per
// phone. Their SAs have no core address (the private side's LPM trie);
// beside them two TUN phones behind two NAPTs share 192.168.1.10 and have
// core addresses (the exact-match step first): both paths serve at once.
func TestManyPhonesRegister(t *testing.T) {
	n := 100
	if testing.Short() {
		n = 20
	}
	l := startLab(t, Options{Bulk: n, NAPTs: 2, Phones: 1})
	for _, p := range l.Phones {
		register(t, l, p, "many")
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	retx := make([]int, n)
	sem := make(chan struct{}, 25) // a burst of 100 new flows at once is not the point
	for i, b := range l.Bulk {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			callID := fmt.Sprintf("many-%d@xesp", b.N)
			r, k, err := l.BulkExchange(b, "REGISTER", callID, 1)
			retx[i] = k
			if err == nil && !r.OK() {
				err = fmt.Errorf("bulk%d: %s", b.N, r.Status)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	ports := map[uint16]bool{}
	total := 0
	for i, b := range l.Bulk {
		in, binding := l.InCounters(b.SPIIn)
		if binding.Addr() != NAPTWAN || in < 1 || in > uint64(1+retx[i]) {
			t.Fatalf("bulk%d: binding %s, %d packets in with %d retransmissions", b.N, binding, in, retx[i])
		}
		if m := b.UE.Misdelivered(); m.Total() != 0 {
			t.Fatalf("bulk%d measured misdelivery %+v", b.N, m)
		}
		ports[binding.Port()] = true
		total += retx[i]
	}
	if len(ports) != n {
		t.Fatalf("%d phones, %d distinct NAPT ports", n, len(ports))
	}
	for _, p := range l.Phones {
		if m := p.Tunnel.Counters().Misdelivered(); m.Total() != 0 {
			t.Fatalf("%s measured misdelivery %+v", p.User, m)
		}
	}
	dp, err := l.Gateway.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	if x := dp.Stats().XDP; x["priv_redirect_core"] < 4 || x["priv_redirect"] < uint64(n) {
		t.Fatalf("XDP verdicts %v: want the TUN phones' 4 replies by core address and the %d bulk replies by the trie", x, n)
	}
	t.Logf("%d phones registered through one NAPT; %d retransmissions in all", n, total)
}

// NAT re-mapping: after registering, the NAPT forgets its mappings and
// takes ports from a new range. Keepalives from the new port leave the
// binding alone; the phone's next request (the next authenticated packet)
// moves it, and the 200 reaches the phone at the new port.
func TestNATRemapping(t *testing.T) {
	l := startLab(t, Options{Phones: 2, Keepalive: 100 * time.Millisecond})
	for _, p := range l.Phones {
		register(t, l, p, "before")
	}
	_, before := l.InCounters(l.Phones[0].SPIIn)
	_, other := l.InCounters(l.Phones[1].SPIIn)
	if err := l.SetMasquerade("40000-40999"); err != nil {
		t.Fatal(err)
	}
	if err := l.FlushConntrack(); err != nil {
		t.Fatal(err)
	}
	p := l.Phones[0]
	// Keepalives now leave from the new port; they are not authenticated
	// and must not move the binding.
	ka := p.Tunnel.Counters().KeepalivesSent
	for end := time.Now().Add(10 * time.Second); p.Tunnel.Counters().KeepalivesSent < ka+3; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("no keepalives after the re-mapping")
		}
	}
	// The NAPT did map them to the new range.
	ct, err := l.NAPT.Run("conntrack", "-L", "-p", "udp")
	if err != nil {
		t.Fatal(err)
	}
	remapped := false
	for _, m := range regexp.MustCompile(`src=198\.51\.100\.1 dst=198\.51\.100\.2 sport=4500 dport=(\d+)`).FindAllStringSubmatch(string(ct), -1) {
		if port, _ := strconv.Atoi(m[1]); port >= 40000 && port <= 40999 {
			remapped = true
		}
	}
	if !remapped {
		t.Fatalf("no NAPT mapping in the new range:\n%s", ct)
	}
	if _, now := l.InCounters(p.SPIIn); now != before {
		t.Fatalf("keepalives moved the binding from %s to %s", before, now)
	}
	r, err := l.Sipsak(context.Background(), p, "OPTIONS", "after-remap@xesp", 3)
	if err != nil || !r.OK() || r.CallID != "after-remap@xesp" {
		t.Fatalf("OPTIONS after the re-mapping: %v %q\n%s", err, r.Status, r.Raw)
	}
	_, after := l.InCounters(p.SPIIn)
	if after.Addr() != NAPTWAN || after.Port() < 40000 || after.Port() > 40999 || after == before {
		t.Fatalf("binding %s before, %s after the re-mapping (want a port in 40000-40999)", before, after)
	}
	if _, still := l.InCounters(l.Phones[1].SPIIn); still != other {
		t.Fatalf("the other phone's binding moved from %s to %s without sending", other, still)
	}
	if dp, err := l.Gateway.DataPath(); err == nil {
		if st := dp.Stats(); st.BindingChanges < 1 {
			t.Fatalf("binding changes %d", st.BindingChanges)
		}
	}
	// The other phone follows too once it sends.
	register(t, l, l.Phones[1], "after")
	if _, moved := l.InCounters(l.Phones[1].SPIIn); moved.Port() < 40000 || moved.Port() > 40999 {
		t.Fatalf("second phone's binding %s after it sent", moved)
	}
}

// Spoofing: packets carrying a phone's valid SPI but a bad ICV, from
// another address and from another port of the NAPT's address, are
// dropped by the gateway as integrity failures and do not move the
// phone's binding; the phone keeps working.
func TestSpoofedPacketDoesNotMoveBinding(t *testing.T) {
	l := startLab(t, Options{Phones: 1})
	p := l.Phones[0]
	register(t, l, p, "spoof")
	inBefore, binding := l.InCounters(p.SPIIn)
	dp, err := l.Gateway.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	integ := func() uint64 { return dp.Stats().In.Drops["integ_error"] }
	before := integ()
	l.NAPT.MustRun("ip", "addr", "add", "198.51.100.66/32", "dev", "wan")
	// SPI, a sequence number well ahead (it would pass the replay
	// check), an IV, ciphertext and an ICV that is not the tag.
	forged := make([]byte, 8+8+32+16)
	binary.BigEndian.PutUint32(forged[0:], p.SPIIn)
	binary.BigEndian.PutUint32(forged[4:], 1000)
	for i := 8; i < len(forged); i++ {
		forged[i] = byte(i * 7)
	}
	gw := netip.AddrPortFrom(GatewayPublic, 4500)
	for _, from := range []string{"198.51.100.66:4500", "198.51.100.2:5555"} {
		var c *net.UDPConn
		if err := l.NAPT.Do(func() (err error) {
			c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(from)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if _, err := c.WriteToUDPAddrPort(forged, gw); err != nil {
				t.Fatal(err)
			}
		}
		c.Close()
	}
	for end := time.Now().Add(10 * time.Second); integ() < before+6; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("integrity drops %d, want %d more than %d", integ(), 6, before)
		}
	}
	if in, now := l.InCounters(p.SPIIn); now != binding || in != inBefore {
		t.Fatalf("binding %s -> %s, packets in %d -> %d after forged packets", binding, now, inBefore, in)
	}
	register(t, l, p, "after-spoof")
	if _, now := l.InCounters(p.SPIIn); now != binding {
		t.Fatalf("binding moved to %s", now)
	}
}

// The capture check: tcpdump on the NAPT's public side records the ESP in
// UDP 4500; Wireshark's tshark, given the SA keys (esp_sa table) and
// nothing from xesp, decrypts it to the SIP messages the phone and
// kamailio exchanged.
func TestCaptureDecryptsWithTshark(t *testing.T) {
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Fatal("tshark missing (Debian package tshark; make deps installs it)")
	}
	l := startLab(t, Options{Phones: 2})
	pcap := filepath.Join(t.TempDir(), "public.pcap")
	stop, err := l.Capture(pcap)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range l.Phones {
		register(t, l, p, "capture")
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd := exec.Command("tshark", l.TsharkArgs(pcap, "-Y", "sip", "-T", "fields", "-E", "separator=|", "-E", "occurrence=f",
		"-e", "ip.src", "-e", "udp.srcport", "-e", "esp.spi", "-e", "sip.Request-Line", "-e", "sip.Status-Line", "-e", "sip.Call-ID",
		"-e", "frame.protocols")...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tshark: %v\n%s", err, stderr.String())
	}
	text := string(out)
	// Without the keys the same capture holds no SIP at all.
	if blind, err := exec.Command("tshark", "-r", pcap, "-n", "-Y", "sip").Output(); err != nil || len(blind) != 0 {
		t.Fatalf("tshark without keys: %v %q", err, blind)
	}
	if d := os.Getenv("XESP_LAB_KEEP_PCAP"); d != "" {
		b, _ := os.ReadFile(pcap)
		os.WriteFile(filepath.Join(d, "public.pcap"), b, 0o600)
		os.WriteFile(filepath.Join(d, "tshark-args"), []byte(strings.Join(l.TsharkArgs(pcap), "\n")), 0o600)
	}
	for _, p := range l.Phones {
		for _, m := range []string{"register", "options"} {
			id := fmt.Sprintf("capture-ue%d-%s@xesp", p.N, m)
			req := fmt.Sprintf("%s sip:ims.example SIP/2.0", strings.ToUpper(m))
			var sawReq, sawResp bool
			for _, line := range strings.Split(text, "\n") {
				// outer source | outer port | SPI | request line | status line | Call-ID | layers
				f := strings.Split(line, "|")
				if len(f) != 7 || f[5] != id {
					continue
				}
				if !strings.HasSuffix(f[6], ":udp:udpencap:esp:ip:udp:sip") {
					t.Fatalf("not decoded as SIP in ESP in UDP encapsulation: %s", line)
				}
				if f[0] == NAPTWAN.String() && f[2] == fmt.Sprintf("0x%08x", p.SPIIn) && f[3] == req {
					sawReq = true
				}
				if f[0] == GatewayPublic.String() && f[2] == fmt.Sprintf("0x%08x", p.SPIOut) && f[4] == "SIP/2.0 200 OK" {
					sawResp = true
				}
			}
			if !sawReq || !sawResp {
				t.Fatalf("ue%d %s: request seen %v, 200 OK seen %v in tshark's decryption:\n%s", p.N, m, sawReq, sawResp, text)
			}
		}
	}
}

// A hundred TUN phones, each in its own namespace with sipsak as its SIP
// client (the tunnels share this test process), register through the one
// NAPT; every phone gets its own 200 and its own binding. -short runs 12.
func TestHundredSipsakPhones(t *testing.T) {
	n := 100
	if testing.Short() {
		n = 12
	}
	start := time.Now()
	l := startLab(t, Options{Phones: n})
	built := time.Since(start)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, p := range l.Phones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			callID := fmt.Sprintf("hundred-ue%d@xesp", p.N)
			r, err := l.Sipsak(context.Background(), p, "REGISTER", callID, 1)
			if err != nil || !r.OK() || r.CallID != callID {
				t.Errorf("ue%d: %v %q Call-ID %q", p.N, err, r.Status, r.CallID)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	ports := map[uint16]bool{}
	for _, p := range l.Phones {
		in, binding := l.InCounters(p.SPIIn)
		out := l.OutPackets(p.SPIOut)
		c := p.Tunnel.Counters()
		if binding.Addr() != NAPTWAN || in < 1 || c.Received != out || len(c.DropList()) != 0 {
			t.Fatalf("ue%d: binding %s, gw in %d out %d, phone %+v", p.N, binding, in, out, c)
		}
		ports[binding.Port()] = true
	}
	if len(ports) != n {
		t.Fatalf("%d phones, %d distinct NAPT ports", n, len(ports))
	}
	t.Logf("%d TUN phones with sipsak registered; topology built in %v, exchange in %v", n, built.Round(time.Millisecond), (time.Since(start) - built).Round(time.Millisecond))
}
