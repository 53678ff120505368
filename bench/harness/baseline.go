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
	"github.com/xesp/xesp/lab/xsktest"
)

// baselineBatch is the recvmmsg/sendmmsg batch, the worker's batch size.
const baselineBatch = 64

// baseline measures the decap path a Go user would write without XDP:
// a UDP socket on the gateway's 4500 read with recvmmsg, each datagram
// opened by the same ESP engine (esp.SA.Open: replay check, AES-GCM,
// padding) under the SA its SPI names, and the inner UDP payload sent on
// to its inner destination with sendmmsg; counted at the core like
// xesp's decap. The loop runs on GwCPU; the kernel's receive path runs in
// the generator's softirq on GenCPU, as XDP does for xesp.
func (r *runner) baseline(size string, sz gen.Sizes, n int) error {
	if err := r.loadPhone(sz, n); err != nil {
		return err
	}
	ss, err := r.startBaselineDecap(n)
	if err != nil {
		return err
	}
	p, err := r.measure(ss.senders, ss.count)
	note, cerr := ss.close()
	if err = errors.Join(err, cerr); err != nil {
		return err
	}
	res := p.result(Result{Name: baselineName("decap", size, n), Group: "baseline", Test: "udp_sockets", Dir: "decap", Size: size, SAs: n, Workers: 1})
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
	once    sync.Once
	note    string
	err     error
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

// startBaselineDecap starts the decap socket baseline with n SAs on the
// runner's topology; the phone's ring must hold ESP frames.
func (r *runner) startBaselineDecap(n int) (_ *session, err error) {
	var undo closers
	defer func() {
		if err != nil {
			undo.run()
		}
	}()
	// The stack needs an XDP program on the gateway's end for the
	// generator's XDP_TX to arrive at all (PLATFORM.md): XDP_PASS.
	pass, err := xsktest.NewVerdict(2)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { pass.Close() })
	l, err := attach(r.tp.pub, pass)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { l.Close() })
	c, err := gen.NewCounter(r.nw.Core.Port())
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { c.Close() })
	lc, err := attach(r.tp.co, c.Prog)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { lc.Close() })
	b, err := startSocketGateway(r, n)
	if err != nil {
		return nil, err
	}
	return &session{senders: []sender{{r.tp.phone, r.phoneG, true}}, count: counterOf(c), stop: func() (string, error) {
		st := b.close()
		undo.run()
		return fmt.Sprintf("recvmmsg/sendmmsg ×%d, esp.SA.Open, one goroutine on CPU %d; opened %d, open errors %d, socket drops %d",
			baselineBatch, GwCPU, st.opened, st.bad, st.sockDrops), b.err
	}}, nil
}

type socketGateway struct {
	in, out *net.UDPConn
	stop    atomic.Bool
	wg      sync.WaitGroup
	opened  atomic.Uint64
	bad     atomic.Uint64
	err     error
}

type socketStats struct{ opened, bad, sockDrops uint64 }

func startSocketGateway(r *runner, n int) (_ *socketGateway, err error) {
	sas := make(map[uint32]*esp.SA, n)
	for i := range n {
		key, err := pktgen.KeyBytes('i', i)
		if err != nil {
			return nil, err
		}
		s, err := esp.NewSA(esp.Config{SPI: pktgen.InSPIBase + uint32(i), Proposal: esp.AES128GCM16, EncKey: key,
			Mode: esp.ModeTunnel, ReplayWindow: esp.DefaultReplayWindow})
		if err != nil {
			return nil, err
		}
		sas[s.SPI()] = s
	}
	b := &socketGateway{}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if err := r.tp.gw.Do(func() (err error) {
		if b.in, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IP(r.nw.Gateway.AsSlice()), Port: esp.NATTPort}); err != nil {
			return err
		}
		b.out, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 0, 0, 254)})
		return err
	}); err != nil {
		return nil, err
	}
	// A large receive buffer, as anyone tuning this path would set.
	if rc, err := b.in.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20) })
	}
	in, out := ipv4.NewPacketConn(b.in), ipv4.NewPacketConn(b.out)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if _, err := gen.PinThread(GwCPU); err != nil {
			b.err = err
			return
		}
		rx := make([]ipv4.Message, baselineBatch)
		tx := make([]ipv4.Message, baselineBatch)
		addrs := make([]net.UDPAddr, baselineBatch)
		for i := range rx {
			rx[i].Buffers = [][]byte{make([]byte, 2048)}
			tx[i].Buffers = [][]byte{nil}
			addrs[i].IP = make(net.IP, 4)
			tx[i].Addr = &addrs[i]
		}
		for !b.stop.Load() {
			b.in.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
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
				pkt := rx[i].Buffers[0][:rx[i].N]
				if len(pkt) < 8 {
					b.bad.Add(1)
					continue
				}
				s := sas[binary.BigEndian.Uint32(pkt)]
				if s == nil {
					b.bad.Add(1)
					continue
				}
				res, err := s.Open(pkt)
				if err != nil {
					b.bad.Add(1)
					continue
				}
				inner := pkt[res.Start:res.End]
				if len(inner) < 28 || inner[0] != 0x45 || inner[9] != 17 {
					b.bad.Add(1)
					continue
				}
				copy(addrs[k].IP, inner[16:20])
				addrs[k].Port = int(binary.BigEndian.Uint16(inner[22:]))
				tx[k].Buffers[0] = inner[28:]
				k++
			}
			b.opened.Add(uint64(k))
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
	return b, nil
}

func (b *socketGateway) close() socketStats {
	b.stop.Store(true)
	b.wg.Wait()
	st := socketStats{opened: b.opened.Load(), bad: b.bad.Load()}
	if b.in != nil {
		if rc, err := b.in.SyscallConn(); err == nil {
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
		b.in.Close()
	}
	if b.out != nil {
		b.out.Close()
	}
	return st
}
