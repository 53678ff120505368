package sa

import (
	"net/netip"
	"reflect"
	"testing"
)

// TestEqualSeesEveryField changes each field of a full SA in turn, down
// to the fields of its structs, and checks that Equal tells the two
// apart, as reflect.DeepEqual does: a field added to SA and forgotten by
// Equal fails here.
func TestEqualSeesEveryField(t *testing.T) {
	sp := base()
	sp.Encap = &EncapSpec{LocalPort: u16(4500), PeerPort: u16(4500)}
	a, err := sp.Parse(Options{})
	if err != nil {
		t.Fatal(err)
	}
	a.Name, a.Pair, a.AuthKey = "ue1-in", "ue1", Secret{1, 2, 3}
	if a.Encap == nil {
		t.Fatal("the base SA has no encapsulation: the pointer field goes unchecked")
	}
	clone := func(s SA) SA {
		s.EncKey, s.AuthKey = append(Secret(nil), s.EncKey...), append(Secret(nil), s.AuthKey...)
		e := *s.Encap
		s.Encap = &e
		return s
	}
	if b := clone(a); !a.Equal(&b) {
		t.Fatal("an SA differs from its deep copy")
	}
	changed := 0
	var walk func(path string, get func(s *SA) reflect.Value, typ reflect.Type)
	walk = func(path string, get func(s *SA) reflect.Value, typ reflect.Type) {
		if typ.Kind() == reflect.Struct && typ.PkgPath() != "net/netip" {
			for i := range typ.NumField() {
				f := typ.Field(i)
				walk(path+"."+f.Name, func(s *SA) reflect.Value { return get(s).Field(i) }, f.Type)
			}
			return
		}
		b := clone(a)
		differ(t, path, get(&b))
		if reflect.DeepEqual(a, b) {
			t.Fatalf("%s: the test did not change it", path)
		}
		if a.Equal(&b) || b.Equal(&a) {
			t.Errorf("Equal misses a change of %s", path)
		}
		changed++
	}
	walk("SA", func(s *SA) reflect.Value { return reflect.ValueOf(s).Elem() }, reflect.TypeOf(a))
	if changed < 20 {
		t.Fatalf("changed only %d fields", changed)
	}
}

// differ sets v to a value other than its own.
func differ(t *testing.T, path string, v reflect.Value) {
	switch v.Interface().(type) {
	case netip.Addr:
		v.Set(reflect.ValueOf(netip.MustParseAddr("198.51.100.77")))
		return
	case netip.Prefix:
		v.Set(reflect.ValueOf(netip.MustParsePrefix("198.51.100.0/24")))
		return
	case *Encap:
		v.Set(reflect.ValueOf(&Encap{LocalPort: 1, PeerPort: 2}))
		return
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(v.String() + "x")
	case reflect.Bool:
		v.SetBool(!v.Bool())
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(v.Uint() + 1)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(v.Int() + 1)
	case reflect.Slice:
		v.SetBytes(append(append([]byte(nil), v.Bytes()...), 0xff))
	default:
		t.Fatalf("%s: no way to change a %s", path, v.Type())
	}
}
