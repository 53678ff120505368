package topo

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/lab/ue"
)

// each runs f for every phone, at most 16 at a time (two CPUs).
func each(phones []*Phone, f func(p *Phone)) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, p := range phones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			f(p)
		}()
	}
	wg.Wait()
}

// The carrier case: 50 phones behind 5 NAPTs that all number their LAN
// 192.168.1.0/24, so five phones share each inner address and all share
// SIP port 5060; 2 gateway workers; core addresses named in the SAs for
// odd phones and allocated from core_pool for the others; beside them 20
// Go-driven phones with unique inner addresses and no core address (the
// gateway's LPM path without core_pool; core_pool gives them one too). Every
// phone registers with kamailio using sipsak; kamailio's location table
// holds each at its own core address; then the core sends OPTIONS to
// every registered phone through the location table and each phone
// answers its own. Measured at the phones: nothing delivered to the
// wrong phone. A tcpdump capture of the public segment, decrypted by
// tshark with the SA keys, shows each phone's NAPT mapping carrying only
// that phone's SPIs and only SIP naming that phone.
func TestOverlappingPhonesBehindNAPTs(t *testing.T) {
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Fatal("tshark missing (Debian package tshark; make deps installs it)")
	}
	const napts, per = 5, 10
	start := time.Now()
	l := startLab(t, Options{NAPTs: napts, Phones: per, Core: CoreMixed, Workers: 2, Bulk: 20})
	if len(l.Gateway.Workers) != 2 {
		t.Fatalf("%d workers", len(l.Gateway.Workers))
	}
	built := time.Since(start)
	shared := map[netip.Addr]int{}
	cores := map[netip.Addr]string{}
	for _, p := range l.Phones {
		shared[p.Inner]++
		if other, dup := cores[p.Core]; dup || !CorePool.Contains(p.Core) {
			t.Fatalf("%s: core address %s (also %q)", p.User, p.Core, other)
		}
		cores[p.Core] = p.User
	}
	if len(shared) != per || shared[FirstPhone] != napts {
		t.Fatalf("inner addresses not shared across NAPTs: %v", shared)
	}
	pcap := filepath.Join(t.TempDir(), "public.pcap")
	stop, err := l.Capture(pcap)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	each(l.Phones, func(p *Phone) {
		id := "overlap-" + p.User + "@xesp"
		r, err := l.Sipsak(ctx, p, "REGISTER", id, 1)
		if err != nil || !r.OK() || r.CallID != id {
			t.Errorf("%s REGISTER: %v %q Call-ID %q", p.User, err, r.Status, r.CallID)
		}
	})
	var wg sync.WaitGroup
	for _, b := range l.Bulk {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("overlap-bulk%d@xesp", b.N)
			if r, _, err := l.BulkExchange(b, "REGISTER", id, 1); err != nil || !r.OK() {
				t.Errorf("bulk%d REGISTER: %v %q", b.N, err, r.Status)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		stop()
		return
	}
	regs, err := l.Registrations()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range l.Phones {
		if got, want := regs[p.User], fmt.Sprintf("sip:%s:%d", p.Core, SIPPort); len(got) != 1 || got[0] != want {
			t.Fatalf("%s in kamailio's location table: received %v, want [%s]", p.User, got, want)
		}
		if err := l.Listen(p); err != nil {
			t.Fatal(err)
		}
	}
	each(l.Phones, func(p *Phone) {
		r, err := l.CoreOptions(ctx, p, "core-"+p.User+"@core")
		if err != nil || !r.AnsweredBy(p) {
			t.Errorf("core OPTIONS to %s: %v %q answered by %q", p.User, err, r.Status, r.Server)
		}
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if t.Failed() {
		return
	}
	exchanged := time.Since(start) - built

	// Measured at the phones.
	mapping := map[netip.AddrPort]*Phone{}
	for _, p := range l.Phones {
		c := p.Tunnel.Counters()
		in, binding := l.InCounters(p.SPIIn)
		out := l.OutPackets(p.SPIOut)
		if m := c.Misdelivered(); m.Total() != 0 {
			t.Errorf("%s (NAPT %d, %s) measured misdelivery %+v", p.User, p.NAPT, p.Inner, m)
		}
		// REGISTER's 200 and the core's OPTIONS: every packet the
		// gateway sealed for the phone opened at the phone and
		// reached its TUN; the phone's UAS answered the OPTIONS (more
		// than once if kamailio retransmitted it).
		if out < 2 || c.Received != out || c.ToTUN != out || p.UAS.Answered() < 1 || p.UAS.Foreign() != 0 || len(c.DropList()) != 0 {
			t.Errorf("%s: gateway in %d out %d; phone %+v drops %v; answered %d", p.User, in, out, c, c.DropList(), p.UAS.Answered())
		}
		if binding.Addr() != p.NAPTWAN {
			t.Errorf("%s: binding %s, want an address of NAPT %d (%s)", p.User, binding, p.NAPT, p.NAPTWAN)
		}
		if q := mapping[binding]; q != nil {
			t.Errorf("%s and %s share the NAPT mapping %s", p.User, q.User, binding)
		}
		mapping[binding] = p
	}
	for _, b := range l.Bulk {
		_, binding := l.InCounters(b.SPIIn)
		if m := b.UE.Misdelivered(); m.Total() != 0 || binding.Addr() != NAPTWAN || mapping[binding] != nil {
			t.Errorf("bulk%d: misdelivered %+v, binding %s", b.N, m, binding)
		}
		if got, want := regs[fmt.Sprintf("bulk%d", b.N)], fmt.Sprintf("sip:%s:%d", b.Core, SIPPort); !CorePool.Contains(b.Core) || len(got) != 1 || got[0] != want {
			t.Errorf("bulk%d in kamailio's location table: received %v, want [%s]", b.N, got, want)
		}
		mapping[binding] = &Phone{User: fmt.Sprintf("bulk%d", b.N), SPIIn: b.SPIIn, SPIOut: b.SPIOut}
	}
	// kamailio saw each REGISTER from the phone's core address.
	klog := l.KamailioLog()
	for _, p := range l.Phones {
		if want := fmt.Sprintf("request REGISTER from %s:%d call-id overlap-%s@xesp", p.Core, SIPPort, p.User); !strings.Contains(klog, want) {
			t.Errorf("kamailio did not log %q", want)
		}
	}
	if t.Failed() {
		return
	}

	// The public-side capture, decrypted by tshark. A NAPT may map to a
	// port tshark would otherwise give another dissector (the lower
	// port of a UDP pair wins): every mapping is decoded as RFC 3948.
	var args []string
	for m := range mapping {
		args = append(args, "-d", fmt.Sprintf("udp.port==%d,udpencap", m.Port()))
	}
	cmd := exec.Command("tshark", l.TsharkArgs(pcap, append(args, "-T", "fields", "-E", "separator=|", "-E", "occurrence=f",
		"-e", "ip.src", "-e", "udp.srcport", "-e", "ip.dst", "-e", "udp.dstport", "-e", "esp.spi",
		"-e", "sip.r-uri.user", "-e", "sip.to.user", "-e", "sip.Status-Line", "-e", "icmp.type")...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	outb, err := cmd.Output()
	if err != nil {
		t.Fatalf("tshark: %v\n%s", err, stderr.String())
	}
	type seen struct{ up, down, sipUp, sipDown int }
	per_ := map[*Phone]*seen{}
	for _, line := range strings.Split(strings.TrimSpace(string(outb)), "\n") {
		f := strings.Split(line, "|")
		if len(f) != 9 || f[4] == "" {
			continue // NAT keepalives carry no SPI
		}
		src, err1 := netip.ParseAddrPort(f[0] + ":" + f[1])
		dst, err2 := netip.ParseAddrPort(f[2] + ":" + f[3])
		if err1 != nil || err2 != nil {
			t.Fatalf("tshark line %q", line)
		}
		toPhone := src.Addr() == GatewayPublic
		m := src
		if toPhone {
			m = dst
		}
		p := mapping[m]
		if p == nil {
			t.Fatalf("ESP to or from %s, which is no phone's NAPT mapping: %s", m, line)
		}
		s := per_[p]
		if s == nil {
			s = &seen{}
			per_[p] = s
		}
		wantSPI := p.SPIIn
		if toPhone {
			wantSPI = p.SPIOut
			s.down++
		} else {
			s.up++
		}
		if f[4] != fmt.Sprintf("0x%08x", wantSPI) {
			t.Fatalf("%s's mapping %s carries SPI %s, want 0x%08x: %s", p.User, m, f[4], wantSPI, line)
		}
		// The decrypted SIP names this phone: its REGISTER (To: its
		// AOR) and kamailio's 200; the core's OPTIONS (Request-URI:
		// its contact) and its answer.
		if f[8] != "" {
			continue // an ICMP error (a late retransmission's answer after sipsak left): SPI checked, no SIP to name
		}
		if f[5] == "" && f[6] == "" {
			t.Fatalf("%s: ESP that tshark did not decrypt to SIP: %s", p.User, line)
		}
		if (f[5] != "" && f[5] != p.User) || (f[6] != "" && f[6] != p.User) {
			t.Fatalf("%s's mapping %s carries SIP for another phone: %s", p.User, m, line)
		}
		if toPhone {
			s.sipDown++
		} else {
			s.sipUp++
		}
	}
	for _, p := range mapping {
		want := 2 // REGISTER and the core's OPTIONS, both ways
		if p.NS == nil {
			want = 1 // a bulk phone: REGISTER
		}
		s := per_[p]
		if s == nil || s.up < want || s.down < want {
			_, b := l.InCounters(p.SPIIn)
			t.Fatalf("%s (mapping %s): capture shows %+v ESP packets, want %d each way", p.User, b, s, want)
		}
	}
	t.Logf("%d phones behind %d NAPTs (%d share each inner address, all SIP port %d) and %d bulk phones, 2 workers: all registered, the TUN phones answered the core's OPTIONS; misdelivered 0; topology built in %v, exchange in %v, total %v",
		len(l.Phones), napts, napts, SIPPort, len(l.Bulk), built.Round(time.Millisecond), exchanged.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

// The misdelivery counters count in the real topology: two phones behind
// two NAPTs, both 192.168.1.10, each given the other's inbound SA
// (Options.CrossSAs). Everything the gateway seals for phone 1 arrives
// under an SPI that is not the one phone 1 holds, and is counted.
func TestLabCountersSeeCrossedSAs(t *testing.T) {
	l := startLab(t, Options{NAPTs: 2, Phones: 1, CrossSAs: [2]int{1, 2}, Keepalive: -1})
	p := l.Phones[0]
	// The phone's SIP stack asks kamailio for OPTIONS three times
	// through its TUN; kamailio's 200s go to the phone's core address and
	// the gateway seals them with the phone's outbound SA.
	var c *net.UDPConn
	if err := p.NS.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.Inner, SIPPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 {
		req := Request("OPTIONS", p.User, p.Inner, fmt.Sprintf("crossed-%d@xesp", i), i+1)
		first, rest, _ := strings.Cut(req, "\r\n")
		req = first + fmt.Sprintf("\r\nVia: SIP/2.0/UDP %s:%d;branch=z9hG4bKcrossed%d;rport\r\n", p.Inner, SIPPort, i) + rest
		if _, err := c.WriteToUDPAddrPort([]byte(req), netip.AddrPortFrom(Core, SIPPort)); err != nil {
			t.Fatal(err)
		}
	}
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		sealed := l.OutPackets(p.SPIOut)
		m := p.Tunnel.Counters().Misdelivered()
		if sealed == 3 && m.ForeignSPI == 3 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("gateway sealed %d for %s; phone misdelivered %+v", sealed, p.User, m)
		}
	}
	if c := p.Tunnel.Counters(); c.Received != 0 || c.ToTUN != 0 || c.Misdelivered() != (ue.Misdelivered{ForeignSPI: 3}) {
		t.Fatalf("phone counters %+v", c)
	}
}
