package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"text/tabwriter"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "stats", Summary: "print the gateway's traffic, drop and XDP figures from the control API", Run: func(args []string) error {
		return runStats(args, os.Stdout, os.Stderr)
	}})
}

func runStats(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("stats", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af apiFlags
	af.register(fs)
	asJSON := fs.Bool("json", false, "print the API's JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, pos)
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := apiContext()
	defer cancel()
	st, err := c.Stats(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		b, err := json.MarshalIndent(&st, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	return printStats(stdout, &st)
}

func printStats(w io.Writer, st *api.Stats) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "direction\tok packets\tok bytes\tdropped\t")
	for _, d := range []struct {
		name string
		s    *api.DirStats
	}{{"in (decap)", &st.In}, {"out (encap)", &st.Out}} {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t\n", d.name, d.s.Packets, d.s.Bytes, sum(d.s.Drops))
	}
	tw.Flush()

	if len(st.In.Drops)+len(st.Out.Drops) > 0 {
		fmt.Fprintln(w, "\ndrops by reason:")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, d := range []struct {
			name string
			m    map[string]uint64
		}{{"in", st.In.Drops}, {"out", st.Out.Drops}} {
			for _, r := range sortedKeys(d.m) {
				fmt.Fprintf(tw, "  %s\t%s\t%d\n", d.name, r, d.m[r])
			}
		}
		tw.Flush()
	}
	if len(st.XDP) > 0 {
		fmt.Fprintln(w, "\nXDP verdicts:")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, r := range sortedKeys(st.XDP) {
			fmt.Fprintf(tw, "  %s\t%d\n", r, st.XDP[r])
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "\nSAs: %d in, %d out\nbinding changes: %d\n", st.SAs.In, st.SAs.Out, st.BindingChanges)
	if len(st.Workers) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "worker\tSAs\tdecap\tencap\tdrops\tbinding changes\t")
		for _, x := range st.Workers {
			fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%d\t%d\t\n", x.Worker, x.SAs, x.DecapPackets, x.EncapPackets, x.Drops, x.BindingChanges)
		}
		tw.Flush()
	}
	return nil
}

func sum(m map[string]uint64) uint64 {
	var n uint64
	for _, v := range m {
		n += v
	}
	return n
}

func sortedKeys(m map[string]uint64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
