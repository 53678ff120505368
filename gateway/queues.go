package gateway

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/maps"
)

// QueueSocket is one AF_XDP socket of the gateway: worker Worker's socket
// on RX queue Queue of one side. Every (side, queue) has one per worker,
// at XSK map index maps.Index(Queue, workers, Worker), so XDP steers an
// SA's packets to its worker whatever queue RSS put them on.
type QueueSocket struct {
	Private bool
	Queue   int
	Worker  int
	XSK     *xsk.Socket
}

// Index is the socket's slot in its side's XSK map.
func (s QueueSocket) Index(workers int) uint32 {
	return maps.Index(uint32(s.Queue), uint16(workers), uint16(s.Worker))
}

// rxQueues is how many RX queues ifname has (ETHTOOL_GCHANNELS: the
// dedicated RX plus the combined channels; veth reports its real RX
// queues). A driver without the call has one. It runs in the caller's
// network namespace.
func rxQueues(ifname string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket for ethtool: %w", err)
	}
	defer unix.Close(fd)
	ch := struct {
		cmd                                         uint32
		maxRX, maxTX, maxOther, maxCombined         uint32
		rxCount, txCount, otherCount, combinedCount uint32
	}{cmd: unix.ETHTOOL_GCHANNELS}
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [16]byte // rest of struct ifreq's union
	}
	copy(ifr.name[:unix.IFNAMSIZ-1], ifname)
	ifr.data = unsafe.Pointer(&ch)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); e != 0 {
		if errors.Is(e, unix.EOPNOTSUPP) {
			return 1, nil
		}
		return 0, fmt.Errorf("ethtool channels of %s: %w", ifname, e)
	}
	if n := int(ch.rxCount + ch.combinedCount); n > 0 {
		return n, nil
	}
	return 1, nil
}

// fillRingFor is the fill ring size of each (device, queue) when queues
// of them share frames: at most the configured size, and at most an
// equal share of the UMEM (rounded down to a power of two), so the first
// queue's refill cannot take every frame and starve the others.
func fillRingFor(configured, frames, queues int) int {
	share := frames / max(queues, 1)
	n := 1
	for n*2 <= share {
		n *= 2
	}
	return min(configured, max(n, 64))
}
