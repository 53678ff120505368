// Package seqstore is the durable map of outbound sequence-number
// reservations that keeps a restarted gateway from reusing an AES-GCM or
// ChaCha20-Poly1305 nonce. In ESP those IVs are the sequence number (RFC
// 4106 3.1, RFC 7634 2), so an outbound SA that restarts at 1 with the same
// key repeats every (key, nonce) pair it already sent, which for GCM gives
// away the authentication key and the XOR of plaintexts.
//
// The rule it supports: the data path may send a sequence number only if a
// reservation above it is on disk. The control plane reserves blocks ahead
// (Reserve, one fsync per call however many SAs it covers), and after a
// crash an SA resumes at or above the highest reservation ever made for its
// key (High). Losing unsent numbers of a reserved block is the price; it is
// at most one block per SA per restart.
//
// What it owns: one state directory, a lock file and one append-only log.
// What it must not do: decide policy (when to extend, how far; the manager
// does that, helped by StartSeq and NextBlock), look at packets or keys
// other than through KeyFor, or ever report a high-water mark lower than
// one it made durable.
//
// # Files
//
// The state directory (created 0700, refused when world-writable) holds:
//
//   - lock: flock(LOCK_EX) by the one process that writes the store, and
//     that process's pid as text for the error a second daemon gets. The
//     file is never removed; the lock dies with its holder, even on SIGKILL.
//   - seq.log: a 64-byte header, then 32-byte records, appended.
//   - seq.log.compact: a compaction in progress; a leftover one is a
//     compaction that crashed before its rename and is deleted on Open.
//
// # Header (64 bytes, little-endian)
//
//	0  8  magic "XESPSEQ\x00"
//	8  4  format version (1)
//	12 4  record size (32)
//	16 32 store secret: random, made once with the store, the HMAC key of KeyFor
//	48 12 zero
//	60 4  CRC32C (Castagnoli) of bytes 0..59
//
// The secret lives in the same file as the records so that the log and the
// secret that names its keys can never be separated: a log next to a fresh
// secret would silently start every SA again at 1. A header that does not
// check out makes Open fail; the store is never recreated over it.
//
// # Record (32 bytes, little-endian)
//
//	0  16 key: HMAC-SHA256(secret, SA identity and key material)[:16]
//	16 8  high: the first sequence number not yet allowed
//	24 1  kind: 1 reservation, 2 forget (tombstone, high 0)
//	25 3  zero
//	28 4  CRC32C (Castagnoli) of bytes 0..27
//
// Open replays the log in order: a reservation raises its key to the max of
// what it had and the record's high, a tombstone removes the key. A record
// whose CRC or fields do not check out is skipped, so the record before it
// for that key stands; a partial record at the end (a write torn by a
// crash) is cut off before anything is appended. Neither can lose an
// acknowledged reservation: Reserve returns only after fdatasync, and a
// write the kernel reported as durable is not torn by a later crash.
// Records carry no sequence numbers or timestamps because max-wins makes
// their order irrelevant, except between a tombstone and its own key.
//
// # Compaction
//
// When the log holds more than four records per live key (and at least
// Options.CompactAfter records), it is rewritten as one record per live key
// into seq.log.compact, fsync'd, renamed over seq.log, and the directory is
// fsync'd. A crash at any point leaves either the old or the new log, and
// both hold every key's max.
package seqstore
