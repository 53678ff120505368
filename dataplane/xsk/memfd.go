package xsk

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// newArea maps size bytes of packet memory backed by a memfd rather than
// an anonymous mapping: a successor process that receives the memfd (and
// the sockets) over a Unix socket maps the very same frames, so frames
// the kernel holds in the fill and RX rings stay valid across an upgrade
// (see Export and Adopt). Shared memory and anonymous memory cost the
// same per packet; MAP_POPULATE faults every page in up front either way.
func newArea(size int) (area []byte, memfd int, err error) {
	fd, err := unix.MemfdCreate("xesp-umem", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, -1, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, -1, fmt.Errorf("size umem memfd to %d bytes: %w", size, err)
	}
	area, err = mapAreaFD(fd, size)
	if err != nil {
		unix.Close(fd)
		return nil, -1, err
	}
	return area, fd, nil
}

// mapAreaFD maps an existing UMEM memfd of size bytes.
func mapAreaFD(fd, size int) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat umem memfd: %w", err)
	}
	if st.Size != int64(size) {
		return nil, fmt.Errorf("umem memfd holds %d bytes, want %d", st.Size, size)
	}
	area, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mmap umem memfd (%d bytes): %w", size, err)
	}
	return area, nil
}
