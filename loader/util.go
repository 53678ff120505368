package loader

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }

func nativeUint16(b []byte) uint16 { return binary.NativeEndian.Uint16(b) }

// EnsureBPFFS mounts bpffs on dir unless one is there. `ip netns exec`
// remounts /sys, which hides /sys/fs/bpf inside namespaces (docs/platform.md).
func EnsureBPFFS(dir string) error {
	_, err := ensureBPFFS(dir)
	return err
}

func ensureBPFFS(dir string) (mounted bool, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return false, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("bpffs at %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return false, fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	return true, nil
}
