package esp

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"reflect"
	"unsafe"

	"golang.org/x/crypto/chacha20poly1305"
)

// Mode is the IPsec mode of an SA.
type Mode uint8

// Modes. The zero value is invalid so an unset mode fails validation.
const (
	ModeInvalid Mode = iota
	// ModeTunnel: Payload Data is a whole inner IPv4 or IPv6 packet
	// (Next Header 4 or 41).
	ModeTunnel
	// ModeTransport: Payload Data is the upper-layer segment of the outer
	// packet.
	ModeTransport
)

// String returns "tunnel" or "transport", as the SA format spells them.
func (m Mode) String() string {
	switch m {
	case ModeTunnel:
		return "tunnel"
	case ModeTransport:
		return "transport"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// ParseMode maps "tunnel"/"transport" to a Mode.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "tunnel":
		return ModeTunnel, nil
	case "transport":
		return ModeTransport, nil
	}
	return ModeInvalid, fmt.Errorf("unknown mode %q (accepted: tunnel, transport)", s)
}

// Config describes one SA as the SA format (docs/sa-format.md) does, minus the
// addressing, which belongs to the SAD and to Outer.
type Config struct {
	// Name labels NewTransform's errors; optional. The Transform keeps no copy.
	Name string
	// SPI is taken as given. 0 and 1..255 are reserved (RFC 4303 2.1) and
	// SPI 0 cannot be carried in UDP (it is the non-ESP marker); refusing
	// them for live SAs is the SAD's call, the engine accepts them so
	// published vectors and old captures can be opened.
	SPI      uint32
	Proposal Proposal
	// EncKey: AEADs take key || 4-byte salt (IKEv2 KEYMAT order, as ip xfrm).
	EncKey []byte
	// AuthKey: only for proposals with a separate integrity algorithm.
	AuthKey []byte
	ESN     bool
	// ReplayWindow in packets: 0 disables anti-replay, else
	// MinReplayWindow..MaxReplayWindow. The SA format's default is
	// DefaultReplayWindow; applying it when the field is absent is the
	// config parser's job, because 0 here is a meaningful choice. Ignored
	// (anti-replay off) for proposals without integrity: RFC 4303 3.4.3 ties
	// anti-replay to integrity, and a window an attacker can slide with
	// forged packets only causes loss.
	ReplayWindow int
	Mode         Mode
}

// Transform is one security association's data-path state: the outbound
// sequence counter, the inbound replay window and the cipher. The same type
// serves both directions; a real deployment uses one Transform value per
// direction (each has its own SPI and keys). Not safe for concurrent use.
//
// The AEAD instance of the GCM (16- and 12-byte ICV) and ChaCha20-Poly1305
// proposals is a cache derived from the key: Go's GCM holds both AES key
// schedules and its GHASH table, ~0.7 KB, more than the rest of an SA.
// It is built on first use (or by Warm) and Release drops it again, so a
// gateway holding a million mostly idle SAs keeps only the key bytes of
// the idle ones. Nothing else changes across a release: the sequence
// counter and the replay window are the Transform's own.
//
// Fields are ordered hot first: what every packet reads sits in the first
// cache line.
type Transform struct {
	spi    uint32
	prop   Proposal
	mode   Mode
	esn    bool
	gcm8   bool  // 8-byte ICV: Go's GCM has no 8-byte tags; see gcm8.go
	ivLen  uint8 // bytes
	icv    uint8 // bytes
	lazy   bool  // aead is built from key on demand (see above)
	keyLen uint8 // bytes of key in use; 0 once wiped
	seqHi  [4]byte

	seq uint64 // last sequence number sent; 0 before the first (its limit: maxSeq)

	aead cipher.AEAD // GCM (tag 16 or 12; tag 16 for gcm8), ChaCha20-Poly1305

	replay ReplayWindow

	// Per-packet scratch (with seqHi above). Living in the
	// heap-allocated SA keeps slices of them from forcing an allocation
	// per call through the cipher interfaces.
	nonce [12]byte // salt || IV
	aad   [12]byte

	// ext holds the state only 8-byte-ICV GCM, CBC and HMAC proposals
	// use; nil for the other AEADs, which a million-SA gateway holds, so
	// each of those SAs is ~200 B smaller.
	ext *saExt

	// key is the lazy AEAD's key (the salt is in nonce), kept to rebuild
	// the cipher; it never leaves the Transform and Wipe zeroes it.
	key [32]byte
	// No name: errors after construction name the SPI, and a caller that
	// wants labels keeps them (the SAD does); 16 bytes a million times.
}

// saExt is the SA state of the proposals that run a cipher or MAC
// themselves rather than through one AEAD instance.
type saExt struct {
	block  cipher.Block
	cbcEnc ivBlockMode
	cbcDec ivBlockMode
	mac    hash.Hash
	hkey   [2]uint64 // GHASH subkey, gcm8 only

	// Per-packet scratch (see SA).
	sum    [32]byte
	tag    [16]byte
	ivSeed [16]byte
	ctr    [16]byte
	ks     [16]byte
}

// ivBlockMode is a CBC BlockMode whose IV can be reset: crypto/cipher's CBC
// modes have SetIV (crypto/tls relies on it), which spares a
// NewCBCEncrypter allocation per packet.
type ivBlockMode interface {
	cipher.BlockMode
	SetIV([]byte)
}

// NewTransform validates c and builds the SA's cipher instances. Errors name the SA
// and the field.
func NewTransform(c Config) (*Transform, error) {
	sa := new(Transform)
	if err := InitTransform(sa, c, nil); err != nil {
		return nil, err
	}
	return sa, nil
}

// InitTransform is NewTransform into storage the caller allocated, e.g. as
// part of a larger per-SA object, so one allocation holds an SA's whole
// data-path state. ring, when at least ReplayWords(c.ReplayWindow) long,
// holds the replay window's words; otherwise they get their own
// allocation. sa must not be in use; it is overwritten.
func InitTransform(sa *Transform, c Config, ring []uint64) error {
	if err := initSA(sa, c, ring); err != nil {
		*sa = Transform{}
		label := c.Name
		if label == "" {
			label = fmt.Sprintf("spi 0x%08x", c.SPI)
		}
		return fmt.Errorf("sa %q: %w", label, err)
	}
	return nil
}

func initSA(sa *Transform, c Config, ring []uint64) error {
	if !c.Proposal.valid() {
		return fmt.Errorf("proposal: not set or unknown (%v)", c.Proposal)
	}
	if c.Mode != ModeTunnel && c.Mode != ModeTransport {
		return fmt.Errorf("mode: must be tunnel or transport, got %v", c.Mode)
	}
	info := c.Proposal.info()
	if len(c.EncKey) != info.encKeyLen {
		switch {
		case info.encKeyLen == 0:
			return fmt.Errorf("enc_key: %s takes no encryption key, got %d bytes", c.Proposal, len(c.EncKey))
		case info.aead:
			return fmt.Errorf("enc_key: %s needs %d bytes (%d key + 4 salt), got %d", c.Proposal, info.encKeyLen, info.encKeyLen-4, len(c.EncKey))
		default:
			return fmt.Errorf("enc_key: %s needs %d bytes, got %d", c.Proposal, info.encKeyLen, len(c.EncKey))
		}
	}
	if len(c.AuthKey) != info.authKeyLen {
		if info.authKeyLen == 0 {
			return fmt.Errorf("auth_key: %s takes no separate integrity key, got %d bytes", c.Proposal, len(c.AuthKey))
		}
		return fmt.Errorf("auth_key: %s needs %d bytes, got %d", c.Proposal, info.authKeyLen, len(c.AuthKey))
	}
	*sa = Transform{
		spi: c.SPI, prop: c.Proposal, mode: c.Mode, esn: c.ESN,
		ivLen: uint8(info.ivLen), icv: uint8(info.icvLen),
	}
	if !info.aead || info.icvLen == 8 {
		sa.ext = &saExt{}
	}
	window := c.ReplayWindow
	if !info.icvPresent() {
		window = 0
	}
	if err := sa.replay.init(window, c.ESN, ring); err != nil {
		return err
	}

	switch {
	case info.aead && info.icvLen != 8:
		// GCM with a 16- or 12-byte tag, ChaCha20-Poly1305: the key is
		// all there is until the first packet (or Warm) builds the
		// cipher. Its length was checked above, the only reason the
		// constructors fail, so building later cannot.
		sa.lazy = true
		sa.keyLen = uint8(copy(sa.key[:], c.EncKey[:len(c.EncKey)-4]))
		copy(sa.nonce[:4], c.EncKey[len(c.EncKey)-4:])
	case info.aead: // AES-GCM, 8-byte ICV
		key := c.EncKey[:len(c.EncKey)-4]
		b, err := aes.NewCipher(key)
		if err != nil {
			return fmt.Errorf("enc_key: %w", err)
		}
		// Only the 8-byte-ICV path runs AES itself (CTR, gcm8.go), so
		// only it keeps the block beside the GCM instance, and it is
		// built at once: a rare proposal, not worth a second code path.
		sa.ext.block = b
		sa.gcm8 = true
		var h [16]byte
		b.Encrypt(h[:], h[:])
		sa.ext.hkey = [2]uint64{binary.BigEndian.Uint64(h[:8]), binary.BigEndian.Uint64(h[8:])}
		a, err := cipher.NewGCMWithTagSize(b, 16)
		if err != nil {
			return fmt.Errorf("enc_key: %w", err)
		}
		sa.aead = a
		copy(sa.nonce[:4], c.EncKey[len(key):])
	case info.cbc:
		b, err := aes.NewCipher(c.EncKey)
		if err != nil {
			return fmt.Errorf("enc_key: %w", err)
		}
		sa.ext.block = b
		var zero [16]byte
		enc, ok1 := cipher.NewCBCEncrypter(b, zero[:]).(ivBlockMode)
		dec, ok2 := cipher.NewCBCDecrypter(b, zero[:]).(ivBlockMode)
		if !ok1 || !ok2 {
			return fmt.Errorf("enc_key: this Go's CBC mode cannot reset its IV")
		}
		sa.ext.cbcEnc, sa.ext.cbcDec = enc, dec
		// The CBC IV is E_K(seq || SPI || "xIV\x00"): SP 800-38A appendix C
		// makes the encryption of a nonce under the data key an
		// unpredictable IV, and the sequence number is a nonce that never
		// repeats under one SA, so no crypto/rand call per packet.
		binary.BigEndian.PutUint32(sa.ext.ivSeed[8:], c.SPI)
		copy(sa.ext.ivSeed[12:], "xIV\x00")
	}
	switch info.authKeyLen {
	case 16:
		sa.ext.mac = hmac.New(md5.New, c.AuthKey)
	case 20:
		sa.ext.mac = hmac.New(sha1.New, c.AuthKey)
	case 32:
		sa.ext.mac = hmac.New(sha256.New, c.AuthKey)
	}
	if sa.ext != nil && sa.ext.mac != nil {
		// The first Reset snapshots the keyed inner/outer states; later
		// Resets restore them without rehashing the padded key.
		sa.ext.mac.Reset()
	}
	return nil
}

func (p proposalInfo) icvPresent() bool { return p.icvLen > 0 }

// SPI returns the SA's SPI.
func (sa *Transform) SPI() uint32 { return sa.spi }

// Proposal returns the SA's transform.
func (sa *Transform) Proposal() Proposal { return sa.prop }

// Mode returns tunnel or transport.
func (sa *Transform) Mode() Mode { return sa.mode }

// ESN reports 64-bit extended sequence numbers.
func (sa *Transform) ESN() bool { return sa.esn }

// Replay returns the inbound anti-replay window, for Export/Import and
// inspection. It is the SA's own state, not a copy.
func (sa *Transform) Replay() *ReplayWindow { return &sa.replay }

// Headroom is the number of bytes Seal writes in front of the payload: the
// ESP header (SPI, sequence number) and the IV.
func (sa *Transform) Headroom() int { return 8 + int(sa.ivLen) }

// info is the SA's proposal's constants.
func (sa *Transform) info() *proposalInfo { return &proposals[sa.prop] }

// Cold reports that the SA's cipher is not built: the next Open or Seal
// (or Warm) builds it from the key.
func (sa *Transform) Cold() bool { return sa.lazy && sa.aead == nil }

// Warm builds the cipher if it is not built. It fails only on a wiped SA.
func (sa *Transform) Warm() error {
	if !sa.Cold() {
		return nil
	}
	if sa.keyLen == 0 {
		return fmt.Errorf("spi 0x%08x: keys wiped", sa.spi)
	}
	k := sa.key[:sa.keyLen]
	if sa.prop == ChaCha20Poly1305 {
		a, err := chacha20poly1305.New(k)
		if err != nil {
			return fmt.Errorf("spi 0x%08x: enc_key: %w", sa.spi, err)
		}
		sa.aead = a
		return nil
	}
	b, err := aes.NewCipher(k)
	if err != nil {
		return fmt.Errorf("spi 0x%08x: enc_key: %w", sa.spi, err)
	}
	a, err := cipher.NewGCMWithTagSize(b, int(sa.icv))
	if err != nil {
		return fmt.Errorf("spi 0x%08x: enc_key: %w", sa.spi, err)
	}
	sa.aead = a
	return nil
}

// Release drops a cipher Warm (or a packet) built, leaving the key to
// build it again; it reports whether there was one. The dropped instance's
// key schedule is Go's and cannot be zeroed here: it is garbage from now
// on. Proposals built at once keep their cipher.
func (sa *Transform) Release() bool {
	if !sa.lazy || sa.aead == nil {
		return false
	}
	sa.aead = nil
	return true
}

// Wipe zeroes the key bytes the SA keeps and releases its cipher, for an SA
// that leaves the data path; Open and Seal fail from then on (ReasonInvalid)
// for the lazy proposals. The others' ciphers stay (Go gives no way to zero
// them) until the Transform is garbage.
func (sa *Transform) Wipe() {
	sa.Release()
	clear(sa.key[:])
	sa.keyLen = 0
}

// padLen is the RFC 4303 2.4 padding that aligns payload+TFC+trailer.
func (sa *Transform) padLen(n int) int {
	bs := sa.info().blockSize
	return (bs - (n+2)%bs) % bs
}

// Tailroom is the exact number of bytes Seal needs after a payload of n
// bytes with tfc bytes of TFC padding: TFC padding, padding, Pad Length,
// Next Header and ICV, plus 8 bytes of scratch for the 8-byte-ICV GCM
// proposals (written, not part of the packet).
func (sa *Transform) Tailroom(n, tfc int) int {
	t := tfc + sa.padLen(n+tfc) + 2 + int(sa.icv)
	if sa.gcm8 {
		t += 8
	}
	return t
}

// MaxTailroom bounds Tailroom(n, 0) for every n, for planning frames once.
func (sa *Transform) MaxTailroom() int {
	return sa.Tailroom(sa.info().blockSize-1, 0)
}

// Overhead is how many bytes sealing adds to a payload of n bytes (with tfc
// TFC bytes): the ESP packet length minus n.
func (sa *Transform) Overhead(n, tfc int) int {
	o := sa.Headroom() + sa.Tailroom(n, tfc)
	if sa.gcm8 {
		o -= 8
	}
	return o
}

// NextSeq is the sequence number the next Seal will use. When the space is
// exhausted it is 2^32 without ESN and 0 with ESN (2^64 does not fit).
func (sa *Transform) NextSeq() uint64 { return sa.seq + 1 }

// Exhausted reports that Seal will fail with ReasonSeqCycled until rekeyed.
func (sa *Transform) Exhausted() bool { return sa.seq >= sa.maxSeq() }

// maxSeq is the last sequence number the SA may send: 2^32-1, or 2^64-1
// with ESN. Derived rather than stored: 8 bytes a million times.
func (sa *Transform) maxSeq() uint64 {
	if sa.esn {
		return ^uint64(0)
	}
	return 0xffffffff
}

// SetNextSeq moves the counter forward so the next Seal uses next, e.g. to
// resume above a persisted high-water mark after a restart. It refuses to
// move backwards, which would reuse (key, IV) pairs.
func (sa *Transform) SetNextSeq(next uint64) error {
	switch {
	case next == 0:
		return fmt.Errorf("spi 0x%08x: next sequence number 0 is never sent", sa.spi)
	case next-1 > sa.maxSeq():
		return fmt.Errorf("spi 0x%08x: next sequence number %d exceeds the 32-bit space of a non-ESN SA", sa.spi, next)
	case next-1 < sa.seq:
		return fmt.Errorf("spi 0x%08x: next sequence number %d is behind the counter (%d): moving back would reuse IVs", sa.spi, next, sa.seq+1)
	}
	sa.seq = next - 1
	return nil
}

// Touch reads one word of each cache line of the SA's packet state (the
// Transform's hot lines and its cipher's key schedule and tables) and
// returns a value derived from them, so the loads are not optimised away.
// A worker touches the SAs of a whole batch before it processes the
// first packet: the misses of up to 64 SAs whose state is out of cache
// then overlap instead of stalling each packet in turn (with a million
// SAs, the state of most is). It changes nothing.
func (sa *Transform) Touch() uintptr {
	v := uintptr(sa.spi) + uintptr(sa.replay.top) + uintptr(sa.nonce[0]) + uintptr(sa.key[31])
	if w := &sa.replay; len(w.ring) > 0 {
		v += uintptr(w.ring[w.pos]) // the word an in-order packet updates
	}
	if sa.aead == nil {
		return v
	}
	// The AEAD's state, behind the interface's data word: Go's GCM keeps
	// its AES round keys (first lines) and its GHASH table (last lines)
	// in one object of ~0.75 KB; ChaCha20-Poly1305 just the key.
	p := (*[2]unsafe.Pointer)(unsafe.Pointer(&sa.aead))[1]
	if sa.prop == ChaCha20Poly1305 {
		return v + uintptr(*(*byte)(p))
	}
	for _, off := range gcmLines {
		v += uintptr(*(*byte)(unsafe.Add(p, off)))
	}
	return v
}

// gcmLines are the offsets Touch reads in Go's GCM object: the encryption
// round keys at its start and the GHASH table at its end, each line once,
// never past the object (its size taken from this Go's type, so another
// layout costs at most some misses, never a read outside it).
var gcmLines = func() []uintptr {
	b, err := aes.NewCipher(make([]byte, 16))
	if err != nil {
		return nil
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		return nil
	}
	t := reflect.TypeOf(a)
	if t.Kind() != reflect.Pointer {
		return nil
	}
	size := t.Elem().Size()
	var offs []uintptr
	for _, off := range []uintptr{0, 64, 128, 192, 448, 512, 576, 640, 704} {
		if off < size {
			offs = append(offs, off)
		}
	}
	return offs
}()
