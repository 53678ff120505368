package demo

import (
	"bytes"
	"context"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/xesp/xesp/internal/netns"
)

// The demo is the product's seed scenario end to end: it must succeed, and
// its table must show every phone registered behind one NAPT address with
// a distinct port, and no reply at the wrong phone.
func TestDemo(t *testing.T) {
	netns.RequireRoot(t)
	var out bytes.Buffer
	if err := Run(context.Background(), Options{Phones: 4, Out: &out}); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	rows := regexp.MustCompile(`(?m)^ue(\d)\s+\S+\s+(10\.99\.0\.\d)\s+198\.51\.100\.2:(\d+)\s+\S+\s+yes\s+(\d+)\s+(\d+)/(\d+)$`).FindAllStringSubmatch(text, -1)
	if len(rows) != 4 {
		t.Fatalf("want 4 registered phones in the table:\n%s", text)
	}
	ports := map[string]bool{}
	for _, r := range rows {
		ports[r[3]] = true
		if r[4] != "1" || r[5] != "2" || r[6] != "2" {
			t.Fatalf("phone %s: OPTIONS %s, ESP %s/%s; want 1 and 2/2:\n%s", r[1], r[4], r[5], r[6], text)
		}
	}
	if len(ports) != 4 {
		t.Fatalf("phones share NAPT ports %v:\n%s", ports, text)
	}
	if !strings.Contains(text, "replies delivered to the wrong phone: 0") {
		t.Fatalf("missing wrong-phone count:\n%s", text)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); bytes.Contains(out, []byte("xesp-")) {
		t.Fatalf("demo left namespaces behind:\n%s", out)
	}
}
