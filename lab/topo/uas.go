package topo

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// UAS is a phone's SIP listener on its inner address and port 5060: it
// answers OPTIONS (how a core checks a registered phone is reachable) with
// a 200 that names the phone in its Server header and To tag, so the core
// can tell which phone answered. It runs after sipsak's REGISTER, which
// needs the same port.
type UAS struct {
	user     string
	conn     *net.UDPConn
	answered atomic.Uint64
	foreign  atomic.Uint64
	wg       sync.WaitGroup
}

// Listen starts phone p's UAS in its namespace (p.UAS).
func (l *Lab) Listen(p *Phone) error {
	if p.UAS != nil {
		return nil
	}
	u := &UAS{user: p.User}
	if err := p.NS.Do(func() (err error) {
		u.conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.Inner, SIPPort)))
		return err
	}); err != nil {
		return fmt.Errorf("%s: SIP listener: %w", p.User, err)
	}
	p.UAS = u
	u.wg.Add(1)
	go u.serve()
	return nil
}

// StopListening closes phone p's UAS, freeing port 5060 for sipsak.
func (l *Lab) StopListening(p *Phone) {
	if p.UAS != nil {
		p.UAS.Close()
		p.UAS = nil
	}
}

// Answered is the number of OPTIONS the phone answered; Foreign the
// requests it got for another phone's user (not answered).
func (u *UAS) Answered() uint64 { return u.answered.Load() }
func (u *UAS) Foreign() uint64  { return u.foreign.Load() }

// Close stops the listener.
func (u *UAS) Close() error {
	err := u.conn.Close()
	u.wg.Wait()
	return err
}

func (u *UAS) serve() {
	defer u.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := u.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		msg := buf[:n]
		first, rest, _ := bytes.Cut(msg, []byte("\r\n"))
		f := bytes.Fields(first)
		if len(f) != 3 || !bytes.Equal(f[2], []byte("SIP/2.0")) {
			continue // a response or garbage: a UAS only answers requests
		}
		if !bytes.HasPrefix(f[1], []byte("sip:"+u.user+"@")) {
			u.foreign.Add(1)
			continue
		}
		status := "200 OK"
		if !bytes.Equal(f[0], []byte("OPTIONS")) {
			status = "501 Not Implemented"
		}
		var resp bytes.Buffer
		fmt.Fprintf(&resp, "SIP/2.0 %s\r\n", status)
		for _, line := range bytes.Split(rest, []byte("\r\n")) {
			if len(line) == 0 {
				break
			}
			name, _, _ := bytes.Cut(line, []byte(":"))
			switch string(bytes.ToLower(bytes.TrimSpace(name))) {
			case "via", "v", "from", "f", "call-id", "i", "cseq":
				resp.Write(line)
				resp.WriteString("\r\n")
			case "to", "t":
				resp.Write(line)
				if !bytes.Contains(line, []byte(";tag=")) {
					resp.WriteString(";tag=" + u.user)
				}
				resp.WriteString("\r\n")
			}
		}
		fmt.Fprintf(&resp, "Server: xesp-lab phone %s\r\nContent-Length: 0\r\n\r\n", u.user)
		if _, err := u.conn.WriteToUDPAddrPort(resp.Bytes(), from); err == nil && status == "200 OK" {
			u.answered.Add(1)
		}
	}
}
