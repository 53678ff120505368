package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The daemon an operator installs links the product only: no lab, no
// benchmark, no test helpers, no phone emulator, no SIP configs.
func TestDaemonLinksOnlyTheProduct(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	const mod = "github.com/xesp/xesp/"
	forbidden := []string{mod + "lab/", mod + "bench/", mod + "examples/", mod + "cmd/xesp-lab"}
	var own int
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, mod) {
			own++
		}
		for _, f := range forbidden {
			if strings.HasPrefix(p, f) {
				t.Errorf("the daemon links %s", p)
			}
		}
		if p == "testing" || strings.HasPrefix(p, mod) && strings.Contains(p[len(mod):], "test") {
			t.Errorf("the daemon links test package %s", p)
		}
	}
	if own < 10 {
		t.Fatalf("go list -deps named only %d of xesp's own packages: the check would see nothing\n%s", own, out)
	}
}
