package bpf_test

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/xesp/xesp/bpf"
)

// TestReasonNamesMatchBTF keeps the Go metric labels in step with the enum
// compiled into the object: same count, and each label is the C name.
func TestReasonNamesMatchBTF(t *testing.T) {
	spec, err := bpf.LoadXesp()
	if err != nil {
		t.Fatal(err)
	}
	var e *btf.Enum
	if err := spec.Types.TypeByName("xesp_reason", &e); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, v := range e.Values {
		if v.Name == "XESP_REASON_MAX" {
			if int(v.Value) != bpf.NumReasons {
				t.Errorf("XESP_REASON_MAX = %d, NumReasons = %d", v.Value, bpf.NumReasons)
			}
			continue
		}
		n++
		want := strings.ToLower(strings.TrimPrefix(v.Name, "XESP_"))
		if got := bpf.Reason(v.Value).String(); got != want {
			t.Errorf("reason %d: label %q, want %q", v.Value, got, want)
		}
	}
	if n != bpf.NumReasons {
		t.Errorf("%d reasons in BTF, NumReasons = %d", n, bpf.NumReasons)
	}
	if s := bpf.Reason(99).String(); s != "reason_99" {
		t.Errorf("unknown reason label %q", s)
	}
}

func TestMetaSize(t *testing.T) {
	spec, err := bpf.LoadXesp()
	if err != nil {
		t.Fatal(err)
	}
	var s *btf.Struct
	if err := spec.Types.TypeByName("xesp_meta", &s); err != nil {
		t.Fatal(err)
	}
	if s.Size != bpf.MetaSize || s.Size%4 != 0 {
		t.Errorf("sizeof(struct xesp_meta) = %d, MetaSize = %d (adjust_meta needs a multiple of 4)", s.Size, bpf.MetaSize)
	}
}
