package bpf_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/dataplane/flood"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/maps"
)

// TestFloodBudgetFixtures: xesp_public's flood_check on BPF_PROG_TEST_RUN.
// With no entry, or a budget not spent, every source is steered; with the
// SA's budget spent, every source but the binding is dropped as
// drop_flood_sa and counted for the SA in flood_drops; with a source's
// budget spent, that source (and only it) is dropped as drop_flood_src,
// unless it is the SA's binding. Both ESP-in-UDP and plain ESP.
func TestFloodBudgetFixtures(t *testing.T) {
	objs, set := loadObjects(t, 16)
	ns := netns.ForTest(t, "xbfl")
	if err := set.Config.Set(bpf.Config{Workers: 1}); err != nil {
		t.Fatal(err)
	}
	const spi, other = 0x00c0ffee, 0x00c0fff0
	for _, s := range []uint32{spi, other} {
		if err := set.SAs.Put(s, bpf.SASteer{SaIndex: 5, Worker: 0, Flags: bpf.SAFlagEncap}); err != nil {
			t.Fatal(err)
		}
	}
	if err := set.XSKPublic.Set(maps.Index(0, 1, 0), xskSocket(t, ns, "lo", 0)); err != nil {
		t.Fatal(err)
	}
	binding := netip.MustParseAddrPort("192.0.2.10:4500") // ipA4, the fixtures' phone
	spoof := netip.MustParseAddrPort("203.0.113.66:4500")
	pkt := func(spiV uint32, src netip.AddrPort, plain bool) []byte {
		i := ip4(layers.IPProtocolUDP)
		i.SrcIP = net.IP(src.Addr().AsSlice())
		if plain {
			i.Protocol = layers.IPProtocolESP
			return serialize(t, eth(layers.EthernetTypeIPv4), i, espBody(spiV, 7, 40))
		}
		return serialize(t, eth(layers.EthernetTypeIPv4), i, udp(i, src.Port(), natt), espBody(spiV, 7, 40))
	}
	check := func(name string, in []byte, wantVerdict uint32, want bpf.Reason) {
		t.Helper()
		var before, after maps.Snapshot
		if err := set.Counters.Read(&before); err != nil {
			t.Fatal(err)
		}
		v, _, _ := run(t, objs.XespPublic, in, xdpMD{})
		if err := set.Counters.Read(&after); err != nil {
			t.Fatal(err)
		}
		d := after.Sub(&before)
		if v != wantVerdict || d[want].Packets != 1 {
			got := ""
			for r, c := range d {
				if c.Packets > 0 {
					got += bpf.Reason(r).String() + " "
				}
			}
			t.Errorf("%s: verdict %s, reasons %s; want %s, %s", name, verdictName(v), got, verdictName(wantVerdict), want)
		}
	}
	now := flood.Now()
	put := func(tat int64, bind netip.AddrPort) {
		t.Helper()
		v := bpf.FloodSA{Tat: uint64(tat), Tolerance: 1e9, BindAddr: flood.Addr16(bind.Addr()), BindPort: flood.Htons(bind.Port())}
		if err := set.Flood.PutSA(spi, &v); err != nil {
			t.Fatal(err)
		}
	}

	check("no entry: spoofed source steered", pkt(spi, spoof, false), xdpRedirect, bpf.RedirectESPUDP)
	put(now+500e6, binding) // within tolerance (1 s): budget left
	check("budget left: spoofed source steered", pkt(spi, spoof, false), xdpRedirect, bpf.RedirectESPUDP)
	put(now+3600e9, binding) // spent for an hour
	check("spent: spoofed source dropped", pkt(spi, spoof, false), xdpDrop, bpf.DropFloodSA)
	check("spent: same address, other port dropped", pkt(spi, netip.AddrPortFrom(binding.Addr(), 4501), false), xdpDrop, bpf.DropFloodSA)
	check("spent: binding steered", pkt(spi, binding, false), xdpRedirect, bpf.RedirectESPUDP)
	check("spent: other SA unaffected", pkt(other, spoof, false), xdpRedirect, bpf.RedirectESPUDP)
	check("spent: plain ESP from the spoofed address dropped", pkt(spi, netip.AddrPortFrom(spoof.Addr(), 0), true), xdpDrop, bpf.DropFloodSA)
	if n, err := set.Flood.Drops(spi); err != nil || n != 3 {
		t.Fatalf("flood_drops[spi] = %d, %v; want 3", n, err)
	}
	if n, _ := set.Flood.Drops(other); n != 0 {
		t.Fatalf("flood_drops[other] = %d", n)
	}
	// Plain ESP binding: port 0.
	put(now+3600e9, netip.AddrPortFrom(binding.Addr(), 0))
	check("spent: plain ESP binding steered", pkt(spi, netip.AddrPortFrom(binding.Addr(), 0), true), xdpRedirect, bpf.RedirectESP)

	// Source budgets: the SA's is whole, the spoofer's spent.
	put(now-1e9, binding)
	src := func(ap netip.AddrPort) {
		k := bpf.FloodSrcKey{Addr: flood.Addr16(ap.Addr()), Port: flood.Htons(ap.Port())}
		if err := set.Flood.PutSrc(&k, &bpf.FloodSrc{Tat: uint64(now + 3600e9), Tolerance: 1e9}); err != nil {
			t.Fatal(err)
		}
	}
	src(spoof)
	src(binding) // a spent budget on the binding's own address:port is ignored for its SA
	check("source spent: spoofer dropped", pkt(spi, spoof, false), xdpDrop, bpf.DropFloodSrc)
	check("source spent: other source steered", pkt(spi, netip.MustParseAddrPort("203.0.113.67:4500"), false), xdpRedirect, bpf.RedirectESPUDP)
	check("source spent: binding steered", pkt(spi, binding, false), xdpRedirect, bpf.RedirectESPUDP)
	// The source's budget only applies through an SA that has an entry:
	// without failures of its own an SA costs one lookup and no more.
	check("source spent, SA without entry: steered", pkt(other, spoof, false), xdpRedirect, bpf.RedirectESPUDP)
	// Refilled: the entry's tat back within tolerance.
	put(now, binding)
	src2 := bpf.FloodSrcKey{Addr: flood.Addr16(spoof.Addr()), Port: flood.Htons(spoof.Port())}
	if err := set.Flood.PutSrc(&src2, &bpf.FloodSrc{Tat: uint64(now), Tolerance: 1e9}); err != nil {
		t.Fatal(err)
	}
	check("refilled: spoofer steered again", pkt(spi, spoof, false), xdpRedirect, bpf.RedirectESPUDP)
}
