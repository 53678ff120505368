/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Types shared by the XDP programs and Go. bpf2go generates the Go types
 * from this header (-type), so every map key, value and the XDP metadata
 * have exactly one definition. Change a layout here and regenerate; never
 * mirror these structs by hand in Go.
 *
 * Maps (names as in xesp.c, pinned under the loader's per-instance bpffs
 * directory with these names):
 *   sas            HASH, SPI (host order) -> struct xesp_sa; max_entries set
 *                  by the loader (default 1<<20), BPF_F_NO_PREALLOC
 *   policies       LPM_TRIE, struct xesp_policy_key -> struct xesp_policy
 *   cores          HASH, struct xesp_core_key -> struct xesp_policy: the
 *                  exact-match outbound map (core addresses), read before
 *                  the trie; max_entries set by the loader, BPF_F_NO_PREALLOC
 *   core_cfg       ARRAY[1] of struct xesp_core_cfg: which kinds of cores
 *                  entries exist (written by the manager with the cores map)
 *   config         ARRAY[1] of struct xesp_config
 *   counters       PERCPU_ARRAY[XESP_REASON_MAX] of struct xesp_counter,
 *                  indexed by enum xesp_reason
 *   xsks_public    XSKMAP read by xesp_public
 *   xsks_private   XSKMAP read by xesp_private
 *   flood_sas      LRU_HASH, SPI (host order) -> struct xesp_flood_sa, written
 *                  by the SA's worker on failed authentications
 *   flood_srcs     LRU_HASH, struct xesp_flood_src_key -> struct
 *                  xesp_flood_src, written by workers likewise
 *   flood_drops    HASH, SPI -> __u64: packets xesp_public dropped for
 *                  the SA's flood budgets (written by XDP only)
 *   keepalives     HASH, struct xesp_binding_key -> struct xesp_keepalive:
 *                  the NAT bindings of the SAs (written by the manager),
 *                  where xesp_public counts the NAT-keepalives each sends
 *                  (RFC 3948 2.3) for idle-phone detection; a keepalive
 *                  never moves a binding
 *
 * AF_XDP socket maps: one XSKMAP per side, both indexed
 * rx_queue_index * workers + worker. A socket is bound to one (device,
 * queue), and a redirect to a socket bound elsewhere fails, so the public
 * and private sockets of a worker are two different entries; separate maps
 * keep the same index scheme on both sides instead of an offset that every
 * writer would have to agree on. One-arm mode (one interface, both roles)
 * is not served by these programs: only one native XDP program per device.
 */
#ifndef XESP_H
#define XESP_H

#include <linux/types.h>

/* Why a packet got its verdict. One per-CPU counter per reason. */
enum xesp_reason {
	/* xesp_public */
	XESP_PASS_NOT_IP = 0,     /* ARP, LLDP, anything that is not IPv4/IPv6 */
	XESP_PASS_OTHER,          /* IP but neither UDP to the NAT-T port nor ESP; also IPv6 with
	                           * extension headers other than a fragment header */
	XESP_PASS_MALFORMED,      /* truncated or invalid L2/L3 header: left to the kernel */
	XESP_PASS_IKE,            /* non-ESP marker (RFC 3948 2.2): IKE for the slow path */
	XESP_PASS_FRAGMENT,       /* IPv4 fragment (any protocol) or IPv6 fragment header: slow path */
	XESP_DROP_KEEPALIVE,      /* single 0xFF byte (RFC 3948 2.3) */
	XESP_DROP_RUNT,           /* shorter than an ESP header plus 8 bytes */
	XESP_DROP_BAD_UDP_LEN,    /* UDP length disagrees with the packet */
	XESP_DROP_NO_SA,          /* SPI not in the inbound SA map */
	XESP_DROP_NO_XSK,         /* no AF_XDP socket at the steering index, or sa.worker >= workers */
	XESP_REDIRECT_ESP_UDP,    /* UDP-encapsulated ESP, stripped and steered */
	XESP_REDIRECT_ESP,        /* plain ESP (IP protocol 50), steered */
	XESP_ABORTED,             /* a helper failed (adjust_head/meta): bug or kernel limit */
	XESP_DROP_FLOOD_SA,       /* from a source other than the SA's binding while the SA's
	                           * budget of failed authentications is spent (flood_sas) */
	XESP_DROP_FLOOD_SRC,      /* from a source whose budget of failed authentications is
	                           * spent (flood_srcs), and not the SA's binding */
	XESP_PASS_OTHER_VLAN,     /* untagged or another VLAN on a side configured with one */
	/* xesp_private */
	XESP_PRIV_PASS_NOT_IP,
	XESP_PRIV_PASS_MALFORMED,
	XESP_PRIV_PASS_NO_POLICY, /* destination matches no outbound policy */
	XESP_PRIV_DROP_NO_XSK,
	XESP_PRIV_REDIRECT,
	XESP_PRIV_ABORTED,        /* adjust_meta failed on the private side */
	XESP_PRIV_REDIRECT_CORE_PORT, /* exact match: core address and destination port */
	XESP_PRIV_REDIRECT_CORE,  /* exact match: core address, any-port entry */
	XESP_PRIV_PASS_OTHER_VLAN,
	XESP_REASON_MAX,
};

struct xesp_counter {
	__u64 packets;
	__u64 bytes;
};

/* Runtime configuration: the single entry of the config array map. */
struct xesp_config {
	__u16 natt_port;   /* host byte order; 0 means 4500 */
	__u16 workers;     /* sockets per RX queue in the XSK maps; 0 means 1 */
	/* VLAN of each side (VID 1..4094): only frames carrying that tag
	 * (802.1Q or 802.1ad) are the gateway's there, the rest pass to the
	 * kernel. 0: untagged and any single tag, as before VLANs. */
	__u16 public_vlan;
	__u16 private_vlan;
};

/* Inbound SA map: key is the SPI in host byte order. */
struct xesp_sa {
	__u32 sa_index;    /* index of the SA in its worker's table, handed on in the metadata */
	__u16 worker;      /* owning worker: xsks[rx_queue * workers + worker] */
	__u16 flags;       /* XESP_SA_F_* */
};

/* Constants are enums, not #defines, so they reach Go through BTF. */
enum xesp_sa_flag {
	XESP_SA_F_ENCAP = 0x1, /* SA was negotiated with UDP encapsulation */
};

/* A NAT binding: the outer source address (IPv4 as ::ffff:a.b.c.d) and
 * UDP source port (network order) of a phone's packets. */
struct xesp_binding_key {
	__u8 addr[16];
	__be16 port;
	__u16 pad;         /* zero */
};

/* NAT-keepalives seen from one binding. */
struct xesp_keepalive {
	__u64 packets;
	__u64 last_ns;     /* bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last one */
};

/* Outbound policy LPM trie: inner destination prefix -> outbound SA.
 * IPv4 destinations are stored IPv4-mapped (::ffff:a.b.c.d, prefixlen + 96)
 * so one trie serves both families. */
struct xesp_policy_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Exact-match outbound map (docs/addressing.md): a phone's core address,
 * stored like the trie's (IPv4-mapped for IPv4), and the cleartext's
 * destination port (the SA's peer port selector, network byte order), or
 * 0 for an SA without one. xesp_private looks up (address, port), then
 * (address, 0), then the trie: a phone's SAs differ by port (sec-agree's
 * client and server SAs), phones differ by core address. */
struct xesp_core_key {
	__u8 addr[16];
	__be16 port;
	__u16 pad;         /* zero */
};

/* Which kinds of entries the cores map holds: xesp_private makes only
 * those exact-match lookups. None, the private side costs what it did
 * before core addresses existed; one kind, an SA without a core address
 * pays one hash miss in front of the trie, not two. The manager sets each
 * with its first entry of the kind. */
struct xesp_core_cfg {
	__u32 flags;       /* XESP_CORE_F_* */
};

enum xesp_core_flag {
	XESP_CORE_F_PORT = 0x1, /* (address, port) entries exist */
	XESP_CORE_F_ANY  = 0x2, /* (address, any port) entries exist */
};

struct xesp_policy {
	__u32 sa_index;    /* index of the outbound SA in its worker's table */
	__u16 worker;
	__u16 flags;
};

/*
 * XDP metadata placed in front of the packet (bpf_xdp_adjust_meta) for
 * every redirected frame: what the program learnt parsing the frame, so
 * the worker neither parses the Ethernet/VLAN/IP/UDP headers again nor
 * looks the SA up (docs/architecture.md, "The XDP-to-worker hand-off").
 * The AF_XDP reader finds it in the sizeof(struct xesp_meta) bytes just
 * before the descriptor's address. 32 bytes: a multiple of 4 and within
 * every kernel's limit for bpf_xdp_adjust_meta.
 *
 * Offsets count from the start of the frame as redirected (after the UDP
 * strip, so ESP follows the IP header at l4_off). The magic is the last
 * byte on purpose: it is the byte right before the packet in every
 * layout, so a reader of one version rejects the other's metadata rather
 * than misreading it (v1 was 12 bytes ending in 0xE5).
 */
struct xesp_meta {
	__u8  src[16];     /* ESP kinds: outer source address, IPv4 as ::ffff:a.b.c.d;
	                    * CLEAR: zero */
	__u32 sa_index;    /* from xesp_sa / xesp_policy */
	__be16 sport;      /* ESP_UDP: outer UDP source port (the NAT binding's); else 0 */
	__u16 l3_off;      /* IP header */
	__u16 l4_off;      /* ESP kinds: the ESP header (SPI), right after the IP
	                    * header; CLEAR: the end of the IP header */
	__u16 l3_len;      /* IP packet length as its header says (after the strip):
	                    * the packet ends at l3_off + l3_len, padding excluded */
	__u8  worker;      /* xesp_sa/xesp_policy worker the frame was steered to
	                    * (control/config caps workers at 64) */
	__u8  family;      /* 4 or 6: the IP version at l3_off */
	__u8  kind;        /* XESP_META_* */
	__u8  magic;       /* XESP_META_MAGIC: tells this layout from leftover headroom
	                    * and from other versions */
};

enum xesp_meta_magic {
	XESP_META_MAGIC = 0xE6, /* layout version 2 */
};

enum xesp_meta_kind {
	XESP_META_ESP_UDP = 1, /* inbound, UDP header stripped */
	XESP_META_ESP     = 2, /* inbound, plain ESP */
	XESP_META_CLEAR   = 3, /* outbound cleartext from the private side */
};

/*
 * Flood budgets (see "Flood budgets" in docs/operations.md). A packet that
 * fails authentication costs a full AEAD/HMAC verification on the SA's
 * worker; forged ESP for a known SPI passes every check XDP can make.
 * The worker charges each failure to two GCRA buckets (one timestamp each,
 * no read-modify-write in XDP): the SA's and the foreign source's. Each
 * failure moves the bucket's theoretical arrival time (tat) one interval
 * (1 s / rate) ahead, from now at the latest; once tat runs more than
 * tolerance (burst intervals) ahead of now, the budget is spent and XDP
 * drops packets for the SA from any source other than its current
 * binding. The binding is never dropped here, so the phone keeps talking
 * through a flood, and once the flood stops the budget refills and a NAT
 * re-mapping (a new source) authenticates again.
 * Times are CLOCK_MONOTONIC ns (bpf_ktime_get_ns).
 */
struct xesp_flood_sa {
	__u64 tat;          /* theoretical arrival time of the next failure */
	__u64 tolerance;    /* burst * interval */
	__u8  bind_addr[16];/* current binding, IPv4 as ::ffff:a.b.c.d */
	__u16 bind_port;    /* network byte order; 0 for plain ESP */
	__u16 pad;
	__u32 pad2;
};

struct xesp_flood_src_key {
	__u8  addr[16];     /* IPv4 as ::ffff:a.b.c.d */
	__u16 port;         /* network byte order; 0 for plain ESP */
	__u16 pad;
};

struct xesp_flood_src {
	__u64 tat;
	__u64 tolerance;
};

#endif /* XESP_H */
