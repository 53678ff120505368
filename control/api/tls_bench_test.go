package api

import (
	"context"
	"net/http"
	"sort"
	"testing"
	"time"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/lab/testpki"
)

// BenchmarkGetSATLS measures GET /v1/sas/{ref} over plain TCP (loopback,
// api.insecure) and over TLS 1.3 in the same run, on kept-alive
// connections (what the CLI and a P-CSCF do), and over TLS with a new
// connection per request (a handshake each). It reports the medians and
// the TLS/plain ratios: the plain listener is the ceiling.
func BenchmarkGetSATLS(b *testing.B) {
	dir := b.TempDir()
	ca := testpki.New(b, dir, "api")
	p := ca.Server(b, "srv", "127.0.0.1")
	tok := sa.Secret(testToken)
	plain := serveTest(b, Options{API: config.API{TCP: "127.0.0.1:0", Insecure: true, BearerToken: tok}})
	tlsSrv := serveTest(b, Options{API: config.API{TCP: "127.0.0.1:0", BearerToken: tok,
		TLS: &config.APITLS{CertPath: p.CertPath, KeyPath: p.KeyPath}}, SAD: plain.sad})
	sp := sa.Spec{Name: "ue1-in", SPI: sa.SPIOf(0x1001), Direction: "in", Mode: "tunnel", Proposal: "aes128gcm16",
		EncKey: "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4", Local: "198.51.100.20", Peer: "192.0.2.1",
		Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: "100.64.0.1"}}
	s, err := sp.Parse(sa.Options{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := plain.sad.Add(s); err != nil {
		b.Fatal(err)
	}
	cfg, _ := ClientTLS(ca.Path, "", "")
	mk := func(addr string, o ClientOptions) *Client {
		c, err := NewClientWith(addr, o)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(c.Close)
		return c
	}
	cPlain := mk("http://"+plain.TCPAddr().String(), ClientOptions{Token: testToken})
	cTLS := mk("https://"+tlsSrv.TCPAddr().String(), ClientOptions{Token: testToken, TLS: cfg})
	cFresh := mk("https://"+tlsSrv.TCPAddr().String(), ClientOptions{Token: testToken, TLS: cfg})
	cFresh.hc.Transport.(*http.Transport).DisableKeepAlives = true
	ctx := context.Background()
	n := max(b.N, 2000)
	med := func(c *Client, n int) time.Duration {
		ds := make([]time.Duration, n)
		for i := range ds {
			t0 := time.Now()
			if _, err := c.Get(ctx, "ue1-in"); err != nil {
				b.Fatal(err)
			}
			ds[i] = time.Since(t0)
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return ds[len(ds)/2]
	}
	b.ResetTimer()
	// Interleaved rounds so both see the same machine load.
	var mp, mt []time.Duration
	for range 5 {
		mp = append(mp, med(cPlain, n/5))
		mt = append(mt, med(cTLS, n/5))
	}
	mh := med(cFresh, 200)
	b.StopTimer()
	mid := func(d []time.Duration) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	pp, pt := mid(mp), mid(mt)
	b.ReportMetric(float64(pp.Microseconds()), "p50-plain-µs")
	b.ReportMetric(float64(pt.Microseconds()), "p50-tls-µs")
	b.ReportMetric(float64(mh.Microseconds()), "p50-tls-handshake-µs")
	b.ReportMetric(float64(pt)/float64(pp), "tls/plain")
	b.ReportMetric(float64(mh)/float64(pp), "tls-new-conn/plain")
}
