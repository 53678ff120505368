package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "events", Summary: "print SA lifetime events (soft: rekey due; hard: SA removed) from the control API", Run: func(args []string) error {
		return runEvents(args, os.Stdout, os.Stderr)
	}})
	register(cli.Command{Name: "rekey", Summary: "replace SAs make-before-break: xesp rekey --old REF,REF [--grace 5s] FILE", Run: func(args []string) error {
		return runRekey(args, os.Stdout, os.Stderr)
	}})
}

func runEvents(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("events", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af apiFlags
	af.register(fs)
	asJSON := fs.Bool("json", false, "print one JSON object per event")
	since := fs.Uint64("since", 0, "only events numbered above this")
	wait := fs.Duration("wait", 0, "wait up to this long for the first event when there is none yet")
	follow := fs.Bool("follow", false, "keep printing events as they happen")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, pos)
	}
	if *wait < 0 || *wait > api.MaxEventWait {
		return fmt.Errorf("%w: --wait: want 0s to %s", errUsage, api.MaxEventWait)
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := apiContext()
	defer cancel()
	next := *since
	for first := true; ; first = false {
		w := *wait
		if *follow && !first {
			w = api.MaxEventWait
		}
		evs, err := c.Events(ctx, next, w)
		if err != nil {
			return err
		}
		// An empty answer says so (on stderr: stdout stays one line per
		// event for scripts), or the operator cannot tell "no events"
		// from a command that hangs or failed silently.
		if first && len(evs.Items) == 0 {
			switch {
			case *follow:
				fmt.Fprintf(stderr, "no lifetime events yet (after %d); waiting for more (Ctrl-C to stop)\n", next)
			default:
				fmt.Fprintf(stderr, "no lifetime events (after %d)\n", next)
			}
		}
		for _, e := range evs.Items {
			if *asJSON {
				b, _ := json.Marshal(e)
				fmt.Fprintf(stdout, "%s\n", b)
			} else {
				fmt.Fprintf(stdout, "%d %s %s %s %s %s reached: %d of %d\n", e.Num, e.Time.Format(time.RFC3339), e.Kind,
					e.SA, e.Name, e.Limit, e.Value, e.Threshold)
			}
		}
		next = evs.Next
		if !*follow {
			return nil
		}
	}
}

func runRekey(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rekey", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af apiFlags
	af.register(fs)
	old := fs.String("old", "", "comma-separated references of the SAs to replace (e.g. ue1-in,ue1-out)")
	grace := fs.Duration("grace", 5*time.Second, "how long the old inbound SAs keep accepting packets")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *old == "" {
		return fmt.Errorf("%w: want --old REF[,REF...] and one SA file", errUsage)
	}
	if *grace < 0 || *grace > api.MaxGrace {
		return fmt.Errorf("%w: --grace: want 0s to %s", errUsage, api.MaxGrace)
	}
	sas, err := sa.ParseFile(pos[0], sa.Options{})
	if err != nil {
		return err
	}
	if len(sas) == 0 {
		return errors.New(pos[0] + ": no SA in the file")
	}
	specs := make([]sa.Spec, len(sas))
	for i := range sas {
		specs[i] = sas[i].WithKeys()
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := apiContext()
	defer cancel()
	res, err := c.Rekey(ctx, strings.Split(*old, ","), specs, *grace)
	if err != nil {
		return err
	}
	for _, v := range res.New {
		fmt.Fprintf(stdout, "added %s (worker %d, index %d)\n", v.Ref, v.Worker, v.Index)
	}
	fmt.Fprintf(stdout, "retired %s; draining %s for %s\n", strings.Join(res.Retired, " "), strings.Join(res.Draining, " "), res.Grace)
	return nil
}
