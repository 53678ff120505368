// Package etcdseq keeps outbound sequence-number reservations in etcd, so
// that any gateway of a fleet can take an SA over without reusing a
// sequence number (and so an AES-GCM or ChaCha20-Poly1305 nonce) that
// another gateway sent. It gives the manager the same reserve-ahead
// contract as seqstore (KeyFor, Block, High, Reserve; seqstore.NextBlock
// is the policy) with one addition that a single machine never needed:
// exclusivity.
//
// Each SA's mark is one key, <prefix>/seq/k/<key hex>, whose value is the
// first sequence number nobody may send yet. A gateway learns the mark
// (High, a linearizable read) and then moves it up (Reserve) in an etcd
// transaction that succeeds only if the key still has the revision the
// gateway saw. Every successful Reserve therefore hands out the range
// [mark it saw, new mark) to exactly one gateway: two gateways that both
// saw mark H cannot both reserve above it, the second one's transaction
// fails (ErrConflict) and it installs nothing. The same check fences a
// gateway that lost an SA: once another has reserved past it, the first
// one's next extension fails and it stalls at its old mark instead of
// sending numbers the new owner also sends.
//
// Record keys are seqstore's (HMAC of identity and key material), under a
// secret all gateways share: <prefix>/seq/secret, created once by the
// first gateway in a create-if-absent transaction and never rewritten.
//
// etcd makes a write durable on a quorum before it acknowledges, so a
// reservation Reserve returned survives any minority of members and a
// crash of the gateway, as seqstore's fsync does on one disk. With etcd
// unreachable Reserve fails after its timeout: SAs keep sending within
// what they hold and new ones are not installed, never the other way.
package etcdseq

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/seqstore"
)

// ErrConflict: another gateway moved the mark since this one read or
// wrote it (it is seqstore.ErrFenced, which the manager does not retry).
var ErrConflict = seqstore.ErrFenced

// Options tune a Store.
type Options struct {
	// Prefix is the fleet's key prefix (config etcd.prefix), e.g. /xesp.
	Prefix string
	// Block is the reservation block (seqstore.NextBlock); default 1<<20.
	Block uint64
	// Timeout bounds each etcd round trip; default 5s.
	Timeout time.Duration
}

// maxOps keeps transactions under etcd's default --max-txn-ops (128):
// one compare and one put per key.
const maxOps = 64

// Store is the fleet-wide map from seqstore.Key to high-water mark.
type Store struct {
	cli   *clientv3.Client
	opts  Options
	keyer *seqstore.Keyer
	dir   string // <prefix>/seq/k/

	mu sync.Mutex
	// granted is each key's mark as this gateway last wrote it: the end
	// of the range it may send in. pending holds marks High read since
	// the last Reserve; that Reserve may build on them (the manager has
	// started those SAs above them), and consumes them all, so a read
	// never becomes the base of a later extension.
	granted map[seqstore.Key]mark
	pending map[seqstore.Key]mark
	// fetched holds marks Prefetch read for the High calls that follow.
	fetched map[seqstore.Key]mark
}

// mark is a key's value and its etcd mod revision (0: absent).
type mark struct {
	high uint64
	rev  int64
}

// Open reads (or, on a fleet's first gateway, creates) the shared key
// secret. The client stays the caller's.
func Open(ctx context.Context, cli *clientv3.Client, o Options) (*Store, error) {
	if o.Block == 0 {
		o.Block = 1 << 20
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	secretKey := o.Prefix + "/seq/secret"
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		return nil, fmt.Errorf("etcdseq: secret: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	dir := o.Prefix + "/seq/k/"
	// A secret is made only for a fleet without marks: marks whose
	// secret was deleted would otherwise be named anew, and every SA
	// would start over at 1 on the next takeover.
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(secretKey), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(dir), "=", 0).WithPrefix()).
		Then(clientv3.OpPut(secretKey, string(fresh))).
		Else(clientv3.OpGet(secretKey)).
		Commit()
	if err != nil {
		return nil, fmt.Errorf("etcdseq: read or create %s: %w", secretKey, err)
	}
	secret := fresh
	if !resp.Succeeded {
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) != 1 || len(kvs[0].Value) != 32 {
			// Never replaced: a new secret would restart every SA at 1.
			return nil, fmt.Errorf("etcdseq: %s holds no 32-byte secret but marks exist under %s: refusing to start over", secretKey, dir)
		}
		secret = bytes.Clone(kvs[0].Value)
	}
	return &Store{cli: cli, opts: o, keyer: seqstore.NewKeyer(secret), dir: dir,
		granted: make(map[seqstore.Key]mark), pending: make(map[seqstore.Key]mark),
		fetched: make(map[seqstore.Key]mark)}, nil
}

// Block is the reservation block size.
func (s *Store) Block() uint64 { return s.opts.Block }

// KeyFor is seqstore's key derivation under the fleet's secret.
func (s *Store) KeyFor(dir string, spi uint32, peer netip.AddrPort, proposal string, encKey, authKey []byte) seqstore.Key {
	return s.keyer.KeyFor(dir, spi, peer, proposal, encKey, authKey)
}

func (s *Store) etcdKey(k seqstore.Key) string { return s.dir + k.String() }

// High reads k's mark from etcd (linearizably, so a takeover sees the
// previous owner's last reservation); the next Reserve may build on it.
// When etcd cannot be read it returns the mark this gateway last wrote
// (0 and false if none), and the next Reserve can only succeed if the
// mark is still that.
func (s *Store) High(k seqstore.Key) (uint64, bool) {
	s.mu.Lock()
	if m, ok := s.fetched[k]; ok {
		delete(s.fetched, k)
		s.pending[k] = m
		s.mu.Unlock()
		return m.high, m.rev != 0
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.Timeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.etcdKey(k))
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		m, ok := s.granted[k]
		return m.high, ok
	}
	m := mark{}
	if len(resp.Kvs) == 1 {
		if m, err = parse(resp.Kvs[0].Value, resp.Kvs[0].ModRevision); err != nil {
			// Unreadable: build on nothing, so Reserve compares against
			// an absent key and fails rather than guess.
			delete(s.pending, k)
			return math.MaxUint64, true
		}
	}
	s.pending[k] = m
	return m.high, m.rev != 0
}

// Prefetch reads the marks of keys in transactions of 64 reads, so the
// High calls of an install batch that follow cost no round trip each (one
// round trip per SA would make loading 100k SAs take most of a minute).
// Keys it could not read are left to High.
func (s *Store) Prefetch(keys []seqstore.Key) {
	for len(keys) > 0 {
		n := min(len(keys), maxOps)
		chunk := keys[:n]
		keys = keys[n:]
		ops := make([]clientv3.Op, n)
		for i, k := range chunk {
			ops[i] = clientv3.OpGet(s.etcdKey(k))
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.Timeout)
		resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
		cancel()
		if err != nil {
			return
		}
		s.mu.Lock()
		for i, k := range chunk {
			m := mark{}
			if kvs := resp.Responses[i].GetResponseRange().Kvs; len(kvs) == 1 {
				var err error
				if m, err = parse(kvs[0].Value, kvs[0].ModRevision); err != nil {
					continue // High reads it again and refuses it
				}
			}
			s.fetched[k] = m
		}
		s.mu.Unlock()
	}
}

func parse(v []byte, rev int64) (mark, error) {
	h, err := strconv.ParseUint(string(v), 10, 64)
	if err != nil {
		return mark{}, fmt.Errorf("mark %q: %w", v, err)
	}
	return mark{high: h, rev: rev}, nil
}

// Reserve moves each key's mark up to its High, in transactions of up to
// 64 keys, each of which succeeds (all its keys) only if none of its keys
// moved since this gateway last read or wrote them. A reservation that
// would not raise the mark is refused too: the manager only asks for
// ranges above the mark it saw. A failed transaction refreshes this
// gateway's view of its keys and returns ErrConflict naming the moved
// ones. A batch of several transactions may land in part; the manager
// then installs nothing, and the numbers reserved are skipped, not reused.
func (s *Store) Reserve(batch []seqstore.Reservation) error {
	var errs []error
	for len(batch) > 0 {
		n := min(len(batch), maxOps)
		errs = append(errs, s.reserve(batch[:n])...)
		batch = batch[n:]
	}
	return errors.Join(errs...)
}

func (s *Store) reserve(batch []seqstore.Reservation) []error {
	cmps := make([]clientv3.Cmp, 0, len(batch))
	puts := make([]clientv3.Op, 0, len(batch))
	gets := make([]clientv3.Op, 0, len(batch))
	expect := make([]mark, len(batch))
	var errs []error
	s.mu.Lock()
	for i, r := range batch {
		m, ok := s.pending[r.Key]
		if !ok {
			m = s.granted[r.Key]
		}
		expect[i] = m
		if r.High <= m.high {
			errs = append(errs, fmt.Errorf("etcdseq: reserve %s up to %d: mark is already %d: %w", r.Key, r.High, m.high, ErrConflict))
			continue
		}
		key := s.etcdKey(r.Key)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", m.rev))
		puts = append(puts, clientv3.OpPut(key, strconv.FormatUint(r.High, 10)))
		gets = append(gets, clientv3.OpGet(key))
	}
	clear(s.pending)
	clear(s.fetched)
	s.mu.Unlock()
	if len(errs) > 0 {
		return errs
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.Timeout)
	defer cancel()
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(puts...).Else(gets...).Commit()
	if err != nil {
		return []error{fmt.Errorf("etcdseq: reserve %d keys: %w", len(batch), err)}
	}
	if resp.Succeeded {
		s.mu.Lock()
		for _, r := range batch {
			s.granted[r.Key] = mark{high: r.High, rev: resp.Header.Revision}
		}
		s.mu.Unlock()
		return nil
	}
	for i, r := range batch {
		now := "absent"
		if kvs := resp.Responses[i].GetResponseRange().Kvs; len(kvs) == 1 {
			if kvs[0].ModRevision == expect[i].rev {
				continue
			}
			now = string(kvs[0].Value)
		} else if expect[i].rev == 0 {
			continue
		}
		errs = append(errs, fmt.Errorf("etcdseq: reserve %s up to %d: built on mark %d, etcd has %s: %w",
			r.Key, r.High, expect[i].high, now, ErrConflict))
	}
	if len(errs) == 0 { // cannot happen: the compares failed on some key
		errs = append(errs, fmt.Errorf("etcdseq: reserve %d keys: %w", len(batch), ErrConflict))
	}
	return errs
}
