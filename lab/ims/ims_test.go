package ims

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/examples/kamailio"
	"github.com/xesp/xesp/lab/netns"
)

// xespBin is the daemon's CLI, built by startLab (from the build
// cache after the first time): the test reads the SAs with `xesp sa list`,
// as an operator does.
var xespBin string

func startLab(t *testing.T, napts, per int) *Lab {
	t.Helper()
	netns.RequireRoot(t)
	if err := CheckTools(); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "xesp")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/xesp").CombinedOutput(); err != nil {
		t.Fatalf("go build cmd/xesp: %v\n%s", err, out)
	}
	xespBin = bin
	l, err := Start(context.Background(), Options{Prefix: netns.UniqueName("im") + "-", NAPTs: napts, PhonesPerNAPT: per})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kamailio:\n%s", tail(l.KamailioLog(), 80))
		}
		if err := l.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return l
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// forEach runs f for every phone, 5 at a time.
func forEach(t *testing.T, ues []*UE, f func(u *UE) error) {
	t.Helper()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 5)
	errs := make(chan error, len(ues))
	for _, u := range ues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := f(u); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// eventually polls cond until it holds or 20 s pass.
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	var err error
	for end := time.Now().Add(20 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if err = cond(); err == nil {
			return
		}
	}
	t.Fatalf("%s: %v", what, err)
}

// saList is `xesp sa list --json` on the lab's API socket.
func saList(l *Lab) ([]api.SAView, error) {
	out, err := exec.Command(xespBin, "sa", "list", "--json", "--api", "unix:"+l.APISocket).Output()
	if err != nil {
		return nil, fmt.Errorf("xesp sa list: %w", err)
	}
	var vs []api.SAView
	if err := json.Unmarshal(out, &vs); err != nil {
		return nil, fmt.Errorf("xesp sa list: %w: %s", err, out)
	}
	return vs, nil
}

// match checks that `xesp sa list` shows exactly one SA set per registered phone
// (the phones in want), each the four SAs of the set the phone is using:
// SPIs, algorithm, UDP-enc-tun to the phone's NAPT, its inner address,
// and a core address of its own from the pool. Phones share private
// addresses, so a set is found by the SPIs the phone negotiated. It
// returns the registration name per phone.
func match(l *Lab, want []*UE) (map[*UE]string, error) {
	got := map[string][]api.SAView{}
	bySPI := map[uint64]string{} // in-s SPI -> registration
	list, err := saList(l)
	if err != nil {
		return nil, err
	}
	for _, v := range list {
		reg, role, _ := strings.Cut(v.Name, ".")
		got[reg] = append(got[reg], v)
		if role == "in-s" {
			spi, _ := v.SPI.Value()
			bySPI[spi] = reg
		}
	}
	if len(got) != len(want) {
		return nil, fmt.Errorf("xesp holds %d registrations, want %d", len(got), len(want))
	}
	names := map[*UE]string{}
	cores := map[string]*UE{}
	for _, u := range want {
		cur, ok := u.Current()
		if !ok {
			return nil, fmt.Errorf("%s: not registered", u.Name)
		}
		m := cur.Mechanism
		reg, ok := bySPI[uint64(m.SPIS)]
		if !ok {
			return nil, fmt.Errorf("%s: no SA set with in-s SPI %#x", u.Name, m.SPIS)
		}
		names[u] = reg
		if len(got[reg]) != 4 {
			return nil, fmt.Errorf("%s: registration %s has %d SAs", u.Name, reg, len(got[reg]))
		}
		spis := map[string]uint32{"in-s": m.SPIS, "in-c": m.SPIC, "out-s": cur.UESPIS, "out-c": cur.UESPIC}
		for _, v := range got[reg] {
			role := strings.TrimPrefix(v.Name, reg+".")
			spi, _ := v.SPI.Value()
			if spi != uint64(spis[role]) || v.Proposal != "aes128-sha1" || v.Mode != "tunnel" || v.Encap == nil || *v.Encap.LocalPort != 4500 ||
				v.Inner == nil || v.Inner.Local != PCSCF.String()+"/32" || v.Inner.Peer != u.LAN.String()+"/32" ||
				!strings.HasPrefix(v.Binding, "198.51.100.") || v.State != "active" {
				return nil, fmt.Errorf("%s: SA %s: spi %#x (want %#x) proposal %s mode %s inner %+v binding %s state %s", u.Name, v.Name, spi, spis[role], v.Proposal, v.Mode, v.Inner, v.Binding, v.State)
			}
			core, err := netip.ParseAddr(v.Inner.Core)
			if err != nil || !CorePool.Contains(core) {
				return nil, fmt.Errorf("%s: SA %s: core address %q not from %s", u.Name, v.Name, v.Inner.Core, CorePool)
			}
			if other, dup := cores[v.Inner.Core]; dup && other != u {
				return nil, fmt.Errorf("%s and %s share core address %s", u.Name, other.Name, v.Inner.Core)
			}
			cores[v.Inner.Core] = u
		}
	}
	return names, nil
}

// The IMS registration path with a real P-CSCF: Kamailio running
// examples/kamailio/pcscf.cfg creates and deletes every SA through xesp's
// API; 20 phones behind 4 NAPTs, every NAPT's LAN numbered alike (the
// phones share private addresses and ports), register over sec-agree (REGISTER with
// Security-Client, 401 with Security-Server and no CK/IK, protected
// REGISTER with Security-Verify, 200), send OPTIONS to the P-CSCF and
// answer the S-CSCF's OPTIONS through the P-CSCF (both SA pairs used),
// re-authenticate (new set made, old retired after the 200), one lets its
// registration expire and the rest de-register. At every step the SAs
// xesp lists are exactly the sets the phones use, and none remain.
func TestKamailioPCSCFSecAgree(t *testing.T) {
	l := startLab(t, 4, 5)
	ues := l.UEs
	ctx := context.Background()

	// 1. Registration.
	forEach(t, ues, func(u *UE) error { return u.Register(600) })
	var first map[*UE]string
	eventually(t, "SAs match the registrations", func() (err error) { first, err = match(l, ues); return err })
	bindings := map[string]bool{}
	for _, u := range ues {
		b, ok := l.SCSCF.Registered(u.IMPU)
		v, err := l.API.Get(ctx, first[u]+".in-s")
		if err != nil {
			t.Fatal(err)
		}
		// The P-CSCF registered the phone at its core address.
		if want := fmt.Sprintf("sip:%s@%s:%d", u.Name, v.Inner.Core, UEPortS); !ok || b.Contact != want {
			t.Fatalf("%s: S-CSCF contact %q (registered %v), want %q", u.Name, b.Contact, ok, want)
		}
		bindings[v.Binding] = true
	}
	if len(bindings) != len(ues) {
		t.Fatalf("%d NAT bindings for %d phones", len(bindings), len(ues))
	}
	// Kamailio made those 20 sets over the API's TLS listener; what that
	// listener refuses shows how.
	checkAPILink(t, l)

	// 2. OPTIONS both ways: phone -> P-CSCF (in-s, out-c), S-CSCF ->
	// P-CSCF -> phone (out-s, in-c).
	forEach(t, ues, func(u *UE) error {
		if st, err := u.Options(); err != nil || !strings.HasPrefix(st, "SIP/2.0 200") {
			return fmt.Errorf("%s: OPTIONS: %q %v", u.Name, st, err)
		}
		if st, err := l.SCSCF.Ping(u.IMPU, 8*time.Second); err != nil || !strings.HasPrefix(st, "SIP/2.0 200") {
			return fmt.Errorf("%s: OPTIONS from the S-CSCF: %q %v", u.Name, st, err)
		}
		return nil
	})
	for _, u := range ues {
		if u.Answered != 1 {
			t.Fatalf("%s answered %d requests from the P-CSCF, want 1", u.Name, u.Answered)
		}
		for role, min := range map[string]uint64{"in-s": 2, "out-c": 2, "out-s": 1, "in-c": 1} {
			v, err := l.API.Get(ctx, first[u]+"."+role)
			if err != nil || v.Counters == nil || v.Counters.Packets < min {
				t.Fatalf("%s %s: %+v %v, want >= %d packets", u.Name, role, v.Counters, err, min)
			}
		}
	}

	// 3. What the P-CSCF refuses: a protected REGISTER whose
	// Security-Verify is not the set's (494), and cleartext to a
	// protected port from the public side (the gateway forwards none).
	u0 := ues[0]
	s0, _ := u0.current()
	n := u0.next()
	bad := Build("REGISTER sip:"+Realm+" SIP/2.0", append(u0.regHeaders(n, s0.portC, s0.portS, 600), u0.authorization(true),
		"Security-Verify: ipsec-3gpp;alg=hmac-md5-96;ealg=null;mod=UDP-enc-tun;spi-c=1;spi-s=2;port-c=5063;port-s=5065")...)
	if r, err := u0.transact(s0, bad, u0.callID(), fmt.Sprintf("%d REGISTER", n)); err != nil || r.Status() != 494 {
		t.Fatalf("REGISTER with a wrong Security-Verify: %q %v", r.Start, err)
	}
	if _, err := u0.sip.WriteToUDPAddrPort(Build("OPTIONS sip:"+Realm+" SIP/2.0", "Call-ID: clear@x", "CSeq: 1 OPTIONS"),
		netip.AddrPortFrom(Public, PortS)); err != nil {
		t.Fatal(err)
	}

	// 4. Re-authentication: a new set per phone; the old one is gone
	// once the new one answered.
	forEach(t, ues, func(u *UE) error { return u.ReRegister(600) })
	var second map[*UE]string
	eventually(t, "SAs match the re-registrations", func() (err error) { second, err = match(l, ues); return err })
	for _, u := range ues {
		if second[u] == first[u] {
			t.Fatalf("%s: still on registration %s after re-authentication", u.Name, first[u])
		}
	}
	forEach(t, ues, func(u *UE) error {
		if st, err := u.Options(); err != nil || !strings.HasPrefix(st, "SIP/2.0 200") {
			return fmt.Errorf("%s: OPTIONS over the new set: %q %v", u.Name, st, err)
		}
		if st, err := l.SCSCF.Ping(u.IMPU, 8*time.Second); err != nil || !strings.HasPrefix(st, "SIP/2.0 200") {
			return fmt.Errorf("%s: OPTIONS from the S-CSCF over the new set: %q %v", u.Name, st, err)
		}
		return nil
	})

	// 5. Expiry: the last phone re-registers for 1 s and lets it lapse;
	// the P-CSCF deletes its SAs, the others stay.
	last := ues[len(ues)-1]
	if err := last.ReRegister(1); err != nil {
		t.Fatal(err)
	}
	rest := ues[:len(ues)-1]
	eventually(t, "the lapsed registration's SAs deleted", func() error { _, err := match(l, rest); return err })

	// 6. De-registration: every SA goes.
	forEach(t, rest, func(u *UE) error { return u.Deregister() })
	eventually(t, "no SAs after de-registration", func() error {
		if in, out := l.Gateway.SAD.Len(); in != 0 || out != 0 {
			return fmt.Errorf("the SAD holds %d/%d", in, out)
		}
		_, err := match(l, nil)
		return err
	})
	for _, u := range ues {
		if u.Rejected != 0 || u.Leaked {
			t.Fatalf("%s: %d ESP packets rejected, keys leaked: %v", u.Name, u.Rejected, u.Leaked)
		}
	}
	// The P-CSCF logs a delete after xesp answered it.
	eventually(t, "the P-CSCF logged every delete", func() error {
		if n := strings.Count(l.KamailioLog(), "/delete 200 in"); n != 41 {
			return fmt.Errorf("%d deletes logged", n)
		}
		return nil
	})
	ch, reg, dereg := l.SCSCF.Counts()
	log := l.KamailioLog()
	posts, dels := strings.Count(log, "xesp-api POST /v1/secagree r"), strings.Count(log, "/delete 200 in")
	t.Logf("S-CSCF: %d challenges, %d registrations, %d de-registrations; P-CSCF: %d POST /v1/secagree, %d deletes", ch, reg, dereg, posts, dels)
	// 20 initial + 20 re-authentications + 1 short re-authentication.
	if posts != 41 || dels != 41 || ch != 41 || dereg != 19 {
		t.Fatalf("want 41 sets created and deleted, 41 challenges, 19 de-registrations\n%s", tail(log, 40))
	}
	if strings.Contains(log, "clear@x") {
		t.Fatal("cleartext to a protected port reached the P-CSCF")
	}
	if strings.Contains(log, "ERROR") {
		t.Fatalf("the P-CSCF logged errors:\n%s", tail(log, 40))
	}
	lat := apiLatencies(log)
	t.Logf("API latency seen by Kamailio (us): create %v, delete (incl. 100 ms grace) %v", latSummary(lat["create"]), latSummary(lat["delete"]))
}

// checkAPILink proves the P-CSCF's API calls went over TLS with its
// client certificate: from the P-CSCF's namespace, curl gets no answer
// from the API's TCP listener in plain HTTP (Go's TLS server answers 400
// "Client sent an HTTP request to an HTTPS server"; a plain listener
// would answer 401 for the missing token), none over TLS without a
// client certificate (handshake refused), and reaches the API only
// with the certificate (401 without the token: mTLS comes on top of the
// token, not instead). The local config holding the token is 0600.
func checkAPILink(t *testing.T, l *Lab) {
	t.Helper()
	curl := func(args ...string) (code string, exit int, out string) {
		args = append([]string{"-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"}, args...)
		b, err := l.Core.Command("curl", args...).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			exit = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("curl: %v", err)
		}
		s := string(b)
		return s[max(0, len(s)-3):], exit, s
	}
	if !strings.HasPrefix(l.APIURL, "https://") {
		t.Fatalf("the P-CSCF's API URL %s is not https", l.APIURL)
	}
	plain := "http://" + strings.TrimPrefix(l.APIURL, "https://") + "/v1/sas"
	if code, _, out := curl(plain); code != "400" {
		t.Fatalf("plain HTTP to the API's TCP listener: %s, want the TLS server's 400", out)
	}
	b, _ := l.Core.Command("curl", "-sS", "--max-time", "5", plain).CombinedOutput()
	if !strings.Contains(string(b), "HTTP request to an HTTPS server") {
		t.Fatalf("plain HTTP to the API's TCP listener answered %q", b)
	}
	if code, exit, out := curl("--cacert", l.APICA, l.APIURL+"/v1/sas"); exit == 0 || code != "000" {
		t.Fatalf("TLS without a client certificate: exit %d, %s; want the handshake refused", exit, out)
	}
	if code, exit, out := curl("--cacert", l.APICA, "--cert", l.PCSCFCert.CertPath, "--key", l.PCSCFCert.KeyPath, l.APIURL+"/v1/sas"); exit != 0 || code != "401" {
		t.Fatalf("TLS with the P-CSCF's certificate, no token: exit %d, %s; want 401", exit, out)
	}
	for _, f := range []string{filepath.Join(l.Dir(), "pcscf-local.cfg"), l.PCSCFCert.KeyPath} {
		st, err := os.Stat(f)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v, want mode 0600", f, st.Mode(), err)
		}
	}
	// What one call's TLS costs a libcurl client like Kamailio's: the
	// handshake (client certificate included) per connection.
	var hs, total []int
	for range 7 {
		b, err := l.Core.Command("curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{time_connect} %{time_appconnect} %{time_total}",
			"--cacert", l.APICA, "--cert", l.PCSCFCert.CertPath, "--key", l.PCSCFCert.KeyPath, l.APIURL+"/v1/health").Output()
		var c, a, tt float64
		if _, serr := fmt.Sscanf(string(b), "%g %g %g", &c, &a, &tt); err != nil || serr != nil {
			t.Fatalf("curl timing: %q %v %v", b, err, serr)
		}
		hs, total = append(hs, int((a-c)*1e6)), append(total, int(tt*1e6))
	}
	t.Logf("curl over the P-CSCF's API link (us): TLS handshake %s, whole call %s", latSummary(hs), latSummary(total))
	t.Logf("API link: plain HTTP refused (400 from the TLS server), TLS without a client certificate refused (handshake), with it 401 without the token; Kamailio's calls went to %s", l.APIURL)
	local, _ := os.ReadFile(filepath.Join(l.Dir(), "pcscf-local.cfg"))
	for _, want := range []string{"!XESP_API!" + l.APIURL + "!", "!XESP_CA!" + l.APICA + "!", "!XESP_CERT!" + l.PCSCFCert.CertPath + "!"} {
		if !strings.Contains(string(local), want) {
			t.Fatalf("pcscf-local.cfg lacks %q", want)
		}
	}
}

// The example config's API link modes parse with the installed Kamailio
// and its modules (`kamailio -c`): TLS with and without a client
// certificate (http_client's cacert, client_cert, client_key,
// verify_peer, verify_host, tlsversion: a misspelt parameter fails the
// check) and plain HTTP on loopback (XESP_API_PLAIN, no TLS values).
// kamailio -c does not open the files; TestKamailioPCSCFSecAgree runs
// the TLS mode end to end.
func TestPCSCFConfigModesParse(t *testing.T) {
	if _, err := exec.LookPath("kamailio"); err != nil {
		t.Skip("kamailio not installed (make deps)")
	}
	if err := CheckTools(); err != nil {
		t.Fatal(err)
	}
	common := `#!substdef "!PCSCF_IP!10.0.0.1!g"
#!substdef "!PUBLIC_IP!198.51.100.1!g"
#!substdef "!SCSCF_IP!10.0.0.2!g"
#!substdef "!SCSCF_PORT!5060!g"
#!substdef "!XESP_TOKEN!0123456789abcdef!g"
#!substdef "!PORT_S!5065!g"
#!substdef "!PORT_C1!5063!g"
#!substdef "!PORT_C2!5067!g"
`
	for name, local := range map[string]string{
		"tls": common + `#!substdef "!XESP_API!https://10.0.0.254:9443!g"
#!substdef "!XESP_CA!/etc/kamailio/xesp-api-ca.crt!g"
#!substdef "!XESP_CERT!/etc/kamailio/pcscf.crt!g"
#!substdef "!XESP_KEY!/etc/kamailio/pcscf.key!g"
`,
		"tls without a client certificate": common + `#!substdef "!XESP_API!https://10.0.0.254:9443!g"
#!substdef "!XESP_CA!/etc/kamailio/xesp-api-ca.crt!g"
#!substdef "!XESP_CERT!!g"
#!substdef "!XESP_KEY!!g"
`,
		"plain on loopback": common + `#!define XESP_API_PLAIN
#!substdef "!XESP_API!http://127.0.0.1:8900!g"
`,
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "pcscf.cfg"), []byte(kamailio.PCSCF), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "pcscf-local.cfg"), []byte(local), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("kamailio", "-c", "-f", filepath.Join(dir, "pcscf.cfg"))
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s: kamailio -c: %v\n%s", name, err, tail(string(out), 10))
		}
	}
}
