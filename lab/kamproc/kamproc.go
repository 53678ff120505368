// Package kamproc runs kamailio in a lab namespace: started in the
// foreground, its output collected, up once its UDP socket is bound,
// stopped with SIGTERM (SIGKILL after 5 s). Both labs that need a SIP
// server (lab/topo's registrar, lab/ims's P-CSCF) use it.
//
// It owns the process's life only; the configuration is the caller's. It
// must not be linked into the daemon.
package kamproc

import (
	"bytes"
	"fmt"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/xesp/xesp/lab/netns"
)

// Process is one kamailio.
type Process struct {
	cmd     *exec.Cmd
	log     syncBuffer
	stopped chan struct{}
}

// Start runs kamailio with args in ns (working directory dir when not
// empty) and returns once it listens on UDP port, or fails with what it
// printed if it exits first or is not listening within 15 s.
func Start(ns *netns.NS, dir string, port int, args ...string) (*Process, error) {
	p := &Process{cmd: ns.Command("kamailio", args...), stopped: make(chan struct{})}
	p.cmd.Dir = dir
	p.cmd.Stdout, p.cmd.Stderr = &p.log, &p.log
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start kamailio: %w", err)
	}
	go func() { p.cmd.Wait(); close(p.stopped) }()
	// Up when its UDP socket is bound in the namespace.
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		select {
		case <-p.stopped:
			return nil, fmt.Errorf("kamailio exited at start:\n%s", p.log.String())
		default:
		}
		out, _ := ns.Run("ss", "-Hulnp", "sport", "=", strconv.Itoa(port))
		if bytes.Contains(out, []byte("kamailio")) {
			return p, nil
		}
		if time.Now().After(end) {
			p.Stop()
			return nil, fmt.Errorf("kamailio not listening on UDP %d after 15 s:\n%s", port, p.log.String())
		}
	}
}

// Log is what kamailio printed so far; "" on nil (not started).
func (p *Process) Log() string {
	if p == nil {
		return ""
	}
	return p.log.String()
}

// Stop ends kamailio: SIGTERM, then SIGKILL after 5 s. Safe on nil.
func (p *Process) Stop() {
	if p == nil || p.cmd.Process == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.stopped:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.stopped
	}
}

// syncBuffer collects a child's output while it runs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(b)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
