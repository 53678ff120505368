// Command xesp is the IPsec ESP fast path for the VoIP/IMS edge: the daemon,
// its control client, and the tools around it (decrypt, pktgen, bench).
//
// Each subcommand lives in its own file and registers itself in init, so
// adding one never touches this file.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	name    string
	summary string
	run     func(args []string) error
}

var commands = map[string]command{}

func register(c command) {
	if _, dup := commands[c.name]; dup {
		panic("xesp: command registered twice: " + c.name)
	}
	commands[c.name] = c
}

// errUsage marks an error caused by how xesp was called; it exits 2.
var errUsage = errors.New("usage")

func init() {
	register(command{name: "version", summary: "print the version", run: func([]string) error {
		fmt.Println("xesp", version)
		return nil
	}})
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: xesp <command> [flags]\n\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(os.Stderr, "\nrun 'xesp <command> -h' for a command's flags")
}

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		os.Exit(2)
	}
	c, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "xesp: unknown command %q\n\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	if err := c.run(os.Args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "xesp %s: %v\n", c.name, err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}
