/* SPDX-License-Identifier: MIT */
/*
 * ublkml's native engine: the control ring and the per-queue data path.
 *
 * Conventions (as liburing's): every function that can fail returns a
 * negative errno; 0 or a count means success.  Nothing here allocates per
 * I/O: a queue owns its descriptors, buffers and ring for its whole life.
 */
#ifndef UBLKML_H
#define UBLKML_H

#include <stdint.h>
#include "ublk_uapi.h"

/* ---- control device ---------------------------------------------------- */

struct ublkml_ctrl;

int ublkml_ctrl_open(struct ublkml_ctrl **out, const char *path);
void ublkml_ctrl_close(struct ublkml_ctrl *c);
/* Sends one control command and waits for its completion (the GIL is
 * released by cffi around the call, so START_DEV may block here safely). */
int ublkml_ctrl_cmd(struct ublkml_ctrl *c, uint32_t cmd_op, uint32_t dev_id,
		    uint16_t queue_id, void *buf, uint16_t len, uint64_t data0);

/* ---- targets ----------------------------------------------------------- */

enum {
	UBLKML_TGT_NULL = 0,
	UBLKML_TGT_MEM = 1,
	UBLKML_TGT_LOOP = 2,
	UBLKML_TGT_EVENTS = 3,	/* I/O handed to the caller (Python plug-ins) */
	UBLKML_TGT_MIRROR = 4,	/* RAID1 over 2..UBLKML_MAX_LEGS files/devices */
};

#define UBLKML_MAX_LEGS		8
/* Completion records of health probes carry this tag (they have none). */
#define UBLKML_PROBE_TAG	0xffff
/* Record flags: a user read that carried a health probe (the probe went out
 * in the same submission, so the two are the fair comparison). */
#define UBLKML_REC_PROBED	0x1

struct ublkml_target;

int ublkml_target_new_null(struct ublkml_target **out, uint64_t size);
int ublkml_target_new_mem(struct ublkml_target **out, uint64_t size);
/* fd stays owned by the caller; is_bdev selects ioctl discard/zeroout. */
int ublkml_target_new_loop(struct ublkml_target **out, int fd, int is_bdev,
			   uint64_t size);
int ublkml_target_new_events(struct ublkml_target **out, uint64_t size);
/* Mirror (RAID1): fds stay owned by the caller, opened like loop's.  The
 * dirty-region size is 1 << region_shift bytes (12..30).  journal_fd (or
 * -1): a file that keeps leg states, dirty regions and writes in flight
 * across a server crash; an empty one is laid out, a used one is replayed
 * (-EBADMSG: it belongs to another mirror). */
int ublkml_target_new_mirror(struct ublkml_target **out, const int *fds,
			     const int *is_bdev, int n_legs, uint64_t size,
			     uint32_t region_shift, int journal_fd);
void ublkml_target_free(struct ublkml_target *t);
int ublkml_target_kind(const struct ublkml_target *t);
/* Completion paths of a target: mirror legs, 1 for null/mem/loop, 0 for
 * event targets (faults need a path). */
int ublkml_target_n_paths(const struct ublkml_target *t);

/* ---- fault injection (per completion path) ----------------------------- */

enum {
	UBLKML_FAULT_CONST = 0,	/* always on */
	UBLKML_FAULT_BURST = 1,	/* on for burst_on_ms of every burst_period_ms */
	UBLKML_FAULT_RAMP = 2,	/* intensity grows linearly 0 -> 1 over ramp_ms */
};

/* The schedule's clock starts when the fault is set.  Its intensity d
 * (0..1: CONST 1, BURST 0 or 1, RAMP elapsed/ramp_ms) scales all three
 * effects: delay d*delay_us, slowdown 1 + d*(slow-1), error rate d*err_ppm. */
struct ublkml_fault {
	uint32_t delay_us;	/* fixed delay added to every I/O of the path */
	uint32_t slow_x1000;	/* slowdown x1000 (10000 = 10x the measured
				 * service time); 0 or 1000 = none */
	uint8_t mode;		/* UBLKML_FAULT_* */
	uint8_t pad0[3];
	uint32_t burst_period_ms;
	uint32_t burst_on_ms;
	uint32_t ramp_ms;
	uint32_t err_ppm;	/* error probability per I/O, parts per million */
	uint32_t err_ops;	/* 1 << UBLK_IO_OP_* of the ops that may fail;
				 * 0 = every op */
	int32_t err_errno;	/* positive errno of injected errors; 0 = EIO */
	uint32_t pad1;
	uint64_t seed;		/* of the per-queue PRNG that picks errors */
};

/* Safe from any thread while queues serve (a seqlock: queue threads never
 * wait).  f == NULL clears the path's fault. */
int ublkml_target_set_fault(struct ublkml_target *t, uint32_t path,
			    const struct ublkml_fault *f);
/* 1 and *out filled when a fault is set, 0 when none. */
int ublkml_target_get_fault(struct ublkml_target *t, uint32_t path,
			    struct ublkml_fault *out);

/* ---- mirror legs ------------------------------------------------------- */

enum {
	UBLKML_LEG_ACTIVE = 0,	/* read and written */
	UBLKML_LEG_DEMOTED = 1,	/* written, not read (also: being resynced) */
	UBLKML_LEG_FAILED = 2,	/* neither; writes mark its dirty regions */
};

struct ublkml_leg_info {
	uint32_t state;		/* UBLKML_LEG_* */
	uint32_t pad0;
	uint64_t dirty_regions;
	uint64_t total_regions;
	uint64_t reads;		/* leg reads (retries included, probes not) */
	uint64_t writes;	/* leg writes, flushes, discards, zeroings */
	uint64_t errors;	/* failed leg I/O, probes included */
	uint64_t probes;	/* health-probe reads while demoted */
};

/* -EBUSY: would leave no ACTIVE leg.  -EAGAIN: -> ACTIVE while the leg has
 * dirty regions (resync first).  Safe from any thread while queues serve. */
int ublkml_mirror_set_leg_state(struct ublkml_target *t, int leg, int state);
int ublkml_mirror_leg_info(struct ublkml_target *t, int leg,
			   struct ublkml_leg_info *out);
/* Every Nth user read is also sent to each DEMOTED leg (0: no probes). */
int ublkml_mirror_set_probe_every(struct ublkml_target *t, uint32_t n);
/* Copies up to max_regions dirty regions of leg from an ACTIVE leg (with
 * max_regions > 0, a FAILED leg first becomes DEMOTED, so that it is
 * written from now on; max_regions = 0 only counts).
 * Blocking (pread/pwrite): call it from a control thread.  Returns the
 * dirty regions left, or a negative errno. */
int ublkml_mirror_resync(struct ublkml_target *t, int leg, int max_regions);

/* O_DIRECT alignment the file or device needs (STATX_DIOALIGN, BLKSSZGET),
 * or 512 when the kernel does not say. */
int ublkml_dio_alignment(int fd, int is_bdev);

/* ---- queues ------------------------------------------------------------ */

/* One I/O handed to the caller (event targets and the test harness). */
struct ublkml_event {
	uint16_t tag;
	uint8_t op;
	uint8_t pad0;
	uint32_t op_flags;
	uint32_t nr_sectors;
	int32_t result;		/* filled in by whoever completes it */
	uint64_t start_sector;
};

struct ublkml_queue_stats {
	uint64_t ops[8];	/* by UBLK_IO_OP_* (0..7) */
	uint64_t bytes[8];
	uint64_t errors;
	uint64_t batches;	/* completion batches reaped */
	/* the last request answered with an error */
	int32_t last_error;	/* negative errno, 0: none yet */
	uint32_t last_error_op;	/* UBLK_IO_OP_* */
	uint64_t last_error_offset;	/* bytes */
};

/* One completed request, for the ML scorer (ml/).  Written by the queue
 * thread into a preallocated single-producer ring; never blocks it. */
struct ublkml_completion {
	uint64_t t_ns;		/* when answered, CLOCK_MONOTONIC */
	uint64_t offset;	/* bytes */
	uint32_t length;	/* bytes */
	uint32_t lat_ns;	/* request seen -> answered (saturates) */
	int32_t result;
	uint16_t q_id;
	uint16_t tag;
	uint8_t op;
	uint8_t path;		/* completion path: backing file, mirror leg */
	uint16_t flags;		/* UBLKML_REC_* */
	uint32_t pad1;
};

/* Per completion path, cumulative since enabled: what the ML scorer's
 * features need (ml/features.py Summary), counted by the queue thread so
 * that scoring costs no per-I/O work in Python.  hist: 16 linear bins per
 * octave of latency in ns (bin = (e-1)*16 + top 5 bits - 16, e = bit length),
 * the same bins as ml.features.latency_bins. */
#define UBLKML_SUM_BINS		512
struct ublkml_path_summary {
	uint64_t n;
	uint64_t errors;
	uint64_t bytes;		/* moved by successful reads and writes */
	uint64_t lat_sum;	/* ns */
	double lat_sumsq;	/* ns^2 */
	uint64_t hist[UBLKML_SUM_BINS];
};

struct ublkml_queue;

/* cdev_fd < 0 builds a harness queue: no ublk driver, descriptors live in
 * the heap, I/O comes from ublkml_queue_inject and results are collected
 * by ublkml_queue_harvest.  Unit tests use it to check target logic.
 * iods: the queue's descriptors as mapped by ublkml_map_descriptors in the
 * process that forked this one (queue processes); NULL: map them here. */
int ublkml_queue_new(struct ublkml_queue **out, struct ublkml_target *t,
		     int cdev_fd, uint16_t q_id, uint16_t depth,
		     uint32_t buf_size, int ioctl_encode, uint32_t ring_flags,
		     void *iods);
int ublkml_map_descriptors(int cdev_fd, uint16_t q_id, uint16_t depth, void **out);
int ublkml_unmap_descriptors(void *iods, uint16_t depth);
void ublkml_queue_free(struct ublkml_queue *q);
/* Must run on the thread that will serve the queue. */
int ublkml_queue_submit_fetches(struct ublkml_queue *q);
int ublkml_set_thread_name(const char *name);
void ublkml_queue_set_spin(struct ublkml_queue *q, uint32_t spin_usec);
/* Native targets: serve until the driver aborts the queue (0) or an error. */
int ublkml_queue_run(struct ublkml_queue *q);
/* Event targets: commit evs[0..n_done) with their result, then wait for new
 * I/O and fill evs[0..max); returns how many, or -ENODEV once stopped. */
int ublkml_queue_commit_and_wait(struct ublkml_queue *q,
				 struct ublkml_event *evs, int n_done, int max);
void *ublkml_queue_buf(struct ublkml_queue *q, uint16_t tag);
uint32_t ublkml_queue_buf_size(const struct ublkml_queue *q);
void ublkml_queue_get_stats(const struct ublkml_queue *q,
			    struct ublkml_queue_stats *out);

/* Completion records: enable before serving (capacity: a power of two);
 * read from any one other thread.  Full ring = records dropped, counted. */
int ublkml_queue_enable_records(struct ublkml_queue *q, uint32_t capacity);
int ublkml_queue_read_records(struct ublkml_queue *q,
			      struct ublkml_completion *out, int max);
/* Per-path summaries (UBLKML_MAX_LEGS paths); read copies them (any
 * thread; each word is read atomically, fields may be a few I/Os apart). */
int ublkml_queue_enable_summaries(struct ublkml_queue *q);
int ublkml_queue_read_summaries(struct ublkml_queue *q,
				struct ublkml_path_summary *out, int max_paths);
uint64_t ublkml_queue_records_dropped(const struct ublkml_queue *q);

/* Harness only. */
int ublkml_queue_inject(struct ublkml_queue *q, uint16_t tag, uint32_t op_flags,
			uint64_t start_sector, uint32_t nr_sectors);
int ublkml_queue_harvest(struct ublkml_queue *q, struct ublkml_event *out,
			 int max);

/* ---- event targets: the relay (plug-in calls off the ring thread) ----- */

/* A plug-in call may hang; only the thread that fetched a tag may commit
 * it.  With a relay the queue's thread keeps the ring
 * (ublkml_queue_relay) and worker threads call the plug-in
 * (ublkml_relay_next); a call that does not return within the timeout
 * fails its I/O with -ETIMEDOUT and the next worker takes over.  See
 * "the relay" in target_relay.c. */

/* An event the ring thread took back from a stuck worker: the handler
 * must not serve it (answer UBLKML_RELAY_CANCELLED). */
#define UBLKML_OP_CANCELLED	0xff
/* Result of an event not answered yet, and of a cancelled one. */
#define UBLKML_RELAY_PENDING	(-2147483647 - 1)
#define UBLKML_RELAY_CANCELLED	(-2147483647)
/* Set in ublkml_relay_next's return value when *note was filled. */
#define UBLKML_RELAY_NOTE	(1 << 24)

struct ublkml_relay_worker;

/* What a worker should know; filled when ublkml_relay_next's return value
 * has UBLKML_RELAY_NOTE. */
struct ublkml_relay_note {
	uint32_t buf_gen;	/* tag buffers moved: fetch them again */
	uint32_t stuck;		/* plug-in calls running past the timeout now */
	uint64_t timeouts;	/* I/Os failed by the timeout, ever */
	uint64_t late;		/* given-up calls that returned later, ever */
	uint32_t spawn;		/* 1: join and start one more worker (a spare) */
	uint32_t came_back;	/* 1: this worker's previous batch had been
				 * given up; its call returned after late_ns */
	uint64_t late_ns;
	uint32_t new_timeouts;	/* I/Os failed by the timeout since the last
				 * note that reported any; the last one: */
	uint16_t tag;
	uint8_t op;
	uint8_t pad0;
	uint32_t op_flags;
	uint32_t nr_sectors;
	uint64_t start_sector;
	uint64_t stuck_ns;	/* how long its call had run */
};

struct ublkml_relay_stats {
	uint64_t timeouts;	/* I/Os failed because a call hung */
	uint64_t late;		/* hung calls that returned later */
	uint64_t unserved;	/* I/Os failed because no worker took them */
	uint32_t stuck;		/* calls running past the timeout now */
	uint32_t workers;
};

/* Before serving, on an event target's queue.  timeout_ns > 0; spares
 * are asked for up to 2 + max_stuck workers. */
int ublkml_queue_relay_init(struct ublkml_queue *q, uint64_t timeout_ns,
			    int max_stuck);
/* The ring thread: serve until the driver aborts the queue (harness: until
 * every injected event is answered).  Workers are told to leave (-ENODEV). */
int ublkml_queue_relay(struct ublkml_queue *q);
/* A worker: join once, then loop on next.  next answers the previous batch
 * (evs[0..n_done), results filled) and waits for the next one: returns its
 * size (| UBLKML_RELAY_NOTE), or -ENODEV when the queue is done; the worker
 * is then freed and must not be used again.  max >= the queue depth. */
int ublkml_relay_join(struct ublkml_queue *q, struct ublkml_relay_worker **out);
int ublkml_relay_next(struct ublkml_relay_worker *w, struct ublkml_event *evs,
		      int n_done, int max, struct ublkml_relay_note *note);
int ublkml_queue_relay_stats(struct ublkml_queue *q,
			     struct ublkml_relay_stats *out);
/* Hung calls no note has reported yet (when every worker is stuck, no
 * worker takes a note): 1 and *note filled (new_timeouts and the last
 * one), 0 when none.  Any thread. */
int ublkml_queue_relay_report(struct ublkml_queue *q,
			      struct ublkml_relay_note *note);
/* Harness only: hand a request (tag < 0: none) to a running relay, from any
 * thread; feeding = 1 keeps the relay from finishing when it runs dry. */
int ublkml_queue_relay_feed(struct ublkml_queue *q, int tag, uint32_t op_flags,
			    uint64_t start_sector, uint32_t nr_sectors, int feeding);
/* Harness only: take the answers so far while the relay runs. */
int ublkml_queue_relay_harvest(struct ublkml_queue *q, struct ublkml_event *out,
			       int max);

#endif /* UBLKML_H */
