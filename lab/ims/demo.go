package ims

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/lab/netns"
)

// DemoOptions shape `xesp-lab demo -ims`.
type DemoOptions struct {
	NAPTs, PhonesPerNAPT int
	// Capture, when set, is a pcap file of the gateway's public side
	// (unprotected SIP and ESP); the demo then prints tshark's decryption
	// of the first phone's flow with its SA keys.
	Capture string
	Out     io.Writer
	Log     *slog.Logger
}

// Demo runs the IMS flow with the real Kamailio P-CSCF and prints, per
// phone and step, what xesp holds: registration, algorithms, mode, SPIs,
// NAT binding and state.
func Demo(ctx context.Context, o DemoOptions) error {
	out := o.Out
	if out == nil {
		out = os.Stdout
	}
	fmt.Fprintf(out, "IMS sec-agree through xesp: %d phones behind %d NAPTs, Kamailio P-CSCF (examples/kamailio/pcscf.cfg),\n"+
		"S-CSCF/HSS = Go stand-in (lab/ims, non-Milenage AKA vectors), phones = Go sec-agree UEs.\n\n", o.NAPTs*o.PhonesPerNAPT, o.NAPTs)
	l, err := Start(ctx, Options{Prefix: netns.UniqueName("xim") + "-", NAPTs: o.NAPTs, PhonesPerNAPT: o.PhonesPerNAPT, Log: o.Log})
	if err != nil {
		return err
	}
	defer l.Close()
	var stopCap func() error
	if o.Capture != "" {
		if stopCap, err = l.capture(o.Capture); err != nil {
			return err
		}
	}
	keys := map[string]string{} // tshark uat entries of the first phone's sets
	note := func(u *UE) {
		if u != l.UEs[0] {
			return
		}
		l.API.Each(ctx, func(v *api.SAView) error {
			e, ok := l.Gateway.SAD.GetName(v.Name)
			if ok && e.SA.InnerPeer.Addr() == u.LAN {
				keys[e.SA.Name] = fmt.Sprintf(`"IPv4","*","*","0x%08x","AES-CBC [RFC3602]","0x%x","HMAC-SHA-1-96 [RFC2404]","0x%x"`, e.SA.SPI, []byte(e.SA.EncKey), []byte(e.SA.AuthKey))
			}
			return nil
		})
	}
	// step runs f for every phone, then waits until xesp holds want SAs
	// (the P-CSCF retires old sets asynchronously, after the 200 left)
	// and prints the table.
	step := func(title string, f func(u *UE) error, state string, want int) error {
		t0 := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, len(l.UEs))
		sem := make(chan struct{}, 5)
		for i, u := range l.UEs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				errs[i] = f(u)
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				return fmt.Errorf("%s: %w", title, err)
			}
		}
		took := time.Since(t0).Round(time.Millisecond)
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if in, outN := l.Gateway.SAD.Len(); in+outN == want {
				break
			}
		}
		fmt.Fprintf(out, "== %s (%d phones in %s)\n", title, len(l.UEs), took)
		return l.table(ctx, out, state)
	}
	if err := step("REGISTER -> 401 (Security-Server) -> protected REGISTER (Security-Verify) -> 200", func(u *UE) error {
		err := u.Register(600)
		note(u)
		return err
	}, "registered", 4*len(l.UEs)); err != nil {
		return err
	}
	// What an operator sees: the daemon's CLI next to this binary, if
	// built (make demo-ims builds both), on the lab's API socket.
	if xesp, err := os.Executable(); err == nil {
		xesp = filepath.Join(filepath.Dir(xesp), "xesp")
		if _, err := os.Stat(xesp); err == nil {
			b, err := exec.Command(xesp, "sa", "list", "--api", "unix:"+l.APISocket).CombinedOutput()
			fmt.Fprintf(out, "== xesp sa list --api unix:%s (first 9 lines)\n", l.APISocket)
			lines := strings.SplitN(string(b), "\n", 10)
			fmt.Fprintln(out, strings.Join(lines[:min(9, len(lines))], "\n"))
			if err != nil {
				return fmt.Errorf("xesp sa list: %w", err)
			}
			fmt.Fprintln(out)
		}
	}
	if err := step("OPTIONS phone -> P-CSCF and S-CSCF -> P-CSCF -> phone, through the SAs", func(u *UE) error {
		if st, err := u.Options(); err != nil || !strings.HasPrefix(st, "SIP/2.0 200") {
			return fmt.Errorf("%s: OPTIONS: %q %v", u.Name, st, err)
		}
		if st, err := l.SCSCF.Ping(u.IMPU, 8*time.Second); err != nil || !strings.HasPrefix(st, "SIP/2.0 200") {
			return fmt.Errorf("%s: OPTIONS from the S-CSCF: %q %v", u.Name, st, err)
		}
		return nil
	}, "registered", 4*len(l.UEs)); err != nil {
		return err
	}
	if err := step("re-authentication: new set negotiated over the old one, old set retired after the 200 (P-CSCF retire timer)", func(u *UE) error {
		err := u.ReRegister(600)
		note(u)
		return err
	}, "re-registered", 4*len(l.UEs)); err != nil {
		return err
	}
	if err := step("de-registration (Expires: 0)", func(u *UE) error { return u.Deregister() }, "de-registered", 0); err != nil {
		return err
	}
	in, outN := l.Gateway.SAD.Len()
	fmt.Fprintf(out, "== xesp SAs left after de-registration: %d inbound, %d outbound\n\n", in, outN)

	// The last delete's log line follows its answer.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if lat := apiLatencies(l.KamailioLog()); len(lat["delete"]) >= len(lat["create"]) {
			break
		}
	}
	lat := apiLatencies(l.KamailioLog())
	fmt.Fprintf(out, "API calls per registration (made by Kamailio over HTTPS to %s: xesp's certificate verified against the run's CA,\n"+
		"Kamailio's client certificate, the bearer token; one TLS handshake per call): POST /v1/secagree at each challenge,\n"+
		"POST /v1/secagree/{r}/delete at de-registration, expiry or after a re-authentication's 200. Latency as Kamailio measured it (us):\n"+
		"  create: %s\n  delete: %s (includes the 100 ms grace the outbound SAs keep)\n",
		l.APIURL, latSummary(lat["create"]), latSummary(lat["delete"]))
	if stopCap != nil {
		if err := stopCap(); err != nil {
			return err
		}
		var names []string
		for n := range keys {
			names = append(names, n)
		}
		sort.Strings(names)
		args := []string{"-r", o.Capture, "-n", "-o", "esp.enable_encryption_decode:TRUE"}
		for _, n := range names {
			args = append(args, "-o", "uat:esp_sa:"+keys[n])
		}
		u := l.UEs[0]
		args = append(args, "-T", "fields", "-E", "separator=/t", "-e", "frame.number", "-e", "ip.src", "-e", "ip.dst", "-e", "esp.spi", "-e", "_ws.col.Info", "-Y", fmt.Sprintf("sip.Call-ID contains \"%s-\" || sip.To contains \"sip:%s@\"", u.Name, u.Name))
		fmt.Fprintf(out, "\n== %s's flow on the public side, decrypted with its SA keys (tshark %s -o uat:esp_sa:...)\n", u.Name, strings.Join(args[:5], " "))
		fmt.Fprintln(out, "frame\touter[,inner] src\touter[,inner] dst\tESP SPI\tSIP")
		cmd := exec.Command("tshark", args...)
		b, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("tshark: %w: %s", err, b)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.Contains(line, "Running as user") && line != "" {
				fmt.Fprintln(out, line)
			}
		}
	}
	return nil
}

// table prints one line per phone from xesp's SA list.
func (l *Lab) table(ctx context.Context, out io.Writer, state string) error {
	// Phones share private addresses: a phone's SAs are found by pair
	// group (one per phone, kept across re-authentication), the group by
	// the in-s SPI the phone negotiated.
	byPair := map[string][]api.SAView{}
	pairOf := map[uint64]string{}
	if err := l.API.Each(ctx, func(v *api.SAView) error {
		byPair[v.Pair] = append(byPair[v.Pair], *v)
		if strings.HasSuffix(v.Name, ".in-s") {
			spi, _ := v.SPI.Value()
			pairOf[spi] = v.Pair
		}
		return nil
	}); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "phone\tlan\tcore\tnat binding\tregistration\talg\tealg\tmode\tP-CSCF spi-c/spi-s\tUE spi-c/spi-s\tstate\txesp SAs")
	for _, u := range l.UEs {
		cur, ok := u.Current()
		var vs []api.SAView
		if ok {
			vs = byPair[pairOf[uint64(cur.Mechanism.SPIS)]]
		}
		if len(vs) == 0 || !ok {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t%s\t%d\n", u.Name, u.LAN, state, len(vs))
			continue
		}
		regs := map[string]bool{}
		for _, v := range vs {
			r, _, _ := strings.Cut(v.Name, ".")
			regs[r] = true
		}
		var names []string
		for r := range regs {
			names = append(names, r)
		}
		sort.Strings(names)
		m := cur.Mechanism
		core := "-"
		if vs[0].Inner != nil && vs[0].Inner.Core != "" {
			core = vs[0].Inner.Core
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%#x/%#x\t%#x/%#x\t%s\t%d\n", u.Name, u.LAN, core, vs[0].Binding, strings.Join(names, "+"),
			m.Alg, m.EffectiveEalg(), m.Mod.Effective(), m.SPIC, m.SPIS, cur.UESPIC, cur.UESPIS, state, len(vs))
	}
	tw.Flush()
	fmt.Fprintln(out)
	return nil
}

// capture runs tcpdump on the gateway's public link (in the inet
// namespace) for unprotected SIP and ESP.
func (l *Lab) capture(file string) (func() error, error) {
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return nil, err
	}
	cmd := l.Inet.Command("tcpdump", "-i", "g0", "-U", "--immediate-mode", "-n", "-s", "0", "-w", file, "udp", "and", "(port", "4500", "or", "port", "5060)")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("tcpdump: %w", err)
	}
	// tcpdump says "listening on" once the capture is armed (the file
	// exists earlier).
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				ready <- true
				io.Copy(io.Discard, stderr)
				return
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			cmd.Wait()
			return nil, fmt.Errorf("tcpdump exited before capturing")
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("tcpdump not listening after 10 s")
	}
	return func() error {
		time.Sleep(200 * time.Millisecond) // the last packets may still be in the ring
		cmd.Process.Signal(syscall.SIGINT)
		return cmd.Wait()
	}, nil
}

// apiLatencies collects the P-CSCF's logged API call durations (us).
func apiLatencies(log string) map[string][]int {
	out := map[string][]int{}
	for _, line := range strings.Split(log, "\n") {
		_, rest, ok := strings.Cut(line, "xesp-api POST /v1/secagree")
		if !ok {
			continue
		}
		kind := "create"
		if strings.Contains(rest, "/delete") {
			kind = "delete"
		}
		var us int
		if i := strings.LastIndex(rest, " in "); i >= 0 {
			fmt.Sscanf(rest[i+4:], "%d", &us)
			out[kind] = append(out[kind], us)
		}
	}
	return out
}

func latSummary(v []int) string {
	if len(v) == 0 {
		return "none"
	}
	sort.Ints(v)
	return fmt.Sprintf("n=%d min %d median %d max %d", len(v), v[0], v[len(v)/2], v[len(v)-1])
}
