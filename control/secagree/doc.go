// Package secagree owns the IMS security agreement of RFC 3329 and
// 3GPP TS 33.203 clause 7 as a P-CSCF speaks it: parsing and producing the
// Security-Client, Security-Server and Security-Verify header values,
// choosing the ipsec-3gpp mechanism from the phone's offer by the
// P-CSCF's preference, and deriving the four SAs of one registration as
// sa.Spec values (docs/sa-format.md), keys expanded from the IMS AKA IK and CK.
//
// It must not do I/O, hold state between calls, install SAs or speak SIP
// transactions: the caller (API, P-CSCF glue) decides when SAs are created
// and deleted. Key material only appears in the returned Specs.
//
// Assumptions, stated because the 3GPP text was not at hand to quote:
//
//   - Key expansion (TS 33.203 clause 7.1 / Annex I): hmac-md5-96 uses IK
//     as is (128 bit); hmac-sha-1-96 uses IK followed by 32 zero bits
//     (160 bit); aes-cbc uses CK as is (AES-128); des-ede3-cbc uses
//     CK1||CK2||CK1 where CK = CK1||CK2 (64 bit halves); null takes no key.
//     ExpandKeys implements all of these; Derive maps hmac-sha-1-96 to the
//     ESP proposals aes128-sha1 / null-sha1 and hmac-md5-96 (RFC 2403) to
//     aes128-md5 / null-md5, and refuses what the ESP engine cannot run
//     (des-ede3-cbc) with an error naming alg or ealg. DefaultPolicy
//     prefers hmac-sha-1-96 but accepts hmac-md5-96.
//   - Security-Server carries exactly one mechanism: the one the SAs were
//     created for (Server), since the SAs exist before the phone answers;
//     the phone's choice among several would need SAs for every
//     candidate. Deployed P-CSCFs answer the same way.
//   - Choice (Choose): the P-CSCF's Policy lists rank first (mod, then
//     ealg, then alg), the phone's q breaks ties (absent q ranks as 1, the
//     SIP qvalue default), then the order of the offer.
//   - aes-gcm is left out: how newer releases form the GCM key and salt
//     from CK/IK could not be confirmed, and guessing a salt would produce
//     SAs that silently fail to interoperate.
//   - An absent ealg means null encryption, an absent mod means trans, an
//     absent prot means esp (TS 33.203 defaults).
//   - UDP-enc-tun: ESP is UDP-encapsulated (RFC 3948) between the
//     gateway's one NAT-T port (the data path terminates encapsulated ESP
//     on that port only, natt_port in the config) and the UE's observed
//     (NAPT) port; port-c/port-s are the inner, protected SIP ports. The
//     observed port is only the first binding: the four SAs share one pair
//     label, so the binding the SAD re-learns from the first authenticated
//     inbound packet (the UE's ESP socket usually has another NAPT mapping
//     than its unprotected SIP socket) carries all of them.
//   - Steering: each SA carries its port selectors (sa.Spec ports: the
//     P-CSCF's protected port as local, the UE's as peer). XDP picks a
//     phone's outbound SA by inner destination address; the worker then
//     seals with the phone's outbound SA whose ports match the cleartext,
//     and drops inbound cleartext whose ports do not match its SA.
//   - Parameter names and the mechanism name are case-insensitive (RFC
//     3261 7.3.1); alg and ealg values are compared exactly as registered
//     (unknown values are kept so an offer with a future algorithm still
//     parses); mod and prot values are matched case-insensitively and
//     written in their registered spelling. SPIs in headers are decimal;
//     leading zeros are accepted (TS 24.229 examples use them).
package secagree
