package esp

import (
	"fmt"
	"strings"
)

// Proposal names one ESP transform: an encryption algorithm and, unless it
// is an AEAD, an integrity algorithm. The keywords are strongSwan's, so
// operators can copy them from an existing ipsec.conf or swanctl.conf.
type Proposal uint8

// The supported transforms. The zero value is deliberately invalid so an
// unset field is caught by validation rather than silently chosen.
const (
	ProposalInvalid Proposal = iota
	AES128GCM16
	AES192GCM16
	AES256GCM16
	AES128GCM12
	AES192GCM12
	AES256GCM12
	AES128GCM8
	AES192GCM8
	AES256GCM8
	ChaCha20Poly1305
	AES128SHA1
	AES192SHA1
	AES256SHA1
	AES128SHA256
	AES192SHA256
	AES256SHA256
	NullSHA1
	NullSHA256
	// AES-CBC without integrity exists for RFC 3602's published vectors and
	// for decrypting old captures. RFC 4303 section 3.2 allows it but it
	// offers no protection against forgery, so the daemon refuses it.
	AES128CBC
	AES192CBC
	AES256CBC
	// HMAC-MD5-96 (RFC 2403) is here for IMS phones whose sec-agree offers
	// only alg=hmac-md5-96 (TS 33.203); appended so existing values keep
	// their numbers.
	AES128MD5
	AES256MD5
	NullMD5
	proposalCount
)

type proposalInfo struct {
	keyword    string
	encKeyLen  int // bytes, including the 4-byte salt for AEADs
	authKeyLen int // bytes; 0 when the encryption is an AEAD or there is no integrity
	ivLen      int
	icvLen     int
	blockSize  int // payload alignment before the trailer: 16 for CBC, 4 otherwise
	aead       bool
	cbc        bool
}

var proposals = [proposalCount]proposalInfo{
	AES128GCM16:      {keyword: "aes128gcm16", encKeyLen: 20, ivLen: 8, icvLen: 16, blockSize: 4, aead: true},
	AES192GCM16:      {keyword: "aes192gcm16", encKeyLen: 28, ivLen: 8, icvLen: 16, blockSize: 4, aead: true},
	AES256GCM16:      {keyword: "aes256gcm16", encKeyLen: 36, ivLen: 8, icvLen: 16, blockSize: 4, aead: true},
	AES128GCM12:      {keyword: "aes128gcm12", encKeyLen: 20, ivLen: 8, icvLen: 12, blockSize: 4, aead: true},
	AES192GCM12:      {keyword: "aes192gcm12", encKeyLen: 28, ivLen: 8, icvLen: 12, blockSize: 4, aead: true},
	AES256GCM12:      {keyword: "aes256gcm12", encKeyLen: 36, ivLen: 8, icvLen: 12, blockSize: 4, aead: true},
	AES128GCM8:       {keyword: "aes128gcm8", encKeyLen: 20, ivLen: 8, icvLen: 8, blockSize: 4, aead: true},
	AES192GCM8:       {keyword: "aes192gcm8", encKeyLen: 28, ivLen: 8, icvLen: 8, blockSize: 4, aead: true},
	AES256GCM8:       {keyword: "aes256gcm8", encKeyLen: 36, ivLen: 8, icvLen: 8, blockSize: 4, aead: true},
	ChaCha20Poly1305: {keyword: "chacha20poly1305", encKeyLen: 36, ivLen: 8, icvLen: 16, blockSize: 4, aead: true},
	AES128SHA1:       {keyword: "aes128-sha1", encKeyLen: 16, authKeyLen: 20, ivLen: 16, icvLen: 12, blockSize: 16, cbc: true},
	AES192SHA1:       {keyword: "aes192-sha1", encKeyLen: 24, authKeyLen: 20, ivLen: 16, icvLen: 12, blockSize: 16, cbc: true},
	AES256SHA1:       {keyword: "aes256-sha1", encKeyLen: 32, authKeyLen: 20, ivLen: 16, icvLen: 12, blockSize: 16, cbc: true},
	AES128SHA256:     {keyword: "aes128-sha256", encKeyLen: 16, authKeyLen: 32, ivLen: 16, icvLen: 16, blockSize: 16, cbc: true},
	AES192SHA256:     {keyword: "aes192-sha256", encKeyLen: 24, authKeyLen: 32, ivLen: 16, icvLen: 16, blockSize: 16, cbc: true},
	AES256SHA256:     {keyword: "aes256-sha256", encKeyLen: 32, authKeyLen: 32, ivLen: 16, icvLen: 16, blockSize: 16, cbc: true},
	NullSHA1:         {keyword: "null-sha1", authKeyLen: 20, icvLen: 12, blockSize: 4},
	NullSHA256:       {keyword: "null-sha256", authKeyLen: 32, icvLen: 16, blockSize: 4},
	AES128CBC:        {keyword: "aes128", encKeyLen: 16, ivLen: 16, blockSize: 16, cbc: true},
	AES192CBC:        {keyword: "aes192", encKeyLen: 24, ivLen: 16, blockSize: 16, cbc: true},
	AES256CBC:        {keyword: "aes256", encKeyLen: 32, ivLen: 16, blockSize: 16, cbc: true},
	AES128MD5:        {keyword: "aes128-md5", encKeyLen: 16, authKeyLen: 16, ivLen: 16, icvLen: 12, blockSize: 16, cbc: true},
	AES256MD5:        {keyword: "aes256-md5", encKeyLen: 32, authKeyLen: 16, ivLen: 16, icvLen: 12, blockSize: 16, cbc: true},
	NullMD5:          {keyword: "null-md5", authKeyLen: 16, icvLen: 12, blockSize: 4},
}

// ParseProposal maps a strongSwan ESP keyword to a Proposal. Matching is
// case-insensitive; the error lists what is accepted.
func ParseProposal(s string) (Proposal, error) {
	k := strings.ToLower(strings.TrimSpace(s))
	for p := AES128GCM16; p < proposalCount; p++ {
		if proposals[p].keyword == k {
			return p, nil
		}
	}
	return ProposalInvalid, fmt.Errorf("unknown proposal %q (accepted: %s)", s, strings.Join(ProposalKeywords(), ", "))
}

// ProposalKeywords lists every accepted keyword, in table order.
func ProposalKeywords() []string {
	out := make([]string, 0, proposalCount-1)
	for p := AES128GCM16; p < proposalCount; p++ {
		out = append(out, proposals[p].keyword)
	}
	return out
}

func (p Proposal) valid() bool { return p > ProposalInvalid && p < proposalCount }

// String returns the strongSwan keyword.
func (p Proposal) String() string {
	if !p.valid() {
		return fmt.Sprintf("proposal(%d)", uint8(p))
	}
	return proposals[p].keyword
}

// EncKeyLen is the length of enc_key in bytes (AEADs: key plus 4-byte salt).
func (p Proposal) EncKeyLen() int { return p.info().encKeyLen }

// AuthKeyLen is the length of auth_key in bytes; 0 where none is taken.
func (p Proposal) AuthKeyLen() int { return p.info().authKeyLen }

// IVLen is the length of the explicit IV carried in each packet.
func (p Proposal) IVLen() int { return p.info().ivLen }

// ICVLen is the length of the integrity check value; 0 without integrity.
func (p Proposal) ICVLen() int { return p.info().icvLen }

// BlockSize is the alignment RFC 4303 padding brings the payload plus
// trailer to.
func (p Proposal) BlockSize() int { return p.info().blockSize }

// AEAD reports a combined-mode algorithm (GCM, ChaCha20-Poly1305), whose IV
// must never repeat under one key.
func (p Proposal) AEAD() bool { return p.info().aead }

// HasIntegrity reports whether packets are authenticated. Only the
// AES-CBC-without-integrity proposals return false.
func (p Proposal) HasIntegrity() bool { return p.info().icvLen > 0 }

func (p Proposal) info() proposalInfo {
	if !p.valid() {
		return proposalInfo{}
	}
	return proposals[p]
}
