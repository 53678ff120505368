package metrics_test

import (
	"testing"

	"github.com/xesp/xesp/control/lifetime"
	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// The lifetime enforcer's expiries appear as
// xesp_sa_lifetime_expiries_total{kind, limit}, every pair present.
func TestLifetimeFigures(t *testing.T) {
	d, _ := sad.New(sad.Options{Workers: 1})
	sas, err := sa.ParseBytes([]byte(`
- {spi: 0x1001, direction: in, mode: tunnel, proposal: aes128gcm16, enc_key: 000102030405060708090a0b0c0d0e0f10111213,
   local: 192.0.2.1, peer: 192.0.2.10, inner: {local: 10.0.0.0/24, peer: 10.99.0.1/32}, lifetime: {soft_bytes: 10}}
- {spi: 0x1002, direction: in, mode: tunnel, proposal: aes128gcm16, enc_key: 000102030405060708090a0b0c0d0e0f10111213,
   local: 192.0.2.1, peer: 192.0.2.10, inner: {local: 10.0.0.0/24, peer: 10.99.0.2/32}, lifetime: {hard_packets: 5}}
`), sa.YAML, sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddAll(sas); err != nil {
		t.Fatal(err)
	}
	lt, _ := lifetime.New(lifetime.Options{SAD: d, Usage: func(sa.ID) (lifetime.Usage, bool) {
		return lifetime.Usage{Packets: 5, Bytes: 100}, true
	}})
	lt.Check()
	_, mfs := scrape(t, serve(t, metrics.Sources{Lifetime: lt.Counts}))
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "xesp_sa_lifetime_expiries_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, p := range m.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			got[l["kind"]+"/"+l["limit"]] = m.GetCounter().GetValue()
		}
	}
	if len(got) != 9 || got["idle/idle"] != 0 || got["soft/bytes"] != 1 || got["hard/packets"] != 1 || got["hard/time"] != 0 {
		t.Fatalf("lifetime series: %v", got)
	}
}
