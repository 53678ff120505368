package demo

import (
	"bytes"
	"context"
	"os/exec"
	"regexp"
	"strconv"
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
	retx := map[string]int{}
	for _, m := range regexp.MustCompile(`(?m)^ue(\d) retransmitted (\d+) time`).FindAllStringSubmatch(text, -1) {
		retx[m[1]], _ = strconv.Atoi(m[2])
	}
	ports := map[string]bool{}
	for _, r := range rows {
		ports[r[3]] = true
		// REGISTER and OPTIONS each way; a retransmission adds a pair
		// when the first try reached the gateway, nothing when it was
		// lost before. Every decrypted request got exactly one reply.
		in, _ := strconv.Atoi(r[5])
		out, _ := strconv.Atoi(r[6])
		if r[4] != "1" || in != out || in < 2 || in > 2+retx[r[1]] {
			t.Fatalf("phone %s: OPTIONS %s, ESP %d/%d with %d retransmissions:\n%s", r[1], r[4], in, out, retx[r[1]], text)
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
