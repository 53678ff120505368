package neigh

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

const discardPort = 9 // RFC 863

// probeSocks are one interface's trigger sockets: unconnected UDP, bound to
// the device so the kernel resolves the next hop on that link even when
// another route would pick a different one. fd -1: family unavailable.
type probeSocks struct {
	v4, v6 int
}

func openProbe(ifname string) (*probeSocks, error) {
	p := &probeSocks{v4: -1, v6: -1}
	var err error
	if p.v4, err = probeSocket(unix.AF_INET, ifname); err != nil {
		return nil, err
	}
	// A host without IPv6 still resolves IPv4 next hops.
	if p.v6, err = probeSocket(unix.AF_INET6, ifname); err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
		p.close()
		return nil, err
	}
	return p, nil
}

func probeSocket(fam int, ifname string) (int, error) {
	fd, err := unix.Socket(fam, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return -1, fmt.Errorf("probe socket: %w", err)
	}
	if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, ifname); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("probe socket SO_BINDTODEVICE %s: %w", ifname, err)
	}
	return fd, nil
}

func (p *probeSocks) close() {
	for _, fd := range []int{p.v4, p.v6} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// send makes the kernel resolve nh on oif by sending it one empty datagram
// to the discard port. The kernel queues it behind ARP/ND and sends it
// once the neighbour answers (or drops it when resolution fails).
func (p *probeSocks) send(oif int, nh netip.Addr) error {
	var (
		fd int
		sa unix.Sockaddr
	)
	if nh.Is4() {
		fd, sa = p.v4, &unix.SockaddrInet4{Port: discardPort, Addr: nh.As4()}
	} else {
		// Link-local next hops (the usual IPv6 default gateway) need the zone.
		fd, sa = p.v6, &unix.SockaddrInet6{Port: discardPort, Addr: nh.As16(), ZoneId: uint32(oif)}
	}
	if fd < 0 {
		return fmt.Errorf("probe %s: no socket for its family", nh)
	}
	if err := unix.Sendto(fd, nil, 0, sa); err != nil {
		return fmt.Errorf("probe %s: %w", nh, err)
	}
	return nil
}
