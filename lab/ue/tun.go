package ue

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// TUN is a Linux TUN device opened without packet information
// (IFF_TUN|IFF_NO_PI): each Read returns one IP packet, each Write injects
// one. The device is not persistent, so it disappears when the last file
// descriptor closes, also when the process dies.
type TUN struct {
	f    *os.File
	name string
}

// OpenTUN creates the TUN device name (empty: the kernel picks tunN) in the
// calling thread's network namespace.
func OpenTUN(name string) (*TUN, error) {
	if len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tun %q: name longer than %d bytes", name, unix.IFNAMSIZ-1)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tun %q: open /dev/net/tun: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %q: TUNSETIFF: %w", name, err)
	}
	// Non-blocking before os.NewFile puts the fd in Go's poller, so Close
	// wakes a goroutine blocked in Read instead of leaving it in read(2).
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %q: set non-blocking: %w", name, err)
	}
	got := ifr.Name()
	return &TUN{f: os.NewFile(uintptr(fd), "/dev/net/tun:"+got), name: got}, nil
}

// Name is the device's interface name.
func (t *TUN) Name() string { return t.name }

// Read reads one IP packet into b.
func (t *TUN) Read(b []byte) (int, error) { return t.f.Read(b) }

// Write injects one IP packet into the kernel as if it arrived on the device.
func (t *TUN) Write(b []byte) (int, error) { return t.f.Write(b) }

// Close releases the device (removing it: it is not persistent).
func (t *TUN) Close() error { return t.f.Close() }

// Configure gives the device the phone's inner address (host prefix: the
// phone owns one address, not a subnet), an MTU, brings it up and routes
// each prefix through it with the inner address as source, so unmodified
// programs in this namespace send through the tunnel. It shells out to
// iproute2 in the calling thread's namespace (run it under netns.Do).
func (t *TUN) Configure(inner netip.Addr, mtu int, routes []netip.Prefix) error {
	host := netip.PrefixFrom(inner, inner.BitLen())
	steps := [][]string{
		{"addr", "add", host.String(), "dev", t.name},
		{"link", "set", "dev", t.name, "mtu", strconv.Itoa(mtu), "up"},
	}
	if inner.Is6() {
		// Without nodad the address stays tentative for a while and
		// binding to it fails.
		steps[0] = append(steps[0], "nodad")
	} else {
		// No IPv6 link-local address: otherwise the kernel sends router
		// solicitations and MLD reports into the tunnel on its own.
		steps = append([][]string{{"link", "set", "dev", t.name, "addrgenmode", "none"}}, steps...)
	}
	for _, r := range routes {
		if r.Addr().Is4() != inner.Is4() {
			return fmt.Errorf("tun %s: route %s and inner address %s differ in family", t.name, r, inner)
		}
		steps = append(steps, []string{"route", "add", r.Masked().String(), "dev", t.name, "src", inner.String()})
	}
	for _, args := range steps {
		if inner.Is6() {
			args = append([]string{"-6"}, args...)
		}
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("tun %s: ip %s: %w: %s", t.name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	if inner.Is6() {
		// The kernel installs an IPv6 address's local route from a work
		// queue after `ip addr add` returned; until then what the tunnel
		// writes to the TUN for the inner address is dropped as
		// unroutable.
		var out []byte
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(string(out), "local "+inner.String()+" "); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("tun %s: no local route for %s: %s", t.name, inner, strings.TrimSpace(string(out)))
			}
			out, _ = exec.Command("ip", "-6", "route", "show", "table", "local", inner.String()).CombinedOutput()
		}
	}
	return nil
}
