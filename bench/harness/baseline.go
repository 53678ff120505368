package harness

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/internal/procs"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/xsktest"
)

// baselineBatch is the recvmmsg/sendmmsg batch, the worker's batch size.
const baselineBatch = 64

// The socket baselines measure what a careful engineer would write without
// XDP: the same ESP engine behind plain UDP sockets, one thread on GwCPU
// reading with blocking recvmmsg and writing with sendmmsg (socketLoop),
// counted at the far end like xesp. The kernel's receive path runs in the
// generator's softirq on GenCPU, as XDP does for xesp.

// baseline measures one direction of the socket baseline with n SAs.
// Decap: a UDP socket on the gateway's 4500, each datagram opened
// (esp.Transform.Open: replay check, AES-GCM, padding) under the SA its
// SPI names, the inner UDP payload sent on to its inner destination.
// Encap: see startBaselineEncap.
func (r *runner) baseline(dir, size string, sz gen.Sizes, n int) error {
	encap := dir == "encap"
	load, start := r.loadPhone, r.startBaselineDecap
	if encap {
		load, start = r.loadCore, r.startBaselineEncap
	}
	if err := load(sz, n); err != nil {
		return err
	}
	ss, err := start(n)
	if err != nil {
		return err
	}
	p, err := r.measure(ss.senders, ss.count)
	res := p.result(Result{Name: baselineName(dir, size, n), Group: "baseline", Test: "udp_sockets", Dir: dir, Size: size, SAs: n, Workers: 1})
	if err == nil && r.o.NDR {
		// The same search as xesp's, so the ratio at each SA count is
		// NDR to NDR.
		err = r.ndr(&res, encap, n, sz, ss.count)
	}
	note, cerr := ss.close()
	if err = errors.Join(err, cerr); err != nil {
		return err
	}
	res.Note = note
	r.add(res)
	return nil
}

// session is a system under test kept running across measurements (the
// gate interleaves trials of several): who sends to it, the far-end
// counter of what it delivered, and its teardown, which returns a note
// on what it counted.
type session struct {
	senders []sender
	count   func() (uint64, error)
	stop    func() (string, error)
	// stamps is the far end's counter when it can sample arrivals for
	// latency (the reflect ceiling).
	stamps *gen.Counter
	once   sync.Once
	note   string
	err    error
}

// close tears the session down once and returns its note.
func (s *session) close() (string, error) {
	s.once.Do(func() { s.note, s.err = s.stop() })
	return s.note, s.err
}

// closers collects teardown steps, run last first.
type closers []func()

func (c closers) run() {
	for i := len(c) - 1; i >= 0; i-- {
		c[i]()
	}
}

// baselineSA makes the baseline's i-th SA with its cipher built: the
// engine builds a GCM cipher on an SA's first packet (esp, lazy
// proposals), and xesp's SAs are all warm before its trials (warm.go), so
// the baseline's are too — at a million SAs its trials would otherwise
// measure the builds. It checks the run's context every 4096 SAs: a
// million take seconds, and a signal stops the bench within 2 s.
func (r *runner) baselineSA(i int, c esp.Config) (*esp.Transform, error) {
	if i%4096 == 0 {
		if err := r.ctx.Err(); err != nil {
			return nil, err
		}
	}
	s, err := esp.NewTransform(c)
	if err != nil {
		return nil, err
	}
	if err := s.Warm(); err != nil {
		return nil, err
	}
	return s, nil
}

// startBaselineDecap starts the decap socket baseline with n SAs on the
// runner's topology; the phone's ring must hold ESP frames.
func (r *runner) startBaselineDecap(n int) (*session, error) {
	sas := make(map[uint32]*esp.Transform, n)
	for i := range n {
		key, err := pktgen.KeyBytes('i', i)
		if err != nil {
			return nil, err
		}
		s, err := r.baselineSA(i, esp.Config{SPI: pktgen.InSPIBase + uint32(i), Proposal: esp.AES128GCM16, EncKey: key,
			Mode: esp.ModeTunnel, ReplayWindow: esp.DefaultReplayWindow})
		if err != nil {
			return nil, err
		}
		sas[s.SPI()] = s
	}
	addrs := make([]net.UDPAddr, baselineBatch)
	loop := &socketLoop{
		in:  &net.UDPAddr{IP: net.IP(r.nw.Gateway.AsSlice()), Port: esp.NATTPort},
		out: &net.UDPAddr{IP: net.IPv4(10, 0, 0, 254)},
		setup: func(i int, rx, tx *ipv4.Message) {
			addrs[i].IP = make(net.IP, 4)
			tx.Addr = &addrs[i]
		},
		each: func(_ int, rx, tx *ipv4.Message) bool {
			p := rx.Buffers[0][:rx.N]
			if len(p) < 8 {
				return false
			}
			s := sas[binary.BigEndian.Uint32(p)]
			if s == nil {
				return false
			}
			res, err := s.Open(p)
			if err != nil {
				return false
			}
			inner := p[res.Start:res.End]
			if len(inner) < 28 || inner[0] != 0x45 || inner[9] != 17 {
				return false
			}
			a := tx.Addr.(*net.UDPAddr)
			copy(a.IP, inner[16:20])
			a.Port = int(binary.BigEndian.Uint16(inner[22:]))
			tx.Buffers[0] = inner[28:]
			return true
		},
	}
	return r.socketStart(loop, r.tp.pub, r.tp.co, r.nw.Core.Port(), sender{r.tp.phone, r.phoneG, true, false}, nil,
		func(st socketStats) string {
			return fmt.Sprintf("recvmmsg/sendmmsg ×%d, esp.Transform.Open, one goroutine on CPU %d; opened %d, open errors %d, socket drops %d",
				baselineBatch, GwCPU, st.done, st.bad, st.sockDrops)
		})
}

// The encap baseline: the phones' inner addresses
// (100.64.0.0/10) are made local to the gateway namespace (`ip route add
// local`), so one UDP socket on port 5060 receives the core's cleartext
// for all of them, learning each datagram's destination from IP_PKTINFO;
// the datagram is rebuilt as an inner IPv4/UDP packet, sealed
// (esp.Transform.Seal) under the outbound SA of its destination and sent to the
// phone's 4500.
//
// startBaselineEncap starts the encap socket baseline with n SAs on the
// runner's topology; the core's ring must hold cleartext frames.
func (r *runner) startBaselineEncap(n int) (*session, error) {
	sas := make(map[[4]byte]*esp.Transform, n)
	for i := range n {
		key, err := pktgen.KeyBytes('o', i)
		if err != nil {
			return nil, err
		}
		s, err := r.baselineSA(i, esp.Config{SPI: pktgen.OutSPIBase + uint32(i), Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
		if err != nil {
			return nil, err
		}
		sas[pktgen.Inner(i).As4()] = s
	}
	if _, err := r.tp.gw.Run("ip", "route", "add", "local", "100.64.0.0/10", "dev", "lo"); err != nil {
		return nil, err
	}
	unroute := func() { r.tp.gw.Run("ip", "route", "del", "local", "100.64.0.0/10", "dev", "lo") }

	phone := &net.UDPAddr{IP: net.IP(r.nw.Phone.AsSlice()), Port: int(r.nw.PhonePort)}
	bufs := make([][]byte, baselineBatch)
	var cm ipv4.ControlMessage
	loop := &socketLoop{
		in:      &net.UDPAddr{Port: int(r.nw.Core.Port())},
		out:     &net.UDPAddr{IP: net.IP(r.nw.Gateway.AsSlice()), Port: esp.NATTPort},
		pktinfo: true,
		setup: func(i int, rx, tx *ipv4.Message) {
			bufs[i] = make([]byte, 2048)
			tx.Addr = phone
		},
		each: func(k int, rx, tx *ipv4.Message) bool {
			if err := cm.Parse(rx.OOB[:rx.NN]); err != nil || cm.Dst == nil {
				return false
			}
			dst := [4]byte(cm.Dst.To4())
			s := sas[dst]
			from, ok := rx.Addr.(*net.UDPAddr)
			if s == nil || !ok {
				return false
			}
			// The inner packet as the core sent it: IPv4/UDP from the
			// core to the phone's inner address.
			const hr = 64
			payload := rx.Buffers[0][:rx.N]
			buf := bufs[k]
			ip := buf[hr : hr+28+len(payload)]
			clear(ip[:28])
			ip[0], ip[8], ip[9] = 0x45, 64, 17
			binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
			copy(ip[12:16], from.IP.To4())
			copy(ip[16:20], dst[:])
			binary.BigEndian.PutUint16(ip[10:], pkt.Checksum(ip[:20]))
			binary.BigEndian.PutUint16(ip[20:], uint16(from.Port))
			binary.BigEndian.PutUint16(ip[22:], r.nw.Core.Port())
			binary.BigEndian.PutUint16(ip[24:], uint16(8+len(payload)))
			copy(ip[28:], payload)
			start, end, err := s.Seal(buf, hr, len(ip), esp.NextHeaderIPv4, 0)
			if err != nil {
				return false
			}
			tx.Buffers[0] = buf[start:end]
			return true
		},
	}
	return r.socketStart(loop, r.tp.priv, r.tp.ph, esp.NATTPort, sender{r.tp.core, r.coreG, false, false}, closers{unroute},
		func(st socketStats) string {
			return fmt.Sprintf("recvmmsg (IP_PKTINFO)/sendmmsg ×%d, esp.Transform.Seal, one goroutine on CPU %d; sealed %d, unroutable %d, socket drops %d",
				baselineBatch, GwCPU, st.done, st.bad, st.sockDrops)
		})
}

// socketStart starts one socket baseline as a session: an XDP_PASS
// program on the gateway's receiving end (the generator's XDP_TX arrives
// only at an end with an XDP program, docs/platform.md), a counter for
// countPort on the far end, the loop running in the gateway namespace;
// s sends to it. undo holds the caller's teardown steps taken before
// (run last, also when starting fails); note describes the loop's counts
// at the end.
func (r *runner) socketStart(loop *socketLoop, rxEnd, farEnd end, countPort uint16, s sender, undo closers, note func(socketStats) string) (_ *session, err error) {
	defer func() {
		if err != nil {
			undo.run()
		}
	}()
	pass, err := xsktest.NewVerdict(2)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { pass.Close() })
	l, err := attach(rxEnd, pass)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { l.Close() })
	c, err := gen.NewCounter(countPort)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { c.Close() })
	lc, err := attach(farEnd, c.Prog)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { lc.Close() })
	if err := loop.start(r.tp.gw); err != nil {
		return nil, err
	}
	return &session{senders: []sender{s}, count: counterOf(c), stop: func() (string, error) {
		st := loop.close()
		undo.run()
		return note(st), loop.err
	}}, nil
}

// socketLoop is a socket baseline's gateway: one goroutine, locked to a
// thread pinned to GwCPU, reads batches from a UDP socket on in with
// recvmmsg, turns each datagram into at most one outgoing datagram with
// each, and writes them from a socket on out with sendmmsg.
//
// The sockets are blocking and the loop calls recvmmsg and sendmmsg
// itself, on a thread holding a P of its own (internal/procs) — the
// scheduling xesp's worker gets. Through Go's netpoller (net.UDPConn and
// x/net/ipv4's ReadBatch, the first version) every empty read parked the
// goroutine and a wakeup took two thread switches; once the bench process
// held extra Ps for its packet loops, that cost the baseline 1.5× the CPU
// per packet (5.4 → 8.5 µs, decap 200 B, same run). A baseline made slower
// by the harness would flatter xesp.
type socketLoop struct {
	in, out *net.UDPAddr
	pktinfo bool // ask for each datagram's destination (IP_PKTINFO)
	// setup prepares message i of the batch once; each fills tx, the
	// batch's k-th outgoing message, from rx and reports whether there is
	// something to send (else rx is counted bad). Of rx the loop fills
	// Buffers[0][:N], OOB[:NN] and Addr (a *net.UDPAddr); of tx it reads
	// Buffers[0] and Addr (a *net.UDPAddr).
	setup func(i int, rx, tx *ipv4.Message)
	each  func(k int, rx, tx *ipv4.Message) bool

	inFd, outFd int // -1: not open
	stop        atomic.Bool
	wg          sync.WaitGroup
	done, bad   atomic.Uint64
	err         error
}

type socketStats struct{ done, bad, sockDrops uint64 }

// socketRecvTimeout bounds one blocking recvmmsg, so the loop sees stop.
const socketRecvTimeout = 50 * time.Millisecond

// udpSocket is a blocking IPv4 UDP socket bound to a.
func udpSocket(a *net.UDPAddr) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	sa := &unix.SockaddrInet4{Port: a.Port}
	if ip4 := a.IP.To4(); ip4 != nil {
		sa.Addr = [4]byte(ip4)
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind %v: %w", a, err)
	}
	return fd, nil
}

func (b *socketLoop) start(ns *netns.NS) (err error) {
	b.inFd, b.outFd = -1, -1
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if err := ns.Do(func() (err error) {
		if b.inFd, err = udpSocket(b.in); err != nil {
			return err
		}
		b.outFd, err = udpSocket(b.out)
		return err
	}); err != nil {
		return err
	}
	// A large receive buffer, as anyone tuning this path would set.
	if err := unix.SetsockoptInt(b.inFd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); err != nil {
		return fmt.Errorf("SO_RCVBUFFORCE: %w", err)
	}
	tv := unix.NsecToTimeval(socketRecvTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(b.inFd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("SO_RCVTIMEO: %w", err)
	}
	if b.pktinfo {
		if err := unix.SetsockoptInt(b.inFd, unix.IPPROTO_IP, unix.IP_PKTINFO, 1); err != nil {
			return fmt.Errorf("IP_PKTINFO: %w", err)
		}
	}
	rx := make([]ipv4.Message, baselineBatch)
	tx := make([]ipv4.Message, baselineBatch)
	from := make([]net.UDPAddr, baselineBatch)
	for i := range rx {
		rx[i].Buffers = [][]byte{make([]byte, 2048)}
		if b.pktinfo {
			rx[i].OOB = ipv4.NewControlMessage(ipv4.FlagDst)
		}
		from[i].IP = make(net.IP, 4)
		rx[i].Addr = &from[i]
		tx[i].Buffers = [][]byte{nil}
		b.setup(i, &rx[i], &tx[i])
	}
	var (
		rxHdr  = make([]unix.Mmsghdr, baselineBatch)
		rxIov  = make([]unix.Iovec, baselineBatch)
		rxName = make([]unix.RawSockaddrInet4, baselineBatch)
		txHdr  = make([]unix.Mmsghdr, baselineBatch)
		txIov  = make([]unix.Iovec, baselineBatch)
		txName = make([]unix.RawSockaddrInet4, baselineBatch)
	)
	for i := range rxHdr {
		rxIov[i].Base = &rx[i].Buffers[0][0]
		rxIov[i].SetLen(len(rx[i].Buffers[0]))
		rxHdr[i].Hdr.Iov = &rxIov[i]
		rxHdr[i].Hdr.SetIovlen(1)
		rxHdr[i].Hdr.Name = (*byte)(unsafe.Pointer(&rxName[i]))
		if len(rx[i].OOB) > 0 {
			rxHdr[i].Hdr.Control = &rx[i].OOB[0]
		}
		txHdr[i].Hdr.Iov = &txIov[i]
		txHdr[i].Hdr.SetIovlen(1)
		txHdr[i].Hdr.Name = (*byte)(unsafe.Pointer(&txName[i]))
		txHdr[i].Hdr.Namelen = unix.SizeofSockaddrInet4
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer procs.Reserve()()
		if _, err := gen.PinThread(GwCPU); err != nil {
			b.err = err
			return
		}
		for !b.stop.Load() {
			// msg_namelen and msg_controllen are value-result: reset.
			for i := range rxHdr {
				rxHdr[i].Hdr.Namelen = unix.SizeofSockaddrInet4
				rxHdr[i].Hdr.SetControllen(len(rx[i].OOB))
			}
			r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(b.inFd), uintptr(unsafe.Pointer(&rxHdr[0])), uintptr(len(rxHdr)), 0, 0, 0)
			if errno != 0 {
				if errno == unix.EAGAIN || errno == unix.EINTR {
					continue
				}
				if !b.stop.Load() {
					b.err = fmt.Errorf("recvmmsg: %w", errno)
				}
				return
			}
			got := int(r)
			k := 0
			for i := range got {
				rx[i].N = int(rxHdr[i].Len)
				rx[i].NN = int(rxHdr[i].Hdr.Controllen)
				copy(from[i].IP, rxName[i].Addr[:])
				from[i].Port = int(binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&rxName[i].Port))[:]))
				if !b.each(k, &rx[i], &tx[k]) {
					b.bad.Add(1)
					continue
				}
				p := tx[k].Buffers[0]
				a := tx[k].Addr.(*net.UDPAddr)
				txIov[k].Base = unsafe.SliceData(p)
				txIov[k].SetLen(len(p))
				txName[k].Family = unix.AF_INET
				binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&txName[k].Port))[:], uint16(a.Port))
				txName[k].Addr = [4]byte(a.IP.To4())
				k++
			}
			b.done.Add(uint64(k))
			for sent := 0; sent < k; {
				w, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(b.outFd), uintptr(unsafe.Pointer(&txHdr[sent])), uintptr(k-sent), 0, 0, 0)
				if errno == unix.EINTR {
					continue
				}
				if errno != 0 {
					b.err = fmt.Errorf("sendmmsg: %w", errno)
					return
				}
				sent += int(w)
			}
		}
	}()
	return nil
}

func (b *socketLoop) close() socketStats {
	b.stop.Store(true)
	b.wg.Wait()
	st := socketStats{done: b.done.Load(), bad: b.bad.Load()}
	if b.inFd >= 0 {
		// SO_MEMINFO's SK_MEMINFO_DROPS: datagrams the full receive
		// buffer turned away.
		var mi [9]uint32
		l := uint32(len(mi) * 4)
		if _, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(b.inFd), unix.SOL_SOCKET, unix.SO_MEMINFO,
			uintptr(unsafe.Pointer(&mi)), uintptr(unsafe.Pointer(&l)), 0); e == 0 {
			st.sockDrops = uint64(mi[unix.SK_MEMINFO_DROPS])
		}
		unix.Close(b.inFd)
		b.inFd = -1
	}
	if b.outFd >= 0 {
		unix.Close(b.outFd)
		b.outFd = -1
	}
	return st
}
