// Package demo runs the built-in demo: the problem the product exists for,
// solved, with software nobody on this team wrote at both ends. Several
// phones sit behind one NAPT, each with its own UDP-encapsulated ESP SA
// and a TUN device; sipsak in each phone's namespace registers with
// kamailio in the core through that TUN, and every phone gets exactly its
// own replies.
//
//	ue1 ─┐
//	ue2 ─┼─ napt (nftables masquerade) ── gw (xesp, XDP on both veths) ── core (kamailio)
//	ue3 ─┘
//
// Everything lives in network namespaces named xesp-*, created here (by
// lab/topo) and deleted on exit or Ctrl-C; no traffic leaves them.
package demo

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/lab/topo"
	"github.com/xesp/xesp/lab/ue"
)

// Options tune the demo.
type Options struct {
	Phones  int           // phones behind the NAPT (3)
	Metrics string        // /metrics listen address on the host; "" for none
	Hold    time.Duration // keep running (phones sending OPTIONS every 2 s) this long after the exchange
	Version string
	Out     io.Writer
	Log     *slog.Logger
	// Prefix names the namespaces; "" means Prefix. Tests use a unique
	// one so they never meet a demo someone else runs on the machine.
	Prefix string
}

// Prefix names the demo's namespaces.
const Prefix = "xesp-"

type phone struct {
	*topo.Phone
	registered  bool
	regStatus   string
	optionsOK   int
	optionsSent int
	wrongReply  int
}

// Run builds the topology, runs the exchange, prints the result and tears
// everything down. It returns an error if any phone failed to register or
// got a reply meant for another phone.
func Run(ctx context.Context, o Options) (err error) {
	if o.Phones <= 0 {
		o.Phones = 3
	}
	if o.Phones > 200 {
		return fmt.Errorf("demo: at most 200 phones")
	}
	w := o.Out
	if err := topo.CheckTools(); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if o.Prefix == "" {
		o.Prefix = Prefix
		cleanupStale(o.Phones)
	}
	fmt.Fprintf(w, "building the demo topology: %d phones ─ NAPT ─ xesp gateway ─ SIP core (kamailio)\n", o.Phones)
	l, err := topo.Start(ctx, topo.Options{Prefix: o.Prefix, Phones: o.Phones, Log: o.Log})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := l.Close(); cerr != nil && err == nil {
			err = cerr
		}
		fmt.Fprintf(w, "\ntopology removed (namespaces %s*, kamailio stopped)\n", o.Prefix)
	}()
	g := l.Gateway
	fmt.Fprintf(w, "gateway up: XDP %s on pub and %s on priv, AF_XDP %s mode, %d workers, %d SAs\n",
		g.Loader.Public.Mode, g.Loader.Private.Mode, g.Sockets[0][0].Mode(), l.Config.Workers, len(l.Config.SAList))
	fmt.Fprintf(w, "SIP core: %s listening on %s:%d (registrar, config examples/kamailio/kamailio.cfg)\n", kamailioVersion(), topo.Core, topo.SIPPort)
	fmt.Fprintf(w, "phones: xesp's phone on a TUN (ims0) in each namespace, sipsak as the SIP client, NAT keepalives every 20 s\n")

	svcCtx, stopSvc := context.WithCancel(ctx)
	defer stopSvc()
	if o.Metrics != "" {
		src, err := g.MetricsSources(o.Version)
		if err != nil {
			return err
		}
		ln, err := net.Listen("tcp", o.Metrics)
		if err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		go metrics.ServeListener(svcCtx, ln, metrics.Handler(metrics.New(src)))
		fmt.Fprintf(w, "metrics: http://%s/metrics\n", ln.Addr())
	}

	phones := make([]*phone, len(l.Phones))
	for i, p := range l.Phones {
		phones[i] = &phone{Phone: p}
	}
	fmt.Fprintln(w, "\neach phone runs sipsak: REGISTER, then OPTIONS, to kamailio through its TUN, the NAPT and the gateway ...")
	cseq := 0
	exchange := func(p *phone, method string, seq int) (topo.Reply, error) {
		callID := fmt.Sprintf("demo-ue%d-%s-%d@xesp", p.N, strings.ToLower(method), seq)
		r, err := l.Sipsak(ctx, p.Phone, method, callID, seq)
		if err == nil && r.CallID != callID {
			p.wrongReply++
			err = fmt.Errorf("reply for Call-ID %q", r.CallID)
		}
		return r, err
	}
	var wg sync.WaitGroup
	cseq++
	for _, p := range phones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := exchange(p, "REGISTER", cseq)
			p.registered = err == nil && r.OK()
			p.regStatus = r.Status
			if err != nil {
				p.regStatus = err.Error()
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(o.Hold)
	for ctx.Err() == nil {
		cseq++
		for _, p := range phones {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.optionsSent++
				if r, err := exchange(p, "OPTIONS", cseq); err == nil && r.OK() {
					p.optionsOK++
				}
			}()
		}
		wg.Wait()
		if time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
	if ctx.Err() != nil {
		fmt.Fprintln(w, "interrupted: tearing down")
	}

	fmt.Fprintf(w, "\n%-6s %-13s %-11s %-22s %-15s %-11s %-8s %-17s %s\n", "phone", "lan address", "inner", "NAPT mapping (gw)", "SPI in/out", "registered", "OPTIONS", "ESP in/out (gw)", "phone: sent/opened/keepalives")
	var failed []string
	wrong := 0
	for _, p := range phones {
		in, binding := l.InCounters(p.SPIIn)
		out := l.OutPackets(p.SPIOut)
		c := p.Tunnel.Counters()
		reg := "yes"
		if !p.registered {
			reg = "NO"
			failed = append(failed, fmt.Sprintf("ue%d: %s", p.N, p.regStatus))
		}
		// A reply sealed for another phone fails to open under this
		// phone's SA, or opens to an inner packet not addressed to it.
		wrong += p.wrongReply + int(c.Drops[ue.DropNotGateway]+c.Drops[ue.DropSelector])
		for _, d := range c.DropList() {
			if strings.HasPrefix(d.Reason, "open:") {
				wrong += int(d.N)
			}
		}
		fmt.Fprintf(w, "ue%-4d %-13s %-11s %-22s 0x%04x/0x%04x   %-11s %-8s %-17s %d/%d/%d\n", p.N, p.LAN, p.Inner, binding,
			p.SPIIn, p.SPIOut, reg, fmt.Sprintf("%d/%d", p.optionsOK, p.optionsSent), fmt.Sprintf("%d/%d", in, out), c.Sent, c.Received, c.KeepalivesSent)
	}
	dec, enc := uint64(0), uint64(0)
	for _, wk := range g.Workers {
		dec += wk.Stats().Decap.Packets.Load()
		enc += wk.Stats().Encap.Packets.Load()
	}
	fmt.Fprintf(w, "\ngateway forwarded %d packets phone→core (decrypted) and %d core→phone (encrypted); ", dec, enc)
	fmt.Fprintf(w, "replies delivered to the wrong phone: %d\n", wrong)
	seen, klog := 0, l.KamailioLog()
	for _, p := range phones {
		if strings.Contains(klog, fmt.Sprintf("request REGISTER from %s:%d call-id demo-ue%d-register-", p.Inner, topo.SIPPort, p.N)) {
			seen++
		}
	}
	fmt.Fprintf(w, "kamailio logged a REGISTER from the inner address of %d of %d phones\n", seen, len(phones))
	if dp, err := g.DataPath(); err == nil {
		st := dp.Stats()
		fmt.Fprintf(w, "XDP verdicts: %s\n", kv(st.XDP))
		if len(st.In.Drops)+len(st.Out.Drops) > 0 {
			fmt.Fprintf(w, "worker drops: decap %s; encap %s\n", kv(st.In.Drops), kv(st.Out.Drops))
		}
	}
	fmt.Fprintln(w, "every phone sits behind the same NAPT address", topo.NAPTWAN, "with its own UDP port: the gateway keeps one binding per SA.")
	if len(failed) > 0 || wrong > 0 {
		return fmt.Errorf("demo failed: %s (wrong replies %d)", strings.Join(failed, "; "), wrong)
	}
	return nil
}

func kamailioVersion() string {
	out, err := exec.Command("kamailio", "-v").Output()
	if err != nil {
		return "kamailio"
	}
	f := strings.Fields(string(out))
	for i, s := range f {
		if s == "kamailio" && i+1 < len(f) {
			return "kamailio " + f[i+1]
		}
	}
	return "kamailio"
}

// kv prints a counter map in a stable order.
func kv(m map[string]uint64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %d", k, m[k])
	}
	return b.String()
}

// cleanupStale removes what an earlier demo killed with SIGKILL left: its
// namespaces and the processes (kamailio, sipsak) still running in them.
func cleanupStale(phones int) {
	names := []string{"napt", "gw", "core", "bulk"}
	for i := 1; i <= max(phones, 3); i++ {
		names = append(names, fmt.Sprintf("ue%d", i))
	}
	for _, n := range names {
		out, err := exec.Command("ip", "netns", "pids", Prefix+n).Output()
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		exec.Command("ip", "netns", "del", Prefix+n).Run()
	}
}
