// Package bpf holds xesp's XDP programs (xesp.c), the header they share
// with Go (xesp.h) and the bpf2go output that embeds the compiled object
// and the Go types generated from the header.
//
// It owns the kernel half of the data path: classification, UDP stripping,
// steering to AF_XDP sockets and the verdict counters. It must not attach,
// pin or write maps: the loader and maps packages do that.
package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package bpf -type xesp_counter -type xesp_config -type xesp_sa -type xesp_policy_key -type xesp_core_key -type xesp_core_cfg -type xesp_policy -type xesp_meta -type xesp_flood_sa -type xesp_flood_src_key -type xesp_flood_src -type xesp_binding_key -type xesp_keepalive Xesp xesp.c -- -I.
