package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/internal/fdpass"
)

// The hitless upgrade (docs/operations.md "Upgrades and restarts"): a
// running daemon listens on state_dir/upgrade.sock; `xesp run
// --upgrade-from state_dir/upgrade.sock` connects, receives the data path
// (gateway.Handover and its descriptors), starts on it and says whether it
// came up. The old daemon then exits without touching what it handed over.

// upgradeSocket is where a running daemon waits for its successor.
const upgradeSocket = "upgrade.sock"

// upgradeTimeout bounds each wait of the exchange: the successor's start
// with a million SAs takes seconds, not minutes.
const upgradeTimeout = 2 * time.Minute

type upgradeRequest struct {
	PID int `json:"pid"`
	// Shape is the successor's configuration, checked before anything
	// stops: a refused successor leaves the running daemon as it was.
	Shape gateway.Shape `json:"shape"`
}

type upgradeOffer struct {
	Error    string            `json:"error,omitempty"`
	Handover *gateway.Handover `json:"handover,omitempty"`
}

type upgradeReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// pendingUpgrade is an accepted request from a would-be successor.
type pendingUpgrade struct {
	conn  *net.UnixConn
	pid   int
	shape gateway.Shape
}

// listenUpgrades accepts successors on state_dir/upgrade.sock (root
// only: the socket is 0600 in the 0700 state_dir, and the peer's uid is
// checked). The returned close stops listening and removes the socket
// file unless a successor's has replaced it.
func listenUpgrades(stateDir string, check func(gateway.Shape) error, log *slog.Logger) (<-chan pendingUpgrade, func(), error) {
	path := filepath.Join(stateDir, upgradeSocket)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("upgrade socket %s: %w", path, err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade socket: %w", err)
	}
	// Unlinked by hand below, and only while it is still this listener's:
	// a successor may have bound its own at the same path by then.
	ln.SetUnlinkOnClose(false)
	ours, err := os.Stat(path)
	if err == nil {
		err = os.Chmod(path, 0o600)
	}
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("upgrade socket %s: %w", path, err)
	}
	out := make(chan pendingUpgrade)
	done := make(chan struct{})
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			var req upgradeRequest
			pid, err := fdpass.CheckPeer(c)
			if err == nil {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				var msg []byte
				var fds []int
				if msg, fds, err = fdpass.Recv(c); err == nil {
					closeFDs(fds)
					if err = json.Unmarshal(msg, &req); err == nil {
						err = check(req.Shape)
					}
				}
				c.SetReadDeadline(time.Time{})
			}
			if err != nil {
				log.Warn("upgrade request refused, still running", "pid", pid, "err", err)
				sendJSON(c, upgradeOffer{Error: err.Error()}, nil)
				c.Close()
				continue
			}
			select {
			case out <- pendingUpgrade{conn: c, pid: pid, shape: req.Shape}:
			case <-done:
				c.Close()
				return
			}
		}
	}()
	var closed bool
	return out, func() {
		if !closed {
			closed = true
			close(done)
			ln.Close()
			if cur, err := os.Stat(path); err == nil && os.SameFile(ours, cur) {
				os.Remove(path)
			}
		}
	}, nil
}

// handOver gives the data path to the successor on p and waits for it to
// come up. The caller has stopped the API and metrics listeners. On
// success the gateway is finished (nothing left to stop); on failure it
// is stopped with the XDP programs kept attached and pinned.
func handOver(ctx context.Context, g *gateway.Gateway, p pendingUpgrade, log *slog.Logger) error {
	defer p.conn.Close()
	start := time.Now()
	h, fds, err := g.HandOver(ctx, p.shape)
	if err != nil {
		err = fmt.Errorf("%w; the running daemon (pid %d) stopped with the XDP programs pinned: start `xesp run --keep-pinned`", err, os.Getpid())
		sendJSON(p.conn, upgradeOffer{Error: err.Error()}, nil)
		return errors.Join(err, g.AbortHandOver())
	}
	// The gap the RX rings bridge is this part and the successor's
	// start: logged apart, so an operator sees which side a slow
	// hand-over spent it on.
	log.Info("handing over: workers stopped, state exported", "pid", p.pid, "took", time.Since(start).Round(time.Millisecond),
		"sockets", len(h.UMEM.Sockets), "state_in_memfd", h.RxStateFD)
	if err := sendJSON(p.conn, upgradeOffer{Handover: h}, fds); err != nil {
		return errors.Join(fmt.Errorf("upgrade: hand over to pid %d: %w", p.pid, err), g.AbortHandOver())
	}
	p.conn.SetReadDeadline(time.Now().Add(upgradeTimeout))
	// SIGTERM meanwhile ends the wait: the hand-over counts as failed.
	stopWait := context.AfterFunc(ctx, func() { p.conn.SetReadDeadline(time.Now()) })
	defer stopWait()
	var r upgradeReply
	msg, extra, err := fdpass.Recv(p.conn)
	closeFDs(extra)
	if err == nil {
		err = json.Unmarshal(msg, &r)
	}
	if err == nil && !r.OK {
		err = errors.New(r.Error)
	}
	if err != nil {
		return errors.Join(fmt.Errorf("upgrade: the new daemon (pid %d) did not come up: %w; this one stopped with the XDP programs pinned: start `xesp run --keep-pinned` again", p.pid, err), g.AbortHandOver())
	}
	g.FinishHandOver()
	log.Info("handed over to the new daemon", "pid", p.pid, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// requestUpgrade asks the daemon listening on path for its data path.
func requestUpgrade(path string, shape gateway.Shape) (*gateway.Upgrade, *net.UnixConn, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, nil, fmt.Errorf("--upgrade-from %s: no running xesp daemon answers there (it listens on state_dir/%s): %w", path, upgradeSocket, err)
	}
	if _, err := fdpass.CheckPeer(c); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("--upgrade-from %s: %w", path, err)
	}
	if err := sendJSON(c, upgradeRequest{PID: os.Getpid(), Shape: shape}, nil); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("--upgrade-from %s: %w", path, err)
	}
	c.SetReadDeadline(time.Now().Add(upgradeTimeout))
	msg, fds, err := fdpass.Recv(c)
	c.SetReadDeadline(time.Time{})
	var o upgradeOffer
	if err == nil {
		err = json.Unmarshal(msg, &o)
	}
	if err == nil && o.Error != "" {
		err = errors.New(o.Error)
	} else if err == nil && o.Handover == nil {
		err = errors.New("empty hand-over")
	}
	if err != nil {
		closeFDs(fds)
		c.Close()
		return nil, nil, fmt.Errorf("--upgrade-from %s: refused: %w", path, err)
	}
	return &gateway.Upgrade{Handover: *o.Handover, FDs: fds}, c, nil
}

// replyUpgrade tells the old daemon whether this one came up.
func replyUpgrade(c *net.UnixConn, startErr error) {
	r := upgradeReply{OK: startErr == nil}
	if startErr != nil {
		r.Error = startErr.Error()
	}
	sendJSON(c, r, nil)
	c.Close()
}

func sendJSON(c *net.UnixConn, v any, fds []int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return fdpass.Send(c, b, fds)
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}
