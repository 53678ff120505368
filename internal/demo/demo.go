// Package demo builds the built-in demo topology, runs the gateway on it
// and shows what the product is for: several phones behind one NAPT, each
// with its own UDP-encapsulated ESP SA, all registering with the same SIP
// server, and every phone getting exactly its own replies.
//
//	ue1 ─┐
//	ue2 ─┼─ napt (nftables masquerade) ── gw (xesp, XDP on both veths) ── core (SIP responder)
//	ue3 ─┘
//
// Everything lives in network namespaces named xesp-*, created here and
// deleted on exit; no traffic leaves them.
package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/xesp/xesp/internal/netns"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/userspace/config"
	"github.com/xesp/xesp/userspace/esp"
	"github.com/xesp/xesp/userspace/gateway"
	"github.com/xesp/xesp/userspace/metrics"
	"github.com/xesp/xesp/userspace/sa"
	"github.com/xesp/xesp/userspace/ue"
)

// Options tune the demo.
type Options struct {
	Phones  int           // phones behind the NAPT (3)
	Metrics string        // /metrics listen address on the host; "" for none
	Hold    time.Duration // keep running (phones sending OPTIONS) this long after the exchange
	Version string
	Out     io.Writer
	Log     *slog.Logger
}

const (
	gwPublic  = "198.51.100.1" // documentation prefixes (RFC 5737)
	naptWAN   = "198.51.100.2"
	gwPrivate = "10.0.0.254"
	coreIP    = "10.0.0.1"
	sipPort   = 5060
)

type phone struct {
	n           int
	ns          *netns.NS
	lan         string // 192.168.1.x
	inner       netip.AddrPort
	spiIn       uint32 // gateway's inbound SA = the phone's outbound
	spiOut      uint32
	ue          *ue.Phone
	registered  bool
	optionsOK   int
	wrongReply  int
	callID      string
	replyStatus string
	retransmits int
}

// Run builds the topology, runs the exchange, prints the result and tears
// everything down. It returns an error if any phone failed to register or
// got a reply meant for another phone.
func Run(ctx context.Context, o Options) (err error) {
	if o.Phones <= 0 {
		o.Phones = 3
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	w := o.Out
	for _, tool := range []string{"ip", "nft", "ethtool"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("demo needs %s (Debian: iproute2, nftables, ethtool; `make deps` installs them)", tool)
		}
	}
	cleanupStale(o.Phones)
	var made []*netns.NS
	mk := func(name string) (*netns.NS, error) {
		ns, err := netns.New(name)
		if err == nil {
			made = append(made, ns)
		}
		return ns, err
	}
	defer func() {
		for i := len(made) - 1; i >= 0; i-- {
			made[i].Close()
		}
		fmt.Fprintln(w, "\ntopology removed (namespaces xesp-*)")
	}()

	fmt.Fprintf(w, "building the demo topology: %d phones ─ NAPT ─ xesp gateway ─ SIP core\n", o.Phones)
	napt, err := mk("xesp-napt")
	if err != nil {
		return err
	}
	gw, err := mk("xesp-gw")
	if err != nil {
		return err
	}
	core, err := mk("xesp-core")
	if err != nil {
		return err
	}
	run := func(ns *netns.NS, args ...string) error {
		_, err := ns.Run(args[0], args[1:]...)
		return err
	}
	if err := netns.Veth(napt, "wan", gw, "pub"); err != nil {
		return err
	}
	if err := netns.Veth(gw, "priv", core, "eth0"); err != nil {
		return err
	}
	for _, s := range [][]any{
		{napt, "ip", "link", "add", "lan", "type", "bridge"},
		{napt, "ip", "link", "set", "lan", "up"},
		{napt, "ip", "addr", "add", "192.168.1.1/24", "dev", "lan"},
		{napt, "ip", "addr", "add", naptWAN + "/24", "dev", "wan"},
		{napt, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
		{gw, "ip", "addr", "add", gwPublic + "/24", "dev", "pub"},
		{gw, "ip", "addr", "add", gwPrivate + "/24", "dev", "priv"},
		{core, "ip", "addr", "add", coreIP + "/24", "dev", "eth0"},
		{core, "ip", "route", "add", "10.99.0.0/16", "via", gwPrivate},
	} {
		args := make([]string, len(s)-1)
		for i, a := range s[1:] {
			args[i] = a.(string)
		}
		if err := run(s[0].(*netns.NS), args...); err != nil {
			return err
		}
	}
	nftRules := `table ip napt {
  chain post { type nat hook postrouting priority srcnat; oifname "wan" masquerade; }
}`
	nft := napt.Command("nft", "-f", "-")
	nft.Stdin = strings.NewReader(nftRules)
	if out, err := nft.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", napt.Name, err, out)
	}

	phones := make([]*phone, o.Phones)
	var sas strings.Builder
	for i := range phones {
		n := i + 1
		ns, err := mk(fmt.Sprintf("xesp-ue%d", n))
		if err != nil {
			return err
		}
		p := &phone{n: n, ns: ns, lan: fmt.Sprintf("192.168.1.%d", 10+n),
			inner: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(n)}), sipPort),
			spiIn: 0x1000 + uint32(n), spiOut: 0x2000 + uint32(n),
			callID: fmt.Sprintf("demo-%d-%s@xesp", n, randHex(4))}
		phones[i] = p
		if err := netns.Veth(ns, "eth0", napt, fmt.Sprintf("ue%d", n)); err != nil {
			return err
		}
		if err := run(napt, "ip", "link", "set", fmt.Sprintf("ue%d", n), "master", "lan"); err != nil {
			return err
		}
		if err := run(ns, "ip", "addr", "add", p.lan+"/24", "dev", "eth0"); err != nil {
			return err
		}
		if err := run(ns, "ip", "route", "add", "default", "via", "192.168.1.1"); err != nil {
			return err
		}
		kin, kout := randHex(20), randHex(20)
		// The gateway's view; the phone's SAs use the same keys mirrored.
		fmt.Fprintf(&sas, `
  - {name: ue%[1]d-in,  spi: %[2]d, direction: in,  mode: tunnel, proposal: aes128gcm16, enc_key: %[4]s,
     local: %[6]s, peer: %[7]s, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.%[1]d/32}}
  - {name: ue%[1]d-out, spi: %[3]d, direction: out, mode: tunnel, proposal: aes128gcm16, enc_key: %[5]s,
     local: %[6]s, peer: %[7]s, encap: {local_port: 4500, peer_port: 4500},
     inner: {local: 10.0.0.0/24, peer: 10.99.0.%[1]d/32}}`, n, p.spiIn, p.spiOut, kin, kout, gwPublic, naptWAN)
		out, err := newSA(p.spiIn, kin, 0)
		if err != nil {
			return err
		}
		in, err := newSA(p.spiOut, kout, 1024)
		if err != nil {
			return err
		}
		if err := ns.Do(func() (err error) {
			p.ue, err = ue.New(netip.MustParseAddrPort("0.0.0.0:4500"), netip.MustParseAddrPort(gwPublic+":4500"), out, in)
			return err
		}); err != nil {
			return err
		}
		defer p.ue.Close()
	}

	stateDir, err := os.MkdirTemp("", "xesp-demo-state-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stateDir)
	cfgText := fmt.Sprintf("public: {interface: pub, addresses: [%s]}\nprivate: {interface: priv}\nworkers: 2\nstate_dir: "+stateDir+"\n"+
		"umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}\nsas:%s\n", gwPublic, sas.String())
	cfg, err := config.Parse([]byte(cfgText), "demo")
	if err != nil {
		return fmt.Errorf("demo config: %w", err)
	}
	var g *gateway.Gateway
	if err := gw.Do(func() (err error) {
		g, err = gateway.Start(ctx, cfg, gateway.Options{Log: o.Log, NoPin: true})
		return err
	}); err != nil {
		return err
	}
	defer g.Stop(false)
	fmt.Fprintf(w, "gateway up: XDP %s on pub and %s on priv, AF_XDP %s mode, %d workers, %d SAs\n",
		g.Loader.Public.Mode, g.Loader.Private.Mode, g.Sockets[0][0].Mode(), cfg.Workers, len(cfg.SAList))

	svcCtx, stopSvc := context.WithCancel(ctx)
	defer stopSvc()
	if o.Metrics != "" {
		src, err := g.MetricsSources(o.Version)
		if err != nil {
			return err
		}
		ln, err := net.Listen("tcp", o.Metrics)
		if err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		go metrics.ServeListener(svcCtx, ln, metrics.Handler(metrics.New(src)))
		fmt.Fprintf(w, "metrics: http://%s/metrics\n", ln.Addr())
	}

	// The SIP core: answer every request with 200 OK to whoever sent it.
	var coreConn *net.UDPConn
	if err := core.Do(func() (err error) {
		coreConn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(coreIP), Port: sipPort})
		return err
	}); err != nil {
		return err
	}
	defer coreConn.Close()
	var served sync.WaitGroup
	served.Add(1)
	go func() { defer served.Done(); sipResponder(coreConn) }()
	defer served.Wait()
	defer coreConn.Close()

	fmt.Fprintln(w, "\neach phone sends REGISTER through the NAPT, inside ESP-in-UDP to port 4500 ...")
	// exchange sends a request and waits for its 200 OK, retransmitting
	// like a SIP UA over UDP (RFC 3261 timer A: 500 ms, doubling): a
	// NAPT, like any network, may lose the first packet of a new flow.
	exchange := func(p *phone, method string) (string, error) {
		msg := sipRequest(method, p)
		inner := pkt.UDP4(p.inner, netip.AddrPortFrom(netip.MustParseAddr(coreIP), sipPort), msg)
		buf := make([]byte, 65536)
		wait := 500 * time.Millisecond
		for try := 0; try < 4; try, wait = try+1, wait*2 {
			if try > 0 {
				p.retransmits++
			}
			if err := p.ue.Send(inner); err != nil {
				return "", err
			}
			deadline := time.Now().Add(wait)
			for {
				got, _, err := p.ue.Recv(buf, deadline)
				if err != nil {
					break // retransmit
				}
				_, dst, payload, ok := pkt.UDP4Parse(got)
				if !ok || dst != p.inner || !bytes.Contains(payload, []byte("Call-ID: "+p.callID)) {
					p.wrongReply++
					return "", fmt.Errorf("reply for someone else: %q", firstLine(payload))
				}
				if bytes.Contains(payload, []byte("CSeq: 1 "+method)) {
					return firstLine(payload), nil
				}
				// a late answer to an earlier request of ours: keep waiting
			}
		}
		return "", fmt.Errorf("%s: no answer after 4 transmissions", method)
	}
	var wg sync.WaitGroup
	for _, p := range phones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := exchange(p, "REGISTER")
			p.registered = err == nil && strings.HasPrefix(st, "SIP/2.0 200")
			p.replyStatus = st
			if err != nil {
				p.replyStatus = err.Error()
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(o.Hold)
	for {
		for _, p := range phones {
			p.ue.Keepalive()
			if st, err := exchange(p, "OPTIONS"); err == nil && strings.HasPrefix(st, "SIP/2.0 200") {
				p.optionsOK++
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}

	fmt.Fprintf(w, "\n%-6s %-14s %-12s %-24s %-22s %-11s %-9s %s\n", "phone", "lan address", "inner", "NAPT mapping seen by gw", "SPI in/out", "registered", "OPTIONS", "ESP pkts in/out")
	var failed []string
	for _, p := range phones {
		in, _ := g.Manager.Counters(sa.ID{Dir: sa.In, SPI: p.spiIn})
		out, _ := g.Manager.Counters(sa.ID{Dir: sa.Out, SPI: p.spiOut, Peer: netip.MustParseAddrPort(naptWAN + ":4500")})
		reg := "yes"
		if !p.registered {
			reg = "NO"
			failed = append(failed, fmt.Sprintf("ue%d: %s", p.n, p.replyStatus))
		}
		fmt.Fprintf(w, "ue%-4d %-14s %-12s %-24s 0x%04x/0x%04x          %-11s %-9d %d/%d\n", p.n, p.lan, p.inner.Addr(), in.Binding.Addr,
			p.spiIn, p.spiOut, reg, p.optionsOK, in.Packets, out.Packets)
	}
	dec, enc := uint64(0), uint64(0)
	for _, wk := range g.Workers {
		dec += wk.Stats().Decap.Packets.Load()
		enc += wk.Stats().Encap.Packets.Load()
	}
	fmt.Fprintf(w, "\ngateway forwarded %d packets phone→core (decrypted) and %d core→phone (encrypted); ", dec, enc)
	wrong := 0
	for _, p := range phones {
		wrong += p.wrongReply
	}
	fmt.Fprintf(w, "replies delivered to the wrong phone: %d\n", wrong)
	for _, p := range phones {
		if p.retransmits > 0 {
			fmt.Fprintf(w, "ue%d retransmitted %d time(s): a request or its answer was lost on the way (counters below say where)\n", p.n, p.retransmits)
		}
	}
	if dp, err := g.DataPath(); err == nil {
		st := dp.Stats()
		fmt.Fprintf(w, "XDP verdicts: %s\n", kv(st.XDP))
		if len(st.In.Drops)+len(st.Out.Drops) > 0 {
			fmt.Fprintf(w, "worker drops: decap %s; encap %s\n", kv(st.In.Drops), kv(st.Out.Drops))
		}
	}
	fmt.Fprintln(w, "every phone sits behind the same NAPT address", naptWAN, "with its own UDP port: the gateway keeps one binding per SA.")
	if len(failed) > 0 || wrong > 0 {
		return fmt.Errorf("demo failed: %s", strings.Join(failed, "; "))
	}
	return nil
}

// kv prints a counter map in a stable order.
func kv(m map[string]uint64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %d", k, m[k])
	}
	return b.String()
}

func newSA(spi uint32, keyHex string, window int) (*esp.SA, error) {
	k, err := hex.DecodeString(keyHex)
	if err != nil {
		return nil, err
	}
	return esp.NewSA(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel})
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func cleanupStale(phones int) {
	names := []string{"xesp-napt", "xesp-gw", "xesp-core"}
	for i := 1; i <= max(phones, 3); i++ {
		names = append(names, fmt.Sprintf("xesp-ue%d", i))
	}
	for _, n := range names {
		exec.Command("ip", "netns", "del", n).Run()
	}
}

func sipRequest(method string, p *phone) []byte {
	return []byte(fmt.Sprintf("%s sip:ims.example SIP/2.0\r\n"+
		"Via: SIP/2.0/UDP %s;branch=z9hG4bK%s\r\n"+
		"From: <sip:ue%d@ims.example>;tag=%d\r\nTo: <sip:ue%d@ims.example>\r\n"+
		"Call-ID: %s\r\nCSeq: 1 %s\r\nContact: <sip:ue%d@%s>\r\nContent-Length: 0\r\n\r\n",
		method, p.inner, randHex(4), p.n, p.n, p.n, p.callID, method, p.n, p.inner))
}

// sipResponder answers each request with a 200 OK carrying its Via, From,
// To, Call-ID and CSeq, to the address it came from.
func sipResponder(c *net.UDPConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		var resp strings.Builder
		resp.WriteString("SIP/2.0 200 OK\r\n")
		for _, line := range strings.Split(string(buf[:n]), "\r\n") {
			for _, h := range []string{"Via:", "From:", "To:", "Call-ID:", "CSeq:"} {
				if strings.HasPrefix(line, h) {
					resp.WriteString(line + "\r\n")
				}
			}
		}
		resp.WriteString("Content-Length: 0\r\n\r\n")
		c.WriteToUDPAddrPort([]byte(resp.String()), from)
	}
}

func firstLine(b []byte) string {
	if i := bytes.Index(b, []byte("\r\n")); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}
