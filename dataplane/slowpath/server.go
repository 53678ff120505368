package slowpath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
	"github.com/xesp/xesp/dataplane/worker"
)

// Injector takes ESP packets for the SAs it owns; *worker.Worker is one.
// It must not block, and it may keep the ESP slices until it has copied
// them (worker.Worker copies when it dequeues, not in Inject).
type Injector interface {
	Inject(pkts []worker.SlowPacket) int
}

// Options configures a Server.
type Options struct {
	// Addrs are the local addresses to listen on, IPv4 and IPv6 alike:
	// one socket each, so IKE answers leave from the address the phone
	// wrote to.
	Addrs []netip.Addr
	// Port is the NAT-T port (4500); 0 picks one per address (tests).
	Port int
	SAD  *sad.SAD
	// Workers are indexed by sad.Record.Worker.
	Workers []Injector
	// IKEForward is the IKE endpoint; the zero value counts and drops IKE.
	IKEForward netip.AddrPort
	// MaxRelays bounds the relay sockets (one per phone address:port and
	// local address); default 4096.
	MaxRelays int
	// RelayIdle closes a relay after this long without traffic either
	// way; default 10 minutes.
	RelayIdle time.Duration
	// Batch is datagrams per recvmmsg(2); default 16 (a 64 KiB buffer each).
	Batch int
	Log   *slog.Logger
}

const (
	// maxDatagram is the largest UDP payload IPv4 or IPv6 (without
	// jumbograms) can deliver, so nothing is ever truncated.
	maxDatagram = 65535
	// minESP is SPI, sequence number and 8 bytes: the XDP program's runt
	// threshold (bpf/xesp.c), so both paths agree on what a runt is.
	minESP = 16
	// arenaSize is how many bytes of ESP the slow path copies into one
	// allocation before starting another.
	arenaSize = 256 << 10
	// readBuffer absorbs bursts of reassembled datagrams.
	readBuffer = 4 << 20
)

// Server is the slow path: the NAT-T sockets and the IKE relay.
type Server struct {
	o       Options
	ls      []*listener
	ns      nsHandle
	stats   counters
	relays  relayTable
	log     *slog.Logger
	closeMu sync.Mutex
	closed  bool
	done    chan struct{} // closed by Close
}

type listener struct {
	conn  *net.UDPConn
	raw   syscall.RawConn
	local netip.AddrPort
}

// New opens the NAT-T sockets, in the network namespace of the calling
// thread; relay sockets opened later go to the same namespace.
func New(o Options) (*Server, error) {
	if len(o.Addrs) == 0 {
		return nil, errors.New("slow path: no public address to listen on")
	}
	if o.SAD == nil || len(o.Workers) == 0 {
		return nil, errors.New("slow path: needs the SAD and at least one worker")
	}
	if o.Port < 0 || o.Port > 65535 {
		return nil, fmt.Errorf("slow path: port %d out of range", o.Port)
	}
	if o.MaxRelays <= 0 {
		o.MaxRelays = 4096
	}
	if o.RelayIdle <= 0 {
		o.RelayIdle = 10 * time.Minute
	}
	if o.Batch <= 0 {
		o.Batch = 16
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	s := &Server{o: o, log: o.Log, done: make(chan struct{})}
	s.relays.init(o.IKEForward, o.MaxRelays)
	var err error
	if s.ns, err = currentNS(); err != nil {
		return nil, err
	}
	for _, a := range o.Addrs {
		l, err := listen(netip.AddrPortFrom(a.Unmap(), uint16(o.Port)))
		if err != nil {
			s.Close()
			return nil, err
		}
		s.ls = append(s.ls, l)
	}
	return s, nil
}

func listen(at netip.AddrPort) (*listener, error) {
	network := "udp4"
	if at.Addr().Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			f := int(fd)
			if network == "udp4" {
				serr = errors.Join(
					unix.SetsockoptInt(f, unix.IPPROTO_IP, unix.IP_PKTINFO, 1),
					// The address may not be up yet when the daemon starts.
					unix.SetsockoptInt(f, unix.IPPROTO_IP, unix.IP_FREEBIND, 1))
			} else {
				serr = errors.Join(
					unix.SetsockoptInt(f, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1),
					// DAD keeps a new IPv6 address tentative for a while.
					unix.SetsockoptInt(f, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1))
			}
		})
		return errors.Join(err, serr)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, at.String())
	if err != nil {
		return nil, fmt.Errorf("slow path: listen on %s: %w", at, err)
	}
	conn := pc.(*net.UDPConn)
	conn.SetReadBuffer(readBuffer) // best effort: capped by net.core.rmem_max
	raw, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("slow path: %s: %w", at, err)
	}
	return &listener{conn: conn, raw: raw, local: conn.LocalAddr().(*net.UDPAddr).AddrPort()}, nil
}

// LocalAddrs returns the sockets' bound addresses.
func (s *Server) LocalAddrs() []netip.AddrPort {
	out := make([]netip.AddrPort, len(s.ls))
	for i, l := range s.ls {
		out[i] = netip.AddrPortFrom(l.local.Addr().Unmap(), l.local.Port())
	}
	return out
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats { return s.stats.snapshot() }

// SetIKEForward changes the IKE endpoint (zero: count and drop IKE). The
// existing relays are closed: they are connected to the old endpoint.
func (s *Server) SetIKEForward(ap netip.AddrPort) { s.relays.setForward(ap) }

// Relays returns how many relay sockets are open.
func (s *Server) Relays() int { return s.relays.len() }

// Run serves every socket until ctx is done, Close is called or a socket
// fails, then closes the server. Call it once.
func (s *Server) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, len(s.ls))
	var wg sync.WaitGroup
	for _, l := range s.ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.serve(l); err != nil {
				errc <- err
				cancel()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.expireLoop(ctx)
	}()
	select {
	case <-ctx.Done():
	case <-s.done:
	}
	s.Close()
	cancel()
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// Close closes the NAT-T sockets and every relay; Run then returns.
func (s *Server) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	close(s.done)
	var errs []error
	for _, l := range s.ls {
		if err := l.conn.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.relays.close()
	s.ns.close()
	return errors.Join(errs...)
}

// serve is one socket's receive loop: a batch in, each datagram
// classified, the ESP ones handed to their workers a batch per worker.
func (s *Server) serve(l *listener) error {
	b := newBatch(s.o.Batch, maxDatagram)
	d := s.newDispatcher()
	for {
		n, err := b.receive(l.raw)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("slow path %s: %w", l.local, err)
		}
		for i := range n {
			p, src, dst := b.datagram(i)
			if !dst.IsValid() {
				dst = l.local.Addr()
			}
			d.classify(l, p, src, dst)
		}
		d.flush()
	}
}

// dispatcher holds one receive loop's per-batch state.
type dispatcher struct {
	s     *Server
	pend  [][]worker.SlowPacket // by worker
	arena []byte
	tally Stats
}

func (s *Server) newDispatcher() *dispatcher {
	d := &dispatcher{s: s, pend: make([][]worker.SlowPacket, len(s.o.Workers))}
	for w := range d.pend {
		d.pend[w] = make([]worker.SlowPacket, 0, s.o.Batch)
	}
	return d
}

// classify applies RFC 3948 section 2.2 to one datagram (p is the UDP
// payload).
func (d *dispatcher) classify(l *listener, p []byte, src netip.AddrPort, dst netip.Addr) {
	switch {
	case len(p) == 1 && p[0] == 0xff:
		d.tally[Keepalive]++
	case len(p) >= 4 && binary.BigEndian.Uint32(p) == 0:
		d.tally[d.s.relayIKE(l, p, src, dst)]++
	case len(p) < minESP:
		d.tally[Runt]++
	default:
		d.esp(p, src, dst)
	}
}

func (d *dispatcher) esp(p []byte, src netip.AddrPort, dst netip.Addr) {
	// Get, not Lookup: an inbound SA's identity is (in, SPI), and Get
	// reports a miss without formatting an error, so a flood of unknown
	// SPIs costs no allocation.
	e, ok := d.s.o.SAD.Get(sa.ID{Dir: sa.In, SPI: binary.BigEndian.Uint32(p)})
	if !ok || int(e.Worker) >= len(d.pend) {
		d.tally[NoSA]++
		return
	}
	w := int(e.Worker)
	if len(d.pend[w]) == cap(d.pend[w]) {
		d.flushWorker(w)
	}
	d.pend[w] = append(d.pend[w], worker.SlowPacket{ESP: d.copy(p), Src: src, Dst: dst, Index: e.Index})
}

// copy moves p out of the receive buffer, which the next recvmmsg
// overwrites while the worker may not yet have dequeued the packet (it
// copies at dequeue time and signals nothing back). Copies are carved from
// a shared arena, so the slow path allocates once per arenaSize bytes of
// ESP rather than once per packet; the garbage collector frees an arena
// once the workers have dropped every packet in it.
func (d *dispatcher) copy(p []byte) []byte {
	if cap(d.arena)-len(d.arena) < len(p) {
		d.arena = make([]byte, 0, max(arenaSize, len(p)))
	}
	n := len(d.arena)
	d.arena = append(d.arena, p...)
	return d.arena[n:len(d.arena):len(d.arena)]
}

func (d *dispatcher) flushWorker(w int) {
	pk := d.pend[w]
	n := d.s.o.Workers[w].Inject(pk)
	d.tally[ESPInjected] += uint64(n)
	d.tally[InjectFull] += uint64(len(pk) - n)
	clear(pk) // drop references to the arena
	d.pend[w] = pk[:0]
}

func (d *dispatcher) flush() {
	for w := range d.pend {
		if len(d.pend[w]) > 0 {
			d.flushWorker(w)
		}
	}
	d.s.stats.add(&d.tally)
}
