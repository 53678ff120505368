// Command xesp-lab is the lab and benchmark side of xesp: the demo, the
// emulated phone, the traffic generator and the benchmark harness. None of
// it is linked into the daemon (cmd/xesp); operators never need this binary.
package main

import (
	"fmt"
	"os"

	"github.com/xesp/xesp/internal/cli"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

var commands = cli.Set{Prog: "xesp-lab"}

func register(c cli.Command) { commands.Register(c) }

// errUsage marks an error caused by how xesp-lab was called; it exits 2.
var errUsage = cli.ErrUsage

func init() {
	register(cli.Command{Name: "version", Summary: "print the version", Run: func([]string) error {
		fmt.Println("xesp-lab", version)
		return nil
	}})
}

func main() { commands.Main(os.Args[1:]) }
