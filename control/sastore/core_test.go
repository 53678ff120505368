package sastore

import (
	"net/netip"
	"testing"

	"github.com/xesp/xesp/control/sa"
)

// An API SA's core address (allocated from core_pool or given) survives
// the store: a restart must not move a phone to another address toward
// the SIP core.
func TestCoreAddressPersists(t *testing.T) {
	sp := sa.Spec{Name: "ph0-out", SPI: sa.SPIOf(0x2001), Direction: "out", Mode: "tunnel", Proposal: "aes128gcm16",
		EncKey: "000102030405060708090a0b0c0d0e0f10111213", Local: "198.51.100.1", Peer: "198.51.100.7", Encap: &sa.EncapSpec{},
		Inner: &sa.InnerSpec{Local: "10.0.0.0/24", Peer: "192.168.1.10", Core: "100.64.0.7"}, Ports: &sa.PortsSpec{Local: 5065, Peer: 5062}}
	s, err := sp.Parse(sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := EncodeSA(&s)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeEntry(b, "entry")
	if err != nil {
		t.Fatal(err)
	}
	if got.Core != netip.MustParseAddr("100.64.0.7") || got.InnerPeer != s.InnerPeer || got.Ports != s.Ports {
		t.Fatalf("restored core %v inner %v ports %+v", got.Core, got.InnerPeer, got.Ports)
	}
}
