package loader

import (
	"fmt"
	"syscall"

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
