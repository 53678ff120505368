package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/internal/netns"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/userspace/api"
	"github.com/xesp/xesp/userspace/config"
	"github.com/xesp/xesp/userspace/esp"
	"github.com/xesp/xesp/userspace/sa"
	"github.com/xesp/xesp/userspace/secagree"
)

// Addresses of the sec-agree topology:
//
//	ue (192.168.1.11) ─ napt (masquerade to 198.51.100.2) ─ gw (198.51.100.1 | 10.0.0.254) ─ core (10.0.0.1)
//
// The P-CSCF is test code: its unprotected port listens on the gateway's
// public address (the kernel gets what XDP passes), its protected ports in
// the core, behind the data path.
var (
	saUELan     = netip.MustParseAddr("192.168.1.11")
	saNAPTWAN   = netip.MustParseAddr("198.51.100.2")
	saGWPublic  = netip.MustParseAddr("198.51.100.1")
	saPCSCF     = netip.MustParseAddr("10.0.0.1")
	saUnprot    = netip.AddrPortFrom(saGWPublic, 5060)
	saPortC     = uint16(5063) // P-CSCF protected client port
	saPortS     = uint16(5065) // P-CSCF protected server port
	saUEPortC   = uint16(5062)
	saUEPortS   = uint16(5064)
	saUESPIC    = uint32(0x11110001)
	saUESPIS    = uint32(0x11110002)
	saGWESPPort = netip.AddrPortFrom(saGWPublic, 4500)
)

type secAgreeTopo struct {
	ue, napt, gw, core *netns.NS
	g                  *Gateway
	api                *api.Client
}

func newSecAgreeTopo(t *testing.T) *secAgreeTopo {
	t.Helper()
	tp := &secAgreeTopo{ue: netns.ForTest(t, "sue"), napt: netns.ForTest(t, "snat"), gw: netns.ForTest(t, "sgw"), core: netns.ForTest(t, "sco")}
	ueIf, lanIf := netns.VethForTest(t, tp.ue, tp.napt)
	wanIf, pubIf := netns.VethForTest(t, tp.napt, tp.gw)
	privIf, coreIf := netns.VethForTest(t, tp.gw, tp.core)
	tp.ue.MustRun("ip", "addr", "add", saUELan.String()+"/24", "dev", ueIf)
	tp.ue.MustRun("ip", "route", "add", "default", "via", "192.168.1.1")
	tp.napt.MustRun("ip", "addr", "add", "192.168.1.1/24", "dev", lanIf)
	tp.napt.MustRun("ip", "addr", "add", saNAPTWAN.String()+"/24", "dev", wanIf)
	tp.napt.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	nft := tp.napt.Command("nft", "-f", "-")
	nft.Stdin = strings.NewReader(fmt.Sprintf("table ip napt {\n chain post { type nat hook postrouting priority srcnat; oifname %q masquerade; }\n}\n", wanIf))
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	tp.gw.MustRun("ip", "addr", "add", saGWPublic.String()+"/24", "dev", pubIf)
	tp.gw.MustRun("ip", "addr", "add", "10.0.0.254/24", "dev", privIf)
	tp.core.MustRun("ip", "addr", "add", saPCSCF.String()+"/24", "dev", coreIf)
	tp.core.MustRun("ip", "route", "add", "192.168.1.0/24", "via", "10.0.0.254")

	dir := shortTemp(t)
	yaml := fmt.Sprintf(`
public: {interface: %s, addresses: [%s]}
private: {interface: %s}
workers: 2
state_dir: %s
umem: {frames: 4096, fill_ring: 1024, completion_ring: 1024, rx_ring: 1024, tx_ring: 1024}
`, pubIf, saGWPublic, privIf, filepath.Join(dir, "state"))
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.gw.Do(func() (err error) {
		tp.g, err = Start(context.Background(), cfg, Options{NoPin: true})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	dp, err := tp.g.DataPath()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	srv, err := api.New(api.Options{SAD: tp.g.SAD, DataPath: dp, API: config.API{Unix: sock}, NATTPort: cfg.NATTPort})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	if tp.api, err = api.NewClient(sock, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tp.api.Close()
		cancel()
		if err := <-served; err != nil {
			t.Errorf("api: %v", err)
		}
		if t.Failed() {
			(&topo{g: tp.g}).dump(t)
		}
		if err := tp.g.Stop(false); err != nil {
			t.Errorf("stop gateway: %v", err)
		}
	})
	return tp
}

// shortTemp is a temp dir with a short path (a Unix socket path has at
// most 108 bytes; t.TempDir embeds the test name).
func shortTemp(t *testing.T) string {
	dir, err := filepath.Abs(t.TempDir())
	if err != nil || len(dir) > 80 {
		dir = filepath.Join("/tmp", netns.UniqueName("xsa"))
	}
	return dir
}

// sipMessage is a parsed text SIP message: start line, headers by
// lower-case name (repeated headers joined with ", "), as RFC 3261 7.3.1
// allows for list headers.
type sipMessage struct {
	start string
	hdr   map[string]string
}

func parseSIP(b []byte) (sipMessage, bool) {
	head, _, _ := strings.Cut(string(b), "\r\n\r\n")
	lines := strings.Split(head, "\r\n")
	m := sipMessage{start: lines[0], hdr: map[string]string{}}
	for _, l := range lines[1:] {
		name, val, ok := strings.Cut(l, ":")
		if !ok {
			return m, false
		}
		k := strings.ToLower(strings.TrimSpace(name))
		v := strings.TrimSpace(val)
		if old, dup := m.hdr[k]; dup {
			v = old + ", " + v
		}
		m.hdr[k] = v
	}
	return m, strings.Contains(m.start, "SIP/2.0")
}

func sipBytes(start string, hdrs ...string) []byte {
	return []byte(start + "\r\n" + strings.Join(hdrs, "\r\n") + "\r\nContent-Length: 0\r\n\r\n")
}

// sipResponse answers req with status, copying the headers RFC 3261 8.2.6
// says a response copies, plus extra.
func sipResponse(req sipMessage, status string, extra ...string) []byte {
	h := []string{"Via: " + req.hdr["via"], "From: " + req.hdr["from"], "To: " + req.hdr["to"] + ";tag=pcscf", "Call-ID: " + req.hdr["call-id"], "CSeq: " + req.hdr["cseq"]}
	return sipBytes("SIP/2.0 "+status, append(h, extra...)...)
}

// pcscf is the test's P-CSCF: it challenges the first REGISTER with the
// Security-Server the API produced, checks Security-Verify on protected
// REGISTERs, and answers every protected request on its server port.
type pcscf struct {
	t         *testing.T
	api       *api.Client
	ck, ik    []byte
	unprot    *net.UDPConn // gw namespace, public address :5060
	portS     *net.UDPConn // core, protected server port
	portC     *net.UDPConn // core, protected client port
	mu        sync.Mutex
	server    []secagree.Mechanism // what the 401 carried
	observed  netip.AddrPort       // where the unprotected REGISTER came from
	verified  int                  // protected REGISTERs whose Security-Verify matched
	answered  int                  // protected requests answered on port-s
	fromUEs   chan []byte          // datagrams arriving on port-c
	deleted   chan deletion        // the delete after a de-registration's 200
	wg        sync.WaitGroup
	challenge []byte
}

func (p *pcscf) run() {
	p.wg.Add(3)
	go func() { defer p.wg.Done(); p.serveUnprotected() }()
	go func() { defer p.wg.Done(); p.serveProtected() }()
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := p.portC.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if from != netip.AddrPortFrom(saUELan, saUEPortS) {
				p.t.Errorf("P-CSCF port-c: datagram from %s", from)
				continue
			}
			p.fromUEs <- append([]byte(nil), buf[:n]...)
		}
	}()
}

func (p *pcscf) close() {
	p.unprot.Close()
	p.portS.Close()
	p.portC.Close()
	p.wg.Wait()
}

func (p *pcscf) serveUnprotected() {
	buf := make([]byte, 65536)
	for {
		n, from, err := p.unprot.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		req, ok := parseSIP(buf[:n])
		if !ok || !strings.HasPrefix(req.start, "REGISTER ") {
			p.t.Errorf("P-CSCF: unexpected unprotected %q", req.start)
			continue
		}
		p.mu.Lock()
		if p.challenge == nil {
			// The S-CSCF's 401 would bring CK and IK here; the test's
			// "HSS" shares them with the phone's "ISIM".
			resp, err := p.api.SecAgree(context.Background(), api.SecAgreeRequest{
				Registration: "alice", SecurityClient: req.hdr["security-client"],
				CK: hex.EncodeToString(p.ck), IK: hex.EncodeToString(p.ik),
				UE: from.String(), UEInner: viaHost(req.hdr["via"]), PCSCF: saPCSCF.String(), Local: saGWPublic.String(),
				PortC: saPortC, PortS: saPortS,
			})
			if err != nil {
				p.mu.Unlock()
				p.t.Errorf("P-CSCF: sec-agree API: %v", err)
				continue
			}
			p.server, _ = secagree.Parse(resp.SecurityServer)
			p.observed = from
			p.challenge = sipResponse(req, "401 Unauthorized",
				`WWW-Authenticate: Digest realm="ims.example.net",nonce="`+hex.EncodeToString(p.ck[:8])+`",algorithm=AKAv1-MD5`,
				"Security-Server: "+resp.SecurityServer)
		}
		resp := p.challenge
		p.mu.Unlock()
		if _, err := p.unprot.WriteToUDPAddrPort(resp, from); err != nil {
			p.t.Errorf("P-CSCF: send 401: %v", err)
		}
	}
}

func viaHost(via string) string {
	_, rest, _ := strings.Cut(via, " ")
	host, _, _ := strings.Cut(rest, ";")
	if ap, err := netip.ParseAddrPort(host); err == nil {
		return ap.Addr().String()
	}
	return host
}

func (p *pcscf) serveProtected() {
	buf := make([]byte, 65536)
	for {
		n, from, err := p.portS.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if from != netip.AddrPortFrom(saUELan, saUEPortC) {
			p.t.Errorf("P-CSCF port-s: request from %s, want the phone's port-c", from)
			continue
		}
		req, ok := parseSIP(buf[:n])
		if !ok {
			p.t.Errorf("P-CSCF port-s: not SIP: %q", buf[:n])
			continue
		}
		if strings.HasPrefix(req.start, "REGISTER ") {
			p.mu.Lock()
			err := secagree.Verify(req.hdr["security-verify"], p.server)
			if err == nil {
				p.verified++
			}
			p.mu.Unlock()
			if err != nil {
				p.t.Errorf("P-CSCF: %v", err)
				p.portS.WriteToUDPAddrPort(sipResponse(req, "494 Security Agreement Required"), from)
				continue
			}
		}
		p.mu.Lock()
		p.answered++
		p.mu.Unlock()
		if _, err := p.portS.WriteToUDPAddrPort(sipResponse(req, "200 OK"), from); err != nil {
			p.t.Errorf("P-CSCF: send 200: %v", err)
		}
		if strings.HasPrefix(req.start, "REGISTER ") && req.hdr["expires"] == "0" {
			// The final response has left: now the SAs may go.
			del, err := p.api.DeleteRegistration(context.Background(), "alice")
			p.deleted <- deletion{del, err}
		}
	}
}

type deletion struct {
	del api.RegistrationDeleted
	err error
}

// phone is the test's UE: unprotected SIP on its LAN address, then
// UDP-encapsulated ESP from one socket, with the four SAs TS 33.203 gives
// it and the port selectors a phone's IPsec stack enforces.
type phone struct {
	sip, esp  *net.UDPConn
	outToPS   *esp.SA // port-c -> P-CSCF port-s, P-CSCF's spi-s
	outToPC   *esp.SA // port-s -> P-CSCF port-c, P-CSCF's spi-c
	inFromPS  *esp.SA // P-CSCF port-s -> port-c, our spi-c
	inFromPC  *esp.SA // P-CSCF port-c -> port-s, our spi-s
	selectors int     // packets that opened but broke their SA's port selectors
	lastESP   []byte
}

func (ph *phone) sealSend(t *testing.T, s *esp.SA, src, dst uint16, payload []byte) {
	t.Helper()
	inner := pkt.UDP4(netip.AddrPortFrom(saUELan, src), netip.AddrPortFrom(saPCSCF, dst), payload)
	buf := make([]byte, 64+len(inner)+64)
	copy(buf[64:], inner)
	start, end, err := s.Seal(buf, 64, len(inner), esp.NextHeaderFor(inner), 0)
	if err != nil {
		t.Fatal(err)
	}
	ph.lastESP = append(ph.lastESP[:0], buf[start:end]...)
	if _, err := ph.esp.WriteToUDPAddrPort(buf[start:end], saGWESPPort); err != nil {
		t.Fatal(err)
	}
}

// recvESP returns the next inner UDP payload that opens under one of the
// phone's inbound SAs and matches that SA's port selectors.
func (ph *phone) recvESP(deadline time.Time) (src, dst netip.AddrPort, payload []byte, err error) {
	buf := make([]byte, 65536)
	ph.esp.SetReadDeadline(deadline)
	for {
		n, from, err := ph.esp.ReadFromUDPAddrPort(buf)
		if err != nil {
			return src, dst, nil, err
		}
		if from != saGWESPPort || n < 8 {
			continue
		}
		s, wantSrc, wantDst := ph.inFromPS, saPortS, saUEPortC
		if binary.BigEndian.Uint32(buf) == saUESPIS {
			s, wantSrc, wantDst = ph.inFromPC, saPortC, saUEPortS
		}
		res, err := s.Open(buf[:n])
		if err != nil {
			continue
		}
		src, dst, payload, ok := pkt.UDP4Parse(buf[res.Start:res.End])
		if !ok || src != netip.AddrPortFrom(saPCSCF, wantSrc) || dst != netip.AddrPortFrom(saUELan, wantDst) {
			ph.selectors++
			continue
		}
		return src, dst, append([]byte(nil), payload...), nil
	}
}

// request sends a SIP request (unprotected when s is nil) and waits for
// the final response with the same CSeq, retransmitting like a SIP UA
// over UDP (RFC 3261 timer A): a NAPT may lose a new flow's first packet.
func (ph *phone) request(t *testing.T, s *esp.SA, msg []byte, cseq string) sipMessage {
	t.Helper()
	wait := 500 * time.Millisecond
	for try := 0; try < 4; try, wait = try+1, wait*2 {
		if s == nil {
			if _, err := ph.sip.WriteToUDPAddrPort(msg, saUnprot); err != nil {
				t.Fatal(err)
			}
		} else {
			ph.sealSend(t, s, saUEPortC, saPortS, msg)
		}
		deadline := time.Now().Add(wait)
		for {
			var b []byte
			if s == nil {
				buf := make([]byte, 65536)
				ph.sip.SetReadDeadline(deadline)
				n, from, err := ph.sip.ReadFromUDPAddrPort(buf)
				if err != nil {
					break
				}
				if from != saUnprot {
					continue
				}
				b = buf[:n]
			} else {
				_, _, payload, err := ph.recvESP(deadline)
				if err != nil {
					break
				}
				b = payload
			}
			if m, ok := parseSIP(b); ok && m.hdr["cseq"] == cseq {
				return m
			}
		}
	}
	t.Fatalf("no response to CSeq %s after 4 transmissions", cseq)
	return sipMessage{}
}

func mustESPSA(t *testing.T, spi uint32, k secagree.Keys, window int) *esp.SA {
	t.Helper()
	s, err := esp.NewSA(esp.Config{SPI: spi, Proposal: esp.AES128SHA1, EncKey: k.Enc, AuthKey: k.Auth, ReplayWindow: window, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func randBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// The whole IMS registration over sec-agree with UDP-enc-tun: REGISTER
// with Security-Client, 401 with the Security-Server the API produced
// (and the SAs it installed in the running data path), the protected
// REGISTER with Security-Verify through the derived SAs, ESP through the
// NAPT, 200 OK back through them; then traffic both ways, counted per SA;
// then the registration is deleted and its SAs stop carrying anything.
func TestSecAgreeRegistrationThroughNAPT(t *testing.T) {
	tp := newSecAgreeTopo(t)
	ck, ik := randBytes(t, 16), randBytes(t, 16)

	pc := &pcscf{t: t, api: tp.api, ck: ck, ik: ik, fromUEs: make(chan []byte, 16), deleted: make(chan deletion, 4),
		unprot: udpSock(t, tp.gw, saUnprot.String()),
		portS:  udpSock(t, tp.core, netip.AddrPortFrom(saPCSCF, saPortS).String()),
		portC:  udpSock(t, tp.core, netip.AddrPortFrom(saPCSCF, saPortC).String())}
	pc.run()
	t.Cleanup(pc.close)

	ph := &phone{sip: udpSock(t, tp.ue, netip.AddrPortFrom(saUELan, 5060).String()), esp: udpSock(t, tp.ue, "0.0.0.0:4500")}
	// Two offers: the P-CSCF's policy must pick UDP-enc-tun with aes-cbc
	// over the phone's higher-q transport-mode null offer.
	offer := fmt.Sprintf("ipsec-3gpp;q=0.9;alg=hmac-sha-1-96;mod=trans;spi-c=%d;spi-s=%d;port-c=%d;port-s=%d, ipsec-3gpp;q=0.1;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=%d;spi-s=%d;port-c=%d;port-s=%d",
		saUESPIC, saUESPIS, saUEPortC, saUEPortS, saUESPIC, saUESPIS, saUEPortC, saUEPortS)
	common := []string{"From: <sip:alice@ims.example.net>;tag=ue1", "To: <sip:alice@ims.example.net>", "Call-ID: secagree-e2e@192.168.1.11", "Max-Forwards: 70"}
	reg1 := sipBytes("REGISTER sip:ims.example.net SIP/2.0", append([]string{
		"Via: SIP/2.0/UDP 192.168.1.11:5060;branch=z9hG4bKsa1;rport", "CSeq: 1 REGISTER",
		"Contact: <sip:alice@192.168.1.11:5060>",
		`Authorization: Digest username="alice@ims.example.net",realm="ims.example.net",uri="sip:ims.example.net",nonce="",response=""`,
		"Require: sec-agree", "Proxy-Require: sec-agree", "Supported: path, sec-agree",
		"Security-Client: " + offer}, common...)...)

	// 1. Unprotected REGISTER -> 401 with Security-Server.
	r401 := ph.request(t, nil, reg1, "1 REGISTER")
	if !strings.HasPrefix(r401.start, "SIP/2.0 401") {
		t.Fatalf("first REGISTER answered %q", r401.start)
	}
	ss, err := secagree.Parse(r401.hdr["security-server"])
	if err != nil || len(ss) != 1 {
		t.Fatalf("Security-Server %q: %v", r401.hdr["security-server"], err)
	}
	srv := ss[0]
	if srv.Alg != secagree.AlgHMACSHA196 || srv.Ealg != secagree.EalgAESCBC || srv.Mod != secagree.ModeUDPEncTun || srv.PortC != saPortC || srv.PortS != saPortS {
		t.Fatalf("Security-Server %q: not the UDP-enc-tun/aes-cbc offer", r401.hdr["security-server"])
	}
	if pc.observed.Addr() != saNAPTWAN {
		t.Fatalf("P-CSCF saw the REGISTER from %s, want the NAPT's address %s", pc.observed, saNAPTWAN)
	}

	// 2. The phone derives its side on its own (not through the package
	// under test): TS 33.203 Annex I for hmac-sha-1-96 and aes-cbc is
	// IK||0^32 and CK; the SPIs mirror the gateway's.
	keys := secagree.Keys{Auth: append(append([]byte(nil), ik...), 0, 0, 0, 0), Enc: ck}
	ph.outToPS, ph.outToPC = mustESPSA(t, srv.SPIS, keys, 0), mustESPSA(t, srv.SPIC, keys, 0)
	ph.inFromPS, ph.inFromPC = mustESPSA(t, saUESPIC, keys, 64), mustESPSA(t, saUESPIS, keys, 64)

	// 3. Protected REGISTER with Security-Verify -> 200 OK, through ESP.
	reg2 := sipBytes("REGISTER sip:ims.example.net SIP/2.0", append([]string{
		fmt.Sprintf("Via: SIP/2.0/UDP 192.168.1.11:%d;branch=z9hG4bKsa2;rport", saUEPortC), "CSeq: 2 REGISTER",
		fmt.Sprintf("Contact: <sip:alice@192.168.1.11:%d>", saUEPortS),
		`Authorization: Digest username="alice@ims.example.net",realm="ims.example.net",uri="sip:ims.example.net",nonce="x",response="y",algorithm=AKAv1-MD5`,
		"Require: sec-agree", "Proxy-Require: sec-agree",
		"Security-Verify: " + r401.hdr["security-server"]}, common...)...)
	r200 := ph.request(t, ph.outToPS, reg2, "2 REGISTER")
	if !strings.HasPrefix(r200.start, "SIP/2.0 200") {
		t.Fatalf("protected REGISTER answered %q", r200.start)
	}
	pc.mu.Lock()
	verified := pc.verified
	pc.mu.Unlock()
	if verified < 1 {
		t.Fatal("the P-CSCF never verified Security-Verify")
	}

	// 4. Traffic both ways: requests from the phone's client port,
	// answered through the SA to it; and the phone's server port to the
	// P-CSCF's client port.
	const n = 5
	for i := range n {
		cseq := fmt.Sprintf("%d OPTIONS", 3+i)
		m := sipBytes("OPTIONS sip:ims.example.net SIP/2.0", append([]string{
			fmt.Sprintf("Via: SIP/2.0/UDP 192.168.1.11:%d;branch=z9hG4bKo%d;rport", saUEPortC, i), "CSeq: " + cseq}, common...)...)
		if r := ph.request(t, ph.outToPS, m, cseq); !strings.HasPrefix(r.start, "SIP/2.0 200") {
			t.Fatalf("OPTIONS %d answered %q", i, r.start)
		}
	}
	toPC := sipBytes("SIP/2.0 200 OK", "Via: SIP/2.0/UDP 10.0.0.1:5063;branch=z9hG4bKn1", "CSeq: 1 NOTIFY", "Call-ID: notify@10.0.0.1")
	ph.sealSend(t, ph.outToPC, saUEPortS, saPortC, toPC)
	select {
	case got := <-pc.fromUEs:
		if !bytes.Equal(got, toPC) {
			t.Fatalf("P-CSCF port-c got %q", got)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("nothing reached the P-CSCF's client port through the in-c SA")
	}
	if ph.selectors != 0 {
		t.Fatalf("%d packets reached the phone under the wrong SA's selectors", ph.selectors)
	}

	// Per-SA figures of the data path: every phone packet on its SA,
	// every answer on out-c; the NAT binding moved from the unprotected
	// REGISTER's mapping to the ESP socket's, after authentication.
	ctx := context.Background()
	view := func(name string) api.SAView {
		v, err := tp.api.Get(ctx, name)
		if err != nil || v.Counters == nil {
			t.Fatalf("%s: %+v %v", name, v, err)
		}
		return v
	}
	pc.mu.Lock()
	answered := uint64(pc.answered)
	pc.mu.Unlock()
	inS, inC, outC, outS := view("alice.in-s"), view("alice.in-c"), view("alice.out-c"), view("alice.out-s")
	if inS.Counters.Packets != answered || inS.Counters.Packets < n+1 || inC.Counters.Packets != 1 || outC.Counters.Packets != answered || outS.Counters.Packets != 0 {
		t.Fatalf("packets in-s %d in-c %d out-c %d out-s %d; the P-CSCF answered %d", inS.Counters.Packets, inC.Counters.Packets, outC.Counters.Packets, outS.Counters.Packets, answered)
	}
	c, ok := tp.g.Manager.Counters(sa.ID{Dir: sa.Out, SPI: saUESPIC, Peer: pc.observed})
	if !ok {
		t.Fatal("out-c not in the data path under its configured identity")
	}
	if c.Binding.Addr.Addr() != saNAPTWAN || c.Binding.Addr.Port() == pc.observed.Port() {
		t.Fatalf("out-c binding %+v; the ESP socket's NAPT mapping differs from the REGISTER's %s", c.Binding, pc.observed)
	}
	if v := view("alice.in-s"); v.Binding != c.Binding.Addr.String() {
		t.Fatalf("in-s binding %s, out-c %+v: one pair group shares one binding", v.Binding, c.Binding)
	}

	t.Logf("REGISTER seen from %s, ESP binding %s; packets in-s %d in-c %d out-c %d out-s %d; Security-Server %s",
		pc.observed, c.Binding.Addr, inS.Counters.Packets, inC.Counters.Packets, outC.Counters.Packets, outS.Counters.Packets, r401.hdr["security-server"])

	// A replayed protected packet is dropped by the data path.
	before := inC.Counters.Drops
	if _, err := ph.esp.WriteToUDPAddrPort(ph.lastESP, saGWESPPort); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the replay counted on in-c", func() bool {
		v, err := tp.api.Get(ctx, "alice.in-c")
		return err == nil && v.Counters != nil && v.Counters.Drops == before+1
	})

	// 5. De-registration: the phone sends REGISTER with Expires: 0; the
	// P-CSCF sends the 200 through the SAs and deletes the registration
	// right after its sendto returns, as a P-CSCF does. The 200 must
	// still reach the phone (deleting must not overtake the final
	// response), then all four SAs are gone and the next protected packet
	// dies at XDP for want of an SA.
	dereg := sipBytes("REGISTER sip:ims.example.net SIP/2.0", append([]string{
		fmt.Sprintf("Via: SIP/2.0/UDP 192.168.1.11:%d;branch=z9hG4bKsa9;rport", saUEPortC), "CSeq: 9 REGISTER",
		fmt.Sprintf("Contact: <sip:alice@192.168.1.11:%d>", saUEPortS), "Expires: 0",
		"Security-Verify: " + r401.hdr["security-server"]}, common...)...)
	if r := ph.request(t, ph.outToPS, dereg, "9 REGISTER"); !strings.HasPrefix(r.start, "SIP/2.0 200") {
		t.Fatalf("de-registration answered %q", r.start)
	}
	var del api.RegistrationDeleted
	select {
	case d := <-pc.deleted:
		if d.err != nil {
			t.Fatalf("delete after the final response: %v", d.err)
		}
		del = d.del
	case <-time.After(5 * time.Second):
		t.Fatal("the P-CSCF never deleted the registration")
	}
	if len(del.SAs) != 4 {
		t.Fatalf("delete removed %d SAs", len(del.SAs))
	}
	if in, out := tp.g.SAD.Len(); in != 0 || out != 0 {
		t.Fatalf("SAD holds %d/%d after the delete", in, out)
	}
	pc.mu.Lock()
	answered = uint64(pc.answered)
	pc.mu.Unlock()
	noSA := xdpCount(t, tp.g, bpf.DropNoSA)
	ph.sealSend(t, ph.outToPS, saUEPortC, saPortS, sipBytes("OPTIONS sip:ims.example.net SIP/2.0", "CSeq: 99 OPTIONS"))
	eventually(t, "drop_no_sa after the delete", func() bool { return xdpCount(t, tp.g, bpf.DropNoSA) == noSA+1 })
	pc.mu.Lock()
	after := uint64(pc.answered)
	pc.mu.Unlock()
	if after != answered {
		t.Fatalf("the P-CSCF answered %d requests after the delete", after-answered)
	}
}
