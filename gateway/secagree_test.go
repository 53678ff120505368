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
	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/secagree"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/netns"
)

// The sec-agree topology: phones on their own LANs behind one NAPT,
//
//	ue0 (192.168.1.11) ─┐
//	ue1 (192.168.2.11) ─┴ napt (masquerade to 198.51.100.2) ─ gw (198.51.100.1 | 10.0.0.254) ─ core (10.0.0.1)
//
// The P-CSCF is test code: its unprotected port listens on the gateway's
// public address (the kernel gets what XDP passes), its protected ports in
// the core, behind the data path.
var (
	saNAPTWAN   = netip.MustParseAddr("198.51.100.2")
	saGWPublic  = netip.MustParseAddr("198.51.100.1")
	saPCSCF     = netip.MustParseAddr("10.0.0.1")
	saUnprot    = netip.AddrPortFrom(saGWPublic, 5060)
	saPortC     = uint16(5063) // P-CSCF protected client port
	saPortS     = uint16(5065) // P-CSCF protected server port
	saUEPortC   = uint16(5062)
	saUEPortS   = uint16(5064)
	saUESPIC    = uint32(0x11110001) // every phone picks the same SPIs:
	saUESPIS    = uint32(0x11110002) // only the NAPT port tells them apart
	saGWESPPort = netip.AddrPortFrom(saGWPublic, 4500)
)

const saPhones = 2

func saLan(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 168, byte(i + 1), 11}) }

type secAgreeTopo struct {
	ues            []*netns.NS
	napt, gw, core *netns.NS
	g              *Gateway
	api            *api.Client
}

func newSecAgreeTopo(t *testing.T) *secAgreeTopo {
	t.Helper()
	tp := &secAgreeTopo{napt: netns.ForTest(t, "snat"), gw: netns.ForTest(t, "sgw"), core: netns.ForTest(t, "sco")}
	for i := range saPhones {
		ns := netns.ForTest(t, "sue")
		tp.ues = append(tp.ues, ns)
		ueIf, lanIf := netns.VethForTest(t, ns, tp.napt)
		router := netip.AddrFrom4([4]byte{192, 168, byte(i + 1), 1})
		ns.MustRun("ip", "addr", "add", saLan(i).String()+"/24", "dev", ueIf)
		ns.MustRun("ip", "route", "add", "default", "via", router.String())
		tp.napt.MustRun("ip", "addr", "add", router.String()+"/24", "dev", lanIf)
	}
	wanIf, pubIf := netns.VethForTest(t, tp.napt, tp.gw)
	privIf, coreIf := netns.VethForTest(t, tp.gw, tp.core)
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
	tp.core.MustRun("ip", "route", "add", "192.168.0.0/16", "via", "10.0.0.254")

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

// pcscf is the test's P-CSCF: it challenges a phone's first REGISTER with
// the Security-Server the API produced, checks Security-Verify on
// protected REGISTERs, answers every protected request on its server
// port, and deletes a registration right after the 200 to its
// de-registration has left.
type pcscf struct {
	t      *testing.T
	api    *api.Client
	unprot *net.UDPConn // gw namespace, public address :5060
	portS  *net.UDPConn // core, protected server port
	portC  *net.UDPConn // core, protected client port
	mu     sync.Mutex
	regs   map[netip.Addr]*pcscfReg // by the phone's own address
	wg     sync.WaitGroup
}

// pcscfReg is one phone's registration as the P-CSCF holds it.
type pcscfReg struct {
	name      string
	ck, ik    []byte               // what the S-CSCF's 401 would bring
	server    []secagree.Mechanism // what the 401 carried
	observed  netip.AddrPort       // where the unprotected REGISTER came from
	challenge []byte               // the 401, resent on retransmissions
	verified  int                  // protected REGISTERs whose Security-Verify matched
	answered  int                  // protected requests answered on port-s
	fromUE    chan []byte          // datagrams arriving on port-c
	deleted   chan deletion        // the delete after the de-registration's 200
}

type deletion struct {
	del api.RegistrationDeleted
	err error
}

func (p *pcscf) reg(a netip.Addr) *pcscfReg {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.regs[a]
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
			r := p.reg(from.Addr())
			if r == nil || from.Port() != saUEPortS {
				p.t.Errorf("P-CSCF port-c: datagram from %s", from)
				continue
			}
			r.fromUE <- append([]byte(nil), buf[:n]...)
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
		ueAddr, err := netip.ParseAddr(viaHost(req.hdr["via"]))
		r := p.reg(ueAddr)
		if err != nil || r == nil {
			p.t.Errorf("P-CSCF: REGISTER from unknown phone %q", req.hdr["via"])
			continue
		}
		p.mu.Lock()
		if r.challenge == nil {
			resp, err := p.api.SecAgree(context.Background(), api.SecAgreeRequest{
				Registration: r.name, SecurityClient: req.hdr["security-client"],
				CK: hex.EncodeToString(r.ck), IK: hex.EncodeToString(r.ik),
				UE: from.String(), UEInner: ueAddr.String(), PCSCF: saPCSCF.String(), Local: saGWPublic.String(),
				PortC: saPortC, PortS: saPortS,
			})
			if err != nil {
				p.mu.Unlock()
				p.t.Errorf("P-CSCF: sec-agree API: %v", err)
				continue
			}
			r.server, _ = secagree.Parse(resp.SecurityServer)
			r.observed = from
			r.challenge = sipResponse(req, "401 Unauthorized",
				`WWW-Authenticate: Digest realm="ims.example.net",nonce="`+hex.EncodeToString(r.ck[:8])+`",algorithm=AKAv1-MD5`,
				"Security-Server: "+resp.SecurityServer)
		}
		resp := r.challenge
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
		r := p.reg(from.Addr())
		if r == nil || from.Port() != saUEPortC {
			p.t.Errorf("P-CSCF port-s: request from %s, want a phone's port-c", from)
			continue
		}
		req, ok := parseSIP(buf[:n])
		if !ok {
			p.t.Errorf("P-CSCF port-s: not SIP: %q", buf[:n])
			continue
		}
		if strings.HasPrefix(req.start, "REGISTER ") {
			p.mu.Lock()
			err := secagree.Verify(req.hdr["security-verify"], r.server)
			if err == nil {
				r.verified++
			}
			p.mu.Unlock()
			if err != nil {
				p.t.Errorf("P-CSCF: %s: %v", r.name, err)
				p.portS.WriteToUDPAddrPort(sipResponse(req, "494 Security Agreement Required"), from)
				continue
			}
		}
		p.mu.Lock()
		r.answered++
		p.mu.Unlock()
		if _, err := p.portS.WriteToUDPAddrPort(sipResponse(req, "200 OK"), from); err != nil {
			p.t.Errorf("P-CSCF: send 200: %v", err)
		}
		if strings.HasPrefix(req.start, "REGISTER ") && req.hdr["expires"] == "0" {
			// The final response has left: now the SAs may go.
			del, err := p.api.DeleteRegistration(context.Background(), r.name)
			r.deleted <- deletion{del, err}
		}
	}
}

// phone is the test's UE: unprotected SIP on its LAN address, then
// UDP-encapsulated ESP from one socket, with the four SAs TS 33.203 gives
// it and the port selectors a phone's IPsec stack enforces.
type phone struct {
	name      string
	lan       netip.Addr
	ck, ik    []byte
	sip, esp  *net.UDPConn
	outToPS   *esp.Transform // port-c -> P-CSCF port-s, P-CSCF's spi-s
	outToPC   *esp.Transform // port-s -> P-CSCF port-c, P-CSCF's spi-c
	inFromPS  *esp.Transform // P-CSCF port-s -> port-c, our spi-c
	inFromPC  *esp.Transform // P-CSCF port-c -> port-s, our spi-s
	selectors int            // packets that opened but broke their SA's port selectors
	foreign   int            // ESP from the gateway that does not open: someone else's
	lastESP   []byte
	r401      sipMessage
}

func (ph *phone) sealSend(t *testing.T, s *esp.Transform, src, dst uint16, payload []byte) {
	t.Helper()
	inner := pkt.UDP4(netip.AddrPortFrom(ph.lan, src), netip.AddrPortFrom(saPCSCF, dst), payload)
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
func (ph *phone) recvESP(deadline time.Time) (payload []byte, err error) {
	buf := make([]byte, 65536)
	ph.esp.SetReadDeadline(deadline)
	for {
		n, from, err := ph.esp.ReadFromUDPAddrPort(buf)
		if err != nil {
			return nil, err
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
			ph.foreign++
			continue
		}
		src, dst, payload, ok := pkt.UDP4Parse(buf[res.Start:res.End])
		if !ok || src != netip.AddrPortFrom(saPCSCF, wantSrc) || dst != netip.AddrPortFrom(ph.lan, wantDst) {
			ph.selectors++
			continue
		}
		return append([]byte(nil), payload...), nil
	}
}

// request sends a SIP request (unprotected when s is nil) and waits for
// the final response with the same CSeq, retransmitting like a SIP UA
// over UDP (RFC 3261 timer A): a NAPT may lose a new flow's first packet.
func (ph *phone) request(t *testing.T, s *esp.Transform, msg []byte, cseq string) sipMessage {
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
				payload, err := ph.recvESP(deadline)
				if err != nil {
					break
				}
				b = payload
			}
			if m, ok := parseSIP(b); ok && m.hdr["cseq"] == cseq && strings.Contains(m.hdr["call-id"], ph.name) {
				return m
			}
		}
	}
	t.Fatalf("%s: no response to CSeq %s after 4 transmissions", ph.name, cseq)
	return sipMessage{}
}

func (ph *phone) headers(cseq string, port uint16, branch string) []string {
	return []string{
		fmt.Sprintf("Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s;rport", ph.lan, port, branch), "CSeq: " + cseq,
		fmt.Sprintf("From: <sip:%s@ims.example.net>;tag=ue", ph.name), fmt.Sprintf("To: <sip:%s@ims.example.net>", ph.name),
		fmt.Sprintf("Call-ID: %s-secagree@%s", ph.name, ph.lan), "Max-Forwards: 70",
	}
}

// register runs the sec-agree registration: unprotected REGISTER with
// Security-Client, 401 with Security-Server, then the protected REGISTER
// with Security-Verify through the phone's own SAs, answered 200.
func (ph *phone) register(t *testing.T) secagree.Mechanism {
	t.Helper()
	// Two offers: the P-CSCF's policy must pick UDP-enc-tun with aes-cbc
	// over the phone's higher-q transport-mode null offer.
	offer := fmt.Sprintf("ipsec-3gpp;q=0.9;alg=hmac-sha-1-96;mod=trans;spi-c=%d;spi-s=%d;port-c=%d;port-s=%d, ipsec-3gpp;q=0.1;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;spi-c=%d;spi-s=%d;port-c=%d;port-s=%d",
		saUESPIC, saUESPIS, saUEPortC, saUEPortS, saUESPIC, saUESPIS, saUEPortC, saUEPortS)
	reg1 := sipBytes("REGISTER sip:ims.example.net SIP/2.0", append(ph.headers("1 REGISTER", 5060, "r1"),
		fmt.Sprintf("Contact: <sip:%s@%s:5060>", ph.name, ph.lan),
		fmt.Sprintf(`Authorization: Digest username="%s@ims.example.net",realm="ims.example.net",uri="sip:ims.example.net",nonce="",response=""`, ph.name),
		"Require: sec-agree", "Proxy-Require: sec-agree", "Supported: path, sec-agree",
		"Security-Client: "+offer)...)
	ph.r401 = ph.request(t, nil, reg1, "1 REGISTER")
	if !strings.HasPrefix(ph.r401.start, "SIP/2.0 401") {
		t.Fatalf("%s: first REGISTER answered %q", ph.name, ph.r401.start)
	}
	ss, err := secagree.Parse(ph.r401.hdr["security-server"])
	if err != nil || len(ss) != 1 {
		t.Fatalf("%s: Security-Server %q: %v", ph.name, ph.r401.hdr["security-server"], err)
	}
	srv := ss[0]
	if srv.Alg != secagree.AlgHMACSHA196 || srv.Ealg != secagree.EalgAESCBC || srv.Mod != secagree.ModeUDPEncTun || srv.PortC != saPortC || srv.PortS != saPortS {
		t.Fatalf("%s: Security-Server %q: not the UDP-enc-tun/aes-cbc offer", ph.name, ph.r401.hdr["security-server"])
	}
	// The phone keys its side on its own (not through the package under
	// test): TS 33.203 Annex I for hmac-sha-1-96 and aes-cbc is IK||0^32
	// and CK; the SPIs mirror the gateway's.
	keys := secagree.Keys{Auth: append(append([]byte(nil), ph.ik...), 0, 0, 0, 0), Enc: ph.ck}
	ph.outToPS, ph.outToPC = mustESPSA(t, srv.SPIS, keys, 0), mustESPSA(t, srv.SPIC, keys, 0)
	ph.inFromPS, ph.inFromPC = mustESPSA(t, saUESPIC, keys, 64), mustESPSA(t, saUESPIS, keys, 64)

	reg2 := sipBytes("REGISTER sip:ims.example.net SIP/2.0", append(ph.headers("2 REGISTER", saUEPortC, "r2"),
		fmt.Sprintf("Contact: <sip:%s@%s:%d>", ph.name, ph.lan, saUEPortS),
		fmt.Sprintf(`Authorization: Digest username="%s@ims.example.net",realm="ims.example.net",uri="sip:ims.example.net",nonce="x",response="y",algorithm=AKAv1-MD5`, ph.name),
		"Require: sec-agree", "Proxy-Require: sec-agree",
		"Security-Verify: "+ph.r401.hdr["security-server"])...)
	if r := ph.request(t, ph.outToPS, reg2, "2 REGISTER"); !strings.HasPrefix(r.start, "SIP/2.0 200") {
		t.Fatalf("%s: protected REGISTER answered %q", ph.name, r.start)
	}
	return srv
}

func (ph *phone) options(t *testing.T, n int) {
	t.Helper()
	cseq := fmt.Sprintf("%d OPTIONS", n)
	m := sipBytes("OPTIONS sip:ims.example.net SIP/2.0", ph.headers(cseq, saUEPortC, fmt.Sprintf("o%d", n))...)
	if r := ph.request(t, ph.outToPS, m, cseq); !strings.HasPrefix(r.start, "SIP/2.0 200") {
		t.Fatalf("%s: OPTIONS %d answered %q", ph.name, n, r.start)
	}
}

func mustESPSA(t *testing.T, spi uint32, k secagree.Keys, window int) *esp.Transform {
	t.Helper()
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128SHA1, EncKey: k.Enc, AuthKey: k.Auth, ReplayWindow: window, Mode: esp.ModeTunnel})
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

// The whole IMS registration over sec-agree with UDP-enc-tun, for two
// phones behind one NAPT that picked the same SPIs: REGISTER with
// Security-Client, 401 with the Security-Server the API produced (and the
// SAs it installed in the running data path), the protected REGISTER with
// Security-Verify through the derived SAs, ESP through the NAPT, 200 OK
// back through them; then traffic both ways on both SA pairs (the
// P-CSCF's own request to the phone's server port leaves on out-s, chosen
// by port), counted per SA, every phone getting exactly its own answers,
// cleartext on the wrong ports dropped; then each phone de-registers, the
// P-CSCF deletes its registration right after sending the final 200, and
// that 200 still arrives while the other phone keeps working.
func TestSecAgreeRegistrationThroughNAPT(t *testing.T) {
	tp := newSecAgreeTopo(t)
	pc := &pcscf{t: t, api: tp.api, regs: map[netip.Addr]*pcscfReg{},
		unprot: udpSock(t, tp.gw, saUnprot.String()),
		portS:  udpSock(t, tp.core, netip.AddrPortFrom(saPCSCF, saPortS).String()),
		portC:  udpSock(t, tp.core, netip.AddrPortFrom(saPCSCF, saPortC).String())}
	phones := make([]*phone, saPhones)
	for i := range phones {
		// The test's "HSS" gives each phone's "ISIM" and the P-CSCF the
		// same CK and IK.
		ph := &phone{name: fmt.Sprintf("ue%d", i), lan: saLan(i), ck: randBytes(t, 16), ik: randBytes(t, 16),
			sip: udpSock(t, tp.ues[i], netip.AddrPortFrom(saLan(i), 5060).String()), esp: udpSock(t, tp.ues[i], "0.0.0.0:4500")}
		phones[i] = ph
		pc.regs[ph.lan] = &pcscfReg{name: ph.name, ck: ph.ck, ik: ph.ik, fromUE: make(chan []byte, 16), deleted: make(chan deletion, 4)}
	}
	pc.run()
	t.Cleanup(pc.close)

	// 1. Registration, one phone after the other.
	servers := make([]secagree.Mechanism, len(phones))
	for i, ph := range phones {
		servers[i] = ph.register(t)
		if r := pc.reg(ph.lan); r.verified != 1 || r.observed.Addr() != saNAPTWAN {
			t.Fatalf("%s: verified %d, REGISTER seen from %s (want the NAPT's address %s)", ph.name, r.verified, r.observed, saNAPTWAN)
		}
	}
	if servers[0].SPIC == servers[1].SPIC || servers[0].SPIS == servers[1].SPIS {
		t.Fatalf("the P-CSCF's SPIs repeat across registrations: %s / %s", servers[0].String(), servers[1].String())
	}
	if pc.reg(phones[0].lan).observed == pc.reg(phones[1].lan).observed {
		t.Fatal("both phones seen on one NAPT mapping")
	}

	// 2. Traffic both ways, interleaved between the phones: requests from
	// each phone's client port answered through its out-c; a message from
	// each phone's server port to the P-CSCF's client port through in-c.
	const n = 5
	for k := range n {
		for _, ph := range phones {
			ph.options(t, 3+k)
		}
	}
	for _, ph := range phones {
		toPC := sipBytes("SIP/2.0 200 OK", "Via: SIP/2.0/UDP 10.0.0.1:5063;branch=z9hG4bKn1", "CSeq: 1 NOTIFY", "Call-ID: notify-"+ph.name+"@10.0.0.1")
		ph.sealSend(t, ph.outToPC, saUEPortS, saPortC, toPC)
		select {
		case got := <-pc.reg(ph.lan).fromUE:
			if !bytes.Equal(got, toPC) {
				t.Fatalf("%s: P-CSCF port-c got %q", ph.name, got)
			}
		case <-time.After(3 * time.Second):
			t.Fatalf("%s: nothing reached the P-CSCF's client port through in-c", ph.name)
		}
	}
	// The P-CSCF's own request, from its client port to the phone's
	// server port: XDP steers it by address to one of the phone's
	// outbound SAs; the worker must seal it with out-s (the phone's spi-s),
	// which recvESP checks by SPI and port selectors.
	for _, ph := range phones {
		notify := sipBytes(fmt.Sprintf("NOTIFY sip:%s@%s:%d SIP/2.0", ph.name, ph.lan, saUEPortS),
			"Via: SIP/2.0/UDP 10.0.0.1:5063;branch=z9hG4bKn2", "CSeq: 2 NOTIFY", "Call-ID: notify-"+ph.name+"@10.0.0.1")
		if _, err := pc.portC.WriteToUDPAddrPort(notify, netip.AddrPortFrom(ph.lan, saUEPortS)); err != nil {
			t.Fatal(err)
		}
		got, err := ph.recvESP(time.Now().Add(3 * time.Second))
		if err != nil || !bytes.Equal(got, notify) {
			t.Fatalf("%s: the P-CSCF's request to port-s: %q %v (selector breaks %d)", ph.name, got, err, ph.selectors)
		}
	}
	for _, ph := range phones {
		if ph.selectors != 0 || ph.foreign != 0 {
			t.Fatalf("%s: %d packets broke the selectors, %d were someone else's", ph.name, ph.selectors, ph.foreign)
		}
	}

	// 3. Per-SA figures of the data path: every phone packet on its SA,
	// every answer on its out-c; each binding moved from the unprotected
	// REGISTER's mapping to the ESP socket's, after authentication.
	ctx := context.Background()
	view := func(name string) api.SAView {
		v, err := tp.api.Get(ctx, name)
		if err != nil || v.Counters == nil {
			t.Fatalf("%s: %+v %v", name, v, err)
		}
		return v
	}
	bindings := map[netip.AddrPort]bool{}
	for _, ph := range phones {
		r := pc.reg(ph.lan)
		pc.mu.Lock()
		answered := uint64(r.answered)
		pc.mu.Unlock()
		inS, inC, outC, outS := view(ph.name+".in-s"), view(ph.name+".in-c"), view(ph.name+".out-c"), view(ph.name+".out-s")
		if inS.Counters.Packets != answered || inS.Counters.Packets < n+1 || inC.Counters.Packets != 1 || outC.Counters.Packets != answered || outS.Counters.Packets != 1 {
			t.Fatalf("%s: packets in-s %d in-c %d out-c %d out-s %d; the P-CSCF answered %d", ph.name, inS.Counters.Packets, inC.Counters.Packets, outC.Counters.Packets, outS.Counters.Packets, answered)
		}
		c, ok := tp.g.Manager.Counters(sa.ID{Dir: sa.Out, SPI: saUESPIC, Peer: r.observed})
		if !ok {
			t.Fatalf("%s: out-c not in the data path under its configured identity", ph.name)
		}
		if c.Binding.Addr.Addr() != saNAPTWAN || c.Binding.Addr.Port() == r.observed.Port() {
			t.Fatalf("%s: out-c binding %+v; the ESP socket's NAPT mapping differs from the REGISTER's %s", ph.name, c.Binding, r.observed)
		}
		// The worker moves the binding at once; the SAD, which the API
		// shows, learns it from the manager's event loop afterwards: wait
		// for that outcome (a loaded host may take a while), not a time.
		for deadline := time.Now().Add(5 * time.Second); inS.Binding != c.Binding.Addr.String() && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
			inS = view(ph.name + ".in-s")
		}
		if inS.Binding != c.Binding.Addr.String() {
			t.Fatalf("%s: in-s binding %s, out-c %+v: one pair group shares one binding", ph.name, inS.Binding, c.Binding)
		}
		bindings[c.Binding.Addr] = true
		t.Logf("%s: REGISTER seen from %s, ESP binding %s; packets in-s %d in-c %d out-c %d out-s %d; Security-Server %s",
			ph.name, r.observed, c.Binding.Addr, inS.Counters.Packets, inC.Counters.Packets, outC.Counters.Packets, outS.Counters.Packets, ph.r401.hdr["security-server"])
	}
	if len(bindings) != len(phones) {
		t.Fatalf("phones share a binding: %v", bindings)
	}

	// A replayed protected packet is dropped by the data path.
	ph0 := phones[0]
	before := view(ph0.name + ".in-c").Counters.Drops
	if _, err := ph0.esp.WriteToUDPAddrPort(ph0.lastESP, saGWESPPort); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the replay counted on in-c", func() bool {
		v, err := tp.api.Get(ctx, ph0.name+".in-c")
		return err == nil && v.Counters != nil && v.Counters.Drops == before+1
	})

	// Cleartext for the wrong port under an SA is dropped by its port
	// selectors: the phone's client port to the P-CSCF's client port,
	// sealed with in-s (which covers port-c -> port-s only). The P-CSCF's
	// port-c reader fails the test should it arrive.
	beforeS := view(ph0.name + ".in-s").Counters.Drops
	ph0.sealSend(t, ph0.outToPS, saUEPortC, saPortC, sipBytes("MESSAGE sip:pcscf SIP/2.0", "CSeq: 7 MESSAGE"))
	eventually(t, "the selector drop counted on in-s", func() bool {
		v, err := tp.api.Get(ctx, ph0.name+".in-s")
		return err == nil && v.Counters != nil && v.Counters.Drops == beforeS+1
	})

	// 4. De-registration, one phone after the other: REGISTER with
	// Expires: 0; the P-CSCF sends the 200 through the SAs and deletes the
	// registration right after its sendto returns. The 200 must still
	// reach the phone (deleting must not overtake the final response);
	// then its four SAs are gone, its next protected packet dies at XDP
	// for want of an SA, and the other phone is untouched.
	for i, ph := range phones {
		r := pc.reg(ph.lan)
		dereg := sipBytes("REGISTER sip:ims.example.net SIP/2.0", append(ph.headers("9 REGISTER", saUEPortC, "r9"),
			fmt.Sprintf("Contact: <sip:%s@%s:%d>", ph.name, ph.lan, saUEPortS), "Expires: 0",
			"Security-Verify: "+ph.r401.hdr["security-server"])...)
		if resp := ph.request(t, ph.outToPS, dereg, "9 REGISTER"); !strings.HasPrefix(resp.start, "SIP/2.0 200") {
			t.Fatalf("%s: de-registration answered %q", ph.name, resp.start)
		}
		select {
		case d := <-r.deleted:
			if d.err != nil || len(d.del.SAs) != 4 {
				t.Fatalf("%s: delete after the final response: %+v %v", ph.name, d.del, d.err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the P-CSCF never deleted the registration", ph.name)
		}
		left := 2 * (len(phones) - 1 - i)
		if in, out := tp.g.SAD.Len(); in != left || out != left {
			t.Fatalf("after deleting %s the SAD holds %d/%d, want %d/%d", ph.name, in, out, left, left)
		}
		pc.mu.Lock()
		answered := r.answered
		pc.mu.Unlock()
		noSA := xdpCount(t, tp.g, bpf.DropNoSA)
		ph.sealSend(t, ph.outToPS, saUEPortC, saPortS, sipBytes("OPTIONS sip:ims.example.net SIP/2.0", "CSeq: 99 OPTIONS"))
		eventually(t, "drop_no_sa after the delete", func() bool { return xdpCount(t, tp.g, bpf.DropNoSA) == noSA+1 })
		pc.mu.Lock()
		after := r.answered
		pc.mu.Unlock()
		if after != answered {
			t.Fatalf("%s: the P-CSCF answered %d requests after the delete", ph.name, after-answered)
		}
		for _, other := range phones[i+1:] {
			other.options(t, 50+i)
		}
	}
}
