package harness

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
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

// The socket baselines measure what a Go user would write without XDP: the
// same ESP engine behind plain UDP sockets, one goroutine on GwCPU reading
// with recvmmsg and writing with sendmmsg (socketLoop), counted at the far
// end like xesp. The kernel's receive path runs in the generator's softirq
// on GenCPU, as XDP does for xesp.

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
type socketLoop struct {
	in, out *net.UDPAddr
	pktinfo bool // ask for each datagram's destination (IP_PKTINFO)
	// setup prepares message i of the batch once; each fills tx, the
	// batch's k-th outgoing message, from rx and reports whether there is
	// something to send (else rx is counted bad).
	setup func(i int, rx, tx *ipv4.Message)
	each  func(k int, rx, tx *ipv4.Message) bool

	inC, outC *net.UDPConn
	stop      atomic.Bool
	wg        sync.WaitGroup
	done, bad atomic.Uint64
	err       error
}

type socketStats struct{ done, bad, sockDrops uint64 }

func (b *socketLoop) start(ns *netns.NS) (err error) {
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if err := ns.Do(func() (err error) {
		if b.inC, err = net.ListenUDP("udp4", b.in); err != nil {
			return err
		}
		b.outC, err = net.ListenUDP("udp4", b.out)
		return err
	}); err != nil {
		return err
	}
	// A large receive buffer, as anyone tuning this path would set.
	if rc, err := b.inC.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20) })
	}
	in, out := ipv4.NewPacketConn(b.inC), ipv4.NewPacketConn(b.outC)
	if b.pktinfo {
		if err := in.SetControlMessage(ipv4.FlagDst, true); err != nil {
			return err
		}
	}
	rx := make([]ipv4.Message, baselineBatch)
	tx := make([]ipv4.Message, baselineBatch)
	for i := range rx {
		rx[i].Buffers = [][]byte{make([]byte, 2048)}
		if b.pktinfo {
			rx[i].OOB = ipv4.NewControlMessage(ipv4.FlagDst)
		}
		tx[i].Buffers = [][]byte{nil}
		b.setup(i, &rx[i], &tx[i])
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer procs.Reserve()() // as the worker's, so the baseline shares its scheduling
		if _, err := gen.PinThread(GwCPU); err != nil {
			b.err = err
			return
		}
		for !b.stop.Load() {
			b.inC.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			got, err := in.ReadBatch(rx, 0)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					continue
				}
				if !b.stop.Load() {
					b.err = err
				}
				return
			}
			k := 0
			for i := range got {
				if b.each(k, &rx[i], &tx[k]) {
					k++
				} else {
					b.bad.Add(1)
				}
			}
			b.done.Add(uint64(k))
			for sent := 0; sent < k; {
				w, err := out.WriteBatch(tx[sent:k], 0)
				if err != nil {
					b.err = err
					return
				}
				sent += w
			}
		}
	}()
	return nil
}

func (b *socketLoop) close() socketStats {
	b.stop.Store(true)
	b.wg.Wait()
	st := socketStats{done: b.done.Load(), bad: b.bad.Load()}
	if b.inC != nil {
		if rc, err := b.inC.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) {
				// SO_MEMINFO's SK_MEMINFO_DROPS: datagrams the full
				// receive buffer turned away.
				var mi [9]uint32
				l := uint32(len(mi) * 4)
				if _, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_MEMINFO,
					uintptr(unsafe.Pointer(&mi)), uintptr(unsafe.Pointer(&l)), 0); e == 0 {
					st.sockDrops = uint64(mi[unix.SK_MEMINFO_DROPS])
				}
			})
		}
		b.inC.Close()
	}
	if b.outC != nil {
		b.outC.Close()
	}
	return st
}
