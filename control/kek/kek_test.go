package kek

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	hexA = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	hexB = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
)

func TestSealOpenRotate(t *testing.T) {
	old, err := Parse([]byte("# fleet KEK\nk1 " + hexA + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	both, err := Parse([]byte("k1 " + hexA + "  # old\nk2 " + hexB + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if old.Current() != "k1" || both.Current() != "k2" || strings.Join(both.IDs(), ",") != "k1,k2" {
		t.Fatalf("current %q %q ids %v", old.Current(), both.Current(), both.IDs())
	}
	plain := []byte(`{"enc_key":"a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4"}`)
	kid, ct := old.Seal(plain, []byte("ue1-in"))
	if kid != "k1" || bytes.Contains(ct, plain[:16]) {
		t.Fatalf("seal: %q %x", kid, ct)
	}
	_, ct2 := old.Seal(plain, []byte("ue1-in"))
	if bytes.Equal(ct[:12], ct2[:12]) {
		t.Fatal("two seals share a nonce")
	}
	// Old records open with the rotated ring; new ones use k2.
	got, err := both.Open(kid, ct, []byte("ue1-in"))
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("open under the rotated ring: %v", err)
	}
	if kid2, _ := both.Seal(plain, nil); kid2 != "k2" {
		t.Fatalf("rotated ring seals under %q", kid2)
	}
	// Another name, a flipped bit, an unknown id, a short record.
	if _, err := both.Open(kid, ct, []byte("ue2-in")); !errors.Is(err, ErrOpen) {
		t.Fatalf("other name: %v", err)
	}
	bad := append([]byte(nil), ct...)
	bad[20] ^= 1
	if _, err := both.Open(kid, bad, []byte("ue1-in")); !errors.Is(err, ErrOpen) {
		t.Fatalf("tampered: %v", err)
	}
	_, ctB := both.Seal(plain, []byte("x"))
	if _, err := old.Open("k2", ctB, []byte("x")); !errors.Is(err, ErrUnknownKey) || !strings.Contains(err.Error(), `"k2" (this gateway holds k1)`) {
		t.Fatalf("unknown id: %v", err)
	}
	if _, err := old.Open("k1", ct[:10], nil); !errors.Is(err, ErrOpen) {
		t.Fatalf("short: %v", err)
	}
}

func TestParseErrorsNameTheLineNotTheKey(t *testing.T) {
	for _, tc := range []struct{ text, want string }{
		{"", "no key in it"},
		{"# only a comment\n", "no key in it"},
		{"k1\n", "line 1: want \"<id> <64 hex digits>\""},
		{"k1 " + hexA[:62] + "\n", `line 1: key "k1": want 64 hex digits`},
		{"k1 " + hexA + "\nk1 " + hexB + "\n", `line 2: key id "k1" given twice`},
		{"k/1 " + hexA + "\n", `line 1: key id "k/1"`},
		{"k1 " + hexA + " extra\n", "line 1: want"},
	} {
		_, err := Parse([]byte(tc.text))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.text, err, tc.want)
		}
		if err != nil && (strings.Contains(err.Error(), hexA[:16]) || strings.Contains(err.Error(), hexB[:16])) {
			t.Errorf("error quotes key material: %v", err)
		}
	}
}

func TestLoadRefusesReadableFiles(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "kek")
	os.WriteFile(p, []byte("k1 "+hexA+"\n"), 0o600)
	if _, err := Load(p); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, 0o640)
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "mode 0640 lets group or others read the key-encryption key; chmod 600 it") {
		t.Fatalf("0640: %v", err)
	}
	if _, err := Load(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing file loaded")
	}
}
