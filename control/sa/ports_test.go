package sa

import (
	"encoding/json"
	"strings"
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

// ports.protocol, dscp and idle_timeout reach the SA and its public view;
// bad values are named by field.
func TestProtocolDSCPIdle(t *testing.T) {
	const y = `
sas:
  - {name: a, spi: 0x1001, direction: out, mode: tunnel, proposal: null-sha1,
     auth_key: 000102030405060708090a0b0c0d0e0f10111213, local: 192.0.2.1, peer: 198.51.100.7,
     inner: {local: 10.0.0.0/24, peer: 100.64.0.1}, ports: {protocol: udp, local: 5060}, dscp: 46, idle_timeout: 120}
`
	sas, err := ParseBytes([]byte(y), YAML, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := sas[0]
	if s.Ports != (Ports{Local: 5060, Proto: 17}) || !s.HasDSCP || s.DSCP != 46 || s.IdleTimeout != 120 {
		t.Fatalf("parsed %+v dscp %d/%v idle %d", s.Ports, s.DSCP, s.HasDSCP, s.IdleTimeout)
	}
	pub := s.Public()
	if pub.Ports.Protocol != "udp" || pub.DSCP == nil || *pub.DSCP != 46 || pub.IdleTimeout != 120 {
		t.Fatalf("public view %+v", pub)
	}
	bad := strings.Replace(y, "ports: {protocol: udp, local: 5060}, dscp: 46", "ports: {protocol: icmp, local: 5060}, dscp: 64", 1)
	_, err = ParseBytes([]byte(bad), YAML, Options{})
	for _, want := range []string{`ports.protocol: icmp has no ports`, "dscp: 64: want 0..63"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v\nlacks %q", err, want)
		}
	}
	_, err = ParseBytes([]byte(strings.Replace(y, "protocol: udp", "protocol: sctpx", 1)), YAML, Options{})
	if err == nil || !strings.Contains(err.Error(), `ports.protocol: "sctpx": want udp, tcp, icmp, ipv6-icmp or a number 1..255`) {
		t.Errorf("bad protocol: %v", err)
	}
}
