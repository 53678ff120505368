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

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/internal/pkt"
	"github.com/xesp/xesp/lab/xsktest"
)

// baselineEncap is the encap direction of the socket baseline: the
// phones' inner addresses (100.64.0.0/10) are made local to the gateway
// namespace (`ip route add local`), so one UDP socket on port 5060
// receives the core's cleartext for all of them with recvmmsg, learning
// each datagram's destination from IP_PKTINFO; the datagram is rebuilt as
// an inner IPv4/UDP packet, sealed by the same ESP engine (esp.SA.Seal)
// under the outbound SA of its destination, and sent to the phone's
// 4500 with sendmmsg. Counted at the phone like xesp's encap.
func (r *runner) baselineEncap(size string, sz gen.Sizes, n int) error {
	if err := r.loadCore(sz, n); err != nil {
		return err
	}
	ss, err := r.startBaselineEncap(n)
	if err != nil {
		return err
	}
	p, err := r.measure(ss.senders, ss.count)
	note, cerr := ss.close()
	if err = errors.Join(err, cerr); err != nil {
		return err
	}
	res := p.result(Result{Name: baselineName("encap", size, n), Group: "baseline", Test: "udp_sockets", Dir: "encap", Size: size, SAs: n, Workers: 1})
	res.Note = note
	r.add(res)
	return nil
}

// startBaselineEncap starts the encap socket baseline with n SAs on the
// runner's topology; the core's ring must hold cleartext frames.
func (r *runner) startBaselineEncap(n int) (_ *session, err error) {
	var undo closers
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
	l, err := attach(r.tp.priv, pass)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { l.Close() })
	c, err := gen.NewCounter(esp.NATTPort)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { c.Close() })
	lc, err := attach(r.tp.ph, c.Prog)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { lc.Close() })
	if _, err := r.tp.gw.Run("ip", "route", "add", "local", "100.64.0.0/10", "dev", "lo"); err != nil {
		return nil, err
	}
	undo = append(undo, func() { r.tp.gw.Run("ip", "route", "del", "local", "100.64.0.0/10", "dev", "lo") })
	b, err := startSocketEncap(r, n)
	if err != nil {
		return nil, err
	}
	return &session{senders: []sender{{r.tp.core, r.coreG, false}}, count: counterOf(c), stop: func() (string, error) {
		sealed, bad := b.close()
		undo.run()
		return fmt.Sprintf("recvmmsg (IP_PKTINFO)/sendmmsg ×%d, esp.SA.Seal, one goroutine on CPU %d; sealed %d, unroutable %d",
			baselineBatch, GwCPU, sealed, bad), b.err
	}}, nil
}

type socketEncap struct {
	in, out     *net.UDPConn
	stop        atomic.Bool
	wg          sync.WaitGroup
	sealed, bad atomic.Uint64
	err         error
}

func startSocketEncap(r *runner, n int) (_ *socketEncap, err error) {
	sas := make(map[[4]byte]*esp.SA, n)
	for i := range n {
		key, err := pktgen.KeyBytes('o', i)
		if err != nil {
			return nil, err
		}
		s, err := esp.NewSA(esp.Config{SPI: pktgen.OutSPIBase + uint32(i), Proposal: esp.AES128GCM16, EncKey: key, Mode: esp.ModeTunnel})
		if err != nil {
			return nil, err
		}
		sas[pktgen.Inner(i).As4()] = s
	}
	b := &socketEncap{}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if err := r.tp.gw.Do(func() (err error) {
		if b.in, err = net.ListenUDP("udp4", &net.UDPAddr{Port: int(r.nw.Core.Port())}); err != nil {
			return err
		}
		b.out, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IP(r.nw.Gateway.AsSlice()), Port: esp.NATTPort})
		return err
	}); err != nil {
		return nil, err
	}
	if rc, err := b.in.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20) })
	}
	in, out := ipv4.NewPacketConn(b.in), ipv4.NewPacketConn(b.out)
	if err := in.SetControlMessage(ipv4.FlagDst, true); err != nil {
		return nil, err
	}
	phone := &net.UDPAddr{IP: net.IP(r.nw.Phone.AsSlice()), Port: int(r.nw.PhonePort)}
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
		bufs := make([][]byte, baselineBatch)
		for i := range rx {
			rx[i].Buffers = [][]byte{make([]byte, 2048)}
			rx[i].OOB = ipv4.NewControlMessage(ipv4.FlagDst)
			bufs[i] = make([]byte, 2048)
			tx[i].Buffers = [][]byte{nil}
			tx[i].Addr = phone
		}
		var cm ipv4.ControlMessage
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
				if err := cm.Parse(rx[i].OOB[:rx[i].NN]); err != nil || cm.Dst == nil {
					b.bad.Add(1)
					continue
				}
				dst := [4]byte(cm.Dst.To4())
				s := sas[dst]
				from, ok := rx[i].Addr.(*net.UDPAddr)
				if s == nil || !ok {
					b.bad.Add(1)
					continue
				}
				// The inner packet as the core sent it: IPv4/UDP from
				// the core to the phone's inner address.
				const hr = 64
				payload := rx[i].Buffers[0][:rx[i].N]
				buf := bufs[k]
				ip := buf[hr : hr+28+len(payload)]
				clear(ip[:28])
				ip[0], ip[8], ip[9] = 0x45, 64, 17
				binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
				copy(ip[12:16], from.IP.To4())
				copy(ip[16:20], dst[:])
				binary.BigEndian.PutUint16(ip[10:], ^pkt.Fold(pkt.Sum(ip[:20], 0)))
				binary.BigEndian.PutUint16(ip[20:], uint16(from.Port))
				binary.BigEndian.PutUint16(ip[22:], r.nw.Core.Port())
				binary.BigEndian.PutUint16(ip[24:], uint16(8+len(payload)))
				copy(ip[28:], payload)
				start, end, err := s.Seal(buf, hr, len(ip), esp.NextHeaderIPv4, 0)
				if err != nil {
					b.bad.Add(1)
					continue
				}
				tx[k].Buffers[0] = buf[start:end]
				k++
			}
			b.sealed.Add(uint64(k))
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

func (b *socketEncap) close() (sealed, bad uint64) {
	b.stop.Store(true)
	b.wg.Wait()
	if b.in != nil {
		b.in.Close()
	}
	if b.out != nil {
		b.out.Close()
	}
	return b.sealed.Load(), b.bad.Load()
}
