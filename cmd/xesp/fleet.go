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
  xesp fleet put --node NODE FILE...           assign the SAs of SA files to NODE (sealed under --kek)
  xesp fleet move --from NODE --to NODE NAME... hand SAs to another gateway, in one transaction
  xesp fleet list [--node NODE]                 list the SAs assigned to each gateway
  xesp fleet rekey-store                        re-seal every SA record (in clear or under an older
                                               key id) under the KEK file's current (last) key

etcd flags (every subcommand):
  --etcd URLS          comma-separated endpoints (default $XESP_ETCD, else https://127.0.0.1:2379)
  --prefix P           key prefix (default /xesp)
  --cacert FILE        CA verifying etcd's certificate (--ca too; default $XESP_ETCD_CA)
  --cert, --key FILE   client certificate and key (default $XESP_ETCD_CERT, $XESP_ETCD_KEY)
  --user NAME          etcd user (default $XESP_ETCD_USER), with
  --password-file F    the file holding its password (default $XESP_ETCD_PASSWORD_FILE)
  --kek FILE           key-encryption key file (default $XESP_KEK); needed by put and rekey-store
  --insecure           allow http:// endpoints and records in clear (a lab only)
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
	cacert := fs.String("cacert", "", "CA file verifying etcd (also --ca)")
	fs.StringVar(cacert, "ca", "", "same as --cacert")
	cert := fs.String("cert", "", "client certificate file")
	key := fs.String("key", "", "client certificate's key file")
	user := fs.String("user", "", "etcd user")
	pwFile := fs.String("password-file", "", "file holding the etcd user's password")
	kekFile := fs.String("kek", "", "key-encryption key file")
	insecure := fs.Bool("insecure", false, "allow http endpoints and SA records in clear (a lab)")
	if err := fs.Parse(args[1:]); err != nil {
		return errors.Join(errUsage, err)
	}
	eps := *endpoints
	if eps == "" {
		eps = os.Getenv("XESP_ETCD")
	}
	if eps == "" {
		eps = "https://127.0.0.1:2379"
	}
	// The same checks as the config's etcd section, so a typo is named
	// the same way.
	probe := config.Etcd{Endpoints: strings.Split(eps, ","), Node: "cli", Prefix: *prefix, Insecure: *insecure,
		Username: orEnv(*user, "XESP_ETCD_USER"), PasswordFile: orEnv(*pwFile, "XESP_ETCD_PASSWORD_FILE"),
		KEKFile: orEnv(*kekFile, "XESP_KEK"), NoKEKNeeded: sub == "move" || sub == "list"}
	if ca, c, k := orEnv(*cacert, "XESP_ETCD_CA"), orEnv(*cert, "XESP_ETCD_CERT"), orEnv(*key, "XESP_ETCD_KEY"); ca != "" || c != "" || k != "" {
		probe.TLS = &config.EtcdTLS{CA: ca, Cert: c, Key: k}
	}
	if *node != "" {
		probe.Node = *node
	}
	c := config.Config{Etcd: &probe}
	if err := c.CheckEtcd(); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	cli, err := etcdsrc.Dial(&probe, etcdsrc.DialOptions{})
	if err != nil {
		return err
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
			if err := etcdsrc.PutSealed(ctx, cli, probe.KEK, *prefix, *node, all[i].WithKeys()); err != nil {
				return err
			}
		}
		how := "in clear (--insecure, no --kek)"
		if probe.KEK != nil {
			how = "sealed under key id " + probe.KEK.Current()
		}
		fmt.Fprintf(stdout, "%d SAs assigned to %s, %s\n", len(all), *node, how)
	case "rekey-store":
		if probe.KEK == nil {
			return fmt.Errorf("%w: fleet rekey-store needs --kek", errUsage)
		}
		res, err := etcdsrc.Rekey(ctx, cli, probe.KEK, *prefix)
		if err != nil {
			return err
		}
		var was []string
		for kid, n := range res.ByKID {
			if kid == "" {
				kid = "clear"
			}
			was = append(was, fmt.Sprintf("%s %d", kid, n))
		}
		sort.Strings(was)
		fmt.Fprintf(stdout, "%d SA records re-sealed under key id %s, %d already were (found: %s)\n",
			res.Resealed, probe.KEK.Current(), res.Current, strings.Join(was, ", "))
		if len(res.Unknown)+len(res.Malformed) > 0 {
			return fmt.Errorf("left alone: %d records under a key id the KEK file lacks %v, %d that do not open %v",
				len(res.Unknown), res.Unknown, len(res.Malformed), res.Malformed)
		}
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
