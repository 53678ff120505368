// Package loader loads xesp's XDP programs into the kernel, attaches
// xesp_public and xesp_private to their interfaces, and pins programs,
// links and maps under one bpffs directory per instance so a restarted
// daemon finds and reuses them.
//
// An instance is named by its public interface: its state lives in
// <PinRoot>/<public ifname>/ (maps by their xesp.h names, prog_public,
// prog_private, link_public, link_private). It owns attach, pin, detach
// and unpin; map contents belong to the manager through package maps.
package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/xesp/xesp/bpf"
	"github.com/xesp/xesp/internal/instlock"
	"github.com/xesp/xesp/maps"
)

const (
	// DefaultBPFFS is where bpffs is mounted (and mounted by Load if not).
	DefaultBPFFS = "/sys/fs/bpf"
	// DefaultSACapacity is the inbound SA map size: at least a million
	// phones per gateway.
	DefaultSACapacity = 1 << 20
	// DefaultPolicyCapacity is the outbound policy trie size.
	DefaultPolicyCapacity = 1 << 16
	// DefaultXSKSlots is each XSK map's size: queues * workers must fit.
	DefaultXSKSlots = 256
)

// ErrPinnedMismatch: the maps pinned for the instance differ from what
// Load was asked for (capacity or layout).
var ErrPinnedMismatch = errors.New("pinned maps do not match")

// Options say what to load and where to attach it.
type Options struct {
	Public  string // public interface (xesp_public); names the instance
	Private string // private interface (xesp_private); "" attaches none

	// Generic attaches in generic (SKB) mode; the default is native
	// (driver) mode, with no silent fallback.
	Generic bool

	// BPFFS is the bpffs mount point (default DefaultBPFFS); PinRoot the
	// directory of all instances (default BPFFS/xesp).
	BPFFS   string
	PinRoot string
	// NoPin loads and attaches without pinning anything (dry runs,
	// tests): nothing survives Close.
	NoPin bool

	SACapacity     uint32 // default DefaultSACapacity
	PolicyCapacity uint32 // default DefaultPolicyCapacity
	XSKSlots       uint32 // default DefaultXSKSlots

	// Replace swaps the programs in links found pinned for the ones just
	// loaded (an upgrade); without it a pinned link keeps its program.
	Replace bool

	// Lock is the pin directory's lock when the caller already holds it
	// (handed over by a previous process); nil: Load takes it, and fails
	// with an instlock.HeldError while another process holds it.
	Lock *instlock.Lock
}

func (o *Options) defaults() {
	if o.BPFFS == "" {
		o.BPFFS = DefaultBPFFS
	}
	if o.PinRoot == "" {
		o.PinRoot = filepath.Join(o.BPFFS, "xesp")
	}
	if o.SACapacity == 0 {
		o.SACapacity = DefaultSACapacity
	}
	if o.PolicyCapacity == 0 {
		o.PolicyCapacity = DefaultPolicyCapacity
	}
	if o.XSKSlots == 0 {
		o.XSKSlots = DefaultXSKSlots
	}
}

// Dir is the pin directory of the instance on public.
func (o Options) Dir() string {
	o.defaults()
	return filepath.Join(o.PinRoot, o.Public)
}

// Instance is a loaded (and possibly attached) set of programs and maps.
type Instance struct {
	Objects bpf.XespObjects
	Maps    *maps.Set
	// Public and Private are set by Attach.
	Public, Private *Attachment
	// MountedBPFFS is set when Load had to mount bpffs itself.
	MountedBPFFS bool
	// AdoptedMaps is set when a state map was found pinned and reused:
	// only then can the maps hold entries of SAs this process does not
	// have (a fresh map is empty, and walking a million entries of one
	// for nothing costs seconds at start).
	AdoptedMaps bool

	opts Options
	dir  string // "" when not pinning
	// lock is held on the pin directory from before any pinned map is
	// opened until Close: one process at a time owns the instance.
	lock *instlock.Lock
}

// Load loads the programs and maps. With pinning, maps already pinned in
// the instance directory are reused with their contents (and must match
// the requested capacities); missing ones are created and pinned.
func Load(opts Options) (*Instance, error) {
	opts.defaults()
	if opts.Public == "" {
		return nil, errors.New("load: no public interface")
	}
	spec, err := bpf.LoadXesp()
	if err != nil {
		return nil, fmt.Errorf("load: parse embedded object: %w", err)
	}
	spec.Maps[bpf.XespMapSas].MaxEntries = opts.SACapacity
	spec.Maps[bpf.XespMapPolicies].MaxEntries = opts.PolicyCapacity
	// One exact-match entry per outbound SA at most: the policy capacity.
	spec.Maps[bpf.XespMapCores].MaxEntries = opts.PolicyCapacity
	spec.Maps[bpf.XespMapKeepalives].MaxEntries = opts.SACapacity // at most one binding per SA
	spec.Maps[bpf.XespMapXsksPublic].MaxEntries = opts.XSKSlots
	spec.Maps[bpf.XespMapXsksPrivate].MaxEntries = opts.XSKSlots

	in := &Instance{opts: opts}
	var collOpts ebpf.CollectionOptions
	if !opts.NoPin {
		mounted, err := ensureBPFFS(opts.BPFFS)
		if err != nil {
			return nil, fmt.Errorf("load %s: %w", opts.Public, err)
		}
		in.MountedBPFFS = mounted
		in.dir = opts.Dir()
		if err := os.MkdirAll(in.dir, 0o700); err != nil {
			return nil, fmt.Errorf("load %s: create pin directory: %w", opts.Public, err)
		}
		if opts.Lock != nil {
			in.lock = opts.Lock
		} else if in.lock, err = instlock.Dir("pin_dir", in.dir); err != nil {
			return nil, fmt.Errorf("load %s: %w", opts.Public, err)
		}
		for _, name := range pinnedMaps {
			spec.Maps[name].Pinning = ebpf.PinByName
			if _, err := os.Stat(filepath.Join(in.dir, name)); err == nil {
				in.AdoptedMaps = true
			}
		}
		collOpts.Maps.PinPath = in.dir
	}
	if err := spec.LoadAndAssign(&in.Objects, &collOpts); err != nil {
		in.lock.Release()
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load %s: verifier: %+v", opts.Public, ve)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("load %s: %w: %s (other capacity or layout; detach first): %w", opts.Public, ErrPinnedMismatch, in.dir, err)
		}
		return nil, fmt.Errorf("load %s: %w", opts.Public, err)
	}
	in.Maps, err = maps.New(&in.Objects.XespMaps)
	if err != nil {
		in.Objects.Close()
		in.lock.Release()
		return nil, fmt.Errorf("load %s: %w", opts.Public, err)
	}
	return in, nil
}

// pinnedMaps are the maps that carry state across restarts: all of them.
var pinnedMaps = []string{bpf.XespMapSas, bpf.XespMapPolicies, bpf.XespMapCores, bpf.XespMapCoreCfg, bpf.XespMapConfig,
	bpf.XespMapCounters, bpf.XespMapXsksPublic, bpf.XespMapXsksPrivate,
	bpf.XespMapFloodSas, bpf.XespMapFloodSrcs, bpf.XespMapFloodDrops, bpf.XespMapKeepalives}

// Dir is the instance's pin directory ("" when not pinning).
func (in *Instance) Dir() string { return in.dir }

// Attach attaches xesp_public to Options.Public and, if given, xesp_private
// to Options.Private. A link found pinned is re-opened, not re-attached.
func (in *Instance) Attach() error {
	pub, err := in.attach("public", in.opts.Public, in.Objects.XespPublic)
	if err != nil {
		return err
	}
	in.Public = pub
	if in.opts.Private == "" {
		return nil
	}
	if in.opts.Private == in.opts.Public {
		return fmt.Errorf("attach xdp to %s: public and private on one interface (one-arm mode) is not supported", in.opts.Private)
	}
	priv, err := in.attach("private", in.opts.Private, in.Objects.XespPrivate)
	if err != nil {
		return err
	}
	in.Private = priv
	return nil
}

func (in *Instance) attach(side, ifname string, prog *ebpf.Program) (*Attachment, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("attach xdp to %s (%s): %w", ifname, side, err)
	}
	a := &Attachment{Side: side, Ifname: ifname, Ifindex: ifi.Index}
	linkPin := filepath.Join(in.dir, "link_"+side)
	if in.dir != "" {
		l, err := link.LoadPinnedLink(linkPin, nil)
		switch {
		case err == nil:
			if err := in.reuse(a, l, prog); err != nil {
				l.Close()
				return nil, err
			}
			return a, nil
		case !errors.Is(err, fs.ErrNotExist):
			return nil, fmt.Errorf("attach xdp to %s (%s): open pinned link %s: %w", ifname, side, linkPin, err)
		}
	}
	flags := link.XDPDriverMode
	if in.opts.Generic {
		flags = link.XDPGenericMode
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifi.Index, Flags: flags})
	if err != nil {
		hint := ""
		if !in.opts.Generic {
			hint = " (native mode; use generic mode only if the driver lacks XDP)"
		}
		return nil, fmt.Errorf("attach xdp to %s (%s)%s: %w", ifname, side, hint, err)
	}
	a.link = l
	if a.Mode, err = xdpMode(ifi.Index); err != nil {
		l.Close()
		return nil, fmt.Errorf("attach xdp to %s (%s): %w", ifname, side, err)
	}
	if in.dir != "" {
		if err := l.Pin(linkPin); err != nil {
			l.Close()
			return nil, fmt.Errorf("attach xdp to %s (%s): pin link: %w", ifname, side, err)
		}
		if err := pinProgram(prog, filepath.Join(in.dir, "prog_"+side)); err != nil {
			return nil, fmt.Errorf("attach xdp to %s (%s): %w", ifname, side, err)
		}
	}
	return a, nil
}

// reuse adopts a link a previous process pinned, after checking it sits on
// the interface asked for.
func (in *Instance) reuse(a *Attachment, l link.Link, prog *ebpf.Program) error {
	info, err := l.Info()
	if err != nil {
		return fmt.Errorf("attach xdp to %s (%s): pinned link info: %w", a.Ifname, a.Side, err)
	}
	if x := info.XDP(); x == nil || int(x.Ifindex) != a.Ifindex {
		return fmt.Errorf("attach xdp to %s (%s): link pinned in %s is on another interface; detach it first", a.Ifname, a.Side, in.dir)
	}
	a.link, a.Reused = l, true
	if in.opts.Replace {
		if err := l.Update(prog); err != nil {
			return fmt.Errorf("attach xdp to %s (%s): replace program in pinned link: %w", a.Ifname, a.Side, err)
		}
		if err := pinProgram(prog, filepath.Join(in.dir, "prog_"+a.Side)); err != nil {
			return fmt.Errorf("attach xdp to %s (%s): %w", a.Ifname, a.Side, err)
		}
	}
	a.Mode, err = xdpMode(a.Ifindex)
	if err != nil {
		return fmt.Errorf("attach xdp to %s (%s): %w", a.Ifname, a.Side, err)
	}
	return nil
}

func pinProgram(prog *ebpf.Program, path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("replace program pin %s: %w", path, err)
	}
	if err := prog.Pin(path); err != nil {
		return fmt.Errorf("pin program %s: %w", path, err)
	}
	return nil
}

// Close releases this process's handles. Pinned links stay attached and
// pinned maps keep their contents for the next Load; without pinning,
// Close detaches everything.
func (in *Instance) Close() error {
	err := in.closeHandles()
	in.lock.Release()
	return err
}

func (in *Instance) closeHandles() error {
	var errs []error
	for _, a := range []*Attachment{in.Public, in.Private} {
		if a != nil && a.link != nil {
			errs = append(errs, a.link.Close())
			a.link = nil
		}
	}
	errs = append(errs, in.Objects.Close())
	return errors.Join(errs...)
}

// PinLock is the held pin-directory lock (nil without pinning), for
// handing over to a successor process.
func (in *Instance) PinLock() *instlock.Lock { return in.lock }

// Detach detaches both programs, removes every pin of the instance and
// closes it.
func (in *Instance) Detach() error {
	var errs []error
	for _, a := range []*Attachment{in.Public, in.Private} {
		if a == nil || a.link == nil {
			continue
		}
		if err := a.link.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("detach %s (%s): unpin link: %w", a.Ifname, a.Side, err))
		}
	}
	errs = append(errs, in.closeHandles())
	if in.dir != "" {
		errs = append(errs, unpinDir(in.dir))
	}
	// Only now: a successor waiting for the lock must not open pins
	// this process is removing.
	in.lock.Release()
	return errors.Join(errs...)
}

// DetachPinned detaches and unpins the instance of opts.Public that an
// earlier process left pinned, without loading anything. A missing
// instance directory is an error (nothing to detach).
func DetachPinned(opts Options) error {
	opts.defaults()
	dir := opts.Dir()
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("detach %s: %w", opts.Public, err)
	}
	lock, err := instlock.Dir("pin_dir", dir)
	if err != nil {
		return fmt.Errorf("detach %s: %w", opts.Public, err)
	}
	defer lock.Release()
	var errs []error
	for _, side := range []string{"public", "private"} {
		p := filepath.Join(dir, "link_"+side)
		l, err := link.LoadPinnedLink(p, nil)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("detach %s: open pinned link %s: %w", opts.Public, p, err))
			continue
		}
		// Unpinning drops the last reference once we close it: the
		// program leaves the interface.
		errs = append(errs, l.Unpin(), l.Close())
	}
	errs = append(errs, unpinDir(dir))
	return errors.Join(errs...)
}

// unpinDir removes the pins xesp makes in dir, then dir. Anything else in
// it is left alone (and makes the final remove fail, which is reported).
func unpinDir(dir string) error {
	var errs []error
	names := append([]string{"link_public", "link_private", "prog_public", "prog_private"}, pinnedMaps...)
	for _, n := range names {
		if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin %s: %w", n, err))
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pin directory: %w", err))
	}
	return errors.Join(errs...)
}
