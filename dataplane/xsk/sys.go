package xsk

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// x/sys has the AF_XDP constants and structs but no typed getsockopt for
// the structs, so these go through the raw syscall.

func getsockopt(fd, level, opt int, p unsafe.Pointer, size uintptr) (uintptr, error) {
	l := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return 0, errno
	}
	return uintptr(l), nil
}

func setsockopt(fd, level, opt int, p unsafe.Pointer, size uintptr) error {
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(p), size, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// kick is the zero-length sendto that makes the kernel process a TX ring
// (copy mode transmits only from here) or wake a zero-copy driver.
func kick(fd int) error {
	for {
		_, _, errno := unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), 0, 0, unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0, unix.EAGAIN, unix.EBUSY, unix.ENOBUFS:
			// EAGAIN/EBUSY/ENOBUFS: the kernel is still busy with earlier
			// descriptors or the device queue is full; the descriptors stay
			// in the ring and the next kick picks them up.
			return nil
		case unix.EINTR:
			continue
		default:
			return errno
		}
	}
}

// wakeRX is the recvfrom libxdp uses when the fill ring asks for a wakeup.
func wakeRX(fd int) error {
	_, _, errno := unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), 0, 0, unix.MSG_DONTWAIT, 0, 0)
	switch errno {
	case 0, unix.EAGAIN, unix.EBUSY, unix.ENOBUFS, unix.EINTR:
		return nil
	}
	return errno
}
