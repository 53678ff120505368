package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

const testToken = "s3cret-token-0123456789"

// fakeDP is a data path with fixed figures: an SA's counters derive from
// its SPI, so a test can tell that the right SA's figures were shown.
type fakeDP struct {
	ok atomic.Bool
	// stalled makes Synced fail, as a data path that does not catch up.
	stalled atomic.Bool
}

func countersOf(id sa.ID) (SACounters, bool) {
	if id.SPI&0xff == 0xee {
		return SACounters{}, false // not in the data path yet
	}
	return SACounters{Packets: uint64(id.SPI), Bytes: uint64(id.SPI) * 100, Drops: 3, Seq: 7}, true
}

func (*fakeDP) SACounters(id sa.ID) (SACounters, bool) { return countersOf(id) }

func (*fakeDP) Stats() Stats {
	return Stats{
		In:             DirStats{Packets: 1000, Bytes: 150000, Drops: map[string]uint64{"replay": 4, "integ_error": 2}},
		Out:            DirStats{Packets: 900, Bytes: 140000, Drops: map[string]uint64{"tx_full": 1}},
		XDP:            map[string]uint64{"redirect_esp_udp": 1006, "drop_no_sa": 9},
		BindingChanges: 5,
		// A stale SA count the server must overwrite from the SAD.
		SAs:     SACount{In: 99, Out: 99},
		Workers: []WorkerStats{{Worker: 0, DecapPackets: 600, EncapPackets: 500, Drops: 4, BindingChanges: 3}, {Worker: 1, DecapPackets: 400, EncapPackets: 400, Drops: 3, BindingChanges: 2}},
	}
}

// Synced: the fake data path reflects every change at once, unless stalled.
func (d *fakeDP) Synced(context.Context, uint64) error {
	if d.stalled.Load() {
		return errors.New("data path stalled")
	}
	return nil
}

func (d *fakeDP) Health() Health {
	h := Health{OK: d.ok.Load(), XDP: map[string]string{"pub0": "native", "priv0": "native"}, AFXDP: "copy", Workers: 2}
	if !h.OK {
		h.Problems = []string{"public: xdp program detached"}
	}
	return h
}

// env is a running server with a real SAD behind a real Unix socket and,
// optionally, TCP on 127.0.0.1.
type env struct {
	t    *testing.T
	sad  *sad.SAD
	dp   *fakeDP
	srv  *Server
	sock string
	tcp  string // base URL, "" without TCP
	unix *Client
	// keys holds the hex of every key the test sent; bodies records
	// every response body, for the scan that proves none is echoed.
	mu     sync.Mutex
	keys   []string
	bodies [][]byte
}

// shortDir returns a temp dir with a short path: socket paths are
// limited to 108 bytes and t.TempDir embeds the test name.
func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "xapi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func newEnv(t *testing.T, withTCP bool, maxSAs int) *env {
	t.Helper()
	d, err := sad.New(sad.Options{Workers: 2, MaxSAs: maxSAs, LogSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, sad: d, dp: &fakeDP{}, sock: filepath.Join(shortDir(t), "run", "api.sock")}
	e.dp.ok.Store(true)
	cfg := config.API{Unix: e.sock}
	if withTCP {
		cfg.TCP = "127.0.0.1:0"
		cfg.BearerToken = sa.Secret(testToken)
	}
	e.srv, err = New(Options{SAD: d, DataPath: e.dp, API: cfg, CorePool: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Listen(); err != nil {
		t.Fatal(err)
	}
	if withTCP {
		e.tcp = "http://" + e.srv.TCPAddr().String()
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Lstat(e.sock); !os.IsNotExist(err) {
			t.Errorf("socket file left behind after shutdown: %v", err)
		}
		e.scanForKeys()
	})
	e.unix = e.client("unix:"+e.sock, "")
	return e
}

// client returns an API client whose responses are recorded for the key
// scan.
func (e *env) client(addr, token string) *Client {
	c, err := NewClient(addr, token)
	if err != nil {
		e.t.Fatal(err)
	}
	c.hc.Transport = &recorder{next: c.hc.Transport, e: e}
	e.t.Cleanup(c.Close)
	return c
}

type recorder struct {
	next http.RoundTripper
	e    *env
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := r.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	r.e.record(b)
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp, nil
}

func (e *env) record(b []byte) {
	e.mu.Lock()
	e.bodies = append(e.bodies, b)
	e.mu.Unlock()
}

// scanForKeys fails the test if any response carried 8 consecutive bytes
// of any key the test sent, in hex (either case) or raw.
func (e *env) scanForKeys() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if leak := leaks(e.keys, e.bodies); leak != "" {
		e.t.Error(leak)
	}
}

// leaks returns a description of the first response holding key
// material, "" when none does.
func leaks(keys []string, bodies [][]byte) string {
	hexWin := map[string]bool{}
	rawWin := map[string]bool{}
	for _, k := range keys {
		raw, _ := hex.DecodeString(k)
		for i := 0; i+8 <= len(raw); i++ {
			hexWin[k[2*i:2*i+16]] = true
			rawWin[string(raw[i:i+8])] = true
		}
	}
	if len(hexWin) == 0 {
		return ""
	}
	isHex := func(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' }
	for _, b := range bodies {
		low := []byte(strings.ToLower(string(b)))
		for i := 0; i+16 <= len(low); i++ {
			if isHex(low[i]) && hexWin[string(low[i:i+16])] {
				return fmt.Sprintf("response leaks key material %s: %s", low[i:i+16], clipBody(b))
			}
		}
		for i := 0; i+8 <= len(b); i++ {
			if rawWin[string(b[i:i+8])] {
				return fmt.Sprintf("response leaks raw key bytes: %s", clipBody(b))
			}
		}
	}
	return ""
}

func clipBody(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "..."
	}
	return string(b)
}

// key returns fresh random key hex of n bytes and remembers it.
func (e *env) key(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		e.t.Fatal(err)
	}
	k := hex.EncodeToString(b)
	e.mu.Lock()
	e.keys = append(e.keys, k)
	e.mu.Unlock()
	return k
}

// spec is phone i's SA in direction dir, as a client would send it.
func (e *env) spec(i int, dir string) sa.Spec {
	spi := uint32(0x1000 + i)
	if dir == "out" {
		spi = 0xc0000000 + uint32(i)
	}
	pp := uint16(30000 + i)
	sp := sa.Spec{
		Name: fmt.Sprintf("ue%d-%s", i, dir), SPI: sa.SPIOf(spi), Direction: dir, Mode: "tunnel",
		Proposal: "aes128gcm16", EncKey: e.key(20),
		Local: "198.51.100.20", Peer: fmt.Sprintf("192.0.2.%d", 1+i%250),
		Encap: &sa.EncapSpec{PeerPort: &pp},
		Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}).String()},
	}
	return sp
}

// do sends a raw request over the Unix socket (or TCP with a token when
// token is not empty) and returns status, headers and body.
func (e *env) do(method, path, ctype string, body []byte, hdr ...string) (int, http.Header, []byte) {
	e.t.Helper()
	c := e.unix
	base := "http://xesp"
	if len(hdr) > 0 && hdr[0] == "tcp" {
		c, base, hdr = e.client(e.tcp, testToken), e.tcp, hdr[1:]
	}
	req, err := http.NewRequest(method, base+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, b
}
