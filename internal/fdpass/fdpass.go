// Package fdpass sends and receives one framed message with file
// descriptors (SCM_RIGHTS) over a Unix stream socket, and checks who is
// at the other end. It owns the framing only: what the message means is
// the caller's (the daemon's upgrade hand-over), and it never closes the
// descriptors it sends.
package fdpass

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// MaxFDs is the kernel's limit for one SCM_RIGHTS message (SCM_MAX_FD).
const MaxFDs = 253

// MaxMessage bounds a message so a confused peer cannot make the
// receiver allocate without limit.
const MaxMessage = 64 << 20

// Send writes msg with fds attached: an 8-byte header (message length,
// fd count) that carries the descriptors, then the message.
func Send(c *net.UnixConn, msg []byte, fds []int) error {
	if len(fds) > MaxFDs {
		return fmt.Errorf("fdpass: %d descriptors, at most %d", len(fds), MaxFDs)
	}
	if len(msg) > MaxMessage {
		return fmt.Errorf("fdpass: %d-byte message, at most %d", len(msg), MaxMessage)
	}
	var hdr [8]byte
	binary.LittleEndian.PutUint32(hdr[:], uint32(len(msg)))
	binary.LittleEndian.PutUint32(hdr[4:], uint32(len(fds)))
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(hdr[:], oob, nil)
	if err != nil {
		return fmt.Errorf("fdpass: send header: %w", err)
	}
	if n != len(hdr) || oobn != len(oob) {
		return fmt.Errorf("fdpass: short header write (%d of %d bytes, %d of %d control bytes)", n, len(hdr), oobn, len(oob))
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("fdpass: send message: %w", err)
	}
	return nil
}

// Recv reads one message sent by Send and the descriptors with it
// (close-on-exec: net sets MSG_CMSG_CLOEXEC on Linux); the caller owns
// them. On error any descriptor received is closed.
func Recv(c *net.UnixConn) (msg []byte, fds []int, err error) {
	var hdr [8]byte
	oob := make([]byte, unix.CmsgSpace(4*MaxFDs))
	n, oobn, _, _, err := c.ReadMsgUnix(hdr[:], oob)
	if oobn > 0 {
		cmsgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for _, m := range cmsgs {
				if got, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, got...)
				}
			}
		}
	}
	defer func() {
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			fds = nil
		}
	}()
	if err != nil {
		return nil, nil, fmt.Errorf("fdpass: receive header: %w", err)
	}
	if n == 0 {
		return nil, nil, fmt.Errorf("fdpass: %w", io.ErrUnexpectedEOF)
	}
	if n < len(hdr) {
		if _, err := io.ReadFull(c, hdr[n:]); err != nil {
			return nil, nil, fmt.Errorf("fdpass: receive header: %w", err)
		}
	}
	size, want := binary.LittleEndian.Uint32(hdr[:]), binary.LittleEndian.Uint32(hdr[4:])
	if int(want) != len(fds) {
		return nil, nil, fmt.Errorf("fdpass: %d descriptors announced, %d received", want, len(fds))
	}
	if size > MaxMessage {
		return nil, nil, fmt.Errorf("fdpass: %d-byte message announced, at most %d", size, MaxMessage)
	}
	msg = make([]byte, size)
	if _, err := io.ReadFull(c, msg); err != nil {
		return nil, nil, fmt.Errorf("fdpass: receive message: %w", err)
	}
	return msg, fds, nil
}

// ErrPeer: the other end runs as another user.
var ErrPeer = errors.New("peer runs as another user")

// CheckPeer accepts a peer running as this process's effective user (root
// for the daemon) and returns its pid.
func CheckPeer(c *net.UnixConn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("fdpass: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("fdpass: %w", err)
	}
	if cerr != nil {
		return 0, fmt.Errorf("fdpass: SO_PEERCRED: %w", cerr)
	}
	if int(cred.Uid) != os.Geteuid() {
		return int(cred.Pid), fmt.Errorf("fdpass: pid %d uid %d: %w", cred.Pid, cred.Uid, ErrPeer)
	}
	return int(cred.Pid), nil
}
