package metrics_test

import (
	"testing"

	"github.com/xesp/xesp/control/metrics"
)

// The etcd source's refusals and the API listener's connection figures
// appear as their series.
func TestSecurityFigures(t *testing.T) {
	_, mfs := scrape(t, serve(t, metrics.Sources{
		EtcdRejected: func() map[string]uint64 { return map[string]uint64{"unknown_key": 3, "unsealable": 1, "invalid": 0} },
		APIConns:     func() (int64, uint64) { return 17, 42 },
	}))
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, p := range m.GetLabel() {
				key += "/" + p.GetValue()
			}
			switch {
			case m.Counter != nil:
				got[key] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				got[key] = m.GetGauge().GetValue()
			}
		}
	}
	for k, v := range map[string]float64{"xesp_etcd_sa_records_rejected_total/unknown_key": 3, "xesp_etcd_sa_records_rejected_total/unsealable": 1,
		"xesp_etcd_sa_records_rejected_total/invalid": 0, "xesp_api_tcp_connections": 17, "xesp_api_tcp_refused_total": 42} {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
}
