// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * recocheck: the kernel side of the recommendation checks.
 *
 * Every extension has its own pair of queues: a submission queue (a
 * BPF_MAP_TYPE_USER_RINGBUF, user -> kernel) and a completion queue (a
 * BPF_MAP_TYPE_RINGBUF, kernel -> user).  User space creates the pair when an
 * extension is added and stores it at the extension's *slot* of the two
 * ARRAY_OF_MAPS `rc_subq` and `rc_compq`; `rc_ext[slot]` holds the
 * extension's id and its policy, `rc_state[slot]` its token bucket and
 * sequence counter.  Why one pair per extension: the owner of a record is
 * the queue it came through, not a field an extension writes, and a user
 * ring buffer has exactly one producer and one drainer at a time (the kernel
 * refuses a second concurrent drain with EBUSY), so the per-extension state
 * below is only ever updated by one program run: no atomics.
 *
 * `rc_check` is a SEC("syscall") program: user space runs it with
 * BPF_PROG_TEST_RUN, the slot in the context.  It drains the slot's
 * submission queue with bpf_user_ringbuf_drain() and answers every record
 * with one verdict in the completion queue.  It never takes a record it
 * cannot answer: before draining it computes how many verdicts the
 * completion queue has room for and stops there.
 *
 * The checks, in this order (the first that fails is the reason; the order
 * of kernel_agent/validator.py, with the lease check added before the mode):
 *
 *   1. RATE       token bucket per extension; every record costs a token,
 *                 malformed ones too (nano-tokens: 1 token = 1e9, refilled
 *                 by elapsed_ns * rate_per_s, capped at burst * 1e9);
 *   2. MALFORMED  the sample is not exactly sizeof(struct rc_rec) bytes;
 *   3. EXT        rec.ext_id is not the queue owner's id;
 *   4. TTL        ttl_ms is 0 or above the extension's max_ttl_ms;
 *   5. EXPIRED    now > created_ns and now - created_ns > ttl_ms * 1e6
 *                 (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns());
 *   6. CONF_HIGH  confidence above 1000 permille;
 *   7. CONF_LOW   confidence below the extension's floor (permille);
 *   8. DEVICE     the device has no mode in `rc_modes` (not watched);
 *   9. OWNER      the device's lease in `rc_leases` does not include this
 *                 extension's slot;
 *  10. OBSERVE    mode observe: status OBSERVED, nothing further checked;
 *  11. ACTION     the action id is not allowed in `rc_actions`;
 *  12. BOUNDS     the value is outside the action's [lo, hi];
 *      then RECOMMENDED (mode recommend) or APPLIED (mode enforce).
 *
 * Leases: a device may be leased to several extensions at once (its server
 * or leg policy, and the host-wide drive monitor).  `rc_leases[dev]` is the
 * set of holders as a bit mask of extension *slots*, so the check is one
 * AND with the bit of the queue the record came through: as the owner of a
 * record is its queue, the holder of a lease is a queue too.  User space
 * keeps the masks in step with the slots (a freed slot's bit is cleared
 * from every lease before the slot can be given to another extension).
 *
 * The reference model, the specification this program must match bit for
 * bit, is kernel_agent/recocheck_model.py; its property test runs both
 * (tests/kernel_agent/test_recocheck.py).  The layouts below are mirrored
 * there; keep them in sync (a test checks the sizes against this BTF).
 * No floating point: confidences are permille, tokens are nano-tokens.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define RC_MAX_EXT 64        /* extension slots per loaded instance: one bit each in a lease */
#define RC_MAX_ACTIONS 16    /* action ids 0..15; 0 is never allowed by user space */
#define RC_MAX_DEVS 1024     /* watched / leased devices */
#define RC_TOKEN 1000000000ULL  /* one token in nano-tokens */
#define RC_NS_PER_MS 1000000ULL
#define RC_PERMILLE_ONE 1000

#define RC_ENOENT 2
#define RC_E2BIG 7

/* Statuses: the values of kernel_agent.ring.Status. */
#define RC_APPLIED 1
#define RC_RECOMMENDED 2
#define RC_OBSERVED 3
#define RC_REJECTED 4

/* Device modes (kernel_agent.validator.Mode). */
#define RC_MODE_OBSERVE 1
#define RC_MODE_RECOMMEND 2
#define RC_MODE_ENFORCE 3

enum rc_reason {
	RC_OK = 0,
	RC_R_RATE = 1,
	RC_R_MALFORMED = 2,
	RC_R_EXT = 3,
	RC_R_TTL = 4,
	RC_R_EXPIRED = 5,
	RC_R_CONF_HIGH = 6,
	RC_R_CONF_LOW = 7,
	RC_R_DEVICE = 8,
	RC_R_OWNER = 9,
	RC_R_OBSERVE = 10,
	RC_R_ACTION = 11,
	RC_R_BOUNDS = 12,
};

/* A submission (48 bytes, little endian). */
struct rc_rec {
	__u32 seq;         /* the extension's own number, echoed */
	__u32 ext_id;      /* who the extension says it is */
	__u64 created_ns;  /* CLOCK_MONOTONIC */
	__u32 ttl_ms;
	__u32 confidence;  /* permille: 0..1000 */
	__u32 dev;         /* kernel dev_t, MAJOR << 20 | MINOR */
	__u32 action;      /* action id (kernel_agent.recocheck_model.ACTION_IDS) */
	__s64 value;
	__u32 model;       /* the model's id, echoed (not checked) */
	__u32 reserved;
};

/* A verdict (88 bytes). */
struct rc_verdict {
	__u64 kseq;        /* 1, 2, ... per extension: a gap is a lost verdict */
	__u64 now_ns;      /* the bpf_ktime_get_ns() every check of this record used */
	__u32 status;      /* RC_APPLIED .. RC_REJECTED */
	__u32 reason;      /* enum rc_reason */
	__u32 owner;       /* the queue owner's extension id */
	__u32 tokens;      /* whole tokens left in the bucket after this record */
	__u64 holders;     /* the device's lease holders, a mask of slots (0: none),
			    * once check 9 ran */
	struct rc_rec rec; /* the record as checked (zeroed when malformed) */
};

/* One extension's id and policy (rc_ext[slot]); ext_id 0: the slot is free. */
struct rc_ext {
	__u32 ext_id;
	__u32 rate_per_s;      /* tokens added per second */
	__u32 burst;           /* bucket size in tokens */
	__u32 floor_permille;  /* lowest confidence accepted */
	__u32 max_ttl_ms;
	__u32 reserved;
};

/* One extension's mutable state (rc_state[slot]); zeroed when the slot is (re)used. */
struct rc_state {
	__u64 tokens;    /* nano-tokens */
	__u64 stamp_ns;  /* last refill */
	__u64 kseq;      /* last sequence number given */
	__u32 primed;    /* 0: the bucket starts full at the next record */
	__u32 reserved;
	__u64 lost;      /* verdicts the completion queue refused (should stay 0) */
};

struct rc_action {
	__u32 allowed;
	__u32 reserved;
	__s64 lo;
	__s64 hi;
};

/* The syscall program's context: user space writes slot and max, reads the rest back. */
struct rc_args {
	__u32 slot;
	__u32 max;      /* most records to check in this run; 0: as many as fit */
	__u32 checked;  /* out: records drained and answered */
	__u32 full;     /* out: 1 when the completion queue's room was the limit */
};

/* The size of one verdict in the completion ring: 8-byte header, 8-byte aligned. */
#define RC_VERDICT_SLOT ((sizeof(struct rc_verdict) + 8 + 7) / 8 * 8)

struct rc_subq_inner {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 64 * 1024);
};

struct rc_compq_inner {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, RC_MAX_EXT);
	__type(key, __u32);
	__array(values, struct rc_subq_inner);
} rc_subq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, RC_MAX_EXT);
	__type(key, __u32);
	__array(values, struct rc_compq_inner);
} rc_compq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RC_MAX_EXT);
	__type(key, __u32);
	__type(value, struct rc_ext);
} rc_ext SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RC_MAX_EXT);
	__type(key, __u32);
	__type(value, struct rc_state);
} rc_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RC_MAX_ACTIONS);
	__type(key, __u32);
	__type(value, struct rc_action);
} rc_actions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RC_MAX_DEVS);
	__type(key, __u32);    /* dev_t */
	__type(value, __u32);  /* RC_MODE_* */
} rc_modes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RC_MAX_DEVS);
	__type(key, __u32);    /* dev_t */
	__type(value, __u64);  /* the lease holders: bit i = the extension in slot i */
} rc_leases SEC(".maps");

/* The drain's state, on rc_check's stack; the verdict is built in it, which
 * also puts struct rc_verdict into the object's BTF (a test compares sizes). */
struct rc_drain {
	__u32 slot;
	__u32 count;
	__u64 budget;
	struct rc_verdict v;
};

/* min(burst, tokens + elapsed * rate), without overflow: elapsed * rate is
 * only computed when it is at most the room left, which is below 2^64. */
static __always_inline void refill(struct rc_state *st, const struct rc_ext *ext, __u64 now)
{
	__u64 cap = (__u64)ext->burst * RC_TOKEN;
	__u64 rate = ext->rate_per_s;
	__u64 room, elapsed;

	if (!st->primed) {
		st->primed = 1;
		st->tokens = cap;
		st->stamp_ns = now;
		return;
	}
	if (st->tokens > cap)  /* the burst was lowered */
		st->tokens = cap;
	if (now <= st->stamp_ns)
		return;
	elapsed = now - st->stamp_ns;
	room = cap - st->tokens;
	if (rate && elapsed > room / rate)
		st->tokens = cap;
	else
		st->tokens += elapsed * rate;
	st->stamp_ns = now;
}

static long check_one(struct bpf_dynptr *dynptr, struct rc_drain *d)
{
	struct rc_verdict *v = &d->v;
	__u32 slot = d->slot;
	struct rc_action *act;
	struct rc_state *st;
	struct rc_ext *ext;
	__u32 *mode;
	__u64 *holders;
	void *compq;
	__u64 now;
	__u8 extra;
	int whole;

	/* Read the sample first: the verifier does not follow the dynptr
	 * pointer through a stack spill, which calls before it would force.
	 * Exactly sizeof(rec) bytes: the whole record reads, one byte more does not. */
	__builtin_memset(v, 0, sizeof(*v));
	whole = bpf_dynptr_read(&v->rec, sizeof(v->rec), dynptr, 0, 0) == 0 &&
		bpf_dynptr_read(&extra, 1, dynptr, sizeof(v->rec), 0) != 0;

	ext = bpf_map_lookup_elem(&rc_ext, &slot);
	st = bpf_map_lookup_elem(&rc_state, &slot);
	compq = bpf_map_lookup_elem(&rc_compq, &slot);
	if (!ext || !st || !compq)
		return 1;

	now = bpf_ktime_get_ns();
	v->now_ns = now;
	v->owner = ext->ext_id;
	v->status = RC_REJECTED;
	if (!whole)
		__builtin_memset(&v->rec, 0, sizeof(v->rec));

	refill(st, ext, now);
	if (st->tokens < RC_TOKEN) {
		v->reason = RC_R_RATE;
		goto out;
	}
	st->tokens -= RC_TOKEN;
	if (!whole) {
		v->reason = RC_R_MALFORMED;
		goto out;
	}
	if (v->rec.ext_id != ext->ext_id) {
		v->reason = RC_R_EXT;
		goto out;
	}
	if (v->rec.ttl_ms == 0 || v->rec.ttl_ms > ext->max_ttl_ms) {
		v->reason = RC_R_TTL;
		goto out;
	}
	if (now > v->rec.created_ns &&
	    now - v->rec.created_ns > (__u64)v->rec.ttl_ms * RC_NS_PER_MS) {
		v->reason = RC_R_EXPIRED;
		goto out;
	}
	if (v->rec.confidence > RC_PERMILLE_ONE) {
		v->reason = RC_R_CONF_HIGH;
		goto out;
	}
	if (v->rec.confidence < ext->floor_permille) {
		v->reason = RC_R_CONF_LOW;
		goto out;
	}
	mode = bpf_map_lookup_elem(&rc_modes, &v->rec.dev);
	if (!mode || *mode < RC_MODE_OBSERVE || *mode > RC_MODE_ENFORCE) {
		v->reason = RC_R_DEVICE;
		goto out;
	}
	holders = bpf_map_lookup_elem(&rc_leases, &v->rec.dev);
	v->holders = holders ? *holders : 0;
	if (!(v->holders & (1ULL << slot))) {
		v->reason = RC_R_OWNER;
		goto out;
	}
	if (*mode == RC_MODE_OBSERVE) {
		v->status = RC_OBSERVED;
		v->reason = RC_R_OBSERVE;
		goto out;
	}
	act = v->rec.action < RC_MAX_ACTIONS ?
		bpf_map_lookup_elem(&rc_actions, &v->rec.action) : 0;
	if (!act || !act->allowed) {
		v->reason = RC_R_ACTION;
		goto out;
	}
	if (v->rec.value < act->lo || v->rec.value > act->hi) {
		v->reason = RC_R_BOUNDS;
		goto out;
	}
	v->status = *mode == RC_MODE_RECOMMEND ? RC_RECOMMENDED : RC_APPLIED;
	v->reason = RC_OK;
out:
	v->tokens = st->tokens / RC_TOKEN;
	v->kseq = ++st->kseq;
	if (bpf_ringbuf_output(compq, v, sizeof(*v), 0))
		st->lost++;
	d->count++;
	return d->count >= d->budget ? 1 : 0;
}

SEC("syscall")
int rc_check(struct rc_args *args)
{
	struct rc_drain d = {};
	struct rc_ext *ext;
	void *subq, *compq;
	__u64 size, used, budget;
	__u32 slot = args->slot;
	long n;

	args->checked = 0;
	args->full = 0;
	if (slot >= RC_MAX_EXT)
		return -RC_E2BIG;
	ext = bpf_map_lookup_elem(&rc_ext, &slot);
	subq = bpf_map_lookup_elem(&rc_subq, &slot);
	compq = bpf_map_lookup_elem(&rc_compq, &slot);
	if (!ext || !ext->ext_id || !subq || !compq)
		return -RC_ENOENT;

	/* Room for verdicts: the consumer only ever frees more while we run. */
	size = bpf_ringbuf_query(compq, BPF_RB_RING_SIZE);
	used = bpf_ringbuf_query(compq, BPF_RB_AVAIL_DATA);
	budget = used < size ? (size - used) / RC_VERDICT_SLOT : 0;
	if (args->max && budget >= args->max)
		budget = args->max;
	else
		args->full = 1;
	if (!budget)
		return 0;

	d.slot = slot;
	d.budget = budget;
	n = bpf_user_ringbuf_drain(subq, check_one, &d, 0);
	args->checked = d.count;
	if (d.count < budget)
		args->full = 0;
	return n < 0 ? n : d.count;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
