package worker

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"

	"github.com/xesp/xesp/dataplane/esp"
	"github.com/xesp/xesp/dataplane/xsk"
	"github.com/xesp/xesp/internal/pkt"
)

// An SA's cipher is built on its first packet, released by the worker's
// sweep once the SA was idle for the limit, built again on the next
// packet, and between all that the SA decrypts and encrypts the right
// bytes with sequence numbers that go on: the phone's peers see no
// difference. A removed entry's keys are wiped and its listing dropped.
func TestIdleCipherReleaseRebuild(t *testing.T) {
	f := newPipeFixture(t)
	in, err := NewSlot(esp.Config{SPI: pipeSPIIn, Proposal: esp.AES128GCM16, EncKey: pipeKey, Mode: esp.ModeTunnel,
		ReplayWindow: esp.DefaultReplayWindow})
	if err != nil {
		t.Fatal(err)
	}
	out, err := NewSlot(esp.Config{SPI: pipeSPIOut, Proposal: esp.AES128GCM16, EncKey: pipeKey, Mode: esp.ModeTunnel})
	if err != nil {
		t.Fatal(err)
	}
	in.Dir, in.Binding = Inbound, f.in.Binding
	in.SetSelectors(f.in.InnerPeer(), netip.Addr{})
	out.Dir, out.LocalPort, out.Binding, out.index = Outbound, 4500, f.out.Binding, 1
	out.SetSelectors(f.out.InnerPeer(), netip.Addr{})
	out.SetScope(Scope{Local: pipeGW})
	f.p.table = []*Slot{in, out}
	f.p.idle.limit = 2

	phoneTx := mustESP(t, pipeSPIIn, 0)
	phoneRx := mustESP(t, pipeSPIOut, 64)
	now := int64(1_000_000_000)
	tick := func() { now += int64(idleTick); f.p.tick(now) }

	round := func(i int) {
		t.Helper()
		f.frames = 0
		req := pkt.UDP4(pipeInner, pipeCore, []byte(fmt.Sprintf("REGISTER %d", i)))
		tx, _ := f.p.decap([]xsk.Desc{f.espFrame(phoneTx, req, pipePhHW, 4500)}, nil, nil)
		if len(tx) != 1 {
			t.Fatalf("round %d: decap forwarded %d (drops %v)", i, len(tx), drops(&f.st.Decap))
		}
		if got, w := f.u.Packet(tx[0]), append(eth(pipeCoreHW, pipePrvHW), routed(req)...); !bytes.Equal(got, w) {
			t.Fatalf("round %d: decrypted frame\n got %x\nwant %x", i, got, w)
		}
		if s := in.Counters.Seq.Load(); s != uint64(i) {
			t.Fatalf("round %d: inbound seq %d", i, s)
		}
		resp := pkt.UDP4(pipeCore, pipeInner, []byte(fmt.Sprintf("200 OK %d", i)))
		tx, _ = f.p.encap([]xsk.Desc{f.clearFrame(1, resp)}, nil, nil)
		if len(tx) != 1 {
			t.Fatalf("round %d: encap forwarded %d (drops %v)", i, len(tx), drops(&f.st.Encap))
		}
		got, err := phoneRx.OpenPacket(f.u.Packet(tx[0])[ethLen:])
		if err != nil || got.Seq != uint64(i) || !bytes.Equal(got.IP, routed(resp)) {
			t.Fatalf("round %d: the phone opened seq %d %x (%v), want seq %d %x", i, got.Seq, got.IP, err, i, routed(resp))
		}
	}
	counts := func(builds, releases uint64, listed int) {
		t.Helper()
		if b, r := f.st.CipherBuilds.Load(), f.st.CipherReleases.Load(); b != builds || r != releases || f.p.idle.listed != listed {
			t.Fatalf("builds %d releases %d listed %d; want %d %d %d", b, r, f.p.idle.listed, builds, releases, listed)
		}
	}

	if !in.SA.Cold() || !out.SA.Cold() {
		t.Fatal("an installed SA built its cipher before its first packet")
	}
	round(1)
	counts(2, 0, 2)
	// Busy: a packet every tick keeps the ciphers.
	for i := 2; i <= 4; i++ {
		tick()
		round(i)
	}
	counts(2, 0, 2)
	tick() // 1 tick idle
	if in.SA.Cold() || out.SA.Cold() {
		t.Fatal("released before the idle limit")
	}
	tick() // 2 ticks idle: released
	if !in.SA.Cold() || !out.SA.Cold() {
		t.Fatal("not released after the idle limit")
	}
	counts(2, 2, 0)
	round(5) // rebuilt from the kept keys, sequence numbers going on
	counts(4, 2, 2)
	tick()
	tick()
	counts(4, 4, 0)
	round(6)

	// Removal: keys wiped at once, the listing dropped by the next pass,
	// which releases nothing (the cipher went with the keys).
	f.p.track(in, nil)
	f.p.table[0] = nil
	if !in.SA.Cold() || in.SA.Warm() == nil {
		t.Fatal("a removed SA keeps a cipher or can build one")
	}
	tick()
	tick() // the limit since round 6: in's listing dropped, out released
	if f.p.idle.listed != 0 || in.marks&markListed != 0 || f.st.CipherReleases.Load() != 5 {
		t.Fatalf("after removal: listed %d, releases %d", f.p.idle.listed, f.st.CipherReleases.Load())
	}
}

// fillIdle gives p a table of n outbound slots, each used at the current
// clock, so each is listed on the idle wheel.
func fillIdle(t *testing.T, p *pipeline, n int) {
	t.Helper()
	for i := range n {
		s, err := NewSlot(esp.Config{SPI: uint32(0x1000 + i), Proposal: esp.AES128GCM16, EncKey: pipeKey, Mode: esp.ModeTunnel})
		if err != nil {
			t.Fatal(err)
		}
		s.index, s.Dir = uint32(i), Outbound
		p.table = append(p.table, s)
		p.touch(s)
	}
}

// The sweep is chunked: a pass over more listed ciphers than one chunk
// spreads over loop turns, and releases every idle one.
func TestIdleSweepChunked(t *testing.T) {
	const n = 3*sweepChunk + 7
	p := &pipeline{stats: &Stats{}, idle: idler{limit: 1}}
	fillIdle(t, p, n)
	now := int64(1e9)
	p.tick(now) // clock 1: every entry idle 1 tick, first chunk
	if got := p.stats.CipherReleases.Load(); got != sweepChunk {
		t.Fatalf("first turn released %d, want one chunk (%d)", got, sweepChunk)
	}
	for range 3 {
		p.tick(now) // same tick: the pass goes on
	}
	if got := p.stats.CipherReleases.Load(); got != n || p.idle.listed != 0 || len(p.idle.due) != 0 {
		t.Fatalf("released %d of %d, %d still listed", got, n, p.idle.listed)
	}
}

// The wheel looks at a live cipher only when its limit would run out: a
// tick between looks nothing, a busy entry is filed again at its last use
// plus the limit, and an idle one goes exactly limit ticks after its last
// packet, not later.
func TestIdleWheelLooksOncePerLimit(t *testing.T) {
	const n, limit = 2 * sweepChunk, 10
	p := &pipeline{stats: &Stats{}, idle: idler{limit: limit}}
	fillIdle(t, p, n) // clock 0: due at 10
	now := int64(0)
	step := func() {
		now += int64(idleTick)
		for p.tick(now); len(p.idle.due) > 0; p.tick(now) {
		}
	}
	filed := func() int {
		k := 0
		for _, b := range p.idle.wheel {
			k += len(b)
		}
		return k
	}
	for c := 1; c < limit; c++ {
		step()
		if c == 5 {
			for _, s := range p.table[:n/2] { // busy: last use at 5
				p.touch(s)
			}
		}
		if got := p.stats.CipherReleases.Load(); got != 0 || filed() != n {
			t.Fatalf("tick %d: %d released, %d filed; want 0 and all %d filed, none looked at", c, got, filed(), n)
		}
	}
	step() // 10: the idle half goes, the busy half is filed at 15
	if got := p.stats.CipherReleases.Load(); got != n/2 || p.idle.listed != n/2 || filed() != n/2 {
		t.Fatalf("tick %d: released %d, listed %d, filed %d; want %d each", limit, got, p.idle.listed, filed(), n/2)
	}
	for c := limit + 1; c < 15; c++ {
		step()
		if got := p.stats.CipherReleases.Load(); got != n/2 {
			t.Fatalf("tick %d: released %d, want %d (busy half not due before 15)", c, got, n/2)
		}
	}
	step() // 15: the busy half, idle since 5, goes
	if got := p.stats.CipherReleases.Load(); got != n || p.idle.listed != 0 || filed() != 0 {
		t.Fatalf("tick 15: released %d of %d, %d listed", got, n, p.idle.listed)
	}
}
