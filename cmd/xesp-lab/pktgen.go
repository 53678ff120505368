package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os/signal"
	"syscall"
	"time"

	"github.com/xesp/xesp/bench/gen"
	"github.com/xesp/xesp/bench/pktgen"
	"github.com/xesp/xesp/internal/cli"
	"github.com/xesp/xesp/lab/netns"
)

func init() {
	register(cli.Command{Name: "pktgen", Summary: "send valid ESP-in-UDP (or cleartext) test traffic with XDP live frames (root)", Run: runPktgen})
}

func runPktgen(args []string) error {
	fs := flag.NewFlagSet("pktgen", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: xesp-lab pktgen -dev IF -dst-mac MAC [flags]

Sends really encrypted ESP-in-UDP (RFC 3948) from -sas phones to the
gateway, or with -clear the core's cleartext toward those phones (the encap
direction), out of IF with BPF_PROG_RUN live frames (or AF_XDP TX with -engine afxdp). Pair i's keys are
derived from i (test keys only); -sa-file writes the gateway's side of the
same pairs, so a gateway loaded with it decrypts what pktgen sends. The
peer of IF must have an XDP program attached (veth drops XDP_TX frames
otherwise). Reports packets/s sent.`)
		fs.PrintDefaults()
	}
	dev := fs.String("dev", "", "device to send from (required)")
	ns := fs.String("netns", "", "network namespace of -dev (default: the current one)")
	dstMAC := fs.String("dst-mac", "", "destination MAC: the gateway's interface (required)")
	srcMAC := fs.String("src-mac", "", "source MAC (default: -dev's)")
	clear := fs.Bool("clear", false, "send cleartext from -core to the phones' inner addresses (encap direction)")
	nsas := fs.Int("sas", 1, "SA pairs (phones), 1..1000000")
	sizes := fs.String("sizes", "200", `inner IP packet sizes: N, "imix" (64/570/1400 7:4:1), "sip" (360/520/900/1300 3:4:2:1), or "a,b,c:wa,wb,wc"`)
	rateF := fs.Float64("rate", 0, "target packets/s (0: full speed)")
	dur := fs.Duration("duration", 0, "send for this long")
	count := fs.Uint64("count", 0, "send this many packets")
	cpu := fs.Int("cpu", 0, "pin the sending thread to this CPU (-1: don't)")
	engine := fs.String("engine", pktgen.EngineLive, `"live" (BPF_PROG_RUN XDP live frames) or "afxdp" (AF_XDP TX, copy mode on veth)`)
	phone := fs.String("phone", "192.0.2.10", "phones' outer address (behind the NAPT)")
	gw := fs.String("gateway", "192.0.2.1", "gateway's public address")
	core := fs.String("core", "10.0.0.1:5060", "core address:port (inner destination, or cleartext source)")
	saFile := fs.String("sa-file", "", "write the gateway's side of the SA pairs to this JSON SA file and exit")
	if err := fs.Parse(args); err != nil {
		return errors.Join(errUsage, err)
	}
	nw := pktgen.DefaultNet()
	var err error
	if nw.Phone, err = netip.ParseAddr(*phone); err != nil {
		return fmt.Errorf("%w: -phone: %v", errUsage, err)
	}
	if nw.Gateway, err = netip.ParseAddr(*gw); err != nil {
		return fmt.Errorf("%w: -gateway: %v", errUsage, err)
	}
	if nw.Core, err = netip.ParseAddrPort(*core); err != nil {
		return fmt.Errorf("%w: -core: %v", errUsage, err)
	}
	if *nsas < 1 || *nsas > pktgen.MaxSAs {
		return fmt.Errorf("%w: -sas %d outside 1..%d", errUsage, *nsas, pktgen.MaxSAs)
	}
	if *saFile != "" {
		if err := pktgen.WriteSAFile(context.Background(), *saFile, *nsas, nw); err != nil {
			return err
		}
		fmt.Printf("wrote %d SAs (%d pairs) to %s\n", 2**nsas, *nsas, *saFile)
		return nil
	}
	if *dev == "" || *dstMAC == "" {
		return fmt.Errorf("%w: -dev and -dst-mac are required", errUsage)
	}
	if *engine != pktgen.EngineLive && *engine != pktgen.EngineAFXDP {
		return fmt.Errorf("%w: -engine %q (live or afxdp)", errUsage, *engine)
	}
	if *dur == 0 && *count == 0 {
		return fmt.Errorf("%w: set -duration or -count", errUsage)
	}
	dst, err := net.ParseMAC(*dstMAC)
	if err != nil {
		return fmt.Errorf("%w: -dst-mac: %v", errUsage, err)
	}
	sz, err := pktgen.ParseSizes(*sizes)
	if err != nil {
		return fmt.Errorf("%w: -sizes: %v", errUsage, err)
	}
	var flows []gen.Flow
	if *clear {
		flows, err = pktgen.ClearFlows(*nsas, nw)
	} else {
		flows, err = pktgen.Flows(*nsas, nw)
	}
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var res pktgen.Result
	body := func() error {
		ifc, err := net.InterfaceByName(*dev)
		if err != nil {
			return fmt.Errorf("-dev: %w", err)
		}
		src := ifc.HardwareAddr
		if *srcMAC != "" {
			if src, err = net.ParseMAC(*srcMAC); err != nil {
				return fmt.Errorf("%w: -src-mac: %v", errUsage, err)
			}
		}
		s, err := pktgen.New(pktgen.Options{Ifindex: ifc.Index, Src: src, Dst: dst, Clear: *clear, Flows: flows, Sizes: sz, Rate: *rateF, CPU: *cpu, Engine: *engine})
		if err != nil {
			return err
		}
		defer s.Close()
		f := s.Gen().Frame(0)
		fmt.Printf("pktgen: %s, %d SA pairs, sizes %v, first frame %d B, ring %d, engine %s\n",
			map[bool]string{false: "ESP-in-UDP", true: "cleartext"}[*clear], *nsas, sz.Pattern(), len(f), s.Gen().Ring(), *engine)
		res, err = s.Run(ctx, *count, *dur)
		return err
	}
	if *ns != "" {
		err = (&netns.NS{Name: *ns}).Do(body)
	} else {
		err = body()
	}
	if err != nil {
		return err
	}
	rest := "resealing ESP sequence numbers"
	switch {
	case *rateF > 0:
		rest = "pacing to -rate"
	case *clear:
		rest = "between sends"
	}
	fmt.Printf("sent %d packets in %v: %.0f pps average, %.0f pps while sending (%.1f%% of the time; the rest %s)\n",
		res.Sent, res.Elapsed.Round(time.Millisecond), res.PPS(), res.WirePPS(), 100*res.Sending.Seconds()/max(res.Elapsed.Seconds(), 1e-9), rest)
	return nil
}
