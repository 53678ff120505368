package loader_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/internal/instlock"
	"github.com/xesp/xesp/lab/netns"
	"github.com/xesp/xesp/loader"
	"github.com/xesp/xesp/maps"
)

// bpffsForTest mounts a private bpffs instance for the test, so pins never
// land in the host's /sys/fs/bpf.
func bpffsForTest(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := loader.EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("EnsureBPFFS(%s) left no bpffs: %v", dir, err)
	}
	// A second call finds it mounted and must not stack another mount.
	if err := loader.EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

type topo struct {
	gw, ue     *netns.NS
	gwIf, ueIf string
	gwIP, ueIP net.IP
	gwIfindex  int
}

func newTopo(t *testing.T) *topo {
	netns.RequireRoot(t)
	tp := &topo{gw: netns.ForTest(t, "xlgw"), ue: netns.ForTest(t, "xlue"),
		gwIP: net.IPv4(198, 51, 100, 1).To4(), ueIP: net.IPv4(198, 51, 100, 2).To4()}
	tp.gwIf, tp.ueIf = netns.VethForTest(t, tp.gw, tp.ue)
	for _, s := range []struct {
		ns        *netns.NS
		dev, cidr string
	}{{tp.gw, tp.gwIf, "198.51.100.1/24"}, {tp.ue, tp.ueIf, "198.51.100.2/24"}} {
		// No IPv6: router solicitations and MLD would add traffic the
		// counters then have to tolerate.
		if _, err := s.ns.Run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.ns.Run("ip", "addr", "add", s.cidr, "dev", s.dev); err != nil {
			t.Fatal(err)
		}
	}
	if err := tp.gw.Do(func() error {
		ifi, err := net.InterfaceByName(tp.gwIf)
		if err == nil {
			tp.gwIfindex = ifi.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return tp
}

// send sends each payload as one UDP datagram from the ue namespace.
func (tp *topo) send(t *testing.T, dport int, payloads ...[]byte) {
	t.Helper()
	err := tp.ue.Do(func() error {
		// Unconnected: the port unreachable answers to IKE and port 5060
		// must not fail later writes.
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: tp.ueIP})
		if err != nil {
			return err
		}
		defer c.Close()
		dst := &net.UDPAddr{IP: tp.gwIP, Port: dport}
		for _, p := range payloads {
			if _, err := c.WriteToUDP(p, dst); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func repeat(n int, b []byte) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

func esp(spi uint32, n int) []byte {
	b := make([]byte, 8+n)
	binary.BigEndian.PutUint32(b, spi)
	binary.BigEndian.PutUint32(b[4:], 1)
	return b
}

// waitCounters polls until every reason in want has at least its count, then
// returns the snapshot (veth runs XDP in NAPI, shortly after the send).
func waitCounters(t *testing.T, set *maps.Set, want map[bpf.Reason]uint64) maps.Snapshot {
	t.Helper()
	var s maps.Snapshot
	deadline := time.Now().Add(5 * time.Second)
	for {
		if err := set.Counters.Read(&s); err != nil {
			t.Fatal(err)
		}
		done := true
		for r, n := range want {
			if s[r].Packets < n {
				done = false
			}
		}
		if done || time.Now().After(deadline) {
			return s
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const knownSPI = 0x00c0ffee

// TestNamespaceAttachRestartDetach: native attach on a veth, real UDP from
// a peer namespace, counters read back; then a restart that finds the pins
// (link re-opened, SA and counters kept), then detach.
func TestNamespaceAttachRestartDetach(t *testing.T) {
	tp := newTopo(t)
	opts := loader.Options{Public: tp.gwIf, BPFFS: bpffsForTest(t), SACapacity: 4096}
	t.Cleanup(func() { loader.DetachPinned(opts) }) // after a failure; no-op otherwise

	var in *loader.Instance
	err := tp.gw.Do(func() error {
		var err error
		if in, err = loader.Load(opts); err != nil {
			return err
		}
		return in.Attach()
	})
	if err != nil {
		t.Fatal(err)
	}
	if in.Public.Mode != loader.ModeNative || in.Public.Reused || in.Public.Ifindex != tp.gwIfindex {
		t.Fatalf("public attachment %+v, want native, fresh, ifindex %d", in.Public, tp.gwIfindex)
	}
	if in.Private != nil {
		t.Fatalf("private attachment %+v without a private interface", in.Private)
	}
	for _, n := range []string{"sas", "policies", "config", "counters", "xsks_public", "xsks_private", "link_public", "prog_public"} {
		if _, err := os.Stat(filepath.Join(opts.Dir(), n)); err != nil {
			t.Errorf("pin %s: %v", n, err)
		}
	}
	if err := in.Maps.SAs.Put(knownSPI, bpf.SASteer{SaIndex: 3}); err != nil {
		t.Fatal(err)
	}

	ike := append(make([]byte, 4), bytes.Repeat([]byte{0x25}, 28)...)
	tp.send(t, 4500, repeat(3, []byte{0xff})...)
	tp.send(t, 4500, repeat(2, ike)...)
	tp.send(t, 4500, repeat(4, esp(0x0badc0de, 40))...)
	tp.send(t, 4500, repeat(5, esp(knownSPI, 40))...) // no socket: stripped, then no_xsk
	tp.send(t, 4500, repeat(2, []byte{1, 2, 3})...)
	tp.send(t, 5060, repeat(6, esp(knownSPI, 40))...)
	want := map[bpf.Reason]uint64{
		bpf.DropKeepalive: 3, bpf.PassIKE: 2, bpf.DropNoSA: 4, bpf.DropNoXSK: 5, bpf.DropRunt: 2, bpf.PassOther: 6,
	}
	got := waitCounters(t, in.Maps, want)
	for r, n := range want {
		if got[r].Packets != n {
			t.Errorf("counter %s = %d, want %d", r, got[r].Packets, n)
		}
	}
	// Nothing else but ARP (not IP) may have been seen.
	for r, c := range got {
		if _, ok := want[bpf.Reason(r)]; !ok && bpf.Reason(r) != bpf.PassNotIP && c.Packets != 0 {
			t.Errorf("unexpected counter %s = %d", bpf.Reason(r), c.Packets)
		}
	}
	// Keepalives are 1 byte of UDP payload in an unpadded veth frame.
	if got[bpf.DropKeepalive].Bytes != 3*(14+20+8+1) {
		t.Errorf("keepalive bytes %d, want %d", got[bpf.DropKeepalive].Bytes, 3*(14+20+8+1))
	}
	if err := in.Close(); err != nil {
		t.Fatal(err)
	}

	// A restarted process with another capacity must not silently get a
	// different SA map.
	bad := opts
	bad.SACapacity = 8192
	if _, err := loader.Load(bad); !errors.Is(err, loader.ErrPinnedMismatch) {
		t.Errorf("load with another SA capacity: %v, want ErrPinnedMismatch", err)
	}

	// Restart: the program kept running with no process holding it.
	tp.send(t, 4500, []byte{0xff})
	err = tp.gw.Do(func() error {
		var err error
		if in, err = loader.Load(opts); err != nil {
			return err
		}
		return in.Attach()
	})
	if err != nil {
		t.Fatal(err)
	}
	if !in.Public.Reused || in.Public.Mode != loader.ModeNative {
		t.Fatalf("after restart: %+v, want reused native link", in.Public)
	}
	if sa, err := in.Maps.SAs.Lookup(knownSPI); err != nil || sa.SaIndex != 3 {
		t.Errorf("SA after restart: %+v, %v", sa, err)
	}
	if got := waitCounters(t, in.Maps, map[bpf.Reason]uint64{bpf.DropKeepalive: 4}); got[bpf.DropKeepalive].Packets != 4 {
		t.Errorf("keepalives after restart %d, want 4 (3 before, 1 while no process ran)", got[bpf.DropKeepalive].Packets)
	}

	if err := tp.gw.Do(in.Detach); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(opts.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after detach: %v", err)
	}
	var mode loader.Mode
	if err := tp.gw.Do(func() (err error) { mode, err = loader.XDPMode(tp.gwIfindex); return }); err != nil {
		t.Fatal(err)
	}
	if mode != loader.ModeNone {
		t.Errorf("xdp mode after detach: %s", mode)
	}
}

// TestGenericPrivateAndDetachPinned: generic mode when asked, the private
// program on a second interface, and detaching what an exited process
// left pinned.
func TestGenericPrivateAndDetachPinned(t *testing.T) {
	tp := newTopo(t)
	// A second veth pair gives the gateway a private interface.
	core := netns.ForTest(t, "xlco")
	privIf, _ := netns.VethForTest(t, tp.gw, core)
	opts := loader.Options{Public: tp.gwIf, Private: privIf, Generic: true, BPFFS: bpffsForTest(t), SACapacity: 1024}
	t.Cleanup(func() { loader.DetachPinned(opts) })
	err := tp.gw.Do(func() error {
		in, err := loader.Load(opts)
		if err != nil {
			return err
		}
		if err := in.Attach(); err != nil {
			in.Close()
			return err
		}
		for _, a := range []*loader.Attachment{in.Public, in.Private} {
			if a == nil || a.Mode != loader.ModeGeneric {
				t.Errorf("attachment %+v, want generic", a)
			}
		}
		return in.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(opts.Dir(), "link_private")); err != nil {
		t.Fatalf("private link pin: %v", err)
	}
	if err := tp.gw.Do(func() error { return loader.DetachPinned(opts) }); err != nil {
		t.Fatal(err)
	}
	err = tp.gw.Do(func() error {
		for _, dev := range []string{tp.gwIf, privIf} {
			ifi, err := net.InterfaceByName(dev)
			if err != nil {
				return err
			}
			if m, err := loader.XDPMode(ifi.Index); err != nil || m != loader.ModeNone {
				t.Errorf("%s after DetachPinned: mode %s, %v", dev, m, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := loader.DetachPinned(opts); err == nil || !strings.Contains(err.Error(), tp.gwIf) {
		t.Errorf("second DetachPinned: %v, want an error naming %s", err, tp.gwIf)
	}
}

// TestAttachErrorsNameInterface: errors say which interface and step.
func TestAttachErrorsNameInterface(t *testing.T) {
	netns.RequireRoot(t)
	in, err := loader.Load(loader.Options{Public: "xesp-nosuch0", NoPin: true, SACapacity: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	err = in.Attach()
	if err == nil || !strings.Contains(err.Error(), "attach xdp to xesp-nosuch0 (public)") {
		t.Errorf("attach to a missing interface: %v", err)
	}
}

// TestAttachJumboMTU: the programs are built as xdp.frags, so native mode
// attaches to a veth whose MTU needs more than one page per frame, and a
// full-size keepalive-free ESP frame still gets classified.
func TestAttachJumboMTU(t *testing.T) {
	tp := newTopo(t)
	for _, s := range []struct {
		ns  *netns.NS
		dev string
	}{{tp.gw, tp.gwIf}, {tp.ue, tp.ueIf}} {
		if _, err := s.ns.Run("ip", "link", "set", s.dev, "mtu", "9000"); err != nil {
			t.Fatal(err)
		}
	}
	opts := loader.Options{Public: tp.gwIf, NoPin: true, SACapacity: 16}
	var in *loader.Instance
	err := tp.gw.Do(func() error {
		var err error
		if in, err = loader.Load(opts); err != nil {
			return err
		}
		return in.Attach()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if in.Public.Mode != loader.ModeNative {
		t.Fatalf("mode %s at MTU 9000, want native", in.Public.Mode)
	}
	tp.send(t, 4500, esp(0x0badc0de, 8000))
	got := waitCounters(t, in.Maps, map[bpf.Reason]uint64{bpf.DropNoSA: 1})
	if got[bpf.DropNoSA].Packets != 1 {
		t.Errorf("8 kB ESP frame: no_sa = %d, want 1 (counters %+v)", got[bpf.DropNoSA].Packets, got)
	}
}

// One process at a time per pin directory (issue 18): a second Load of
// the same instance fails with an instlock.HeldError naming this process
// and touches nothing; after Close it loads.
func TestLoadTakesPinDirLock(t *testing.T) {
	netns.RequireRoot(t)
	opts := loader.Options{Public: netns.UniqueName("xlk"), BPFFS: bpffsForTest(t), SACapacity: 16}
	first, err := loader.Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Maps.SAs.Put(knownSPI, bpf.SASteer{SaIndex: 9}); err != nil {
		t.Fatal(err)
	}
	_, err = loader.Load(opts)
	var he *instlock.HeldError
	if !errors.As(err, &he) || he.What != "pin_dir" || he.PID != os.Getpid() {
		t.Fatalf("second Load: %v, want a HeldError naming pid %d", err, os.Getpid())
	}
	if err := loader.DetachPinned(opts); !errors.As(err, &he) {
		t.Fatalf("DetachPinned while held: %v, want a HeldError", err)
	}
	if sa, err := first.Maps.SAs.Lookup(knownSPI); err != nil || sa.SaIndex != 9 {
		t.Fatalf("the refused Load changed the maps: %+v, %v", sa, err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	second, err := loader.Load(opts)
	if err != nil {
		t.Fatalf("Load after Close: %v", err)
	}
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	if err := loader.DetachPinned(opts); err != nil {
		t.Fatal(err)
	}
}
