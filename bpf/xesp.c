//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xesp_public and xesp_private: the kernel half of the ESP fast path.
 *
 * Parsing follows xdp-tools: a cursor and one bounds-checked parse_* per
 * header, so each program body reads as a list of decisions. Every return
 * goes through verdict(), which counts exactly one enum xesp_reason.
 *
 * Both programs are built as xdp.frags so they attach to interfaces with an
 * MTU above one page (~3500 on veth). The cost is one bpf_xdp_get_buff_len
 * per packet: IP lengths are checked against the whole frame, while every
 * header we read or move must sit in the linear part (for any sane driver
 * it does; if not, bounds checks fail and the packet passes as malformed).
 * A multi-buffer frame redirected to an AF_XDP socket needs the socket
 * bound with XDP_USE_SG, or the kernel drops it.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xesp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The metadata struct and the enums only appear in inlined code, which
 * leaves them out of BTF; these unused globals put them there for
 * bpf2go. */
struct xesp_meta *xesp_meta_btf __attribute__((unused));
enum xesp_reason xesp_reason_btf __attribute__((unused));
enum xesp_meta_kind xesp_meta_kind_btf __attribute__((unused));
enum xesp_meta_magic xesp_meta_magic_btf __attribute__((unused));
enum xesp_sa_flag xesp_sa_flag_btf __attribute__((unused));
enum xesp_core_flag xesp_core_flag_btf __attribute__((unused));

/* Capacities are placeholders: the loader sets max_entries at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, __u32); /* SPI, host byte order */
	__type(value, struct xesp_sa);
} sas SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 16);
	__type(key, struct xesp_policy_key);
	__type(value, struct xesp_policy);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, struct xesp_core_key);
	__type(value, struct xesp_policy);
} cores SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xesp_core_cfg);
} core_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xesp_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XESP_REASON_MAX);
	__type(key, __u32);
	__type(value, struct xesp_counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, struct xesp_binding_key);
	__type(value, struct xesp_keepalive);
} keepalives SEC(".maps");

/* One XSKMAP per side: see "AF_XDP socket maps" in xesp.h. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xsks_public SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xsks_private SEC(".maps");

/* Flood budgets: see xesp.h. Separate maps from the SA map so the SA
 * map's layout and its writers (the manager) stay as they are. */
/* LRU: a full map evicts an idle SA's entry rather than refusing the
 * entry of an SA under attack now. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32); /* SPI, host byte order */
	__type(value, struct xesp_flood_sa);
} flood_sas SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, struct xesp_flood_src_key);
	__type(value, struct xesp_flood_src);
} flood_srcs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32); /* SPI, host byte order */
	__type(value, __u64);
} flood_drops SEC(".maps");

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IPPROTO_ESP_ 50
#define IPV6_FRAGMENT_ 44
#define IPPROTO_TCP_ 6
#define IP_MF_ 0x2000
#define IP_OFFMASK_ 0x1fff
#define UDP_HLEN 8
/* Largest L2+L3 header the strip path moves: Ethernet, one tag, IPv4 with
 * 40 bytes of options (78); rounded up. */
#define MAX_MOVED_HDR 80
#define MAX_MOVED_HDR_BUF (ETH_HLEN + 0x7f + 1)

struct hdr_cursor {
	void *pos;
};

struct vlan_hdr_ {
	__be16 tci;
	__be16 proto;
};

/* Bytes count the frame as it arrived, before any strip. */
static __always_inline int verdict(__u32 pkt_len, enum xesp_reason reason, int action)
{
	__u32 key = reason;
	struct xesp_counter *c = bpf_map_lookup_elem(&counters, &key);

	if (c) {
		c->packets++;
		c->bytes += pkt_len;
	}
	return action;
}

/* Ethernet plus at most one 802.1Q/802.1ad tag. Returns the EtherType in
 * network order, or -1 if truncated; *vid is the tag's VLAN ID, 0 when
 * untagged. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end, __u16 *vid)
{
	struct ethhdr *eth = nh->pos;
	__be16 proto;

	*vid = 0;
	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q_) || proto == bpf_htons(ETH_P_8021AD_)) {
		struct vlan_hdr_ *vh = nh->pos;

		if ((void *)(vh + 1) > data_end)
			return -1;
		nh->pos = vh + 1;
		proto = vh->proto;
		*vid = bpf_ntohs(vh->tci) & 0x0fff;
	}
	return proto;
}

/* A side with a VLAN takes only frames tagged with it; the others (the
 * host's own untagged traffic, other VLANs) belong to the kernel. */
static __always_inline int other_vlan(__u16 want, __u16 vid)
{
	return want && vid != want;
}

/* IPv4 header with options. avail is what the frame holds from the IP
 * header on, fragments of a multi-buffer frame included. Returns the
 * protocol, -1 if truncated or invalid (version, IHL < 5, total length
 * shorter than the header or longer than the frame). */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end, __u32 avail, struct iphdr **iphdr)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;
	__u16 tot;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->version != 4 || iph->ihl < 5)
		return -1;
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return -1;
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hdrsize || tot > avail)
		return -1;
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/* IPv6 fixed header only (avail as for parse_iphdr). Returns the next
 * header, -1 if truncated or invalid (version, payload length 0 =
 * jumbogram, or beyond the frame). */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end, __u32 avail, struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;
	__u16 plen;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	if (ip6h->version != 6)
		return -1;
	plen = bpf_ntohs(ip6h->payload_len);
	if (plen == 0 || sizeof(*ip6h) + plen > avail)
		return -1;
	nh->pos = ip6h + 1;
	*ip6hdr = ip6h;
	return ip6h->nexthdr;
}

/* UDP header. Returns the UDP length field, -1 if the header is truncated. */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end, struct udphdr **udphdr)
{
	struct udphdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	nh->pos = h + 1;
	*udphdr = h;
	return bpf_ntohs(h->len);
}

/* A keepalive from a known binding stamps it: idle-phone detection reads
 * the stamp; nothing else (a keepalive is not authenticated, so it never
 * moves a binding). Unknown sources are only counted by the verdict. */
static __always_inline void count_keepalive(struct iphdr *iph, struct ipv6hdr *ip6h, __be16 sport)
{
	struct xesp_binding_key key = {.port = sport};
	struct xesp_keepalive *k;

	if (iph) {
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &iph->saddr, 4);
	} else if (ip6h) {
		__builtin_memcpy(key.addr, &ip6h->saddr, 16);
	} else {
		return;
	}
	k = bpf_map_lookup_elem(&keepalives, &key);
	if (!k)
		return;
	__sync_fetch_and_add(&k->packets, 1);
	k->last_ns = bpf_ktime_get_ns();
}

static __always_inline struct xesp_config load_config(void)
{
	__u32 zero = 0;
	struct xesp_config *c = bpf_map_lookup_elem(&config, &zero);
	struct xesp_config cfg = {.natt_port = 4500, .workers = 1};

	if (c) {
		if (c->natt_port)
			cfg.natt_port = c->natt_port;
		if (c->workers)
			cfg.workers = c->workers;
		cfg.public_vlan = c->public_vlan;
		cfg.private_vlan = c->private_vlan;
	}
	return cfg;
}

/* RFC 1624 incremental checksum update for one 16-bit word. */
static __always_inline __u16 csum_replace2(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check + (__u16)~old + new;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* Puts m in front of the frame, magic added. Returns 0 or -1 when the
 * driver has no room (kernel limit: the packet is dropped as aborted).
 * Every byte is written, so nothing of an earlier use of the frame's
 * headroom survives into what the worker reads. */
static __always_inline int put_meta(struct xdp_md *ctx, struct xesp_meta *m)
{
	struct xesp_meta *meta;
	void *data;

	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(*meta)))
		return -1;
	meta = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
	if ((void *)(meta + 1) > data)
		return -1;
	m->magic = XESP_META_MAGIC;
	__builtin_memcpy(meta, m, sizeof(*m));
	return 0;
}

/* Moves n bytes at the frame start 8 bytes forward, inside the packet. n
 * is a compile-time constant so clang expands the memmove to loads and
 * stores the verifier can check. */
#define MOVE_FWD(ctx, n)                                                                   \
	({                                                                                 \
		void *d = (void *)(long)(ctx)->data;                                       \
		int r = -1;                                                                \
		if (d + (n) + UDP_HLEN <= (void *)(long)(ctx)->data_end) {                 \
			__builtin_memmove(d + UDP_HLEN, d, (n));                           \
			r = 0;                                                             \
		}                                                                          \
		r;                                                                         \
	})

/*
 * RFC 3948 decapsulation: move L2+L3 headers 8 bytes forward over the UDP
 * header and drop the first 8 bytes. The common header sizes (IPv4 without
 * options, IPv6, each with or without a tag) are moved in place with a
 * constant-size memmove; the rest (IPv4 options) go through the stack with
 * bpf_xdp_load/store_bytes, because the verifier accepts a bounded
 * variable-length copy there but not a variable overlapping move in the
 * packet.
 */
static __always_inline int strip_udp(struct xdp_md *ctx, __u32 hdr_len)
{
	__u8 buf[MAX_MOVED_HDR_BUF];
	__u32 n;
	int r;

	switch (hdr_len) {
	case ETH_HLEN + 20:
		r = MOVE_FWD(ctx, ETH_HLEN + 20);
		break;
	case ETH_HLEN + 4 + 20:
		r = MOVE_FWD(ctx, ETH_HLEN + 4 + 20);
		break;
	case ETH_HLEN + 40:
		r = MOVE_FWD(ctx, ETH_HLEN + 40);
		break;
	case ETH_HLEN + 4 + 40:
		r = MOVE_FWD(ctx, ETH_HLEN + 4 + 40);
		break;
	default:
		if (hdr_len > MAX_MOVED_HDR || hdr_len < ETH_HLEN)
			return -1;
		/* Same value, but in a form whose bounds survive clang's
		 * rewriting of the range check: 14 <= n < sizeof(buf). */
		n = ((hdr_len - ETH_HLEN) & 0x7f) + ETH_HLEN;
		if (bpf_xdp_load_bytes(ctx, 0, buf, n))
			return -1;
		if (bpf_xdp_adjust_head(ctx, UDP_HLEN))
			return -1;
		return bpf_xdp_store_bytes(ctx, 0, buf, n) ? -1 : 0;
	}
	if (r)
		return r;
	return bpf_xdp_adjust_head(ctx, UDP_HLEN) ? -1 : 0;
}

static __always_inline int steer(struct xdp_md *ctx, void *xsks, __u16 workers, __u16 worker)
{
	__u32 idx;

	/* A worker beyond the configured count would land in the next
	 * queue's slots: refuse instead of misdelivering. */
	if (worker >= workers)
		return XDP_ABORTED;
	idx = ctx->rx_queue_index * workers + worker;
	/* flags 0: an empty slot makes the helper return XDP_ABORTED (0),
	 * which the callers count as no_xsk and turn into XDP_DROP. With a
	 * socket there it returns XDP_REDIRECT; BPF_PROG_TEST_RUN reports
	 * that verdict without performing the redirect. */
	return bpf_redirect_map(xsks, idx, 0);
}

/*
 * flood_check is the flood-budget verdict for a packet of SA spi from
 * src (16 bytes, IPv4-mapped) and UDP source port sport (network order;
 * 0 for plain ESP): 0 to go on, else the drop reason. Without an entry in
 * flood_sas (no failed authentication yet) it costs one hash lookup.
 */
static __always_inline int flood_check(__u32 spi, const __u64 *src, __u16 sport)
{
	struct xesp_flood_sa *f = bpf_map_lookup_elem(&flood_sas, &spi);
	struct xesp_flood_src_key k = {};
	struct xesp_flood_src *s;
	int reason = 0;
	__u64 now, *n;

	if (!f)
		return 0;
	/* bind_addr sits 8-byte aligned in the value (offset 16) */
	if (f->bind_port == sport && ((__u64 *)f->bind_addr)[0] == src[0] && ((__u64 *)f->bind_addr)[1] == src[1])
		return 0; /* the current binding is never starved */
	now = bpf_ktime_get_ns();
	if (f->tat > now + f->tolerance) {
		reason = XESP_DROP_FLOOD_SA;
	} else {
		__builtin_memcpy(k.addr, src, 16);
		k.port = sport;
		s = bpf_map_lookup_elem(&flood_srcs, &k);
		if (s && s->tat > now + s->tolerance)
			reason = XESP_DROP_FLOOD_SRC;
	}
	if (!reason)
		return 0;
	n = bpf_map_lookup_elem(&flood_drops, &spi);
	if (n) {
		__sync_fetch_and_add(n, 1);
	} else {
		__u64 one = 1;

		bpf_map_update_elem(&flood_drops, &spi, &one, BPF_NOEXIST);
	}
	return reason;
}

/* src16 writes the packet's outer source address IPv4-mapped. */
static __always_inline void src16(__u64 *out64, struct iphdr *iph, struct ipv6hdr *ip6h)
{
	__u8 *out = (__u8 *)out64;

	if (iph) {
		__builtin_memset(out, 0, 10);
		out[10] = 0xff;
		out[11] = 0xff;
		__builtin_memcpy(out + 12, &iph->saddr, 4);
	} else if (ip6h) {
		__builtin_memcpy(out, &ip6h->saddr, 16);
	}
}

SEC("xdp.frags")
int xesp_public(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = {.pos = data};
	/* The whole frame, fragments of a multi-buffer (xdp.frags) frame
	 * included: IP lengths are checked against it, counters count it. */
	__u32 pkt_len = bpf_xdp_get_buff_len(ctx);
	struct iphdr *iph = NULL;
	struct ipv6hdr *ip6h = NULL;
	struct udphdr *udph;
	struct xesp_config cfg;
	struct xesp_sa *sa;
	__u32 l3_off, l4_off, ip_payload, spi;
	__u8 *payload;
	struct xesp_meta meta = {};
	__u64 src[2] = {};
	int proto, udp_len, flood;
	__be16 sport;
	__u16 vid;

	proto = parse_ethhdr(&nh, data_end, &vid);
	if (proto < 0)
		return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
	l3_off = nh.pos - data;
	cfg = load_config();
	if (other_vlan(cfg.public_vlan, vid))
		return verdict(pkt_len, XESP_PASS_OTHER_VLAN, XDP_PASS);

	if (proto == bpf_htons(ETH_P_IP)) {
		proto = parse_iphdr(&nh, data_end, pkt_len - l3_off, &iph);
		if (proto < 0)
			return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
		/* Non-first fragments carry no L4 header: never read one. */
		if (iph->frag_off & bpf_htons(IP_MF_ | IP_OFFMASK_))
			return verdict(pkt_len, XESP_PASS_FRAGMENT, XDP_PASS);
		ip_payload = bpf_ntohs(iph->tot_len) - iph->ihl * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ip6hdr(&nh, data_end, pkt_len - l3_off, &ip6h);
		if (proto < 0)
			return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
		if (proto == IPV6_FRAGMENT_)
			return verdict(pkt_len, XESP_PASS_FRAGMENT, XDP_PASS);
		/* Other extension headers fall to PASS_OTHER below: RFC 3948
		 * peers do not send them, and the kernel handles them. */
		ip_payload = bpf_ntohs(ip6h->payload_len);
	} else {
		return verdict(pkt_len, XESP_PASS_NOT_IP, XDP_PASS);
	}
	l4_off = nh.pos - data;
	meta.l3_off = l3_off;
	meta.family = iph ? 4 : 6;

	if (proto == IPPROTO_ESP_) {
		if (ip_payload < sizeof(__u32) * 2 + 8)
			return verdict(pkt_len, XESP_DROP_RUNT, XDP_DROP);
		payload = nh.pos;
		if ((void *)(payload + 4) > data_end)
			return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
		spi = bpf_ntohl(*(__be32 *)payload);
		sa = bpf_map_lookup_elem(&sas, &spi);
		if (!sa)
			return verdict(pkt_len, XESP_DROP_NO_SA, XDP_DROP);
		src16(src, iph, ip6h);
		flood = flood_check(spi, src, 0);
		if (flood)
			return verdict(pkt_len, flood, XDP_DROP);
		meta.sa_index = sa->sa_index;
		meta.worker = sa->worker;
		meta.l4_off = l4_off;
		meta.l3_len = l4_off - l3_off + ip_payload;
		meta.kind = XESP_META_ESP;
		__builtin_memcpy(meta.src, src, sizeof(meta.src));
		if (put_meta(ctx, &meta))
			return verdict(pkt_len, XESP_ABORTED, XDP_ABORTED);
		if (steer(ctx, &xsks_public, cfg.workers, sa->worker) != XDP_REDIRECT)
			return verdict(pkt_len, XESP_DROP_NO_XSK, XDP_DROP);
		return verdict(pkt_len, XESP_REDIRECT_ESP, XDP_REDIRECT);
	}
	if (proto != IPPROTO_UDP)
		return verdict(pkt_len, XESP_PASS_OTHER, XDP_PASS);

	udp_len = parse_udphdr(&nh, data_end, &udph);
	/* The IP length, not data_end, says whether a UDP header is there:
	 * Ethernet padding may fill the gap. */
	if (udp_len < 0 || ip_payload < UDP_HLEN)
		return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
	if (udph->dest != bpf_htons(cfg.natt_port))
		return verdict(pkt_len, XESP_PASS_OTHER, XDP_PASS);
	/* From here the packet is ours: inconsistencies are drops. Ethernet
	 * padding after short frames is why the UDP length, not data_end,
	 * delimits the payload. */
	if (udp_len < UDP_HLEN || udp_len > ip_payload)
		return verdict(pkt_len, XESP_DROP_BAD_UDP_LEN, XDP_DROP);
	udp_len -= UDP_HLEN;
	payload = nh.pos;
	if (udp_len == 1) {
		if ((void *)(payload + 1) > data_end)
			return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
		if (payload[0] == 0xff) {
			count_keepalive(iph, ip6h, udph->source);
			return verdict(pkt_len, XESP_DROP_KEEPALIVE, XDP_DROP);
		}
		return verdict(pkt_len, XESP_DROP_RUNT, XDP_DROP);
	}
	if (udp_len >= 4) {
		if ((void *)(payload + 4) > data_end)
			return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
		if (*(__u32 *)payload == 0)
			return verdict(pkt_len, XESP_PASS_IKE, XDP_PASS);
	}
	if (udp_len < 16)
		return verdict(pkt_len, XESP_DROP_RUNT, XDP_DROP);
	if ((void *)(payload + 4) > data_end)
		return verdict(pkt_len, XESP_PASS_MALFORMED, XDP_PASS);
	spi = bpf_ntohl(*(__be32 *)payload);
	sa = bpf_map_lookup_elem(&sas, &spi);
	if (!sa)
		return verdict(pkt_len, XESP_DROP_NO_SA, XDP_DROP);
	sport = udph->source;
	src16(src, iph, ip6h);
	flood = flood_check(spi, src, sport);
	if (flood)
		return verdict(pkt_len, flood, XDP_DROP);

	/* Fix L3 in place first: the stripped copy carries the new fields. */
	if (iph) {
		__u16 old_len = iph->tot_len;
		__u16 new_len = bpf_htons(bpf_ntohs(old_len) - UDP_HLEN);
		__u16 old_w = *(__u16 *)&iph->ttl; /* ttl, protocol */
		__u16 new_w;

		iph->protocol = IPPROTO_ESP_;
		new_w = *(__u16 *)&iph->ttl;
		iph->tot_len = new_len;
		iph->check = csum_replace2(iph->check, old_len, new_len);
		iph->check = csum_replace2(iph->check, old_w, new_w);
	} else if (ip6h) {
		ip6h->nexthdr = IPPROTO_ESP_;
		ip6h->payload_len = bpf_htons(bpf_ntohs(ip6h->payload_len) - UDP_HLEN);
	}
	if (strip_udp(ctx, l4_off))
		return verdict(pkt_len, XESP_ABORTED, XDP_ABORTED);
	/* After the strip ESP sits where the UDP header was, and the IP
	 * packet is 8 bytes shorter. */
	meta.sa_index = sa->sa_index;
	meta.worker = sa->worker;
	meta.sport = sport;
	meta.l4_off = l4_off;
	meta.l3_len = l4_off - l3_off + ip_payload - UDP_HLEN;
	meta.kind = XESP_META_ESP_UDP;
	__builtin_memcpy(meta.src, src, sizeof(meta.src));
	if (put_meta(ctx, &meta))
		return verdict(pkt_len, XESP_ABORTED, XDP_ABORTED);
	if (steer(ctx, &xsks_public, cfg.workers, sa->worker) != XDP_REDIRECT)
		return verdict(pkt_len, XESP_DROP_NO_XSK, XDP_DROP);
	return verdict(pkt_len, XESP_REDIRECT_ESP_UDP, XDP_REDIRECT);
}

/* Destination port of a UDP or TCP packet whose L4 header follows at the
 * cursor, network byte order; 0 when there is none to read (other
 * protocols, non-first fragments, truncated). Ports never decide alone:
 * the worker checks the SA's selectors again. */
static __always_inline __be16 l4_dport(struct hdr_cursor *nh, void *data_end, int proto)
{
	struct udphdr *h = nh->pos; /* the ports sit at the same offsets in TCP */

	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP_)
		return 0;
	if ((void *)(h + 1) > data_end)
		return 0;
	return h->dest;
}

/* The exact-match step: (core address, port), then (core address, any
 * port), each only when the config says such entries exist. NULL when
 * neither is there: the trie decides. */
static __always_inline struct xesp_policy *lookup_core(struct xesp_policy_key *key, __be16 dport, __u32 flags,
							enum xesp_reason *reason)
{
	struct xesp_core_key ck = {.port = dport};
	struct xesp_policy *pol;

	__builtin_memcpy(ck.addr, key->addr, sizeof(ck.addr));
	if (dport && (flags & XESP_CORE_F_PORT)) {
		pol = bpf_map_lookup_elem(&cores, &ck);
		if (pol) {
			*reason = XESP_PRIV_REDIRECT_CORE_PORT;
			return pol;
		}
	}
	if (!(flags & XESP_CORE_F_ANY))
		return NULL;
	ck.port = 0;
	pol = bpf_map_lookup_elem(&cores, &ck);
	if (pol)
		*reason = XESP_PRIV_REDIRECT_CORE;
	return pol;
}

SEC("xdp.frags")
int xesp_private(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = {.pos = data};
	/* The whole frame, fragments of a multi-buffer (xdp.frags) frame
	 * included: IP lengths are checked against it, counters count it. */
	__u32 pkt_len = bpf_xdp_get_buff_len(ctx);
	struct xesp_policy_key key = {.prefixlen = 128};
	enum xesp_reason reason = XESP_PRIV_REDIRECT;
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	struct xesp_policy *pol;
	struct xesp_core_cfg *cc;
	struct xesp_config cfg;
	struct xesp_meta meta = {};
	__be16 dport = 0;
	__u32 l3_off, l4_off, l3_len, zero = 0;
	__u8 family;
	int proto;
	__u16 vid;

	proto = parse_ethhdr(&nh, data_end, &vid);
	if (proto < 0)
		return verdict(pkt_len, XESP_PRIV_PASS_MALFORMED, XDP_PASS);
	l3_off = nh.pos - data;
	cfg = load_config();
	if (other_vlan(cfg.private_vlan, vid))
		return verdict(pkt_len, XESP_PRIV_PASS_OTHER_VLAN, XDP_PASS);

	if (proto == bpf_htons(ETH_P_IP)) {
		proto = parse_iphdr(&nh, data_end, pkt_len - l3_off, &iph);
		if (proto < 0)
			return verdict(pkt_len, XESP_PRIV_PASS_MALFORMED, XDP_PASS);
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &iph->daddr, 4);
		family = 4;
		l3_len = bpf_ntohs(iph->tot_len);
		/* Only a first fragment (or a whole packet) has ports. */
		if (!(iph->frag_off & bpf_htons(IP_OFFMASK_)))
			dport = l4_dport(&nh, data_end, proto);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ip6hdr(&nh, data_end, pkt_len - l3_off, &ip6h);
		if (proto < 0)
			return verdict(pkt_len, XESP_PRIV_PASS_MALFORMED, XDP_PASS);
		__builtin_memcpy(key.addr, &ip6h->daddr, 16);
		family = 6;
		l3_len = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
		dport = l4_dport(&nh, data_end, proto);
	} else {
		return verdict(pkt_len, XESP_PRIV_PASS_NOT_IP, XDP_PASS);
	}
	l4_off = nh.pos - data;
	/* Exact match first (per-phone core addresses), then the trie
	 * (prefixes of SAs without a core address). */
	pol = NULL;
	cc = bpf_map_lookup_elem(&core_cfg, &zero);
	if (cc && cc->flags)
		pol = lookup_core(&key, dport, cc->flags, &reason);
	if (!pol)
		pol = bpf_map_lookup_elem(&policies, &key);
	if (!pol)
		return verdict(pkt_len, XESP_PRIV_PASS_NO_POLICY, XDP_PASS);
	meta.sa_index = pol->sa_index;
	meta.worker = pol->worker;
	meta.l3_off = l3_off;
	meta.l4_off = l4_off;
	meta.l3_len = l3_len;
	meta.family = family;
	meta.kind = XESP_META_CLEAR;
	if (put_meta(ctx, &meta))
		return verdict(pkt_len, XESP_PRIV_ABORTED, XDP_ABORTED);
	if (steer(ctx, &xsks_private, cfg.workers, pol->worker) != XDP_REDIRECT)
		return verdict(pkt_len, XESP_PRIV_DROP_NO_XSK, XDP_DROP);
	return verdict(pkt_len, reason, XDP_REDIRECT);
}

/*
 * xesp_xsk_probe is never attached: the daemon's health check runs it
 * through BPF_PROG_TEST_RUN to ask whether its AF_XDP sockets are still
 * in the XSK maps, because the map syscall cannot read an XSKMAP slot
 * (lookup from user space is EOPNOTSUPP) while a program can. Input at
 * the frame start: __u32 slot index, __u32 side (0 public, 1 private),
 * host order. XDP_PASS: a socket is there; XDP_DROP: the slot is empty;
 * XDP_ABORTED: the input is short.
 */
SEC("xdp")
int xesp_xsk_probe(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 *in = data;
	__u32 idx;

	if ((void *)(in + 2) > data_end)
		return XDP_ABORTED;
	idx = in[0];
	if (in[1] == 0)
		return bpf_map_lookup_elem(&xsks_public, &idx) ? XDP_PASS : XDP_DROP;
	return bpf_map_lookup_elem(&xsks_private, &idx) ? XDP_PASS : XDP_DROP;
}
