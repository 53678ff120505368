package topo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/ue"
)

// Reply is a SIP response as the client saw it.
type Reply struct {
	Status string // status line, e.g. "SIP/2.0 200 OK"
	CallID string
	CSeq   string
	Server string // who answered: kamailio, or a phone's UAS ("xesp-lab phone ue3")
	Raw    string // what the client printed (sipsak) or received (bulk)
}

// OK reports a 2xx final response.
func (r Reply) OK() bool { return strings.HasPrefix(r.Status, "SIP/2.0 2") }

// Request is the SIP request a phone sends: method and Call-ID are the
// phone's; sipsak adds its own Via (with rport) in front.
func Request(method string, user string, inner netip.Addr, callID string, cseq int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s sip:ims.example SIP/2.0\r\n", method)
	fmt.Fprintf(&b, "From: <sip:%s@ims.example>;tag=%s\r\n", user, callID[:min(8, len(callID))])
	fmt.Fprintf(&b, "To: <sip:%s@ims.example>\r\n", user)
	fmt.Fprintf(&b, "Call-ID: %s\r\nCSeq: %d %s\r\n", callID, cseq, method)
	if method == "REGISTER" {
		fmt.Fprintf(&b, "Contact: <sip:%s@%s:%d>\r\nExpires: 3600\r\n", user, inner, SIPPort)
	}
	b.WriteString("Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
	return b.String()
}

// Sipsak sends one request from phone p with sipsak, run in the phone's
// namespace and bound to its inner address and port 5060 (-k, -l, -S: one
// socket for sending and receiving, as a phone's SIP stack), so the
// request leaves through the phone's TUN. sipsak adds its own Via with
// rport, retransmits on its own (RFC 3261 timer A) and exits 0 only on a
// 200. The reply is parsed from sipsak's -vvv output.
func (l *Lab) Sipsak(ctx context.Context, p *Phone, method, callID string, cseq int) (Reply, error) {
	user := p.User
	file := filepath.Join(l.dir, fmt.Sprintf("%s-%s-%d.sip", user, method, cseq))
	if err := os.WriteFile(file, []byte(Request(method, user, p.Inner, callID, cseq)), 0o600); err != nil {
		return Reply{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()
	args := []string{"netns", "exec", p.NS.Name, "sipsak", "-vvv", "-f", file,
		"-s", fmt.Sprintf("sip:%s@%s:%d", user, Core, SIPPort), "-k", p.Inner.String(), "-H", p.Inner.String(), "-l", fmt.Sprint(SIPPort), "-S"}
	cmd := exec.CommandContext(ctx, "ip", args...)
	out, err := cmd.CombinedOutput()
	r := parseSipsak(string(out))
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return r, fmt.Errorf("sipsak in %s: %w", p.NS.Name, err)
	}
	if r.Status == "" {
		return r, fmt.Errorf("sipsak in %s: no reply (exit %v):\n%s", p.NS.Name, err, out)
	}
	return r, nil
}

// CoreOptions is the SIP core reaching a registered phone: sipsak in the
// core namespace sends OPTIONS for the phone's user (sip:ueN@ims.example)
// to kamailio, which looks the user up in its location table and relays
// the request to the contact's received address (the phone's core
// address, RFC 3581 / nathelper). The reply is the phone's 200 relayed
// back, or kamailio's 404 (not registered) or 408 (no answer).
func (l *Lab) CoreOptions(ctx context.Context, p *Phone, callID string) (Reply, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "OPTIONS sip:%s@ims.example SIP/2.0\r\n", p.User)
	fmt.Fprintf(&b, "From: <sip:core@ims.example>;tag=%s\r\n", callID[:min(8, len(callID))])
	fmt.Fprintf(&b, "To: <sip:%s@ims.example>\r\n", p.User)
	fmt.Fprintf(&b, "Call-ID: %s\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n", callID)
	file := filepath.Join(l.dir, fmt.Sprintf("core-%s-%s.sip", p.User, strings.NewReplacer("@", "_", "/", "_").Replace(callID)))
	if err := os.WriteFile(file, []byte(b.String()), 0o600); err != nil {
		return Reply{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.Core.Name, "sipsak", "-vvv", "-f", file,
		"-s", fmt.Sprintf("sip:%s@%s:%d", p.User, Core, SIPPort), "-H", Core.String())
	out, err := cmd.CombinedOutput()
	r := parseSipsak(string(out))
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return r, fmt.Errorf("sipsak in %s: %w", l.Core.Name, err)
	}
	if r.Status == "" {
		return r, fmt.Errorf("sipsak in %s to %s: no reply (exit %v):\n%s", l.Core.Name, p.User, err, out)
	}
	return r, nil
}

// AnsweredBy reports whether r is phone p's own 200 (its UAS names itself
// in the Server header).
func (r Reply) AnsweredBy(p *Phone) bool {
	return r.OK() && r.Server == "xesp-lab phone "+p.User
}

// Registrations is kamailio's location table (kamcmd ul.dump): each
// registered user's received addresses (where the core reaches it).
func (l *Lab) Registrations() (map[string][]string, error) {
	out, err := l.Core.Run("kamcmd", "-s", "unix:"+filepath.Join(l.dir, "kamailio", "kamailio_ctl"), "ul.dump")
	if err != nil {
		return nil, fmt.Errorf("kamcmd ul.dump: %w", err)
	}
	regs := map[string][]string{}
	aor := ""
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		switch k {
		case "AoR":
			aor = strings.TrimSpace(v)
			regs[aor] = regs[aor][:0:0]
		case "Received":
			regs[aor] = append(regs[aor], strings.TrimSpace(v))
		}
	}
	return regs, nil
}

// parseSipsak takes the last response sipsak printed.
func parseSipsak(out string) Reply {
	r := Reply{Raw: out}
	i := strings.LastIndex(out, "\nSIP/2.0 ")
	if i < 0 {
		return r
	}
	for n, line := range strings.Split(out[i+1:], "\n") {
		line = strings.TrimRight(line, "\r")
		if n == 0 {
			r.Status = line
			continue
		}
		if line == "" {
			break
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.ToLower(strings.TrimSpace(k)) {
		case "call-id", "i":
			r.CallID = strings.TrimSpace(v)
		case "cseq":
			r.CSeq = strings.TrimSpace(v)
		case "server":
			r.Server = strings.TrimSpace(v)
		}
	}
	return r
}

// BulkExchange sends one request from a bulk phone (a Go-built
// IPv4/UDP packet sealed by the phone's SA) and waits for the answer,
// retransmitting like a SIP UA over UDP (timer A: 500 ms doubling, 5
// tries). It fails on any reply that is not for this request: a reply for
// another phone would not even open under this phone's SA.
func (l *Lab) BulkExchange(b *BulkPhone, method, callID string, cseq int) (Reply, int, error) {
	user := fmt.Sprintf("bulk%d", b.N)
	msg := "SIP/2.0/UDP " + netip.AddrPortFrom(b.Inner, SIPPort).String() + ";branch=z9hG4bK" + callID + fmt.Sprint(cseq) + ";rport"
	req := Request(method, user, b.Inner, callID, cseq)
	first, rest, _ := strings.Cut(req, "\r\n")
	req = first + "\r\nVia: " + msg + "\r\n" + rest
	inner := pkt.UDP4(netip.AddrPortFrom(b.Inner, SIPPort), netip.AddrPortFrom(Core, SIPPort), []byte(req))
	buf := make([]byte, 65536)
	wait := 500 * time.Millisecond
	retx := 0
	for try := range 5 {
		if try > 0 {
			retx++
		}
		if err := b.UE.Send(inner); err != nil {
			return Reply{}, retx, err
		}
		deadline := time.Now().Add(wait)
		for {
			got, _, err := b.UE.Recv(buf, deadline)
			if errors.Is(err, ue.ErrTimeout) {
				break
			}
			if err != nil {
				return Reply{}, retx, err
			}
			_, dst, payload, ok := pkt.UDP4Parse(got)
			if !ok || dst != netip.AddrPortFrom(b.Inner, SIPPort) {
				return Reply{}, retx, fmt.Errorf("%s: inner packet not for this phone: %x", user, got)
			}
			r := parseSipsak("\n" + string(bytes.ReplaceAll(payload, []byte("\r\n"), []byte("\n"))))
			r.Raw = string(payload)
			if r.CallID != callID {
				return r, retx, fmt.Errorf("%s: reply for Call-ID %q, want %q", user, r.CallID, callID)
			}
			if r.CSeq == fmt.Sprintf("%d %s", cseq, method) {
				return r, retx, nil
			}
		}
		wait *= 2
	}
	return Reply{}, retx, fmt.Errorf("%s: %s: no answer after 5 transmissions", user, method)
}
