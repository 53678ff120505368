package neigh

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Netlink is host byte order.
var ne = binary.NativeEndian

const (
	nlmsgHdrLen = unix.SizeofNlMsghdr
	rtaHdrLen   = 4
	iflaAddress = 1
	iflaIfname  = 3
)

// nlConn is a synchronous NETLINK_ROUTE request/response socket. One
// request is in flight at a time (mu), which is all the control plane needs.
type nlConn struct {
	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte
}

// openNL opens a NETLINK_ROUTE socket in the calling thread's network
// namespace. The receive timeout keeps a lost reply from hanging the run
// loop forever.
func openNL() (*nlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval((2 * time.Second).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink SO_RCVTIMEO: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	return &nlConn{fd: fd, buf: make([]byte, 1<<16)}, nil
}

func (c *nlConn) close() error { return unix.Close(c.fd) }

// attr appends one rtattr (type, payload) padded to 4 bytes.
func attr(b []byte, typ uint16, payload []byte) []byte {
	l := rtaHdrLen + len(payload)
	b = ne.AppendUint16(b, uint16(l))
	b = ne.AppendUint16(b, typ)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// attrs walks rtattrs in b and calls f for each; it stops at malformed ones.
func attrs(b []byte, f func(typ uint16, v []byte)) {
	for len(b) >= rtaHdrLen {
		l := int(ne.Uint16(b[0:2]))
		if l < rtaHdrLen || l > len(b) {
			return
		}
		f(ne.Uint16(b[2:4])&^unix.NLA_F_NESTED, b[rtaHdrLen:l])
		al := (l + 3) &^ 3
		if al > len(b) {
			return
		}
		b = b[al:]
	}
}

// do sends one request and returns the payload (after the netlink header)
// of the single reply. A NLMSG_ERROR reply becomes its errno.
func (c *nlConn) do(typ uint16, body []byte) (uint16, []byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	seq := c.seq
	msg := make([]byte, 0, nlmsgHdrLen+len(body))
	msg = ne.AppendUint32(msg, uint32(nlmsgHdrLen+len(body)))
	msg = ne.AppendUint16(msg, typ)
	msg = ne.AppendUint16(msg, unix.NLM_F_REQUEST)
	msg = ne.AppendUint32(msg, seq)
	msg = ne.AppendUint32(msg, 0)
	msg = append(msg, body...)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, nil, fmt.Errorf("netlink send: %w", err)
	}
	for {
		n, _, err := unix.Recvfrom(c.fd, c.buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return 0, nil, fmt.Errorf("netlink receive: %w", err)
		}
		b := c.buf[:n]
		for len(b) >= nlmsgHdrLen {
			l := int(ne.Uint32(b[0:4]))
			if l < nlmsgHdrLen || l > len(b) {
				return 0, nil, errors.New("netlink: truncated message")
			}
			mtyp, mseq := ne.Uint16(b[4:6]), ne.Uint32(b[8:12])
			payload := b[nlmsgHdrLen:l]
			b = b[(l+3)&^3:]
			if mseq != seq {
				continue // a late reply to an earlier, timed-out request
			}
			if mtyp == unix.NLMSG_ERROR {
				if len(payload) < 4 {
					return 0, nil, errors.New("netlink: short error message")
				}
				if code := int32(ne.Uint32(payload[0:4])); code != 0 {
					return 0, nil, unix.Errno(-code)
				}
				return 0, nil, errors.New("netlink: ack without reply")
			}
			out := make([]byte, len(payload))
			copy(out, payload)
			return mtyp, out, nil
		}
	}
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// addrFrom decodes an address attribute of the given family.
func addrFrom(fam uint8, v []byte) (netip.Addr, bool) {
	switch {
	case fam == unix.AF_INET && len(v) == 4:
		return netip.AddrFrom4([4]byte(v)), true
	case fam == unix.AF_INET6 && len(v) == 16:
		return netip.AddrFrom16([16]byte(v)), true
	}
	return netip.Addr{}, false
}

// route is what RTM_GETROUTE tells about one destination.
type route struct {
	oif     int
	nexthop netip.Addr // the gateway, or the destination itself when on-link
}

var (
	errLocal       = errors.New("destination is a local address")
	errNotUnicast  = errors.New("route is not unicast")
	errNoOif       = errors.New("route has no output interface")
	errUnsupported = errors.New("route via another address family")
)

// getRoute asks the kernel which way dst goes, as `ip route get` does.
func (c *nlConn) getRoute(dst netip.Addr) (route, error) {
	body := make([]byte, unix.SizeofRtMsg, unix.SizeofRtMsg+24)
	body[0] = family(dst)
	body[1] = uint8(dst.BitLen()) // dst_len
	body = attr(body, unix.RTA_DST, dst.AsSlice())
	typ, reply, err := c.do(unix.RTM_GETROUTE, body)
	if err != nil {
		return route{}, fmt.Errorf("route get %s: %w", dst, err)
	}
	if typ != unix.RTM_NEWROUTE || len(reply) < unix.SizeofRtMsg {
		return route{}, fmt.Errorf("route get %s: unexpected reply type %d", dst, typ)
	}
	switch reply[7] { // rtm_type
	case unix.RTN_UNICAST:
	case unix.RTN_LOCAL:
		return route{}, fmt.Errorf("route get %s: %w", dst, errLocal)
	default:
		return route{}, fmt.Errorf("route get %s: type %d: %w", dst, reply[7], errNotUnicast)
	}
	r := route{nexthop: dst}
	var via bool
	attrs(reply[unix.SizeofRtMsg:], func(t uint16, v []byte) {
		switch t {
		case unix.RTA_OIF:
			if len(v) == 4 {
				r.oif = int(ne.Uint32(v))
			}
		case unix.RTA_GATEWAY:
			if gw, ok := addrFrom(reply[0], v); ok {
				r.nexthop = gw
			}
		case unix.RTA_VIA:
			via = true
		}
	})
	if via {
		return route{}, fmt.Errorf("route get %s: %w", dst, errUnsupported)
	}
	if r.oif == 0 {
		return route{}, fmt.Errorf("route get %s: %w", dst, errNoOif)
	}
	return r, nil
}

// neighEntry is one neighbour-table entry.
type neighEntry struct {
	ifindex int
	addr    netip.Addr
	state   uint16
	mac     [6]byte
	hasMAC  bool
}

// usable reports whether the kernel holds a MAC it would transmit to
// without first resolving: STALE/DELAY/PROBE still carry a valid address,
// INCOMPLETE/FAILED/NONE do not.
func (e neighEntry) usable() bool {
	const ok = unix.NUD_REACHABLE | unix.NUD_STALE | unix.NUD_DELAY | unix.NUD_PROBE | unix.NUD_PERMANENT
	return e.hasMAC && e.state&ok != 0
}

// parseNeigh decodes an RTM_NEWNEIGH/RTM_DELNEIGH payload.
func parseNeigh(b []byte) (neighEntry, bool) {
	if len(b) < unix.SizeofNdMsg {
		return neighEntry{}, false
	}
	fam := b[0]
	e := neighEntry{ifindex: int(int32(ne.Uint32(b[4:8]))), state: ne.Uint16(b[8:10])}
	var haveDst bool
	attrs(b[unix.SizeofNdMsg:], func(t uint16, v []byte) {
		switch t {
		case unix.NDA_DST:
			e.addr, haveDst = addrFrom(fam, v)
		case unix.NDA_LLADDR:
			if len(v) == 6 {
				e.mac, e.hasMAC = [6]byte(v), true
			}
		}
	})
	return e, haveDst
}

// getNeigh reads the kernel's neighbour entry for addr on ifindex.
// A missing entry is reported as ok=false without error.
func (c *nlConn) getNeigh(ifindex int, addr netip.Addr) (neighEntry, bool, error) {
	body := make([]byte, unix.SizeofNdMsg, unix.SizeofNdMsg+24)
	body[0] = family(addr)
	ne.PutUint32(body[4:8], uint32(ifindex))
	body = attr(body, unix.NDA_DST, addr.AsSlice())
	typ, reply, err := c.do(unix.RTM_GETNEIGH, body)
	if errors.Is(err, unix.ENOENT) {
		return neighEntry{}, false, nil
	}
	if err != nil {
		return neighEntry{}, false, fmt.Errorf("neigh get %s dev %d: %w", addr, ifindex, err)
	}
	if typ != unix.RTM_NEWNEIGH {
		return neighEntry{}, false, fmt.Errorf("neigh get %s dev %d: unexpected reply type %d", addr, ifindex, typ)
	}
	e, ok := parseNeigh(reply)
	if !ok {
		return neighEntry{}, false, fmt.Errorf("neigh get %s dev %d: reply without NDA_DST", addr, ifindex)
	}
	return e, true, nil
}

// getLink returns an interface's name and hardware address.
func (c *nlConn) getLink(ifindex int) (string, [6]byte, error) {
	body := make([]byte, unix.SizeofIfInfomsg)
	ne.PutUint32(body[4:8], uint32(ifindex))
	typ, reply, err := c.do(unix.RTM_GETLINK, body)
	if err != nil {
		return "", [6]byte{}, fmt.Errorf("link get %d: %w", ifindex, err)
	}
	if typ != unix.RTM_NEWLINK || len(reply) < unix.SizeofIfInfomsg {
		return "", [6]byte{}, fmt.Errorf("link get %d: unexpected reply type %d", ifindex, typ)
	}
	var (
		name   string
		mac    [6]byte
		hasMAC bool
	)
	attrs(reply[unix.SizeofIfInfomsg:], func(t uint16, v []byte) {
		switch t {
		case iflaIfname:
			if i := bytes.IndexByte(v, 0); i >= 0 {
				v = v[:i]
			}
			name = string(v)
		case iflaAddress:
			if len(v) == 6 {
				mac, hasMAC = [6]byte(v), true
			}
		}
	})
	if !hasMAC {
		return name, mac, fmt.Errorf("link %d (%s) has no Ethernet address", ifindex, name)
	}
	return name, mac, nil
}

// InterfaceMAC returns the Ethernet address of the interface ifindex in the
// calling thread's network namespace (the source MAC for AF_XDP frames).
func InterfaceMAC(ifindex int) ([6]byte, error) {
	c, err := openNL()
	if err != nil {
		return [6]byte{}, err
	}
	defer c.close()
	_, mac, err := c.getLink(ifindex)
	return mac, err
}
