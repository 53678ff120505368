package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"text/tabwriter"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/internal/cli"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

func init() {
	register(cli.Command{Name: "attach", Summary: "load the XDP programs and attach them (pinned)", Run: runAttach})
	register(cli.Command{Name: "detach", Summary: "detach the XDP programs and remove their pins", Run: runDetach})
	register(cli.Command{Name: "counters", Summary: "print the XDP verdict counters of a pinned instance", Run: runCounters})
}

// ifaceFlags are the flags every BPF command shares.
type ifaceFlags struct {
	public, private, pinRoot, bpffs string
}

func (f *ifaceFlags) register(fs *flag.FlagSet, withPrivate bool) {
	fs.StringVar(&f.public, "public", "", "public interface (names the instance)")
	if withPrivate {
		fs.StringVar(&f.private, "private", "", "private interface")
	}
	fs.StringVar(&f.pinRoot, "pin", "", "pin root directory on bpffs (default BPFFS/xesp)")
	fs.StringVar(&f.bpffs, "bpffs", loader.DefaultBPFFS, "bpffs mount point, mounted if missing; under `ip netns exec` use one outside /sys mounted from the host, or the pins die with the process")
}

func (f *ifaceFlags) options() (loader.Options, error) {
	if f.public == "" {
		return loader.Options{}, fmt.Errorf("%w: --public is required", errUsage)
	}
	return loader.Options{Public: f.public, Private: f.private, PinRoot: f.pinRoot, BPFFS: f.bpffs}, nil
}

func runAttach(args []string) error {
	fs := flag.NewFlagSet("attach", flag.ContinueOnError)
	var f ifaceFlags
	f.register(fs, true)
	generic := fs.Bool("generic", false, "attach in generic (SKB) mode instead of native (driver) mode")
	dryRun := fs.Bool("dry-run", false, "load and verify the programs, print what would be attached, attach nothing")
	replace := fs.Bool("replace", false, "replace the programs in links found pinned (upgrade)")
	saCap := fs.Uint("sa-capacity", loader.DefaultSACapacity, "inbound SA map size")
	xskSlots := fs.Uint("xsk-slots", loader.DefaultXSKSlots, "slots per XSK map (RX queues x workers)")
	workers := fs.Uint("workers", 0, "sockets per RX queue written to the config map (0: leave as is)")
	nattPort := fs.Uint("natt-port", 0, "NAT-T UDP port written to the config map (0: leave as is; the program defaults to 4500)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	opts, err := f.options()
	if err != nil {
		return err
	}
	opts.Generic, opts.Replace = *generic, *replace
	opts.SACapacity, opts.XSKSlots = uint32(*saCap), uint32(*xskSlots)
	opts.NoPin = *dryRun

	mode := loader.ModeNative
	if opts.Generic {
		mode = loader.ModeGeneric
	}
	if *dryRun {
		for _, name := range []string{opts.Public, opts.Private} {
			if name == "" {
				continue
			}
			if _, err := net.InterfaceByName(name); err != nil {
				return fmt.Errorf("interface %s: %w", name, err)
			}
		}
	}
	in, err := loader.Load(opts)
	if err != nil {
		return err
	}
	if *dryRun {
		defer in.Close()
		fmt.Println("programs loaded and verified by the kernel (dry run: nothing attached, nothing pinned)")
		fmt.Printf("would attach xesp_public to %s (%s)\n", opts.Public, mode)
		if opts.Private != "" {
			fmt.Printf("would attach xesp_private to %s (%s)\n", opts.Private, mode)
		}
		fmt.Printf("would pin under %s\n", opts.Dir())
		printMapSizes(in)
		return nil
	}
	if *workers != 0 || *nattPort != 0 {
		cfg, err := in.Maps.Config.Get()
		if err != nil {
			in.Close()
			return err
		}
		if *workers != 0 {
			cfg.Workers = uint16(*workers)
		}
		if *nattPort != 0 {
			cfg.NattPort = uint16(*nattPort)
		}
		if err := in.Maps.Config.Set(cfg); err != nil {
			in.Close()
			return err
		}
	}
	if err := in.Attach(); err != nil {
		// Leave nothing half-attached behind.
		return errors.Join(err, in.Detach())
	}
	for _, a := range []*loader.Attachment{in.Public, in.Private} {
		if a == nil {
			continue
		}
		how := "attached"
		if a.Reused {
			how = "already attached (pinned link reused)"
		}
		fmt.Printf("xesp_%s on %s (index %d): %s, %s mode\n", a.Side, a.Ifname, a.Ifindex, how, a.Mode)
	}
	fmt.Printf("pinned under %s\n", in.Dir())
	if in.MountedBPFFS {
		// Whether this mount outlives us depends on the mount namespace,
		// which cannot be told reliably from inside a container.
		fmt.Fprintf(os.Stderr, "note: mounted bpffs at %s; if this process has its own mount namespace (ip netns exec), that mount, the pins and the links go away when it exits: use --bpffs with a bpffs mounted from the host\n", opts.BPFFS)
	}
	printMapSizes(in)
	return in.Close()
}

func printMapSizes(in *loader.Instance) {
	o := &in.Objects
	fmt.Printf("maps: sas %d, policies %d, xsks_public %d, xsks_private %d, counters %d reasons\n",
		o.Sas.MaxEntries(), o.Policies.MaxEntries(), o.XsksPublic.MaxEntries(), o.XsksPrivate.MaxEntries(), o.Counters.MaxEntries())
}

func runDetach(args []string) error {
	fs := flag.NewFlagSet("detach", flag.ContinueOnError)
	var f ifaceFlags
	f.register(fs, true) // --private is accepted for symmetry: the pins record it
	if err := fs.Parse(args); err != nil {
		return err
	}
	opts, err := f.options()
	if err != nil {
		return err
	}
	if err := loader.DetachPinned(opts); err != nil {
		return err
	}
	fmt.Printf("detached and unpinned %s\n", opts.Dir())
	return nil
}

func runCounters(args []string) error {
	fs := flag.NewFlagSet("counters", flag.ContinueOnError)
	var f ifaceFlags
	f.register(fs, false)
	all := fs.Bool("all", false, "print reasons with zero packets too")
	if err := fs.Parse(args); err != nil {
		return err
	}
	opts, err := f.options()
	if err != nil {
		return err
	}
	set, err := maps.Open(opts.Dir())
	if err != nil {
		return err
	}
	defer set.Close()
	var s maps.Snapshot
	if err := set.Counters.Read(&s); err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "reason\tpackets\tbytes\t")
	for r, c := range s {
		if c.Packets == 0 && !*all {
			continue
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t\n", bpf.Reason(r), c.Packets, c.Bytes)
	}
	return w.Flush()
}
