package sa

import (
	"encoding/json"
	"testing"
)

// The ports block reads from YAML and JSON, reaches the SA, and the
// public view (API, sa list) shows it; absent means any port.
func TestPortsBlock(t *testing.T) {
	const y = `
sas:
  - {name: reg1.out-s, spi: 0x1001, direction: out, mode: transport, proposal: null-sha1,
     auth_key: 000102030405060708090a0b0c0d0e0f10111213, local: 192.0.2.1, peer: 198.51.100.7,
     ports: {local: 5063, peer: 5064}}
  - {name: plain, spi: 0x1002, direction: in, mode: transport, proposal: null-sha1,
     auth_key: 000102030405060708090a0b0c0d0e0f10111213, local: 192.0.2.1, peer: 198.51.100.7}
`
	sas, err := ParseBytes([]byte(y), YAML, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if sas[0].Ports != (Ports{Local: 5063, Peer: 5064}) || sas[1].Ports != (Ports{}) {
		t.Fatalf("ports %+v %+v", sas[0].Ports, sas[1].Ports)
	}
	pub := sas[0].Public()
	if pub.Ports == nil || *pub.Ports != (PortsSpec{Local: 5063, Peer: 5064}) || sas[1].Public().Ports != nil {
		t.Fatalf("public view %+v / %+v", pub.Ports, sas[1].Public().Ports)
	}
	b, err := json.Marshal(pub)
	if err != nil {
		t.Fatal(err)
	}
	var sp Spec
	if err := json.Unmarshal(b, &sp); err != nil || sp.Ports == nil || sp.Ports.Local != 5063 || sp.Ports.Peer != 5064 {
		t.Fatalf("JSON round trip of %s: %+v %v", b, sp.Ports, err)
	}
}
