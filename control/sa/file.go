package sa

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/xesp/xesp/internal/safefile"
	"io"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"unicode"

	"gopkg.in/yaml.v3"
)

// Format is the encoding of an SA file or request body.
type Format uint8

// The accepted encodings.
const (
	YAML Format = iota + 1
	JSON
)

// FormatOf picks the format from a file name's extension.
func FormatOf(path string) (Format, error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".yaml", ".yml":
		return YAML, nil
	case ".json":
		return JSON, nil
	case ".jsonl":
		return JSONL, nil
	}
	return 0, fmt.Errorf("%s: unknown extension %q: use .yaml, .yml, .json or .jsonl", path, filepath.Ext(path))
}

// MaxSAFileSize bounds one SA file: about 2 million SAs in YAML.
const MaxSAFileSize = 1 << 30

// ParseFile reads an SA file. Three shapes are accepted, so a file written
// for one SA needs no wrapper and a config's `sas:` block can be moved out
// unchanged:
//
//	sas: [ {...}, {...} ]   # the config file's shape
//	[ {...}, {...} ]        # a bare list
//	{...}                   # a single SA
//
// Key files named inside are relative to the file's directory. Every
// error of the file is returned at once, each prefixed with the path,
// along with the SAs that did validate.
func ParseFile(path string, opts Options) ([]SA, error) {
	f, err := FormatOf(path)
	if err != nil {
		return nil, err
	}
	data, err := safefile.Read(path, MaxSAFileSize)
	if err != nil {
		return nil, fmt.Errorf("read SA file: %w", err)
	}
	opts.KeyFileDir = filepath.Dir(path)
	sas, err := ParseBytes(data, f, opts)
	if err != nil {
		return sas, prefixErrors(path, err)
	}
	return sas, nil
}

// prefixErrors puts prefix in front of each joined error, keeping them
// reachable with errors.As.
func prefixErrors(prefix string, err error) error {
	var errs []error
	for _, e := range flatten(err) {
		errs = append(errs, fmt.Errorf("%s: %w", prefix, e))
	}
	return errors.Join(errs...)
}

// flatten undoes errors.Join, recursively.
func flatten(err error) []error {
	if err == nil {
		return nil
	}
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []error{err}
	}
	var out []error
	for _, e := range j.Unwrap() {
		out = append(out, flatten(e)...)
	}
	return out
}

// Flatten returns the individual errors inside errors.Join trees, for
// callers that prefix or count them.
func Flatten(err error) []error { return flatten(err) }

// shape decodes every accepted file shape in one pass: a mapping fills
// either SAs (wrapper) or the inlined Spec (single SA).
type shape struct {
	SAs  []Spec `yaml:"sas" json:"sas"`
	Spec `yaml:",inline"`
}

// ParseBytes parses an SA document (see ParseFile for the shapes). It
// never reads key files unless opts.KeyFileDir is set. With an error it
// still returns the SAs that did validate, so a caller can check them
// against other sources and report everything in one pass.
func ParseBytes(data []byte, f Format, opts Options) (sas []SA, err error) {
	if f == JSONL || f == JSON && isList(data, f) {
		// Item by item on every CPU (list.go).
		if sas, err, ok := parseListBytes(data, f, opts); ok {
			return sas, err
		}
	}
	specs, decErrs, fatal := decodeSpecs(data, f)
	if fatal != nil {
		return nil, fatal
	}
	errs := decErrs
	var d Dedup
	for i := range specs {
		sp := &specs[i]
		o := opts
		o.Label = ""
		if _, e := sp.SPI.Value(); sp.Name == "" && e != nil {
			o.Label = fmt.Sprintf("sas[%d]", i)
		}
		s, err := sp.Parse(o)
		if err != nil {
			errs = append(errs, flatten(err)...)
			continue
		}
		if err := d.Add(&s, labelFor(sp, o.Label)); err != nil {
			errs = append(errs, flatten(err)...)
			continue
		}
		sas = append(sas, s)
	}
	return sas, errors.Join(errs...)
}

// decodeSpecs returns the specs, the decoder's own complaints (unknown
// fields, wrong types; the rest of the document was still decoded) and a
// fatal error when nothing usable came out.
func decodeSpecs(data []byte, f Format) (specs []Spec, errs []error, fatal error) {
	// The YAML and JSON decoders are complex; a bug in them must not take
	// the daemon down on a bad API request.
	defer func() {
		if r := recover(); r != nil {
			specs, errs, fatal = nil, nil, fmt.Errorf("decoder failed on this input: %v", r)
		}
	}()
	list := isList(data, f)
	var sh shape
	switch f {
	case YAML:
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		var err error
		if list {
			err = dec.Decode(&specs)
		} else {
			err = dec.Decode(&sh)
		}
		var te *yaml.TypeError
		switch {
		case errors.Is(err, io.EOF):
			return nil, nil, errors.New("empty document: no SA")
		case errors.As(err, &te):
			for _, m := range te.Errors {
				errs = append(errs, errors.New(rewriteYAMLError(m)))
			}
		case err != nil:
			return nil, nil, err
		}
		var extra yaml.Node
		if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
			return nil, nil, errors.New("more than one YAML document: put all SAs in one list")
		}
	case JSON:
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		var err error
		if list {
			err = dec.Decode(&specs)
		} else {
			err = dec.Decode(&sh)
		}
		var se *json.SyntaxError
		var ue *json.UnmarshalTypeError
		switch {
		case errors.Is(err, io.EOF):
			return nil, nil, errors.New("empty document: no SA")
		case errors.As(err, &se):
			return nil, nil, fmt.Errorf("line %d: %v", lineOf(data, se.Offset), se)
		case errors.As(err, &ue):
			errs = append(errs, fmt.Errorf("line %d: %s", lineOf(data, ue.Offset), DescribeJSONTypeError(ue)))
		case err != nil && strings.HasPrefix(err.Error(), "json: unknown field"):
			errs = append(errs, fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "json: ")))
		case err != nil:
			return nil, nil, fmt.Errorf("json: %w", err)
		}
		if err == nil {
			if _, err := dec.Token(); !errors.Is(err, io.EOF) {
				return nil, nil, fmt.Errorf("line %d: data after the JSON value", lineOf(data, dec.InputOffset()))
			}
		}
	default:
		return nil, nil, fmt.Errorf("unknown format %d", f)
	}
	if list {
		return specs, errs, nil
	}
	if sh.SAs != nil && sh.Spec != (Spec{}) {
		return nil, nil, errors.New("a document is either `sas: [...]` or a single SA, not both")
	}
	if sh.SAs != nil {
		return sh.SAs, errs, nil
	}
	if sh.Spec == (Spec{}) {
		if len(errs) == 0 {
			return nil, nil, errors.New("empty document: no SA")
		}
		return nil, errs, nil
	}
	return []Spec{sh.Spec}, errs, nil
}

// isList looks at the first significant character: the accepted shapes
// differ there, which saves decoding a million SAs twice.
func isList(data []byte, f Format) bool {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	for len(data) > 0 {
		line := data
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			data = nil
		}
		t := bytes.TrimSpace(line)
		if f == YAML {
			// A document marker may carry content on its own line.
			if bytes.HasPrefix(t, []byte("---")) {
				t = bytes.TrimSpace(t[3:])
			}
			if len(t) == 0 || t[0] == '#' || t[0] == '%' {
				continue
			}
			return t[0] == '[' || t[0] == '-' && (len(t) == 1 || t[1] == ' ' || t[1] == '\t')
		}
		if len(t) == 0 {
			continue
		}
		return t[0] == '['
	}
	return false
}

var yamlUnknownField = regexp.MustCompile(`field (\S+) not found in type \S+`)

func rewriteYAMLError(m string) string {
	return yamlUnknownField.ReplaceAllString(m, `unknown field "$1"`)
}

func lineOf(data []byte, off int64) int {
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	if off < 0 {
		off = 0
	}
	return 1 + bytes.Count(data[:off], []byte("\n"))
}

// Dedup reports names and identities used twice across SA sources (the
// inline SAs of a config and its SA files, say) before any reaches a SAD.
// The rules are the SAD's: names unique; inbound SPIs unique; outbound
// (SPI, peer, peer port) unique. The zero value is ready to use.
type Dedup struct {
	names map[string]string
	ids   map[ID]string
}

// Add records s, named where in messages, or says whom it collides with.
func (d *Dedup) Add(s *SA, where string) error {
	if d.names == nil {
		d.names = make(map[string]string)
		d.ids = make(map[ID]string)
	}
	// Each key is recorded when first seen even if the other collides, so
	// a third SA repeating either is reported too.
	var errs []error
	if s.Name != "" {
		if other, dup := d.names[s.Name]; dup {
			errs = append(errs, &FieldError{SA: where, Field: "name", Reason: fmt.Sprintf("%q is also used by %s", s.Name, other)})
		} else {
			d.names[s.Name] = where
		}
	}
	id := s.ID()
	if other, dup := d.ids[id]; dup {
		errs = append(errs, &FieldError{SA: where, Field: "spi", Reason: fmt.Sprintf("%s is also used by %s", id, other)})
	} else {
		d.ids[id] = where
	}
	return errors.Join(errs...)
}

// DescribeJSONTypeError says which JSON field had a value of the wrong
// type and what it takes, in the names a request or file uses: never Go's
// struct or type names ("Spec.enc_key", "uint32"), which mean nothing to
// whoever wrote the JSON.
func DescribeJSONTypeError(ue *json.UnmarshalTypeError) string {
	var path []string
	for _, p := range strings.Split(ue.Field, ".") {
		// Go puts the names of embedded structs in the path; JSON names
		// here are lower-case.
		if p != "" && !unicode.IsUpper(rune(p[0])) {
			path = append(path, p)
		}
	}
	field := strings.Join(path, ".")
	if field == "" {
		field = "body"
	}
	want := "another type"
	if ue.Type != nil {
		switch ue.Type.Kind() {
		case reflect.String:
			want = "a string"
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
			want = "an integer"
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			want = fmt.Sprintf("an integer from 0 to %d", uint64(1)<<(ue.Type.Bits())-1)
		case reflect.Float32, reflect.Float64:
			want = "a number"
		case reflect.Bool:
			want = "true or false"
		case reflect.Slice, reflect.Array:
			want = "a list"
		case reflect.Struct, reflect.Map:
			want = "an object"
		}
	}
	return fmt.Sprintf("%s: a JSON %s where %s is wanted", field, ue.Value, want)
}
