// Package netns creates network namespaces and veth pairs for xesp's tests,
// benchmarks and demo, and runs Go code inside them.
//
// It shells out to iproute2 for topology (what an operator would type, and
// what the kernel's own selftests do) and uses setns(2) on a locked OS
// thread to run Go code in a namespace: interface indexes, XDP attachment
// and AF_XDP binding all resolve against the calling thread's namespace.
// It never touches the host namespace's links.
package netns

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// NS is a named network namespace (one under /run/netns).
type NS struct {
	Name string
}

// New creates the namespace name with its loopback up. It fails if the
// name exists: tests must not adopt a namespace they did not make.
func New(name string) (*NS, error) {
	if _, err := os.Stat("/run/netns/" + name); err == nil {
		return nil, fmt.Errorf("netns %s already exists", name)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, bytes.TrimSpace(out))
	}
	ns := &NS{Name: name}
	if _, err := ns.Run("ip", "link", "set", "lo", "up"); err != nil {
		ns.Close()
		return nil, err
	}
	return ns, nil
}

// KillAll sends SIGKILL to every process in the namespace (a server or a
// tool a failed test left behind), so that Close can delete it. A
// namespace that does not exist has none.
func (n *NS) KillAll() {
	out, err := exec.Command("ip", "netns", "pids", n.Name).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Close deletes the namespace; its veth ends go with it, which also
// removes their peers.
func (n *NS) Close() error {
	if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns del %s: %w: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Run runs a command inside the namespace and returns its combined output.
func (n *NS) Run(name string, args ...string) ([]byte, error) {
	full := append([]string{"netns", "exec", n.Name, name}, args...)
	out, err := exec.Command("ip", full...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("in netns %s: %s %s: %w: %s", n.Name, name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// MustRun is Run for setup steps whose failure is a bug in the caller.
func (n *NS) MustRun(name string, args ...string) {
	if _, err := n.Run(name, args...); err != nil {
		panic(err)
	}
}

// Command returns an unstarted command that will run inside the namespace,
// for long-running peers (servers, generators) the caller manages.
func (n *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Do runs f on an OS thread switched into the namespace. Sockets and BPF
// links created by f keep their namespace after Do returns. Goroutines
// started by f do not inherit the namespace.
func (n *NS) Do(f func() error) error {
	target, err := unix.Open("/run/netns/"+n.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", n.Name, err)
	}
	defer unix.Close(target)
	return doIn(target, n.Name, f)
}

func doIn(target int, name string, f func() error) error {
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open current netns: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", name, err)
	}
	ferr := f()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: when this goroutine exits the runtime
		// kills the thread instead of reusing it in the wrong namespace.
		return errors.Join(ferr, fmt.Errorf("setns back from %s: %w", name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Veth creates a veth pair with end aName in a and end bName in b, both up.
// Checksum offload is turned off on both ends: veth otherwise hands locally
// sent UDP to XDP with a partial checksum (docs/platform.md), which tests that
// check checksums would misread.
func Veth(a *NS, aName string, b *NS, bName string) error {
	return VethQueues(a, aName, b, bName, 1)
}

// VethQueues is Veth with queues TX and RX queues on each end. A packet
// sent on one end's TX queue q arrives on the other end's RX queue q, so
// the sender's queue selection (per socket flow hash, or an AF_XDP socket
// bound to a queue) spreads traffic like RSS on a real NIC.
func VethQueues(a *NS, aName string, b *NS, bName string, queues int) error {
	q := fmt.Sprint(queues)
	if _, err := a.Run("ip", "link", "add", aName, "numtxqueues", q, "numrxqueues", q, "type", "veth",
		"peer", "name", bName, "numtxqueues", q, "numrxqueues", q, "netns", b.Name); err != nil {
		return err
	}
	for _, end := range []struct {
		ns  *NS
		dev string
	}{{a, aName}, {b, bName}} {
		if _, err := end.ns.Run("ip", "link", "set", end.dev, "up"); err != nil {
			return err
		}
		if _, err := end.ns.Run("ethtool", "-K", end.dev, "tx", "off", "rx", "off"); err != nil {
			return err
		}
	}
	return nil
}

var seq atomic.Uint32

// UniqueName returns prefix-<pid>-<n>, short enough for an interface name
// (15 bytes) when prefix is at most 4 bytes.
func UniqueName(prefix string) string {
	return fmt.Sprintf("%s%d-%d", prefix, os.Getpid()%100000, seq.Add(1))
}

// WaitLocalRoute waits until addr (an address just added in the
// namespace) has its local route. For IPv6 the kernel installs it from a
// work queue after `ip addr add` returned, nodad or not: until then a
// datagram sent to addr is dropped as unroutable (Ip6OutNoRoutes) while
// the sender sees no error, which a loaded machine stretches to tens of
// milliseconds.
func (n *NS) WaitLocalRoute(addr netip.Addr, within time.Duration) error {
	fam := "-4"
	if addr.Is6() {
		fam = "-6"
	}
	var out []byte
	var err error
	for deadline := time.Now().Add(within); ; time.Sleep(5 * time.Millisecond) {
		out, err = n.Run("ip", fam, "route", "show", "table", "local", addr.String())
		if err == nil && bytes.Contains(out, []byte("local "+addr.String()+" ")) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("netns %s: no local route for %s after %v: %s %v", n.Name, addr, within, bytes.TrimSpace(out), err)
		}
	}
}
