package api

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

// TestBatchAdd: a batch of pairs goes in whole, answered with every ref
// in request order; the SAD holds exactly them, paired per phone on one
// worker, with core addresses allocated per phone.
func TestBatchAdd(t *testing.T) {
	e := newEnv(t, true, 0)
	var specs []sa.Spec
	for i := range 50 {
		specs = append(specs, e.spec(i, "in"), e.spec(i, "out"))
	}
	res, err := e.unix.AddBatch(context.Background(), specs)
	if err != nil {
		t.Fatal(err)
	}
	if res.Added != 100 || len(res.Refs) != 100 {
		t.Fatalf("added %d, refs %d; want 100", res.Added, len(res.Refs))
	}
	if res.Refs[0] != "ue0-in" && res.Refs[0] != "in:0x00001000" {
		t.Errorf("first ref %q", res.Refs[0])
	}
	in, out := e.sad.Len()
	if in != 50 || out != 50 {
		t.Fatalf("SAD holds %d in, %d out; want 50, 50", in, out)
	}
	for i := range 50 {
		a, ok1 := e.sad.GetName(specs[2*i].Name)
		b, ok2 := e.sad.GetName(specs[2*i+1].Name)
		if !ok1 || !ok2 {
			t.Fatalf("pair %d missing", i)
		}
		if a.Worker != b.Worker || !a.SA.Core.IsValid() || a.SA.Core != b.SA.Core {
			t.Errorf("pair %d: workers %d/%d, cores %v/%v: want one worker and one core address", i, a.Worker, b.Worker, a.SA.Core, b.SA.Core)
		}
	}
	// Over TCP with the bearer token, as a provisioning system would.
	tcp := e.client(e.tcp, testToken)
	if _, err := tcp.AddBatch(context.Background(), []sa.Spec{e.spec(60, "in"), e.spec(60, "out")}); err != nil {
		t.Fatal(err)
	}
	if in, out := e.sad.Len(); in != 51 || out != 51 {
		t.Errorf("after the TCP batch: %d in, %d out", in, out)
	}
}

// TestBatchAllOrNothing: one bad item refuses the whole batch, the error
// naming the item's index and the field, and nothing is installed; so do
// a conflict with an SA already held and a duplicate inside the batch.
func TestBatchAllOrNothing(t *testing.T) {
	e := newEnv(t, false, 0)
	good := func() []sa.Spec {
		var specs []sa.Spec
		for i := range 5 {
			specs = append(specs, e.spec(i, "in"), e.spec(i, "out"))
		}
		return specs
	}
	post := func(specs any) (int, errorBody) {
		t.Helper()
		b, err := json.Marshal(specs)
		if err != nil {
			t.Fatal(err)
		}
		st, _, body := e.do("POST", "/v1/sas/batch", "application/json", b)
		var eb errorBody
		if st != http.StatusCreated {
			if err := json.Unmarshal(body, &eb); err != nil {
				t.Fatalf("status %d, body %s", st, body)
			}
		}
		return st, eb
	}
	empty := func(what string) {
		t.Helper()
		if in, out := e.sad.Len(); in+out != 0 {
			t.Fatalf("%s: SAD holds %d in, %d out after a refused batch", what, in, out)
		}
	}

	bad := good()
	bad[7].EncKey = bad[7].EncKey[:32] // 16 bytes: the salt is missing
	rw := uint32(8)
	bad[2].ReplayWindow = &rw
	st, eb := post(bad)
	if st != http.StatusBadRequest {
		t.Fatalf("bad items: status %d: %s", st, eb.Error)
	}
	want := []string{
		`[2]: sa "ue1-in": replay_window: must be 32..4096, or 0 to disable anti-replay; got 8`,
		`[7]: sa "ue3-out": enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 16`,
	}
	if strings.Join(eb.Errors, "\n") != strings.Join(want, "\n") {
		t.Errorf("errors:\n got  %q\n want %q", eb.Errors, want)
	}
	empty("bad items")

	// A JSON type error names the item, its line and the JSON field.
	raw := `[{"spi": "0x1001", "direction": "in"},` + "\n" + `{"spi": 4098, "direction": "in", "replay_window": "x"}]`
	st, _, body := e.do("POST", "/v1/sas/batch", "application/json", []byte(raw))
	if st != http.StatusBadRequest || !strings.Contains(string(body), `[1]: line 2: replay_window: a JSON string where an integer`) ||
		!strings.Contains(string(body), `[0]: sa 0x00001001: mode: required`) {
		t.Errorf("type error: %d %s", st, body)
	}
	empty("type error")

	// Duplicate inside the batch: the later item is named with the first.
	dup := good()
	dup[9].Name = dup[1].Name
	st, eb = post(dup)
	if st != http.StatusBadRequest || !strings.Contains(eb.Error, `[9]: sa "ue0-out": name: "ue0-out" is also used by [1] sa "ue0-out"`) {
		t.Errorf("duplicate: %d %q", st, eb.Error)
	}
	empty("duplicate")

	// A conflict with the SAD: the batch's item 4 is already installed.
	if _, err := e.unix.Add(context.Background(), good()[4]); err != nil {
		t.Fatal(err)
	}
	st, eb = post(good())
	if st != http.StatusConflict || eb.Error != `[4]: sa "ue2-in": in 0x00001002: already exists` {
		t.Errorf("conflict: %d %q", st, eb.Error)
	}
	if in, out := e.sad.Len(); in != 1 || out != 0 {
		t.Errorf("after the refused batch the SAD holds %d in, %d out; want only the one added before", in, out)
	}

	// Not a list, empty, too many.
	for _, c := range []struct {
		body   string
		status int
		msg    string
	}{
		{`{"spi": 4097}`, http.StatusBadRequest, "want a JSON list of SAs"},
		{`[]`, http.StatusBadRequest, "an empty list"},
		{"[" + strings.Repeat(`{"spi": 4097},`, MaxBatch) + `{"spi": 4097}]`, http.StatusRequestEntityTooLarge, "at most 10000 per batch"},
	} {
		st, _, body := e.do("POST", "/v1/sas/batch", "application/json", []byte(c.body))
		if st != c.status || !strings.Contains(string(body), c.msg) {
			t.Errorf("%.30s: %d %s", c.body, st, body)
		}
	}
	if st, _, _ := e.do("POST", "/v1/sas/batch", "text/plain", []byte("[]")); st != http.StatusUnsupportedMediaType {
		t.Errorf("text/plain: %d", st)
	}
}

// TestBatchNeedsAdminToken: the read-only token cannot add a batch, and
// no token at all is refused before the body is read.
func TestBatchNeedsAdminToken(t *testing.T) {
	e := newEnv(t, true, 0)
	b, _ := json.Marshal([]sa.Spec{e.spec(1, "in")})
	if st, _, _ := e.do("POST", "/v1/sas/batch", "application/json", b, "tcp", "Authorization", "Bearer wrong-token-000000000"); st != http.StatusUnauthorized {
		t.Errorf("wrong token: %d", st)
	}
	if in, _ := e.sad.Len(); in != 0 {
		t.Errorf("an unauthenticated batch added %d SAs", in)
	}
}
