package maps_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

func load(t *testing.T, saCap uint32) *loader.Instance {
	t.Helper()
	netns.RequireRoot(t)
	in, err := loader.Load(loader.Options{Public: "unused", NoPin: true, SACapacity: saCap})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close() })
	return in
}

func TestSAs(t *testing.T) {
	s := load(t, 64).Maps.SAs
	if s.Capacity() != 64 {
		t.Errorf("capacity %d", s.Capacity())
	}
	if _, err := s.Lookup(0x1001); !errors.Is(err, maps.ErrNotFound) {
		t.Errorf("lookup of absent SPI: %v", err)
	}
	want := bpf.SASteer{SaIndex: 42, Worker: 3, Flags: bpf.SAFlagEncap}
	if err := s.Put(0x1001, want); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Lookup(0x1001); err != nil || got != want {
		t.Errorf("lookup: %+v, %v", got, err)
	}
	if err := s.Delete(0x1001); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(0x1001); !errors.Is(err, maps.ErrNotFound) {
		t.Errorf("second delete: %v", err)
	}
	if err := s.PutBatch([]uint32{1}, nil); err == nil {
		t.Error("PutBatch with mismatched lengths succeeded")
	}
}

// TestSAsMillion fills the default-size map with a million SAs in batches
// and checks every entry is there and right.
func TestSAsMillion(t *testing.T) {
	if testing.Short() {
		t.Skip("fills a million-entry map")
	}
	s := load(t, 0).Maps.SAs
	if s.Capacity() < 1_000_000 {
		t.Fatalf("default capacity %d < 1,000,000", s.Capacity())
	}
	const n = 1_000_000
	spis := make([]uint32, n)
	sas := make([]bpf.SASteer, n)
	for i := range spis {
		spis[i] = uint32(0x10000 + i*7)
		sas[i] = bpf.SASteer{SaIndex: uint32(i), Worker: uint16(i % 4)}
	}
	if err := s.PutBatch(spis, sas); err != nil {
		t.Fatal(err)
	}
	seen := 0
	if err := s.Walk(func(spi uint32, sa bpf.SASteer) bool {
		i := int(spi-0x10000) / 7
		if (spi-0x10000)%7 != 0 || i >= n || sa != sas[i] {
			t.Fatalf("walk: spi 0x%x -> %+v", spi, sa)
		}
		seen++
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if seen != n {
		t.Errorf("walk saw %d entries, want %d", seen, n)
	}
	if err := s.DeleteBatch(spis[:n/2]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup(spis[0]); !errors.Is(err, maps.ErrNotFound) {
		t.Errorf("deleted SPI: %v", err)
	}
	if got, err := s.Lookup(spis[n-1]); err != nil || got != sas[n-1] {
		t.Errorf("kept SPI: %+v, %v", got, err)
	}
}

func TestPolicies(t *testing.T) {
	p := load(t, 16).Maps.Policies
	k, err := maps.PolicyKey(netip.MustParsePrefix("10.99.0.77/24"))
	if err != nil {
		t.Fatal(err)
	}
	wantAddr := netip.MustParseAddr("::ffff:10.99.0.0").As16()
	if k.Prefixlen != 24+96 || k.Addr != wantAddr {
		t.Errorf("IPv4 key %+v: want prefixlen 120, mapped address with host bits cleared", k)
	}
	for pfx, pol := range map[string]bpf.Policy{
		"10.99.0.0/24":      {SaIndex: 1},
		"10.99.0.128/25":    {SaIndex: 2, Worker: 1},
		"2001:db8:1::/48":   {SaIndex: 3},
		"2001:db8:1:2::/64": {SaIndex: 4},
	} {
		if err := p.Put(netip.MustParsePrefix(pfx), pol); err != nil {
			t.Fatal(err)
		}
	}
	for addr, sa := range map[string]uint32{
		"10.99.0.1": 1, "10.99.0.200": 2, "2001:db8:1:9::1": 3, "2001:db8:1:2::1": 4,
	} {
		if got, err := p.Lookup(netip.MustParseAddr(addr)); err != nil || got.SaIndex != sa {
			t.Errorf("lookup %s: %+v, %v; want sa %d", addr, got, err, sa)
		}
	}
	if _, err := p.Lookup(netip.MustParseAddr("10.98.0.1")); !errors.Is(err, maps.ErrNotFound) {
		t.Errorf("lookup outside every prefix: %v", err)
	}
	if err := p.Delete(netip.MustParsePrefix("10.99.0.128/25")); err != nil {
		t.Fatal(err)
	}
	if got, err := p.Lookup(netip.MustParseAddr("10.99.0.200")); err != nil || got.SaIndex != 1 {
		t.Errorf("after deleting the /25: %+v, %v; want the /24", got, err)
	}
	if err := p.Put(netip.Prefix{}, bpf.Policy{}); err == nil {
		t.Error("put of an invalid prefix succeeded")
	}
}

func TestXSKs(t *testing.T) {
	in := load(t, 16)
	x := in.Maps.XSKPublic
	if x.Capacity() != loader.DefaultXSKSlots {
		t.Errorf("capacity %d", x.Capacity())
	}
	if got := maps.Index(3, 4, 2); got != 14 {
		t.Errorf("Index(3, 4, 2) = %d, want 14", got)
	}
	if got := maps.Index(2, 0, 0); got != 2 {
		t.Errorf("Index with workers 0 (means 1) = %d, want 2", got)
	}
	// Only AF_XDP sockets go into an XSKMAP.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := x.Set(0, fd); err == nil {
		t.Error("XSK map accepted a UDP socket")
	}
	// The kernel treats emptying an empty slot as success.
	if err := x.Delete(0); err != nil {
		t.Errorf("delete of an empty slot: %v", err)
	}
}

func TestConfig(t *testing.T) {
	c := load(t, 16).Maps.Config
	if got, err := c.Get(); err != nil || got != (bpf.Config{}) {
		t.Errorf("fresh config %+v, %v; want zero (defaults)", got, err)
	}
	want := bpf.Config{NattPort: 4501, Workers: 8, PublicVlan: 100, PrivateVlan: 200}
	if err := c.Set(want); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Get(); err != nil || got != want {
		t.Errorf("config %+v, %v; want %+v", got, err, want)
	}
}

// TestCounters drives one keepalive through the program and reads it back
// summed over CPUs.
func TestCounters(t *testing.T) {
	in := load(t, 16)
	var s maps.Snapshot
	if err := in.Maps.Counters.Read(&s); err != nil {
		t.Fatal(err)
	}
	if s.Total() != (bpf.Counter{}) {
		t.Fatalf("fresh counters %+v", s.Total())
	}
	keepalive := []byte{
		2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa, 0x08, 0x00, // Ethernet
		0x45, 0, 0, 29, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2, // IPv4 (checksum not checked)
		0x79, 0x18, 0x11, 0x94, 0, 9, 0, 0, // UDP 31000 -> 4500, length 9
		0xff,
	}
	for range 3 {
		if _, _, err := in.Objects.XespPublic.Test(keepalive); err != nil {
			t.Fatal(err)
		}
	}
	var after maps.Snapshot
	if err := in.Maps.Counters.Read(&after); err != nil {
		t.Fatal(err)
	}
	d := after.Sub(&s)
	if d[bpf.DropKeepalive] != (bpf.Counter{Packets: 3, Bytes: 3 * uint64(len(keepalive))}) || d.Total().Packets != 3 {
		t.Errorf("counters after 3 keepalives: %+v, total %+v", d[bpf.DropKeepalive], d.Total())
	}
	if maps.Reason(bpf.DropKeepalive).String() != "drop_keepalive" {
		t.Errorf("reason label %q", maps.Reason(bpf.DropKeepalive))
	}
}

// TestOpenPinned opens the maps of a pinned instance by path, as the CLI
// and a restarted manager do, and refuses a map of the wrong shape.
func TestOpenPinned(t *testing.T) {
	netns.RequireRoot(t)
	dir := t.TempDir()
	if err := loader.EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	in, err := loader.Load(loader.Options{Public: "xesp-pin0", BPFFS: dir, SACapacity: 32})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Detach()
	if err := in.Maps.SAs.Put(7, bpf.SASteer{SaIndex: 70}); err != nil {
		t.Fatal(err)
	}
	set, err := maps.Open(in.Dir())
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	if sa, err := set.SAs.Lookup(7); err != nil || sa.SaIndex != 70 {
		t.Errorf("pinned SA: %+v, %v", sa, err)
	}
	if _, err := maps.Open(t.TempDir()); err == nil {
		t.Error("Open of an empty directory succeeded")
	}
	if _, err := maps.NewSAs(in.Objects.Counters); err == nil {
		t.Error("NewSAs accepted the counters map")
	}
	var _ *ebpf.Map = set.SAs.Map()
}

// A Barrier can be made and waited on repeatedly (each Wait is an RCU
// grace period in the kernel).
func TestBarrier(t *testing.T) {
	b, err := maps.NewBarrier()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for range 3 {
		if err := b.Wait(); err != nil {
			t.Fatal(err)
		}
	}
}

// PutBatch writes every policy of a batch larger than one chunk, replaces
// existing ones, and refuses mismatched lengths and invalid prefixes.
func TestPoliciesPutBatch(t *testing.T) {
	p := load(t, 16).Maps.Policies
	const n = 40000 // > batchChunk (32768): two batch calls
	prefixes := make([]netip.Prefix, n)
	pols := make([]bpf.Policy, n)
	for i := range prefixes {
		prefixes[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}), 32)
		pols[i] = bpf.Policy{SaIndex: uint32(i), Worker: uint16(i % 3)}
	}
	if err := p.Put(prefixes[7], bpf.Policy{SaIndex: 99999}); err != nil {
		t.Fatal(err)
	}
	if err := p.PutBatch(prefixes, pols); err != nil {
		t.Fatal(err)
	}
	for i, pr := range prefixes {
		if got, err := p.Lookup(pr.Addr()); err != nil || got != pols[i] {
			t.Fatalf("lookup %s: %+v, %v; want %+v", pr.Addr(), got, err, pols[i])
		}
	}
	// Walk reads every entry back, in batches, and stops when told.
	seen := make(map[netip.Prefix]bpf.Policy, n)
	if err := p.Walk(func(k *bpf.PolicyKey, pol *bpf.Policy) bool {
		a := netip.AddrFrom16(k.Addr).Unmap()
		seen[netip.PrefixFrom(a, int(k.Prefixlen)-96)] = *pol
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if len(seen) != n {
		t.Fatalf("walk saw %d policies, want %d", len(seen), n)
	}
	for i, pr := range prefixes {
		if seen[pr] != pols[i] {
			t.Fatalf("walk: %s -> %+v, want %+v", pr, seen[pr], pols[i])
		}
	}
	calls := 0
	if err := p.Walk(func(*bpf.PolicyKey, *bpf.Policy) bool { calls++; return calls < 5 }); err != nil || calls != 5 {
		t.Errorf("walk stopped after %d calls (%v), want 5", calls, err)
	}
	if err := p.PutBatch(prefixes[:2], pols[:1]); err == nil {
		t.Error("PutBatch with mismatched lengths succeeded")
	}
	if err := p.PutBatch([]netip.Prefix{{}}, []bpf.Policy{{}}); err == nil {
		t.Error("PutBatch of an invalid prefix succeeded")
	}
}
