package harness

import (
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/procs"
	"github.com/xesp/xesp/lab/xsktest"
)

// ceilingTests are the ceilings, per size: the gateway's public link
// (ESP frames from the phone) and private link (cleartext from the core),
// and the crypto alone.
var ceilingTests = []struct{ test, link string }{
	{"xdp_drop", "public"}, {"afxdp_rx", "public"}, {"afxdp_reflect", "public"},
	{"xdp_drop", "private"}, {"afxdp_rx", "private"}, {"afxdp_reflect", "private"},
	{"aead_open", ""}, {"aead_seal", ""},
}

// ceilingFlows is how many SAs the link ceilings' ESP frames use: the
// links do not look inside, so the count only keeps frames distinct.
const ceilingFlows = 64

// ceilFlows is how many flows the link ceilings send: ceilingFlows,
// or all the generator has if fewer — whatever the scenario's SA count.
func (r *runner) ceilFlows() int { return min(len(r.flows), ceilingFlows) }

func (r *runner) ceilings(size string, sz gen.Sizes) error {
	r.ceilSizes = sz
	if err := r.loadPhone(sz, min(len(r.flows), ceilingFlows)); err != nil {
		return err
	}
	if err := r.loadCore(sz, min(len(r.clear), ceilingFlows)); err != nil {
		return err
	}
	for _, c := range ceilingTests {
		res := Result{Name: ceilingName(c.test, c.link, size), Group: "ceiling", Test: c.test, Link: c.link, Size: size}
		var err error
		switch c.test {
		case "aead_open", "aead_seal":
			res.PPS, err = bareAEAD(c.test == "aead_open", sz)
			res.Note = fmt.Sprintf("AES-128-GCM (Go crypto/cipher) on the inner bytes, one thread pinned to CPU %d", GwCPU)
		default:
			res, err = r.linkCeiling(res)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", res.Name, err)
		}
		r.add(res)
	}
	return nil
}

func (r *runner) linkCeiling(res Result) (Result, error) {
	e, s, port := r.tp.pub, sender{r.tp.phone, r.phoneG, true, false}, uint16(esp.NATTPort)
	if res.Link == "private" {
		e, s, port = r.tp.priv, sender{r.tp.core, r.coreG, false, false}, r.nw.Core.Port()
	}
	switch res.Test {
	case "xdp_drop":
		c, err := gen.NewCounter(port)
		if err != nil {
			return res, err
		}
		defer c.Close()
		l, err := attach(e, c.Prog)
		if err != nil {
			return res, err
		}
		defer l.Close()
		p, err := r.measure([]sender{s}, counterOf(c))
		res = p.result(res)
		res.Note = "XDP counter and XDP_DROP on the gateway's link"
		return res, err
	case "afxdp_reflect":
		ss, err := r.startReflect(res.Link)
		if err != nil {
			return res, err
		}
		p, err := r.measure(ss.senders, ss.count)
		res = p.result(res)
		if err == nil && r.o.NDR {
			err = r.ndr(&res, res.Link == "private", r.ceilFlows(), r.ceilSizes, ss.count)
			if err == nil && r.o.Latency {
				// Reflected back to the sender: ESP on the public link,
				// cleartext on the private one.
				err = r.latency(&res, res.Link == "private", res.Link == "public", r.ceilFlows(), r.ceilSizes, ss.stamps)
			}
		}
		note, cerr := ss.close()
		res.Note = note
		return res, errors.Join(err, cerr)
	case "afxdp_rx":
		a, err := startAFXDP(e, port, false)
		if err != nil {
			return res, err
		}
		p, err := r.measure([]sender{s}, a.count)
		st, _ := a.s.Stats()
		a.close()
		res = p.result(res)
		res.Note = fmt.Sprintf("one copy-mode socket, loop on CPU %d, no crypto; rx dropped %d, fill empty %d", GwCPU, st.RxDropped+st.RxRingFull, st.RxFillRingEmptyDescs)
		return res, err
	}
	return res, fmt.Errorf("unknown ceiling %s", res.Test)
}

// startReflect starts the reflect ceiling on link ("public": ESP frames
// from the phone, "private": cleartext from the core): one AF_XDP socket
// on the gateway's end that transmits every frame it receives back out,
// counted when it arrives back at the sender's end.
func (r *runner) startReflect(link string) (_ *session, err error) {
	return r.startReflectOn(r.tp, link)
}

// startReflectOn is startReflect on tp; its senders (the live-frames
// generators, for saturation) exist on the main topology only.
func (r *runner) startReflectOn(tp *topo, link string) (_ *session, err error) {
	e, s, port, far := tp.pub, sender{tp.phone, r.phoneG, true, false}, uint16(esp.NATTPort), tp.ph
	if link == "private" {
		e, s, port, far = tp.priv, sender{tp.core, r.coreG, false, false}, r.nw.Core.Port(), tp.co
	}
	if tp != r.tp {
		s = sender{}
	}
	var undo closers
	defer func() {
		if err != nil {
			undo.run()
		}
	}()
	c, err := gen.NewStampCounter(port, stampRingBytes)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { c.Close() })
	l, err := attach(far, c.Prog)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { l.Close() })
	a, err := startAFXDP(e, port, true)
	if err != nil {
		return nil, err
	}
	return &session{senders: []sender{s}, count: counterOf(c), stamps: c, stop: func() (string, error) {
		st, _ := a.s.Stats()
		a.close()
		undo.run()
		return fmt.Sprintf("RX → TX on one copy-mode socket, loop on CPU %d, no crypto, counted at the sender's end; rx dropped %d, fill empty %d",
			GwCPU, st.RxDropped+st.RxRingFull, st.RxFillRingEmptyDescs), a.err
	}}, nil
}

// afxdp is the AF_XDP ceiling: one socket on the link's queue 0 behind a
// steering program for port, a loop on GwCPU that takes frames and either
// gives them straight back to the fill ring (receive-only) or transmits
// them back out of the link (reflect).
type afxdp struct {
	u        *xsk.UMEM
	s        *xsk.Socket
	st       *xsktest.Steer
	l        link.Link
	stop     atomic.Bool
	received atomic.Uint64
	wg       sync.WaitGroup
	err      error
}

func startAFXDP(e end, port uint16, reflect bool) (_ *afxdp, err error) {
	// The gateway's own UMEM and ring sizes (config defaults), so the
	// ceiling and xesp absorb bursts alike.
	d := config.Defaults().UMEM
	u, err := xsk.New(xsk.Config{FrameSize: uint32(d.FrameSize), FrameCount: uint32(d.Frames),
		FillSize: uint32(d.FillRing), CompletionSize: uint32(d.CompletionRing), RxSize: uint32(d.RXRing), TxSize: uint32(d.TXRing)})
	if err != nil {
		return nil, err
	}
	a := &afxdp{u: u}
	defer func() {
		if err != nil {
			a.close()
		}
	}()
	if a.st, err = xsktest.NewSteer(port, 1, 1); err != nil {
		return nil, err
	}
	if err := e.ns.Do(func() (err error) { a.s, err = u.Open(e.index, 0); return err }); err != nil {
		return nil, err
	}
	if err := a.st.Set(0, 0, a.s.FD()); err != nil {
		return nil, err
	}
	if a.l, err = attach(e, a.st.Prog); err != nil {
		return nil, err
	}
	p := u.NewPool()
	if _, err := a.s.Refill(p, 0); err != nil {
		return nil, err
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer procs.Reserve()() // as the worker's, so the ceiling shares its scheduling
		if _, err := gen.PinThread(GwCPU); err != nil {
			a.err = err
			return
		}
		// The worker's loop shape (dataplane/worker): batches of 64,
		// and after 256 empty turns a poll(2) sleep, so under a loaded
		// scheduler the ceiling competes for its CPU as a worker does.
		batch := make([]xsk.Desc, 64)
		fds := []unix.PollFd{{Fd: int32(a.s.FD()), Events: unix.POLLIN}}
		idle := 0
		for !a.stop.Load() {
			n := a.s.Receive(batch)
			if n == 0 && a.s.TxPending() == 0 {
				if idle++; idle >= 256 {
					idle = 0
					unix.Poll(fds, 10)
				}
			} else {
				idle = 0
			}
			if n > 0 {
				a.received.Add(uint64(n))
				if reflect {
					t, _ := a.s.Transmit(batch[:n])
					if t < n {
						p.PutDescs(batch[t:n])
					}
				} else {
					p.PutDescs(batch[:n])
				}
			}
			if reflect {
				if a.s.TxPending() > 0 {
					a.s.Kick()
				}
				a.s.Complete(p)
			}
			a.s.Refill(p, 0)
		}
		p.Close()
	}()
	return a, nil
}

func (a *afxdp) count() (uint64, error) { return a.received.Load(), a.err }

func (a *afxdp) close() {
	a.stop.Store(true)
	a.wg.Wait()
	if a.l != nil {
		a.l.Close()
	}
	if a.s != nil {
		a.st.Clear(0, 0)
		a.s.Close()
	}
	if a.st != nil {
		a.st.Close()
	}
	a.u.Close()
}

// bareAEAD is the crypto ceiling: AES-128-GCM open (or seal) of the
// inner packet's bytes, in place, one thread pinned to GwCPU, with the
// cipher built once — the work ESP cannot avoid, without headers,
// lookups or replay checks. IMIX cycles through its pattern.
func bareAEAD(open bool, sz gen.Sizes) (float64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	restore, err := gen.PinThread(GwCPU)
	if err != nil {
		return 0, err
	}
	defer restore()
	blk, err := aes.NewCipher(make([]byte, 16))
	if err != nil {
		return 0, err
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		return 0, err
	}
	pattern := sz.Pattern()
	var nonce [12]byte
	var aad [8]byte
	sealed := make([][]byte, len(pattern))
	for i, n := range pattern {
		sealed[i] = aead.Seal(nil, nonce[:], make([]byte, n), aad[:])
	}
	buf := make([]byte, 4096)
	const batch = 1024
	ops := 0
	start := time.Now()
	for time.Since(start) < 300*time.Millisecond {
		for i := range batch {
			j := i % len(pattern)
			if open {
				copy(buf, sealed[j])
				if _, err := aead.Open(buf[:0], nonce[:], buf[:len(sealed[j])], aad[:]); err != nil {
					return 0, err
				}
			} else {
				aead.Seal(buf[:0], nonce[:], buf[:pattern[j]], aad[:])
			}
		}
		ops += batch
	}
	return float64(ops) / time.Since(start).Seconds(), nil
}
