// Package kamailio carries the SIP core's configuration used by the
// end-to-end tests and the demo, so the xesp binary runs them from any
// directory. The file itself, kamailio.cfg, is what to read and edit.
package kamailio

import _ "embed"

// Config is kamailio.cfg.
//
//go:embed kamailio.cfg
var Config string

// PCSCF is pcscf.cfg: Kamailio as an IMS P-CSCF with xesp as its IPsec
// data plane (docs/pcscf.md). It imports pcscf-local.cfg for site values.
//
//go:embed pcscf.cfg
var PCSCF string
