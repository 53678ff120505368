package api

// Limits before authentication. The TCP listener holds at most MaxConns
// connections at once and at most MaxConnsPerSource from one address,
// whatever they send (or do not send): without a cap a flood of idle
// connections takes the daemon's file descriptors, and then the Unix
// socket, the data path's sockets and the state snapshots fail with
// "too many open files". When the listener is full it stops accepting,
// so further connections wait in the kernel's backlog and cost the
// daemon no descriptor; a source over its share is accepted and closed
// at once. The server's timeouts (read header, read, write, idle; the
// TLS handshake shares the read-header one) bound how long any
// connection can hold its slot.

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// ConnStats count what the connection limits did.
type ConnStats struct {
	Open    int64  // connections held now
	Refused uint64 // connections closed at accept: their source was over its share
}

// limitListener caps concurrent connections overall and per source.
type limitListener struct {
	net.Listener
	slots     chan struct{} // one token per connection the listener may hold
	perSource int
	done      chan struct{}
	closeOnce sync.Once

	mu  sync.Mutex
	per map[netip.Addr]int

	open    atomic.Int64
	refused atomic.Uint64
}

func newLimitListener(ln net.Listener, total, perSource int) *limitListener {
	return &limitListener{Listener: ln, slots: make(chan struct{}, total), perSource: perSource,
		done: make(chan struct{}), per: map[netip.Addr]int{}}
}

func sourceOf(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		select {
		case l.slots <- struct{}{}:
		case <-l.done:
			return nil, net.ErrClosed
		}
		c, err := l.Listener.Accept()
		if err != nil {
			<-l.slots
			return nil, err
		}
		src := sourceOf(c)
		l.mu.Lock()
		over := l.per[src] >= l.perSource
		if !over {
			l.per[src]++
		}
		l.mu.Unlock()
		if over {
			// Closed before a byte is read: no TLS handshake, no
			// request parsing for a source already at its share.
			c.Close()
			<-l.slots
			l.refused.Add(1)
			continue
		}
		l.open.Add(1)
		return &limitConn{Conn: c, l: l, src: src}, nil
	}
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

func (l *limitListener) release(src netip.Addr) {
	l.mu.Lock()
	if l.per[src]--; l.per[src] <= 0 {
		delete(l.per, src)
	}
	l.mu.Unlock()
	l.open.Add(-1)
	<-l.slots
}

type limitConn struct {
	net.Conn
	l    *limitListener
	src  netip.Addr
	once sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.src) })
	return err
}

// ConnStats returns the TCP listener's connection figures (zero without
// one).
func (s *Server) ConnStats() ConnStats {
	s.mu.Lock()
	l := s.limit
	s.mu.Unlock()
	if l == nil {
		return ConnStats{}
	}
	return ConnStats{Open: l.open.Load(), Refused: l.refused.Load()}
}

var errNoLimits = errors.New("api: connection limits must be positive")
