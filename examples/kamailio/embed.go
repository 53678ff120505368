// Package kamailio carries the SIP core's configuration used by the
// end-to-end tests and the demo, so the xesp binary runs them from any
// directory. The file itself, kamailio.cfg, is what to read and edit.
package kamailio

import _ "embed"

// Config is kamailio.cfg.
//
//go:embed kamailio.cfg
var Config string
