package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
)

// POST /v1/rekey installs the new SAs, deletes the old outbound SAs at
// once and the old inbound ones after the grace period; keys never come
// back; bad requests are rejected with what and where, and change nothing.
func TestRekey(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	for _, dir := range []string{"in", "out"} {
		if _, err := e.unix.Add(ctx, e.spec(1, dir)); err != nil {
			t.Fatal(err)
		}
	}
	newIn, newOut := e.spec(1, "in"), e.spec(1, "out")
	newIn.Name, newIn.SPI = "ue1-in-2", sa.SPIOf(0x5001)
	newOut.Name, newOut.SPI = "ue1-out-2", sa.SPIOf(0xd0000001)

	// Rejections first: nothing may change.
	bad := func(body, want string, status int) {
		t.Helper()
		code, _, b := e.do("POST", "/v1/rekey", "application/json", []byte(body))
		if code != status || !strings.Contains(string(b), want) {
			t.Errorf("%s: %d %s, want %d with %q", body, code, b, status, want)
		}
	}
	bad(`{"old": ["ue1-in"]}`, "at least one", http.StatusBadRequest)
	bad(`{"old": ["ue1-in"], "new": [{}], "extra": 1}`, "unknown field", http.StatusBadRequest)
	bad(`{"old": ["nobody"], "new": [{"spi": 1}]}`, "old[0]", http.StatusBadRequest) // and new[0] is invalid too
	bad(`{"old": ["ue1-in"], "new": [{"spi": 1}]}`, "new[0]", http.StatusBadRequest)
	bad(`{"old": ["ue1-in"], "new": [], "grace": "2h"}`, "at least one", http.StatusBadRequest)
	if code, _, _ := e.do("GET", "/v1/rekey", "", nil); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /v1/rekey: %d", code)
	}
	if code, _, _ := e.do("POST", "/v1/rekey", "text/plain", []byte("{}")); code != http.StatusUnsupportedMediaType {
		t.Errorf("text/plain: %d", code)
	}
	if _, err := e.unix.Rekey(ctx, []string{"ue9-in"}, []sa.Spec{newIn}, time.Second); !IsStatus(err, http.StatusNotFound) {
		t.Errorf("unknown old SA: %v, want 404", err)
	}
	if _, err := e.unix.Rekey(ctx, []string{"ue1-in"}, []sa.Spec{e.spec(1, "in")}, time.Second); !IsStatus(err, http.StatusBadRequest) {
		t.Errorf("new SA with the old identity: %v, want 400", err)
	}
	if in, out := e.sad.Len(); in != 1 || out != 1 {
		t.Fatalf("rejected rekeys changed the SAD: %d in, %d out", in, out)
	}

	// The grace is long enough that the Get below lands inside it
	// however slowly a loaded host answers.
	res, err := e.unix.Rekey(ctx, []string{"ue1-in", "ue1-out"}, []sa.Spec{newIn, newOut}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.New) != 2 || len(res.Retired) != 1 || len(res.Draining) != 1 || res.Grace != "2s" {
		t.Fatalf("rekey result %+v", res)
	}
	if _, err := e.unix.Get(ctx, "ue1-in"); err != nil {
		t.Fatalf("old inbound SA gone before its grace period ended: %v", err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := e.unix.Get(ctx, "ue1-in"); IsStatus(err, http.StatusNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("old inbound SA still there after its grace period")
		}
	}
	if _, err := e.unix.Get(ctx, "ue1-out"); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("old outbound SA after the grace period: %v", err)
	}
	for _, name := range []string{"ue1-in-2", "ue1-out-2"} {
		if _, err := e.unix.Get(ctx, name); err != nil {
			t.Fatalf("new SA %s: %v", name, err)
		}
	}
}

// Issue 18: concurrent POST /v1/rekey calls for the same old SAs, each
// with its own new SAs (as a hostile or confused client sends them). In
// every trial exactly one gets 200, the others 409, and the SAD ends with
// exactly one replacement pair.
func TestConcurrentRekeyOneWinner(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	const trials, racers = 30, 5
	for trial := 0; trial < trials; trial++ {
		// Fresh old SAs each trial, named per trial.
		oldIn, oldOut := e.spec(trial+1, "in"), e.spec(trial+1, "out") // one phone per trial: trials must not overlap each other
		oldIn.Name, oldIn.SPI = fmt.Sprintf("t%d-in", trial), sa.SPIOf(uint32(0x10000+trial))
		oldOut.Name, oldOut.SPI = fmt.Sprintf("t%d-out", trial), sa.SPIOf(uint32(0x20000+trial))
		for _, s := range []sa.Spec{oldIn, oldOut} {
			if _, err := e.unix.Add(ctx, s); err != nil {
				t.Fatal(err)
			}
		}
		inBefore, outBefore := e.sad.Len()
		codes := make([]int, racers)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for r := 0; r < racers; r++ {
			newIn, newOut := e.spec(trial+1, "in"), e.spec(trial+1, "out")
			newIn.Name, newIn.SPI = fmt.Sprintf("t%d-in-r%d", trial, r), sa.SPIOf(uint32(0x300000+trial*racers+r))
			newOut.Name, newOut.SPI = fmt.Sprintf("t%d-out-r%d", trial, r), sa.SPIOf(uint32(0x400000+trial*racers+r))
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				_, err := e.unix.Rekey(ctx, []string{oldIn.Name, oldOut.Name}, []sa.Spec{newIn, newOut}, 10*time.Minute)
				var ae *Error
				switch {
				case err == nil:
					codes[r] = 200
				case errors.As(err, &ae):
					codes[r] = ae.Status
					if ae.Status != http.StatusConflict {
						t.Logf("trial %d racer %d: %v", trial, r, err)
					}
				default:
					t.Errorf("trial %d racer %d: %v", trial, r, err)
				}
			}()
		}
		close(start)
		wg.Wait()
		won, lost := 0, 0
		for _, c := range codes {
			switch c {
			case 200:
				won++
			case http.StatusConflict:
				lost++
			}
		}
		if won != 1 || lost != racers-1 {
			t.Fatalf("trial %d: statuses %v, want one 200 and %d 409", trial, codes, racers-1)
		}
		// One new pair added; the old outbound SA retired at once, the old
		// inbound one draining (grace 10 min).
		in, out := e.sad.Len()
		if in != inBefore+1 || out != outBefore {
			t.Fatalf("trial %d: SAD has %d in, %d out; want %d, %d (exactly one replacement)", trial, in, out, inBefore+1, outBefore)
		}
	}
}
