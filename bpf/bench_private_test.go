package bpf_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

// loadPrivate loads the programs with room for n trie and n cores
// entries.
func loadPrivate(b *testing.B, n uint32) (*bpf.XespObjects, *maps.Set) {
	netns.RequireRoot(b)
	spec, err := bpf.LoadXesp()
	if err != nil {
		b.Fatal(err)
	}
	spec.Maps[bpf.XespMapPolicies].MaxEntries = n
	spec.Maps[bpf.XespMapCores].MaxEntries = n
	var objs bpf.XespObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { objs.Close() })
	set, err := maps.New(&objs.XespMaps)
	if err != nil {
		b.Fatal(err)
	}
	return &objs, set
}

// nthAddr is the i-th address after base (IPv4).
func nthAddr(base netip.Addr, i int) netip.Addr {
	a := base.As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(i)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// fillMap puts n entries into m in batches of 64k.
func fillMap[K any](b *testing.B, m *ebpf.Map, n int, key func(i int) K) {
	const chunk = 1 << 16
	keys := make([]K, 0, chunk)
	vals := make([]bpf.Policy, 0, chunk)
	for i := 0; i < n; i++ {
		keys = append(keys, key(i))
		vals = append(vals, bpf.Policy{SaIndex: uint32(i)})
		if len(keys) == chunk || i == n-1 {
			if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
				b.Fatal(err)
			}
			keys, vals = keys[:0], vals[:0]
		}
	}
}

// BenchmarkPrivate measures xesp_private's lookup, steered to a socket
// (metadata written, redirect verdict): the LPM trie alone, as before
// core addresses (exact-match step off), and the exact match on core
// address and port, at 1 and 1M entries; plus the trie path behind
// exact-match misses (what SAs without a core address pay in a gateway
// that also has core addresses): one miss when only (address, port)
// entries exist (sec-agree), two when any-port entries exist as well.
func BenchmarkPrivate(b *testing.B) {
	const million = 1_000_000
	objs, set := loadPrivate(b, million+16)
	ns := netns.ForTest(b, "xbpp")
	if err := set.XSKPrivate.Set(0, xskSocket(b, ns, "lo", 0)); err != nil {
		b.Fatal(err)
	}
	to := func(dst netip.Addr) []byte {
		i := ip4(layers.IPProtocolUDP)
		i.SrcIP, i.DstIP = net.ParseIP("10.0.0.5").To4(), dst.AsSlice()
		return serialize(b, eth(layers.EthernetTypeIPv4), i, udp(i, 5065, 5064), gopacket.Payload(make([]byte, 200-14-20-8)))
	}
	cores := func(f uint32) {
		if err := set.Cores.SetKinds(f); err != nil {
			b.Fatal(err)
		}
	}
	trieBase, coreBase := netip.MustParseAddr("10.128.0.0"), netip.MustParseAddr("100.64.0.0")
	trieKey := func(i int) bpf.PolicyKey {
		k, _ := maps.PolicyKey(netip.PrefixFrom(nthAddr(trieBase, i), 32))
		return k
	}
	coreKey := func(i int) bpf.CoreKey {
		k, _ := maps.CoreKey(nthAddr(coreBase, i), 5064)
		return k
	}
	const off, both, port = 0, bpf.CoreFlags, bpf.CoreFlagPort
	run := func(name string, dst netip.Addr, want bpf.Reason, flags uint32) {
		b.Run(name, func(b *testing.B) {
			cores(flags)
			benchProgram(b, objs.XespPrivate, set, to(dst), want, xdpRedirect, singleRuns)
		})
	}
	fillMap(b, set.Policies.Map(), 1, trieKey)
	fillMap(b, set.Cores.Map(), 1, coreKey)
	run("lpm-only-1sa", trieBase, bpf.PrivRedirect, off)
	run("core-1sa", coreBase, bpf.PrivRedirectCorePort, port)
	run("lpm-behind-core-port-miss-1sa", trieBase, bpf.PrivRedirect, port)
	run("lpm-behind-both-core-misses-1sa", trieBase, bpf.PrivRedirect, both)
	fillMap(b, set.Policies.Map(), million, trieKey)
	fillMap(b, set.Cores.Map(), million, coreKey)
	// Keys in the middle of the ranges: certainly among the million.
	run("lpm-only-1M-sa", nthAddr(trieBase, 654321), bpf.PrivRedirect, off)
	run("core-1M-sa", nthAddr(coreBase, 654321), bpf.PrivRedirectCorePort, port)
	run("lpm-behind-core-port-miss-1M-sa", nthAddr(trieBase, 654321), bpf.PrivRedirect, port)
	run("lpm-behind-both-core-misses-1M-sa", nthAddr(trieBase, 654321), bpf.PrivRedirect, both)
}
