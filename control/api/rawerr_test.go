package api

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sad"
)

// rawRequest sends bytes as they are on a fresh connection to the API
// socket and reads the answer, as a client that is not Go's would.
func rawRequest(t *testing.T, sock, req string) (int, string, []byte) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), b
}

// Every error is JSON, also those net/http answers itself before any
// handler runs, and a path with "." or ".." segments is refused with a
// 400 rather than redirected (a method-preserving 307 would have made
// DELETE /v1/secagree/../sas/X delete /v1/sas/X).
func TestErrorsAreJSONAndPathsExact(t *testing.T) {
	e := newEnv(t, false, 0)
	ctx := context.Background()
	if _, err := e.unix.Add(ctx, e.spec(1, "in")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, req string
		status    int
		msg       string
	}{
		{"dot-dot delete", "DELETE /v1/secagree/../sas/ue1-in HTTP/1.1\r\nHost: xesp\r\n\r\n", 400,
			`path "/v1/secagree/../sas/ue1-in": no ".", ".." or empty segments: name the resource directly`},
		{"dot segment", "GET /v1/./sas HTTP/1.1\r\nHost: xesp\r\n\r\n", 400,
			`path "/v1/./sas": no ".", ".." or empty segments: name the resource directly`},
		{"empty segment", "GET /v1//sas HTTP/1.1\r\nHost: xesp\r\n\r\n", 400,
			`path "/v1//sas": no ".", ".." or empty segments: name the resource directly`},
		{"encoded dot-dot", "DELETE /v1/secagree/%2e%2e/sas/ue1-in HTTP/1.1\r\nHost: xesp\r\n\r\n", 400,
			`path "/v1/secagree/../sas/ue1-in": no ".", ".." or empty segments: name the resource directly`},
		{"headers too large", "GET /v1/health HTTP/1.1\r\nHost: xesp\r\nX-Big: " + strings.Repeat("a", 40<<10) + "\r\n\r\n", 431,
			"request: 431 Request Header Fields Too Large"},
		{"malformed header", "GET /v1/health HTTP/1.1\r\nHost: xesp\r\nno colon here\r\n\r\n", 400,
			"request: 400 Bad Request"},
		{"bad transfer encoding", "POST /v1/sas HTTP/1.1\r\nHost: xesp\r\nTransfer-Encoding: rot13\r\n\r\n", 501,
			"request: Unsupported transfer encoding"},
	} {
		st, ct, b := rawRequest(t, e.sock, c.req)
		if st != c.status || ct != "application/json" {
			t.Errorf("%s: %d %s %s, want %d application/json", c.name, st, ct, b, c.status)
			continue
		}
		assertError(t, b, c.msg)
	}
	if _, err := e.unix.Get(ctx, "ue1-in"); err != nil {
		t.Fatalf("the SA a dot-dot path named is gone: %v", err)
	}
}

// A socket path too long to bind is reported against the configured path
// (api.unix), never the temporary name the socket is first bound at.
func TestListenErrorNamesConfiguredPath(t *testing.T) {
	dir := filepath.Join(shortDir(t), strings.Repeat("d", 90))
	for _, sock := range []string{filepath.Join(dir, "api.sock"), filepath.Join(shortDir(t), strings.Repeat("s", 110))} {
		s, err := New(Options{SAD: mustSAD(t), DataPath: &fakeDP{}, API: config.API{Unix: sock}})
		if err != nil {
			t.Fatal(err)
		}
		err = s.Listen()
		if err == nil || !strings.Contains(err.Error(), sock) || strings.Contains(err.Error(), ".xesp-api-") {
			t.Fatalf("listen on %s: %v", sock, err)
		}
	}
}

func mustSAD(t *testing.T) *sad.SAD {
	d, err := sad.New(sad.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	return d
}
