package sad

import "hash/maphash"

// groupIndex finds a pairing group's first SA (its head: the others
// follow through nextPeer) by GroupKey. A map keyed by the 56-byte
// GroupKey cost ~100 bytes per group; this one is keyed by the key's
// 64-bit hash and holds only the head, which says its own key (group),
// so a lookup checks it. Groups whose hash slot another group holds —
// a collision, about one in 2^64/groups — go to ovf, by full key.
type groupIndex struct {
	hash   func(GroupKey) uint64 // tests force collisions
	byHash map[uint64]*entry
	ovf    map[GroupKey]*entry
}

func newGroupIndex() groupIndex {
	seed := maphash.MakeSeed()
	return groupIndex{
		hash:   func(k GroupKey) uint64 { return maphash.Comparable(seed, k) },
		byHash: make(map[uint64]*entry), ovf: make(map[GroupKey]*entry),
	}
}

// get returns the head of group k, nil when it has no SA.
func (x *groupIndex) get(k GroupKey) *entry {
	if e := x.byHash[x.hash(k)]; e != nil && e.group() == k {
		return e
	}
	if len(x.ovf) > 0 {
		return x.ovf[k]
	}
	return nil
}

// set makes head the head of group k (nil: the group is empty). The
// current head, if any, must still have key k (callers change an SA's
// fields after it left its group).
func (x *groupIndex) set(k GroupKey, head *entry) {
	h := x.hash(k)
	cur := x.byHash[h]
	switch {
	case cur != nil && cur.group() == k:
		if head == nil {
			delete(x.byHash, h)
		} else {
			x.byHash[h] = head
		}
	case cur == nil && x.ovf[k] == nil:
		if head != nil {
			x.byHash[h] = head
		}
	default: // the slot holds another group, or k went to ovf when it did
		if head == nil {
			delete(x.ovf, k)
		} else {
			x.ovf[k] = head
		}
	}
}
