package xsk

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Desc is one RX or TX descriptor: a packet of Len bytes at UMEM offset
// Addr. Its layout is the kernel's struct xdp_desc, so batches copy
// straight into and out of the rings.
type Desc struct {
	Addr    uint64
	Len     uint32
	Options uint32
}

// ring is the user side of one single-producer/single-consumer ring shared
// with the kernel. Only the side we own is written; the other pointer is
// read with an atomic load, which on amd64 and arm64 gives the acquire
// ordering the kernel's smp_store_release pairs with, and our atomic store
// gives the release the kernel's smp_load_acquire needs.
type ring struct {
	mem      []byte
	producer *uint32
	consumer *uint32
	flags    *uint32
	mask     uint32
	size     uint32
	// cached copies of our own index (we are its only writer) and of the
	// kernel's (refreshed only when the cached view looks empty or full),
	// so a batch touches the shared cache lines once.
	cachedProd uint32
	cachedCons uint32
}

// mapRing maps one ring of fd. off is the kernel's offsets for it, pgoff
// the mmap page offset naming it, elem the entry size (8 for fill and
// completion, 16 for RX and TX).
func mapRing(fd int, off unix.XDPRingOffset, pgoff int64, entries uint32, elem uintptr) (*ring, error) {
	length := int(off.Desc) + int(entries)*int(elem)
	mem, err := unix.Mmap(fd, pgoff, length, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mmap ring at page offset %#x (%d bytes): %w", pgoff, length, err)
	}
	r := &ring{
		mem:      mem,
		producer: (*uint32)(unsafe.Pointer(&mem[off.Producer])),
		consumer: (*uint32)(unsafe.Pointer(&mem[off.Consumer])),
		flags:    (*uint32)(unsafe.Pointer(&mem[off.Flags])),
		mask:     entries - 1,
		size:     entries,
	}
	r.cachedProd = atomic.LoadUint32(r.producer)
	r.cachedCons = atomic.LoadUint32(r.consumer)
	return r, nil
}

func (r *ring) unmap() error {
	if r == nil || r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem = nil
	return err
}

func (r *ring) needWakeup() bool {
	return atomic.LoadUint32(r.flags)&unix.XDP_RING_NEED_WAKEUP != 0
}

// addrs returns the entries of a fill or completion ring.
func (r *ring) addrs(descOff uint64) []uint64 {
	return unsafe.Slice((*uint64)(unsafe.Pointer(&r.mem[descOff])), r.size)
}

// descs returns the entries of an RX or TX ring.
func (r *ring) descs(descOff uint64) []Desc {
	return unsafe.Slice((*Desc)(unsafe.Pointer(&r.mem[descOff])), r.size)
}

// prodFree is how many entries a producer may write now, refreshing the
// kernel's consumer index only if the cached one does not give want.
func (r *ring) prodFree(want uint32) uint32 {
	free := r.size - (r.cachedProd - r.cachedCons)
	if free >= want {
		return free
	}
	r.cachedCons = atomic.LoadUint32(r.consumer)
	return r.size - (r.cachedProd - r.cachedCons)
}

func (r *ring) prodSubmit(n uint32) {
	r.cachedProd += n
	atomic.StoreUint32(r.producer, r.cachedProd)
}

// consAvail is how many entries a consumer may read now; cachedCons is our
// own consumer index and cachedProd the kernel's producer index here.
func (r *ring) consAvail(want uint32) uint32 {
	avail := r.cachedProd - r.cachedCons
	if avail >= want {
		return avail
	}
	r.cachedProd = atomic.LoadUint32(r.producer)
	return r.cachedProd - r.cachedCons
}

func (r *ring) consRelease(n uint32) {
	r.cachedCons += n
	atomic.StoreUint32(r.consumer, r.cachedCons)
}

// occupancy reads both indexes for metrics and accounting: entries
// produced and not yet consumed.
func (r *ring) occupancy() uint32 {
	return atomic.LoadUint32(r.producer) - atomic.LoadUint32(r.consumer)
}
