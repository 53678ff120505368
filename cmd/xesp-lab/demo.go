package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"github.com/xesp/xesp/internal/cli"
	"github.com/xesp/xesp/lab/demo"
	"github.com/xesp/xesp/lab/ims"
)

func init() {
	register(cli.Command{Name: "demo", Summary: "run the built-in demo: phones (sipsak on TUNs) behind a NAPT, through the gateway, to kamailio (root)", Run: runDemo})
}

func runDemo(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	phones := fs.Int("phones", 3, "phones behind the NAPT")
	hold := fs.Duration("hold", 0, "keep the topology up this long after the exchange (phones send OPTIONS with sipsak every 2 s; Ctrl-C stops)")
	imsMode := fs.Bool("ims", false, "the IMS path instead: a real Kamailio P-CSCF (examples/kamailio/pcscf.cfg) drives xesp's sec-agree API for phones behind -napts NAPTs (-phones each)")
	napts := fs.Int("napts", 2, "with -ims: NAPTs, each with -phones phones")
	capture := fs.String("capture", "", "with -ims: write the gateway's public side to this pcap and print tshark's decryption of the first phone's flow")
	metricsAddr := fs.String("metrics", "127.0.0.1:9109", "serve /metrics here while the demo runs (\"\" for none)")
	if err := fs.Parse(args); err != nil {
		return errors.Join(errUsage, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *imsMode {
		return ims.Demo(ctx, ims.DemoOptions{NAPTs: *napts, PhonesPerNAPT: *phones, Capture: *capture, Out: os.Stdout})
	}
	return demo.Run(ctx, demo.Options{Phones: *phones, Hold: *hold, Metrics: *metricsAddr, Version: version, Out: os.Stdout})
}
