package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/xesp/xesp/internal/cli"
	"github.com/xesp/xesp/lab/demo"
	"github.com/xesp/xesp/lab/ims"
	"github.com/xesp/xesp/lab/topo"
)

func init() {
	register(cli.Command{Name: "demo", Summary: "run the built-in demo: phones (sipsak on TUNs) behind several NAPTs sharing private addresses, through the gateway, to kamailio and back (root)", Run: runDemo})
}

func runDemo(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	napts := fs.Int("napts", 3, "NAPTs, each numbering its LAN 192.168.1.0/24")
	phones := fs.Int("phones", 3, "phones behind each NAPT (at most 200 in all)")
	core := fs.String("core", "pool", "where each phone's core address comes from: pool (the gateway's core_pool), explicit (inner.core in the SAs), or none (private addresses reach the core: with more than one NAPT the gateway refuses the phones' SAs as ambiguous)")
	hold := fs.Duration("hold", 0, "keep the topology up this long after the exchange (the core sends OPTIONS to every phone every 2 s; Ctrl-C stops)")
	imsMode := fs.Bool("ims", false, "the IMS path instead: a real Kamailio P-CSCF (examples/kamailio/pcscf.cfg) drives xesp's sec-agree API for phones behind -napts NAPTs (-phones each)")
	capture := fs.String("capture", "", "with -ims: write the gateway's public side to this pcap and print tshark's decryption of the first phone's flow")
	transport := fs.Bool("transport", false, "transport-mode SAs for the phones (the gateway delivers their segments to kamailio from their core addresses; needs -core pool or explicit)")
	direct := fs.Int("direct", 0, "phones on the public segment without a NAPT, sending plain ESP (IP protocol 50)")
	metricsAddr := fs.String("metrics", "127.0.0.1:9109", "serve /metrics here while the demo runs (\"\" for none)")
	if err := fs.Parse(args); err != nil {
		return errors.Join(errUsage, err)
	}
	modes := map[string]topo.CoreMode{"pool": topo.CoreFromPool, "explicit": topo.CoreExplicit, "none": topo.CoreNone}
	mode, ok := modes[*core]
	if !ok {
		return errors.Join(errUsage, fmt.Errorf("-core %q: want pool, explicit or none", *core))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *imsMode {
		return ims.Demo(ctx, ims.DemoOptions{NAPTs: *napts, PhonesPerNAPT: *phones, Capture: *capture, Out: os.Stdout})
	}
	return demo.Run(ctx, demo.Options{NAPTs: *napts, Phones: *phones, Core: mode, Transport: *transport, Direct: *direct, Hold: *hold, Metrics: *metricsAddr, Version: version, Out: os.Stdout})
}
