package slowpath

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// oobSize holds one IP_PKTINFO or IPV6_PKTINFO message with room to spare
// for anything else the kernel adds.
const oobSize = 128

// batch is one recvmmsg(2) worth of receive state for one socket. All of
// it is allocated once; msgs point into the other slices, which never
// move (the Go heap does not compact).
type batch struct {
	msgs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for either family
	oob   []byte
	bufs  []byte
	size  int // bytes per datagram buffer

	// Results of the last receive, written by read.
	n     int
	errno error
	read  func(fd uintptr) bool
}

func newBatch(count, size int) *batch {
	b := &batch{
		msgs:  make([]unix.Mmsghdr, count),
		iovs:  make([]unix.Iovec, count),
		names: make([]unix.RawSockaddrInet6, count),
		oob:   make([]byte, count*oobSize),
		bufs:  make([]byte, count*size),
		size:  size,
	}
	for i := range b.msgs {
		b.iovs[i].Base = &b.bufs[i*size]
		b.iovs[i].SetLen(size)
		h := &b.msgs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		h.Iov = &b.iovs[i]
		h.Iovlen = 1
		h.Control = &b.oob[i*oobSize]
	}
	// One closure for the socket's lifetime: RawConn.Read calls it again
	// whenever the netpoller says the socket is readable.
	b.read = func(fd uintptr) bool {
		for i := range b.msgs {
			h := &b.msgs[i].Hdr
			h.Namelen = unix.SizeofSockaddrInet6
			h.SetControllen(oobSize)
			h.Flags = 0
		}
		r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.msgs[0])), uintptr(len(b.msgs)), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case 0:
			b.n, b.errno = int(r), nil
		case unix.EAGAIN:
			return false
		case unix.EINTR:
			b.n, b.errno = 0, nil
		default:
			b.n, b.errno = 0, e
		}
		return true
	}
	return b
}

// receive fills the batch with up to len(msgs) datagrams, blocking in the
// netpoller until at least one is there.
func (b *batch) receive(raw syscall.RawConn) (int, error) {
	if err := raw.Read(b.read); err != nil {
		return 0, err
	}
	if b.errno != nil {
		return 0, fmt.Errorf("recvmmsg: %w", b.errno)
	}
	return b.n, nil
}

// datagram returns datagram i of the last receive: payload, source, and
// the local address it was sent to (IP_PKTINFO/IPV6_PKTINFO; invalid when
// the kernel gave none).
func (b *batch) datagram(i int) (payload []byte, src netip.AddrPort, dst netip.Addr) {
	m := &b.msgs[i]
	n := min(int(m.Len), b.size)
	payload = b.bufs[i*b.size : i*b.size+n : i*b.size+n]
	src = sockaddrAddrPort(&b.names[i], m.Hdr.Namelen)
	dst = pktinfoDst(b.oob[i*oobSize : i*oobSize+int(m.Hdr.Controllen)])
	return payload, src, dst
}

func sockaddrAddrPort(sa *unix.RawSockaddrInet6, n uint32) netip.AddrPort {
	port := func(p *uint16) uint16 { return binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(p))[:]) }
	switch sa.Family {
	case unix.AF_INET:
		if n < unix.SizeofSockaddrInet4 {
			return netip.AddrPort{}
		}
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), port(&s4.Port))
	case unix.AF_INET6:
		if n < unix.SizeofSockaddrInet6 {
			return netip.AddrPort{}
		}
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port(&sa.Port))
	}
	return netip.AddrPort{}
}

// cmsgAlign is CMSG_ALIGN: control messages are aligned to a long.
func cmsgAlign(n int) int {
	const a = int(unsafe.Sizeof(uintptr(0)))
	return (n + a - 1) &^ (a - 1)
}

// pktinfoDst walks the control messages by hand: the x/sys parser
// allocates a slice per call.
func pktinfoDst(oob []byte) netip.Addr {
	hdr := unix.CmsgLen(0)
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < hdr || l > len(oob) {
			return netip.Addr{}
		}
		data := oob[hdr:l]
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom4(pi.Addr)
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom16(pi.Addr).Unmap()
		}
		next := cmsgAlign(l)
		if next >= len(oob) {
			break
		}
		oob = oob[next:]
	}
	return netip.Addr{}
}

// pktinfoFor builds the control message that makes a reply leave from
// local, whatever address the socket is bound to.
func pktinfoFor(local netip.Addr) []byte {
	if local.Is4() {
		b := make([]byte, unix.CmsgSpace(unix.SizeofInet4Pktinfo))
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
		pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&b[unix.CmsgLen(0)]))
		pi.Spec_dst = local.As4()
		return b
	}
	b := make([]byte, unix.CmsgSpace(unix.SizeofInet6Pktinfo))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
	h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
	pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&b[unix.CmsgLen(0)]))
	pi.Addr = local.As16()
	return b
}
