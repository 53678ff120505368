package slowpath

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The IKE relay. The IKE daemon is not on the NAT-T port (xesp is), so
// each phone gets its own UDP socket towards the daemon: the daemon sees
// one distinct peer per phone, and whatever it sends to that socket goes
// back to that phone from the NAT-T socket and address the phone used.
//
// Datagrams are relayed verbatim, non-ESP marker included, in both
// directions: RFC 3948 section 2.2 and RFC 7296 section 2.23 put the
// marker on every IKE message on port 4500, so a daemon's port-4500 socket
// expects it on receive and writes it on send. Forwarding the marker
// keeps the relay transparent: the daemon parses exactly what it would if
// it owned the port, and its answers need no rewriting.
//
// Limitation: the daemon sees the relay's loopback address, not the
// phone's, so its NAT detection always reports a NAT (true for phones),
// and a message the daemon initiates after a relay went idle and closed
// is lost until the phone speaks again.

type relayKey struct {
	peer  netip.AddrPort // the phone's outer address and port
	local netip.Addr     // the gateway address it wrote to
}

type relay struct {
	key  relayKey
	conn *net.UDPConn // connected to the IKE endpoint
	raw  syscall.RawConn
	l    *listener
	oob  []byte // IP_PKTINFO/IPV6_PKTINFO: answers leave from key.local
	last atomic.Int64
	// answered is set once the endpoint has written back: until then
	// the relay may serve a spoofed source and expires sooner.
	answered atomic.Bool
}

// halfOpenIdle is how long a relay the endpoint never answered lives: an
// IKE daemon answers IKE_SA_INIT in milliseconds, and a spoofed-source
// flood should not hold the table for the full RelayIdle.
const halfOpenIdle = 30 * time.Second

type relayTable struct {
	mu     sync.Mutex
	m      map[relayKey]*relay
	fwd    netip.AddrPort
	max    int
	wg     sync.WaitGroup
	closed bool
}

func (t *relayTable) init(fwd netip.AddrPort, max int) {
	t.m = make(map[relayKey]*relay)
	t.fwd, t.max = fwd, max
}

func (t *relayTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

func (t *relayTable) setForward(ap netip.AddrPort) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if ap == t.fwd {
		return
	}
	t.fwd = ap
	t.closeAllLocked()
}

func (t *relayTable) closeAllLocked() {
	for k, r := range t.m {
		r.conn.Close()
		delete(t.m, k)
	}
}

func (t *relayTable) close() {
	t.mu.Lock()
	t.closed = true
	t.closeAllLocked()
	t.mu.Unlock()
	t.wg.Wait()
}

// relayIKE sends one IKE datagram on towards the IKE endpoint and returns
// the counter it lands in.
func (s *Server) relayIKE(l *listener, p []byte, src netip.AddrPort, dst netip.Addr) Counter {
	r, c := s.relayFor(l, relayKey{peer: src, local: dst})
	if r == nil {
		return c
	}
	r.last.Store(time.Now().UnixNano())
	if _, err := r.conn.Write(p); err != nil {
		// ECONNREFUSED here reports an ICMP error for an earlier datagram:
		// the endpoint is not listening.
		return RelayErrors
	}
	return IKERelayed
}

func (s *Server) relayFor(l *listener, k relayKey) (*relay, Counter) {
	t := &s.relays
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.fwd.IsValid() || t.closed {
		return nil, IKEDropped
	}
	if r := t.m[k]; r != nil {
		return r, 0
	}
	// Full: refuse rather than evict. A spoofed-source flood then locks
	// new phones out for at most halfOpenIdle (its relays are never
	// answered), instead of tearing down handshakes in progress.
	if len(t.m) >= t.max {
		return nil, IKEDropped
	}
	var conn *net.UDPConn
	err := s.ns.do(func() (err error) {
		conn, err = net.DialUDP(udpNet(t.fwd), nil, net.UDPAddrFromAddrPort(t.fwd))
		return err
	})
	if err != nil {
		s.log.Warn("slow path: IKE relay socket", "peer", k.peer, "endpoint", t.fwd, "err", err)
		return nil, RelayErrors
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, RelayErrors
	}
	r := &relay{key: k, conn: conn, raw: raw, l: l, oob: pktinfoFor(k.local)}
	r.last.Store(time.Now().UnixNano())
	t.m[k] = r
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		s.relayBack(r)
	}()
	return r, 0
}

func udpNet(ap netip.AddrPort) string {
	if ap.Addr().Is4() || ap.Addr().Is4In6() {
		return "udp4"
	}
	return "udp6"
}

// IKE messages can be large (certificate chains without RFC 7383
// fragmentation), so answers are read into 64 KiB buffers; the pool keeps
// one per answer in flight instead of one per idle relay.
var relayBufs = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// relayBack sends what the IKE endpoint writes to r back to the phone,
// until r is closed.
func (s *Server) relayBack(r *relay) {
	var (
		buf  *[]byte
		n    int
		rerr error
	)
	read := func(fd uintptr) bool {
		b := relayBufs.Get().(*[]byte)
		m, err := unix.Read(int(fd), *b)
		if err == unix.EAGAIN {
			relayBufs.Put(b)
			return false
		}
		buf, n, rerr = b, m, err
		return true
	}
	for {
		if err := r.raw.Read(read); err != nil {
			return // closed: expired, endpoint changed, or shutdown
		}
		if rerr != nil {
			relayBufs.Put(buf)
			s.stats[RelayErrors].Add(1)
			switch rerr {
			case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EINTR:
				continue // ICMP about an earlier datagram; the socket is fine
			}
			s.log.Warn("slow path: IKE relay read", "peer", r.key.peer, "err", rerr)
			s.relays.remove(r)
			return
		}
		r.last.Store(time.Now().UnixNano())
		r.answered.Store(true)
		_, _, err := r.l.conn.WriteMsgUDPAddrPort((*buf)[:n], r.oob, r.key.peer)
		relayBufs.Put(buf)
		if err != nil {
			s.stats[RelayErrors].Add(1)
			continue
		}
		s.stats[IKEReturned].Add(1)
	}
}

func (t *relayTable) remove(r *relay) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m[r.key] == r {
		delete(t.m, r.key)
	}
	r.conn.Close()
}

// expire closes relays idle for longer than idle (halfOpenIdle when the
// endpoint never answered).
func (t *relayTable) expire(now time.Time, idle time.Duration) {
	limit := now.Add(-idle).UnixNano()
	halfOpen := now.Add(-min(idle, halfOpenIdle)).UnixNano()
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, r := range t.m {
		if l := r.last.Load(); l < limit || (!r.answered.Load() && l < halfOpen) {
			r.conn.Close()
			delete(t.m, k)
		}
	}
}

func (s *Server) expireLoop(ctx context.Context) {
	every := min(max(s.o.RelayIdle/4, 10*time.Millisecond), 30*time.Second)
	tk := time.NewTicker(every)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tk.C:
			s.relays.expire(now, s.o.RelayIdle)
		}
	}
}

// nsHandle is the network namespace New ran in, for relay sockets opened
// later from goroutines on arbitrary threads. In the daemon every thread
// is in that namespace and do just runs f; only where the caller switched
// one thread into another namespace (tests, netns.Do) does do setns, which
// needs CAP_SYS_ADMIN.
type nsHandle struct {
	fd       int
	dev, ino uint64
}

func currentNS() (nsHandle, error) {
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nsHandle{fd: -1}, fmt.Errorf("slow path: open current netns: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nsHandle{fd: -1}, fmt.Errorf("slow path: stat current netns: %w", err)
	}
	return nsHandle{fd: fd, dev: st.Dev, ino: st.Ino}, nil
}

func (h *nsHandle) close() {
	if h.fd >= 0 {
		unix.Close(h.fd)
		h.fd = -1
	}
}

// do runs f on a thread in the namespace.
func (h *nsHandle) do(f func() error) error {
	if h.fd < 0 {
		return errors.New("slow path closed")
	}
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open current netns: %w", err)
	}
	defer unix.Close(orig)
	var st unix.Stat_t
	if err := unix.Fstat(orig, &st); err == nil && st.Dev == h.dev && st.Ino == h.ino {
		defer runtime.UnlockOSThread()
		return f()
	}
	if err := unix.Setns(h.fd, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns: %w", err)
	}
	ferr := f()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Stay locked: the runtime retires the thread with its goroutine
		// rather than reuse it in the wrong namespace.
		return errors.Join(ferr, fmt.Errorf("setns back: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}
