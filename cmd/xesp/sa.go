package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "sa", Summary: "add, delete, list and show SAs through the control API", Run: func(args []string) error {
		return runSA(args, os.Stdout, os.Stderr)
	}})
}

const saHelp = `usage:
  xesp sa add FILE...           add the SAs of SA files (YAML, JSON or JSON lines by extension)
  xesp sa import [--batch N] [--parallel P] FILE...
                                add the SAs of SA files in batches of N (default %[2]d) through
                                POST /v1/sas/batch, P at a time (default 4): each batch all or
                                none; a refused batch stops the import, and it says which SAs
                                of the files went in
  xesp sa del REF...            delete SAs (also: xesp sa delete)
  xesp sa list [--json]         list every SA with its binding and counters
  xesp sa show REF [--json]     show one SA

REF is an SA name, in:SPI, out:SPI or out:SPI@peer[:port]
(e.g. ue1-in, in:0x00001001, out:0xc0000001@192.0.2.10:4500, out:0x1@[2001:db8::1]:4500).

API flags (every subcommand):
  --api ADDR         unix:/path or https://host:port (default $XESP_API, else unix:%[1]s)
  --token TOKEN      bearer token for TCP (default $XESP_TOKEN)
  --token-file FILE  file holding the bearer token (default $XESP_TOKEN_FILE)
  --ca FILE          CA certificate(s) verifying the API's server certificate (default $XESP_CA)
  --cert FILE        client certificate for an mTLS API (default $XESP_CERT)
  --key FILE         its key, mode 0600 (default $XESP_KEY)
`

// apiFlags choose the API endpoint; every command that talks to the
// daemon shares them.
type apiFlags struct {
	addr, token, tokenFile string
	ca, cert, key          string
}

func (f *apiFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.addr, "api", "", "control API address: unix:/path or https://host:port (default $XESP_API, else unix:"+config.Defaults().API.Unix+")")
	fs.StringVar(&f.token, "token", "", "bearer token for an http:// API (default $XESP_TOKEN)")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the bearer token (default $XESP_TOKEN_FILE)")
	fs.StringVar(&f.ca, "ca", "", "CA certificate file verifying an https API (default $XESP_CA, else the system roots)")
	fs.StringVar(&f.cert, "cert", "", "client certificate for an mTLS API (default $XESP_CERT)")
	fs.StringVar(&f.key, "key", "", "client certificate's key (default $XESP_KEY)")
}

// orEnv is v, or the environment variable when v is empty.
func orEnv(v, env string) string {
	if v == "" {
		return os.Getenv(env)
	}
	return v
}

// client resolves flags, then environment, then the default socket.
func (f *apiFlags) client() (*api.Client, error) {
	addr := f.addr
	if addr == "" {
		addr = os.Getenv("XESP_API")
	}
	if addr == "" {
		addr = "unix:" + config.Defaults().API.Unix
	}
	token := f.token
	if f.tokenFile != "" && token != "" {
		return nil, fmt.Errorf("%w: give --token or --token-file, not both", errUsage)
	}
	if tf := orEnv(f.tokenFile, "XESP_TOKEN_FILE"); tf != "" && token == "" {
		if err := config.PrivateFile(tf); err != nil {
			return nil, fmt.Errorf("token file: %w", err)
		}
		b, err := os.ReadFile(tf)
		if err != nil {
			return nil, fmt.Errorf("token file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token == "" {
		token = os.Getenv("XESP_TOKEN")
	}
	var o api.ClientOptions
	o.Token = token
	ca, cert, key := orEnv(f.ca, "XESP_CA"), orEnv(f.cert, "XESP_CERT"), orEnv(f.key, "XESP_KEY")
	if strings.HasPrefix(addr, "https://") {
		cfg, err := api.ClientTLS(ca, cert, key)
		if err != nil {
			return nil, fmt.Errorf("%w: tls: %v", errUsage, err)
		}
		o.TLS = cfg
	} else if f.ca != "" || f.cert != "" || f.key != "" {
		return nil, fmt.Errorf("%w: --ca, --cert and --key need an https:// --api", errUsage)
	}
	c, err := api.NewClientWith(addr, o)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return c, nil
}

// parseInterleaved parses flags wherever they appear among the
// positional arguments (`xesp sa del REF --api X` as well as
// `xesp sa del --api X REF`); everything after "--" is positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if used := len(args) - len(rest); used > 0 && args[used-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

func runSA(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stderr, saHelp, config.Defaults().API.Unix, api.MaxBatch)
		if len(args) == 0 {
			return fmt.Errorf("%w: missing subcommand", errUsage)
		}
		return flag.ErrHelp
	}
	sub, args := args[0], args[1:]
	if sub == "delete" {
		sub = "del" // as secagree delete: both spellings work
	}
	fs := flag.NewFlagSet("sa "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var af apiFlags
	af.register(fs)
	asJSON := false
	if sub == "list" || sub == "show" {
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	}
	batch, parallel := api.MaxBatch, 4
	if sub == "import" {
		fs.IntVar(&batch, "batch", api.MaxBatch, "SAs per request, 1..10000")
		fs.IntVar(&parallel, "parallel", 4, "requests in flight, 1..16")
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	var want func(n int) bool
	switch sub {
	case "add", "del", "import":
		want = func(n int) bool { return n >= 1 }
	case "list":
		want = func(n int) bool { return n == 0 }
	case "show":
		want = func(n int) bool { return n == 1 }
	default:
		return fmt.Errorf("%w: unknown subcommand %q: use add, import, del, list or show", errUsage, sub)
	}
	if !want(len(pos)) {
		return fmt.Errorf("%w: wrong arguments for sa %s (run xesp sa -h)", errUsage, sub)
	}
	if sub == "import" && (batch < 1 || batch > api.MaxBatch) {
		return fmt.Errorf("%w: --batch %d: want 1..%d", errUsage, batch, api.MaxBatch)
	}
	if sub == "import" && (parallel < 1 || parallel > 16) {
		return fmt.Errorf("%w: --parallel %d: want 1..16", errUsage, parallel)
	}
	if sub == "add" || sub == "import" {
		// Files are read and validated before anything is sent, so a typo
		// in the second file does not leave the first half-applied.
		var all []sa.SA
		var errs []error
		for _, path := range pos {
			sas, err := sa.ParseFile(path, sa.Options{})
			errs = append(errs, err)
			all = append(all, sas...)
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		if len(all) == 0 {
			return fmt.Errorf("%s: no SA in the file", strings.Join(pos, ", "))
		}
		pos = nil
		c, err := af.client()
		if err != nil {
			return err
		}
		defer c.Close()
		if sub == "import" {
			return saImport(c, all, batch, parallel, stdout)
		}
		return saAdd(c, all, stdout, stderr)
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	defer c.Close()
	switch sub {
	case "del":
		return saDel(c, pos, stdout, stderr)
	case "list":
		return saList(c, asJSON, stdout)
	default:
		return saShow(c, pos[0], asJSON, stdout)
	}
}

func apiContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Minute)
}

// each runs op on every item, printing the failures and returning the
// one failure itself (so main prints the server's message) or a count.
func each[T any](items []T, verb string, stderr io.Writer, op func(T) error) error {
	var failed []error
	for _, it := range items {
		if err := op(it); err != nil {
			failed = append(failed, err)
		}
	}
	switch {
	case len(failed) == 0:
		return nil
	case len(items) == 1:
		return failed[0]
	}
	for _, err := range failed {
		fmt.Fprintln(stderr, err)
	}
	return fmt.Errorf("%d of %d SAs not %s", len(failed), len(items), verb)
}

func saAdd(c *api.Client, sas []sa.SA, stdout, stderr io.Writer) error {
	ctx, cancel := apiContext()
	defer cancel()
	return each(sas, "added", stderr, func(s sa.SA) error {
		v, err := c.Add(ctx, s.WithKeys())
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "added %s %s (worker %d, index %d)\n", s.Label(), v.Ref, v.Worker, v.Index)
		return nil
	})
}

// saImport sends sas in batches, parallel at a time: while one batch
// waits for the data path to install it, the next is parsed. Each batch
// is all or none; after a refusal no further batch is sent, and the
// message says how many SAs went in.
func saImport(c *api.Client, sas []sa.SA, batch, parallel int, stdout io.Writer) error {
	ctx, cancel := apiContext()
	defer cancel()
	start := time.Now()
	n := (len(sas) + batch - 1) / batch
	errs := make([]error, n)
	done := make([]bool, n)
	next := make(chan int)
	var wg sync.WaitGroup
	var failed atomic.Bool
	for range min(parallel, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			specs := make([]sa.Spec, 0, batch)
			for b := range next {
				if failed.Load() {
					continue // taken before a refusal was known
				}
				lo, hi := b*batch, min((b+1)*batch, len(sas))
				specs = specs[:0]
				for i := lo; i < hi; i++ {
					specs = append(specs, sas[i].WithKeys())
				}
				if _, err := c.AddBatch(ctx, specs); err != nil {
					errs[b] = err
					failed.Store(true)
				} else {
					done[b] = true
				}
			}
		}()
	}
	for b := 0; b < n && !failed.Load(); b++ {
		next <- b
	}
	close(next)
	wg.Wait()
	var refused []error
	added := 0
	for b := range n {
		lo, hi := b*batch, min((b+1)*batch, len(sas))
		switch {
		case done[b]:
			added += hi - lo
		case errs[b] != nil:
			// The server names items by their index in the batch.
			refused = append(refused, fmt.Errorf("batch of SAs %d..%d (item [i] is SA %d+i of the files) refused, nothing of it added: %w", lo, hi-1, lo, errs[b]))
		}
	}
	if len(refused) > 0 {
		return fmt.Errorf("%w\nimport stopped: %d of %d SAs added", errors.Join(refused...), added, len(sas))
	}
	el := time.Since(start)
	fmt.Fprintf(stdout, "imported %d SAs in %d batches in %v (%.0f SAs/s)\n", len(sas), n, el.Round(time.Millisecond), float64(len(sas))/el.Seconds())
	return nil
}

func saDel(c *api.Client, refs []string, stdout, stderr io.Writer) error {
	ctx, cancel := apiContext()
	defer cancel()
	return each(refs, "deleted", stderr, func(ref string) error {
		v, err := c.Delete(ctx, ref)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "deleted %s %s\n", viewLabel(&v), v.Ref)
		return nil
	})
}

func viewLabel(v *api.SAView) string {
	if v.Name != "" {
		return strconv.Quote(v.Name)
	}
	return v.SPI.String()
}

func saList(c *api.Client, asJSON bool, stdout io.Writer) error {
	ctx, cancel := apiContext()
	defer cancel()
	if asJSON {
		// Streamed item by item: a million SAs must not be held at once.
		n := 0
		err := c.Each(ctx, func(v *api.SAView) error {
			b, err := json.Marshal(v)
			if err != nil {
				return err
			}
			sep := ",\n"
			if n == 0 {
				sep = "[\n"
			}
			n++
			_, err = fmt.Fprintf(stdout, "%s%s", sep, b)
			return err
		})
		if err != nil {
			return err
		}
		if n == 0 {
			_, err = fmt.Fprintln(stdout, "[]")
		} else {
			_, err = fmt.Fprintln(stdout, "\n]")
		}
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSPI\tDIR\tPROPOSAL\tMODE\tBINDING\tCORE\tWORKER\tPACKETS\tBYTES\tDROPS\tLAST SEEN")
	now := time.Now()
	err := c.Each(ctx, func(v *api.SAView) error {
		name := v.Name
		if name == "" {
			name = "-"
		}
		pk, by, dr, seen := "-", "-", "-", "-"
		if k := v.Counters; k != nil {
			pk, by, dr = strconv.FormatUint(k.Packets, 10), strconv.FormatUint(k.Bytes, 10), strconv.FormatUint(k.Drops, 10)
			seen = lastSeen(k, now)
		}
		core := "-"
		if v.Inner != nil && v.Inner.Core != "" {
			core = v.Inner.Core
		}
		_, err := fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n",
			name, v.SPI, v.Direction, v.Proposal, v.Mode, v.Binding, core, v.Worker, pk, by, dr, seen)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Flush()
}

func saShow(c *api.Client, ref string, asJSON bool, stdout io.Writer) error {
	ctx, cancel := apiContext()
	defer cancel()
	v, err := c.Get(ctx, ref)
	if err != nil {
		return err
	}
	if asJSON {
		b, err := json.MarshalIndent(&v, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 1, ' ', 0)
	line := func(k, f string, a ...any) { fmt.Fprintf(tw, "%s:\t"+f+"\n", append([]any{k}, a...)...) }
	if v.Name != "" {
		line("name", "%s", v.Name)
	}
	line("ref", "%s", v.Ref)
	line("spi", "%s", v.SPI)
	line("direction", "%s", v.Direction)
	line("mode", "%s", v.Mode)
	line("proposal", "%s", v.Proposal)
	if v.Pair != "" {
		line("pair", "%s", v.Pair)
	}
	line("esn", "%t", v.ESN)
	if v.ReplayWindow != nil {
		line("replay window", "%d", *v.ReplayWindow)
	}
	line("local", "%s", v.Local)
	line("peer", "%s", v.Peer)
	if v.Encap != nil && v.Encap.LocalPort != nil && v.Encap.PeerPort != nil {
		line("encap", "udp %d -> %d", *v.Encap.LocalPort, *v.Encap.PeerPort)
	} else {
		line("encap", "none (plain ESP)")
	}
	line("binding", "%s", v.Binding)
	if v.Inner != nil {
		if v.Inner.Peer == "" {
			// Transport mode: one core-side host, no phone selector.
			line("inner", "%s (transport: the phone's segments are delivered there)", v.Inner.Local)
		} else {
			line("inner", "%s <-> %s", v.Inner.Local, v.Inner.Peer)
		}
		if v.Inner.Core != "" {
			line("core address", "%s", v.Inner.Core)
		}
	}
	if l := v.Lifetime; l != nil {
		line("lifetime", "soft %d B / %d pkts / %d s, hard %d B / %d pkts / %d s",
			l.SoftBytes, l.SoftPackets, l.SoftSeconds, l.HardBytes, l.HardPackets, l.HardSeconds)
	}
	line("worker", "%d (index %d)", v.Worker, v.Index)
	line("state", "%s", v.State)
	line("created", "%s", v.Created.Format(time.RFC3339))
	if k := v.Counters; k != nil {
		line("counters", "%d packets, %d bytes, %d drops, seq %d", k.Packets, k.Bytes, k.Drops, k.Seq)
		if v.Direction == "in" {
			line("last seen", "%s", lastSeen(k, time.Now()))
		}
	} else {
		line("counters", "not in the data path yet")
	}
	return tw.Flush()
}

// lastSeen says when the phone behind an inbound SA was last seen: its
// last authenticated packet and, if later, its last NAT-keepalive, as an
// age ("12s ago (keepalive)"); "-" when neither came yet.
func lastSeen(k *api.SACounters, now time.Time) string {
	var at time.Time
	how := ""
	if k.LastSeen != nil {
		at = *k.LastSeen
	}
	if k.LastKeepalive != nil && k.LastKeepalive.After(at) {
		at, how = *k.LastKeepalive, " (keepalive)"
	}
	if at.IsZero() {
		return "-"
	}
	return max(now.Sub(at), 0).Truncate(time.Second).String() + " ago" + how
}
