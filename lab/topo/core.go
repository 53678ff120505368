package topo

import (
	"net/netip"

	"github.com/xesp/xesp/control/sa"
)

// coreOf is the core address the gateway gave an SA (CoreFromPool).
func coreOf(s *sa.SA) netip.Addr { return s.Core }
