package bpf_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

// xdpMD mirrors the kernel UAPI struct xdp_md for BPF_PROG_TEST_RUN's ctx.
type xdpMD struct {
	Data           uint32
	DataEnd        uint32
	DataMeta       uint32
	IngressIfindex uint32
	RxQueueIndex   uint32
	EgressIfindex  uint32
}

const (
	xdpAborted  = 0
	xdpDrop     = 1
	xdpPass     = 2
	xdpTX       = 3
	xdpRedirect = 4
)

func verdictName(v uint32) string {
	switch v {
	case xdpAborted:
		return "XDP_ABORTED"
	case xdpDrop:
		return "XDP_DROP"
	case xdpPass:
		return "XDP_PASS"
	case xdpTX:
		return "XDP_TX"
	case xdpRedirect:
		return "XDP_REDIRECT"
	}
	return fmt.Sprintf("verdict(%d)", v)
}

// loadObjects loads the programs with a small SA map (tests do not need a
// million slots; the benchmark does).
func loadObjects(t testing.TB, saCap uint32) (*bpf.XespObjects, *maps.Set) {
	t.Helper()
	netns.RequireRoot(t)
	spec, err := bpf.LoadXesp()
	if err != nil {
		t.Fatal(err)
	}
	if saCap != 0 {
		spec.Maps[bpf.XespMapSas].MaxEntries = saCap
	}
	var objs bpf.XespObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("load: %+v", ve)
		}
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { objs.Close() })
	set, err := maps.New(&objs.XespMaps)
	if err != nil {
		t.Fatal(err)
	}
	return &objs, set
}

// xskSocket makes an AF_XDP socket good enough for an XSKMAP slot: UMEM,
// fill/completion/RX rings, bound in copy mode to queue of ifname. It is
// created in ns so binding never touches the host's links.
func xskSocket(t testing.TB, ns *netns.NS, ifname string, queue uint32) int {
	t.Helper()
	var fd int
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket(AF_XDP): %w", err)
		}
		const frames, frameSize = 64, 4096
		umem, err := unix.Mmap(-1, 0, frames*frameSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return fmt.Errorf("mmap umem: %w", err)
		}
		t.Cleanup(func() { unix.Munmap(umem) })
		reg := unix.XDPUmemReg{Addr: uint64(uintptr(unsafe.Pointer(&umem[0]))), Len: frames * frameSize, Size: frameSize}
		if _, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_XDP, unix.XDP_UMEM_REG,
			uintptr(unsafe.Pointer(&reg)), unsafe.Sizeof(reg), 0); e != 0 {
			return fmt.Errorf("XDP_UMEM_REG: %w", e)
		}
		for _, opt := range []int{unix.XDP_UMEM_FILL_RING, unix.XDP_UMEM_COMPLETION_RING, unix.XDP_RX_RING} {
			if err := unix.SetsockoptInt(fd, unix.SOL_XDP, opt, 64); err != nil {
				return fmt.Errorf("ring option %d: %w", opt, err)
			}
		}
		sa := &unix.SockaddrXDP{Flags: unix.XDP_COPY, Ifindex: uint32(ifi.Index), QueueID: queue}
		if err := unix.Bind(fd, sa); err != nil {
			return fmt.Errorf("bind AF_XDP to %s queue %d: %w", ifname, queue, err)
		}
		return nil
	})
	if err != nil {
		if fd > 0 {
			unix.Close(fd)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// run feeds pkt to prog through BPF_PROG_TEST_RUN with an xdp_md context,
// returning the verdict, the output frame and the metadata bytes the
// program left in front of it.
func run(t testing.TB, prog *ebpf.Program, pkt []byte, ctx xdpMD) (verdict uint32, out, meta []byte) {
	t.Helper()
	ctx.DataEnd = uint32(len(pkt))
	var ctxOut xdpMD
	opts := ebpf.RunOptions{Data: pkt, DataOut: make([]byte, len(pkt)+512), Context: ctx, ContextOut: &ctxOut}
	ret, err := prog.Run(&opts)
	if err != nil {
		t.Fatalf("prog run: %v", err)
	}
	// The kernel copies data_meta..data_end out and reports data - data_meta
	// as ctx.data; Run reslices DataOut to what the kernel wrote.
	buf := opts.DataOut
	if int(ctxOut.Data) > len(buf) {
		t.Fatalf("ctx_out.data %d beyond output of %d bytes", ctxOut.Data, len(buf))
	}
	return ret, buf[ctxOut.Data:], buf[:ctxOut.Data]
}

// Packet building with gopacket: an implementation independent of the C
// code, so expected bytes are not derived from the code under test.

var (
	macA = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xa}
	macB = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xb}
	ipA4 = net.IPv4(192, 0, 2, 10).To4()
	ipB4 = net.IPv4(198, 51, 100, 20).To4()
	ipA6 = net.ParseIP("2001:db8::a")
	ipB6 = net.ParseIP("2001:db8::b")
)

func serialize(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return unpad(append([]byte(nil), buf.Bytes()...))
}

// unpad cuts the Ethernet padding gopacket adds up to 60 bytes, so
// fixtures are exactly the headers and payload they describe; padded
// variants are built explicitly.
func unpad(b []byte) []byte {
	l3, typ := 14, binary.BigEndian.Uint16(b[12:])
	if typ == 0x8100 || typ == 0x88a8 {
		l3, typ = 18, binary.BigEndian.Uint16(b[16:])
	}
	end := len(b)
	switch typ {
	case 0x0800:
		end = l3 + int(binary.BigEndian.Uint16(b[l3+2:]))
	case 0x86dd:
		end = l3 + 40 + int(binary.BigEndian.Uint16(b[l3+4:]))
	}
	return b[:min(end, len(b))]
}

func eth(typ layers.EthernetType) *layers.Ethernet {
	return &layers.Ethernet{SrcMAC: macA, DstMAC: macB, EthernetType: typ}
}

func ip4(proto layers.IPProtocol, opts ...layers.IPv4Option) *layers.IPv4 {
	return &layers.IPv4{Version: 4, TTL: 61, Id: 0x1234, Flags: layers.IPv4DontFragment, Protocol: proto, SrcIP: ipA4, DstIP: ipB4, Options: opts}
}

func ip6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 60, FlowLabel: 0x12345, NextHeader: next, SrcIP: ipA6, DstIP: ipB6}
}

func udp(nl gopacket.NetworkLayer, sport, dport uint16) *layers.UDP {
	u := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
	u.SetNetworkLayerForChecksum(nl)
	return u
}

// espBody is an ESP packet: SPI, sequence number and n bytes standing in
// for IV, ciphertext and ICV.
func espBody(spi, seq uint32, n int) gopacket.Payload {
	b := make([]byte, 8+n)
	binary.BigEndian.PutUint32(b, spi)
	binary.BigEndian.PutUint32(b[4:], seq)
	for i := 8; i < len(b); i++ {
		b[i] = byte(i * 7)
	}
	return b
}
