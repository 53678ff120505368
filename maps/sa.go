package maps

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// SAs is the inbound SA map: SPI (host order) -> bpf.SASteer.
type SAs struct {
	m *ebpf.Map
}

// batchChunk bounds one BPF_MAP_UPDATE_BATCH call so an error names a
// small range and one syscall does not hold the CPU for too long.
const batchChunk = 1 << 15

// NewSAs wraps the sas map.
func NewSAs(m *ebpf.Map) (*SAs, error) {
	if err := check(m, "sas", ebpf.Hash, 4, uint32(unsafe.Sizeof(bpf.SASteer{}))); err != nil {
		return nil, err
	}
	return &SAs{m: m}, nil
}

// Map returns the underlying map.
func (s *SAs) Map() *ebpf.Map { return s.m }

// Capacity is the map's max_entries, fixed at load time.
func (s *SAs) Capacity() uint32 { return s.m.MaxEntries() }

// Put inserts or replaces the entry for spi.
func (s *SAs) Put(spi uint32, sa bpf.SASteer) error {
	if err := s.m.Put(spi, sa); err != nil {
		return fmt.Errorf("sa map: put spi 0x%08x: %w", spi, err)
	}
	return nil
}

// Lookup returns the entry for spi; errors.Is(err, ErrNotFound) when absent.
func (s *SAs) Lookup(spi uint32) (bpf.SASteer, error) {
	var sa bpf.SASteer
	if err := s.m.Lookup(spi, &sa); err != nil {
		return sa, fmt.Errorf("sa map: lookup spi 0x%08x: %w", spi, err)
	}
	return sa, nil
}

// Delete removes spi; errors.Is(err, ErrNotFound) when it was absent.
func (s *SAs) Delete(spi uint32) error {
	if err := s.m.Delete(spi); err != nil {
		return fmt.Errorf("sa map: delete spi 0x%08x: %w", spi, err)
	}
	return nil
}

// PutBatch inserts or replaces spis[i] -> sas[i] with batch syscalls,
// falling back to one update per entry on kernels without batch support.
func (s *SAs) PutBatch(spis []uint32, sas []bpf.SASteer) error {
	if len(spis) != len(sas) {
		return fmt.Errorf("sa map: put batch: %d spis, %d entries", len(spis), len(sas))
	}
	for lo := 0; lo < len(spis); lo += batchChunk {
		hi := min(lo+batchChunk, len(spis))
		_, err := s.m.BatchUpdate(spis[lo:hi], sas[lo:hi], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := lo; i < hi; i++ {
				if err := s.Put(spis[i], sas[i]); err != nil {
					return err
				}
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("sa map: put batch [%d,%d): %w", lo, hi, err)
		}
	}
	return nil
}

// DeleteBatch removes spis. Absent SPIs are an error (ErrNotFound) as with
// Delete; entries before the absent one in its chunk are deleted.
func (s *SAs) DeleteBatch(spis []uint32) error {
	for lo := 0; lo < len(spis); lo += batchChunk {
		hi := min(lo+batchChunk, len(spis))
		_, err := s.m.BatchDelete(spis[lo:hi], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := lo; i < hi; i++ {
				if err := s.Delete(spis[i]); err != nil {
					return err
				}
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("sa map: delete batch [%d,%d): %w", lo, hi, err)
		}
	}
	return nil
}

// walkChunk is how many entries one BPF_MAP_LOOKUP_BATCH call of a
// Walk reads.
const walkChunk = 4096

// Walk calls f for every entry until f returns false. Entries changed
// during the walk may be seen or missed (a hash map iterates by bucket).
// It reads the map in batches (walkBatch): one lookup syscall per entry
// was a second of a 200k-pair start.
func (s *SAs) Walk(f func(spi uint32, sa bpf.SASteer) bool) error {
	return walkBatch(s.m, "sa map", func(spi *uint32, sa *bpf.SASteer) bool { return f(*spi, *sa) })
}
