package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/topo"
)

// gatewayViewSAs is a gateway's SA pair for one phone, as in its config.
func gatewayViewSAs(mode string) string {
	inner := ""
	if mode == "tunnel" {
		inner = ", inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}"
	}
	return fmt.Sprintf(`sas:
  - {name: ue1-in, spi: 0x1001, direction: in, mode: %[1]s, proposal: aes128gcm16, enc_key: %[2]s,
     local: 192.0.2.2, peer: 192.0.2.1, encap: {local_port: 4500, peer_port: 4500}%[4]s}
  - {name: ue1-out, spi: 0x2001, direction: out, mode: %[1]s, proposal: aes128gcm16, enc_key: %[3]s,
     local: 192.0.2.2, peer: 192.0.2.1, encap: {local_port: 4500, peer_port: 4500}%[4]s}
`, mode, runKeyIn, runKeyOut, inner)
}

func writeFile(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// The flags and the SA file are checked before anything is created, and
// every refusal says what is wrong.
func TestUEConfig(t *testing.T) {
	gw := writeFile(t, "gw.yaml", gatewayViewSAs("tunnel"))
	cfg, err := ueConfig(ueOptions{saFile: gw, view: "gateway", keepalive: 20 * time.Second, mtu: 1400})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Out.SPI() != 0x1001 || cfg.In.SPI() != 0x2001 || cfg.Inner != netip.MustParseAddr("10.99.0.1") ||
		cfg.Gateway != netip.MustParseAddrPort("192.0.2.2:4500") || cfg.Local != netip.MustParseAddrPort("0.0.0.0:4500") ||
		len(cfg.Routes) != 1 || cfg.Routes[0] != netip.MustParsePrefix("10.0.0.0/24") || cfg.Keepalive != 20*time.Second ||
		cfg.Out.Mode() != esp.ModeTunnel {
		t.Fatalf("gateway view: %+v", cfg)
	}
	// A gateway's whole config file works as well.
	whole := writeFile(t, "xesp.yaml", "public: {interface: pub, addresses: [192.0.2.2]}\nprivate: {interface: priv}\n"+gatewayViewSAs("tunnel"))
	if cfg, err := ueConfig(ueOptions{saFile: whole, view: "gateway", keepalive: time.Second}); err != nil || cfg.Out.SPI() != 0x1001 {
		t.Fatalf("config file: %v", err)
	}
	// The same file read as the phone's own: directions as written.
	cfg, err = ueConfig(ueOptions{saFile: gw, view: "phone", inner: "10.99.0.7", routes: "10.0.0.0/8, 10.1.0.0/16", keepalive: 0})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Out.SPI() != 0x2001 || cfg.In.SPI() != 0x1001 || cfg.Inner != netip.MustParseAddr("10.99.0.7") ||
		cfg.Gateway != netip.MustParseAddrPort("192.0.2.1:4500") || len(cfg.Routes) != 2 || cfg.Keepalive >= 0 {
		t.Fatalf("phone view: %+v", cfg)
	}

	second := strings.NewReplacer("sas:\n", "", "0x1001", "0x1002", "0x2001", "0x2002", "ue1-", "ue2-").Replace(gatewayViewSAs("tunnel"))
	two := writeFile(t, "two.yaml", gatewayViewSAs("tunnel")+second)
	transport := writeFile(t, "tr.yaml", gatewayViewSAs("transport"))
	noEncap := writeFile(t, "ne.yaml", strings.ReplaceAll(gatewayViewSAs("tunnel"), ", encap: {local_port: 4500, peer_port: 4500}", ""))
	for _, c := range []struct {
		o    ueOptions
		want string
	}{
		{ueOptions{}, "-sa is required"},
		{ueOptions{saFile: gw, view: "core"}, `-view "core"`},
		{ueOptions{saFile: filepath.Join(t.TempDir(), "none.yaml"), view: "phone"}, "none.yaml"},
		{ueOptions{saFile: two, view: "gateway"}, "holds 2 out SAs (phone's view): choose one with -spi-out"},
		{ueOptions{saFile: two, view: "gateway", spiOut: 0x1002, spiIn: 0x2009}, "no in SA (phone's view) with SPI 0x00002009"},
		{ueOptions{saFile: transport, view: "gateway"}, "-inner is required"},
		{ueOptions{saFile: noEncap, view: "gateway"}, "has no encap"},
		{ueOptions{saFile: gw, view: "gateway", gateway: "192.0.2.2"}, "-gateway"},
		{ueOptions{saFile: gw, view: "gateway", routes: "10.0.0.0"}, "-route"},
		{ueOptions{saFile: gw, view: "gateway", keepalive: -time.Second}, "-keepalive"},
		{ueOptions{saFile: gw, view: "gateway", keepalive: time.Second, ports: "5060,sip"}, `-ports "5060,sip": "sip" is not a port`},
		{ueOptions{saFile: gw, view: "gateway", api: "/x.sock", mode: "tunnel"}, "-mode is for a phone without -sa"},
		{ueOptions{api: "/x.sock", inner: "10.99.0.1", routes: "10.0.0.0/24"}, "-gateway is required without -sa"},
		{ueOptions{api: "/x.sock", gateway: "192.0.2.2:4500", routes: "10.0.0.0/24"}, "-inner is required without -sa"},
		{ueOptions{api: "/x.sock", gateway: "192.0.2.2:4500", inner: "10.99.0.1"}, "-route is required without -sa"},
		{ueOptions{api: "/x.sock", gateway: "192.0.2.2:4500", inner: "10.99.0.1", routes: "10.0.0.0/24", mode: "tun"}, `-mode "tun"`},
	} {
		_, err := ueConfig(c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want it to mention %q", c.o, err, c.want)
		}
	}
	// With -api and no -sa the flags say everything; no SAs yet.
	cfg, err = ueConfig(ueOptions{api: "/x.sock", gateway: "[2001:db8::1]:4500", inner: "10.99.0.1", routes: "10.0.0.0/24", mode: "transport", keepalive: time.Second})
	if err != nil || cfg.Out != nil || cfg.In != nil || cfg.Mode != esp.ModeTransport || cfg.Local != netip.MustParseAddrPort("[::]:4500") ||
		cfg.Gateway != netip.MustParseAddrPort("[2001:db8::1]:4500") || len(cfg.Routes) != 1 {
		t.Fatalf("bare phone: %+v %v", cfg, err)
	}
	// The SAs of a gateway-view file are listed in the phone's view.
	_, initial, err := ueSetup(ueOptions{saFile: gw, view: "gateway", api: "/x.sock", keepalive: time.Second})
	if err != nil || len(initial) != 2 || initial[0].Direction != sa.Out || initial[0].SPI != 0x1001 || initial[0].Peer != netip.MustParseAddr("192.0.2.2") ||
		initial[1].Direction != sa.In || initial[1].SPI != 0x2001 || initial[1].ReplayWindow == 0 || initial[1].InnerLocal != netip.MustParsePrefix("10.99.0.1/32") {
		t.Fatalf("phone-view SAs: %+v %v", initial, err)
	}
	// The two-SA file works once the pair is chosen.
	if cfg, err := ueConfig(ueOptions{saFile: two, view: "gateway", spiOut: 0x1002, spiIn: 0x2002, keepalive: time.Second}); err != nil || cfg.Out.SPI() != 0x1002 {
		t.Fatalf("chosen pair: %v", err)
	}
}

// xesp-lab ue as a process in a phone namespace, reading the gateway's own SA
// file: a plain socket bound to the inner address reaches a Go-driven
// gateway peer as ESP in UDP 4500, the reply comes back through the TUN,
// keepalives arrive on their interval, and the counters printed on SIGINT
// match. Then transport mode with the phone's view of the SAs.
func TestUECommand(t *testing.T) {
	for _, mode := range []string{"tunnel", "transport"} {
		t.Run(mode, func(t *testing.T) {
			a, b := netns.ForTest(t, "uca"), netns.ForTest(t, "ucb")
			va, vb := netns.VethForTest(t, a, b)
			a.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", va)
			b.MustRun("ip", "addr", "add", "192.0.2.2/24", "dev", vb)
			file := writeFile(t, "sas.yaml", gatewayViewSAs(mode))
			tun := netns.UniqueName("tun")
			args := []string{"ue", "-sa", file, "-view", "gateway", "-tun", tun, "-keepalive", "150ms"}
			if mode == "transport" {
				args = append(args, "-inner", "10.99.0.1", "-route", "10.0.0.0/24")
			}
			var gwConn *net.UDPConn
			if err := b.Do(func() (err error) {
				gwConn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 4500})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer gwConn.Close()
			cmd := labCmd(a, args...)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if _, err := a.Run("ip", "addr", "show", "dev", tun); err == nil && strings.Contains(out.String(), "phone up") {
					break
				}
				if time.Now().After(end) {
					t.Fatalf("xesp-lab ue did not come up:\n%s", out.String())
				}
			}
			espMode := esp.ModeTunnel
			if mode == "transport" {
				espMode = esp.ModeTransport
			}
			gwIn := mustMode(t, 0x1001, runKeyIn, 64, espMode)
			gwOut := mustMode(t, 0x2001, runKeyOut, 0, espMode)

			var app *net.UDPConn
			if err := a.Do(func() (err error) {
				app, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 99, 0, 1), Port: 5060})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer app.Close()
			msg := []byte("REGISTER sip:ims.example SIP/2.0\r\n\r\n")
			if _, err := app.WriteToUDPAddrPort(msg, netip.MustParseAddrPort("10.0.0.1:5060")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 65536)
			keepalives := 0
			var res esp.Result
			var from netip.AddrPort
			for {
				gwConn.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, f, err := gwConn.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("gateway side: %v\n%s", err, out.String())
				}
				if n == 1 && buf[0] == 0xff {
					keepalives++
					continue
				}
				if res, err = gwIn.Open(buf[:n]); err != nil {
					t.Fatalf("gateway side open: %v", err)
				}
				from = f
				break
			}
			got := buf[res.Start:res.End]
			var payload []byte
			if espMode == esp.ModeTunnel {
				src, dst, p, ok := pkt.UDP4Parse(got)
				if !ok || src != netip.MustParseAddrPort("10.99.0.1:5060") || dst != netip.MustParseAddrPort("10.0.0.1:5060") {
					t.Fatalf("inner packet %x", got)
				}
				payload = p
			} else {
				payload = got[8:]
			}
			if from != netip.MustParseAddrPort("192.0.2.1:4500") || !bytes.Equal(payload, msg) {
				t.Fatalf("from %s payload %q", from, payload)
			}
			reply := []byte("SIP/2.0 200 OK\r\n\r\n")
			var inner []byte
			if espMode == esp.ModeTunnel {
				inner = pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5060"), netip.MustParseAddrPort("10.99.0.1:5060"), reply)
			} else {
				inner = pkt.UDP4(netip.MustParseAddrPort("10.0.0.1:5060"), netip.MustParseAddrPort("10.99.0.1:5060"), reply)[20:]
			}
			sbuf := make([]byte, 4096)
			copy(sbuf[64:], inner)
			nh := uint8(4)
			if espMode == esp.ModeTransport {
				nh = 17
			}
			s, e, err := gwOut.Seal(sbuf, 64, len(inner), nh, 0)
			if err != nil {
				t.Fatal(err)
			}
			gwConn.WriteToUDPAddrPort(sbuf[s:e], from)
			app.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, src, err := app.ReadFromUDPAddrPort(buf)
			if err != nil || src != netip.MustParseAddrPort("10.0.0.1:5060") || !bytes.Equal(buf[:n], reply) {
				t.Fatalf("reply at the phone: %v from %s %q\n%s", err, src, buf[:n], out.String())
			}
			// Keepalives keep coming on their interval.
			for keepalives < 3 {
				gwConn.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, _, err := gwConn.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("keepalives: %v", err)
				}
				if n == 1 && buf[0] == 0xff {
					keepalives++
				}
			}
			cmd.Process.Signal(syscall.SIGINT)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("xesp-lab ue exit: %v\n%s", err, out.String())
			}
			text := out.String()
			for _, want := range []string{"ESP sent 1, ESP received 1, to TUN 1", "keepalives sent "} {
				if !strings.Contains(text, want) {
					t.Fatalf("output lacks %q:\n%s", want, text)
				}
			}
			if strings.Contains(text, "dropped") {
				t.Fatalf("drops:\n%s", text)
			}
		})
	}
}

func mustMode(t *testing.T, spi uint32, key string, window int, mode esp.Mode) *esp.Transform {
	t.Helper()
	k, _ := hex.DecodeString(key)
	tr, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// xesp-lab ue as the phone in the real topology: the process reads the
// gateway's SA file (core address included: the phone ignores it), makes
// the TUN, and sipsak in its namespace registers with kamailio through the
// NAPT and the xesp gateway. Two NAPTs, one phone each, both 192.168.1.10.
func TestUECommandThroughGatewayToKamailio(t *testing.T) {
	netns.RequireRoot(t)
	l, err := topo.Start(context.Background(), topo.Options{Prefix: netns.UniqueName("uek") + "-", NAPTs: 2, Phones: 1, NoTunnels: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var procs []*exec.Cmd
	var outs []*bytes.Buffer
	for _, p := range l.Phones {
		file := writeFile(t, fmt.Sprintf("ue%d.yaml", p.N), p.SAYAML())
		cmd := labCmd(p.NS, "ue", "-sa", file, "-view", "gateway", "-tun", "ims0", "-ports", "5060", "-sip-user", p.User)
		out := &bytes.Buffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Process.Kill()
		procs, outs = append(procs, cmd), append(outs, out)
		for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if r, err := p.NS.Run("ip", "route", "get", "10.0.0.1"); err == nil && strings.Contains(string(r), "dev ims0") {
				break
			}
			if time.Now().After(end) {
				t.Fatalf("xesp-lab ue in %s did not come up:\n%s", p.NS.Name, out.String())
			}
		}
	}
	for _, p := range l.Phones {
		for i, m := range []string{"REGISTER", "OPTIONS"} {
			id := fmt.Sprintf("uecmd-ue%d-%d@xesp", p.N, i)
			r, err := l.Sipsak(context.Background(), p, m, id, i+1)
			if err != nil || !r.OK() || r.CallID != id {
				t.Fatalf("ue%d %s: %v %q Call-ID %q\n%s", p.N, m, err, r.Status, r.CallID, r.Raw)
			}
		}
	}
	for i, cmd := range procs {
		cmd.Process.Signal(syscall.SIGINT)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("xesp-lab ue: %v\n%s", err, outs[i].String())
		}
		// Two requests and two answers each, nothing dropped: the two
		// phones share 192.168.1.10:5060 behind two NAPTs, and neither
		// counted a packet under another SPI, for another port or
		// naming the other phone.
		if text := outs[i].String(); !strings.Contains(text, "ESP sent 2, ESP received 2, to TUN 2") || strings.Contains(text, "dropped") {
			t.Fatalf("ue%d counters:\n%s", i+1, text)
		}
	}
}
