package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"sync"

	"github.com/xesp/xesp/userspace/etcdsrc"
	"github.com/xesp/xesp/userspace/sa"
	"github.com/xesp/xesp/userspace/sad"
	"github.com/xesp/xesp/userspace/sastore"
)

// apiSAsFile holds, in state_dir, the SAs that came through the control
// API (sastore); the config file and etcd keep their own.
const apiSAsFile = "api-sas"

// apiSAs persists the part of the SAD no other store holds: every SA that
// is neither a config-file SA as the file gives it nor owned by the etcd
// source. An API PUT of a config SA is kept (it overrides the file's
// version at the next start); an API DELETE of a config SA is not
// remembered (the file brings it back).
type apiSAs struct {
	g      *Gateway
	path   string
	config map[sa.ID]*sa.SA

	mu    sync.Mutex
	saved uint64 // the SAD version the file reflects
	last  []byte // the file's bytes, to skip rewriting an unchanged set
	buf   []sad.Entry
	enc   map[sa.ID]encoded // each kept SA's file entry, by the SAD version it encodes
	etcd  *etcdsrc.Source   // its SAs live in etcd, not here
}

type encoded struct {
	version uint64
	b       []byte
}

// setEtcd names the source whose SAs are not the API's.
func (p *apiSAs) setEtcd(src *etcdsrc.Source) {
	p.mu.Lock()
	p.etcd = src
	p.mu.Unlock()
}

func newAPISAs(g *Gateway) *apiSAs {
	p := &apiSAs{g: g, path: filepath.Join(g.Config.StateDir, apiSAsFile), config: make(map[sa.ID]*sa.SA, len(g.Config.SAList))}
	for i := range g.Config.SAList {
		s := &g.Config.SAList[i]
		p.config[s.ID()] = s
	}
	return p
}

// restore loads the file into the SAD, after the config's SAs and before
// the first sync, so the restored SAs get their replay windows, bindings
// and counters (restorer) and sequence reservations like any other.
func (p *apiSAs) restore() (int, error) {
	sas, err := sastore.Load(p.path)
	if err != nil {
		return 0, fmt.Errorf("state_dir: %w (move the file away to start without the SAs added through the API)", err)
	}
	for i := range sas {
		s := sas[i]
		if _, err := p.g.SAD.Add(s); err != nil {
			if !errors.Is(err, sad.ErrExists) {
				return 0, fmt.Errorf("state_dir: API SA file %s: %s: %w", p.path, s.ID(), err)
			}
			if _, err := p.g.SAD.Update(s); err != nil {
				return 0, fmt.Errorf("state_dir: API SA file %s: %s: %w", p.path, s.ID(), err)
			}
		}
	}
	b, err := sastore.Encode(sas)
	if err == nil {
		p.mu.Lock()
		p.last = b
		p.mu.Unlock()
	}
	return len(sas), nil
}

// flush makes the file reflect the SAD at version or later. Concurrent
// callers share one write (the first one's covers the others' changes),
// so a burst of API calls costs far fewer writes than calls.
func (p *apiSAs) flush(version uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.saved >= version {
		return nil
	}
	// Read the version before listing: a change made while listing is
	// then written by the next flush (again), never skipped.
	v := p.g.SAD.Version()
	var etcd map[sa.ID]bool
	if p.etcd != nil {
		etcd = p.etcd.OwnedIDs()
	}
	var items [][]byte
	next := make(map[sa.ID]encoded, len(p.enc))
	var cur uint64
	for {
		p.buf, cur = p.g.SAD.List(cur, 4096, p.buf[:0])
		for i := range p.buf {
			e := &p.buf[i]
			if etcd[e.ID] {
				continue
			}
			if c := p.config[e.ID]; c != nil && reflect.DeepEqual(*c, e.SA) {
				continue
			}
			c, ok := p.enc[e.ID]
			if !ok || c.version != e.Version {
				b, err := sastore.EncodeSA(&e.SA)
				if err != nil {
					return err
				}
				c = encoded{version: e.Version, b: b}
			}
			next[e.ID] = c
			items = append(items, c.b)
		}
		if cur == 0 {
			break
		}
	}
	clear(p.buf) // do not keep key slices of deleted SAs alive
	p.enc = next // entries of SAs gone from the set are dropped
	b := sastore.Assemble(items)
	if !bytes.Equal(b, p.last) {
		if err := sastore.WriteFile(p.path, b); err != nil {
			return err
		}
		p.last = b
	}
	p.saved = v
	return nil
}
