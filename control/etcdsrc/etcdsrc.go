// Package etcdsrc makes an etcd cluster a source of SAs for one gateway of
// a fleet. The SAs assigned to gateway <node> are the keys under
//
//	<prefix>/nodes/<node>/sas/<name>
//
// each holding one SA in the SA format (a single-SA YAML or JSON
// document, as in an SA file or an API request; keys inline, key files
// refused). Handing a phone to another gateway is moving its keys from
// one node's directory to the other's in one transaction (Move).
//
// The Source lists the directory, applies it to the SAD, then follows a
// watch from the listing's revision, so it sees every change exactly once
// and in order. When the watch breaks (etcd down, compaction, a leader
// change) it lists again and reconciles: keys that went away are deleted,
// changed ones updated, unchanged ones left alone. While etcd is away the
// SAD keeps what it had, so the data path keeps forwarding, and nothing
// that changed in etcd meanwhile is missed, because the reconciliation
// compares against the whole directory.
//
// It owns only the SAs it added: SAs from the config file or the API are
// never touched, and an etcd SA that clashes with one of them is rejected
// and counted, as a bad value is.
package etcdsrc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sa"
	"github.com/xesp/xesp/control/sad"
)

// Options wire a Source.
type Options struct {
	Client *clientv3.Client
	Prefix string // e.g. /xesp
	Node   string
	SAD    *sad.SAD
	// Check rejects SAs the gateway cannot serve (config.CheckSA).
	Check func(*sa.SA) error
	Log   *slog.Logger
	// Timeout bounds a listing; Retry is the pause after a failed one.
	Timeout, Retry time.Duration
	// KEK opens sealed records (seal.go); with it, records in clear are
	// refused. nil: records must be in clear (a lab's etcd.insecure).
	KEK *kek.Ring
}

// Stats count what the source did.
type Stats struct {
	Applied  atomic.Uint64 // adds and updates that reached the SAD
	Deleted  atomic.Uint64
	Rejected atomic.Uint64 // values that did not parse or did not fit
	Listings atomic.Uint64 // full listings: 1 at start, +1 per reconnect
	Revision atomic.Int64  // the etcd revision the SAD reflects
	// UnknownKey counts records sealed under a key id this gateway's
	// KEK file lacks; Unsealable those that are in clear where a KEK is
	// required, sealed where none is configured, or do not authenticate.
	// Both are also in Rejected.
	UnknownKey atomic.Uint64
	Unsealable atomic.Uint64
}

// Source follows one node's SA directory into a SAD.
type Source struct {
	o     Options
	dir   string
	log   *slog.Logger
	Stats Stats

	mu    sync.Mutex
	owned map[string]owned // etcd key → the SA it gave
	ready chan struct{}
	once  sync.Once
}

type owned struct {
	id  sa.ID
	rev int64 // ModRevision of the value applied
}

// SADir is the key directory of node's SAs.
func SADir(prefix, node string) string { return prefix + "/nodes/" + node + "/sas/" }

// New returns a Source; Run starts it.
func New(o Options) (*Source, error) {
	if o.Client == nil || o.SAD == nil || o.Node == "" || !strings.HasPrefix(o.Prefix, "/") {
		return nil, errors.New("etcdsrc: client, SAD, node and an absolute prefix are required")
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Retry <= 0 {
		o.Retry = 500 * time.Millisecond
	}
	return &Source{o: o, dir: SADir(o.Prefix, o.Node), log: o.Log.With("etcd_node", o.Node),
		owned: make(map[string]owned), ready: make(chan struct{})}, nil
}

// Ready is closed once the first listing has been applied.
func (s *Source) Ready() <-chan struct{} { return s.ready }

// Run follows the directory until ctx ends.
func (s *Source) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		rev, err := s.list(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			s.log.Warn("etcd: list SAs failed; keeping the SAs loaded and retrying", "err", err)
			sleep(ctx, s.o.Retry)
			continue
		}
		s.once.Do(func() { close(s.ready) })
		err = s.watch(ctx, rev)
		if ctx.Err() != nil {
			break
		}
		s.log.Warn("etcd: watch ended; listing again", "err", err, "revision", rev)
		sleep(ctx, s.o.Retry)
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// list reads the whole directory and reconciles the SAD with it.
func (s *Source) list(ctx context.Context) (int64, error) {
	lctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	resp, err := s.o.Client.Get(lctx, s.dir, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("get %s*: %w", s.dir, err)
	}
	s.Stats.Listings.Add(1)
	present := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		present[string(kv.Key)] = true
		s.put(kv)
	}
	s.mu.Lock()
	var gone []string
	for k := range s.owned {
		if !present[k] {
			gone = append(gone, k)
		}
	}
	s.mu.Unlock()
	for _, k := range gone {
		s.remove(k)
	}
	s.Stats.Revision.Store(resp.Header.Revision)
	return resp.Header.Revision, nil
}

// watch applies events after rev until the watch breaks.
func (s *Source) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := s.o.Client.Watch(wctx, s.dir, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return err
		}
		for _, ev := range resp.Events {
			switch ev.Type {
			case mvccpb.PUT:
				s.put(ev.Kv)
			case mvccpb.DELETE:
				s.remove(string(ev.Kv.Key))
			}
		}
		s.Stats.Revision.Store(resp.Header.Revision)
	}
	return errors.New("watch channel closed")
}

// put applies one key's value: add, update in place (same identity), or
// replace (identity changed under the same key).
func (s *Source) put(kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	s.mu.Lock()
	prev, had := s.owned[key]
	s.mu.Unlock()
	if had && prev.rev == kv.ModRevision {
		return // unchanged since it was applied (a relisting)
	}
	v, err := s.parse(key, kv.Value)
	if err != nil {
		s.Stats.Rejected.Add(1)
		s.log.Error("etcd: SA rejected", "key", key, "err", err)
		// The key no longer describes the SA it gave: keeping that one
		// would serve a phone the directory no longer vouches for.
		if had {
			s.remove(key)
		}
		return
	}
	id := v.ID()
	if had && prev.id != id {
		s.remove(key)
	}
	// Owned before it is in the SAD, so OwnedIDs never misses an SA of
	// etcd's (the gateway must not persist those as its own).
	s.mu.Lock()
	s.owned[key] = owned{id: id, rev: 0}
	s.mu.Unlock()
	if had && prev.id == id {
		_, err = s.o.SAD.Update(v)
		if errors.Is(err, sad.ErrNotFound) { // deleted through the API meanwhile
			_, err = s.o.SAD.Add(v)
		}
	} else {
		_, err = s.o.SAD.Add(v)
	}
	s.mu.Lock()
	switch {
	case err != nil && had && prev.id == id:
		s.owned[key] = prev // the SA it gave before is still in the SAD
	case err != nil:
		delete(s.owned, key)
	default:
		s.owned[key] = owned{id: id, rev: kv.ModRevision}
	}
	s.mu.Unlock()
	if err != nil {
		s.Stats.Rejected.Add(1)
		s.log.Error("etcd: SA not loaded", "key", key, "err", err)
		return
	}
	s.Stats.Applied.Add(1)
}

func (s *Source) parse(key string, value []byte) (sa.SA, error) {
	name := strings.TrimPrefix(key, s.dir)
	value, kid, err := Unseal(s.o.KEK, name, value)
	if err != nil {
		if errors.Is(err, kek.ErrUnknownKey) {
			s.Stats.UnknownKey.Add(1)
		} else {
			s.Stats.Unsealable.Add(1)
		}
		return sa.SA{}, err
	}
	if kid != "" {
		// The plaintext holds keys: do not keep it past parsing.
		defer clear(value)
	}
	f := sa.YAML
	if b := bytes.TrimSpace(value); len(b) > 0 && b[0] == '{' {
		f = sa.JSON
	}
	list, err := sa.ParseBytes(value, f, sa.Options{})
	if err != nil {
		return sa.SA{}, err
	}
	if len(list) != 1 {
		return sa.SA{}, fmt.Errorf("holds %d SAs: one key, one SA", len(list))
	}
	if name := strings.TrimPrefix(key, s.dir); list[0].Name != "" && list[0].Name != name {
		return sa.SA{}, fmt.Errorf("name %q differs from the key's %q", list[0].Name, name)
	}
	if s.o.Check != nil {
		if err := s.o.Check(&list[0]); err != nil {
			return sa.SA{}, err
		}
	}
	return list[0], nil
}

func (s *Source) remove(key string) {
	s.mu.Lock()
	o, ok := s.owned[key]
	delete(s.owned, key)
	s.mu.Unlock()
	if !ok {
		return
	}
	if _, err := s.o.SAD.Delete(o.id); err != nil && !errors.Is(err, sad.ErrNotFound) {
		s.log.Error("etcd: delete SA", "key", key, "err", err)
		return
	}
	s.Stats.Deleted.Add(1)
}

// Owned returns how many SAs the source has in the SAD.
func (s *Source) Owned() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.owned)
}

// OwnedIDs returns the identities of the SAs the source gave the SAD
// (including one it is adding right now).
func (s *Source) OwnedIDs() map[sa.ID]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[sa.ID]bool, len(s.owned))
	for _, o := range s.owned {
		out[o.id] = true
	}
	return out
}

// lastParseError re-parses a value the way put does (for tests and
// tools that want the reason a key was rejected).
func (s *Source) lastParseError(key, value string) error {
	_, err := s.parse(key, []byte(value))
	return err
}
