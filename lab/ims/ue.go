package ims

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/xesp/xesp/control/secagree"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
)

// UE ports (TS 33.203 7.1): the phone's protected server port stays for
// its registration's life; its protected client port alternates between
// two values at each re-authentication (TS 33.203 7.4).
const (
	UEPortS  = 5064
	UEPortC1 = 5062
	UEPortC2 = 5066
)

// UE is the phone side of IMS sec-agree (RFC 3329, TS 33.203) over
// UDP-encapsulated ESP (RFC 3948), as a handset's IMS stack and IPsec
// stack do it together: unprotected REGISTER with Security-Client, the
// AKA challenge answered with RES, the four SAs keyed from CK/IK on its
// own (TS 33.203 Annex I, not through xesp's code), the protected
// REGISTER with Security-Verify, requests both ways through the SAs,
// re-authentication and de-registration. Protected SIP is sealed by hand
// on one UDP socket (port 4500) so many phones fit in one namespace.
type UE struct {
	Name  string
	IMPI  string
	IMPU  string
	LAN   netip.Addr
	pcscf netip.Addr     // P-CSCF's inner address (tunnel-mode peer)
	unp   netip.AddrPort // unprotected SIP: the P-CSCF's public address
	gwESP netip.AddrPort
	sip   *net.UDPConn
	espc  *net.UDPConn
	k     [16]byte

	mu      sync.Mutex
	sets    []*ueSet // newest last; [0] the set in use until a new one answers
	waiters map[string]chan Msg
	cseq    int
	nonce   string // last challenge
	res     []byte
	// Answered counts requests the P-CSCF sent the phone that it
	// answered; Rejected counts ESP that did not open or broke the SA's
	// port selectors; Leaked records a 401 that still carried ck/ik.
	Answered, Rejected int
	Leaked             bool
	wg                 sync.WaitGroup
}

// ueSet is one registration's SAs on the phone.
type ueSet struct {
	spiC, spiS   uint32 // the phone's inbound SPIs
	portC, portS uint16 // the phone's protected ports
	server       secagree.Mechanism
	serverHdr    string
	outToPS      *esp.Transform // port-c -> P-CSCF port-s (P-CSCF's spi-s)
	outToPC      *esp.Transform // port-s -> P-CSCF port-c (P-CSCF's spi-c)
	inFromPS     *esp.Transform // P-CSCF port-s -> port-c (our spi-c)
	inFromPC     *esp.Transform // P-CSCF port-c -> port-s (our spi-s)
	sealMu       sync.Mutex
	sbuf         []byte
}

// SetInfo is what a phone shows of its current set.
type SetInfo struct {
	Mechanism        secagree.Mechanism // the Security-Server the phone verified
	UESPIC, UESPIS   uint32
	UEPortC, UEPortS uint16
}

// NewUE opens the phone's sockets (call in its namespace): SIP on
// lan:5060, ESP on lan:4500.
func NewUE(name string, lan, pcscfInner netip.Addr, public netip.Addr) (*UE, error) {
	u := &UE{Name: name, IMPI: name + "@" + Realm, IMPU: "sip:" + name + "@" + Realm, LAN: lan, pcscf: pcscfInner,
		unp: netip.AddrPortFrom(public, 5060), gwESP: netip.AddrPortFrom(public, 4500), waiters: map[string]chan Msg{}}
	u.k = SubscriberKey(u.IMPI)
	var err error
	if u.sip, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lan, 5060))); err != nil {
		return nil, fmt.Errorf("%s: sip socket: %w", name, err)
	}
	if u.espc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lan, 4500))); err != nil {
		u.sip.Close()
		return nil, fmt.Errorf("%s: esp socket: %w", name, err)
	}
	u.wg.Add(2)
	go func() { defer u.wg.Done(); u.readSIP() }()
	go func() { defer u.wg.Done(); u.readESP() }()
	return u, nil
}

// Close closes the sockets.
func (u *UE) Close() {
	u.sip.Close()
	u.espc.Close()
	u.wg.Wait()
}

// Current is the set in use, false before registration.
func (u *UE) Current() (SetInfo, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.sets) == 0 {
		return SetInfo{}, false
	}
	s := u.sets[len(u.sets)-1]
	return SetInfo{Mechanism: s.server, UESPIC: s.spiC, UESPIS: s.spiS, UEPortC: s.portC, UEPortS: s.portS}, true
}

func (u *UE) readSIP() {
	buf := make([]byte, 65536)
	for {
		n, from, err := u.sip.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if from != u.unp {
			continue
		}
		if m, ok := ParseMsg(buf[:n]); ok && !m.IsRequest() {
			u.deliver(m)
		}
	}
}

func (u *UE) deliver(m Msg) {
	u.mu.Lock()
	ch := u.waiters[m.Hdr["call-id"]+"|"+m.Hdr["cseq"]]
	u.mu.Unlock()
	if ch != nil {
		select {
		case ch <- m:
		default:
		}
	}
}

func (u *UE) readESP() {
	buf := make([]byte, 65536)
	for {
		n, from, err := u.espc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if from != u.gwESP || n < 8 {
			continue
		}
		spi := binary.BigEndian.Uint32(buf)
		u.mu.Lock()
		var set *ueSet
		var in *esp.Transform
		var wantSrc, wantDst uint16
		for _, s := range u.sets {
			switch spi {
			case s.spiC:
				set, in, wantSrc, wantDst = s, s.inFromPS, s.server.PortS, s.portC
			case s.spiS:
				set, in, wantSrc, wantDst = s, s.inFromPC, s.server.PortC, s.portS
			}
		}
		if in == nil {
			u.Rejected++
			u.mu.Unlock()
			continue
		}
		res, err := in.Open(buf[:n])
		if err != nil {
			u.Rejected++
			u.mu.Unlock()
			continue
		}
		src, dst, payload, ok := pkt.UDP4Parse(buf[res.Start:res.End])
		if !ok || src != netip.AddrPortFrom(u.pcscf, wantSrc) || dst != netip.AddrPortFrom(u.LAN, wantDst) {
			u.Rejected++
			u.mu.Unlock()
			continue
		}
		u.mu.Unlock()
		m, ok := ParseMsg(payload)
		if !ok {
			continue
		}
		if !m.IsRequest() {
			u.deliver(m)
			continue
		}
		// A request from the P-CSCF's client port to our server port:
		// answer from our server port through the P-CSCF's spi-c.
		if wantDst == set.portS {
			u.mu.Lock()
			u.Answered++
			u.mu.Unlock()
			u.seal(set, set.outToPC, set.portS, set.server.PortC, Response(m, "200 OK"))
		}
	}
}

func (u *UE) seal(s *ueSet, sa *esp.Transform, src, dst uint16, payload []byte) error {
	inner := pkt.UDP4(netip.AddrPortFrom(u.LAN, src), netip.AddrPortFrom(u.pcscf, dst), payload)
	s.sealMu.Lock()
	defer s.sealMu.Unlock()
	if len(s.sbuf) < 64+len(inner)+128 {
		s.sbuf = make([]byte, 64+len(inner)+128)
	}
	copy(s.sbuf[64:], inner)
	start, end, err := sa.Seal(s.sbuf, 64, len(inner), esp.NextHeaderFor(inner), 0)
	if err != nil {
		return err
	}
	_, err = u.espc.WriteToUDPAddrPort(s.sbuf[start:end], u.gwESP)
	return err
}

// transact sends a request (unprotected when s is nil, else from the
// set's client port to the P-CSCF's server port) and returns the final
// response, retransmitting like RFC 3261 timer A.
func (u *UE) transact(s *ueSet, msg []byte, callID, cseq string) (Msg, error) {
	key := callID + "|" + cseq
	ch := make(chan Msg, 8)
	u.mu.Lock()
	u.waiters[key] = ch
	u.mu.Unlock()
	defer func() { u.mu.Lock(); delete(u.waiters, key); u.mu.Unlock() }()
	wait := 500 * time.Millisecond
	for try := 0; try < 5; try, wait = try+1, wait*2 {
		var err error
		if s == nil {
			_, err = u.sip.WriteToUDPAddrPort(msg, u.unp)
		} else {
			err = u.seal(s, s.outToPS, s.portC, s.server.PortS, msg)
		}
		if err != nil {
			return Msg{}, fmt.Errorf("%s: send: %w", u.Name, err)
		}
		t := time.NewTimer(wait)
	recv:
		for {
			select {
			case m := <-ch:
				if m.Status() >= 200 {
					t.Stop()
					return m, nil
				}
			case <-t.C:
				break recv
			}
		}
	}
	return Msg{}, fmt.Errorf("%s: no final response to %s", u.Name, cseq)
}

func (u *UE) next() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.cseq++
	return u.cseq
}

func (u *UE) callID() string { return u.Name + "-reg@" + u.LAN.String() }

func (u *UE) regHeaders(cseq int, viaPort uint16, contactPort uint16, expires int) []string {
	var b [6]byte
	rand.Read(b[:])
	return []string{
		fmt.Sprintf("Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%x;rport", u.LAN, viaPort, b),
		"Max-Forwards: 70",
		fmt.Sprintf("From: <%s>;tag=%s", u.IMPU, u.Name), fmt.Sprintf("To: <%s>", u.IMPU),
		"Call-ID: " + u.callID(), fmt.Sprintf("CSeq: %d REGISTER", cseq),
		fmt.Sprintf("Contact: <sip:%s@%s:%d>;expires=%d", u.Name, u.LAN, contactPort, expires),
	}
}

func (u *UE) authorization(response bool) string {
	if !response {
		return fmt.Sprintf(`Authorization: Digest username="%s", realm="%s", uri="sip:%s", nonce="", response=""`, u.IMPI, Realm, Realm)
	}
	return fmt.Sprintf(`Authorization: Digest username="%s", realm="%s", uri="sip:%s", nonce="%s", response="%s", algorithm=AKAv1-MD5`,
		u.IMPI, Realm, Realm, u.nonce, DigestResponse(u.IMPI, Realm, u.res, "REGISTER", "sip:"+Realm, u.nonce))
}

func newSPI() uint32 {
	var b [4]byte
	for {
		rand.Read(b[:])
		if v := binary.BigEndian.Uint32(b[:]); v >= 256 {
			return v
		}
	}
}

// offer is the phone's Security-Client: UDP-enc-tun with aes-cbc and
// hmac-sha-1-96 preferred, a null-encryption hmac-md5-96 fallback.
func offer(spiC, spiS uint32, portC, portS uint16) string {
	p := fmt.Sprintf("spi-c=%d;spi-s=%d;port-c=%d;port-s=%d", spiC, spiS, portC, portS)
	return "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=UDP-enc-tun;" + p +
		", ipsec-3gpp;q=0.5;alg=hmac-md5-96;ealg=null;mod=UDP-enc-tun;" + p
}

// challenged checks a 401: AKA nonce whose AUTN is the network's (the
// phone authenticates the network), no CK/IK left in it, one
// Security-Server mechanism; it computes RES, CK and IK and builds the
// new set's SAs.
func (u *UE) challenged(r Msg, spiC, spiS uint32, portC, portS uint16) (*ueSet, error) {
	if r.Status() != 401 {
		return nil, fmt.Errorf("%s: REGISTER answered %q, want 401", u.Name, r.Start)
	}
	wa := r.Hdr["www-authenticate"]
	if Param(wa, "ck") != "" || Param(wa, "ik") != "" {
		u.mu.Lock()
		u.Leaked = true
		u.mu.Unlock()
		return nil, fmt.Errorf("%s: the 401 still carries CK/IK: %s", u.Name, wa)
	}
	nonce := Param(wa, "nonce")
	raw, err := base64.StdEncoding.DecodeString(nonce)
	if err != nil || len(raw) != 32 {
		return nil, fmt.Errorf("%s: nonce %q is not base64(RAND||AUTN)", u.Name, nonce)
	}
	v := Derive(u.k, [16]byte(raw[:16]))
	if string(v.AUTN[:]) != string(raw[16:]) {
		return nil, fmt.Errorf("%s: AUTN does not verify: not our home network", u.Name)
	}
	ms, err := secagree.Parse(r.Hdr["security-server"])
	if err != nil || len(ms) != 1 {
		return nil, fmt.Errorf("%s: Security-Server %q: %v", u.Name, r.Hdr["security-server"], err)
	}
	srv := ms[0]
	if srv.Mod != secagree.ModeUDPEncTun {
		return nil, fmt.Errorf("%s: Security-Server %q: not UDP-enc-tun", u.Name, r.Hdr["security-server"])
	}
	// TS 33.203 Annex I, done here independently of xesp's code.
	var prop esp.Proposal
	var auth, enc []byte
	switch srv.Alg + "/" + srv.EffectiveEalg() {
	case "hmac-sha-1-96/aes-cbc":
		prop, auth, enc = esp.AES128SHA1, append(append([]byte(nil), v.IK[:]...), 0, 0, 0, 0), v.CK[:]
	case "hmac-md5-96/null":
		prop, auth = esp.NullMD5, v.IK[:]
	default:
		return nil, fmt.Errorf("%s: Security-Server %q: an algorithm we did not offer", u.Name, r.Hdr["security-server"])
	}
	mk := func(spi uint32, window int) (*esp.Transform, error) {
		return esp.NewTransform(esp.Config{SPI: spi, Proposal: prop, EncKey: enc, AuthKey: auth, ReplayWindow: window, Mode: esp.ModeTunnel})
	}
	s := &ueSet{spiC: spiC, spiS: spiS, portC: portC, portS: portS, server: srv, serverHdr: r.Hdr["security-server"]}
	for _, x := range []struct {
		p      **esp.Transform
		spi    uint32
		window int
	}{{&s.outToPS, srv.SPIS, 0}, {&s.outToPC, srv.SPIC, 0}, {&s.inFromPS, spiC, 64}, {&s.inFromPC, spiS, 64}} {
		if *x.p, err = mk(x.spi, x.window); err != nil {
			return nil, err
		}
	}
	u.mu.Lock()
	u.nonce, u.res = nonce, v.RES[:]
	u.sets = append(u.sets, s)
	u.mu.Unlock()
	return s, nil
}

// Register runs the initial registration: unprotected REGISTER with
// Security-Client, 401 with Security-Server, protected REGISTER with
// Security-Verify and the AKA response, 200.
func (u *UE) Register(expires int) error {
	spiC, spiS := newSPI(), newSPI()
	n := u.next()
	reg := Build("REGISTER sip:"+Realm+" SIP/2.0", append(u.regHeaders(n, 5060, 5060, expires), u.authorization(false),
		"Require: sec-agree", "Proxy-Require: sec-agree", "Supported: path, sec-agree",
		"Security-Client: "+offer(spiC, spiS, UEPortC1, UEPortS))...)
	r, err := u.transact(nil, reg, u.callID(), fmt.Sprintf("%d REGISTER", n))
	if err != nil {
		return err
	}
	s, err := u.challenged(r, spiC, spiS, UEPortC1, UEPortS)
	if err != nil {
		return err
	}
	return u.protectedRegister(s, expires, nil)
}

func (u *UE) protectedRegister(s *ueSet, expires int, extra []string) error {
	n := u.next()
	u.mu.Lock()
	auth := u.authorization(true)
	u.mu.Unlock()
	reg := Build("REGISTER sip:"+Realm+" SIP/2.0", append(append(u.regHeaders(n, s.portC, s.portS, expires), auth,
		"Require: sec-agree", "Proxy-Require: sec-agree", "Security-Verify: "+s.serverHdr), extra...)...)
	r, err := u.transact(s, reg, u.callID(), fmt.Sprintf("%d REGISTER", n))
	if err != nil {
		return err
	}
	if r.Status() != 200 {
		return fmt.Errorf("%s: protected REGISTER answered %q", u.Name, r.Start)
	}
	return nil
}

func (u *UE) current() (*ueSet, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.sets) == 0 {
		return nil, errors.New(u.Name + ": not registered")
	}
	return u.sets[len(u.sets)-1], nil
}

// ReRegister re-authenticates (TS 33.203 7.4): a protected REGISTER with
// a new Security-Client over the current set, the 401 through it, the
// next REGISTER through the new set (new SPIs and a new client port),
// then the old set is dropped.
func (u *UE) ReRegister(expires int) error {
	old, err := u.current()
	if err != nil {
		return err
	}
	spiC, spiS := newSPI(), newSPI()
	portC := uint16(UEPortC2)
	if old.portC == UEPortC2 {
		portC = UEPortC1
	}
	n := u.next()
	reg := Build("REGISTER sip:"+Realm+" SIP/2.0", append(u.regHeaders(n, old.portC, old.portS, expires), u.authorization(false),
		"Require: sec-agree", "Proxy-Require: sec-agree", "Security-Verify: "+old.serverHdr,
		"Security-Client: "+offer(spiC, spiS, portC, old.portS))...)
	r, err := u.transact(old, reg, u.callID(), fmt.Sprintf("%d REGISTER", n))
	if err != nil {
		return err
	}
	s, err := u.challenged(r, spiC, spiS, portC, old.portS)
	if err != nil {
		return err
	}
	if err := u.protectedRegister(s, expires, nil); err != nil {
		return err
	}
	u.mu.Lock()
	u.sets = []*ueSet{s}
	u.mu.Unlock()
	return nil
}

// Deregister sends REGISTER with expires 0 through the current set and
// drops the SAs after the 200.
func (u *UE) Deregister() error {
	s, err := u.current()
	if err != nil {
		return err
	}
	if err := u.protectedRegister(s, 0, []string{"Expires: 0"}); err != nil {
		return err
	}
	u.mu.Lock()
	u.sets = nil
	u.mu.Unlock()
	return nil
}

// Options sends OPTIONS to the P-CSCF through the current set.
func (u *UE) Options() (string, error) {
	s, err := u.current()
	if err != nil {
		return "", err
	}
	n := u.next()
	callID := fmt.Sprintf("%s-opt%d@%s", u.Name, n, u.LAN)
	var b [6]byte
	rand.Read(b[:])
	m := Build("OPTIONS sip:"+Realm+" SIP/2.0",
		fmt.Sprintf("Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%x;rport", u.LAN, s.portC, b), "Max-Forwards: 70",
		fmt.Sprintf("From: <%s>;tag=%s", u.IMPU, u.Name), "To: <sip:"+Realm+">", "Call-ID: "+callID, fmt.Sprintf("CSeq: %d OPTIONS", n))
	r, err := u.transact(s, m, callID, fmt.Sprintf("%d OPTIONS", n))
	if err != nil {
		return "", err
	}
	return r.Start, nil
}
