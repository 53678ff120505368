// Package demo runs the built-in demo: the problem the product exists for,
// solved, with software nobody on this team wrote at both ends. Phones sit
// behind several NAPTs whose LANs are numbered alike, so phones behind
// different NAPTs share their private (inner) address and SIP port. Each
// phone has its own UDP-encapsulated ESP SA pair carrying a core address,
// and a TUN device; sipsak in each phone's namespace registers with
// kamailio through that TUN; then the core sends OPTIONS to every
// registered phone (kamailio looks each up in its location table) and
// each phone answers its own. Misdelivery is measured at the phones.
//
//	napt1: ue1 192.168.1.10, ue2 192.168.1.11 ─┐
//	napt2: ue3 192.168.1.10, ue4 192.168.1.11 ─┼─ xesp gateway (XDP on both veths) ── core (kamailio)
//	napt3: ue5 192.168.1.10, ue6 192.168.1.11 ─┘
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
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/lab/topo"
	"github.com/xesp/xesp/lab/ue"
)

// Options tune the demo.
type Options struct {
	NAPTs  int           // NAPTs, each numbering its LAN 192.168.1.0/24 (3)
	Phones int           // phones behind each NAPT (3)
	Core   topo.CoreMode // where core addresses come from (default: the gateway's core_pool)
	// Transport gives the phones transport-mode SAs (docs/addressing.md,
	// "Transport mode"); Direct adds phones without a NAPT, plain ESP.
	Transport bool
	Direct    int
	Metrics   string        // /metrics listen address on the host; "" for none
	Hold      time.Duration // keep running (the core sends OPTIONS to every phone every 2 s) this long after the exchange
	Version   string
	Out       io.Writer
	Log       *slog.Logger
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
	inTable     bool // kamailio's location table has it, received at its core address
	optionsOK   int  // core-initiated OPTIONS answered by this phone
	optionsSent int
	otherAnswer int // core-initiated OPTIONS for it answered by another phone
}

// parallel bounds concurrent sipsak runs: two CPUs, many phones.
const parallel = 16

// Run builds the topology, runs the exchange, prints the result and tears
// everything down. It returns an error if any phone failed to register or
// answer the core, or any phone measured a misdelivery.
func Run(ctx context.Context, o Options) (err error) {
	if o.NAPTs <= 0 {
		o.NAPTs = 3
	}
	if o.Phones <= 0 {
		o.Phones = 3
	}
	if o.NAPTs*o.Phones > 200 {
		return fmt.Errorf("demo: at most 200 phones (NAPTs × phones)")
	}
	w := o.Out
	if err := topo.CheckTools(); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if o.Prefix == "" {
		o.Prefix = Prefix
		cleanupStale(o.NAPTs, o.NAPTs*o.Phones)
	}
	fmt.Fprintf(w, "building the demo topology: %d NAPTs × %d phones ─ xesp gateway ─ SIP core (kamailio)\n", o.NAPTs, o.Phones)
	fmt.Fprintf(w, "every NAPT numbers its LAN %s (first phone %s); a phone's inner address is its LAN address; every phone's SIP port is %d\n",
		topo.LAN, topo.FirstPhone, topo.SIPPort)
	if o.Transport || o.Direct > 0 {
		mode := "tunnel"
		if o.Transport {
			mode = "transport"
		}
		fmt.Fprintf(w, "ESP %s mode; %d phones on the public segment without a NAPT (plain ESP, TUN 192.168.2.x)\n", mode, o.Direct)
	}
	l, err := topo.Start(ctx, topo.Options{Prefix: o.Prefix, NAPTs: o.NAPTs, Phones: o.Phones, Direct: o.Direct, Transport: o.Transport, Core: o.Core, Log: o.Log})
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
	fmt.Fprintf(w, "gateway up: XDP %s on pub and %s on priv, AF_XDP %s mode, %d workers, %d SAs, core addresses: %s\n",
		g.Loader.Public.Mode, g.Loader.Private.Mode, g.Sockets[0][0].Mode(), l.Config.Workers, len(l.Config.SAList), o.Core)
	fmt.Fprintf(w, "SIP core: %s on %s:%d (edge registrar: force_rport, nathelper, usrloc; config examples/kamailio/kamailio.cfg)\n", kamailioVersion(), topo.Core, topo.SIPPort)
	fmt.Fprintf(w, "phones: xesp's phone on a TUN (ims0) in each namespace, sipsak as the SIP client, a SIP listener on %d answering OPTIONS\n", topo.SIPPort)

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
	each := func(f func(p *phone)) {
		var wg sync.WaitGroup
		sem := make(chan struct{}, parallel)
		for _, p := range phones {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				f(p)
			}()
		}
		wg.Wait()
	}
	fmt.Fprintln(w, "\neach phone runs sipsak: REGISTER to kamailio through its TUN, its NAPT and the gateway ...")
	each(func(p *phone) {
		callID := fmt.Sprintf("demo-%s-register@xesp", p.User)
		r, err := l.Sipsak(ctx, p.Phone, "REGISTER", callID, 1)
		p.registered = err == nil && r.OK() && r.CallID == callID
		p.regStatus = r.Status
		if err != nil {
			p.regStatus, _, _ = strings.Cut(err.Error(), "\n")
		}
	})
	regs, err := l.Registrations()
	if err != nil {
		return err
	}
	for _, p := range phones {
		want := fmt.Sprintf("sip:%s:%d", p.SeenAt(), topo.SIPPort)
		for _, got := range regs[p.User] {
			p.inTable = p.inTable || got == want
		}
	}
	for _, p := range phones {
		if err := l.Listen(p.Phone); err != nil {
			return err
		}
	}
	fmt.Fprintln(w, "the core sends OPTIONS to every registered phone (kamailio looks each up in its location table) ...")
	deadline := time.Now().Add(o.Hold)
	for round := 1; ctx.Err() == nil; round++ {
		each(func(p *phone) {
			r, err := l.CoreOptions(ctx, p.Phone, fmt.Sprintf("demo-core-%s-%d@core", p.User, round))
			if err != nil && ctx.Err() != nil {
				return // Ctrl-C stopped sipsak: not an attempt
			}
			p.optionsSent++
			switch {
			case err != nil:
			case r.AnsweredBy(p.Phone):
				p.optionsOK++
			case r.OK():
				p.otherAnswer++
			}
		})
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

	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "phone\tNAPT\tLAN = inner\tcore address\tNAPT mapping (gw)\tSPI in/out\tregistered\tcore OPTIONS\tESP in/out (gw)\tmisdelivered spi/dst/sip")
	var failed []string
	var total ue.Misdelivered
	others := 0
	for _, p := range phones {
		in, binding := l.InCounters(p.SPIIn)
		out := l.OutPackets(p.SPIOut)
		m := p.Tunnel.Counters().Misdelivered()
		total.ForeignSPI += m.ForeignSPI
		total.NotAddressed += m.NotAddressed
		total.OtherPhone += m.OtherPhone
		others += p.otherAnswer
		reg := "yes"
		switch {
		case !p.registered:
			reg = "NO"
			failed = append(failed, fmt.Sprintf("%s: REGISTER: %s", p.User, p.regStatus))
		case !p.inTable:
			reg = "not found"
			failed = append(failed, fmt.Sprintf("%s: not in kamailio's location table at %s (%v)", p.User, p.SeenAt(), regs[p.User]))
		}
		if p.optionsOK != p.optionsSent {
			failed = append(failed, fmt.Sprintf("%s: answered %d of %d core OPTIONS", p.User, p.optionsOK, p.optionsSent))
		}
		core := "-"
		if p.Core.IsValid() {
			core = p.Core.String()
		}
		napt := fmt.Sprint(p.NAPT)
		if p.Direct {
			napt = "none"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.User, napt, p.Inner, core, binding,
			fmt.Sprintf("0x%04x/0x%04x", p.SPIIn, p.SPIOut), reg, fmt.Sprintf("%d/%d", p.optionsOK, p.optionsSent),
			fmt.Sprintf("%d/%d", in, out), fmt.Sprintf("%d/%d/%d", m.ForeignSPI, m.NotAddressed, m.OtherPhone))
	}
	tw.Flush()
	dec, enc := uint64(0), uint64(0)
	for _, wk := range g.Workers {
		dec += wk.Stats().Decap.Packets.Load()
		enc += wk.Stats().Encap.Packets.Load()
	}
	shared := map[string]int{}
	for _, p := range phones {
		shared[p.Inner.String()]++
	}
	var dup []string
	for a, n := range shared {
		if n > 1 {
			dup = append(dup, fmt.Sprintf("%s ×%d", a, n))
		}
	}
	sort.Strings(dup)
	fmt.Fprintf(w, "\nphones sharing an inner address and SIP port %d: %s\n", topo.SIPPort, strings.Join(dup, ", "))
	fmt.Fprintf(w, "gateway forwarded %d packets phone→core (decrypted) and %d core→phone (encrypted)\n", dec, enc)
	fmt.Fprintf(w, "delivered to the wrong phone, measured at the phones: %d (%d ESP under another phone's SPI, %d for another inner address/port, %d SIP messages for another phone)\n",
		total.Total(), total.ForeignSPI, total.NotAddressed, total.OtherPhone)
	fmt.Fprintf(w, "core OPTIONS answered by another phone than the one addressed: %d\n", others)
	seen, klog := 0, l.KamailioLog()
	for _, p := range phones {
		if strings.Contains(klog, fmt.Sprintf("request REGISTER from %s:%d call-id demo-%s-register@xesp", p.SeenAt(), topo.SIPPort, p.User)) {
			seen++
		}
	}
	from := "its own core address"
	if o.Core == topo.CoreNone {
		from = "its inner address"
	}
	fmt.Fprintf(w, "kamailio saw the REGISTER of %d of %d phones from %s\n", seen, len(phones), from)
	if dp, err := g.DataPath(); err == nil {
		st := dp.Stats()
		fmt.Fprintf(w, "XDP verdicts: %s\n", kv(st.XDP))
		if len(st.In.Drops)+len(st.Out.Drops) > 0 {
			fmt.Fprintf(w, "worker drops: decap %s; encap %s\n", kv(st.In.Drops), kv(st.Out.Drops))
		}
	}
	if len(failed) > 0 || total.Total() > 0 || others > 0 {
		return fmt.Errorf("demo failed: %s (misdelivered %d, answered by another phone %d)", strings.Join(failed, "; "), total.Total(), others)
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
func cleanupStale(napts, phones int) {
	names := []string{"inet", "gw", "core", "bulk"}
	for i := 1; i <= max(napts, 3); i++ {
		names = append(names, fmt.Sprintf("napt%d", i))
	}
	for i := 1; i <= max(phones, 9); i++ {
		names = append(names, fmt.Sprintf("ue%d", i))
	}
	for _, n := range names {
		ns := &netns.NS{Name: Prefix + n}
		ns.KillAll()
		ns.Close() // a namespace that is not there is nothing to clean
	}
}
