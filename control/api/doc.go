// Package api owns xesp's control API: an HTTP+JSON server that writes
// SAs into the SA database and reads the data path's figures, and the Go
// client the CLI (and a P-CSCF) uses to talk to it.
//
// It must not touch BPF maps, sockets of the data path or packets: the
// manager mirrors the SAD into the kernel by itself, and the data path's
// figures reach the API only through the DataPath interface, filled with
// plain data. Keys enter through POST and PUT and never leave: every view
// the API returns is built from sa.SA.Public, and no error quotes a key.
//
// # Listeners
//
// A Unix socket (mode 0600; the file's permissions are the
// authentication, so requests there carry no token) and, optionally, a
// TCP listener: TLS 1.2+ (tls.go; plain HTTP only when insecure and on
// loopback), optionally mTLS, capped in connections overall and per
// source before any handshake (limits.go), and every request must carry
// `Authorization: Bearer <token>`: the admin token, or the read-only one
// for GET and HEAD (auth.go). docs/api.md, "Authentication and TLS".
//
// # Endpoints
//
//	GET    /v1/health          Health; 503 when the data path is not ok
//	GET    /v1/stats           Stats
//	GET    /v1/sas             Page; ?limit=1..10000 (default 100) &cursor=<next of the previous page>
//	POST   /v1/sas             one SA in the SA format (JSON) → 201, the SAView, Location: /v1/sas/<ref>
//	GET    /v1/sas/{ref}       SAView
//	PUT    /v1/sas/{ref}       the whole SA again (keys included) → 200, SAView; never creates
//	DELETE /v1/sas/{ref}       → 200, the SAView of what was deleted
//	POST   /v1/secagree        IMS sec-agree for a P-CSCF (SecAgreeRequest: the phone's
//	                           Security-Client, CK/IK, its observed address:port) → 201,
//	                           SecAgreeResponse: the Security-Server value and the four SAs;
//	                           "replaces" re-authenticates a registration (new set in its group)
//	GET    /v1/secagree/{registration}  → 200, RegistrationView: its SAs now; 404 when none
//	DELETE /v1/secagree/{registration}  → 200, every SA of the registration removed: inbound
//	                           first, outbound after ?grace= (default 0: frames already
//	                           steered to an SA are processed before it goes); call it
//	                           after the last message needing them has been sent
//	POST   /v1/secagree/{registration}/delete  the same delete, for clients that send
//	                           only GET and POST (Kamailio 5.6's http_client)
//	GET    /v1/floods          Floods: the SAs whose flood budgets XDP enforced (503
//	                           without a data path); POST /v1/rekey is in rekey.go
//
// Every SA the API adds, updates, rekeys in or derives for sec-agree
// passes the gateway's checks (Options.Check, config.CheckSA: local one of
// public.addresses, encap.local_port the NAT-T port), as config and etcd
// SAs do. Of concurrent rekeys of one SA exactly one succeeds; the others
// get 409.
//
// Request bodies must be `application/json` and at most 64 KiB. Errors are
// `{"error": "..."}` (plus "errors": [...] when there are several), with
// the SA format's messages (`sa "ue1-in": enc_key: ...`). Status codes:
// 400 malformed or invalid input, 401 missing or wrong token (TCP), 403
// the read-only token on a method that changes something, 404 no
// such SA, 405 wrong method, 409 the SA exists already, an outbound SPI
// names several SAs, selectors overlap another SA's, or another rekey
// already replaced it, 413 body too large, 415 not JSON, 507 SA table full.
//
// # SA references
//
// {ref} names one SA in one of these forms:
//
//	ue1-in                             its name (names start with a letter and never hold ':')
//	in:0x00001001                      inbound SA by SPI (hex with 0x, or decimal)
//	out:0x00001001                     outbound SA by SPI; 409 when peers share the SPI
//	out:0x00001001@192.0.2.10:4500     outbound SA by full identity: SPI, peer, encap peer port
//	out:0x00001001@192.0.2.10          ... plain ESP (no UDP encapsulation, port 0)
//	out:0x00001001@[2001:db8::1]:4500  IPv6 peers in brackets when a port follows
//
// The prefixes are case-insensitive. In a URL the reference is one path
// segment escaped with url.PathEscape: ':' and '@' may stay as they are,
// '[' and ']' become %5B and %5D. The canonical form (RefOf, the "ref"
// field of a view, the Location header) is the identity form with an
// 8-digit hex SPI.
package api
