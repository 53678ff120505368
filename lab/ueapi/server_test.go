package ueapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/ue"
)

// gwPeer is a Go-driven gateway: a UDP socket in its own namespace and
// the mirror of the phone's SAs, several at once during a rekey.
type gwPeer struct {
	c   *net.UDPConn
	out *esp.Transform
	in  map[uint32]*esp.Transform
}

type got struct {
	spi   uint32
	seq   uint64
	inner []byte
}

func (p *gwPeer) recv(t *testing.T) got {
	t.Helper()
	buf := make([]byte, 65536)
	p.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		n, _, err := p.c.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("gateway recv: %v", err)
		}
		if n == 1 && buf[0] == 0xff {
			continue
		}
		spi := binary.BigEndian.Uint32(buf[:4])
		s := p.in[spi]
		if s == nil {
			t.Fatalf("gateway: ESP under SPI 0x%08x it does not hold", spi)
		}
		res, err := s.Open(buf[:n])
		if err != nil {
			t.Fatalf("gateway open SPI 0x%08x: %v", spi, err)
		}
		return got{spi, res.Seq, append([]byte(nil), buf[res.Start:res.End]...)}
	}
}

func (p *gwPeer) send(t *testing.T, inner []byte, to netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 65536)
	copy(buf[64:], inner)
	s, e, err := p.out.Seal(buf, 64, len(inner), esp.NextHeaderFor(inner), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.c.WriteToUDPAddrPort(buf[s:e], to); err != nil {
		t.Fatal(err)
	}
}

// keyed is one SA in the SA format, phone's view, with fresh keys; mirror
// is the gateway's engine SA for it.
type keyed struct {
	json   string
	key    string
	mirror *esp.Transform
}

func newKeyed(t *testing.T, dir string, spi uint32) keyed {
	t.Helper()
	k := make([]byte, 20)
	rand.Read(k)
	kh := hex.EncodeToString(k)
	window := 0
	if dir == "out" { // the gateway opens what the phone seals
		window = 1024
	}
	m, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	sel := `"inner": {"local": "10.99.0.1/32", "peer": "10.0.0.0/24"}`
	j := fmt.Sprintf(`{"name": "ph-%s-%x", "spi": %d, "direction": %q, "mode": "tunnel", "proposal": "aes128gcm16", "enc_key": %q,
		"local": "192.0.2.1", "peer": "192.0.2.2", "encap": {"local_port": 4500, "peer_port": 4500}, %s}`, dir, spi, spi, dir, kh, sel)
	return keyed{json: j, key: kh, mirror: m}
}

func addSA(t *testing.T, c *api.Client, k keyed) api.SAView {
	t.Helper()
	list, err := sa.ParseBytes([]byte(k.json), sa.JSON, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.Add(context.Background(), list[0].WithKeys())
	if err != nil {
		t.Fatalf("add %s: %v", list[0].Label(), err)
	}
	return v
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawDo sends one request over the socket and returns status and body.
func rawDo(t *testing.T, sock, method, path, ctype, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://phone"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The phone starts with no SAs and gets them through its API while it
// runs: before, packets from the TUN are dropped as no_sa and the
// gateway's ESP as unknown_spi; after, traffic flows both ways through
// the TUN; an outbound rekey mid-stream loses no packet and the new SPI
// carries every packet from the switch on (its sequence from 1); an
// inbound rekey overlaps until the old SA is deleted. Bad requests get
// 4xx naming the field, and GET never shows a key.
func TestPhoneAPI(t *testing.T) {
	a, b := netns.ForTest(t, "uapa"), netns.ForTest(t, "uapb")
	va, vb := netns.VethForTest(t, a, b)
	a.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", va)
	b.MustRun("ip", "addr", "add", "192.0.2.2/24", "dev", vb)

	var tun *ue.Tunnel
	if err := a.Do(func() (err error) {
		tun, err = ue.StartTunnel(ue.TunnelConfig{Local: netip.MustParseAddrPort("192.0.2.1:4500"), Gateway: netip.MustParseAddrPort("192.0.2.2:4500"),
			Inner: netip.MustParseAddr("10.99.0.1"), Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}, Keepalive: -1})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tun.Close() })
	srv, err := New(tun, "192.0.2.2:4500")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "phone.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, sock, func() { close(ready) }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	select {
	case <-ready:
	case err := <-served:
		t.Fatal(err)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket %s: %v, mode %v; want 0600", sock, err, st.Mode())
	}
	cl, err := api.NewClient("unix:"+sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	var peerConn, app, cli *net.UDPConn
	if err := b.Do(func() (err error) {
		peerConn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("192.0.2.2:4500")))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer peerConn.Close()
	peerConn.SetReadBuffer(4 << 20)
	if err := a.Do(func() (err error) {
		if cli, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("10.99.0.1:7001"))); err != nil {
			return err
		}
		app = cli
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	phone := netip.MustParseAddrPort("192.0.2.1:4500")
	dst := netip.MustParseAddrPort("10.0.0.1:7000")

	// No SAs: dropped and counted on both paths.
	for range 3 {
		if _, err := cli.WriteToUDPAddrPort([]byte("before"), dst); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "no_sa drops", func() bool { return tun.Counters().Drops[ue.DropNoSA] >= 3 })
	out1, in1 := newKeyed(t, "out", 0x1001), newKeyed(t, "in", 0x2001)
	peer := &gwPeer{c: peerConn, out: in1.mirror, in: map[uint32]*esp.Transform{}}
	peer.send(t, udp4(t, "10.0.0.1:7000", "10.99.0.1:7001", []byte("early")), phone)
	waitFor(t, "unknown_spi drop", func() bool { return tun.Counters().Drops[ue.DropUnknownSPI] == 1 })
	if c := tun.Counters(); c.Sent != 0 || c.ToTUN != 0 {
		t.Fatalf("without SAs the phone moved packets: %+v", c)
	}

	// Add the pair through the API: traffic flows both ways.
	addSA(t, cl, out1)
	addSA(t, cl, in1)
	peer.in[0x1001] = out1.mirror
	for i := range 5 {
		msg := []byte(fmt.Sprintf("REGISTER %d", i))
		if _, err := cli.WriteToUDPAddrPort(msg, dst); err != nil {
			t.Fatal(err)
		}
		g := peer.recv(t)
		if g.spi != 0x1001 || !bytes.HasSuffix(g.inner, msg) {
			t.Fatalf("gateway got SPI 0x%x %q", g.spi, g.inner)
		}
		peer.send(t, udp4(t, "10.0.0.1:7000", "10.99.0.1:7001", append([]byte("200 OK "), msg...)), phone)
		buf := make([]byte, 2000)
		cli.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := cli.ReadFromUDPAddrPort(buf)
		if err != nil || from != dst || string(buf[:n]) != "200 OK "+string(msg) {
			t.Fatalf("reply %d: %q from %s: %v (counters %+v)", i, buf[:n], from, err, tun.Counters())
		}
	}

	// Outbound rekey mid-stream: a sender runs while the API replaces the
	// outbound SA.
	out2 := newKeyed(t, "out", 0x1002)
	peer.in[0x1002] = out2.mirror
	const total = 400
	sendDone := make(chan error, 1)
	// The switch starts after a quarter of the packets; the sender does
	// not go past half of them before the switch is done, however long
	// it takes on a loaded machine, so it happens mid-stream.
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
			if _, err := cli.WriteToUDPAddrPort(m[:], dst); err != nil {
				sendDone <- err
				return
			}
			time.Sleep(500 * time.Microsecond)
		}
		sendDone <- nil
	}()
	<-switchAt
	addSA(t, cl, out2)
	close(switched)
	seen := make([]bool, total)
	var onNew, lastSeqNew uint64
	for range total {
		g := peer.recv(t)
		i := binary.BigEndian.Uint64(g.inner[len(g.inner)-8:])
		if i >= total || seen[i] {
			t.Fatalf("packet %d twice or unknown", i)
		}
		seen[i] = true
		switch {
		case g.spi == 0x1002:
			onNew++
			if g.seq != lastSeqNew+1 {
				t.Fatalf("new SA sequence %d after %d", g.seq, lastSeqNew)
			}
			lastSeqNew = g.seq
		case onNew > 0:
			t.Fatalf("packet %d under the old SPI after the new one took over", i)
		}
	}
	if err := <-sendDone; err != nil {
		t.Fatal(err)
	}
	if onNew == 0 || onNew == total {
		t.Fatalf("%d of %d packets under the new SPI: the switch did not happen mid-stream", onNew, total)
	}
	if c := tun.Counters(); c.Drops[ue.DropNoSA] != 3 || c.Seal != (esp.Counters{}) {
		t.Fatalf("drops during the rekey: %v", c.DropList())
	}
	page, err := cl.List(context.Background(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, v := range page.Items {
		refs = append(refs, v.Ref)
	}
	if strings.Join(refs, " ") != "in:0x00002001 out:0x00001002@192.0.2.2:4500" {
		t.Fatalf("after the outbound rekey the phone lists %v", refs)
	}

	// Inbound rekey: the new inbound opens at once, the old one until
	// deleted.
	in2 := newKeyed(t, "in", 0x2002)
	addSA(t, cl, in2)
	reply := func(s *esp.Transform, body string) {
		peer.out = s
		peer.send(t, udp4(t, "10.0.0.1:7000", "10.99.0.1:7001", []byte(body)), phone)
	}
	expect := func(body string) {
		buf := make([]byte, 2000)
		cli.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, _, err := cli.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != body {
			t.Fatalf("want %q, got %q: %v", body, buf[:n], err)
		}
	}
	reply(in2.mirror, "new in")
	expect("new in")
	reply(in1.mirror, "old in")
	expect("old in")
	if _, err := cl.Delete(context.Background(), "in:0x2001"); err != nil {
		t.Fatal(err)
	}
	reply(in1.mirror, "old in after delete")
	waitFor(t, "unknown_spi after the delete", func() bool { return tun.Counters().Drops[ue.DropUnknownSPI] == 2 })

	// GET never returns keys.
	if v, err := cl.Get(context.Background(), "in:0x2002"); err != nil || v.SPI.String() != "0x00002002" || v.EncKey != "" {
		t.Fatalf("get in:0x2002: %+v %v", v, err)
	}
	for _, path := range []string{"/v1/sas", "/v1/stats", "/v1/sas/out:0x1002", "/v1/sas/ph-in-2002"} {
		code, body := rawDo(t, sock, "GET", path, "", "")
		if code != 200 {
			t.Fatalf("GET %s: %d %s", path, code, body)
		}
		for _, k := range []keyed{out1, in1, out2, in2} {
			if strings.Contains(body, k.key) || strings.Contains(body, "enc_key") {
				t.Fatalf("GET %s shows a key: %s", path, body)
			}
		}
		if path == "/v1/stats" && (!strings.Contains(body, `"out_spi":4098`) || !strings.Contains(body, `"no_sa":3`)) {
			t.Fatalf("stats: %s", body)
		}
	}

	// Bad requests: 4xx naming what is wrong.
	good := newKeyed(t, "in", 0x2003).json
	transport := strings.Replace(strings.Replace(good, `"tunnel"`, `"transport"`, 1), `"inner": {"local": "10.99.0.1/32", "peer": "10.0.0.0/24"}`, `"esn": false`, 1)
	for _, c := range []struct {
		method, path, ctype, body string
		code                      int
		says                      string
	}{
		{"POST", "/v1/sas", "application/json", strings.Replace(good, `"enc_key": "`, `"enc_key": "00`, 1), 400, "enc_key"},
		{"POST", "/v1/sas", "application/json", strings.Replace(good, `"proposal"`, `"propsal"`, 1), 400, "propsal"},
		{"POST", "/v1/sas", "text/plain", good, 415, "content type"},
		{"POST", "/v1/sas", "application/json", transport, 400, "mode"},
		{"POST", "/v1/sas", "application/json", in2.json, 409, "0x00002002"},
		{"POST", "/v1/sas", "application/json", out2.json, 409, "0x00001002"},
		{"DELETE", "/v1/sas/in:0x9999", "", "", 404, "in:0x9999"},
		{"DELETE", "/v1/sas/sideways:1", "", "", 400, "sideways"},
		{"PUT", "/v1/sas/in:0x2002", "application/json", good, 405, "GET, DELETE"},
		{"GET", "/v1/sas/in:0x2001", "", "", 404, "in:0x2001"},
	} {
		code, body := rawDo(t, sock, c.method, c.path, c.ctype, c.body)
		if code != c.code || !strings.Contains(body, c.says) {
			t.Errorf("%s %s (%.40s...): %d %s; want %d naming %q", c.method, c.path, c.body, code, body, c.code, c.says)
		}
	}
	// The rejected requests changed nothing: traffic still flows on the
	// rekeyed pair.
	if _, err := cli.WriteToUDPAddrPort([]byte("after"), dst); err != nil {
		t.Fatal(err)
	}
	if g := peer.recv(t); g.spi != 0x1002 || !bytes.HasSuffix(g.inner, []byte("after")) {
		t.Fatalf("after the bad requests the gateway got SPI 0x%x %q", g.spi, g.inner)
	}
	// A rekey may keep the replaced outbound SA's name; an inbound SA
	// may not take a name in use.
	out3 := newKeyed(t, "out", 0x1003)
	out3.json = strings.Replace(out3.json, `"ph-out-1003"`, `"ph-out-1002"`, 1)
	if v := addSA(t, cl, out3); v.Ref != "out:0x00001003@192.0.2.2:4500" || v.Name != "ph-out-1002" {
		t.Fatalf("rekey under the same name: %+v", v)
	}
	if code, body := rawDo(t, sock, "POST", "/v1/sas", "application/json", strings.Replace(good, `"ph-in-2003"`, `"ph-out-1002"`, 1)); code != 409 || !strings.Contains(body, "name") {
		t.Fatalf("inbound SA under an outbound's name: %d %s", code, body)
	}
	// Deleting the outbound SA stops sealing again.
	if _, err := cl.Delete(context.Background(), "ph-out-1002"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.WriteToUDPAddrPort([]byte("gone"), dst); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "no_sa after deleting the outbound SA", func() bool { return tun.Counters().Drops[ue.DropNoSA] == 4 })
}

// udp4 builds an IPv4/UDP packet (checksum 0: allowed for UDP over IPv4).
func udp4(t *testing.T, src, dst string, payload []byte) []byte {
	t.Helper()
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	p := make([]byte, 28+len(payload))
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	copy(p[12:16], s.Addr().AsSlice())
	copy(p[16:20], d.Addr().AsSlice())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(p[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(p[10:], ^uint16(sum))
	binary.BigEndian.PutUint16(p[20:], s.Port())
	binary.BigEndian.PutUint16(p[22:], d.Port())
	binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload)))
	copy(p[28:], payload)
	return p
}
