//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XDP programs of the tests and benchmarks (not of the product: those are
 * bpf/xesp.c). Configuration is in volatile const globals that the Go side
 * sets before loading, so each load is specialised and the verifier sees
 * constants.
 *
 *   xsktest_steer  IPv4/UDP (IHL 5) to `port`: an 8-byte metadata blob, then
 *                  a redirect to xsks[rx_queue * workers + payload[0] % workers]
 *   xgen_count     IPv4/UDP (IHL 5) to `port`: counted and dropped; while
 *                  stamp_on, every frame whose per-CPU count & stamp_mask
 *                  is 0 also goes to the `stamps` ring buffer as
 *                  {bpf_ktime_get_ns(), IP length, the first stamp_len
 *                  bytes from the IP header} (the bench's latency receiver)
 *   xsktest_count  every frame counted, then `verdict` (the XDP_DROP ceiling
 *                  counted where the packets end)
 *   xsktest_gen    the xsk tests' live-frames sender: XDP_TX, after
 *                  writing a random value below `spread` at `spread_offset`
 *                  when spread > 1
 *   xgen_send      the live-frames sender of bench/gen: each run takes the
 *                  next slot of xgen_frames, gives the frame that slot's
 *                  length and bytes, XDP_TX; paced when xgen_pace says so
 *
 * Everything else passes to the stack (ARP, neighbour discovery).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader. */
volatile const __u16 port = 0;    /* UDP destination port, host order */
volatile const __u32 workers = 1; /* sockets per queue (steer) */
volatile const __u32 verdict = XDP_DROP; /* xsktest_count */
volatile const __u32 spread = 0;        /* xsktest_gen */
volatile const __u32 spread_offset = 0; /* xsktest_gen */
volatile const __u32 ring = 1;      /* slots in xgen_frames (send) */
volatile const __u32 max_frame = 64; /* largest frame of a slot (send) */

/* The steering metadata (see lab/xsktest MetaLen): [0:2] UDP source port
 * as on the wire, [2] rx queue, [3] first payload byte, [4:8] magic. */
#define META_LEN 8
#define META_MAGIC 0xC3B2A1E5

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1); /* set by the loader: workers * queues */
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct count {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct count);
} counts SEC(".maps");

/* to_port returns the UDP header of an Ethernet/IPv4 (no options)/UDP frame
 * to `port`, or NULL. */
static __always_inline struct udphdr *to_port(void *data, void *end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || *(__u8 *)ip != 0x45 || ip->protocol != IPPROTO_UDP)
		return NULL;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end || udp->dest != bpf_htons(port))
		return NULL;
	return udp;
}

SEC("xdp")
int xsktest_steer(struct xdp_md *ctx)
{
	__u32 queue = ctx->rx_queue_index;
	/* Metadata first: the helper invalidates packet pointers. */
	if (bpf_xdp_adjust_meta(ctx, -META_LEN))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *meta = (void *)(long)ctx->data_meta;
	if ((void *)(meta + META_LEN) > data)
		return XDP_PASS;
	struct udphdr *udp = to_port(data, end);
	if (!udp)
		return XDP_PASS;
	__u8 *payload = (void *)(udp + 1);
	if ((void *)(payload + 1) > end)
		return XDP_PASS;
	__builtin_memcpy(meta, &udp->source, 2);
	meta[2] = queue;
	meta[3] = payload[0];
	*(__u32 *)(meta + 4) = META_MAGIC;
	/* No socket at the index: XDP_ABORTED, visible in xdp:xdp_exception. */
	return bpf_redirect_map(&xsks, queue * workers + payload[0] % workers, 0);
}

/* The latency receiver's switches: written by the Go side (mmapped .bss)
 * between trials; off (0) costs xgen_count one load and a branch. */
__u32 stamp_on = 0;
__u64 stamp_mask = 0;
__u32 stamp_len = 0;
__u64 stamp_lost = 0; /* records the ring buffer had no room for */

#define STAMP_MAX 1536
#define STAMP_HDR 16

struct stamp {
	__u64 ts;  /* bpf_ktime_get_ns (CLOCK_MONOTONIC) on arrival */
	__u32 len; /* the IP packet's length */
	__u32 pad;
	__u8 data[STAMP_MAX];
};

/* Scratch for one record: bpf_ringbuf_output takes a variable length,
 * bpf_ringbuf_reserve only a constant one. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stamp);
} stamp_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096); /* set by the loader */
} stamps SEC(".maps");

static __always_inline void stamp(struct xdp_md *ctx, __u32 iplen)
{
	__u32 zero = 0;
	struct stamp *s = bpf_map_lookup_elem(&stamp_scratch, &zero);
	if (!s)
		return;
	s->ts = bpf_ktime_get_ns();
	s->len = iplen;
	__u64 n = iplen;
	if (n > stamp_len)
		n = stamp_len;
	/* The mask gives the verifier an unsigned bound. */
	n &= 0x7ff;
	if (n == 0 || n > STAMP_MAX)
		return;
	if (bpf_xdp_load_bytes(ctx, ETH_HLEN, s->data, n))
		return;
	if (bpf_ringbuf_output(&stamps, s, STAMP_HDR + n, 0))
		__sync_fetch_and_add(&stamp_lost, 1);
}

SEC("xdp")
int xgen_count(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (!to_port(data, end))
		return XDP_PASS;
	__u32 zero = 0;
	struct count *c = bpf_map_lookup_elem(&counts, &zero);
	if (c) {
		__u64 n = c->packets++;
		c->bytes += end - data;
		if (stamp_on && (n & stamp_mask) == 0)
			stamp(ctx, (__u32)(end - data) - ETH_HLEN);
	}
	return XDP_DROP;
}

/* bench/gen's ring: slot -> {len u32, pad u32, frame[max_frame]}. No BTF
 * value type: the loader sets value_size to 8 + max_frame and max_entries
 * to ring. */
#define SLOT_HEADER 8

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, SLOT_HEADER + 64);
	__uint(max_entries, 1);
} xgen_frames SEC(".maps");

/* The next slot. A plain (not per-CPU) array: a run is sequential even if
 * the thread migrates, so the slot sequence stays 0, 1, 2, ... whatever
 * CPU runs the next batch. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xgen_next SEC(".maps");

/* Pacing for bench/gen's paced live-frames runs: with interval_ps set,
 * slot n leaves no earlier than t0 + n * interval_ps / 1000 ns, t0 being
 * when slot 0 ran (so the run's fixed start-up cost is not a burst). The
 * program spins on bpf_ktime_get_ns in a bpf_loop; it records when slot 0
 * and the last slot left, and when each slot left (xgen_sent) so a
 * latency receiver can match arrivals to send times. A slot more than
 * 50 us late moves the schedule (no catch-up burst). interval_ps = 0:
 * no pacing, no records. */
struct xgen_pace {
	__u64 interval_ps;
	__u64 t0;   /* ns, slot 0's send time (set by the program) */
	__u64 last; /* ns, the latest slot's send time */
	__u64 late; /* times the schedule moved: a slot > 50 us late */
	__u64 first; /* ns, slot 0's send time (t0 moves, this does not) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xgen_pace);
} xgen_pace SEC(".maps");

/* Per slot: the send time in ns (paced runs). The loader sets max_entries
 * to ring. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xgen_sent SEC(".maps");

/* Set by the loader to stop a paced run at once (a signal to the bench):
 * every remaining slot is dropped unsent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xgen_stop SEC(".maps");

struct xgen_wait_ctx {
	__u64 due;
	__u32 *stop;
};

static long xgen_wait(__u64 i, void *c)
{
	struct xgen_wait_ctx *w = c;
	return *w->stop || bpf_ktime_get_ns() >= w->due;
}

SEC("xdp")
int xgen_send(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *next = bpf_map_lookup_elem(&xgen_next, &zero);
	if (!next)
		return XDP_DROP;
	__u64 n = *next;
	*next = n + 1;
	/* Past the last slot it drops instead of wrapping, so a run the
	 * syscall layer restarts (EINTR: the same Repeat again) never sends a
	 * sequence number twice. */
	if (n >= ring)
		return XDP_DROP;
	struct xgen_pace *pace = bpf_map_lookup_elem(&xgen_pace, &zero);
	__u32 *stop = bpf_map_lookup_elem(&xgen_stop, &zero);
	if (!stop || *stop)
		return XDP_DROP;
	if (pace && pace->interval_ps) {
		__u64 now = bpf_ktime_get_ns();
		if (n == 0) {
			pace->t0 = now;
			pace->first = now;
		} else {
			__u64 off = n * pace->interval_ps / 1000;
			__u64 due = pace->t0 + off;
			if (now < due) {
				/* At most ~2^20 clock reads (tens of ms). */
				struct xgen_wait_ctx w = {.due = due, .stop = stop};
				bpf_loop(1 << 20, xgen_wait, &w, 0);
				if (*stop)
					return XDP_DROP;
				now = bpf_ktime_get_ns();
			} else if (now > due + 50000) {
				/* More than 50 us late (the sender's CPU was taken
				 * away): move the schedule instead of catching up
				 * in a burst the receiver never asked for. The
				 * trial's offered rate drops, and says so. */
				pace->t0 = now - off;
				pace->late++;
			}
		}
		pace->last = now;
		__u32 k = n;
		bpf_map_update_elem(&xgen_sent, &k, &now, BPF_ANY);
	}
	__u32 key = n;
	__u8 *slot = bpf_map_lookup_elem(&xgen_frames, &key);
	if (!slot)
		return XDP_DROP;
	__u32 len = *(__u32 *)slot;
	if (len < ETH_HLEN || len > max_frame)
		return XDP_DROP;
	/* Shrink the template frame to the slot's length (adjust_tail grows
	 * only into tailroom, so the template is max_frame long). */
	int delta = (int)len - (int)bpf_xdp_get_buff_len(ctx);
	if (bpf_xdp_adjust_tail(ctx, delta))
		return XDP_DROP;
	if (bpf_xdp_store_bytes(ctx, 0, slot + SLOT_HEADER, len))
		return XDP_DROP;
	return XDP_TX;
}

SEC("xdp")
int xsktest_gen(struct xdp_md *ctx)
{
	if (spread > 1) {
		__u8 *b = (void *)(long)ctx->data + spread_offset;
		if ((void *)(b + 1) <= (void *)(long)ctx->data_end)
			*b = bpf_get_prandom_u32() % spread;
	}
	return XDP_TX;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xsktest_counts SEC(".maps");

SEC("xdp")
int xsktest_count(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&xsktest_counts, &zero);
	if (n)
		(*n)++;
	return verdict;
}
