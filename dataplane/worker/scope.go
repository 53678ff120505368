package worker

import (
	"runtime"
	"sync"
	"weak"
)

// scopes interns Scopes (Slot.SetScope): a million slots of one gateway
// share a few values, so each keeps a pointer instead of ~100 bytes. The
// table holds weak pointers and a value's entry goes with its last slot,
// so values that stop being used (an operator changed the core network)
// do not accumulate.
var scopes struct {
	mu   sync.Mutex
	m    map[Scope]weak.Pointer[Scope]
	last *Scope // the value interned last: config loads repeat one value
}

func intern(v Scope) *Scope {
	if v == noScope {
		return nil // reads as noScope (Slot.Scope)
	}
	scopes.mu.Lock()
	defer scopes.mu.Unlock()
	if l := scopes.last; l != nil && *l == v {
		return l
	}
	if w, ok := scopes.m[v]; ok {
		if p := w.Value(); p != nil {
			scopes.last = p
			return p
		}
	}
	if scopes.m == nil {
		scopes.m = make(map[Scope]weak.Pointer[Scope])
	}
	p := new(Scope)
	*p = v
	scopes.m[v] = weak.Make(p)
	scopes.last = p
	runtime.AddCleanup(p, forget, v)
	return p
}

// forget drops the entry of a value whose last user is gone, unless the
// value was interned again since (a new live pointer under the key).
func forget(v Scope) {
	scopes.mu.Lock()
	defer scopes.mu.Unlock()
	if w, ok := scopes.m[v]; ok && w.Value() == nil {
		delete(scopes.m, v)
	}
}
