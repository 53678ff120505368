package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/internal/cli"
	"github.com/xesp/xesp/internal/safefile"
)

func init() {
	register(cli.Command{Name: "secagree", Summary: "create or delete a registration's IMS sec-agree SAs (P-CSCF side)", Run: func(args []string) error {
		return runSecAgree(args, os.Stdout, os.Stderr)
	}})
}

const secAgreeHelp = `usage:
  xesp secagree create --registration NAME --security-client VALUE --ck-file F --ik-file F
                       --ue ADDR:PORT --local ADDR --port-c N --port-s N
                       [--ue-inner ADDR --pcscf ADDR] [--spi-c N --spi-s N] [--replaces NAME] [--json]
      derive and install the four SAs of TS 33.203 from the phone's Security-Client
      and print the Security-Server value to send in the 401 (with a core_pool the
      phone's core address, docs/addressing.md, goes to stderr; --json has it as core);
      --replaces names the registration a re-authentication replaces (its binding,
      inner and core addresses are taken over when --ue, --ue-inner, --pcscf are omitted)
  xesp secagree show NAME [--json]
      the registration's SAs now (one line each: name, SPI, state, binding, core)
  xesp secagree delete NAME [--grace DURATION] [--json]
      remove every SA of the registration (after its last message was sent): inbound
      first, outbound after the grace (server default 0: the data path still seals what
      was already steered to them)

--ck/--ik take the keys as hex on the command line (visible to other users
in the process list: prefer --ck-file/--ik-file). API flags as for 'xesp sa'
(--api, --token, --token-file, --ca, --cert, --key; default unix:%s).
`

func runSecAgree(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stderr, secAgreeHelp, config.Defaults().API.Unix)
		if len(args) == 0 {
			return fmt.Errorf("%w: missing subcommand", errUsage)
		}
		return flag.ErrHelp
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("secagree "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af apiFlags
	af.register(fs)
	asJSON := fs.Bool("json", false, "print the API's answer as JSON")
	var req api.SecAgreeRequest
	var ckFile, ikFile string
	var portC, portS, spiC, spiS uint
	grace := fs.String("grace", "", "delete: keep the outbound SAs this long after the inbound ones (default: the server's, 0)")
	if sub == "create" {
		fs.StringVar(&req.Registration, "registration", "", "registration name (names the SAs NAME.in-s ...)")
		fs.StringVar(&req.SecurityClient, "security-client", "", "the phone's Security-Client header value")
		fs.StringVar(&req.CK, "ck", "", "CK, 16 bytes hex")
		fs.StringVar(&req.IK, "ik", "", "IK, 16 bytes hex")
		fs.StringVar(&ckFile, "ck-file", "", "file holding CK in hex")
		fs.StringVar(&ikFile, "ik-file", "", "file holding IK in hex")
		fs.StringVar(&req.UE, "ue", "", "the phone's observed address:port")
		fs.StringVar(&req.UEInner, "ue-inner", "", "the phone's own address (tunnel modes)")
		fs.StringVar(&req.PCSCF, "pcscf", "", "the P-CSCF's address behind the gateway (tunnel modes)")
		fs.StringVar(&req.Local, "local", "", "the gateway's public address")
		fs.UintVar(&portC, "port-c", 0, "the P-CSCF's protected client port")
		fs.UintVar(&portS, "port-s", 0, "the P-CSCF's protected server port")
		fs.UintVar(&spiC, "spi-c", 0, "the P-CSCF's inbound spi-c (0: the daemon picks)")
		fs.UintVar(&spiS, "spi-s", 0, "the P-CSCF's inbound spi-s (0: the daemon picks)")
		fs.StringVar(&req.Replaces, "replaces", "", "the registration this re-authentication replaces")
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	switch sub {
	case "create":
		if len(pos) > 0 {
			return fmt.Errorf("%w: create takes no positional arguments (got %q)", errUsage, pos[0])
		}
		for _, k := range []struct {
			name, file string
			dst        *string
		}{{"ck", ckFile, &req.CK}, {"ik", ikFile, &req.IK}} {
			if k.file == "" {
				continue
			}
			if *k.dst != "" {
				return fmt.Errorf("%w: give --%s or --%s-file, not both", errUsage, k.name, k.name)
			}
			b, err := safefile.Read(k.file, 4096)
			if err != nil {
				return fmt.Errorf("%s file: %w", k.name, err)
			}
			*k.dst = strings.TrimSpace(string(b))
		}
		if portC > 65535 || portS > 65535 || spiC > 0xffffffff || spiS > 0xffffffff {
			return fmt.Errorf("%w: ports are 1..65535, SPIs 32 bits", errUsage)
		}
		req.PortC, req.PortS, req.SPIC, req.SPIS = uint16(portC), uint16(portS), uint32(spiC), uint32(spiS)
		c, err := af.client()
		if err != nil {
			return err
		}
		defer c.Close()
		resp, err := c.SecAgree(ctx, req)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(stdout).Encode(resp)
		}
		fmt.Fprintln(stdout, resp.SecurityServer)
		if resp.Core != "" {
			// stdout stays the header value alone, for scripts.
			fmt.Fprintf(stderr, "core address: %s\n", resp.Core)
		}
		return nil
	case "delete":
		if len(pos) != 1 {
			return fmt.Errorf("%w: delete takes one registration name", errUsage)
		}
		c, err := af.client()
		if err != nil {
			return err
		}
		defer c.Close()
		g := time.Duration(-1)
		if *grace != "" {
			if g, err = time.ParseDuration(*grace); err != nil || g < 0 {
				return fmt.Errorf("%w: --grace %q: want a duration such as 200ms", errUsage, *grace)
			}
		}
		resp, err := c.DeleteRegistrationGrace(ctx, pos[0], g)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(stdout).Encode(resp)
		}
		for _, v := range resp.SAs {
			fmt.Fprintf(stdout, "deleted %s (%s)\n", v.Name, v.Ref)
		}
		return nil
	case "show":
		if len(pos) != 1 {
			return fmt.Errorf("%w: show takes one registration name", errUsage)
		}
		c, err := af.client()
		if err != nil {
			return err
		}
		defer c.Close()
		resp, err := c.Registration(ctx, pos[0])
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(stdout).Encode(resp)
		}
		for _, v := range resp.SAs {
			core := "-"
			if v.Inner != nil && v.Inner.Core != "" {
				core = v.Inner.Core
			}
			fmt.Fprintf(stdout, "%s\t%s\t%s\t%s\tbinding %s\tcore %s\n", v.Name, v.Direction, v.SPI, v.State, v.Binding, core)
		}
		return nil
	}
	return fmt.Errorf("%w: unknown subcommand %q (create, delete, show)", errUsage, sub)
}
