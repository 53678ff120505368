package worker

import (
	"testing"

	"github.com/xesp/xesp/dataplane/esp"
)

// newBenchSlot is an entry for c as the manager builds one.
func newBenchSlot(b *testing.B, c esp.Config) *Slot {
	e, err := NewSlot(c)
	if err != nil {
		b.Fatal(err)
	}
	return e
}
