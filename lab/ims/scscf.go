package ims

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Realm is the lab's home network domain.
const Realm = "ims.example.net"

// SCSCF is a STAND-IN for the registrar/S-CSCF and the HSS behind it, in
// Go because no packaged S-CSCF issues IMS AKA challenges without an HSS.
// It does what the P-CSCF needs from one and nothing more:
//
//   - a REGISTER without a valid AKA response is challenged with 401 and
//     `WWW-Authenticate: Digest realm=..., nonce=base64(RAND||AUTN),
//     algorithm=AKAv1-MD5, ck="<hex>", ik="<hex>"`: the keys ride in the
//     ck/ik parameters, the way an S-CSCF hands them to a P-CSCF
//     (TS 33.203, TS 24.229); the vectors are the lab's (see Vector);
//   - a REGISTER whose response verifies (RFC 3310, RES as password) is
//     answered 200 with the Contact and its expiry; Expires 0 removes it;
//   - Ping sends OPTIONS to a registered phone through the P-CSCF (a
//     terminating request) and waits for the 200.
//
// It answers to the top Via (the P-CSCF) and keeps no transactions beyond
// retransmitting its own OPTIONS.
type SCSCF struct {
	conn  *net.UDPConn
	pcscf netip.AddrPort

	mu      sync.Mutex
	nonces  map[string]Vector // outstanding challenges
	regs    map[string]Binding
	pending map[string]chan Msg // Ping transactions by branch
	// Challenges and Registers count what was answered.
	challenges, registers, deregisters int
	done                               chan struct{}
}

// Binding is a registered contact.
type Binding struct {
	Contact string
	Expires time.Time
}

// StartSCSCF serves on conn (bound in the core); pcscf is where
// terminating requests go.
func StartSCSCF(conn *net.UDPConn, pcscf netip.AddrPort) *SCSCF {
	s := &SCSCF{conn: conn, pcscf: pcscf, nonces: map[string]Vector{}, regs: map[string]Binding{}, pending: map[string]chan Msg{}, done: make(chan struct{})}
	go s.serve()
	return s
}

// Close stops serving.
func (s *SCSCF) Close() { s.conn.Close(); <-s.done }

// Registered returns the contact of an IMPU, if registered.
func (s *SCSCF) Registered(impu string) (Binding, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.regs[impu]
	return b, ok
}

// Counts returns how many challenges, successful registrations and
// de-registrations it answered.
func (s *SCSCF) Counts() (challenges, registers, deregisters int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.challenges, s.registers, s.deregisters
}

func (s *SCSCF) serve() {
	defer close(s.done)
	buf := make([]byte, 65536)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		m, ok := ParseMsg(buf[:n])
		if !ok {
			continue
		}
		if !m.IsRequest() {
			s.mu.Lock()
			ch := s.pending[Param(m.Hdr["via"], "branch")]
			s.mu.Unlock()
			if ch != nil {
				select {
				case ch <- m:
				default:
				}
			}
			continue
		}
		var resp []byte
		switch m.Method() {
		case "REGISTER":
			resp = s.register(m)
		case "OPTIONS":
			resp = Response(m, "200 OK")
		default:
			resp = Response(m, "405 Method Not Allowed", "Allow: REGISTER, OPTIONS")
		}
		s.conn.WriteToUDPAddrPort(resp, from)
	}
}

// impuOf returns the URI in a To/From value.
func impuOf(v string) string {
	if i := strings.IndexByte(v, '<'); i >= 0 {
		if j := strings.IndexByte(v[i:], '>'); j > 0 {
			return v[i+1 : i+j]
		}
	}
	u, _, _ := strings.Cut(v, ";")
	return strings.TrimSpace(u)
}

func (s *SCSCF) register(m Msg) []byte {
	impu := impuOf(m.Hdr["to"])
	auth := m.Hdr["authorization"]
	user := Param(auth, "username")
	if user == "" {
		return Response(m, "403 Forbidden")
	}
	nonce := Param(auth, "nonce")
	s.mu.Lock()
	v, known := s.nonces[nonce]
	s.mu.Unlock()
	if !known || Param(auth, "response") == "" {
		return s.challenge(m, user)
	}
	want := DigestResponse(user, Realm, v.RES[:], "REGISTER", Param(auth, "uri"), nonce)
	if subtle.ConstantTimeCompare([]byte(want), []byte(Param(auth, "response"))) != 1 {
		return Response(m, "403 Forbidden")
	}
	expires := 600
	if e := Param(m.Hdr["contact"], "expires"); e != "" {
		expires, _ = strconv.Atoi(e)
	} else if e := m.Hdr["expires"]; e != "" {
		expires, _ = strconv.Atoi(e)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if expires == 0 {
		delete(s.regs, impu)
		s.deregisters++
		return Response(m, "200 OK")
	}
	contact := impuOf(m.Hdr["contact"])
	s.regs[impu] = Binding{Contact: contact, Expires: time.Now().Add(time.Duration(expires) * time.Second)}
	s.registers++
	return Response(m, "200 OK", fmt.Sprintf("Contact: <%s>;expires=%d", contact, expires))
}

func (s *SCSCF) challenge(m Msg, user string) []byte {
	var r [16]byte
	rand.Read(r[:])
	v := Derive(SubscriberKey(user), r)
	nonce := base64.StdEncoding.EncodeToString(append(v.RAND[:], v.AUTN[:]...))
	s.mu.Lock()
	s.nonces[nonce] = v
	s.challenges++
	s.mu.Unlock()
	return Response(m, "401 Unauthorized", fmt.Sprintf(`WWW-Authenticate: Digest realm="%s", nonce="%s", algorithm=AKAv1-MD5, ck="%s", ik="%s"`,
		Realm, nonce, hex.EncodeToString(v.CK[:]), hex.EncodeToString(v.IK[:])))
}

// Ping sends OPTIONS to impu's registered contact through the P-CSCF and
// returns the final response's status line.
func (s *SCSCF) Ping(impu string, timeout time.Duration) (string, error) {
	b, ok := s.Registered(impu)
	if !ok {
		return "", fmt.Errorf("%s: not registered", impu)
	}
	var rb [6]byte
	rand.Read(rb[:])
	branch := "z9hG4bK" + hex.EncodeToString(rb[:])
	ch := make(chan Msg, 4)
	s.mu.Lock()
	s.pending[branch] = ch
	s.mu.Unlock()
	defer func() { s.mu.Lock(); delete(s.pending, branch); s.mu.Unlock() }()
	local := s.conn.LocalAddr().(*net.UDPAddr).AddrPort()
	req := Build("OPTIONS "+b.Contact+" SIP/2.0",
		fmt.Sprintf("Via: SIP/2.0/UDP %s;branch=%s", local, branch), "Max-Forwards: 70",
		"From: <sip:scscf@"+Realm+">;tag=sc", "To: <"+impu+">", "Call-ID: "+branch+"@scscf", "CSeq: 1 OPTIONS")
	deadline := time.Now().Add(timeout)
	for wait := 500 * time.Millisecond; time.Now().Before(deadline); wait *= 2 {
		if _, err := s.conn.WriteToUDPAddrPort(req, s.pcscf); err != nil {
			return "", err
		}
		t := time.NewTimer(min(wait, time.Until(deadline)))
	recv:
		for {
			select {
			case m := <-ch:
				if m.Status() >= 200 {
					t.Stop()
					return m.Start, nil
				}
			case <-t.C:
				break recv
			}
		}
	}
	return "", errors.New("OPTIONS to " + impu + ": no final response")
}
