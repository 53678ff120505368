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
	// Name labels errors; optional.
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

// Transform is one security association's data-path state: cipher instances built
// once, the outbound sequence counter and the inbound replay window. The
// same type serves both directions; a real deployment uses one Transform value per
// direction (each has its own SPI and keys). Not safe for concurrent use.
type Transform struct {
	name  string
	spi   uint32
	prop  Proposal
	info  *proposalInfo
	mode  Mode
	esn   bool
	ivLen int
	icv   int

	aead cipher.AEAD // GCM (tag 16 or 12; tag 16 for gcm8), ChaCha20-Poly1305
	gcm8 bool        // 8-byte ICV: Go's GCM has no 8-byte tags; see gcm8.go
	// ext holds the state only 8-byte-ICV GCM, CBC and HMAC proposals
	// use; nil for the other AEADs, which a million-SA gateway holds, so
	// each of those SAs is ~200 B smaller.
	ext *saExt

	seq    uint64 // last sequence number sent; 0 before the first
	maxSeq uint64
	replay ReplayWindow

	// Per-packet scratch. Living in the heap-allocated SA keeps slices of
	// them from forcing an allocation per call through the cipher
	// interfaces.
	nonce [12]byte // salt || IV
	aad   [12]byte
	seqHi [4]byte
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
	sa, err := newSA(c)
	if err != nil {
		label := c.Name
		if label == "" {
			label = fmt.Sprintf("spi 0x%08x", c.SPI)
		}
		return nil, fmt.Errorf("sa %q: %w", label, err)
	}
	return sa, nil
}

func newSA(c Config) (*Transform, error) {
	if !c.Proposal.valid() {
		return nil, fmt.Errorf("proposal: not set or unknown (%v)", c.Proposal)
	}
	if c.Mode != ModeTunnel && c.Mode != ModeTransport {
		return nil, fmt.Errorf("mode: must be tunnel or transport, got %v", c.Mode)
	}
	info := c.Proposal.info()
	if len(c.EncKey) != info.encKeyLen {
		switch {
		case info.encKeyLen == 0:
			return nil, fmt.Errorf("enc_key: %s takes no encryption key, got %d bytes", c.Proposal, len(c.EncKey))
		case info.aead:
			return nil, fmt.Errorf("enc_key: %s needs %d bytes (%d key + 4 salt), got %d", c.Proposal, info.encKeyLen, info.encKeyLen-4, len(c.EncKey))
		default:
			return nil, fmt.Errorf("enc_key: %s needs %d bytes, got %d", c.Proposal, info.encKeyLen, len(c.EncKey))
		}
	}
	if len(c.AuthKey) != info.authKeyLen {
		if info.authKeyLen == 0 {
			return nil, fmt.Errorf("auth_key: %s takes no separate integrity key, got %d bytes", c.Proposal, len(c.AuthKey))
		}
		return nil, fmt.Errorf("auth_key: %s needs %d bytes, got %d", c.Proposal, info.authKeyLen, len(c.AuthKey))
	}
	sa := &Transform{
		name: c.Name, spi: c.SPI, prop: c.Proposal, info: &proposals[c.Proposal], mode: c.Mode, esn: c.ESN,
		ivLen: info.ivLen, icv: info.icvLen, maxSeq: 0xffffffff,
	}
	if c.ESN {
		sa.maxSeq = ^uint64(0)
	}
	if !info.aead || info.icvLen == 8 {
		sa.ext = &saExt{}
	}
	window := c.ReplayWindow
	if !info.icvPresent() {
		window = 0
	}
	if err := sa.replay.init(window, c.ESN); err != nil {
		return nil, err
	}

	switch {
	case c.Proposal == ChaCha20Poly1305:
		a, err := chacha20poly1305.New(c.EncKey[:32])
		if err != nil {
			return nil, fmt.Errorf("enc_key: %w", err)
		}
		sa.aead = a
		copy(sa.nonce[:4], c.EncKey[32:])
	case info.aead: // AES-GCM
		key := c.EncKey[:len(c.EncKey)-4]
		b, err := aes.NewCipher(key)
		if err != nil {
			return nil, fmt.Errorf("enc_key: %w", err)
		}
		tag := info.icvLen
		if tag == 8 {
			// Only the 8-byte-ICV path runs AES itself (CTR, gcm8.go).
			// The GCM instance holds its own copy of the key schedule,
			// so keeping b for 16-byte tags would cost every SA a
			// second one (~500 B) it never uses.
			sa.ext.block = b
			sa.gcm8 = true
			tag = 16
			var h [16]byte
			b.Encrypt(h[:], h[:])
			sa.ext.hkey = [2]uint64{binary.BigEndian.Uint64(h[:8]), binary.BigEndian.Uint64(h[8:])}
		}
		a, err := cipher.NewGCMWithTagSize(b, tag)
		if err != nil {
			return nil, fmt.Errorf("enc_key: %w", err)
		}
		sa.aead = a
		copy(sa.nonce[:4], c.EncKey[len(key):])
	case info.cbc:
		b, err := aes.NewCipher(c.EncKey)
		if err != nil {
			return nil, fmt.Errorf("enc_key: %w", err)
		}
		sa.ext.block = b
		var zero [16]byte
		enc, ok1 := cipher.NewCBCEncrypter(b, zero[:]).(ivBlockMode)
		dec, ok2 := cipher.NewCBCDecrypter(b, zero[:]).(ivBlockMode)
		if !ok1 || !ok2 {
			return nil, fmt.Errorf("enc_key: this Go's CBC mode cannot reset its IV")
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
	return sa, nil
}

func (p proposalInfo) icvPresent() bool { return p.icvLen > 0 }

// SPI returns the SA's SPI.
func (sa *Transform) SPI() uint32 { return sa.spi }

// Name returns the label given in Config.
func (sa *Transform) Name() string { return sa.name }

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
func (sa *Transform) Headroom() int { return 8 + sa.ivLen }

// padLen is the RFC 4303 2.4 padding that aligns payload+TFC+trailer.
func (sa *Transform) padLen(n int) int {
	bs := sa.info.blockSize
	return (bs - (n+2)%bs) % bs
}

// Tailroom is the exact number of bytes Seal needs after a payload of n
// bytes with tfc bytes of TFC padding: TFC padding, padding, Pad Length,
// Next Header and ICV, plus 8 bytes of scratch for the 8-byte-ICV GCM
// proposals (written, not part of the packet).
func (sa *Transform) Tailroom(n, tfc int) int {
	t := tfc + sa.padLen(n+tfc) + 2 + sa.icv
	if sa.gcm8 {
		t += 8
	}
	return t
}

// MaxTailroom bounds Tailroom(n, 0) for every n, for planning frames once.
func (sa *Transform) MaxTailroom() int {
	return sa.Tailroom(sa.info.blockSize-1, 0)
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
func (sa *Transform) Exhausted() bool { return sa.seq >= sa.maxSeq }

// SetNextSeq moves the counter forward so the next Seal uses next, e.g. to
// resume above a persisted high-water mark after a restart. It refuses to
// move backwards, which would reuse (key, IV) pairs.
func (sa *Transform) SetNextSeq(next uint64) error {
	switch {
	case next == 0:
		return fmt.Errorf("sa %q: next sequence number 0 is never sent", sa.name)
	case next-1 > sa.maxSeq:
		return fmt.Errorf("sa %q: next sequence number %d exceeds the 32-bit space of a non-ESN SA", sa.name, next)
	case next-1 < sa.seq:
		return fmt.Errorf("sa %q: next sequence number %d is behind the counter (%d): moving back would reuse IVs", sa.name, next, sa.seq+1)
	}
	sa.seq = next - 1
	return nil
}
