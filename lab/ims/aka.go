package ims

import (
	"crypto/hmac"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// Vector is one IMS AKA authentication vector as the lab's stand-in HSS
// computes it. It is NOT Milenage (TS 35.206): RES, CK, IK and AUTN are
// HMAC-SHA-256 of the subscriber key K over a label and RAND, truncated
// to Milenage's sizes. The P-CSCF and xesp only ever see CK and IK, which
// have the real sizes (128 bit each); what the lab proves is that the keys
// reach the P-CSCF in the S-CSCF's 401 and that xesp expands them to the
// SAs per TS 33.203 Annex I, which the phone does independently.
type Vector struct {
	RAND, AUTN [16]byte
	RES        [8]byte
	CK, IK     [16]byte
}

// SubscriberKey is the lab's K for an IMPI: deterministic, so the phone
// ("ISIM") and the stand-in HSS agree without provisioning.
func SubscriberKey(impi string) [16]byte {
	s := sha256.Sum256([]byte("xesp-lab K " + impi))
	return [16]byte(s[:16])
}

// Derive computes the vector for K and RAND.
func Derive(k [16]byte, rand [16]byte) Vector {
	f := func(label string) []byte {
		m := hmac.New(sha256.New, k[:])
		m.Write([]byte(label))
		m.Write(rand[:])
		return m.Sum(nil)
	}
	v := Vector{RAND: rand}
	copy(v.AUTN[:], f("AUTN"))
	copy(v.RES[:], f("RES"))
	copy(v.CK[:], f("CK"))
	copy(v.IK[:], f("IK"))
	return v
}

// DigestResponse is RFC 3310 AKAv1-MD5 without qop: the RFC 2617 response
// with RES as the password.
func DigestResponse(user, realm string, res []byte, method, uri, nonce string) string {
	ha1 := md5.Sum(append([]byte(user+":"+realm+":"), res...))
	ha2 := md5.Sum([]byte(method + ":" + uri))
	r := md5.Sum([]byte(fmt.Sprintf("%s:%s:%s", hex.EncodeToString(ha1[:]), nonce, hex.EncodeToString(ha2[:]))))
	return hex.EncodeToString(r[:])
}
