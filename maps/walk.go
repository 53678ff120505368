package maps

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// walkBatch calls f for every entry of m, reading walkChunk entries per
// BPF_MAP_LOOKUP_BATCH syscall (hash maps and, on this kernel, the LPM
// trie take it), until f returns false. Without batch support it falls
// back to the map iterator: two syscalls per entry, which for the
// million policies of a large start was seconds of a PruneStale.
func walkBatch[K, V any](m *ebpf.Map, what string, f func(k *K, v *V) bool) error {
	keys := make([]K, walkChunk)
	vals := make([]V, walkChunk)
	var cur ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cur, keys, vals, nil)
		for i := range n {
			if !f(&keys[i], &vals[i]) {
				return nil
			}
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case errors.Is(err, ebpf.ErrNotSupported) && n == 0:
			var k K
			var v V
			it := m.Iterate()
			for it.Next(&k, &v) {
				if !f(&k, &v) {
					return nil
				}
			}
			if err := it.Err(); err != nil {
				return fmt.Errorf("%s: walk: %w", what, err)
			}
			return nil
		case err != nil:
			return fmt.Errorf("%s: walk: %w", what, err)
		}
	}
}
