package api

import (
	"context"
	"time"

	"github.com/xesp/xesp/control/sa"
)

// DataPath is what the API reads from the running data path. The manager
// implements it; every method must be safe for concurrent use and cheap
// enough to call once per listed SA.
type DataPath interface {
	// SACounters returns the figures of one SA, false when the data path
	// does not (yet) hold it.
	SACounters(id sa.ID) (SACounters, bool)
	Stats() Stats
	Health() Health
	// Synced returns once the data path reflects the SA database at
	// version (sad.SAD.Version), so a change the API acknowledges is in
	// force: an SA added can carry the very next packet.
	Synced(ctx context.Context, version uint64) error
}

// SACounters are one SA's data-path figures.
type SACounters struct {
	Packets uint64 `json:"packets"` // processed successfully
	Bytes   uint64 `json:"bytes"`
	Drops   uint64 `json:"drops"` // packets dropped after the SA was identified
	// Seq is the last sequence number sent (outbound) or the highest
	// received and authenticated (inbound).
	Seq uint64 `json:"seq"`
	// LastSeen is when the last authenticated packet arrived (inbound
	// SAs); LastKeepalive when the current binding last sent a
	// NAT-keepalive. Absent: none since the data path holds the SA.
	LastSeen      *time.Time `json:"last_seen,omitempty"`
	LastKeepalive *time.Time `json:"last_keepalive,omitempty"`
}

// DirStats are one direction's totals: inbound is decapsulation (public
// to private), outbound encapsulation.
type DirStats struct {
	Packets uint64 `json:"packets"` // forwarded
	Bytes   uint64 `json:"bytes"`
	// Drops counts dropped packets by reason name (the metric labels:
	// integ_error, replay, no_sa, tx_full, ...).
	Drops map[string]uint64 `json:"drops,omitempty"`
}

// SACount is how many SAs exist per direction.
type SACount struct {
	In  int `json:"in"`
	Out int `json:"out"`
}

// WorkerStats are one ESP worker's figures.
type WorkerStats struct {
	Worker         int    `json:"worker"`
	SAs            int    `json:"sas"`
	DecapPackets   uint64 `json:"decap_packets"`
	EncapPackets   uint64 `json:"encap_packets"`
	Drops          uint64 `json:"drops"`
	BindingChanges uint64 `json:"binding_changes"`
}

// Stats are the gateway's totals. The server fills SAs and each worker's
// SAs from the SAD, which is their source of truth; the data path fills
// the rest.
type Stats struct {
	In  DirStats `json:"in"`
	Out DirStats `json:"out"`
	// XDP counts packets by XDP verdict reason name (bpf.Reason strings).
	XDP            map[string]uint64 `json:"xdp,omitempty"`
	SAs            SACount           `json:"sas"`
	BindingChanges uint64            `json:"binding_changes"`
	Workers        []WorkerStats     `json:"workers,omitempty"`
}

// Health says whether the gateway forwards traffic. The server fills SAs
// and Uptime; the data path the rest.
type Health struct {
	OK bool `json:"ok"`
	// Problems says why OK is false, one line each.
	Problems []string `json:"problems,omitempty"`
	// XDP is the attach mode per interface name (native, generic).
	XDP map[string]string `json:"xdp,omitempty"`
	// AFXDP is the socket bind mode (zerocopy, copy).
	AFXDP   string  `json:"af_xdp,omitempty"`
	Workers int     `json:"workers"`
	SAs     SACount `json:"sas"`
	// UptimeSeconds counts from the server's start.
	UptimeSeconds float64 `json:"uptime_seconds"`
}

// SAView is what the API shows of an SA: the public Spec (never keys) and
// its runtime fields.
type SAView struct {
	sa.Spec
	Ref     string    `json:"ref"`     // canonical reference, see the package doc
	Worker  uint16    `json:"worker"`  // owning worker
	Index   uint32    `json:"index"`   // slot in the worker's table
	State   string    `json:"state"`   // active, soft-expired, hard-expired
	Binding string    `json:"binding"` // current NAT binding: peer address:port
	Created time.Time `json:"created"`
	// Counters is absent while the data path does not hold the SA yet.
	Counters *SACounters `json:"counters,omitempty"`
}

// Page is one page of GET /v1/sas.
type Page struct {
	Items []SAView `json:"items"`
	// Next is the cursor of the following page, empty on the last one.
	Next string `json:"next,omitempty"`
}

// errorBody is every error response.
type errorBody struct {
	Error string `json:"error"`
	// Errors lists the individual problems when there are several.
	Errors []string `json:"errors,omitempty"`
}

// Flood is one SA whose flood budget XDP has enforced (GET /v1/floods):
// its packets from sources other than its binding were dropped in XDP
// because failed authentications spent the SA's or the source's budget.
type Flood struct {
	SA      string `json:"sa"` // reference of the SA, as in SAView.Ref
	Name    string `json:"name,omitempty"`
	SPI     string `json:"spi"`
	Binding string `json:"binding"` // the SA's current NAT binding, never dropped
	// XDPDrops counts the packets dropped in XDP for the budgets (all
	// time); SADrops the packets the SA's worker dropped after looking
	// the SA up, failed authentications among them.
	XDPDrops uint64 `json:"xdp_drops"`
	SADrops  uint64 `json:"sa_drops"`
	// Active says XDP dropped packets for the SA within the last check
	// (about a second): the flood is going on.
	Active bool      `json:"active"`
	Since  time.Time `json:"since,omitzero"` // when the current flood was first seen
}

// Floods is the body of GET /v1/floods.
type Floods struct {
	Items []Flood `json:"items"`
}

// FloodReporter is the optional part of a DataPath that knows the flood
// budgets (the gateway's); without it GET /v1/floods answers 503.
type FloodReporter interface {
	Floods() []Flood
}
