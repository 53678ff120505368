// Package cli is the subcommand registry and entry point shared by the
// daemon's binary (cmd/xesp) and the lab's (cmd/xesp-lab), so both answer
// usage errors, help and unknown commands the same way.
//
// It owns argument dispatch and exit codes; it must not hold any command.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
)

// Command is one subcommand; Run gets the arguments after its name.
type Command struct {
	Name    string
	Summary string
	Run     func(args []string) error
}

// ErrUsage marks an error caused by how the program was called; it exits 2.
var ErrUsage = errors.New("usage")

// Set is a program's subcommands.
type Set struct {
	Prog     string
	commands map[string]Command
}

// Register adds c; registering a name twice is a programming error.
func (s *Set) Register(c Command) {
	if s.commands == nil {
		s.commands = map[string]Command{}
	}
	if _, dup := s.commands[c.Name]; dup {
		panic(s.Prog + ": command registered twice: " + c.Name)
	}
	s.commands[c.Name] = c
}

// Names lists the registered commands, sorted.
func (s *Set) Names() []string {
	names := make([]string, 0, len(s.commands))
	for n := range s.commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (s *Set) usage() {
	fmt.Fprintf(os.Stderr, "usage: %s <command> [flags]\n\ncommands:\n", s.Prog)
	for _, n := range s.Names() {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, s.commands[n].Summary)
	}
	fmt.Fprintf(os.Stderr, "\nrun '%s <command> -h' for a command's flags\n", s.Prog)
}

// Main runs the command named by args[0] and exits: 0 on success or -h,
// 2 on a usage error, 1 on any other error (printed as one line).
func (s *Set) Main(args []string) {
	if len(args) < 1 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		s.usage()
		os.Exit(2)
	}
	c, ok := s.commands[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "%s: unknown command %q\n\n", s.Prog, args[0])
		s.usage()
		os.Exit(2)
	}
	if err := c.Run(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "%s %s: %v\n", s.Prog, c.Name, err)
		if errors.Is(err, ErrUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}
