/* SPDX-License-Identifier: MIT */
/*
 * Injected faults, per completion path (a mirror leg; path 0 of null, mem
 * and loop): a delay, a slowdown of the measured service time, errors.
 *
 * The control side writes a path's fault into a seqlock'd slot; each queue
 * keeps its own copy (and its own PRNG), refreshed when the slot's sequence
 * moves.  Cost when no fault is set: one acquire load of the path's
 * sequence number per I/O (a shared, read-mostly cache line).  Delays never
 * sleep the queue thread: the I/O's result is held and an
 * IORING_OP_TIMEOUT is armed on the ring; its CQE finishes the I/O.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

/* A fault as queue threads read it: copied word by word with relaxed
 * atomics between the seqlock's sequence loads, so that the reader is
 * race-free in the C11 model and never waits for the writer. */
struct fault_data {
	struct ublkml_fault f;
	uint64_t t0;		/* ns: the schedule's clock starts here */
	uint64_t on;
};
#define FAULT_WORDS (sizeof(struct fault_data) / sizeof(uint64_t))
_Static_assert(sizeof(struct fault_data) % sizeof(uint64_t) == 0,
	       "fault_data is copied in 64-bit words");

struct fault_slot {
	uint32_t seq;		/* odd while a writer is inside */
	uint64_t w[FAULT_WORDS];
};


struct fault_set {
	pthread_mutex_t mu;	/* one writer at a time per seqlock */
	struct fault_slot slots[UBLKML_MAX_LEGS];
};

/* A fault as one queue sees it: a copy, refreshed when the slot's sequence
 * moves, plus this queue's own PRNG (deterministic per seed and queue). */
struct qfault {
	uint32_t seq;
	int on;
	struct ublkml_fault f;
	uint64_t t0;
	uint64_t rng;
};

struct queue_faults {
	struct qfault qf[UBLKML_MAX_LEGS];
};

struct fault_set *faults_new(void)
{
	struct fault_set *fs = calloc(1, sizeof(*fs));

	if (fs)
		pthread_mutex_init(&fs->mu, NULL);
	return fs;
}

void faults_free(struct fault_set *fs)
{
	if (!fs)
		return;
	pthread_mutex_destroy(&fs->mu);
	free(fs);
}

struct queue_faults *queue_faults_new(void)
{
	return calloc(1, sizeof(struct queue_faults));
}

/* ---- the control side ---------------------------------------------------- */

static void fault_write(struct fault_slot *s, const struct fault_data *d)
{
	uint64_t w[FAULT_WORDS];
	uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);

	memcpy(w, d, sizeof(w));
	__atomic_store_n(&s->seq, seq + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (size_t i = 0; i < FAULT_WORDS; i++)
		__atomic_store_n(&s->w[i], w[i], __ATOMIC_RELAXED);
	__atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE);
}

/* One attempt: 0 and *seq (even) when *d is a consistent copy, -EAGAIN
 * when a writer was inside.  Queue threads never retry in a loop: they keep
 * their previous copy and look again at the next I/O. */
static int fault_try_read(const struct fault_slot *s, struct fault_data *d,
			  uint32_t *seq)
{
	uint64_t w[FAULT_WORDS];
	uint32_t s1, s2;

	s1 = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
	if (s1 & 1)
		return -EAGAIN;
	for (size_t i = 0; i < FAULT_WORDS; i++)
		w[i] = __atomic_load_n(&s->w[i], __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	s2 = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
	if (s1 != s2)
		return -EAGAIN;
	memcpy(d, w, sizeof(w));
	*seq = s1;
	return 0;
}

int ublkml_target_set_fault(struct ublkml_target *t, uint32_t path,
			    const struct ublkml_fault *f)
{
	struct fault_data d;

	if (path >= (uint32_t)ublkml_target_n_paths(t))
		return -EINVAL;
	memset(&d, 0, sizeof(d));
	if (f) {
		if (f->mode > UBLKML_FAULT_RAMP || f->err_ppm > 1000000 ||
		    f->err_errno < 0 || f->err_errno > 4095 ||
		    (f->slow_x1000 && f->slow_x1000 < 1000) ||
		    (f->mode == UBLKML_FAULT_BURST &&
		     (!f->burst_period_ms || f->burst_on_ms > f->burst_period_ms)))
			return -EINVAL;
		d.f = *f;
		if (!d.f.slow_x1000)
			d.f.slow_x1000 = 1000;
		if (!d.f.err_errno)
			d.f.err_errno = EIO;
		d.t0 = now_ns();
		d.on = 1;
	}
	pthread_mutex_lock(&t->faults->mu);	/* one writer at a time */
	fault_write(&t->faults->slots[path], &d);
	pthread_mutex_unlock(&t->faults->mu);
	return 0;
}

int ublkml_target_get_fault(struct ublkml_target *t, uint32_t path,
			    struct ublkml_fault *out)
{
	struct fault_data d;
	uint32_t seq;

	if (path >= (uint32_t)ublkml_target_n_paths(t))
		return -EINVAL;
	pthread_mutex_lock(&t->faults->mu);	/* no writer inside: one read is enough */
	fault_try_read(&t->faults->slots[path], &d, &seq);
	pthread_mutex_unlock(&t->faults->mu);
	*out = d.f;
	return d.on ? 1 : 0;
}

/* ---- the queue side ------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t xorshift64s(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dull;
}

static struct qfault *fault_get(struct ublkml_queue *q, int path)
{
	const struct fault_slot *s = &q->t->faults->slots[path];
	struct qfault *c = &q->qf->qf[path];

	if (__atomic_load_n(&s->seq, __ATOMIC_ACQUIRE) != c->seq) {
		struct fault_data d;
		uint64_t x;

		if (fault_try_read(s, &d, &c->seq))
			return c->on ? c : NULL;	/* the old copy, this once */
		c->on = (int)d.on;
		c->f = d.f;
		c->t0 = d.t0;
		/* Re-seeded at every set: the error sequence of a queue
		 * depends only on the seed and that queue's I/O sequence. */
		x = d.f.seed ^ (0x9e3779b97f4a7c15ull * (q->q_id + 1ull));
		c->rng = splitmix64(&x) | 1;
	}
	return c->on ? c : NULL;
}

int fault_on(struct ublkml_queue *q, int path)
{
	return fault_get(q, path) != NULL;
}

/* The schedule's intensity now, 0..1. */
static double fault_level(const struct qfault *c, uint64_t now)
{
	uint64_t el = now > c->t0 ? now - c->t0 : 0;

	switch (c->f.mode) {
	case UBLKML_FAULT_BURST: {
		uint64_t per = (uint64_t)c->f.burst_period_ms * 1000000ull;
		uint64_t on = (uint64_t)c->f.burst_on_ms * 1000000ull;

		return per && el % per >= on ? 0.0 : 1.0;
	}
	case UBLKML_FAULT_RAMP: {
		uint64_t ramp = (uint64_t)c->f.ramp_ms * 1000000ull;

		return !ramp || el >= ramp ? 1.0 : (double)el / (double)ramp;
	}
	default:
		return 1.0;
	}
}

int fault_error(struct ublkml_queue *q, int path, uint8_t op)
{
	struct qfault *c = fault_get(q, path);
	uint64_t draw;

	if (!c || !c->f.err_ppm)
		return 0;
	if (c->f.err_ops && (op >= 32 || !(c->f.err_ops & (1u << op))))
		return 0;
	/* Drawn for every eligible I/O, whatever the intensity, so that the
	 * sequence does not depend on timing. */
	draw = xorshift64s(&c->rng) % 1000000u;
	if ((double)draw < (double)c->f.err_ppm * fault_level(c, now_ns()))
		return -c->f.err_errno;
	return 0;
}

uint64_t fault_extra_ns(struct ublkml_queue *q, int path,
			       uint64_t service_ns, uint64_t now)
{
	struct qfault *c = fault_get(q, path);
	double lvl, extra;

	if (!c)
		return 0;
	lvl = fault_level(c, now);
	extra = lvl * ((double)c->f.delay_us * 1000.0 +
		       (double)(c->f.slow_x1000 - 1000) / 1000.0 *
		       (double)service_ns);
	return extra > 0 ? (uint64_t)extra : 0;
}

int arm_delay(struct ublkml_queue *q, struct __kernel_timespec *ts,
		     uint64_t ns, uint64_t ud)
{
	struct io_uring_sqe *sqe = get_sqe(q);

	if (!sqe)
		return -EBUSY;
	ts->tv_sec = (long long)(ns / 1000000000ull);
	ts->tv_nsec = (long long)(ns % 1000000000ull);
	io_uring_prep_timeout(sqe, ts, 0, 0);
	io_uring_sqe_set_data64(sqe, ud);
	q->tgt_inflight++;
	return 0;
}

/* The I/O's final result is known: add the path's injected delay. */
void path_io_done(struct ublkml_queue *q, uint16_t tag, int path, int res)
{
	struct leg_io *l = lio(q, tag, path);

	if (fault_get(q, path)) {
		uint64_t now = now_ns();
		uint64_t extra = fault_extra_ns(q, path, l->t_start && now > l->t_start ?
						now - l->t_start : 0, now);

		l->res = res;
		if (extra >= 1000 &&
		    arm_delay(q, &l->ts, extra,
			      tgt_ud(TGT_KIND_DELAY, (uint32_t)path, tag)) == 0)
			return;
	}
	path_finish(q, tag, path, res);
}

void answer_now(struct ublkml_queue *q, uint16_t tag, int res)
{
	if (!fault_get(q, 0)) {
		complete_io(q, tag, res);
		return;
	}
	lio(q, tag, 0)->t_start = now_ns();
	path_io_done(q, tag, 0, res);
}
