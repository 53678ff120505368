package etcdsrc

// SA records at rest in etcd are sealed: the SA's whole value (keys and
// all) is encrypted with AES-256-GCM under the fleet's key-encryption key
// (control/kek) and stored as
//
//	{"sealed":"xesp-kek/1","kid":"<key id>","data":"<base64 of nonce||ciphertext>"}
//
// The additional data binds the record to its SA name (the last element
// of its key), not to the node, so a fleet controller's Move copies the
// value verbatim while a record pasted under another name fails to open.
// A gateway with a KEK refuses records in clear (anyone able to write
// etcd could otherwise plant an SA with keys of their choosing) and
// records under a key id it does not hold; both are logged and counted.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xesp/xesp/control/kek"
	"github.com/xesp/xesp/control/sa"
)

const sealedFormat = "xesp-kek/1"

type sealedRecord struct {
	Sealed string `json:"sealed"`
	KID    string `json:"kid"`
	Data   []byte `json:"data"`
}

func recordAD(name string) []byte { return []byte("xesp etcd SA record\x00" + name) }

// ErrClear: a record is in clear where a KEK is configured.
var ErrClear = errors.New("stored in clear, but this gateway only accepts sealed SA records (etcd.kek_file is set): seal it with xesp fleet rekey-store")

// ErrNoKEK: a sealed record reached a gateway without a KEK.
var ErrNoKEK = errors.New("sealed, but this gateway has no etcd.kek_file")

// Seal returns the etcd value of the SA record plain (its JSON) named
// name, sealed under ring's current key.
func Seal(ring *kek.Ring, name string, plain []byte) []byte {
	kid, data := ring.Seal(plain, recordAD(name))
	b, _ := json.Marshal(sealedRecord{Sealed: sealedFormat, KID: kid, Data: data})
	return b
}

// sealedOf parses v as a sealed record; ok is false for anything else.
func sealedOf(v []byte) (sealedRecord, bool) {
	var r sealedRecord
	if b := bytes.TrimSpace(v); len(b) == 0 || b[0] != '{' || !bytes.Contains(b, []byte(`"sealed"`)) {
		return r, false
	}
	if json.Unmarshal(v, &r) != nil || r.Sealed == "" {
		return r, false
	}
	return r, true
}

// Unseal returns the SA record inside an etcd value: opened under ring
// when sealed, as it is when in clear and ring is nil. kid is the key id
// it was sealed under ("" in clear).
func Unseal(ring *kek.Ring, name string, v []byte) (plain []byte, kid string, err error) {
	r, sealed := sealedOf(v)
	switch {
	case !sealed && ring != nil:
		return nil, "", ErrClear
	case !sealed:
		return v, "", nil
	case r.Sealed != sealedFormat:
		return nil, r.KID, fmt.Errorf("sealed record format %q: this xesp reads %q", r.Sealed, sealedFormat)
	case ring == nil:
		return nil, r.KID, fmt.Errorf("%w (key id %q)", ErrNoKEK, r.KID)
	}
	plain, err = ring.Open(r.KID, r.Data, recordAD(name))
	return plain, r.KID, err
}

// PutSealed is Put with the record sealed under ring (nil: in clear).
func PutSealed(ctx context.Context, cli *clientv3.Client, ring *kek.Ring, prefix, node string, sp sa.Spec) error {
	if sp.Name == "" {
		return fmt.Errorf("etcdsrc: put SA %s: a name is required (it is the key)", sp.SPI)
	}
	b, err := json.Marshal(sp)
	if err != nil {
		return fmt.Errorf("etcdsrc: encode SA %q: %w", sp.Name, err)
	}
	if ring != nil {
		sealed := Seal(ring, sp.Name, b)
		clear(b)
		b = sealed
	}
	if _, err := cli.Put(ctx, SADir(prefix, node)+sp.Name, string(b)); err != nil {
		return fmt.Errorf("etcdsrc: put SA %q on %s: %w", sp.Name, node, err)
	}
	return nil
}

// RekeyResult says what Rekey did.
type RekeyResult struct {
	Resealed  int            // records rewritten under the current key
	Current   int            // records already under the current key, left alone
	ByKID     map[string]int // records found per key id before ("" in clear)
	Unknown   []string       // keys of records under an id the ring does not hold
	Malformed []string       // keys of records that did not open
}

// Rekey rewrites every SA record under prefix that is in clear or sealed
// under an older key id so it is sealed under ring's current key (xesp
// fleet rekey-store). Each rewrite is a transaction conditional on the
// record's revision, so a record changed meanwhile is left for the next
// run rather than overwritten with stale content. Records under unknown
// ids are reported, not touched.
func Rekey(ctx context.Context, cli *clientv3.Client, ring *kek.Ring, prefix string) (RekeyResult, error) {
	res := RekeyResult{ByKID: map[string]int{}}
	dir := prefix + "/nodes/"
	resp, err := cli.Get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return res, fmt.Errorf("etcdsrc: list %s: %w", dir, err)
	}
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		_, name, ok := cutSADir(key, dir)
		if !ok {
			continue
		}
		r, sealed := sealedOf(kv.Value)
		plain := kv.Value
		if sealed {
			res.ByKID[r.KID]++
			if r.KID == ring.Current() && r.Sealed == sealedFormat {
				res.Current++
				continue
			}
			if !ring.Has(r.KID) {
				res.Unknown = append(res.Unknown, key)
				continue
			}
			if plain, _, err = Unseal(ring, name, kv.Value); err != nil {
				res.Malformed = append(res.Malformed, key)
				continue
			}
		} else {
			res.ByKID[""]++
		}
		nv := Seal(ring, name, plain)
		if sealed {
			clear(plain)
		}
		t, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
			Then(clientv3.OpPut(key, string(nv))).Commit()
		if err != nil {
			return res, fmt.Errorf("etcdsrc: reseal %s: %w", key, err)
		}
		if t.Succeeded {
			res.Resealed++
		}
	}
	return res, nil
}

// cutSADir splits <dir><node>/sas/<name>.
func cutSADir(key, dir string) (node, name string, ok bool) {
	if len(key) <= len(dir) || key[:len(dir)] != dir {
		return "", "", false
	}
	rest := key[len(dir):]
	i := bytes.Index([]byte(rest), []byte("/sas/"))
	if i <= 0 || i+5 >= len(rest) {
		return "", "", false
	}
	return rest[:i], rest[i+5:], true
}
