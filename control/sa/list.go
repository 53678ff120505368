package sa

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
)

// Large SA files (a million phones is two million SAs, ~600 MB of JSON)
// are parsed item by item on every CPU: the document is cut into its
// items first (a bare JSON list's elements, or a JSON-lines file's lines),
// then each worker decodes, validates and types its share, and the
// duplicate check runs once over the result in file order. One decoder
// over the whole list cannot be shared out, and it grows its slice of
// Specs by copying: most of a config load's time before this.

// JSONL is the JSON-lines shape (`.jsonl`): one SA object per line, blank
// lines ignored. Provisioning systems write it as a stream, and every
// error names its line.
const JSONL Format = JSON + 1

// item is one SA of a list: data[off:end], starting on line.
type item struct {
	off, end int
	line     int
}

// ItemError is one problem of one item of a list (ParseList): Index is
// the item's position from 0, Line the document line it starts on.
type ItemError struct {
	Index, Line int
	Err         error
}

func (e *ItemError) Error() string { return fmt.Sprintf("[%d]: %v", e.Index, e.Err) }
func (e *ItemError) Unwrap() error { return e.Err }

// ParseList parses a bare JSON list of SAs (or, with JSONL, one SA per
// line) as ParseBytes does, but reports every problem with the index of
// the item it belongs to, for callers that name items by position (a
// batch request). ok is false when data is not such a list at all (not
// a list, or not well-formed JSON): err then says why, as ParseBytes
// would. The SAs returned are those that validated, in order.
func ParseList(data []byte, f Format, opts Options) (sas []SA, idx []int, errs []*ItemError, err error) {
	var items []item
	switch f {
	case JSONL:
		items = splitLines(data)
	case JSON:
		var ok bool
		if items, ok = splitList(data); !ok {
			_, err := ParseBytes(data, JSON, opts)
			if err == nil {
				err = errors.New("want a JSON list of SAs")
			}
			return nil, nil, nil, err
		}
	default:
		return nil, nil, nil, fmt.Errorf("unknown list format %d", f)
	}
	all, res, fatal := parseItems(data, items, f, opts)
	if fatal != nil {
		return nil, nil, nil, fatal
	}
	for i := range res {
		for _, e := range res[i].errs {
			errs = append(errs, &ItemError{Index: i, Line: items[i].line, Err: e})
		}
	}
	var d dedup
	label := func(p int) string { return fmt.Sprintf("[%d] %s", idx[p], all[p].Label()) }
	n := 0
	for i := range res {
		if !res[i].ok {
			continue
		}
		if !d.addNew(&all[i], n) {
			if e := d.add(&all[i], n, all[i].Label(), label); e != nil {
				errs = append(errs, &ItemError{Index: i, Line: items[i].line, Err: e})
				continue
			}
		}
		if n != i {
			all[n] = all[i]
		}
		idx = append(idx, i)
		n++
	}
	clear(all[n:])
	return all[:n:n], idx, errs, nil
}

// parseListBytes is ParseBytes for a bare JSON list or a JSON-lines
// document. handled is false when data is not a well-formed list: the
// sequential decoder then produces the canonical message.
func parseListBytes(data []byte, f Format, opts Options) (sas []SA, err error, handled bool) {
	var items []item
	if f == JSONL {
		items = splitLines(data)
	} else {
		var ok bool
		if items, ok = splitList(data); !ok {
			return nil, nil, false
		}
	}
	all, res, fatal := parseItems(data, items, f, opts)
	if fatal != nil {
		if f == JSON {
			return nil, nil, false
		}
		return nil, fatal, true
	}
	// The decoder's complaints first, then validation, as ParseBytes
	// orders them.
	var errs []error
	for i := range res {
		errs = append(errs, res[i].errs[:res[i].nDec]...)
	}
	for i := range res {
		errs = append(errs, res[i].errs[res[i].nDec:]...)
	}
	label := func(p int) string { return all[p].Label() }
	d := dedup{ids: make(map[Key]int, len(res)), names: make(map[string]int)}
	// The valid SAs move down over the invalid ones, in place.
	n := 0
	for i := range res {
		if !res[i].ok {
			continue
		}
		// A label is made only for a duplicate: not for a million SAs.
		if !d.addNew(&all[i], n) {
			if e := d.add(&all[i], n, all[i].Label(), label); e != nil {
				errs = append(errs, e)
				continue
			}
		}
		if n != i {
			all[n] = all[i]
		}
		n++
	}
	clear(all[n:]) // no keys left behind in the tail
	return all[:n:n], errors.Join(errs...), true
}

// result is what parsing one item found besides its SA: whether the SA
// is valid, else its errors (the decoder's first, nDec of them). The SAs
// themselves go straight into one []SA (300 bytes each: at two million
// SAs every copy of the list costs).
type result struct {
	ok   bool
	nDec int
	errs []error
}

// parseItems decodes and validates every item on every CPU. A syntax
// error is fatal (the document is not what it claims), as with the
// sequential decoder.
func parseItems(data []byte, items []item, f Format, opts Options) ([]SA, []result, error) {
	sas := make([]SA, len(items))
	res := make([]result, len(items))
	workers := min(runtime.GOMAXPROCS(0), max(1, len(items)/256))
	const chunk = 1024
	var next, fatalAt int
	var mu sync.Mutex
	var fatal error
	fatalAt = len(items)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One Spec per goroutine, reset per item: not 300 bytes of
			// garbage for each of a million SAs (the SA keeps nothing of
			// it but strings).
			var sp Spec
			var scratch specScratch
			for {
				mu.Lock()
				lo := next
				next += chunk
				stop := fatal != nil
				mu.Unlock()
				if lo >= len(items) || stop {
					return
				}
				for i := lo; i < min(lo+chunk, len(items)); i++ {
					if err := parseItem(data, &items[i], i, f, opts, &sp, &scratch, &sas[i], &res[i]); err != nil {
						mu.Lock()
						if i < fatalAt {
							fatal, fatalAt = err, i
						}
						mu.Unlock()
						break
					}
				}
			}
		}()
	}
	wg.Wait()
	return sas, res, fatal
}

// parseItem fills r from data[it.off:it.end], decoding into sp and
// scratch (reset here, reused for the next item); the error is a syntax
// error.
func parseItem(data []byte, it *item, i int, f Format, opts Options, sp *Spec, scratch *specScratch, out *SA, r *result) error {
	b := data[it.off:it.end]
	*sp = Spec{}
	var err error
	var dec *json.Decoder
	if !fastSpec(b, sp, scratch) {
		// Anything the plain form does not cover, and every error, is
		// encoding/json's to decide and to word (fastjson.go).
		*sp = Spec{}
		dec = json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		err = dec.Decode(sp)
	}
	if err != nil {
		if fatal := decodeError(err, b, it, r); fatal != nil {
			return fatal
		}
	}
	if err == nil && dec != nil && dec.More() {
		return fmt.Errorf("line %d: data after the JSON value", it.line)
	}
	r.nDec = len(r.errs)
	o := opts
	o.Label = ""
	if f != JSONL && sp.Name == "" {
		if _, e := sp.SPI.Value(); e != nil {
			o.Label = "sas[" + strconv.Itoa(i) + "]"
		}
	}
	s, perr := sp.Parse(o)
	if perr != nil && f == JSONL {
		// A line names its SA in a file of a million: "line 7
		// 0x00001001". The label is made only for an SA with errors:
		// parsed again with it, the same checks word the same messages.
		o.Label = "line " + strconv.Itoa(it.line)
		s, perr = sp.Parse(o)
	}
	if perr != nil {
		r.errs = append(r.errs, flatten(perr)...)
		return nil
	}
	*out, r.ok = s, true
	return nil
}

// decodeError sorts encoding/json's error for item it (text b): a type
// error or an unknown field is the item's (added to r.errs, nil
// returned); anything else, a syntax error first, is returned: the
// document cannot be read past it. Apart from parseItem so that its
// error targets are not allocated for every item that decodes.
func decodeError(err error, b []byte, it *item, r *result) error {
	var se *json.SyntaxError
	var ue *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Errorf("line %d: %v", it.line+bytes.Count(b[:min(int(se.Offset), len(b))], []byte("\n")), se)
	case errors.As(err, &ue):
		r.errs = append(r.errs, fmt.Errorf("line %d: %s", it.line+bytes.Count(b[:min(int(ue.Offset), len(b))], []byte("\n")), DescribeJSONTypeError(ue)))
	case strings.HasPrefix(err.Error(), "json: unknown field"):
		r.errs = append(r.errs, fmt.Errorf("line %d: %s", it.line, strings.TrimPrefix(err.Error(), "json: ")))
	default:
		return fmt.Errorf("line %d: %w", it.line, err)
	}
	return nil
}

// splitLines cuts a JSON-lines document into its non-blank lines.
func splitLines(data []byte) []item {
	items := make([]item, 0, bytes.Count(data, []byte("\n"))+1)
	off, line := 0, 1
	if bytes.HasPrefix(data, []byte("\xef\xbb\xbf")) {
		off = 3
	}
	for off < len(data) {
		end := bytes.IndexByte(data[off:], '\n')
		if end < 0 {
			end = len(data)
		} else {
			end += off
		}
		if len(bytes.TrimSpace(data[off:end])) > 0 {
			items = append(items, item{off: off, end: end, line: line})
		}
		off, line = end+1, line+1
	}
	return items
}

// splitList cuts a bare JSON list of objects into its elements. It
// tracks only strings and nesting, so it is cheap; anything it does not
// expect (another top-level value, an element that is not an object,
// unbalanced brackets, trailing data) says "not a list", and the
// sequential decoder then reports the problem as it always has.
func splitList(data []byte) ([]item, bool) {
	i, line := 0, 1
	if bytes.HasPrefix(data, []byte("\xef\xbb\xbf")) {
		i = 3
	}
	ws := func() {
		for i < len(data) {
			switch data[i] {
			case '\n':
				line++
			case ' ', '\t', '\r':
			default:
				return
			}
			i++
		}
	}
	ws()
	if i == len(data) || data[i] != '[' {
		return nil, false
	}
	i++
	// About 300 bytes an SA: a good first guess saves the regrowths.
	items := make([]item, 0, len(data)/256+1)
	ws()
	if i < len(data) && data[i] == ']' {
		i++
		ws()
		return items, i == len(data)
	}
	for {
		ws()
		if i == len(data) || data[i] != '{' {
			return nil, false
		}
		it := item{off: i, line: line}
		depth := 0
	scan:
		for i < len(data) {
			switch data[i] {
			case '"':
				// Jump to the closing quote, skipping escaped ones.
				for i++; ; i++ {
					j := bytes.IndexAny(data[i:], "\"\\\n")
					if j < 0 {
						return nil, false
					}
					i += j
					if data[i] == '\n' {
						return nil, false // raw newlines are not JSON
					}
					if data[i] == '"' {
						break
					}
					if i+1 >= len(data) {
						return nil, false // a backslash ends the input
					}
					i++ // the escaped byte
				}
			case '\n':
				line++
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					i++
					break scan
				}
			}
			i++
		}
		if depth != 0 {
			return nil, false
		}
		it.end = i
		items = append(items, it)
		ws()
		if i == len(data) {
			return nil, false
		}
		switch data[i] {
		case ',':
			i++
		case ']':
			i++
			ws()
			return items, i == len(data)
		default:
			return nil, false
		}
	}
}

// dedup is Dedup by item position: the label of an item is made only
// when a message needs it, not for each of a million SAs.
type dedup struct {
	names map[string]int
	// ids are keyed by the compact, pointer-free Key: hashed as 24 plain
	// bytes, not field by field with an address's zone handle.
	ids map[Key]int
	// dropped are the labels of SAs refused as duplicates whose other
	// key was new: recorded at position -1-i, so a third SA repeating
	// that key is reported naming them.
	dropped []string
}

// addNew records s at position pos if it repeats no name or identity
// already added, with one lookup and one insert per key (a million SAs
// pass here); it returns false, recording nothing, for a repeat, which
// add then words.
func (d *dedup) addNew(s *SA, pos int) bool {
	if d.ids == nil {
		d.names = make(map[string]int)
		d.ids = make(map[Key]int)
	}
	id := s.ID().Key()
	if _, dup := d.ids[id]; dup {
		return false
	}
	if s.Name != "" {
		if _, dup := d.names[s.Name]; dup {
			return false
		}
		d.names[s.Name] = pos
	}
	d.ids[id] = pos
	return true
}

// add records s, which is kept at position pos unless add returns an
// error; self names s, and label(p) the SA kept at an earlier position p.
func (d *dedup) add(s *SA, pos int, self string, label func(int) string) error {
	if d.names == nil {
		d.names = make(map[string]int)
		d.ids = make(map[Key]int)
	}
	name := func(p int) string {
		if p < 0 {
			return d.dropped[-1-p]
		}
		return label(p)
	}
	var errs []error
	newName, newID := false, false
	if s.Name != "" {
		if other, dup := d.names[s.Name]; dup {
			errs = append(errs, &FieldError{SA: self, Field: "name", Reason: fmt.Sprintf("%q is also used by %s", s.Name, name(other))})
		} else {
			newName = true
		}
	}
	id := s.ID()
	if other, dup := d.ids[id.Key()]; dup {
		errs = append(errs, &FieldError{SA: self, Field: "spi", Reason: fmt.Sprintf("%s is also used by %s", id, name(other))})
	} else {
		newID = true
	}
	if len(errs) > 0 {
		d.dropped = append(d.dropped, self)
		pos = -len(d.dropped)
	}
	if newName {
		d.names[s.Name] = pos
	}
	if newID {
		d.ids[id.Key()] = pos
	}
	return errors.Join(errs...)
}
