package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/topo"
	"github.com/xesp/xesp/lab/ueapi"
)

// phoneStats reads the phone API's GET /v1/stats.
func phoneStats(t *testing.T, sock string) ueapi.Stats {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://phone/v1/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var st ueapi.Stats
	if resp.StatusCode != 200 || json.Unmarshal(b, &st) != nil {
		t.Fatalf("stats: %d %s", resp.StatusCode, b)
	}
	return st
}

// specFile writes one SA (keys included) as an SA file in JSON.
func specFile(t *testing.T, name string, s sa.SA) string {
	t.Helper()
	b, err := json.Marshal(s.WithKeys())
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, name, string(b))
}

// xesp-lab ue -api in the real topology (NAPT, the xesp gateway, kamailio):
// the phone starts with no SAs and drops what its TUN gets as no_sa; the
// `xesp sa` CLI installs its SA pair through the phone's socket and sipsak
// registers; then, with UDP streaming from the phone to the core, the
// phone's outbound SA is replaced through its API by one the gateway
// already holds: every packet arrives once, the gateway counts traffic
// on the new SA, and the phone seals with the new SPI.
func TestUECommandAPIThroughGateway(t *testing.T) {
	netns.RequireRoot(t)
	l, err := topo.Start(context.Background(), topo.Options{Prefix: netns.UniqueName("uea") + "-", Phones: 1, NoTunnels: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	p := l.Phones[0]
	gwView, err := sa.ParseBytes([]byte(p.SAYAML()), sa.YAML, sa.Options{})
	if err != nil || len(gwView) != 2 {
		t.Fatalf("lab SAs: %v", err)
	}
	var gin, gout sa.SA
	for _, s := range gwView {
		if s.Direction == sa.In {
			gin = s
		} else {
			gout = s
		}
	}

	sock := filepath.Join(t.TempDir(), "phone.sock")
	cmd := labCmd(p.NS, "ue", "-api", sock, "-gateway", netip.AddrPortFrom(topo.GatewayPublic, 4500).String(),
		"-inner", p.Inner.String(), "-route", "10.0.0.0/24", "-tun", "ims0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	for end := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "phone up"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("xesp-lab ue -api did not come up:\n%s", out.String())
		}
	}
	if !strings.Contains(out.String(), "no SAs yet") {
		t.Fatalf("start line: %s", out.String())
	}

	var app, core *net.UDPConn
	if err := p.NS.Do(func() (err error) {
		app, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.Inner, 7001)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	if err := l.Core.Do(func() (err error) {
		core, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.Core, 7000)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer core.Close()
	core.SetReadBuffer(4 << 20)
	dst := netip.AddrPortFrom(topo.Core, 7000)

	// No SAs: the TUN's packets are dropped and counted.
	for range 3 {
		if _, err := app.WriteToUDPAddrPort([]byte("no sa"), dst); err != nil {
			t.Fatal(err)
		}
	}
	for end := time.Now().Add(10 * time.Second); phoneStats(t, sock).Drops["no_sa"] < 3; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("no_sa drops: %+v", phoneStats(t, sock))
		}
	}

	// The phone's view of the gateway's pair, installed with xesp sa add.
	pout, pin := mirrorSA(gin), mirrorSA(gout)
	pin.ReplayWindow = 1024
	files := []string{specFile(t, "out.json", pout), specFile(t, "in.json", pin)}
	add := xespCmd(t, append([]string{"sa", "add", "--api", "unix:" + sock}, files...)...)
	if b, err := add.CombinedOutput(); err != nil {
		t.Fatalf("xesp sa add to the phone: %v\n%s", err, b)
	}
	list, err := xespCmd(t, "sa", "list", "--json", "--api", "unix:"+sock).CombinedOutput()
	if err != nil || strings.Contains(string(list), hex.EncodeToString(gin.EncKey)) || !strings.Contains(string(list), fmt.Sprintf("out:0x%08x", gin.SPI)) {
		t.Fatalf("xesp sa list on the phone: %v\n%s", err, list)
	}
	for i, m := range []string{"REGISTER", "OPTIONS"} {
		id := fmt.Sprintf("ueapi-%d@xesp", i)
		r, err := l.Sipsak(context.Background(), p, m, id, i+1)
		if err != nil || !r.OK() || r.CallID != id {
			t.Fatalf("%s: %v %q Call-ID %q\n%s", m, err, r.Status, r.CallID, r.Raw)
		}
	}

	// The gateway learns a second inbound SA for the phone (as after a
	// sec-agree rekey); then the phone switches to it mid-stream.
	key := make([]byte, 20)
	rand.Read(key)
	newIn := gin
	newIn.Name, newIn.SPI, newIn.EncKey = gin.Name+"-2", gin.SPI+0x1000, key
	if _, err := l.Gateway.SAD.Add(newIn); err != nil {
		t.Fatal(err)
	}
	dp, err := l.Gateway.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := dp.Synced(ctx, l.Gateway.SAD.Version()); err != nil {
		t.Fatal(err)
	}
	const total = 300
	sent := make(chan error, 1)
	// The rekey starts after a quarter of the packets; the sender does
	// not go past half of them before `xesp sa add` returned, however
	// long a process start takes on a loaded machine, so the switch
	// happens mid-stream.
	switchAt, switched := make(chan struct{}), make(chan struct{})
	go func() {
		for i := range total {
			if i == total/4 {
				close(switchAt)
			}
			if i == total/2 {
				select {
				case <-switched:
				case <-time.After(30 * time.Second):
				}
			}
			var m [8]byte
			binary.BigEndian.PutUint64(m[:], uint64(i))
			if _, err := app.WriteToUDPAddrPort(m[:], dst); err != nil {
				sent <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
		sent <- nil
	}()
	<-switchAt
	pnew := mirrorSA(newIn)
	if b, err := xespCmd(t, "sa", "add", "--api", "unix:"+sock, specFile(t, "out2.json", pnew)).CombinedOutput(); err != nil {
		t.Fatalf("rekey through the phone's API: %v\n%s", err, b)
	}
	close(switched)
	seen := make([]bool, total)
	buf := make([]byte, 2000)
	for range total {
		core.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, _, err := core.ReadFromUDPAddrPort(buf)
		if err != nil {
			c, _ := dp.SACounters(newIn.ID())
			t.Fatalf("at the core: %v; phone %+v, gateway new SA %+v\n%s", err, phoneStats(t, sock), c, out.String())
		}
		i := binary.BigEndian.Uint64(buf[:n])
		if n != 8 || i >= total || seen[i] {
			t.Fatalf("core got %x twice or unknown", buf[:n])
		}
		seen[i] = true
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	st := phoneStats(t, sock)
	c, ok := dp.SACounters(newIn.ID())
	if st.OutSPI != newIn.SPI || !ok || c.Packets == 0 || c.Packets >= total {
		t.Fatalf("after the rekey: phone seals with 0x%08x, gateway's new SA %+v (%v); want 0x%08x and part of the %d packets", st.OutSPI, c, ok, newIn.SPI, total)
	}
	// Replies still reach the phone through its inbound SA.
	if r, err := l.Sipsak(context.Background(), p, "OPTIONS", "ueapi-after@xesp", 3); err != nil || !r.OK() {
		t.Fatalf("OPTIONS after the rekey: %v %q", err, r.Status)
	}
	cmd.Process.Signal(syscall.SIGINT)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("xesp-lab ue: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "dropped no_sa 3") {
		t.Fatalf("exit counters:\n%s", out.String())
	}
}
