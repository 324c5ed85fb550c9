/* SPDX-License-Identifier: MIT */
/*
 * Event targets (Python plug-ins): a request is not served here but handed
 * to the caller, a batch at a time (ublkml_queue_commit_and_wait), or,
 * with a plug-in timeout, to worker threads through the relay below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "engine.h"

/* user_data kind of the relay's eventfd read. */
enum { KIND_RELAY = TGT_KIND_PRIVATE };

struct relay;

/* Per queue. */
struct evq {
	/* requests reaped but not yet handed out */
	struct ublkml_event *pending;
	int n_pending;
	struct relay *relay;	/* with a plug-in timeout, else NULL */
};

static struct evq *evq(const struct ublkml_queue *q)
{
	return q->priv;
}

/* The queue's relay, or NULL (none yet, or not an event target's queue). */
static struct relay *relay_of(const struct ublkml_queue *q)
{
	return q->ops == &tgt_events_ops && q->priv ? evq(q)->relay : NULL;
}

int ublkml_target_new_events(struct ublkml_target **out, uint64_t size)
{
	return target_alloc(out, UBLKML_TGT_EVENTS, size);
}

static int events_init_queue(struct ublkml_queue *q)
{
	struct evq *e = calloc(1, sizeof(*e));

	if (!e)
		return -ENOMEM;
	q->priv = e;
	e->pending = calloc(q->depth, sizeof(struct ublkml_event));
	return e->pending ? 0 : -ENOMEM;
}

static void events_handle_io(struct ublkml_queue *q, uint16_t tag)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	struct evq *eq = evq(q);
	struct ublkml_event *e = &eq->pending[eq->n_pending++];

	e->tag = tag;
	e->op = q->ts[tag].op;
	e->op_flags = iod->op_flags;
	e->nr_sectors = iod->nr_sectors;
	e->start_sector = iod->start_sector;
	e->result = -EIO;
}

/* Without a relay, the harness has nobody to hand requests to. */
static int events_inject_ok(const struct ublkml_queue *q)
{
	return evq(q)->relay != NULL;
}

int ublkml_queue_commit_and_wait(struct ublkml_queue *q,
				 struct ublkml_event *evs, int n_done, int max)
{
	int ret;

	if (q->ops != &tgt_events_ops || q->cdev_fd < 0 || max <= 0)
		return -EINVAL;
	for (int i = 0; i < n_done; i++)
		complete_io(q, evs[i].tag, evs[i].result);
	while (evq(q)->n_pending == 0) {
		if (queue_done(q)) {
			io_uring_submit(&q->ring);
			return -ENODEV;
		}
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return take_events(evq(q)->pending, &evq(q)->n_pending, evs, max);
}

/* ---- the relay -------------------------------------------------------------
 *
 * A plug-in method may never return.  Only the thread that fetched a queue's
 * tags may commit them (and the ring is SINGLE_ISSUER), so if plug-in calls
 * ran on that thread a hung call would stall the whole queue.  With a
 * timeout the work is split:
 *
 *   - the ring thread (ublkml_queue_relay) keeps the ring: it reaps
 *     requests, posts them as a batch, commits the answers;
 *   - workers (Python threads in ublkml_relay_next) take a batch, call the
 *     plug-in per event, write each result into their own event array and
 *     hand the answers back and wake the ring thread if it sleeps (see
 *     relay_wait: on a condition variable while a batch is out and its
 *     holder is fresh, else in the ring, woken by an eventfd read).
 *
 * Normally one batch is out at a time, so a queue's plug-in calls run one
 * after the other, as without a relay.  The ring thread watches the
 * answered prefix of every worker's array (a worker answers in order):
 *
 *   - stalled: a worker's prefix has not grown for stall_ns while requests
 *     wait.  The next batch (new requests only) goes to an idle worker, so a
 *     slow call delays only the requests batched with it.  Calls of one
 *     queue may then run at once on two threads (as they do for a plug-in
 *     with several queues).
 *   - hung: no growth for timeout_ns.  The worker is given up ("fired"): the
 *     event it is stuck on fails with -ETIMEDOUT and its tag gets a fresh
 *     buffer (the hung call keeps the old one, so whatever it does with it
 *     when, if ever, it returns cannot touch a later request's data); the
 *     events after it are cancelled in the worker's array (op =
 *     UBLKML_OP_CANCELLED: the handler skips them) and go back to the front
 *     of the pending list.  The next note tells a worker (the Python side
 *     logs which method hung).  A fired worker that comes back learns it
 *     (came_back), its retired buffers are freed, and it serves again.
 *
 * A worker that takes a batch and leaves no idle worker behind is asked to
 * start a spare (note.spawn), up to 2 + max_stuck workers.
 *
 * Race left open: the worker reads an event's op after storing the previous
 * result; the ring thread cancels, fences, then re-reads the results.  A
 * worker whose hung call returns within the same nanoseconds may serve the
 * next event while it is also re-posted (a write may then be applied
 * twice).  Closing it would take an atomic claim per I/O from Python, a C
 * call per I/O.
 */

struct ublkml_relay_worker {
	struct ublkml_queue *q;
	/* under the relay's mu */
	struct ublkml_event *evs;	/* the batch it holds, or NULL */
	int n;
	int fired;			/* given up: its answers are not wanted */
	int seen;			/* answered prefix at t_seen */
	uint64_t t_seen;
	uint64_t t_taken;
	int came_back;
	uint64_t late_ns;
	uint32_t buf_gen;		/* tag buffers as it last saw them */
	char **retired;			/* buffers its hung call may still use */
	int n_retired;
	struct ublkml_relay_worker *next;
};

struct relay {
	pthread_mutex_t mu;
	pthread_cond_t cv;		/* idle workers wait for a batch */
	pthread_cond_t ans_cv;		/* the ring thread waits for answers */
	int efd;			/* workers -> ring thread asleep in the ring */
	uint64_t efd_val;
	int efd_armed;			/* ring thread only */
	int fresh;			/* ring thread only: see relay_wait */
	uint64_t timeout_ns;
	uint64_t stall_ns;
	uint64_t poll_ns;
	int max_stuck;
	struct ublkml_event *done, *back;	/* ring thread's scratch */
	/* everything below: under mu */
	struct ublkml_event *batch;	/* posted, not taken yet */
	int n_batch;
	int posted;
	uint64_t t_posted;
	struct ublkml_event *ans;	/* answers handed back, not committed */
	int n_ans;
	int n_holding;			/* workers holding a batch */
	int ring_waiting;		/* on ans_cv */
	int ring_sleeping;		/* in the ring */
	int closing;			/* workers leave */
	int dead;			/* queue freed: the last worker frees it */
	int n_workers, n_idle, n_stuck;
	int spawning;			/* spares asked for, not joined yet */
	uint32_t buf_gen;
	uint64_t timeouts, late, unserved;
	uint32_t unreported;		/* timeouts no note has reported yet */
	struct ublkml_event last;	/* the last event failed by the timeout */
	uint64_t last_stuck_ns;
	struct ublkml_relay_worker *workers;
	/* harness: requests fed while the relay runs (ublkml_queue_relay_feed) */
	struct ublkml_event *inbox;
	int n_inbox;
	int feeding;			/* more may come: do not finish */
};

static int in_bufs(const struct ublkml_queue *q, const char *p)
{
	return p >= q->bufs && p < q->bufs + (size_t)q->depth * q->buf_size;
}

static void free_retired(struct ublkml_queue *q, struct ublkml_relay_worker *w)
{
	for (int i = 0; i < w->n_retired; i++)
		if (!in_bufs(q, w->retired[i]))
			free(w->retired[i]);
	free(w->retired);
	w->retired = NULL;
	w->n_retired = 0;
}

int ublkml_queue_relay_init(struct ublkml_queue *q, uint64_t timeout_ns,
			    int max_stuck)
{
	struct relay *r;

	if (q->ops != &tgt_events_ops || evq(q)->relay || timeout_ns == 0 ||
	    max_stuck < 0)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->batch = calloc(q->depth, sizeof(*r->batch));
	r->done = calloc(q->depth, sizeof(*r->done));
	r->back = calloc(q->depth, sizeof(*r->back));
	r->ans = calloc(q->depth, sizeof(*r->ans));
	r->inbox = calloc(q->depth, sizeof(*r->inbox));
	q->tag_buf = calloc(q->depth, sizeof(*q->tag_buf));
	r->efd = eventfd(0, EFD_CLOEXEC);
	if (!r->batch || !r->done || !r->back || !r->ans || !r->inbox || !q->tag_buf ||
	    r->efd < 0) {
		int ret = r->efd < 0 ? -errno : -ENOMEM;

		if (r->efd >= 0)
			close(r->efd);
		free(r->inbox);
		free(r->batch);
		free(r->done);
		free(r->back);
		free(r->ans);
		free(q->tag_buf);
		q->tag_buf = NULL;
		free(r);
		return ret;
	}
	for (int i = 0; i < q->depth; i++)
		q->tag_buf[i] = q->bufs + (size_t)i * q->buf_size;
	pthread_mutex_init(&r->mu, NULL);
	pthread_cond_init(&r->cv, NULL);
	{
		pthread_condattr_t a;

		pthread_condattr_init(&a);
		pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
		pthread_cond_init(&r->ans_cv, &a);
		pthread_condattr_destroy(&a);
	}
	r->timeout_ns = timeout_ns;
	/* A call that has not returned after stall_ns no longer holds up new
	 * requests; one that has not after timeout_ns fails its I/O. */
	r->stall_ns = timeout_ns / 4 < 20000000 ? timeout_ns / 4 : 20000000;
	/* While a batch is out the ring thread looks every poll_ns: a hung
	 * call fails between timeout and timeout + poll. */
	r->poll_ns = timeout_ns / 8;
	if (r->poll_ns > r->stall_ns)
		r->poll_ns = r->stall_ns;
	if (r->poll_ns < 1000000)
		r->poll_ns = 1000000;
	r->max_stuck = max_stuck;
	evq(q)->relay = r;
	return 0;
}

/* Queue freed while workers remain (a call that never returned): they are
 * told to leave, and the last one frees the queue's memory.  1: deferred. */
static int relay_detach(struct ublkml_queue *q)
{
	struct relay *r = relay_of(q);
	int keep;

	pthread_mutex_lock(&r->mu);
	r->dead = 1;
	r->closing = 1;
	keep = r->n_workers > 0;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	return keep;
}

static void relay_free(struct ublkml_queue *q)
{
	struct relay *r = relay_of(q);

	if (q->tag_buf) {
		for (int i = 0; i < q->depth; i++)
			if (!in_bufs(q, q->tag_buf[i]))
				free(q->tag_buf[i]);
		free(q->tag_buf);
		q->tag_buf = NULL;
	}
	if (!r)
		return;
	while (r->workers) {		/* none left unless never detached */
		struct ublkml_relay_worker *w = r->workers;

		r->workers = w->next;
		free_retired(q, w);
		free(w);
	}
	close(r->efd);
	pthread_cond_destroy(&r->ans_cv);
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->mu);
	free(r->batch);
	free(r->done);
	free(r->back);
	free(r->ans);
	free(r->inbox);
	free(r);
	evq(q)->relay = NULL;
}

static void events_free_queue(struct ublkml_queue *q)
{
	struct evq *e = evq(q);

	if (!e)
		return;
	if (e->relay)
		relay_free(q);
	free(e->pending);
	free(e);
	q->priv = NULL;
}

/* Relay workers may still run (a plug-in call that never returned): the
 * last one to leave frees the rest, buffers included. */
static int events_detach_queue(struct ublkml_queue *q)
{
	return evq(q)->relay && relay_detach(q);
}

int ublkml_relay_join(struct ublkml_queue *q, struct ublkml_relay_worker **out)
{
	struct relay *r = relay_of(q);
	struct ublkml_relay_worker *w;

	if (!r)
		return -EINVAL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->q = q;
	pthread_mutex_lock(&r->mu);
	if (r->closing) {
		pthread_mutex_unlock(&r->mu);
		free(w);
		return -ENODEV;
	}
	w->buf_gen = r->buf_gen;
	w->next = r->workers;
	r->workers = w;
	r->n_workers++;
	if (r->spawning)
		r->spawning--;
	pthread_mutex_unlock(&r->mu);
	*out = w;
	return 0;
}

/* The hung calls not reported yet (under mu). */
static void relay_hangs(struct relay *r, struct ublkml_relay_note *note)
{
	note->stuck = (uint32_t)r->n_stuck;
	note->timeouts = r->timeouts;
	note->late = r->late;
	note->new_timeouts = r->unreported;
	if (r->unreported) {
		note->tag = r->last.tag;
		note->op = r->last.op;
		note->op_flags = r->last.op_flags;
		note->nr_sectors = r->last.nr_sectors;
		note->start_sector = r->last.start_sector;
		note->stuck_ns = r->last_stuck_ns;
		r->unreported = 0;
	}
}

static void relay_note(struct relay *r, struct ublkml_relay_worker *w,
		       struct ublkml_relay_note *note)
{
	memset(note, 0, sizeof(*note));
	note->buf_gen = r->buf_gen;
	w->buf_gen = r->buf_gen;
	note->came_back = (uint32_t)w->came_back;
	note->late_ns = w->late_ns;
	w->came_back = 0;
	relay_hangs(r, note);
}

int ublkml_queue_relay_report(struct ublkml_queue *q,
			      struct ublkml_relay_note *note)
{
	struct relay *r = relay_of(q);
	int any;

	memset(note, 0, sizeof(*note));
	if (!r)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	any = r->unreported != 0;
	relay_hangs(r, note);
	pthread_mutex_unlock(&r->mu);
	return any;
}

/* Wake the ring thread if it sleeps in the ring (under mu): an eventfd
 * write completes the read it keeps armed there. */
static void relay_kick_ring(struct relay *r)
{
	uint64_t one = 1;

	if (!r->ring_sleeping)
		return;
	r->ring_sleeping = 0;
	/* Cannot block: the counter is far from its limit. */
	if (write(r->efd, &one, sizeof(one)) < 0)
		r->ring_sleeping = 1;	/* unreachable; it polls anyway */
}

/* Wake the ring thread if it waits for answers (under mu): on ans_cv, or
 * in the ring. */
static void relay_kick(struct relay *r)
{
	if (r->ring_waiting) {
		r->ring_waiting = 0;
		pthread_cond_signal(&r->ans_cv);
	}
	relay_kick_ring(r);
}

int ublkml_relay_next(struct ublkml_relay_worker *w, struct ublkml_event *evs,
		      int n_done, int max, struct ublkml_relay_note *note)
{
	struct ublkml_queue *q = w->q;
	struct relay *r = relay_of(q);
	int n, flags = 0, last;

	if (max < q->depth)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	if (w->evs) {			/* it held a batch */
		if (w->fired) {		/* ... and was given up meanwhile */
			w->fired = 0;
			w->came_back = 1;
			w->late_ns = now_ns() - w->t_taken;
			r->n_stuck--;
			r->late++;
			free_retired(q, w);
		} else {
			n = n_done < w->n ? n_done : w->n;
			for (int i = 0; i < n; i++)
				r->ans[r->n_ans++] = w->evs[i];
			r->n_holding--;
			relay_kick(r);
		}
		w->evs = NULL;
	}
	while (!r->closing && !r->posted) {
		r->n_idle++;
		pthread_cond_wait(&r->cv, &r->mu);
		r->n_idle--;
	}
	if (r->closing) {
		struct ublkml_relay_worker **pp = &r->workers;

		while (*pp != w)
			pp = &(*pp)->next;
		*pp = w->next;
		r->n_workers--;
		last = r->dead && r->n_workers == 0;
		pthread_mutex_unlock(&r->mu);
		free_retired(q, w);
		free(w);
		if (last)
			queue_free_rest(q);
		return -ENODEV;
	}
	n = r->n_batch;
	memcpy(evs, r->batch, (size_t)n * sizeof(*evs));
	for (int i = 0; i < n; i++)
		evs[i].result = UBLKML_RELAY_PENDING;
	w->evs = evs;
	w->n = n;
	w->t_taken = now_ns();
	w->seen = 0;
	w->t_seen = w->t_taken;
	r->posted = 0;
	r->n_holding++;
	if (w->buf_gen != r->buf_gen || r->unreported || w->came_back) {
		relay_note(r, w, note);
		flags = UBLKML_RELAY_NOTE;
	}
	/* No idle worker left behind: ask for a spare (one at a time). */
	if (r->n_idle + r->spawning == 0 &&
	    r->n_workers + r->spawning < 2 + r->max_stuck) {
		if (!flags) {
			relay_note(r, w, note);
			flags = UBLKML_RELAY_NOTE;
		}
		note->spawn = 1;
		r->spawning++;		/* until the spare joins */
	}
	pthread_mutex_unlock(&r->mu);
	return n | flags;
}

int ublkml_queue_relay_stats(struct ublkml_queue *q,
			     struct ublkml_relay_stats *out)
{
	struct relay *r = relay_of(q);

	memset(out, 0, sizeof(*out));
	if (!r)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	out->timeouts = r->timeouts;
	out->late = r->late;
	out->unserved = r->unserved;
	out->stuck = (uint32_t)r->n_stuck;
	out->workers = (uint32_t)r->n_workers;
	pthread_mutex_unlock(&r->mu);
	return 0;
}

static void events_tgt_io_done(struct ublkml_queue *q, const struct io_uring_cqe *cqe,
			       uint32_t kind, int leg, uint16_t idx)
{
	if (kind == KIND_RELAY)
		evq(q)->relay->efd_armed = 0;	/* re-armed by the loop */
}

static int relay_arm(struct ublkml_queue *q, struct relay *r)
{
	struct io_uring_sqe *sqe = get_sqe(q);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_read(sqe, r->efd, &r->efd_val, sizeof(r->efd_val), 0);
	io_uring_sqe_set_data64(sqe, tgt_ud(KIND_RELAY, 0, 0));
	r->efd_armed = 1;
	return 0;
}

/* Answered prefix of a worker's array (a worker answers in order). */
static int answered_prefix(const struct ublkml_relay_worker *w)
{
	int i = 0;

	while (i < w->n && __atomic_load_n(&w->evs[i].result, __ATOMIC_ACQUIRE) !=
			   UBLKML_RELAY_PENDING)
		i++;
	return i;
}

/* Give up worker w, stuck on event k (under mu): its answers so far, and
 * -ETIMEDOUT for k, go to done[]; the events it did not reach go back to
 * the front of pending.  Returns how many answers, or -ENOMEM (then nothing
 * changed: tried again at the next look). */
static int relay_fire(struct ublkml_queue *q, struct relay *r,
		      struct ublkml_relay_worker *w, int k, uint64_t now,
		      struct ublkml_event *done)
{
	struct ublkml_event *evs = w->evs;
	char *fresh = NULL, **retired;
	int n = w->n, n_done = 0, n_back = 0;
	uint16_t tag = evs[k].tag;

	if (posix_memalign((void **)&fresh, (size_t)sysconf(_SC_PAGESIZE),
			   q->buf_size))
		return -ENOMEM;
	retired = realloc(w->retired, (size_t)(w->n_retired + 1) * sizeof(char *));
	if (!retired) {
		free(fresh);
		return -ENOMEM;
	}
	w->retired = retired;
	for (int i = k + 1; i < n; i++)
		__atomic_store_n(&evs[i].op, UBLKML_OP_CANCELLED, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	r->last = evs[k];
	for (int i = 0; i < n; i++) {
		int32_t res = __atomic_load_n(&evs[i].result, __ATOMIC_ACQUIRE);
		struct ublkml_event e = evs[i];

		if (i == k && res == UBLKML_RELAY_PENDING) {
			e.result = -ETIMEDOUT;
			done[n_done++] = e;
		} else if (i > k && (res == UBLKML_RELAY_PENDING ||
				     res == UBLKML_RELAY_CANCELLED)) {
			/* Not served: again, with its real op (the
			 * descriptor still holds the request). */
			e.op = (uint8_t)(q->iods[e.tag].op_flags & 0xff);
			e.result = -EIO;
			r->back[n_back++] = e;
		} else {
			e.result = res;
			done[n_done++] = e;
		}
	}
	if (n_back) {
		memmove(evq(q)->pending + n_back, evq(q)->pending,
			(size_t)evq(q)->n_pending * sizeof(*evq(q)->pending));
		memcpy(evq(q)->pending, r->back, (size_t)n_back * sizeof(*r->back));
		evq(q)->n_pending += n_back;
	}
	/* The hung call keeps its buffer; the tag gets the fresh one. */
	w->retired[w->n_retired++] = q->tag_buf[tag];
	q->tag_buf[tag] = fresh;
	r->buf_gen++;
	w->fired = 1;
	r->n_holding--;			/* the ring thread no longer waits for it */
	r->n_stuck++;
	r->timeouts++;
	r->unreported++;
	r->last_stuck_ns = now - w->t_seen;
	return n_done;
}

/* Collect answers, give up hung workers, post pending requests to an idle
 * worker when none holds a batch or every holder is stalled.  Returns the
 * time to the next look (ns) while batches are out, else 0; r->fresh says
 * whether a holder is fresh (or an idle worker was just given a batch). */
static uint64_t relay_turn(struct ublkml_queue *q, struct relay *r)
{
	struct ublkml_event *done = r->done;
	int n_done, busy = 0;
	uint64_t now, next = 0;

	pthread_mutex_lock(&r->mu);
	/* Read the clock under mu: a worker stamps t_seen (under mu) when it
	 * takes a batch, and a clock read before the lock could be older than
	 * that stamp; now - t_seen would then wrap to a huge age and fire a
	 * worker that had just started (ETIMEDOUT after seconds with a 30 s
	 * timeout). */
	now = now_ns();
	for (int i = 0; i < r->n_inbox; i++) {	/* harness only */
		struct ublkml_event *e = &r->inbox[i];
		struct ublksrv_io_desc *iod = &q->iods[e->tag];

		iod->op_flags = e->op_flags;
		iod->start_sector = e->start_sector;
		iod->nr_sectors = e->nr_sectors;
		handle_request(q, e->tag);
	}
	r->n_inbox = 0;
	n_done = r->n_ans;
	memcpy(done, r->ans, (size_t)n_done * sizeof(*done));
	r->n_ans = 0;
	if (r->n_holding) {
		for (struct ublkml_relay_worker *w = r->workers; w; w = w->next) {
			int k;

			if (!w->evs || w->fired)
				continue;
			k = answered_prefix(w);
			if (k != w->seen) {
				w->seen = k;
				w->t_seen = now;
			} else if (k < w->n && now - w->t_seen >= r->timeout_ns) {
				int ret = relay_fire(q, r, w, k, now, done + n_done);

				if (ret >= 0) {
					n_done += ret;
					continue;
				}
			}
			if (now - w->t_seen < r->stall_ns)
				busy = 1;	/* a fresh holder: keep the order */
		}
	}
	if (r->posted && now - r->t_posted >= r->timeout_ns) {
		/* Nobody took it: every worker is stuck or busy. */
		for (int i = 0; i < r->n_batch; i++) {
			done[n_done] = r->batch[i];
			done[n_done++].result = -ETIMEDOUT;
		}
		r->unserved += (uint64_t)r->n_batch;
		r->posted = 0;
	}
	if (!r->posted && !busy && evq(q)->n_pending) {
		r->n_batch = take_events(evq(q)->pending, &evq(q)->n_pending, r->batch, q->depth);
		r->posted = 1;
		r->t_posted = now;
		if (r->n_idle) {
			pthread_cond_signal(&r->cv);
			busy = 1;	/* a worker takes it now: fresh */
		}
	}
	r->fresh = busy;
	if (r->n_holding || r->posted)
		next = r->poll_ns;
	if (q->cdev_fd >= 0)
		pthread_mutex_unlock(&r->mu);
	for (int i = 0; i < n_done; i++)
		complete_io(q, done[i].tag, done[i].result);
	if (q->cdev_fd < 0)		/* harness: answers are read under mu */
		pthread_mutex_unlock(&r->mu);
	return next;
}

static int relay_finished(struct ublkml_queue *q, struct relay *r)
{
	int idle;

	pthread_mutex_lock(&r->mu);
	idle = !r->n_holding && !r->posted && !r->n_ans && !r->n_inbox && !r->feeding;
	pthread_mutex_unlock(&r->mu);
	if (!idle || evq(q)->n_pending)
		return 0;
	if (q->cdev_fd < 0)
		return q->tgt_inflight == 0;	/* harness: all answered */
	return queue_done(q);
}


/* Submit, then sleep until there is something to do, and take every ready
 * CQE.  Two ways to sleep:
 *
 *   - a batch out and its holder fresh (r->fresh): on ans_cv, until a
 *     worker answers (or wait_ns).  New requests that arrive meanwhile
 *     could not be posted anyway (they wait for that batch's answers), so
 *     the ring thread need not wake for them: one futex hand-over per batch
 *     instead of a wake-up per request and a task-work completion of the
 *     eventfd read;
 *   - otherwise (nothing out, or every holder stalled, or a batch nobody
 *     has taken yet): in the ring, woken by a CQE -- a new request, which
 *     must be posted at once when the holders are stalled, or the eventfd
 *     read a worker's answer completes.  (Sleeping on ans_cv here too would
 *     leave requests that came while every holder was stalled unseen until
 *     the next poll, and post them only one poll later: up to 2 * poll_ns
 *     instead of at once.)
 */
static int relay_wait(struct ublkml_queue *q, struct relay *r, uint64_t wait_ns)
{
	struct io_uring_cqe *cqe;
	int ret;

	if (wait_ns && r->fresh) {
		struct timespec ts;
		uint64_t until;

		ret = io_uring_submit_and_get_events(&q->ring);
		if (ring_error(ret))
			return ret;
		reap(q);
		until = now_ns() + wait_ns;
		ts.tv_sec = (time_t)(until / 1000000000u);
		ts.tv_nsec = (long)(until % 1000000000u);
		pthread_mutex_lock(&r->mu);
		/* Not n_inbox: a fed request stands for a CQE, which does
		 * not end this sleep either. */
		if (!r->n_ans && !r->closing) {
			r->ring_waiting = 1;
			pthread_cond_timedwait(&r->ans_cv, &r->mu, &ts);
			r->ring_waiting = 0;
		}
		pthread_mutex_unlock(&r->mu);
		return 0;
	}
	pthread_mutex_lock(&r->mu);
	if (r->n_ans || r->n_inbox) {	/* work came meanwhile: no sleep */
		pthread_mutex_unlock(&r->mu);
		ret = io_uring_submit_and_get_events(&q->ring);
		if (ring_error(ret))
			return ret;
		reap(q);
		return 0;
	}
	r->ring_sleeping = 1;
	pthread_mutex_unlock(&r->mu);
	if (wait_ns) {
		struct __kernel_timespec ts = {
			.tv_sec = (long long)(wait_ns / 1000000000u),
			.tv_nsec = (long long)(wait_ns % 1000000000u),
		};

		ret = io_uring_submit_and_wait_timeout(&q->ring, &cqe, 1, &ts, NULL);
	} else {
		ret = io_uring_submit_and_wait(&q->ring, 1);
	}
	pthread_mutex_lock(&r->mu);
	r->ring_sleeping = 0;
	pthread_mutex_unlock(&r->mu);
	if (ring_error(ret))
		return ret;
	reap(q);
	return 0;
}

int ublkml_queue_relay(struct ublkml_queue *q)
{
	struct relay *r = relay_of(q);
	int ret = 0;

	if (!r)
		return -EINVAL;
	for (;;) {
		uint64_t wait_ns = relay_turn(q, r);

		if (relay_finished(q, r))
			break;
		if (!r->efd_armed && (ret = relay_arm(q, r)) < 0)
			break;
		ret = relay_wait(q, r, wait_ns);
		if (ret < 0)
			break;
	}
	pthread_mutex_lock(&r->mu);
	r->closing = 1;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	io_uring_submit(&q->ring);
	return ret < 0 ? ret : 0;
}

/* Harness: hand a request to a running relay (any thread).  feeding = 1
 * before the relay starts keeps it from finishing between requests; 0 with
 * tag < 0 says no more will come. */
int ublkml_queue_relay_feed(struct ublkml_queue *q, int tag, uint32_t op_flags,
			    uint64_t start_sector, uint32_t nr_sectors, int feeding)
{
	struct relay *r = relay_of(q);
	int ret = 0;

	if (!r || q->cdev_fd >= 0 || tag >= q->depth)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	r->feeding = feeding;
	if (tag >= 0) {
		if (r->n_inbox >= q->depth) {
			ret = -EBUSY;
		} else {
			struct ublkml_event *e = &r->inbox[r->n_inbox++];

			e->tag = (uint16_t)tag;
			e->op_flags = op_flags;
			e->start_sector = start_sector;
			e->nr_sectors = nr_sectors;
		}
	}
	/* Like a new request's CQE: wakes a ring thread asleep in the ring,
	 * not one waiting on ans_cv (relay_wait), so the harness sees the
	 * ring thread as late as a device would. */
	relay_kick_ring(r);
	pthread_mutex_unlock(&r->mu);
	return ret;
}

/* Harness only: the answers so far, while the relay runs (any thread). */
int ublkml_queue_relay_harvest(struct ublkml_queue *q, struct ublkml_event *out,
			       int max)
{
	struct relay *r = relay_of(q);
	int n;

	if (!r || q->cdev_fd >= 0)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	n = harness_take(q, out, max);
	pthread_mutex_unlock(&r->mu);
	return n;
}

const struct ublkml_tgt_ops tgt_events_ops = {
	.name = "events",
	.kind = UBLKML_TGT_EVENTS,
	.flags = TGT_F_CALLER,
	.handle_io = events_handle_io,
	.tgt_io_done = events_tgt_io_done,
	.init_queue = events_init_queue,
	.free_queue = events_free_queue,
	.detach_queue = events_detach_queue,
	.inject_ok = events_inject_ok,
};
