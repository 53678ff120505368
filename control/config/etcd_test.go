package config

import (
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
)

func TestEtcdSection(t *testing.T) {
	c, err := Parse([]byte(minimal+"etcd: {endpoints: [http://10.1.1.1:2379, 'etcd2:2379'], node: gw-a.1, insecure: true}\n"), "x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	e := c.Etcd
	if e.Prefix != DefaultEtcdPrefix || e.Dial != 5*time.Second || e.TTL != 5*time.Second || !e.SequenceInEtcd() || e.Node != "gw-a.1" {
		t.Fatalf("defaults: %+v", e)
	}
	c, err = Parse([]byte(minimal+"etcd: {endpoints: [127.0.0.1:2379], node: n, insecure: true, prefix: /carrier/x, dial_timeout: 2s, sequence: false, liveness_ttl: 2s}\n"), "")
	if err != nil {
		t.Fatal(err)
	}
	if c.Etcd.Prefix != "/carrier/x" || c.Etcd.Dial != 2*time.Second || c.Etcd.TTL != 2*time.Second || c.Etcd.SequenceInEtcd() {
		t.Fatalf("explicit: %+v", c.Etcd)
	}
	if c, _ := Parse([]byte(minimal), ""); c.Etcd.SequenceInEtcd() {
		t.Fatal("no etcd section, yet sequence in etcd")
	}
	// The effective view round-trips.
	c, _ = Parse([]byte(minimal+"etcd: {endpoints: [127.0.0.1:2379], node: n, insecure: true}\n"), "")
	out, err := c.Effective()
	if err != nil || !strings.Contains(string(out), "prefix: /xesp") {
		t.Fatalf("effective: %v\n%s", err, out)
	}
}

func TestEtcdRejections(t *testing.T) {
	for _, tc := range []struct{ etcd, want string }{
		{"{node: n}", "etcd.endpoints: at least one endpoint"},
		{"{endpoints: [], node: n}", "etcd.endpoints: at least one endpoint"},
		{"{endpoints: ['127.0.0.1'], node: n}", "etcd.endpoints[0]: \"127.0.0.1\": want host:port"},
		{"{endpoints: ['ftp://a:2379'], node: n}", "etcd.endpoints[0]: \"ftp://a:2379\": scheme \"ftp\""},
		{"{endpoints: ['http://a:2379'], node: n, kek_file: /nonexistent}", "etcd.endpoints[0]: \"http://a:2379\": plain http carries SA keys"},
		{"{endpoints: ['https://a:2379'], node: n}", "etcd.kek_file: required"},
		{"{endpoints: ['https://a:2379'], node: n, kek_file: /nonexistent}", "etcd.kek_file: kek: open /nonexistent"},
		{"{endpoints: ['https://a:2379'], node: n, username: u}", "etcd.username: username and password_file go together"},
		{"{endpoints: ['https://a:2379'], node: n, tls: {cert: c}}", "etcd.tls: cert and key go together"},
		{"{endpoints: ['http://a:2379/v3'], node: n}", "etcd.endpoints[0]"},
		{"{endpoints: ['a:0'], node: n}", "etcd.endpoints[0]: \"a:0\": port must be"},
		{"{endpoints: ['a:1', 'b'], node: n}", "etcd.endpoints[1]"},
		{"{endpoints: ['a:1']}", "etcd.node: \"\""},
		{"{endpoints: ['a:1'], node: 'a/b'}", "etcd.node: \"a/b\""},
		{"{endpoints: ['a:1'], node: n, prefix: xesp}", "etcd.prefix: \"xesp\" must start with /"},
		{"{endpoints: ['a:1'], node: n, prefix: /xesp/}", "etcd.prefix: \"/xesp/\" must not end with /"},
		{"{endpoints: ['a:1'], node: n, prefix: /a//b}", "etcd.prefix"},
		{"{endpoints: ['a:1'], node: n, dial_timeout: 5}", "etcd.dial_timeout: \"5\": want a duration"},
		{"{endpoints: ['a:1'], node: n, dial_timeout: 1h}", "etcd.dial_timeout: 1h0m0s: must be"},
		{"{endpoints: ['a:1'], node: n, tls: true}", "cannot unmarshal !!bool `true` into config.EtcdTLS"},
		{"{endpoints: ['a:1'], node: n, liveness_ttl: 1500ms}", "etcd.liveness_ttl: 1.5s: must be whole seconds"},
		{"{endpoints: ['a:1'], node: n, liveness_ttl: x}", "etcd.liveness_ttl: \"x\""},
	} {
		_, err := Parse([]byte(minimal+"etcd: "+tc.etcd+"\n"), "x.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("etcd: %s: got %v, want %q", tc.etcd, err, tc.want)
		}
	}
}

func TestCheckSA(t *testing.T) {
	c, err := Parse([]byte(minimal), "")
	if err != nil {
		t.Fatal(err)
	}
	sp := sa.Spec{Name: "x", SPI: sa.SPIOf(0x100), Direction: "in", Mode: "transport", Proposal: "aes128gcm16",
		EncKey: key20, Local: "198.51.100.20", Peer: "203.0.113.5", Encap: &sa.EncapSpec{}}
	s, err := sp.Parse(sa.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CheckSA(&s); err != nil {
		t.Fatalf("a good SA: %v", err)
	}
	s.Local = s.Peer
	if err := c.CheckSA(&s); err == nil || !strings.Contains(err.Error(), "local") {
		t.Fatalf("foreign local: %v", err)
	}
	s.Local = c.Public.Addrs[0]
	s.Encap.LocalPort = 4501
	if err := c.CheckSA(&s); err == nil || !strings.Contains(err.Error(), "encap.local_port") {
		t.Fatalf("wrong encap port: %v", err)
	}
}
