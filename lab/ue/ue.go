// Package ue is the phone side of UDP-encapsulated ESP (RFC 3948) on an
// ordinary UDP socket: what a handset's IPsec stack does after IMS
// sec-agree, used by the demo, the tests and the benchmark baselines. It
// seals inner packets with its outbound SA, opens the gateway's replies
// with its inbound SA (replay window included), and sends NAT keepalives.
// Phone is driven by Go code; Tunnel puts a TUN device in front of the same
// protocol so unmodified programs (ping, SIP clients) send through it.
//
// It must not know anything about the gateway's internals: it speaks only
// the wire protocol, so it proves the gateway against an independent peer.
package ue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xesp/xesp/dataplane/esp"
)

// Phone is one emulated handset with one SA pair.
type Phone struct {
	conn *net.UDPConn
	gw   netip.AddrPort

	sendMu sync.Mutex
	out    *esp.Transform
	sbuf   []byte

	in *esp.Transform // used by the Recv caller only

	// The phone's identity for the misdelivery counts (Expect).
	inner    netip.Addr
	ports    []uint16
	claim    func([]byte) bool
	misdeliv [3]atomic.Uint64 // foreign SPI, not addressed, other phone
}

// headroom leaves space for the ESP header and IV in front of a payload.
const headroom = 64

// New binds local (e.g. 0.0.0.0:4500) and talks to the gateway at gw.
// out seals what the phone sends; in opens what the gateway sends back.
func New(local, gw netip.AddrPort, out, in *esp.Transform) (*Phone, error) {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(local))
	if err != nil {
		return nil, fmt.Errorf("phone: bind %s: %w", local, err)
	}
	return &Phone{conn: c, gw: gw, out: out, in: in, sbuf: make([]byte, 65536)}, nil
}

// Expect gives the phone its identity, before the first Recv: its inner
// address, the inner ports it listens on (none: any) and optionally a
// claim on the content (as TunnelConfig.Claim). Recv then skips and counts
// packets meant for another phone (Misdelivered); without Expect only
// foreign SPIs are counted.
func (p *Phone) Expect(inner netip.Addr, ports []uint16, claim func([]byte) bool) {
	p.inner, p.ports, p.claim = inner.Unmap(), ports, claim
}

// Misdelivered counts what the phone received that was another phone's.
func (p *Phone) Misdelivered() Misdelivered {
	return Misdelivered{ForeignSPI: p.misdeliv[0].Load(), NotAddressed: p.misdeliv[1].Load(), OtherPhone: p.misdeliv[2].Load()}
}

// LocalAddr is the socket's address (before any NAT).
func (p *Phone) LocalAddr() netip.AddrPort { return p.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// Send seals one inner IP packet (tunnel mode) and sends it.
func (p *Phone) Send(inner []byte) error {
	p.sendMu.Lock()
	defer p.sendMu.Unlock()
	if headroom+len(inner)+p.out.MaxTailroom()+64 > len(p.sbuf) {
		return fmt.Errorf("phone: %d-byte packet too large", len(inner))
	}
	copy(p.sbuf[headroom:], inner)
	start, end, err := p.out.Seal(p.sbuf, headroom, len(inner), esp.NextHeaderFor(inner), 0)
	if err != nil {
		return fmt.Errorf("phone: seal: %w", err)
	}
	if _, err := p.conn.WriteToUDPAddrPort(p.sbuf[start:end], p.gw); err != nil {
		return fmt.Errorf("phone: send to %s: %w", p.gw, err)
	}
	return nil
}

// Keepalive sends one NAT keepalive (a single 0xFF byte, RFC 3948 2.3).
func (p *Phone) Keepalive() error {
	_, err := p.conn.WriteToUDPAddrPort([]byte{0xff}, p.gw)
	return err
}

// ErrTimeout is returned by Recv when nothing valid arrived in time.
var ErrTimeout = errors.New("phone: no packet before the deadline")

// Recv waits until deadline for an ESP packet from the gateway that opens
// under the inbound SA and returns the inner packet (a slice of buf).
// Packets that fail to open are counted in drops and skipped.
func (p *Phone) Recv(buf []byte, deadline time.Time) (inner []byte, drops int, err error) {
	inner, _, drops, err = p.recv(buf, deadline)
	return inner, drops, err
}

// RecvSeq is Recv that also returns the packet's ESP sequence number.
func (p *Phone) RecvSeq(buf []byte, deadline time.Time) (inner []byte, seq uint64, err error) {
	inner, seq, _, err = p.recv(buf, deadline)
	return inner, seq, err
}

func (p *Phone) recv(buf []byte, deadline time.Time) (inner []byte, seq uint64, drops int, err error) {
	p.conn.SetReadDeadline(deadline)
	for {
		n, from, err := p.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil, 0, drops, ErrTimeout
			}
			return nil, 0, drops, err
		}
		if from.Addr().Unmap() != p.gw.Addr().Unmap() || n < 8 {
			drops++
			continue
		}
		if binary.BigEndian.Uint32(buf[:4]) != p.in.SPI() {
			p.misdeliv[0].Add(1)
			drops++
			continue
		}
		res, err := p.in.Open(buf[:n])
		if err != nil {
			drops++
			continue
		}
		got := buf[res.Start:res.End]
		if p.inner.IsValid() && !addressedTo(got, p.inner, p.ports) {
			p.misdeliv[1].Add(1)
			drops++
			continue
		}
		if p.claim != nil && !p.claim(got) {
			p.misdeliv[2].Add(1)
			drops++
			continue
		}
		return got, res.Seq, drops, nil
	}
}

// Close releases the socket.
func (p *Phone) Close() error { return p.conn.Close() }
