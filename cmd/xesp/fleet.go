package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/etcdsrc"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "fleet", Summary: "assign SAs to gateways in etcd, move them, list them", Run: func(args []string) error {
		return runFleet(args, os.Stdout)
	}})
}

const fleetHelp = `usage:
  xesp fleet put --node NODE FILE...           assign the SAs of SA files to NODE (keys written inline)
  xesp fleet move --from NODE --to NODE NAME... hand SAs to another gateway, in one transaction
  xesp fleet list [--node NODE]                 list the SAs assigned to each gateway

etcd flags (every subcommand):
  --etcd URLS     comma-separated endpoints (default $XESP_ETCD, else http://127.0.0.1:2379)
  --prefix P      key prefix (default /xesp)
`

func runFleet(args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(os.Stderr, fleetHelp)
		return errUsage
	}
	sub := args[0]
	fs := flag.NewFlagSet("fleet "+sub, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, fleetHelp) }
	endpoints := fs.String("etcd", "", "etcd endpoints, comma-separated")
	prefix := fs.String("prefix", config.DefaultEtcdPrefix, "key prefix")
	node := fs.String("node", "", "gateway (put, list)")
	from := fs.String("from", "", "gateway giving the SAs up (move)")
	to := fs.String("to", "", "gateway taking them over (move)")
	if err := fs.Parse(args[1:]); err != nil {
		return errors.Join(errUsage, err)
	}
	eps := *endpoints
	if eps == "" {
		eps = os.Getenv("XESP_ETCD")
	}
	if eps == "" {
		eps = "http://127.0.0.1:2379"
	}
	// The same checks as the config's etcd section, so a typo is named
	// the same way.
	probe := config.Etcd{Endpoints: strings.Split(eps, ","), Node: "cli", Prefix: *prefix}
	if *node != "" {
		probe.Node = *node
	}
	c := config.Config{Etcd: &probe}
	if err := c.CheckEtcd(); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: probe.Endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	switch sub {
	case "put":
		if *node == "" || fs.NArg() == 0 {
			return fmt.Errorf("%w: fleet put needs --node and SA files", errUsage)
		}
		var all []sa.SA
		for _, f := range fs.Args() {
			list, err := sa.ParseFile(f, sa.Options{})
			if err != nil {
				return err
			}
			for i := range list {
				if list[i].Name == "" {
					return fmt.Errorf("%s: %s: a name is required (it is the etcd key)", f, list[i].Label())
				}
			}
			all = append(all, list...)
		}
		for i := range all {
			if err := etcdsrc.Put(ctx, cli, *prefix, *node, all[i].WithKeys()); err != nil {
				return err
			}
		}
		fmt.Fprintf(stdout, "%d SAs assigned to %s\n", len(all), *node)
	case "move":
		if *from == "" || *to == "" || fs.NArg() == 0 {
			return fmt.Errorf("%w: fleet move needs --from, --to and SA names", errUsage)
		}
		if err := etcdsrc.Move(ctx, cli, *prefix, *from, *to, fs.Args()...); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%d SAs moved from %s to %s\n", fs.NArg(), *from, *to)
	case "list":
		nodes, err := etcdsrc.List(ctx, cli, *prefix)
		if err != nil {
			return err
		}
		names := make([]string, 0, len(nodes))
		for n := range nodes {
			if *node == "" || n == *node {
				names = append(names, n)
			}
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(stdout, "%s: %s\n", n, strings.Join(nodes[n], " "))
		}
	default:
		fmt.Fprint(os.Stderr, fleetHelp)
		return fmt.Errorf("%w: unknown fleet command %q", errUsage, sub)
	}
	return nil
}
