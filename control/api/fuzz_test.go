package api

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sad"
)

// FuzzRequestDecoding: arbitrary bodies to POST and PUT never panic and
// never get a 5xx: the answer is 201/200 for a valid SA or a 4xx with a
// JSON error.
func FuzzRequestDecoding(f *testing.F) {
	f.Add([]byte(`{"name":"ue1-in","spi":"0x00001001","direction":"in","mode":"tunnel","proposal":"aes128gcm16","enc_key":"000102030405060708090a0b0c0d0e0fcafebabe","local":"198.51.100.20","peer":"192.0.2.10","encap":{},"inner":{"local":"10.0.0.0/24","peer":"100.64.0.1"}}`), false)
	f.Add([]byte(`{"sas":[{"spi":4097},{"spi":4098}]}`), false)
	f.Add([]byte(`[{"spi":"0x1001","direction":"out","mode":"tunnel","inner":{"local":"::/0","peer":"2001:db8::1"}}]`), true)
	f.Add([]byte(`{"spi": 4097, "enc_key_file": "/etc/shadow"}`), true)
	f.Add([]byte("\xef\xbb\xbf{\"spi\":1e400}"), false)
	f.Fuzz(func(t *testing.T, body []byte, put bool) {
		d, err := sad.New(sad.Options{Workers: 2, MaxSAs: 4, LogSize: 16})
		if err != nil {
			t.Fatal(err)
		}
		s, err := New(Options{SAD: d, API: config.API{Unix: "/nonexistent/api.sock"}})
		if err != nil {
			t.Fatal(err)
		}
		method, path, okStatus := "POST", "/v1/sas", http.StatusCreated
		if put {
			// PUT resolves the ref first: give it an SA to replace.
			seed := httptest.NewRequest("POST", "/v1/sas", strings.NewReader(`{"spi":4097,"direction":"in","mode":"tunnel","proposal":"null-sha1","auth_key":"`+strings.Repeat("ab", 20)+`","local":"192.0.2.1","peer":"192.0.2.2","inner":{"local":"10.0.0.0/24","peer":"100.64.0.1"}}`))
			seed.Header.Set("Content-Type", "application/json")
			rec := httptest.NewRecorder()
			s.Handler().ServeHTTP(rec, seed)
			if rec.Code != http.StatusCreated {
				t.Fatalf("seed: %d %s", rec.Code, rec.Body)
			}
			method, path, okStatus = "PUT", "/v1/sas/in:0x1001", http.StatusOK
		}
		req := httptest.NewRequest(method, path, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, req)
		if rec.Code == okStatus {
			return
		}
		if rec.Code < 400 || rec.Code > 499 {
			t.Fatalf("status %d for %q: %s", rec.Code, body, rec.Body)
		}
		var eb errorBody
		if err := json.Unmarshal(rec.Body.Bytes(), &eb); err != nil || eb.Error == "" {
			t.Fatalf("status %d without a JSON error: %q", rec.Code, rec.Body)
		}
	})
}
