package config

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/xesp/xesp/control/sa"
)

const key20 = "000102030405060708090a0b0c0d0e0fcafebabe"

// minimal is the smallest valid config: everything else is a default.
const minimal = `public:
  interface: xpub0
  addresses: [198.51.100.20]
private:
  interface: xpriv0
`

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func messages(err error) []string {
	var out []string
	for _, e := range sa.Flatten(err) {
		out = append(out, e.Error())
	}
	return out
}

func TestMinimalGetsDefaults(t *testing.T) {
	c, err := Parse([]byte(minimal), "xesp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d := Defaults()
	if c.Workers != min(runtime.NumCPU(), 64) || c.Workers != d.Workers || c.NATTPort != 4500 || c.XDPMode != "native" ||
		c.PinDir != "/sys/fs/bpf/xesp" || c.MaxSAs != 1048576 || c.StateDir != "/var/lib/xesp" ||
		!reflect.DeepEqual(c.API, API{Unix: "/run/xesp/api.sock", MaxConns: DefaultMaxConns, MaxConnsPerSource: DefaultMaxConnsPerSource}) || c.Metrics.Listen != "127.0.0.1:9109" ||
		c.UMEM != (UMEM{Frames: 16384, FrameSize: 4096, FillRing: 8192, CompletionRing: 8192, RXRing: 8192, TXRing: 8192}) ||
		c.SlowPath != (SlowPath{}) || len(c.SAList) != 0 {
		t.Errorf("defaults not applied: %+v", c)
	}
	if !reflect.DeepEqual(c.Public.Addrs, []netip.Addr{netip.MustParseAddr("198.51.100.20")}) {
		t.Errorf("addrs %v", c.Public.Addrs)
	}
}

func TestFullConfig(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "keys/ue2.enc", key20+"\n")
	writeFile(t, dir, "api.token", "  s3cr3t-t0ken-0123456789\n")
	writeFile(t, dir, "sas/ues.yaml", `- name: ue2-in
  spi: 0x2001
  direction: in
  mode: tunnel
  proposal: aes128gcm16
  enc_key_file: ../keys/ue2.enc
  local: 2001:db8::20
  peer: 2001:db8:99::1
  encap: {}
  inner: {local: "fd00::/64", peer: "fd99::2"}
`)
	cfg := `# one-arm: both sides on one interface
public:
  interface: xarm0
  addresses: [198.51.100.20, "2001:db8::20"]
private:
  interface: xarm0
  next_hop_mac: 02:00:5e:10:00:01
workers: 2
natt_port: 4500
xdp_mode: generic
pin_dir: /sys/fs/bpf/xesp-test
max_sas: 1000
umem: {frames: 4096, frame_size: 2048, fill_ring: 2048, completion_ring: 2048, rx_ring: 1024, tx_ring: 1024}
state_dir: /tmp/xesp-state
api:
  unix: /tmp/xesp.sock
  tcp: 127.0.0.1:8443
  insecure: true
  token_file: api.token
metrics:
  listen: ""
slow_path:
  ike_forward: 127.0.0.1:4501
sas:
  - name: ue1-in
    spi: 0x1001
    direction: in
    mode: transport
    proposal: aes128gcm16
    enc_key: ` + key20 + `
    local: 198.51.100.20
    peer: 192.0.2.10
    encap: {peer_port: 31000}
    inner: {local: 10.0.0.1, core: 100.64.0.1}
  - name: ue1-out
    spi: 0xc0001001
    direction: out
    mode: transport
    proposal: aes128gcm16
    enc_key: ` + key20 + `
    local: 198.51.100.20
    peer: 192.0.2.10
    encap: {peer_port: 31000}
    inner: {local: 10.0.0.1, core: 100.64.0.1}
sa_files: [sas/ues.yaml]
`
	path := writeFile(t, dir, "xesp.yaml", cfg)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Public.Interface != "xarm0" || c.Private.Interface != "xarm0" || c.Private.NextHop.String() != "02:00:5e:10:00:01" ||
		c.Workers != 2 || c.XDPMode != "generic" || c.MaxSAs != 1000 || c.UMEM.RXRing != 1024 ||
		c.Metrics.Listen != "" || c.SlowPath.IKEForwardAddr != netip.MustParseAddrPort("127.0.0.1:4501") ||
		string(c.API.BearerToken) != "s3cr3t-t0ken-0123456789" {
		t.Errorf("got %+v", c)
	}
	var names []string
	for _, s := range c.SAList {
		names = append(names, s.Name)
	}
	if strings.Join(names, ",") != "ue1-in,ue1-out,ue2-in" {
		t.Errorf("SAs %v", names)
	}
	if want := []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0xca, 0xfe, 0xba, 0xbe}; !bytes.Equal(c.SAList[2].EncKey, want) {
		t.Errorf("key file key %x", []byte(c.SAList[2].EncKey))
	}

	eff, err := c.Effective()
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{key20, "s3cr3t"} {
		if bytes.Contains(eff, []byte(secret)) {
			t.Errorf("effective config leaks %q:\n%s", secret, eff)
		}
	}
	for _, want := range []string{"# effective configuration from " + path + "; 3 SAs (2 inline, 1 from sa_files)", "workers: 2\n",
		"enc_key: '[redacted]'", "token_file: api.token", "natt_port: 4500", "frame_size: 2048"} {
		if !bytes.Contains(eff, []byte(want)) {
			t.Errorf("effective config lacks %q:\n%s", want, eff)
		}
	}
}

// TestEffectiveReparses: with keys kept in files, the effective view is
// itself a valid config that means the same thing.
func TestEffectiveReparses(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "k", key20)
	path := writeFile(t, dir, "x.yaml", minimal+`sas:
  - {spi: 4097, direction: in, mode: transport, proposal: aes128gcm16, enc_key_file: k, local: 198.51.100.20, peer: 192.0.2.1, inner: {local: 10.0.0.1, core: 100.64.0.10}}
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	eff, err := c.Effective()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := Parse(eff, path)
	if err != nil {
		t.Fatalf("%v\n%s", err, eff)
	}
	c.SAList, c2.SAList = c.SAList[:0], c2.SAList[:0]
	if !reflect.DeepEqual(c, c2) {
		t.Errorf("reparsed differs:\n%+v\n%+v", c, c2)
	}
}

func TestRejections(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "short.token", "abc\n")
	writeFile(t, dir, "ues.yaml", `- {name: dup, spi: 0x1001, direction: in, mode: transport, proposal: aes128gcm16, enc_key: `+key20+`, local: 198.51.100.20, peer: 192.0.2.1, inner: {local: 10.0.0.1, core: 100.64.0.11}}
- {name: f2, spi: 0x1002, direction: in, mode: transport, proposal: aes128gcm16, enc_key: 00, local: 198.51.100.20, peer: 192.0.2.1, inner: {local: 10.0.0.1, core: 100.64.0.12}}
`)
	sa1 := `  - {name: dup, spi: 0x1001, direction: in, mode: transport, proposal: aes128gcm16, enc_key: ` + key20 + `, local: 198.51.100.20, peer: 192.0.2.1, inner: {local: 10.0.0.1, core: 100.64.0.13}}
`
	cases := []struct {
		name string
		text string
		errs []string
	}{
		{"empty", "", []string{
			"config xesp.yaml: public.interface: required",
			"config xesp.yaml: private.interface: required",
			"config xesp.yaml: public.addresses: at least one address is required (the outer addresses SAs use as local)",
		}},
		{"workers zero", minimal + "workers: 0\n", []string{"config xesp.yaml: workers: must be 1..64, got 0"}},
		{"workers many", minimal + "workers: 65\n", []string{"config xesp.yaml: workers: must be 1..64, got 65"}},
		{"natt port", minimal + "natt_port: 70000\n", []string{"config xesp.yaml: natt_port: must be 1..65535, got 70000"}},
		{"xdp mode", minimal + "xdp_mode: skb\n", []string{`config xesp.yaml: xdp_mode: "skb": must be native or generic`}},
		{"paths", minimal + "pin_dir: bpf/xesp\nstate_dir: \"\"\n", []string{
			`config xesp.yaml: pin_dir: "bpf/xesp" must be an absolute path`, "config xesp.yaml: state_dir: required"}},
		{"max sas", minimal + "max_sas: 0\n", []string{"config xesp.yaml: max_sas: must be 1..16777216, got 0"}},
		{"umem", minimal + "umem: {frames: 100, frame_size: 1500, fill_ring: 1000, rx_ring: 128}\n", []string{
			"config xesp.yaml: umem.frame_size: must be 2048 or 4096, got 1500",
			"config xesp.yaml: umem.fill_ring: must be a power of two in 64..262144, got 1000",
			"config xesp.yaml: umem.completion_ring: 8192 entries exceed umem.frames 100",
			"config xesp.yaml: umem.rx_ring: 128 entries exceed umem.frames 100",
			"config xesp.yaml: umem.tx_ring: 8192 entries exceed umem.frames 100",
		}},
		{"umem size", minimal + "umem: {frames: 4194304}\n", []string{"config xesp.yaml: umem.frames: 4194304 frames of 4096 bytes exceed 1024 MiB"}},
		{"interfaces", "public: {interface: averyveryverylongname, addresses: [198.51.100.20, 198.51.100.20, 224.1.1.1, x]}\nprivate: {interface: a/b, next_hop_mac: ff:ff:ff:ff:ff:ff}\n", []string{
			`config xesp.yaml: public.interface: "averyveryverylongname" is longer than 15 bytes`,
			`config xesp.yaml: private.interface: "a/b" is not a valid interface name`,
			"config xesp.yaml: public.addresses[1]: 198.51.100.20 is listed twice",
			"config xesp.yaml: public.addresses[2]: 224.1.1.1: want a unicast address without zone",
			`config xesp.yaml: public.addresses[3]: "x" is not an IP address`,
			"config xesp.yaml: private.next_hop_mac: ff:ff:ff:ff:ff:ff is a multicast or broadcast address",
		}},
		{"tcp without token", minimal + "api: {tcp: 127.0.0.1:8443, insecure: true}\n", []string{
			"config xesp.yaml: api.tcp: needs api.token or api.token_file: the TCP listener only serves bearer-token requests"}},
		{"short token", minimal + "api: {tcp: \"[::1]:8443\", insecure: true, token: abc}\n", []string{"config xesp.yaml: api.token: too short: at least 16 characters"}},
		{"short token file", minimal + "api: {tcp: \"localhost:8443\", insecure: true, token_file: short.token}\n", []string{
			"config xesp.yaml: api.token_file: short.token: token too short: at least 16 characters"}},
		{"plain tcp", minimal + "api: {tcp: \":8443\", token: 0123456789abcdef0}\n", []string{
			"config xesp.yaml: api.tcp: needs api.tls (cert and key): the API carries SA keys; plain HTTP is accepted only with api.insecure: true on a loopback address"}},
		{"insecure off loopback", minimal + "api: {tcp: \"0.0.0.0:8443\", insecure: true, token: 0123456789abcdef0}\n", []string{
			"config xesp.yaml: api.insecure: 0.0.0.0:8443 is not a loopback address: plain HTTP is refused off the host (use api.tls)"}},
		{"token without tcp", minimal + "api: {token: 0123456789abcdef0}\n", []string{
			"config xesp.yaml: api.token: set but api.tcp is not: the unix socket is guarded by its file mode, not a token"}},
		{"relative unix", minimal + "api: {unix: api.sock}\nmetrics: {listen: 9109}\n", []string{
			`config xesp.yaml: api.unix: "api.sock" must be an absolute path`, `config xesp.yaml: metrics.listen: "9109": want host:port`}},
		{"ike forward", minimal + "slow_path: {ike_forward: localhost:500}\n", []string{
			`config xesp.yaml: slow_path.ike_forward: "localhost:500": want ip:port (e.g. 127.0.0.1:4501 or [::1]:4501)`}},
		{"unknown and type", minimal + "worker: 3\nnatt_port: x\n", []string{
			`config xesp.yaml: line 6: unknown field "worker"`, "config xesp.yaml: line 7: cannot unmarshal !!str `x` into int"}},
		{"syntax", minimal + "sas: [\n", []string{"config xesp.yaml: yaml: line 6: did not find expected node content"}},
		{"sa errors", minimal + "sas:\n" + sa1 + sa1 +
			"  - {spi: 0x3001, direction: out, mode: transport, proposal: aes128gcm16, enc_key: " + key20 + ", local: 198.51.100.21, peer: 192.0.2.3, encap: {}, inner: {local: 10.0.0.1, core: 100.64.0.14}}\n" +
			"  - {name: ue3-out, spi: 0x3001, direction: out, mode: transport, proposal: aes128gcm16, enc_key: " + key20 + ", local: 198.51.100.20, encap: {local_port: 4501}, inner: {local: 10.0.0.1, core: 100.64.0.15}}\n" +
			"sa_files: [ues.yaml, missing.yaml]\n", []string{
			`config xesp.yaml: sas[3] "ue3-out": peer: required`,
			`config xesp.yaml: sa_files[0]: ues.yaml: sa "f2": enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 1`,
			`config xesp.yaml: sa_files[1]: read SA file: open missing.yaml: no such file or directory`,
			`config xesp.yaml: sas[1] "dup": name: "dup" is also used by sas[0] "dup"`,
			`config xesp.yaml: sas[1] "dup": spi: in 0x00001001 is also used by sas[0] "dup"`,
			`config xesp.yaml: sas[2]: local: 198.51.100.21 is not one of public.addresses`,
			`config xesp.yaml: sa_files[0]: ues.yaml: sa "dup": name: "dup" is also used by sas[0] "dup"`,
			`config xesp.yaml: sa_files[0]: ues.yaml: sa "dup": spi: in 0x00001001 is also used by sas[0] "dup"`,
		}},
		{"cross-file duplicate", minimal + "sas:\n" + sa1 + "sa_files: [" + filepath.Join(dir, "ues.yaml") + "]\n", []string{
			`config xesp.yaml: sa_files[0]: ` + filepath.Join(dir, "ues.yaml") + `: sa "f2": enc_key: aes128gcm16 needs 20 bytes (16 key + 4 salt), got 1`,
			`config xesp.yaml: sa_files[0]: ` + filepath.Join(dir, "ues.yaml") + `: sa "dup": name: "dup" is also used by sas[0] "dup"`,
			`config xesp.yaml: sa_files[0]: ` + filepath.Join(dir, "ues.yaml") + `: sa "dup": spi: in 0x00001001 is also used by sas[0] "dup"`,
		}},
		{"natt mismatch and capacity", minimal + "max_sas: 1\nsas:\n" + sa1 +
			"  - {name: b, spi: 0x1002, direction: in, mode: transport, proposal: aes128gcm16, enc_key: " + key20 + ", local: 198.51.100.20, peer: 192.0.2.1, encap: {local_port: 4501}, inner: {local: 10.0.0.1, core: 100.64.0.16}}\n", []string{
			`config xesp.yaml: sas[1] "b": encap.local_port: 4501 differs from natt_port 4500: XDP only takes ESP-in-UDP on natt_port`,
			"config xesp.yaml: max_sas: 2 inbound and 0 outbound SAs do not fit in 1 map entries each",
		}},
		{"two documents", minimal + "---\n" + minimal, []string{"config xesp.yaml: more than one YAML document"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := writeFile(t, dir, "xesp.yaml", c.text)
			// Relative to the working directory, as an operator types it.
			t.Chdir(dir)
			_, err := Load(filepath.Base(path))
			got := messages(err)
			if strings.Join(got, "\n") != strings.Join(c.errs, "\n") {
				t.Errorf("errors:\n got  %q\n want %q", got, c.errs)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte(minimal + "workers: 0\nsas: [{spi: 0x1001, encap: {}, inner: {local: 10.0.0.0/8}}]\napi: {tcp: ':1', token: 0123456789abcdef}\n"))
	f.Add([]byte("umem: {frames: 1}\nprivate: {next_hop_mac: 02:00:00:00:00:01}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "")
		if err != nil {
			return
		}
		if c.Workers < 1 || c.Workers > MaxWorkers || c.NATTPort < 1 || c.NATTPort > 65535 || len(c.Public.Addrs) == 0 ||
			c.Public.Interface == "" || c.Private.Interface == "" || !pow2(c.UMEM.FillRing) || c.MaxSAs < 1 {
			t.Fatalf("accepted an invalid config: %+v", c)
		}
		if _, err := c.Effective(); err != nil {
			t.Fatal(err)
		}
	})
}

// The router settings: defaults, what they parse to, and every bad value
// named by its path.
func TestTunnelIdleVLANSettings(t *testing.T) {
	c, err := Parse([]byte(minimal), "xesp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Tunnel.OuterTTL != 64 || c.Tunnel.HasDSCP || c.Tunnel.ICMPRate != 100 || c.Idle.Every != 0 || c.Public.VLAN.ID != 0 {
		t.Fatalf("defaults: %+v %+v %+v", c.Tunnel, c.Idle, c.Public.VLAN)
	}
	c, err = Parse([]byte(`public: {interface: xpub0, addresses: [198.51.100.20], mtu: 1400, vlan: 100}
private: {interface: xpriv0, vlan: 200, vlan_proto: 802.1ad, vlan_interface: xpriv0.200}
tunnel: {outer_ttl: 32, dscp: "26", icmp_rate: 0}
idle: {timeout: 90s, remove: true, cipher_release: 2m}
`), "xesp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Public.MTU != 1400 || c.Tunnel.OuterTTL != 32 || !c.Tunnel.HasDSCP || c.Tunnel.FixedDSCP != 26 || c.Tunnel.ICMPRate != 0 ||
		c.Idle.Every != 90*time.Second || !c.Idle.Remove || c.Idle.CipherAfter != 2*time.Minute || c.Public.VLAN.TPID != 0x8100 || c.Private.VLAN.TPID != 0x88a8 || c.Private.VLAN.Interface != "xpriv0.200" {
		t.Fatalf("parsed: %+v %+v %+v %+v", c.Tunnel, c.Idle, c.Public, c.Private)
	}
	_, err = Parse([]byte(minimal+`tunnel: {outer_ttl: 0, dscp: ef, icmp_rate: -1}
idle: {timeout: 100ms, cipher_release: 500ms}
`), "xesp.yaml")
	for _, want := range []string{
		"config xesp.yaml: tunnel.outer_ttl: 0: want 1..255",
		`config xesp.yaml: tunnel.dscp: "ef": want copy or a DSCP 0..63`,
		"config xesp.yaml: tunnel.icmp_rate: -1",
		"config xesp.yaml: idle.timeout: 100ms: below 1s",
		"config xesp.yaml: idle.cipher_release: 500ms: want 1s..24h",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v\nlacks %q", err, want)
		}
	}
	_, err = Parse([]byte(`public: {interface: xpub0, addresses: [198.51.100.20], vlan: 4095, mtu: 100}
private: {interface: xpriv0, vlan_proto: qinq}
`), "xesp.yaml")
	for _, want := range []string{
		"config xesp.yaml: public.vlan: 4095: want 1..4094",
		"config xesp.yaml: public.mtu: 100: want 576..65535",
		`config xesp.yaml: private.vlan_proto: "qinq": want 802.1q or 802.1ad`,
		"config xesp.yaml: private.vlan: required with vlan_proto or vlan_interface",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v\nlacks %q", err, want)
		}
	}
}
