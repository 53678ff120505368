package xdptest

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/internal/pkt"
)

func frame(dport uint16) []byte {
	ip := pkt.UDP4(netip.MustParseAddrPort("192.0.2.10:4500"), netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), dport), []byte{7, 1, 2, 3})
	f := make([]byte, 14, 14+len(ip))
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	return append(f, ip...)
}

func run(t *testing.T, p *ebpf.Program, f []byte) uint32 {
	t.Helper()
	ret, err := p.Run(&ebpf.RunOptions{Data: f})
	if err != nil {
		t.Fatal(err)
	}
	return ret
}

// The counter counts and drops exactly the frames to its port (BPF_PROG_TEST_RUN).
func TestCount(t *testing.T) {
	p, m, err := Count(5060)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	defer m.Close()
	const xdpDrop, xdpPass = 1, 2
	hit, miss := frame(5060), frame(5061)
	if r := run(t, p, hit); r != xdpDrop {
		t.Fatalf("frame to the port: verdict %d, want XDP_DROP", r)
	}
	if r := run(t, p, miss); r != xdpPass {
		t.Fatalf("frame to another port: verdict %d, want XDP_PASS", r)
	}
	if r := run(t, p, hit[:30]); r != xdpPass {
		t.Fatalf("runt: verdict %d, want XDP_PASS", r)
	}
	var per [][16]byte
	if err := m.Lookup(uint32(0), &per); err != nil {
		t.Fatal(err)
	}
	var n, b uint64
	for _, v := range per {
		n += binary.NativeEndian.Uint64(v[0:])
		b += binary.NativeEndian.Uint64(v[8:])
	}
	if n != 1 || b != uint64(len(hit)) {
		t.Fatalf("counted %d packets, %d bytes; want 1, %d", n, b, len(hit))
	}
}

// The steering program passes what is not for its port and redirects
// the rest (to an empty XSK map here, hence XDP_ABORTED).
func TestSteer(t *testing.T) {
	p, m, err := Steer(4500, 2, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	defer m.Close()
	if m.MaxEntries() != 2 {
		t.Fatalf("xsk map of %d entries, want 2", m.MaxEntries())
	}
	const xdpAborted, xdpPass = 0, 2
	if r := run(t, p, frame(4501)); r != xdpPass {
		t.Fatalf("frame to another port: verdict %d, want XDP_PASS", r)
	}
	if r := run(t, p, frame(4500)); r != xdpAborted {
		t.Fatalf("frame to the port with no socket: verdict %d, want XDP_ABORTED", r)
	}
}

// The xsk tests' sender transmits every frame, writing a value below
// spread at its offset when asked to.
func TestGen(t *testing.T) {
	p, err := Gen(4, 20)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	in := frame(4500)
	in[20] = 0xff
	out := make([]byte, len(in))
	ret, err := p.Run(&ebpf.RunOptions{Data: in, DataOut: out})
	if err != nil {
		t.Fatal(err)
	}
	const xdpTX = 3
	if ret != xdpTX || out[20] >= 4 {
		t.Fatalf("verdict %d, byte %d; want XDP_TX and a value below 4", ret, out[20])
	}
}

// The counting verdict counts every frame and returns its verdict.
func TestCountAll(t *testing.T) {
	p, m, err := CountAll(1)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	defer m.Close()
	for range 3 {
		if r := run(t, p, frame(1)); r != 1 {
			t.Fatalf("verdict %d, want XDP_DROP", r)
		}
	}
	var per []uint64
	if err := m.Lookup(uint32(0), &per); err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	if n != 3 {
		t.Fatalf("counted %d, want 3", n)
	}
}
