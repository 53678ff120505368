package netns

import (
	"os"
	"testing"
)

// RequireRoot stops a test that needs root (BPF, namespaces). Under -short
// it skips; otherwise it fails, so a CI run without root cannot pass by
// silently testing nothing.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if testing.Short() {
		t.Skip("needs root (BPF, network namespaces)")
	}
	t.Fatal("needs root (BPF, network namespaces); run as root or with -short")
}

// ForTest creates a namespace for the test and deletes it when the test
// ends, failed or not.
func ForTest(t testing.TB, prefix string) *NS {
	t.Helper()
	RequireRoot(t)
	ns, err := New(UniqueName(prefix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Close(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return ns
}

// VethForTest links a and b with a veth pair and returns the two end names.
// The pair disappears with the namespaces.
func VethForTest(t testing.TB, a, b *NS) (aName, bName string) {
	t.Helper()
	aName, bName = UniqueName("va"), UniqueName("vb")
	if err := Veth(a, aName, b, bName); err != nil {
		t.Fatal(err)
	}
	return aName, bName
}

// VethQueuesForTest is VethForTest with queues TX and RX queues per end.
func VethQueuesForTest(t testing.TB, a, b *NS, queues int) (aName, bName string) {
	t.Helper()
	aName, bName = UniqueName("va"), UniqueName("vb")
	if err := VethQueues(a, aName, b, bName, queues); err != nil {
		t.Fatal(err)
	}
	return aName, bName
}
