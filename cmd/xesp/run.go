package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"github.com/xesp/xesp/control/api"
	"github.com/xesp/xesp/control/config"
	"github.com/xesp/xesp/control/metrics"
	"github.com/xesp/xesp/gateway"
	"github.com/xesp/xesp/internal/cli"
)

func init() {
	register(cli.Command{Name: "run", Summary: "run the gateway (XDP + AF_XDP data path, API, metrics)", Run: runDaemon})
}

func runDaemon(args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	path := fs.String("config", "/etc/xesp/xesp.yaml", "configuration file")
	keep := fs.Bool("keep-pinned", false, "on exit leave the XDP programs attached and maps pinned for the next daemon to adopt")
	printCfg := fs.Bool("print-config", false, "print the effective configuration (keys redacted) and exit")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	upgradeFrom := fs.String("upgrade-from", "", "take the data path over from the daemon listening on this socket (its state_dir/upgrade.sock) without losing packets")
	if err := fs.Parse(args); err != nil {
		return errors.Join(errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("%w: --log-level: %v", errUsage, err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))

	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	if *printCfg {
		out, err := cfg.Effective()
		if err != nil {
			return err
		}
		fmt.Print(string(out))
		return nil
	}

	for _, w := range cfg.Warnings {
		log.Warn("config: " + w)
	}
	// Checked before the data path comes up: a socket that cannot be
	// created would otherwise be found only after XDP attached.
	if cfg.API.Unix != "" {
		if dir := filepath.Dir(cfg.API.Unix); !isDir(dir) {
			return fmt.Errorf("api.unix: %s: directory %s does not exist; create it or change api.unix", cfg.API.Unix, dir)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var up *gateway.Upgrade
	var upConn *net.UnixConn
	var prepared *gateway.Prepared
	if *upgradeFrom != "" {
		shape, err := gateway.SuccessorShape(cfg)
		if err != nil {
			return err
		}
		// Everything that needs nothing of the running daemon is built
		// while it still serves: not in the hand-over's gap.
		if prepared, err = gateway.Prepare(cfg); err != nil {
			return err
		}
		if up, upConn, err = requestUpgrade(*upgradeFrom, shape); err != nil {
			return err
		}
		// The old daemon waits for an answer before it lets go of the
		// data path; it gets one however this start ends.
		defer func() {
			if upConn != nil {
				replyUpgrade(upConn, errors.New("the new daemon stopped before its listeners were up"))
			}
		}()
	}
	g, err := gateway.Start(ctx, cfg, gateway.Options{Log: log, Upgrade: up, Prepared: prepared})
	if err != nil {
		if upConn != nil {
			replyUpgrade(upConn, err)
			upConn = nil
		}
		return err
	}
	// Listeners stop before the gateway does: nothing may read a socket
	// or map being closed.
	svcCtx, stopSvc := context.WithCancel(context.Background())
	svcDone := make(chan error, 2)
	var apiSrv atomic.Pointer[api.Server]
	services := 0
	if addr := cfg.Metrics.Listen; addr != "" {
		src, err := g.MetricsSources(version)
		if err != nil {
			g.Stop(*keep)
			stopSvc()
			return err
		}
		// The API starts after the metrics; its connection figures are
		// read through apiSrv once it exists.
		src.APIConns = func() (int64, uint64) {
			if srv := apiSrv.Load(); srv != nil {
				st := srv.ConnStats()
				return st.Open, st.Refused
			}
			return 0, 0
		}
		services++
		go func() { svcDone <- metrics.Serve(svcCtx, addr, metrics.Handler(metrics.New(src))) }()
		log.Info("metrics", "listen", "http://"+addr+"/metrics")
	}

	if cfg.API.Unix != "" || cfg.API.TCP != "" {
		srv, err := startAPI(g, cfg, log)
		if err != nil {
			stopSvc()
			for ; services > 0; services-- {
				<-svcDone
			}
			g.Stop(*keep)
			return err
		}
		apiSrv.Store(srv)
		services++
		go func() { svcDone <- srv.Serve(svcCtx) }()
		log.Info("control API", "unix", cfg.API.Unix, "tcp", cfg.API.TCP, "tls", cfg.API.TLS != nil,
			"mtls", cfg.API.TLS != nil && cfg.API.TLS.ClientCA != "", "read_token", len(cfg.API.ReadBearerToken) > 0)
		if cfg.API.TLS != nil {
			// SIGHUP re-reads the API's certificate, key and client CA
			// (they are also picked up when the files change).
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			go func() {
				for {
					select {
					case <-svcCtx.Done():
						return
					case <-hup:
						srv.ReloadTLS() // logs its outcome
					}
				}
			}()
		}
	}

	// Without the socket the daemon still runs; only hitless upgrades
	// are off (a stop and start still works).
	upgrades, stopUpgrades, err := listenUpgrades(cfg.StateDir, g.CheckSuccessor, log)
	if err != nil {
		log.Warn("hitless upgrades unavailable", "err", err)
		stopUpgrades = func() {}
	}
	defer stopUpgrades()
	if up != nil {
		// Up: tell the old daemon now, not when this one exits.
		replyUpgrade(upConn, nil)
		upConn = nil
	}

	var runErr error
	var successor *pendingUpgrade
	select {
	case p := <-upgrades:
		log.Info("upgrade: handing the data path over", "to_pid", p.pid)
		successor = &p
	case <-ctx.Done():
		log.Info("shutting down", "keep_pinned", *keep)
	case runErr = <-g.Errors():
		log.Error("component failed, shutting down", "err", runErr)
	case runErr = <-svcDone:
		services--
		log.Error("listener failed, shutting down", "err", runErr)
	}
	stopUpgrades()
	stopSvc()
	for ; services > 0; services-- {
		if err := <-svcDone; err != nil {
			runErr = errors.Join(runErr, err)
		}
	}
	if successor != nil {
		return handOver(ctx, g, *successor, log)
	}
	if err := g.Stop(*keep); err != nil {
		return errors.Join(runErr, fmt.Errorf("shutdown: %w", err))
	}
	return runErr
}

func startAPI(g *gateway.Gateway, cfg *config.Config, log *slog.Logger) (*api.Server, error) {
	dp, err := g.DataPath()
	if err != nil {
		return nil, err
	}
	srv, err := api.New(api.Options{SAD: g.SAD, DataPath: dp, Events: g.Lifetime, API: cfg.API, Log: log, NATTPort: cfg.NATTPort, CorePool: cfg.CorePrefix, Check: cfg.CheckSA})
	if err != nil {
		return nil, err
	}
	if err := srv.Listen(); err != nil {
		return nil, err
	}
	return srv, nil
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
