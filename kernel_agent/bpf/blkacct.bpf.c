// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * blkacct: the kernel agent's view of block devices served from user space.
 *
 * For every device (kernel dev_t, MAJOR << 20 | MINOR) that user space writes
 * into a slot of `ka_slots`, count completed I/Os and bytes per operation,
 * in-flight requests, errors and a log2 histogram of issue -> complete
 * latency, and send an event to the `ka_events` ring buffer for every I/O
 * slower than the device's threshold and every error.
 *
 * Why slots and arrays, not hash maps keyed by dev_t: these programs run
 * twice per I/O of every block device on the machine.  With hash maps the
 * two lookups per program (config, counters) are most of their cost
 * (measured with kernel.bpf_stats_enabled: ~1.5 us per I/O under TCG;
 * docs/ebpf.md).
 * Array lookups are inlined by the verifier into a bounds check and an
 * address computation, and a watched device is found by comparing its
 * dev_t with KA_MAX_DEVS slots of one array value.  User space keeps the
 * slot of each device (kernel_agent/accounting.py); slot i's config is
 * `ka_devices[i]`, its counters `ka_stats[i]`.
 *
 * Two attachments of the same logic, chosen by the loader (kernel_agent/accounting.py)
 * with bpf_program__set_autoload():
 *   - tp_btf/block_rq_{issue,requeue,complete}: typed access to `struct request`
 *     (CO-RE); latency from the request's own start_time_ns (see the fast
 *     path below) or, with KA_F_PRECISE, issue times keyed by its address;
 *   - tracepoint/block/block_rq_{issue,complete}: the classic trace events,
 *     for kernels without BTF; start times keyed by (dev, sector).
 *
 * Counters live in a PERCPU_ARRAY so the hot path needs no atomics; user space
 * sums the CPUs.  In-flight is +1 on one CPU and -1 on another: only the sum
 * means anything.  I/Os and bytes are counted at completion, so an I/O issued
 * before the device was registered is not counted (consistent: no negative
 * in-flight).  The layouts below are mirrored in kernel_agent/accounting.py;
 * keep them in sync (a test checks the sizes against this file's BTF).
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define KA_NR_OPS 5     /* read, write, flush, discard, other */
#define KA_NR_SLOTS 32  /* log2(latency in microseconds) buckets */
#define KA_EV_SLOW 1
#define KA_EV_ERROR 2

enum ka_op { KA_READ = 0, KA_WRITE = 1, KA_FLUSH = 2, KA_DISCARD = 3, KA_OTHER = 4 };

#define KA_F_PRECISE 1  /* time issue -> complete through ka_starts (see below) */
#define KA_MAX_DEVS 16  /* watched devices per agent instance */

struct ka_slots {
	__u32 dev[KA_MAX_DEVS];  /* 0: free (no disk has dev_t 0) */
};

struct ka_dev_cfg {
	__u64 slow_ns;   /* 0: no slow-I/O events */
	__u64 flags;     /* KA_F_* */
	__u64 since_ns;  /* when user space started watching (CLOCK_MONOTONIC) */
	__u64 pad;
};

struct ka_dev_stats {
	__u64 ios[KA_NR_OPS];
	__u64 bytes[KA_NR_OPS];
	__u64 errors;
	__s64 in_flight;
	__u64 slow;
	__u64 lat_sum_ns;
	__u64 events_dropped;
	__u64 hist[KA_NR_SLOTS];
};

struct ka_start_key {
	__u64 a;  /* tp_btf: the request's address; tracepoint: dev */
	__u64 b;  /* tp_btf: 0; tracepoint: start sector */
};

struct ka_start {
	__u64 ts_ns;
	__u32 dev;
	__u32 op;
};

struct ka_event {
	__u64 ts_ns;   /* completion time, CLOCK_MONOTONIC */
	__u64 lat_ns;
	__u64 sector;
	__u32 dev;
	__u32 bytes;
	__u32 op;
	__s32 error;   /* blk_status_t (tp_btf) or -errno (tracepoint) */
	__u32 kind;    /* KA_EV_SLOW | KA_EV_ERROR */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ka_slots);
} ka_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KA_MAX_DEVS);
	__type(key, __u32);
	__type(value, struct ka_dev_cfg);
} ka_devices SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KA_MAX_DEVS);
	__type(key, __u32);
	__type(value, struct ka_dev_stats);
} ka_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ka_start_key);
	__type(value, struct ka_start);
} ka_starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} ka_events SEC(".maps");

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, s;

	s = (v > 0xFFFFFFFFULL) << 5; v >>= s; r |= s;
	s = (v > 0xFFFF) << 4; v >>= s; r |= s;
	s = (v > 0xFF) << 3; v >>= s; r |= s;
	s = (v > 0xF) << 2; v >>= s; r |= s;
	s = (v > 0x3) << 1; v >>= s; r |= s;
	r |= (v >> 1);
	return r;
}

/* REQ_OP_* values (include/linux/blk_types.h, stable since 4.10). */
static __always_inline __u32 op_of(__u32 cmd_flags)
{
	switch (cmd_flags & 0xff) {
	case 0: return KA_READ;
	case 1: return KA_WRITE;
	case 2: return KA_FLUSH;
	case 3: return KA_DISCARD;
	default: return KA_OTHER;
	}
}

/* The slot of a watched device, or -1. */
static __always_inline int slot_of(__u32 dev)
{
	__u32 zero = 0;
	struct ka_slots *s = bpf_map_lookup_elem(&ka_slots, &zero);

	if (!s || !dev)
		return -1;
#pragma unroll
	for (int i = 0; i < KA_MAX_DEVS; i++)
		if (s->dev[i] == dev)
			return i;
	return -1;
}

/* The config of a watched device (and its slot in *slot), or NULL. */
static __always_inline struct ka_dev_cfg *cfg_of(__u32 dev, __u32 *slot)
{
	int i = slot_of(dev);

	if (i < 0)
		return NULL;
	*slot = i;
	return bpf_map_lookup_elem(&ka_devices, slot);
}

static __always_inline void on_issue(__u32 dev, __u32 slot, struct ka_start_key *key, __u32 op)
{
	struct ka_dev_stats *st;
	struct ka_start start = {};

	start.ts_ns = bpf_ktime_get_ns();
	start.dev = dev;
	start.op = op;
	/* A requeued request is issued again: refresh its start time, but it is
	 * still one I/O in flight. */
	if (bpf_map_update_elem(&ka_starts, key, &start, BPF_NOEXIST) != 0) {
		bpf_map_update_elem(&ka_starts, key, &start, BPF_EXIST);
		return;
	}
	st = bpf_map_lookup_elem(&ka_stats, &slot);
	if (st)
		st->in_flight++;
}

/* Count one completion that started at start_ns (and send an event if it
 * was slow or failed). */
static __always_inline void account(struct ka_dev_cfg *cfg, __u32 dev, __u32 slot,
				    __u64 start_ns,
				    __u32 op, __s32 error, __u64 nr_bytes, __u64 sector,
				    int partial)
{
	struct ka_dev_stats *st;
	struct ka_event *ev;
	__u64 now, lat;
	__u32 bucket;

	st = bpf_map_lookup_elem(&ka_stats, &slot);
	if (!st)
		return;
	op = op < KA_NR_OPS ? op : KA_OTHER;
	st->bytes[op] += nr_bytes;
	if (partial)  /* more completions of this request follow */
		return;
	now = bpf_ktime_get_ns();
	lat = now - start_ns;
	st->ios[op]++;
	st->in_flight--;
	st->lat_sum_ns += lat;
	bucket = log2_u64(lat / 1000);
	if (bucket >= KA_NR_SLOTS)
		bucket = KA_NR_SLOTS - 1;
	/* clang may drop the clamp's bound on the index: re-bound it visibly. */
	barrier_var(bucket);
	st->hist[bucket & (KA_NR_SLOTS - 1)]++;
	if (error)
		st->errors++;
	if (cfg->slow_ns && lat >= cfg->slow_ns)
		st->slow++;
	else if (!error)
		return;
	ev = bpf_ringbuf_reserve(&ka_events, sizeof(*ev), 0);
	if (!ev) {
		st->events_dropped++;
		return;
	}
	ev->ts_ns = now;
	ev->lat_ns = lat;
	ev->sector = sector;
	ev->dev = dev;
	ev->bytes = nr_bytes;
	ev->op = op;
	ev->error = error;
	ev->kind = (error ? KA_EV_ERROR : 0) |
		   ((cfg->slow_ns && lat >= cfg->slow_ns) ? KA_EV_SLOW : 0);
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* The precise path: the start time comes from ka_starts. */
static __always_inline void on_complete(struct ka_dev_cfg *cfg, __u32 dev, __u32 slot,
					struct ka_start_key *key, __s32 error, __u64 nr_bytes,
					__u64 sector, int partial)
{
	struct ka_start *start = bpf_map_lookup_elem(&ka_starts, key);
	__u64 ts;
	__u32 op;

	if (!start)
		return;  /* issued before we watched the device */
	ts = start->ts_ns;
	op = start->op;
	if (!partial)
		bpf_map_delete_elem(&ka_starts, key);
	account(cfg, dev, slot, ts, op, error, nr_bytes, sector, partial);
}

/* ---- tp_btf: typed, CO-RE ------------------------------------------------ */

/* tp_btf arguments are typed kernel pointers: plain loads (relocated by CO-RE
 * through vmlinux.h's preserve_access_index) are checked by the verifier and
 * cost one instruction each, where BPF_CORE_READ would call
 * bpf_probe_read_kernel() for every field.  This is the hot path. */
static __always_inline __u32 rq_dev(struct request *rq)
{
	struct gendisk *disk = rq->q->disk;

	if (!disk)
		return 0;
	return ((__u32)disk->major << 20) | (__u32)disk->first_minor;
}

/*
 * The fast path (default): blk-mq stamps every request with start_time_ns
 * when it is allocated (whenever iostats or a scheduler is on), so the
 * latency is complete - start_time_ns, the same interval iostat's await
 * uses, and no per-request map entry is needed: two map updates and a
 * lookup fewer per I/O, which is most of this program's cost.  Requests
 * allocated before the device was watched are skipped at issue and at
 * completion alike, so in-flight stays exact.  KA_F_PRECISE (set by user
 * space when the queue's iostats is off, or on request) times issue ->
 * complete through ka_starts instead.
 */
SEC("tp_btf/block_rq_issue")
int BPF_PROG(ka_btf_issue, struct request *rq)
{
	struct ka_start_key key = { .a = (__u64)rq, .b = 0 };
	__u32 dev = rq_dev(rq);
	struct ka_dev_stats *st;
	struct ka_dev_cfg *cfg;
	__u32 s;

	cfg = cfg_of(dev, &s);
	if (!cfg)
		return 0;
	if (cfg->flags & KA_F_PRECISE) {
		on_issue(dev, s, &key, op_of(rq->cmd_flags));
		return 0;
	}
	if (rq->start_time_ns < cfg->since_ns)
		return 0;
	st = bpf_map_lookup_elem(&ka_stats, &s);
	if (st)
		st->in_flight++;
	return 0;
}

SEC("tp_btf/block_rq_requeue")
int BPF_PROG(ka_btf_requeue, struct request *rq)
{
	struct ka_dev_stats *st;
	struct ka_dev_cfg *cfg;
	__u32 s;

	/* It will be issued again (and counted in flight again). The precise
	 * path handles this at issue (BPF_NOEXIST). */
	cfg = cfg_of(rq_dev(rq), &s);
	if (!cfg || (cfg->flags & KA_F_PRECISE) || rq->start_time_ns < cfg->since_ns)
		return 0;
	st = bpf_map_lookup_elem(&ka_stats, &s);
	if (st)
		st->in_flight--;
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(ka_btf_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct ka_start_key key = { .a = (__u64)rq, .b = 0 };
	/* blk_update_request() traces before it shrinks __data_len: fewer bytes
	 * than remain means a partial completion. */
	int partial = nr_bytes < rq->__data_len;
	__u32 dev = rq_dev(rq);
	struct ka_dev_cfg *cfg;
	__u64 start;
	__u32 s;

	cfg = cfg_of(dev, &s);
	if (!cfg)
		return 0;
	if (cfg->flags & KA_F_PRECISE) {
		on_complete(cfg, dev, s, &key, error, nr_bytes, rq->__sector, partial);
		return 0;
	}
	start = rq->start_time_ns;
	if (!start || start < cfg->since_ns)
		return 0;
	account(cfg, dev, s, start, op_of(rq->cmd_flags), error, nr_bytes, rq->__sector,
		partial);
	return 0;
}

/* ---- classic trace events (no BTF needed) --------------------------------- */

/* The trace events' records, from /sys/kernel/tracing/events/block/ * /format
 * (stable layout since ioprio was added, Linux 6.1 era; rwbs grew from 8 to
 * 10 bytes after the fields used here). */
struct ka_tp_rq_issue {
	__u64 common;
	__u32 dev;
	__u32 pad;
	__u64 sector;
	__u32 nr_sector;
	__u32 bytes;
	__u16 ioprio;
	char rwbs[8];
};

struct ka_tp_rq_complete {
	__u64 common;
	__u32 dev;
	__u32 pad;
	__u64 sector;
	__u32 nr_sector;
	__s32 error;
	__u16 ioprio;
	char rwbs[8];
};

static __always_inline __u32 op_of_rwbs(const char *rwbs)
{
	char c = rwbs[0];

	if (c == 'F') {  /* REQ_PREFLUSH prefix; "F" alone is a flush */
		c = rwbs[1];
		if (c != 'W' && c != 'R' && c != 'D')
			return KA_FLUSH;
	}
	switch (c) {
	case 'R': return KA_READ;
	case 'W': return KA_WRITE;
	case 'D': return KA_DISCARD;
	default: return KA_OTHER;
	}
}

SEC("tracepoint/block/block_rq_issue")
int ka_tp_issue(struct ka_tp_rq_issue *ctx)
{
	struct ka_start_key key = { .a = ctx->dev, .b = ctx->sector };
	int slot = slot_of(ctx->dev);

	if (slot >= 0)
		on_issue(ctx->dev, slot, &key, op_of_rwbs(ctx->rwbs));
	return 0;
}

SEC("tracepoint/block/block_rq_complete")
int ka_tp_complete(struct ka_tp_rq_complete *ctx)
{
	struct ka_start_key key = { .a = ctx->dev, .b = ctx->sector };
	struct ka_dev_cfg *cfg;
	__u32 s;

	cfg = cfg_of(ctx->dev, &s);
	/* The trace event has no "bytes remaining": treat every completion as
	 * whole (partial completions are rare: only on errors and some drivers). */
	if (cfg)
		on_complete(cfg, ctx->dev, s, &key, ctx->error, (__u64)ctx->nr_sector << 9,
			    ctx->sector, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
