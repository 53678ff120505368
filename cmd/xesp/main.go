// Command xesp is the IPsec ESP fast path for the VoIP/IMS edge: the daemon
// (`xesp run`), its control client and the operator's tools (attach,
// counters, decrypt). Lab and benchmark tooling (demo, phone emulator,
// pktgen, bench) is cmd/xesp-lab, which this binary never links
// (deps_test.go holds it to that).
//
// Each subcommand lives in its own file and registers itself in init, so
// adding one never touches this file.
package main

import (
	"fmt"
	"os"

	"github.com/xesp/xesp/internal/cli"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

var commands = cli.Set{Prog: "xesp"}

func register(c cli.Command) { commands.Register(c) }

// errUsage marks an error caused by how xesp was called; it exits 2.
var errUsage = cli.ErrUsage

func init() {
	register(cli.Command{Name: "version", Summary: "print the version", Run: func([]string) error {
		fmt.Println("xesp", version)
		return nil
	}})
}

func main() { commands.Main(os.Args[1:]) }
