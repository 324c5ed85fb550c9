/* SPDX-License-Identifier: MIT */
/*
 * The engine's internal declarations, shared by its C files (never by
 * Python: the public API is ublkml.h).
 *
 * Layout of the engine:
 *   control.c        /dev/ublk-control: the SQE128 control ring
 *   targets.c        the target registry, and what every target has
 *   queue.c          one queue: its io_uring loop, per-tag state, FETCH and
 *                    COMMIT_AND_FETCH, completion records and summaries
 *   faults.c         injected delays, slowdowns and errors, per path
 *   backing.c        I/O on backing files, per leg (loop: one, mirror: 2..8)
 *   harness.c        queues without a driver, for unit tests
 *   target_*.c       one file per target: null, mem, loop, mirror (and its
 *                    journal), relay (event targets: Python plug-ins)
 *
 * The hot path
 * ------------
 * One queue = one io_uring + one thread.  The ring carries two kinds of
 * requests, told apart by bit 63 of user_data:
 *   - ublk I/O commands (FETCH_REQ, COMMIT_AND_FETCH_REQ) on /dev/ublkcN;
 *   - target I/O: read/write/fsync/fallocate on a loop or mirror leg, the
 *     timers of injected delays, mirror health probes, the relay's eventfd
 *     (kind, leg and tag or slot are encoded in user_data, see tgt_ud()).
 * ublkml_queue_run() loops: submit everything prepared, wait for >= 1 CQE,
 * then walk every ready CQE.  A CQE of a ublk command means "a request is in
 * this tag's descriptor": the target's handle_io takes it, either answering
 * at once (null, mem: the answer is prepared as the next COMMIT_AND_FETCH)
 * or by queueing target I/O whose CQE (tgt_io_done) later prepares the
 * commit.  Nothing reaches the kernel until the next submit, so one
 * io_uring_enter() carries a whole batch of commits and new target I/O: the
 * syscall cost is per batch, not per I/O, and no Python runs at all for
 * native targets.
 *
 * Event targets (Python plug-ins) get the same loop, but instead of handling
 * a request it is copied into a caller-supplied array; the caller answers
 * the whole array in one call.  So Python runs once per batch of
 * completions, plus the plug-in's own method per I/O.
 *
 * Leg I/O (loop = one leg, mirror = 2..8): leg_start() -> backing I/O ->
 * leg_cqe() (short transfers and zero-range fallbacks resubmit) ->
 * path_io_done() (adds an injected delay as an IORING_OP_TIMEOUT, never a
 * sleep) -> path_finish() (the target's path_done, or the request's answer).
 * The mirror's fan-out, read retry, dirty regions and probes are in
 * target_mirror.c.
 *
 * Stopping: STOP_DEV (from any thread or process) makes the driver complete
 * every outstanding FETCH/COMMIT with UBLK_IO_RES_ABORT (-ENODEV).  A tag
 * that sees it is never fetched again; the queue is done when no command
 * and no target I/O is in flight.
 */
#ifndef UBLKML_ENGINE_H
#define UBLKML_ENGINE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <liburing.h>

#include "ublkml.h"

#define TGT_IO_BIT	(1ULL << 63)
#define SECTOR_SHIFT	9

#ifndef RWF_DSYNC
#define RWF_DSYNC	0x00000002
#endif

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct ublkml_queue;
struct ublkml_target;
struct io_uring_cqe;

/* ---- the target ops table ----------------------------------------------
 *
 * A target is one C file: a constructor (its public ublkml_target_new_*,
 * which calls target_alloc with its kind and fills t->priv) and one of
 * these, listed in the registry in targets.c.  handle_io is required; every
 * other operation is optional, and a NULL one does what its comment says. */

/* Flags of a target type. */
enum {
	/* Requests go to the caller (ublkml_queue_commit_and_wait or the
	 * relay), so ublkml_queue_run refuses the queue, and the target has
	 * no completion path (no faults). */
	TGT_F_CALLER = 1 << 0,
	/* The target records each path's completions itself (the mirror: one
	 * record per leg I/O), so complete_io records nothing. */
	TGT_F_OWN_RECORDS = 1 << 1,
};

struct ublkml_tgt_ops {
	const char *name;
	int kind;			/* UBLKML_TGT_* */
	unsigned flags;			/* TGT_F_* */

	/* Required.  A request is in tag's descriptor, its checked offset,
	 * length and op in q->ts[tag]: answer it now (complete_io,
	 * answer_now) or start target I/O that answers it later. */
	void (*handle_io)(struct ublkml_queue *q, uint16_t tag);

	/* The CQE of target I/O (user_data has TGT_IO_BIT) of a kind other
	 * than TGT_KIND_DELAY, which the queue handles itself.  The hook
	 * decrements q->tgt_inflight for the I/O it had counted.  NULL: the
	 * target queues no I/O of its own. */
	void (*tgt_io_done)(struct ublkml_queue *q, const struct io_uring_cqe *cqe,
			    uint32_t kind, int leg, uint16_t idx);

	/* One path's I/O of the request in tag has its final result (faults'
	 * delays included).  NULL: the result answers the request. */
	void (*path_done)(struct ublkml_queue *q, uint16_t tag, int path, int res);

	/* The target's state, set by its constructor: freed here.  NULL: none. */
	void (*free_tgt)(struct ublkml_target *t);

	/* Per queue, at ublkml_queue_new (before the ring exists): set up
	 * q->priv; a failure fails the queue.  NULL: no per-queue state. */
	int (*init_queue)(struct ublkml_queue *q);
	/* Frees q->priv (also after a failed init_queue).  NULL: nothing. */
	void (*free_queue)(struct ublkml_queue *q);
	/* At ublkml_queue_free, before anything is freed: 1 when other threads
	 * still use the queue and the last of them will call queue_free_rest
	 * (relay workers stuck in a plug-in call).  NULL: never. */
	int (*detach_queue)(struct ublkml_queue *q);

	/* Harness: may a request be injected now?  NULL: yes. */
	int (*inject_ok)(const struct ublkml_queue *q);
};

/* The registry: kind -> ops (targets.c). */
const struct ublkml_tgt_ops *tgt_ops_of_kind(int kind);

extern const struct ublkml_tgt_ops tgt_null_ops;
extern const struct ublkml_tgt_ops tgt_mem_ops;
extern const struct ublkml_tgt_ops tgt_loop_ops;
extern const struct ublkml_tgt_ops tgt_events_ops;
extern const struct ublkml_tgt_ops tgt_mirror_ops;

/* ---- targets ------------------------------------------------------------ */

/* One backing file or device: the loop target has one, a mirror 2..8.  The
 * queues register them as fixed files. */
struct backing {
	int fd;
	int is_bdev;
};

struct fault_set;

struct ublkml_target {
	const struct ublkml_tgt_ops *ops;
	uint64_t size;
	int n_legs;			/* backing files: loop 1, mirror 2..8 */
	struct backing legs[UBLKML_MAX_LEGS];
	struct fault_set *faults;	/* faults.c: one slot per path */
	void *priv;			/* the target's own state */
};

/* A target of that kind, no backing files, priv NULL. */
int target_alloc(struct ublkml_target **out, int kind, uint64_t size);

/* ---- queues ------------------------------------------------------------- */

/* user_data of target I/O: bit 63, then kind, leg and tag (or slot). */
#define UD_KIND_SHIFT	24
#define UD_LEG_SHIFT	16
enum {
	TGT_KIND_IO = 0,		/* a leg I/O of a request (tag) */
	TGT_KIND_DELAY = 1,		/* the injected delay of a path's I/O ended */
	/* the target's own kinds follow (each target numbers its own) */
	TGT_KIND_PRIVATE = 2,
};

static inline uint64_t tgt_ud(uint32_t kind, uint32_t leg, uint32_t idx)
{
	return TGT_IO_BIT | (uint64_t)kind << UD_KIND_SHIFT |
	       (uint64_t)leg << UD_LEG_SHIFT | idx;
}

/* CQEs a queue's ring has beyond one per ublk command and two (an I/O, a
 * delay's timer) per path per tag: for a target's other I/O (the mirror's
 * health probes and their timers, the relay's eventfd read). */
#define TGT_EXTRA_CQES	8

/* Per-tag state of a request in progress (its target's own per-tag state
 * lives in q->priv). */
struct tag_state {
	uint64_t off;		/* backing offset of the request */
	uint32_t len;		/* bytes of the request */
	uint8_t op;
	uint8_t fua;
	uint64_t t_start;	/* ns, only when records are on */
};

/* Per-tag, per-path state of one path's I/O (loop, null and mem use path
 * 0; a mirror one per leg). */
struct leg_io {
	uint64_t t_start;	/* ns, when records or a fault are on */
	uint32_t done;		/* bytes moved so far (short I/O resubmits) */
	int32_t res;		/* result held while an injected delay runs */
	uint8_t zero_fallback;	/* 0: fallocate, 1: punch, 2: writing zeros */
	struct __kernel_timespec ts;	/* read by the kernel at submit time */
};

struct queue_faults;
struct harness;

struct ublkml_queue {
	struct io_uring ring;
	struct ublkml_target *t;
	/* t->ops, kept here too: relay workers may free the queue after the
	 * target is gone (see ops.detach_queue) */
	const struct ublkml_tgt_ops *ops;
	int cdev_fd;			/* < 0: harness */
	int fixed_cdev;			/* registered-file index, or -1 */
	int fixed_backing;		/* index of leg 0; legs follow */
	uint16_t q_id;
	uint16_t depth;
	uint32_t buf_size;
	uint32_t op_fetch;
	uint32_t op_commit;
	struct ublksrv_io_desc *iods;
	size_t iods_len;
	int iods_borrowed;	/* mapped by the parent of a queue process */
	char *bufs;
	/* NULL, or each tag's buffer when a target moves them (the relay
	 * gives a tag a fresh one when a plug-in call hung with the old) */
	char **tag_buf;
	struct tag_state *ts;
	int n_paths;			/* leg_io entries per tag */
	struct leg_io *lio;
	int cmd_inflight;
	int tgt_inflight;
	int stopping;
	uint64_t spin_ns;		/* hybrid polling budget, 0 = always sleep */
	struct harness *harness;	/* harness.c, when cdev_fd < 0 */
	struct ublkml_queue_stats st;
	/* completion records (SPSC: the queue thread produces) */
	struct ublkml_completion *rec;
	uint32_t rec_mask;
	uint64_t rec_head;		/* producer: next slot to write */
	uint64_t rec_tail;		/* consumer: next slot to read */
	uint64_t rec_dropped;
	struct ublkml_path_summary *sums;	/* [UBLKML_MAX_LEGS] or NULL */
	struct queue_faults *qf;	/* faults.c: this queue's copies */
	void *priv;			/* the target's per-queue state */
};

static inline struct leg_io *lio(struct ublkml_queue *q, uint16_t tag, int leg)
{
	return &q->lio[(size_t)tag * (size_t)q->n_paths + (size_t)leg];
}

/* queue.c */
struct io_uring_sqe *get_sqe(struct ublkml_queue *q);
/* The answer to one request: commit it (or record it, in the harness). */
void complete_io(struct ublkml_queue *q, uint16_t tag, int32_t res);
/* A path's I/O is finished: the target's path_done, or the answer. */
void path_finish(struct ublkml_queue *q, uint16_t tag, int path, int res);
/* One completion into the summaries and/or the record ring. */
void record(struct ublkml_queue *q, uint16_t tag, uint8_t path, uint8_t op,
	    uint64_t off, uint32_t len, int32_t res, uint64_t t_start,
	    uint16_t flags);
void handle_request(struct ublkml_queue *q, uint16_t tag);
int process_batch(struct ublkml_queue *q);
/* Handle every ready CQE, without waiting. */
unsigned reap(struct ublkml_queue *q);
int queue_done(const struct ublkml_queue *q);
int ring_error(int ret);
/* Frees what ublkml_queue_free left (see ops.detach_queue). */
void queue_free_rest(struct ublkml_queue *q);
/* Move up to max events from the front of a list into out. */
int take_events(struct ublkml_event *list, int *count,
		struct ublkml_event *out, int max);

/* faults.c */
struct fault_set *faults_new(void);
void faults_free(struct fault_set *fs);
struct queue_faults *queue_faults_new(void);
/* Is a fault set on the path (refreshing this queue's copy)? */
int fault_on(struct ublkml_queue *q, int path);
/* 0, or the -errno this path's I/O must fail with instead of being issued. */
int fault_error(struct ublkml_queue *q, int path, uint8_t op);
/* ns to add to an I/O of the path that took service_ns. */
uint64_t fault_extra_ns(struct ublkml_queue *q, int path, uint64_t service_ns,
			uint64_t now);
/* Queue an IORING_OP_TIMEOUT of ns whose CQE carries ud. */
int arm_delay(struct ublkml_queue *q, struct __kernel_timespec *ts, uint64_t ns,
	      uint64_t ud);
/* A path's I/O has its final result: add the path's injected delay, then
 * path_finish. */
void path_io_done(struct ublkml_queue *q, uint16_t tag, int path, int res);
/* null and mem: the answer is known now; a fault may still delay it. */
void answer_now(struct ublkml_queue *q, uint16_t tag, int res);

/* backing.c */
int leg_fd(struct ublkml_queue *q, int leg);
/* Mark an SQE as target I/O on a backing file and count it in flight. */
void tgt_prep_done(struct ublkml_queue *q, struct io_uring_sqe *sqe, uint64_t ud);
/* Start one leg I/O of the request in tag (it ends in path_finish, maybe
 * before this returns). */
void leg_start(struct ublkml_queue *q, uint16_t tag, int leg);
/* The CQE of a leg I/O's backing operation. */
void leg_cqe(struct ublkml_queue *q, uint16_t tag, int leg, int res);

/* harness.c */
int harness_init(struct ublkml_queue *q);
void harness_free(struct ublkml_queue *q);
void harness_answer(struct ublkml_queue *q, uint16_t tag, int32_t res);
int harness_take(struct ublkml_queue *q, struct ublkml_event *out, int max);

#endif /* UBLKML_ENGINE_H */
