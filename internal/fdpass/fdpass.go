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
// A message with more descriptors sends them in frames of at most this
// many.
const MaxFDs = 253

// MaxTotalFDs bounds the descriptors of one message, so a confused peer
// cannot make the receiver hold descriptors without limit: a hand-over of
// every socket of two full 256-slot XSK maps and its other files fits.
const MaxTotalFDs = 1024

// MaxMessage bounds a message so a confused peer cannot make the
// receiver allocate without limit.
const MaxMessage = 64 << 20

// more, in a frame header's length word, says another frame follows with
// more of the message's descriptors. Receivers that predate it read the
// word as a length over MaxMessage and refuse the message: they were
// never sent more than MaxFDs.
const more = 1 << 31

// Send writes msg with fds attached: an 8-byte header (message length,
// fd count) that carries the first MaxFDs descriptors, then the message,
// then, while descriptors remain, further headers (length 0) carrying
// them.
func Send(c *net.UnixConn, msg []byte, fds []int) error {
	if len(fds) > MaxTotalFDs {
		return fmt.Errorf("fdpass: %d descriptors, at most %d", len(fds), MaxTotalFDs)
	}
	if len(msg) > MaxMessage {
		return fmt.Errorf("fdpass: %d-byte message, at most %d", len(msg), MaxMessage)
	}
	first, rest := fds, []int(nil)
	if len(fds) > MaxFDs {
		first, rest = fds[:MaxFDs], fds[MaxFDs:]
	}
	if err := sendHeader(c, uint32(len(msg)), len(rest) > 0, first); err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("fdpass: send message: %w", err)
	}
	for len(rest) > 0 {
		chunk := rest[:min(len(rest), MaxFDs)]
		rest = rest[len(chunk):]
		if err := sendHeader(c, 0, len(rest) > 0, chunk); err != nil {
			return err
		}
	}
	return nil
}

func sendHeader(c *net.UnixConn, size uint32, follows bool, fds []int) error {
	var hdr [8]byte
	if follows {
		size |= more
	}
	binary.LittleEndian.PutUint32(hdr[:], size)
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
	return nil
}

// Recv reads one message sent by Send and the descriptors with it
// (close-on-exec: net sets MSG_CMSG_CLOEXEC on Linux); the caller owns
// them. On error any descriptor received is closed.
func Recv(c *net.UnixConn) (msg []byte, fds []int, err error) {
	defer func() {
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			fds = nil
		}
	}()
	size, follows, fds, err := recvHeader(c, fds)
	if err != nil {
		return nil, fds, err
	}
	if size > MaxMessage {
		return nil, fds, fmt.Errorf("fdpass: %d-byte message announced, at most %d", size, MaxMessage)
	}
	msg = make([]byte, size)
	if _, err := io.ReadFull(c, msg); err != nil {
		return nil, fds, fmt.Errorf("fdpass: receive message: %w", err)
	}
	for follows {
		var n uint32
		if n, follows, fds, err = recvHeader(c, fds); err != nil {
			return nil, fds, err
		}
		if n != 0 {
			return nil, fds, fmt.Errorf("fdpass: a descriptor frame announces %d message bytes, want 0", n)
		}
		if len(fds) > MaxTotalFDs {
			return nil, fds, fmt.Errorf("fdpass: more than %d descriptors", MaxTotalFDs)
		}
	}
	return msg, fds, nil
}

// recvHeader reads one frame header and appends the descriptors it
// carries to fds.
func recvHeader(c *net.UnixConn, fds []int) (size uint32, follows bool, _ []int, err error) {
	var hdr [8]byte
	oob := make([]byte, unix.CmsgSpace(4*MaxFDs))
	n, oobn, _, _, err := c.ReadMsgUnix(hdr[:], oob)
	got := 0
	if oobn > 0 {
		cmsgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for _, m := range cmsgs {
				if r, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, r...)
					got += len(r)
				}
			}
		}
	}
	if err != nil {
		return 0, false, fds, fmt.Errorf("fdpass: receive header: %w", err)
	}
	if n == 0 {
		return 0, false, fds, fmt.Errorf("fdpass: %w", io.ErrUnexpectedEOF)
	}
	if n < len(hdr) {
		if _, err := io.ReadFull(c, hdr[n:]); err != nil {
			return 0, false, fds, fmt.Errorf("fdpass: receive header: %w", err)
		}
	}
	size, want := binary.LittleEndian.Uint32(hdr[:]), binary.LittleEndian.Uint32(hdr[4:])
	if int(want) != got {
		return 0, false, fds, fmt.Errorf("fdpass: %d descriptors announced, %d received", want, got)
	}
	return size &^ more, size&more != 0, fds, nil
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
