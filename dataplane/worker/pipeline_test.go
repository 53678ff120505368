package worker

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// The decap and encap pipelines on frames built in a UMEM (plain memory
// until a socket registers it: no root, no sockets, no kernel): output
// bytes, per-SA counters, per-direction drop reasons and bindings.

var (
	pipeKey    = []byte("0123456789abcdefSALT") // AES-128 key + 4-byte GCM salt
	pipePhone  = netip.MustParseAddr("192.0.2.10")
	pipeGW     = netip.MustParseAddr("192.0.2.1")
	pipeInner  = netip.MustParseAddrPort("100.64.0.1:5060") // the phone's inner address
	pipeCore   = netip.MustParseAddrPort("10.0.0.1:5060")
	pipeCoreHW = [6]byte{2, 0, 0, 0, 0, 1}
	pipePhHW   = [6]byte{2, 0, 0, 0, 0, 2}
	pipeNatHW  = [6]byte{2, 0, 0, 0, 0, 3} // the phone's NAPT after a re-mapping
	pipePubHW  = [6]byte{2, 0, 0, 0, 1, 1}
	pipePrvHW  = [6]byte{2, 0, 0, 0, 1, 2}
)

const (
	pipeSPIIn  = 0x1001
	pipeSPIOut = 0x2001
)

type pipeFixture struct {
	t      *testing.T
	u      *xsk.UMEM
	p      *pipeline
	st     *Stats
	in     *Slot // index 0
	out    *Slot // index 1
	events chan BindingChange
	seqReq chan SeqRequest
	frames uint64
}

func newPipeFixture(t *testing.T) *pipeFixture {
	t.Helper()
	u, err := xsk.New(xsk.Config{FrameCount: 16, FillSize: 8, CompletionSize: 8, RxSize: 8, TxSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	nb := &mapNeighbors{}
	nm := map[[16]byte][6]byte{pipeCore.Addr().As16(): pipeCoreHW}
	nb.m.Store(&nm)
	f := &pipeFixture{t: t, u: u, st: &Stats{}, events: make(chan BindingChange, 4), seqReq: make(chan SeqRequest, 4)}
	f.p = &pipeline{mem: u, nb: nb, pubMAC: pipePubHW, privMAC: pipePrvHW, stats: f.st,
		bindEvents: f.events, seqRequests: f.seqReq}
	gwIn := mustESP(t, pipeSPIIn, 64)
	gwOut := mustESP(t, pipeSPIOut, 0)
	bind := NewBinding(Peer{Addr: netip.AddrPortFrom(pipePhone, 4500), MAC: pipePhHW, HasMAC: true})
	f.in = withSel(&Slot{SA: gwIn, Dir: Inbound, Binding: bind}, netip.PrefixFrom(pipeInner.Addr(), 32), netip.Addr{})
	f.out = withSel(&Slot{SA: gwOut, Dir: Outbound, scope: &Scope{Local: pipeGW}, LocalPort: 4500,
		Binding: bind, index: 1}, netip.PrefixFrom(pipeInner.Addr(), 32), netip.Addr{})
	f.p.table = []*Slot{f.in, f.out}
	return f
}

func mustESP(t *testing.T, spi uint32, window int) *esp.Transform {
	t.Helper()
	s, err := esp.NewTransform(esp.Config{SPI: spi, Proposal: esp.AES128GCM16, EncKey: pipeKey, Mode: esp.ModeTunnel, ReplayWindow: window})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// frame takes the next UMEM frame, writes XDP's metadata in front of
// the packet and returns the descriptor's address and the bytes from it.
func (f *pipeFixture) frame(m bpf.Meta) (uint64, []byte) {
	rxOff := uint64(f.u.RxOffset())
	addr := f.frames*uint64(f.u.FrameSize()) + rxOff
	f.frames++
	m.Magic = bpf.MetaMagic
	*(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(addr, bpf.MetaSize)[0])) = m
	return addr, f.u.Frame(addr)[rxOff:]
}

// espFrame is what XDP hands the worker for a phone's packet: Ethernet,
// outer IPv4, ESP (the UDP header stripped, its source port in the
// metadata), sealed with seal (the phone's outbound SA).
func (f *pipeFixture) espFrame(seal *esp.Transform, inner []byte, srcMAC [6]byte, sport uint16) xsk.Desc {
	m := bpf.Meta{SaIndex: 0, L3Off: ethLen, Kind: uint8(bpf.MetaESPUDP)}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&m.Sport))[:], sport)
	addr, b := f.frame(m)
	pay := ethLen + 20 + seal.Headroom()
	copy(b[pay:], inner)
	start, end, err := seal.Seal(b, pay, len(inner), esp.NextHeaderIPv4, 0)
	if err != nil {
		f.t.Fatal(err)
	}
	if s, err := esp.PutOuter(b, start, end, &esp.Outer{Src: pipePhone, Dst: pipeGW}); err != nil || s != ethLen {
		f.t.Fatalf("outer header at %d: %v", s, err)
	}
	copy(b[0:6], pipePubHW[:])
	copy(b[6:12], srcMAC[:])
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	d := xsk.Desc{Addr: addr, Len: uint32(end)}
	completeMeta(f.u, d)
	return d
}

// clearFrame is a cleartext packet from the core as XDP steers it to an
// outbound SA.
func (f *pipeFixture) clearFrame(index uint32, ip []byte) xsk.Desc {
	addr, b := f.frame(bpf.Meta{SaIndex: index, L3Off: ethLen, Kind: uint8(bpf.MetaClear)})
	copy(b[0:6], pipePrvHW[:])
	copy(b[6:12], pipeCoreHW[:])
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	copy(b[ethLen:], ip)
	d := xsk.Desc{Addr: addr, Len: uint32(ethLen + len(ip))}
	completeMeta(f.u, d)
	return d
}

func eth(dst, src [6]byte) []byte {
	return append(append(append([]byte(nil), dst[:]...), src[:]...), 0x08, 0x00)
}

// drops returns the direction's non-zero drop counters by name.
func drops(st *DirStats) map[string]uint64 {
	out := map[string]uint64{}
	for i := range st.Drops {
		if n := st.Drops[i].Load(); n != 0 {
			out[Drop(i).String()] = n
		}
	}
	return out
}

func TestDecapPipeline(t *testing.T) {
	req := pkt.UDP4(pipeInner, pipeCore, []byte("REGISTER sip:ims"))
	for _, c := range []struct {
		name string
		// build returns the batch; the phone's SA seals with sequence
		// numbers from 1.
		build func(f *pipeFixture, phone *esp.Transform) []xsk.Desc
		// forwarded is how many frames reach the private side, drop the
		// reason of the others.
		forwarded int
		drop      string
		// moved: the binding follows the packet to the NAPT's new port.
		moved bool
	}{
		{"valid", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			return []xsk.Desc{f.espFrame(ph, req, pipeNatHW, 4777)}
		}, 1, "", true},
		{"bad ICV", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			f.u.Packet(d)[d.Len-1] ^= 1
			return []xsk.Desc{d}
		}, 0, "integ_error", false},
		{"replay", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipePhHW, 4500)
			again := f.clone(d)
			return []xsk.Desc{d, again}
		}, 1, "replay", false},
		{"selector: inner source of another phone", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			spoof := pkt.UDP4(netip.MustParseAddrPort("100.64.0.9:5060"), pipeCore, []byte("REGISTER sip:ims"))
			return []xsk.Desc{f.espFrame(ph, spoof, pipeNatHW, 4777)}
		}, 0, "selector", false},
		// The descriptor ends before the IP length XDP saw: the
		// hand-off disagrees with itself.
		{"malformed: cut short", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			d.Len = ethLen + 20 + 6 // outer IPv4 and part of the ESP header
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		{"malformed: no metadata", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Magic = 0
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		// What a program of the first layout (12 bytes, magic 0xE5 last)
		// leaves in front of a frame, e.g. during an upgrade.
		{"malformed: metadata of layout v1", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			v1 := f.u.Meta(d.Addr, 12)
			copy(v1, []byte{0, 0, 0, 0, 0x12, 0xa9, 0x11, 0x94, ethLen, 0, 1, 0xe5})
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		{"malformed: metadata for another worker", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Worker = 1
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		{"malformed: metadata family not the header's", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Family = 6
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		{"malformed: metadata ESP offset inside the IP header", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).L4Off = ethLen + 12
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		{"malformed: metadata IP length past the frame", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).L3Len = 0xffff
			return []xsk.Desc{d}
		}, 0, "bad_meta", false},
		// XDP does not check the outer IPv4 checksum; the worker does,
		// before the source may become the binding.
		{"malformed: outer IPv4 checksum", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			f.u.Packet(d)[ethLen+8]-- // TTL, checksum left as it was
			return []xsk.Desc{d}
		}, 0, "bad_header", false},
		{"malformed: index of no SA", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).SaIndex = 7
			return []xsk.Desc{d}
		}, 0, "no_sa", false},
		{"malformed: index of an outbound SA", func(f *pipeFixture, ph *esp.Transform) []xsk.Desc {
			d := f.espFrame(ph, req, pipeNatHW, 4777)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).SaIndex = 1
			return []xsk.Desc{d}
		}, 0, "wrong_direction", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newPipeFixture(t)
			phone := mustESP(t, pipeSPIIn, 0)
			rx := c.build(f, phone)
			tx, dropped := f.p.decap(rx, nil, nil)
			if len(tx) != c.forwarded || len(dropped) != len(rx)-c.forwarded {
				t.Fatalf("forwarded %d, dropped %d; want %d, %d (drops %v)", len(tx), len(dropped), c.forwarded, len(rx)-c.forwarded, drops(&f.st.Decap))
			}
			want := map[string]uint64{}
			if c.drop != "" {
				want[c.drop] = 1
			}
			if got := drops(&f.st.Decap); !equalCounts(got, want) {
				t.Fatalf("drop counters %v, want %v", got, want)
			}
			if c.forwarded > 0 {
				// The inner packet, as sent, behind Ethernet from the
				// gateway's private MAC to the core's.
				if got, w := f.u.Packet(tx[0]), append(eth(pipeCoreHW, pipePrvHW), routed(req)...); !bytes.Equal(got, w) {
					t.Fatalf("forwarded frame\n got %x\nwant %x", got, w)
				}
				if n, b, s := f.in.Counters.Packets.Load(), f.in.Counters.Bytes.Load(), f.in.Counters.Seq.Load(); n != 1 || b != uint64(len(req)) || s != 1 {
					t.Fatalf("SA counters: %d packets, %d bytes, seq %d; want 1, %d, 1", n, b, s, len(req))
				}
			} else if n := f.in.Counters.Packets.Load(); n != 0 {
				t.Fatalf("SA counted %d accepted packets", n)
			}
			if c.drop != "" && c.drop != "bad_meta" && c.drop != "no_sa" && c.drop != "wrong_direction" && f.in.Counters.Drops.Load() != 1 {
				t.Fatalf("SA drop counter %d, want 1", f.in.Counters.Drops.Load())
			}
			// The binding moves only for an authenticated, in-window,
			// in-policy packet.
			b := f.in.Binding.Load()
			if c.moved {
				if b.Addr != netip.AddrPortFrom(pipePhone, 4777) || b.MAC != pipeNatHW {
					t.Fatalf("binding %v %x, want 192.0.2.10:4777 %x", b.Addr, b.MAC, pipeNatHW)
				}
				if ev := <-f.events; ev.Index != 0 || ev.Peer.Addr != b.Addr || f.st.BindingChanges.Load() != 1 {
					t.Fatalf("binding event %+v, %d changes", ev, f.st.BindingChanges.Load())
				}
			} else if b.Addr != netip.AddrPortFrom(pipePhone, 4500) || b.MAC != pipePhHW || len(f.events) != 0 {
				t.Fatalf("binding moved to %v %x by a packet that was not accepted", b.Addr, b.MAC)
			}
		})
	}
}

// clone copies a frame (metadata and bytes) into a new UMEM frame: the
// same packet received twice.
func (f *pipeFixture) clone(d xsk.Desc) xsk.Desc {
	m := *(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0]))
	addr, b := f.frame(m)
	copy(b, f.u.Packet(d))
	return xsk.Desc{Addr: addr, Len: d.Len}
}

func equalCounts(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestEncapPipeline(t *testing.T) {
	resp := pkt.UDP4(pipeCore, pipeInner, []byte("SIP/2.0 200 OK"))
	for _, c := range []struct {
		name  string
		build func(f *pipeFixture) []xsk.Desc
		drop  string
	}{
		{"valid", func(f *pipeFixture) []xsk.Desc { return []xsk.Desc{f.clearFrame(1, resp)} }, ""},
		{"selector: another phone's address", func(f *pipeFixture) []xsk.Desc {
			return []xsk.Desc{f.clearFrame(1, pkt.UDP4(pipeCore, netip.MustParseAddrPort("100.64.0.9:5060"), []byte("x")))}
		}, "selector"},
		// XDP checks the IP length against the frame and hands it over;
		// the worker only bounds it.
		{"malformed: metadata IP length past the frame", func(f *pipeFixture) []xsk.Desc {
			ip := append([]byte(nil), resp...)
			binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)+40))
			return []xsk.Desc{f.clearFrame(1, ip)}
		}, "bad_meta"},
		{"malformed: IHL past the IP length", func(f *pipeFixture) []xsk.Desc {
			ip := append([]byte(nil), resp...)
			ip[0] = 0x4f // 60-byte header in a shorter packet
			return []xsk.Desc{f.clearFrame(1, ip)}
		}, "bad_header"},
		{"malformed: no metadata", func(f *pipeFixture) []xsk.Desc {
			d := f.clearFrame(1, resp)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Magic = 0
			return []xsk.Desc{d}
		}, "bad_meta"},
		{"malformed: metadata for another worker", func(f *pipeFixture) []xsk.Desc {
			d := f.clearFrame(1, resp)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Worker = 3
			return []xsk.Desc{d}
		}, "bad_meta"},
		{"malformed: metadata family not the header's", func(f *pipeFixture) []xsk.Desc {
			d := f.clearFrame(1, resp)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Family = 6
			return []xsk.Desc{d}
		}, "bad_meta"},
		{"malformed: ESP metadata on the private side", func(f *pipeFixture) []xsk.Desc {
			d := f.clearFrame(1, resp)
			(*bpf.Meta)(unsafe.Pointer(&f.u.Meta(d.Addr, bpf.MetaSize)[0])).Kind = uint8(bpf.MetaESP)
			return []xsk.Desc{d}
		}, "bad_meta"},
		{"malformed: index of an inbound SA", func(f *pipeFixture) []xsk.Desc { return []xsk.Desc{f.clearFrame(0, resp)} }, "wrong_direction"},
		{"sequence numbers not reserved", func(f *pipeFixture) []xsk.Desc {
			f.out.Limit.Store(1) // reserved below 1: none
			return []xsk.Desc{f.clearFrame(1, resp)}
		}, "seq_unreserved"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newPipeFixture(t)
			rx := c.build(f)
			tx, dropped := f.p.encap(rx, nil, nil)
			want := map[string]uint64{}
			if c.drop != "" {
				want[c.drop] = 1
			}
			if got := drops(&f.st.Encap); !equalCounts(got, want) {
				t.Fatalf("drop counters %v, want %v", got, want)
			}
			if c.drop != "" {
				if len(tx) != 0 || len(dropped) != 1 || dropped[0] != rx[0].Addr {
					t.Fatalf("tx %v, dropped %v", tx, dropped)
				}
				if f.out.Counters.Packets.Load() != 0 {
					t.Fatal("a dropped packet was counted as sealed")
				}
				if c.drop == "seq_unreserved" {
					if r := <-f.seqReq; r.Index != 1 {
						t.Fatalf("reservation request %+v", r)
					}
				}
				return
			}
			if len(tx) != 1 || len(dropped) != 0 {
				t.Fatalf("tx %v, dropped %v", tx, dropped)
			}
			got := f.u.Packet(tx[0])
			if !bytes.Equal(got[:ethLen], eth(pipePhHW, pipePubHW)) {
				t.Fatalf("Ethernet header %x: want to the binding's MAC from the public MAC", got[:ethLen])
			}
			// Outer IPv4/UDP from the gateway's 4500 to the binding, then
			// ESP that the phone's inbound SA opens to the packet sent.
			ip := got[ethLen:]
			if ip[0] != 0x45 || ip[9] != 17 || netip.AddrFrom4([4]byte(ip[12:16])) != pipeGW || netip.AddrFrom4([4]byte(ip[16:20])) != pipePhone ||
				binary.BigEndian.Uint16(ip[20:]) != 4500 || binary.BigEndian.Uint16(ip[22:]) != 4500 || int(binary.BigEndian.Uint16(ip[2:])) != len(ip) {
				t.Fatalf("outer headers %x", ip[:28])
			}
			if spi, seq := binary.BigEndian.Uint32(ip[28:]), binary.BigEndian.Uint32(ip[32:]); spi != pipeSPIOut || seq != 1 {
				t.Fatalf("ESP SPI %#x seq %d, want %#x 1", spi, seq, pipeSPIOut)
			}
			phone := mustESP(t, pipeSPIOut, 64)
			opened, err := phone.OpenPacket(append([]byte(nil), ip...))
			if err != nil || !bytes.Equal(opened.IP, routed(resp)) {
				t.Fatalf("the phone opens %x, %v; want %x", opened.IP, err, routed(resp))
			}
			if n, b, s := f.out.Counters.Packets.Load(), f.out.Counters.Bytes.Load(), f.out.Counters.Seq.Load(); n != 1 || b != uint64(len(resp)) || s != 1 {
				t.Fatalf("SA counters: %d packets, %d bytes, seq %d; want 1, %d, 1", n, b, s, len(resp))
			}
		})
	}
}

// routed is the IPv4 packet ip as a router forwards it: TTL one lower,
// header checksum recomputed (the gateway decrements the inner TTL both
// ways, router.go).
func routed(ip []byte) []byte {
	c := append([]byte(nil), ip...)
	hl := int(c[0]&0x0f) * 4
	c[8]--
	c[10], c[11] = 0, 0
	binary.BigEndian.PutUint16(c[10:], pkt.Checksum(c[:hl]))
	return c
}
