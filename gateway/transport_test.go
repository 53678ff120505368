package gateway

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/secagree"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/worker"
	"github.com/xesp/xesp/internal/pkt"
)

// Transport-mode SAs through the gateway (docs/addressing.md, "Transport
// mode"), end to end with real XDP: the phone seals a bare UDP segment
// addressed to the gateway's public address; the core (a plain kernel UDP
// socket, which drops bad checksums) receives it from the phone's core
// address on the P-CSCF's port; its reply to the core address reaches the
// phone as a transport-mode segment (Next Header 17) whose UDP checksum
// is the one for gateway public address -> NAT binding.

// trSA is a transport-mode aes128gcm16 SA for the test phones.
func trSA(t *testing.T, spi uint32, key string, window int) *esp.Transform {
	t.Helper()
	k, _ := hex.DecodeString(key)
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: k, ReplayWindow: window, Mode: esp.ModeTransport})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// trSeal seals a phone's UDP segment from its own address and sport to
// the gateway's dport, the checksum computed over the phone's own
// addresses (behind a NAPT: its private one, RFC 3948 3.1.2's case).
func trSeal(t *testing.T, s *esp.Transform, phone, gw netip.Addr, sport, dport uint16, payload string) []byte {
	t.Helper()
	seg := pkt.UDP4(netip.AddrPortFrom(phone, sport), netip.AddrPortFrom(gw, dport), []byte(payload))[20:]
	buf := make([]byte, 64+len(seg)+64)
	copy(buf[64:], seg)
	start, end, err := s.Seal(buf, 64, len(seg), esp.ProtoUDP, 0)
	if err != nil {
		t.Fatal(err)
	}
	return buf[start:end]
}

// trOpen opens the gateway's ESP packet with the phone's inbound SA and
// checks the transport segment: Next Header UDP, ports, and the UDP
// checksum for the pseudo-header src -> dst (the gateway's public address
// and the binding it sent to). It returns the payload.
func trOpen(s *esp.Transform, b []byte, src, dst netip.Addr, sport, dport uint16) (string, error) {
	res, err := s.Open(b)
	if err != nil {
		return "", fmt.Errorf("open: %w", err)
	}
	seg := b[res.Start:res.End]
	if res.NextHeader != esp.ProtoUDP || len(seg) < 8 || int(binary.BigEndian.Uint16(seg[4:])) != len(seg) {
		return "", fmt.Errorf("not a UDP segment: next header %d, %x", res.NextHeader, seg)
	}
	if sp, dp := binary.BigEndian.Uint16(seg), binary.BigEndian.Uint16(seg[2:]); sp != sport || dp != dport {
		return "", fmt.Errorf("ports %d -> %d, want %d -> %d", sp, dp, sport, dport)
	}
	ph := append(src.AsSlice(), dst.AsSlice()...)
	if binary.BigEndian.Uint16(seg[6:]) == 0 || pkt.Fold(pkt.Sum(seg, pkt.Sum(ph, 17+uint64(len(seg))))) != 0xffff {
		return "", fmt.Errorf("UDP checksum %04x not valid for %s -> %s", binary.BigEndian.Uint16(seg[6:]), src, dst)
	}
	return string(seg[8:]), nil
}

// (a) UDP-encapsulated transport through NAPTs: two phones, both
// 192.168.1.10 behind their own NAPT, both using UDP port 5062 toward the
// P-CSCF's 5064. core_pool gives each pair its core address; the P-CSCF
// (10.0.0.1) sees each at its own core address, port 5062, and each
// phone gets exactly its own replies and core-initiated requests.
func TestGatewayTransportUDPEncapThroughNAPT(t *testing.T) {
	var sas strings.Builder
	sas.WriteString("sas:\n")
	for i := range ovPhones {
		for dir, d := range []string{"in", "out"} {
			spi := 0x4001 + i
			if d == "out" {
				spi = 0x5001
			}
			fmt.Fprintf(&sas, "  - {name: tr%d-%s, spi: %d, direction: %s, mode: transport, proposal: aes128gcm16, enc_key: %s, local: %s, peer: %s, encap: {}, inner: {local: %s}, ports: {local: 5064, peer: 5062, protocol: udp}}\n",
				i, d, spi, d, ovKey(i, dir), ovGW, ovWAN(i), ovCore)
		}
	}
	tp := newOvTopo(t, 2, sas.String())
	pcscf := udpSock(t, tp.core, netip.AddrPortFrom(ovCore, 5064).String())
	type phone struct {
		sock    *net.UDPConn
		out, in *esp.Transform
		core    netip.Addr
	}
	phones := make([]phone, ovPhones)
	for i := range phones {
		e, ok := tp.g.SAD.GetName(fmt.Sprintf("tr%d-out", i))
		if !ok || !e.SA.Core.IsValid() {
			t.Fatalf("tr%d-out: no core address allocated", i)
		}
		phones[i] = phone{sock: udpSock(t, tp.phones[i], netip.AddrPortFrom(ovPhone, 4500).String()),
			out: trSA(t, uint32(0x4001+i), ovKey(i, 0), 0), in: trSA(t, 0x5001, ovKey(i, 1), 1024), core: e.SA.Core}
	}
	if phones[0].core == phones[1].core {
		t.Fatalf("both phones got core address %s", phones[0].core)
	}
	// recv reads the phone's next ESP packet from the gateway and opens
	// it; the checksum is the gateway's for its address -> the NAPT.
	recv := func(i int) string {
		t.Helper()
		buf := make([]byte, 4096)
		phones[i].sock.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, from, err := phones[i].sock.ReadFromUDPAddrPort(buf)
		if err != nil || from != ovGWESP {
			t.Fatalf("ph%d: nothing from the gateway (%v, from %v)", i, err, from)
		}
		got, err := trOpen(phones[i].in, buf[:n], ovGW, ovWAN(i), 5064, 5062)
		if err != nil {
			t.Fatalf("ph%d: %v", i, err)
		}
		return got
	}

	// 1. Each phone's REGISTER reaches the P-CSCF from its core address
	// (the kernel accepted the UDP checksum). A NAPT may lose a new
	// flow's first packet: retransmit.
	for i, ph := range phones {
		want := fmt.Sprintf("REGISTER from ph%d", i)
		for try := 0; ; try++ {
			if _, err := ph.sock.WriteToUDPAddrPort(trSeal(t, ph.out, ovPhone, ovGW, 5062, 5064, want), ovGWESP); err != nil {
				t.Fatal(err)
			}
			pcscf.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 2048)
			n, from, err := pcscf.ReadFromUDPAddrPort(buf)
			if err == nil {
				if string(buf[:n]) != want || from != netip.AddrPortFrom(ph.core, 5062) {
					t.Fatalf("P-CSCF got %q from %s, want %q from %s:5062", buf[:n], from, want, ph.core)
				}
				break
			}
			if try == 9 {
				t.Fatalf("ph%d: REGISTER never reached the P-CSCF", i)
			}
		}
	}
	// 2. Replies and P-CSCF-initiated requests, interleaved.
	for k := range 4 {
		for i, ph := range phones {
			msg := fmt.Sprintf("SIP/2.0 200 OK #%d for ph%d", k, i)
			if _, err := pcscf.WriteToUDPAddrPort([]byte(msg), netip.AddrPortFrom(ph.core, 5062)); err != nil {
				t.Fatal(err)
			}
		}
		for i := range phones {
			if got, want := recv(i), fmt.Sprintf("SIP/2.0 200 OK #%d for ph%d", k, i); got != want {
				t.Fatalf("ph%d got %q, want %q", i, got, want)
			}
		}
	}
	// 3. A segment to another gateway port is outside the SA's ports:
	// dropped (selector), never delivered.
	decapPolicy := func() uint64 { return workerDrops(&topo{g: tp.g}, decapOf, worker.DropPolicy) }
	before := decapPolicy()
	if _, err := phones[0].sock.WriteToUDPAddrPort(trSeal(t, phones[0].out, ovPhone, ovGW, 5062, 5099, "to 5099"), ovGWESP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "selector drop of a segment to port 5099", func() bool { return decapPolicy() > before })
}

// (b) Plain ESP (IP protocol 50) transport without a NAPT: the phone
// sends ESP over a raw socket; the SA names its core address
// (inner.core, no core_pool). The P-CSCF receives from the core
// address; its reply reaches the phone as protocol 50 from the gateway,
// the UDP checksum exact for 192.0.2.1 -> 192.0.2.10.
func TestGatewayTransportPlainESP(t *testing.T) {
	core := netip.MustParseAddr("100.64.0.9")
	gw, ph := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.10")
	const kIn, kOut = "404142434445464748494a4b4c4d4e4f50515253", "606162636465666768696a6b6c6d6e6f70717273"
	extra := fmt.Sprintf(`  - {name: tr-in, spi: 0x6001, direction: in, mode: transport, proposal: aes128gcm16, enc_key: %s, local: 192.0.2.1, peer: 192.0.2.10, inner: {local: 10.0.0.1, core: %s}}
  - {name: tr-out, spi: 0x6002, direction: out, mode: transport, proposal: aes128gcm16, enc_key: %s, local: 192.0.2.1, peer: 192.0.2.10, inner: {local: 10.0.0.1, core: %s}}
`, kIn, core, kOut, core)
	tp := newTopoConfig(t, 1, Options{}, extra, nil)
	tp.core.MustRun("ip", "route", "add", core.String()+"/32", "via", "10.0.0.254")
	pcscf := udpSock(t, tp.core, "10.0.0.1:5064")
	var raw *net.IPConn
	if err := tp.phone.Do(func() (err error) {
		raw, err = net.ListenIP("ip4:50", &net.IPAddr{IP: ph.AsSlice()})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	out, in := trSA(t, 0x6001, kIn, 0), trSA(t, 0x6002, kOut, 1024)
	gwAddr := &net.IPAddr{IP: gw.AsSlice()}

	for k := range 3 {
		req := fmt.Sprintf("OPTIONS sip:pcscf #%d", k)
		if _, err := raw.WriteToIP(trSeal(t, out, ph, gw, 5062, 5064, req), gwAddr); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		pcscf.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, from, err := pcscf.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != req || from != netip.AddrPortFrom(core, 5062) {
			t.Fatalf("P-CSCF got %q from %v (%v), want %q from %s:5062", buf[:n], from, err, req, core)
		}
		resp := fmt.Sprintf("SIP/2.0 200 OK #%d", k)
		if _, err := pcscf.WriteToUDPAddrPort([]byte(resp), from); err != nil {
			t.Fatal(err)
		}
		raw.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, src, err := raw.ReadFromIP(buf)
		if err != nil || !src.IP.Equal(gw.AsSlice()) {
			t.Fatalf("phone: no ESP from the gateway (%v from %v)", err, src)
		}
		got, err := trOpen(in, buf[:n], gw, ph, 5064, 5062)
		if err != nil || got != resp {
			t.Fatalf("phone opened %q (%v), want %q", got, err, resp)
		}
	}
	// The default tunnel pair beside it is untouched: its own phone
	// address is not the transport SA's.
	if _, ok := tp.g.SAD.GetName("ue1-in"); !ok {
		t.Fatal("tunnel SA missing")
	}
}

// sec-agree's mod=trans end to end, plain ESP without a NAPT: the API
// (with a core_pool) registers four transport SAs for the phone
// (inner.local = the P-CSCF, one core address); the phone derives its
// keys from CK/IK as TS 33.203 says, sends on its client port to the
// P-CSCF's protected server port over a raw protocol-50 socket; the
// P-CSCF receives from the core address, and its answer reaches the phone
// under the phone's spi-c, the segment's checksum exact for the gateway ->
// phone addresses.
func TestGatewayTransportSecAgreePlainESP(t *testing.T) {
	tp := newTopo(t, 2)
	tp.core.MustRun("ip", "route", "add", "100.64.0.0/24", "via", "10.0.0.254")
	dp, err := tp.g.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortTemp(t), "api.sock")
	srv, err := api.New(api.Options{SAD: tp.g.SAD, DataPath: dp, API: config.API{Unix: sock}, NATTPort: 4500, CorePool: netip.MustParsePrefix("100.64.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	cl, err := api.NewClient(sock, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cl.Close()
		cancel()
		if err := <-served; err != nil {
			t.Errorf("api: %v", err)
		}
	})

	gw, ph, pcscfAddr := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("10.0.0.1")
	const ueC, ueS, pC, pS = 5062, 5064, 5063, 5065
	const spiC, spiS = 0x7000a, 0x7000b
	ck, ik := make([]byte, 16), make([]byte, 16)
	for i := range ck {
		ck[i], ik[i] = byte(i), byte(0xa0+i)
	}
	resp, err := cl.SecAgree(context.Background(), api.SecAgreeRequest{Registration: "trans1",
		SecurityClient: fmt.Sprintf("ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=trans;spi-c=%d;spi-s=%d;port-c=%d;port-s=%d", spiC, spiS, ueC, ueS),
		CK:             hex.EncodeToString(ck), IK: hex.EncodeToString(ik), UE: netip.AddrPortFrom(ph, ueC).String(), PCSCF: pcscfAddr.String(),
		Local: gw.String(), PortC: pC, PortS: pS})
	if err != nil {
		t.Fatal(err)
	}
	core, err := netip.ParseAddr(resp.Core)
	if err != nil || !strings.Contains(resp.SecurityServer, "mod=trans") {
		t.Fatalf("registration: core %q, Security-Server %q", resp.Core, resp.SecurityServer)
	}
	ms, err := secagree.Parse(resp.SecurityServer)
	if err != nil || len(ms) != 1 {
		t.Fatalf("Security-Server %q: %v", resp.SecurityServer, err)
	}
	keys, err := secagree.ExpandKeys(secagree.AlgHMACSHA196, secagree.EalgAESCBC, ck, ik)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(spi uint32, window int) *esp.Transform {
		s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128SHA1, EncKey: keys.Enc, AuthKey: keys.Auth, ReplayWindow: window, Mode: esp.ModeTransport})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// The phone's client port to the P-CSCF's server port goes under the
	// P-CSCF's spi-s; the answer comes back under the phone's spi-c.
	toPS, fromPS := mk(ms[0].SPIS, 0), mk(spiC, 64)
	pcscf := udpSock(t, tp.core, netip.AddrPortFrom(pcscfAddr, pS).String())
	var raw *net.IPConn
	if err := tp.phone.Do(func() (err error) {
		raw, err = net.ListenIP("ip4:50", &net.IPAddr{IP: ph.AsSlice()})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	req := "REGISTER sip:ims.example SIP/2.0 (protected)"
	if _, err := raw.WriteToIP(trSeal(t, toPS, ph, gw, ueC, pS, req), &net.IPAddr{IP: gw.AsSlice()}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	pcscf.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := pcscf.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != req || from != netip.AddrPortFrom(core, ueC) {
		t.Fatalf("P-CSCF got %q from %v (%v), want %q from %s:%d", buf[:n], from, err, req, core, ueC)
	}
	answer := "SIP/2.0 200 OK (protected)"
	if _, err := pcscf.WriteToUDPAddrPort([]byte(answer), from); err != nil {
		t.Fatal(err)
	}
	raw.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, src, err := raw.ReadFromIP(buf)
	if err != nil || !src.IP.Equal(gw.AsSlice()) || binary.BigEndian.Uint32(buf) != spiC {
		t.Fatalf("phone: %v from %v (SPI %x)", err, src, buf[:min(4, n)])
	}
	if got, err := trOpen(fromPS, buf[:n], gw, ph, pS, ueC); err != nil || got != answer {
		t.Fatalf("phone opened %q (%v), want %q", got, err, answer)
	}
}
