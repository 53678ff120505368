package loader

import (
	"encoding/binary"
	"fmt"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Mode is how an XDP program is attached.
type Mode int

const (
	ModeNone    Mode = iota // nothing attached
	ModeNative              // driver mode
	ModeGeneric             // SKB mode
	ModeOffload             // hardware
	ModeMulti               // several programs (libxdp dispatcher or mixed modes)
)

func (m Mode) String() string {
	switch m {
	case ModeNone:
		return "none"
	case ModeNative:
		return "native"
	case ModeGeneric:
		return "generic"
	case ModeOffload:
		return "offload"
	case ModeMulti:
		return "multi"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Attachment is one program on one interface.
type Attachment struct {
	Side    string // "public" or "private"
	Ifname  string
	Ifindex int
	Mode    Mode // as the kernel reports it (rtnetlink IFLA_XDP_ATTACHED)
	Reused  bool // re-opened from a pinned link, not attached by this process

	link link.Link
}

// IFLA_XDP_ATTACHED values (uapi if_link.h), absent from x/sys/unix.
const (
	xdpAttachedNone = 0
	xdpAttachedDrv  = 1
	xdpAttachedSKB  = 2
	xdpAttachedHW   = 3
)

// XDPMode asks the kernel how XDP is attached to the interface ifindex in
// the caller's network namespace.
func XDPMode(ifindex int) (Mode, error) { return xdpMode(ifindex) }

// xdpMode reads IFLA_XDP/IFLA_XDP_ATTACHED from a link dump: the kernel's
// word on the mode, rather than what we asked for.
func xdpMode(ifindex int) (Mode, error) {
	rib, err := syscall.NetlinkRIB(unix.RTM_GETLINK, unix.AF_UNSPEC)
	if err != nil {
		return ModeNone, fmt.Errorf("query xdp mode: rtnetlink dump: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return ModeNone, fmt.Errorf("query xdp mode: parse rtnetlink: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWLINK || len(m.Data) < unix.SizeofIfInfomsg {
			continue
		}
		ifi := (*unix.IfInfomsg)(unsafePointer(m.Data))
		if int(ifi.Index) != ifindex {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return ModeNone, fmt.Errorf("query xdp mode: parse link %d attributes: %w", ifindex, err)
		}
		for _, a := range attrs {
			if a.Attr.Type&^unix.NLA_F_NESTED != unix.IFLA_XDP {
				continue
			}
			for b := a.Value; len(b) >= unix.SizeofRtAttr; {
				l := int(nativeUint16(b[0:2]))
				typ := nativeUint16(b[2:4])
				if l < unix.SizeofRtAttr || l > len(b) {
					break
				}
				if typ == unix.IFLA_XDP_ATTACHED && l > unix.SizeofRtAttr {
					switch b[unix.SizeofRtAttr] {
					case xdpAttachedNone:
						return ModeNone, nil
					case xdpAttachedDrv:
						return ModeNative, nil
					case xdpAttachedSKB:
						return ModeGeneric, nil
					case xdpAttachedHW:
						return ModeOffload, nil
					default:
						return ModeMulti, nil
					}
				}
				b = b[(l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1):]
				if len(b) == 0 {
					break
				}
			}
		}
		return ModeNone, nil
	}
	return ModeNone, fmt.Errorf("query xdp mode: no interface with index %d", ifindex)
}

// XSKPresent reports whether slot idx of the public (private false) or
// private XSK map holds a socket. User space cannot read an XSKMAP, so it
// asks xesp_xsk_probe through BPF_PROG_TEST_RUN.
func (in *Instance) XSKPresent(private bool, idx uint32) (bool, error) {
	var buf [64]byte // XDP test runs want at least an Ethernet header
	binary.NativeEndian.PutUint32(buf[0:], idx)
	if private {
		binary.NativeEndian.PutUint32(buf[4:], 1)
	}
	ret, err := in.Objects.XespXskProbe.Run(&ebpf.RunOptions{Data: buf[:]})
	if err != nil {
		return false, fmt.Errorf("probe XSK slot %d: %w", idx, err)
	}
	switch ret {
	case xdpPass:
		return true, nil
	case xdpDrop:
		return false, nil
	}
	return false, fmt.Errorf("probe XSK slot %d: verdict %d", idx, ret)
}

// XDP action values (uapi bpf.h).
const (
	xdpDrop = 1
	xdpPass = 2
)

// Attached reports whether XDP is still attached to a's interface.
func (a *Attachment) Attached() (bool, error) {
	m, err := xdpMode(a.Ifindex)
	return m != ModeNone, err
}
