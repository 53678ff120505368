# xesp build. Everything BPF needs root: run the test and demo targets with sudo.
GO        ?= go
PKGS      ?= ./...
# Debian packages the build, the tests and the demo use. `make deps` installs
# whichever are missing, so a fresh Debian machine needs only Go and make.
# pcscf.cfg loads http_client.so (kamailio-utils-modules) and jansson.so,
# which Debian ships in kamailio-extra-modules, not kamailio-json-modules.
# curl: the TLS API tests (cmd/xesp, lab/ims) call the API with it.
APT_PKGS  := clang llvm libbpf-dev linux-libc-dev bpftool iproute2 ethtool nftables tcpdump \
             procps iputils-ping conntrack kamailio kamailio-utils-modules kamailio-extra-modules sipsak tshark etcd-server etcd-client \
             curl
# Fuzz targets run for this long each in `make fuzz` (CI keeps it short).
FUZZTIME  ?= 20s
# Each new interesting input is minimized for at most this many runs. Go's
# default (60s of it) is quadratic in the input's length, and inputs grown
# from a 1 KB seed (a journal of SAs) spent the whole FUZZTIME minimizing:
# FuzzDecodeJournal ran 7 executions in 21 s. Capped, it runs ~20k/s.
FUZZMINIMIZE ?= 500x

.PHONY: all build generate check-generate deps demo demo-ims test test-short lint fuzz bench bench-full bench-go bench-check bench-micro bench-calibrate bench-gate-proof clean

all: build

# bin/xesp is the daemon and the operator's CLI; bin/xesp-lab the demo,
# emulated phone, pktgen and benchmark harness, which the daemon never links.
build:
	$(GO) build -o bin/xesp ./cmd/xesp
	$(GO) build -o bin/xesp-lab ./cmd/xesp-lab

# bpf2go: C programs in bpf/ -> bpf/*_bpfel.{go,o}. The output is committed
# so `go build` works without clang.
generate:
	$(GO) generate ./bpf/... ./lab/xdptest/...

# Fails when the committed bpf2go output differs from what the sources give.
check-generate: generate
	@git diff --exit-code --stat -- bpf/ lab/xdptest/ || { echo "bpf2go output is stale: run 'make generate' and commit it"; exit 1; }

deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		case " $$missing " in *" kamailio "*) \
			echo "disabling the kamailio system service the package enabled (the demo and tests run their own in a namespace)"; \
			systemctl disable --now kamailio >/dev/null 2>&1 || true;; \
		esac; \
		case " $$missing " in *" etcd-server "*) \
			echo "disabling the etcd system service the package enabled (the tests run their own)"; \
			systemctl disable --now etcd >/dev/null 2>&1 || true;; \
		esac; \
	fi

# The main job on the built-in topology: 3 nftables NAPTs × 3 phones, every
# LAN 192.168.1.0/24 so phones share inner addresses and SIP port (xesp's
# phone on a TUN, sipsak as SIP client), the gateway (XDP + AF_XDP) with a
# core address per phone, and kamailio as edge registrar reaching every
# phone, in namespaces it removes on exit (docs/lab.md). Needs root.
# DEMO_ARGS: -napts N -phones N -core pool|explicit|none -hold D -metrics A.
demo: deps build
	./bin/xesp-lab demo $(DEMO_ARGS)

# The IMS path: Kamailio as the P-CSCF (examples/kamailio/pcscf.cfg) drives
# xesp's sec-agree API for phones behind NAPTs; prints per phone the
# negotiated algorithms, mode, SPIs and registration state, and tshark's
# decryption of one phone's flow. DEMO_ARGS e.g. "-napts 4 -phones 5".
demo-ims: deps build
	./bin/xesp-lab demo -ims -capture $${TMPDIR:-/tmp}/xesp-ims-demo.pcap $(DEMO_ARGS)

# The test command (README, CI): unit tests, BPF_PROG_TEST_RUN fixtures,
# namespace end-to-end tests and short fuzzing. Needs root.
test: deps
	$(GO) test -count=1 -timeout 30m $(PKGS)
	$(MAKE) fuzz

test-short:
	$(GO) test -short -count=1 $(PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); [ -z "$$out" ] || { echo "gofmt:"; echo "$$out"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)

# Each fuzz target for FUZZTIME. Listed by scanning for Fuzz functions so a
# new target is picked up without editing this file.
#
# Go 1.26's fuzz coordinator can end a clean run with a bare "context
# deadline exceeded" at the -fuzztime boundary (golang/go#75804, fixed in
# Go 1.27): a shutdown race, no input found. A run counts as failed when it
# wrote a failing input or printed anything else before FAIL; the bare
# deadline race is reported and the next target runs.
fuzz:
	@set -e; for f in $$(grep -rl --include='*_test.go' '^func Fuzz' .); do \
		dir=$$(dirname $$f); \
		for t in $$(grep -o '^func Fuzz[A-Za-z0-9_]*' $$f | cut -d' ' -f2); do \
			echo "fuzz $$dir $$t ($(FUZZTIME))"; \
			log=$$(mktemp); \
			if $(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=$(FUZZTIME) -fuzzminimizetime=$(FUZZMINIMIZE) $$dir >$$log 2>&1; then \
				tail -n 3 $$log; rm -f $$log; continue; \
			fi; \
			cat $$log; \
			if grep -q '^    context deadline exceeded$$' $$log && \
			   ! grep -qE 'Failing input written|panic:|^    [a-z_]+\.go:[0-9]+:' $$log; then \
				echo "fuzz $$dir $$t: Go fuzz coordinator deadline race (golang/go#75804), no failing input: not a finding"; \
				rm -f $$log; continue; \
			fi; \
			rm -f $$log; exit 1; \
		done; \
	done

# The benchmark harness (root): ceilings, xesp decap/encap/both over sizes,
# SA and worker counts, and the UDP-socket baseline, in one run; writes
# bench/results/results.{json,md,svg}. BENCH_ARGS selects scenarios (see
# `xesp-lab bench -h`), e.g. BENCH_ARGS="-sizes 200 -sas 1,1000000".
bench: build
	./bin/xesp-lab bench $(BENCH_ARGS)

# Issue 13's targets in one run (docs/benchmarking.md, Targets): the
# ceilings, the socket baseline and xesp at 1 to 1M SA pairs, 200 B and
# IMIX, decap and encap, each with an MLRsearch NDR/PDR search interleaved
# with the reflect ceiling's, latency at 50%/90% of NDR, and 2 workers vs
# 1 at up to 1000 SAs (CPU per packet). Memory: at 1M pairs the bench
# process held 20 GB RSS (gateway heap ~7 KB per SA pair-half plus the
# generator's and the socket baseline's SAs): run it only with ~22 GB
# available and nothing else large on the machine. About 60–75 min on the
# 2-vCPU VM. BENCH_FULL_ARGS narrows it, e.g.
# BENCH_FULL_ARGS="-ndr -sizes 200 -sas 1,1000,200000".
BENCH_FULL_ARGS ?= -ndr -sizes 200,imix -sas 1,1000,100000,1000000 -workers 1,2 -dirs decap,encap
bench-full: build
	./bin/xesp-lab bench $(BENCH_FULL_ARGS) -out bench/results

# Every go test benchmark in the tree.
bench-go:
	$(GO) test -run='^$$' -bench=. -benchmem $(PKGS)

# CI's regression gate (root, ~2 min): xesp's CPU time per packet against
# the AF_XDP reflect ceiling's and the UDP-socket baseline's, measured in
# interleaved pairs (docs/benchmarking.md), compared with
# bench/baseline.json (fails on a drop beyond the tolerance measured from
# run-to-run noise), then the micro-benchmarks against
# bench/micro-baseline.txt with benchstat (reported, not gated).
BENCH_BASELINE ?= bench/baseline.json
MICRO_ESP      := ^Benchmark(Bare)?(Open|Seal)$$/^aes128gcm16$$/^(200|1400)$$
MICRO_BPF      := ^BenchmarkPublic$$/^(esp-udp-1sa|plain-esp-1sa|keepalive-drop)$$
MICRO_FLAGS    := -run='^$$' -count=6 -benchtime=200ms
bench-check: build
	./bin/xesp-lab bench -check $(BENCH_BASELINE) -out $${TMPDIR:-/tmp}/xesp-bench-check
	$(MAKE) bench-micro

bench-micro:
	@out=$${TMPDIR:-/tmp}/xesp-micro.txt; \
	$(GO) test $(MICRO_FLAGS) -bench='$(MICRO_ESP)' ./dataplane/esp > $$out && \
	$(GO) test $(MICRO_FLAGS) -bench='$(MICRO_BPF)' ./bpf >> $$out && \
	$(GO) tool benchstat bench/micro-baseline.txt $$out

# The gate's proof (docs/benchmarking.md): twice over, bench-check must
# pass on this tree and fail with the test-only knob that makes every
# worker packet cost 30% more CPU (build tag xesp_benchslow, never in the
# daemon). Outputs go to $TMPDIR/xesp-gate-proof.
bench-gate-proof: build
	$(GO) build -tags xesp_benchslow -o bin/xesp-lab-slow ./cmd/xesp-lab
	@d=$${TMPDIR:-/tmp}/xesp-gate-proof; mkdir -p $$d; for i in 1 2; do \
	  echo "== proof $$i: unchanged tree, must pass"; \
	  ./bin/xesp-lab bench -check $(BENCH_BASELINE) -out $$d/pass$$i > $$d/pass$$i.log 2>&1 || { tail -40 $$d/pass$$i.log; echo "FAIL: the gate failed an unchanged tree"; exit 1; }; \
	  tail -14 $$d/pass$$i.log; \
	  echo "== proof $$i: XESP_BENCH_SLOW=0.3, must fail"; \
	  if XESP_BENCH_SLOW=0.3 ./bin/xesp-lab-slow bench -check $(BENCH_BASELINE) -out $$d/slow$$i > $$d/slow$$i.log 2>&1; then tail -40 $$d/slow$$i.log; echo "FAIL: the gate missed a 30% regression"; exit 1; fi; \
	  tail -16 $$d/slow$$i.log; \
	done; echo "bench-gate-proof: passed twice unchanged, failed twice with the knob"

# Re-measure bench/baseline.json (5 gate runs) and
# bench/micro-baseline.txt on a quiet machine, then commit them.
bench-calibrate: build
	./bin/xesp-lab bench -calibrate 5 -check $(BENCH_BASELINE)
	$(GO) test $(MICRO_FLAGS) -bench='$(MICRO_ESP)' ./dataplane/esp > bench/micro-baseline.txt
	$(GO) test $(MICRO_FLAGS) -bench='$(MICRO_BPF)' ./bpf >> bench/micro-baseline.txt

clean:
	rm -rf bin
