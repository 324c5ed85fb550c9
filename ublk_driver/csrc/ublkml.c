/* SPDX-License-Identifier: MIT */
/*
 * ublkml's native engine.  See ublkml.h for the conventions.
 *
 * The hot path
 * ------------
 * One queue = one io_uring + one thread.  The ring carries two kinds of
 * requests, told apart by bit 63 of user_data:
 *   - ublk I/O commands (FETCH_REQ, COMMIT_AND_FETCH_REQ) on /dev/ublkcN;
 *   - target I/O (read/write/fsync/fallocate on the loop backing file).
 * ublkml_queue_run() loops: submit everything prepared, wait for >= 1 CQE,
 * then walk every ready CQE.  A CQE of a ublk command means "a request is in
 * this tag's descriptor": the target handles it, either at once (null, mem:
 * the answer is prepared as the next COMMIT_AND_FETCH) or by queueing target
 * I/O whose CQE later prepares the commit.  Nothing reaches the kernel until
 * the next submit, so one io_uring_enter() carries a whole batch of commits
 * and new target I/O: the syscall cost is per batch, not per I/O, and no
 * Python runs at all for native targets.
 *
 * Event targets (Python plug-ins) get the same loop, but instead of handling
 * a request it is copied into a caller-supplied array; the caller answers
 * the whole array in one call.  So Python runs once per batch of
 * completions, plus the plug-in's own method per I/O.
 *
 * Stopping: STOP_DEV (from any thread or process) makes the driver complete
 * every outstanding FETCH/COMMIT with UBLK_IO_RES_ABORT (-ENODEV).  A tag
 * that sees it is never fetched again; the queue is done when no command
 * and no target I/O is in flight.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "ublkml.h"

#define TGT_IO_BIT	(1ULL << 63)
#define SECTOR_SHIFT	9

#ifndef RWF_DSYNC
#define RWF_DSYNC	0x00000002
#endif

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- control device ---------------------------------------------------- */

struct ublkml_ctrl {
	int fd;
	struct io_uring ring;
};

int ublkml_ctrl_open(struct ublkml_ctrl **out, const char *path)
{
	struct ublkml_ctrl *c = calloc(1, sizeof(*c));
	int ret;

	if (!c)
		return -ENOMEM;
	c->fd = open(path, O_RDWR | O_CLOEXEC);
	if (c->fd < 0) {
		ret = -errno;
		free(c);
		return ret;
	}
	/* The control device accepts commands only from SQE128 rings. */
	ret = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
	if (ret < 0) {
		close(c->fd);
		free(c);
		return ret;
	}
	*out = c;
	return 0;
}

void ublkml_ctrl_close(struct ublkml_ctrl *c)
{
	if (!c)
		return;
	io_uring_queue_exit(&c->ring);
	close(c->fd);
	free(c);
}

int ublkml_ctrl_cmd(struct ublkml_ctrl *c, uint32_t cmd_op, uint32_t dev_id,
		    uint16_t queue_id, void *buf, uint16_t len, uint64_t data0)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
	struct io_uring_cqe *cqe;
	struct ublksrv_ctrl_cmd *cmd;
	int ret;

	if (!sqe)
		return -EBUSY;
	memset(sqe, 0, 2 * sizeof(*sqe));
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = c->fd;
	sqe->cmd_op = cmd_op;
	cmd = (struct ublksrv_ctrl_cmd *)sqe->cmd;
	cmd->dev_id = dev_id;
	cmd->queue_id = queue_id;
	cmd->addr = (uint64_t)(uintptr_t)buf;
	cmd->len = len;
	cmd->data[0] = data0;

	ret = io_uring_submit(&c->ring);
	if (ret < 0)
		return ret;
	do {
		ret = io_uring_wait_cqe(&c->ring, &cqe);
	} while (ret == -EINTR);
	if (ret < 0)
		return ret;
	ret = cqe->res;
	io_uring_cqe_seen(&c->ring, cqe);
	return ret;
}

/* ---- targets ----------------------------------------------------------- */

struct ublkml_target {
	int kind;
	uint64_t size;
	uint8_t *mem;		/* mem */
	int fd;			/* loop */
	int is_bdev;		/* loop */
};

static int target_alloc(struct ublkml_target **out, int kind, uint64_t size)
{
	struct ublkml_target *t = calloc(1, sizeof(*t));

	if (!t)
		return -ENOMEM;
	t->kind = kind;
	t->size = size;
	t->fd = -1;
	*out = t;
	return 0;
}

int ublkml_target_new_null(struct ublkml_target **out, uint64_t size)
{
	return target_alloc(out, UBLKML_TGT_NULL, size);
}

int ublkml_target_new_events(struct ublkml_target **out, uint64_t size)
{
	return target_alloc(out, UBLKML_TGT_EVENTS, size);
}

int ublkml_target_new_mem(struct ublkml_target **out, uint64_t size)
{
	int ret = target_alloc(out, UBLKML_TGT_MEM, size);
	void *p;

	if (ret)
		return ret;
	/* Anonymous pages read as zero and cost nothing until written. */
	p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED) {
		ret = -errno;
		free(*out);
		*out = NULL;
		return ret;
	}
	(*out)->mem = p;
	return 0;
}

int ublkml_target_new_loop(struct ublkml_target **out, int fd, int is_bdev,
			   uint64_t size)
{
	int ret = target_alloc(out, UBLKML_TGT_LOOP, size);

	if (ret)
		return ret;
	(*out)->fd = fd;
	(*out)->is_bdev = is_bdev;
	return 0;
}

void ublkml_target_free(struct ublkml_target *t)
{
	if (!t)
		return;
	if (t->mem)
		munmap(t->mem, t->size);
	free(t);
}

int ublkml_target_kind(const struct ublkml_target *t)
{
	return t->kind;
}

int ublkml_dio_alignment(int fd, int is_bdev)
{
	if (is_bdev) {
		int ssz = 0;

		if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 0)
			return ssz;
		return 512;
	}
#ifdef STATX_DIOALIGN
	{
		struct statx stx;

		if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
		    (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align)
			return (int)stx.stx_dio_offset_align;
	}
#endif
	return 512;
}

/* ---- queues ------------------------------------------------------------ */

/* Per-tag state of a request in progress. */
struct tag_state {
	uint64_t off;		/* backing offset of the request */
	uint32_t len;		/* bytes of the request */
	uint32_t done;		/* bytes moved so far (short I/O resubmits) */
	uint8_t op;
	uint8_t zero_fallback;	/* 0: fallocate, 1: punch, 2: writing zeros */
	uint8_t fua;
	uint8_t path;
	uint64_t t_start;	/* ns, only when records are on */
};

struct ublkml_queue {
	struct io_uring ring;
	struct ublkml_target *t;
	int cdev_fd;			/* < 0: harness */
	int fixed_cdev;			/* registered-file index, or -1 */
	int fixed_backing;
	uint16_t q_id;
	uint16_t depth;
	uint32_t buf_size;
	uint32_t op_fetch;
	uint32_t op_commit;
	struct ublksrv_io_desc *iods;
	size_t iods_len;
	char *bufs;
	struct tag_state *ts;
	int cmd_inflight;
	int tgt_inflight;
	int stopping;
	uint64_t spin_ns;		/* hybrid polling budget, 0 = always sleep */
	/* event targets: requests reaped but not yet handed out */
	struct ublkml_event *pending;
	int n_pending;
	/* harness: results recorded instead of committed */
	struct ublkml_event *harvest;
	int n_harvest;
	struct ublkml_queue_stats st;
	/* completion records (SPSC: the queue thread produces) */
	struct ublkml_completion *rec;
	uint32_t rec_mask;
	uint64_t rec_head;		/* producer: next slot to write */
	uint64_t rec_tail;		/* consumer: next slot to read */
	uint64_t rec_dropped;
};

static size_t round_up(size_t v, size_t a)
{
	return (v + a - 1) / a * a;
}

int ublkml_queue_new(struct ublkml_queue **out, struct ublkml_target *t,
		     int cdev_fd, uint16_t q_id, uint16_t depth,
		     uint32_t buf_size, int ioctl_encode, uint32_t ring_flags)
{
	struct ublkml_queue *q;
	struct io_uring_params p;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	int ret;

	if (depth == 0 || depth > UBLK_MAX_QUEUE_DEPTH || buf_size == 0)
		return -EINVAL;
	q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	q->t = t;
	q->cdev_fd = cdev_fd;
	q->q_id = q_id;
	q->depth = depth;
	q->buf_size = buf_size;
	q->op_fetch = ioctl_encode ? UBLK_U_IO_FETCH_REQ : UBLK_IO_FETCH_REQ;
	q->op_commit = ioctl_encode ? UBLK_U_IO_COMMIT_AND_FETCH_REQ :
				      UBLK_IO_COMMIT_AND_FETCH_REQ;
	q->iods_len = round_up((size_t)depth * sizeof(struct ublksrv_io_desc), page);
	q->ring.ring_fd = -1;

	if (cdev_fd >= 0) {
		off_t off = UBLKSRV_CMD_BUF_OFFSET + (off_t)q_id *
			UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc);
		/* The driver only allows a read-only mapping. */
		void *m = mmap(NULL, q->iods_len, PROT_READ,
			       MAP_SHARED | MAP_POPULATE, cdev_fd, off);
		if (m == MAP_FAILED) {
			ret = -errno;
			q->iods = NULL;
			goto fail;
		}
		q->iods = m;
	} else {
		q->iods = calloc(depth, sizeof(struct ublksrv_io_desc));
		q->harvest = calloc(depth, sizeof(struct ublkml_event));
		if (!q->iods || !q->harvest) {
			ret = -ENOMEM;
			goto fail;
		}
	}

	if (posix_memalign((void **)&q->bufs, page, (size_t)depth * buf_size)) {
		q->bufs = NULL;
		ret = -ENOMEM;
		goto fail;
	}
	q->ts = calloc(depth, sizeof(*q->ts));
	q->pending = calloc(depth, sizeof(struct ublkml_event));
	if (!q->ts || !q->pending) {
		ret = -ENOMEM;
		goto fail;
	}

	/* Room for one ublk command and one target I/O per tag. */
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | ring_flags;
	p.cq_entries = 4u * depth;
	ret = io_uring_queue_init_params(2u * depth, &q->ring, &p);
	if (ret == -EINVAL && (ring_flags & (IORING_SETUP_DEFER_TASKRUN |
					     IORING_SETUP_SINGLE_ISSUER))) {
		/* Kernels before 6.1 lack these: fall back to a plain ring. */
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_CQSIZE;
		p.cq_entries = 4u * depth;
		ret = io_uring_queue_init_params(2u * depth, &q->ring, &p);
	}
	if (ret < 0) {
		q->ring.ring_fd = -1;
		goto fail;
	}
	/* Registered files and ring fd spare an fget/fput per SQE and per
	 * io_uring_enter: atomic operations that are costly on the hot path.
	 * Both are optional; plain fds work where registration fails. */
	{
		int fds[2], n = 0;

		q->fixed_cdev = q->fixed_backing = -1;
		if (cdev_fd >= 0)
			fds[n++] = cdev_fd;
		if (t->kind == UBLKML_TGT_LOOP)
			fds[n++] = t->fd;
		if (n && io_uring_register_files(&q->ring, fds, n) == 0) {
			q->fixed_cdev = cdev_fd >= 0 ? 0 : -1;
			q->fixed_backing = t->kind == UBLKML_TGT_LOOP ? n - 1 : -1;
		}
		io_uring_register_ring_fd(&q->ring);
	}
	*out = q;
	return 0;
fail:
	ublkml_queue_free(q);
	return ret;
}

void ublkml_queue_free(struct ublkml_queue *q)
{
	if (!q)
		return;
	if (q->ring.ring_fd >= 0)
		io_uring_queue_exit(&q->ring);
	if (q->iods) {
		if (q->cdev_fd >= 0)
			munmap(q->iods, q->iods_len);
		else
			free(q->iods);
	}
	free(q->bufs);
	free(q->ts);
	free(q->pending);
	free(q->harvest);
	free(q->rec);
	free(q);
}

void ublkml_queue_set_spin(struct ublkml_queue *q, uint32_t spin_usec)
{
	q->spin_ns = (uint64_t)spin_usec * 1000u;
}

void *ublkml_queue_buf(struct ublkml_queue *q, uint16_t tag)
{
	return q->bufs + (size_t)tag * q->buf_size;
}

uint32_t ublkml_queue_buf_size(const struct ublkml_queue *q)
{
	return q->buf_size;
}

void ublkml_queue_get_stats(const struct ublkml_queue *q,
			    struct ublkml_queue_stats *out)
{
	*out = q->st;
}

static struct io_uring_sqe *get_sqe(struct ublkml_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	/* The ring is sized for every tag's needs, but a full SQ (possible
	 * when short I/O resubmits pile up) is drained rather than failed. */
	if (!sqe) {
		io_uring_submit(&q->ring);
		sqe = io_uring_get_sqe(&q->ring);
	}
	return sqe;
}

static int queue_io_cmd(struct ublkml_queue *q, uint16_t tag, uint32_t op,
			int32_t result)
{
	struct io_uring_sqe *sqe = get_sqe(q);
	struct ublksrv_io_cmd *cmd;

	if (!sqe)
		return -EBUSY;
	if (q->fixed_cdev >= 0) {
		io_uring_prep_rw(IORING_OP_URING_CMD, sqe, q->fixed_cdev, NULL, 0, 0);
		sqe->flags |= IOSQE_FIXED_FILE;
	} else {
		io_uring_prep_rw(IORING_OP_URING_CMD, sqe, q->cdev_fd, NULL, 0, 0);
	}
	sqe->cmd_op = op;
	cmd = (struct ublksrv_io_cmd *)sqe->cmd;
	cmd->q_id = q->q_id;
	cmd->tag = tag;
	cmd->result = result;
	cmd->addr = (uint64_t)(uintptr_t)ublkml_queue_buf(q, tag);
	io_uring_sqe_set_data64(sqe, tag);
	q->cmd_inflight++;
	return 0;
}

int ublkml_set_thread_name(const char *name)
{
	/* Python's thread names stay inside Python; profilers, top and perf
	 * see this one. */
	return -pthread_setname_np(pthread_self(), name);
}

int ublkml_queue_submit_fetches(struct ublkml_queue *q)
{
	int ret;

	if (q->cdev_fd < 0)
		return 0;
	for (uint16_t tag = 0; tag < q->depth; tag++) {
		ret = queue_io_cmd(q, tag, q->op_fetch, 0);
		if (ret)
			return ret;
	}
	ret = io_uring_submit(&q->ring);
	return ret < 0 ? ret : 0;
}

static void record_completion(struct ublkml_queue *q, uint16_t tag, int32_t res)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	uint64_t tail = __atomic_load_n(&q->rec_tail, __ATOMIC_ACQUIRE);
	struct ublkml_completion *c;
	uint64_t now, lat;

	if (q->rec_head - tail > q->rec_mask) {
		q->rec_dropped++;	/* the scorer is behind: never wait for it */
		return;
	}
	now = now_ns();
	lat = now - q->ts[tag].t_start;
	c = &q->rec[q->rec_head & q->rec_mask];
	c->t_ns = now;
	c->offset = iod->start_sector << SECTOR_SHIFT;
	c->length = iod->nr_sectors << SECTOR_SHIFT;
	c->lat_ns = lat > UINT32_MAX ? UINT32_MAX : (uint32_t)lat;
	c->result = res;
	c->q_id = q->q_id;
	c->tag = tag;
	c->op = iod->op_flags & 0xff;
	c->path = q->ts[tag].path;
	__atomic_store_n(&q->rec_head, q->rec_head + 1, __ATOMIC_RELEASE);
}

int ublkml_queue_enable_records(struct ublkml_queue *q, uint32_t capacity)
{
	if (capacity == 0 || (capacity & (capacity - 1)) || q->rec)
		return -EINVAL;
	q->rec = calloc(capacity, sizeof(*q->rec));
	if (!q->rec)
		return -ENOMEM;
	q->rec_mask = capacity - 1;
	return 0;
}

int ublkml_queue_read_records(struct ublkml_queue *q,
			      struct ublkml_completion *out, int max)
{
	uint64_t head, tail;
	int n = 0;

	if (!q->rec || max <= 0)
		return 0;
	head = __atomic_load_n(&q->rec_head, __ATOMIC_ACQUIRE);
	tail = q->rec_tail;
	while (tail != head && n < max)
		out[n++] = q->rec[tail++ & q->rec_mask];
	__atomic_store_n(&q->rec_tail, tail, __ATOMIC_RELEASE);
	return n;
}

uint64_t ublkml_queue_records_dropped(const struct ublkml_queue *q)
{
	return __atomic_load_n(&q->rec_dropped, __ATOMIC_RELAXED);
}

/* The answer to one request: commit it (or record it, in the harness). */
static void complete_io(struct ublkml_queue *q, uint16_t tag, int32_t res)
{
	if (res < 0)
		q->st.errors++;
	if (q->rec)
		record_completion(q, tag, res);
	if (q->cdev_fd < 0) {
		struct ublkml_event *e = &q->harvest[q->n_harvest++];

		e->tag = tag;
		e->result = res;
		return;
	}
	if (queue_io_cmd(q, tag, q->op_commit, res) < 0)
		q->st.errors++;
}

static void tgt_prep_done(struct ublkml_queue *q, struct io_uring_sqe *sqe,
			  uint16_t tag)
{
	if (q->fixed_backing >= 0) {
		sqe->fd = q->fixed_backing;
		sqe->flags |= IOSQE_FIXED_FILE;
	}
	io_uring_sqe_set_data64(sqe, TGT_IO_BIT | tag);
}

/* Queue (the rest of) one loop-target request as target I/O. */
static int loop_submit(struct ublkml_queue *q, uint16_t tag)
{
	struct tag_state *s = &q->ts[tag];
	struct ublkml_target *t = q->t;
	char *buf = ublkml_queue_buf(q, tag);
	struct io_uring_sqe *sqe;

	switch (s->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
		sqe = get_sqe(q);
		if (!sqe)
			return -EBUSY;
		if (s->op == UBLK_IO_OP_READ) {
			io_uring_prep_read(sqe, t->fd, buf + s->done,
					   s->len - s->done, s->off + s->done);
		} else {
			io_uring_prep_write(sqe, t->fd, buf + s->done,
					    s->len - s->done, s->off + s->done);
			if (s->fua)
				sqe->rw_flags = RWF_DSYNC;
		}
		break;
	case UBLK_IO_OP_FLUSH:
		sqe = get_sqe(q);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_fsync(sqe, t->fd, IORING_FSYNC_DATASYNC);
		break;
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		if (t->is_bdev) {
			/* Rare operations: a synchronous ioctl keeps this simple.
			 * A device's discard need not read back as zeros; the
			 * target says so in its capabilities. */
			uint64_t range[2] = { s->off, s->len };
			int rc = ioctl(t->fd, s->op == UBLK_IO_OP_DISCARD ?
				       BLKDISCARD : BLKZEROOUT, range);

			complete_io(q, tag, rc < 0 ? -errno : 0);
			return 0;
		}
		if (s->zero_fallback == 2) {
			/* Last resort: write zeros from this tag's buffer. */
			uint32_t chunk = s->len - s->done;

			if (chunk > q->buf_size)
				chunk = q->buf_size;
			memset(buf, 0, chunk);
			sqe = get_sqe(q);
			if (!sqe)
				return -EBUSY;
			io_uring_prep_write(sqe, t->fd, buf, chunk, s->off + s->done);
			break;
		}
		sqe = get_sqe(q);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_fallocate(sqe, t->fd,
			(s->op == UBLK_IO_OP_WRITE_ZEROES && s->zero_fallback == 0 ?
			 FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) |
			FALLOC_FL_KEEP_SIZE, s->off, s->len);
		break;
	default:
		return -EOPNOTSUPP;
	}
	tgt_prep_done(q, sqe, tag);
	q->tgt_inflight++;
	return 0;
}

/* A piece of a transfer moved res bytes: queue the rest (returns 1), or
 * leave the request's final result in *final (done_res once complete). */
static int continue_transfer(struct ublkml_queue *q, uint16_t tag, int res,
			     int done_res, int *final)
{
	struct tag_state *s = &q->ts[tag];
	int ret;

	if (res == 0)
		res = -EIO;	/* EOF inside the device: backing shrank */
	if (res < 0) {
		*final = res;
		return 0;
	}
	s->done += (uint32_t)res;
	if (s->done < s->len) {
		ret = loop_submit(q, tag);
		if (ret == 0)
			return 1;
		*final = ret;
		return 0;
	}
	*final = done_res;
	return 0;
}

static void loop_tgt_done(struct ublkml_queue *q, uint16_t tag, int res)
{
	struct tag_state *s = &q->ts[tag];
	int ret;

	q->tgt_inflight--;
	switch (s->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
		if (continue_transfer(q, tag, res, (int)s->len, &res))
			return;
		break;
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		if (s->zero_fallback == 2) {
			if (continue_transfer(q, tag, res, 0, &res))
				return;
			break;
		}
		if (res == -EOPNOTSUPP || res == -EINVAL) {
			/* Not every file system zeroes ranges (tmpfs) or punches
			 * holes: step down until something works. */
			s->zero_fallback++;
			if (s->op == UBLK_IO_OP_DISCARD && s->zero_fallback == 1)
				s->zero_fallback = 2;
			ret = loop_submit(q, tag);
			if (ret == 0)
				return;
			res = ret;
		}
		break;
	default:
		break;
	}
	complete_io(q, tag, res);
}

/* One request arrived in tag's descriptor: hand it to the target. */
static void handle_request(struct ublkml_queue *q, uint16_t tag)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	struct ublkml_target *t = q->t;
	uint8_t op = iod->op_flags & 0xff;
	uint64_t off = iod->start_sector << SECTOR_SHIFT;
	uint32_t len = iod->nr_sectors << SECTOR_SHIFT;
	char *buf = ublkml_queue_buf(q, tag);
	int ret;

	if (op < 8) {
		q->st.ops[op]++;
		q->st.bytes[op] += len;
	}
	if (q->rec) {
		q->ts[tag].t_start = now_ns();
		q->ts[tag].path = 0;
	}
	if ((op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE) && len > q->buf_size) {
		complete_io(q, tag, -EINVAL);
		return;
	}
	if (op != UBLK_IO_OP_FLUSH && (off > t->size || len > t->size - off)) {
		complete_io(q, tag, -EIO);
		return;
	}

	switch (t->kind) {
	case UBLKML_TGT_NULL:
		switch (op) {
		case UBLK_IO_OP_READ:
		case UBLK_IO_OP_WRITE:
			complete_io(q, tag, (int32_t)len);
			return;
		case UBLK_IO_OP_FLUSH:
		case UBLK_IO_OP_DISCARD:
		case UBLK_IO_OP_WRITE_ZEROES:
			complete_io(q, tag, 0);
			return;
		}
		break;
	case UBLKML_TGT_MEM:
		switch (op) {
		case UBLK_IO_OP_READ:
			memcpy(buf, t->mem + off, len);
			complete_io(q, tag, (int32_t)len);
			return;
		case UBLK_IO_OP_WRITE:
			memcpy(t->mem + off, buf, len);
			complete_io(q, tag, (int32_t)len);
			return;
		case UBLK_IO_OP_FLUSH:
			complete_io(q, tag, 0);
			return;
		case UBLK_IO_OP_DISCARD:
		case UBLK_IO_OP_WRITE_ZEROES:
			memset(t->mem + off, 0, len);
			complete_io(q, tag, 0);
			return;
		}
		break;
	case UBLKML_TGT_LOOP: {
		struct tag_state *s = &q->ts[tag];

		s->off = off;
		s->len = len;
		s->done = 0;
		s->op = op;
		s->zero_fallback = 0;
		s->fua = !!(iod->op_flags & UBLK_IO_F_FUA);
		ret = loop_submit(q, tag);
		if (ret)
			complete_io(q, tag, ret);
		return;
	}
	case UBLKML_TGT_EVENTS: {
		struct ublkml_event *e = &q->pending[q->n_pending++];

		e->tag = tag;
		e->op = op;
		e->op_flags = iod->op_flags;
		e->nr_sectors = iod->nr_sectors;
		e->start_sector = iod->start_sector;
		e->result = -EIO;
		return;
	}
	}
	complete_io(q, tag, -EOPNOTSUPP);
}

static void handle_cqe(struct ublkml_queue *q, const struct io_uring_cqe *cqe)
{
	uint16_t tag = (uint16_t)(cqe->user_data & 0xffff);

	if (cqe->user_data & TGT_IO_BIT) {
		loop_tgt_done(q, tag, cqe->res);
		return;
	}
	q->cmd_inflight--;
	if (cqe->res == UBLK_IO_RES_OK) {
		handle_request(q, tag);
		return;
	}
	/* ABORT (queue going away) or an error of the command itself: this
	 * tag is finished; the queue stops once every tag is. */
	q->stopping = 1;
}

static int queue_done(const struct ublkml_queue *q)
{
	return q->stopping && q->cmd_inflight == 0 && q->tgt_inflight == 0;
}

static int ring_error(int ret)
{
	return ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY &&
	       ret != -ETIME;
}

/* Submit what is prepared, wait for at least one CQE, handle all ready.
 *
 * Hybrid polling: for up to spin_ns the thread keeps asking for completions
 * without sleeping.  While it runs, the driver queues its task work without
 * waking anybody, so a busy device costs no sleep/wake-up (no IPI) per
 * batch; an idle one goes to sleep after spin_ns. */
static int process_batch(struct ublkml_queue *q)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;
	int ret;

	if (q->spin_ns) {
		uint64_t start = now_ns();

		for (;;) {
			ret = io_uring_submit_and_get_events(&q->ring);
			if (ring_error(ret))
				return ret;
			if (io_uring_cq_ready(&q->ring))
				break;
			if (now_ns() - start >= q->spin_ns) {
				ret = io_uring_submit_and_wait(&q->ring, 1);
				if (ring_error(ret))
					return ret;
				break;
			}
		}
	} else {
		ret = io_uring_submit_and_wait(&q->ring, 1);
		if (ring_error(ret))
			return ret;
	}
	io_uring_for_each_cqe(&q->ring, head, cqe) {
		handle_cqe(q, cqe);
		n++;
	}
	io_uring_cq_advance(&q->ring, n);
	if (n)
		q->st.batches++;
	return (int)n;
}

int ublkml_queue_run(struct ublkml_queue *q)
{
	int ret;

	if (q->t->kind == UBLKML_TGT_EVENTS || q->cdev_fd < 0)
		return -EINVAL;
	while (!queue_done(q)) {
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Move up to max events from the front of a list into out. */
static int take_events(struct ublkml_event *list, int *count,
		       struct ublkml_event *out, int max)
{
	int n = *count < max ? *count : max;

	memcpy(out, list, (size_t)n * sizeof(*out));
	*count -= n;
	if (*count)
		memmove(list, list + n, (size_t)*count * sizeof(*out));
	return n;
}

int ublkml_queue_commit_and_wait(struct ublkml_queue *q,
				 struct ublkml_event *evs, int n_done, int max)
{
	int ret;

	if (q->t->kind != UBLKML_TGT_EVENTS || q->cdev_fd < 0 || max <= 0)
		return -EINVAL;
	for (int i = 0; i < n_done; i++)
		complete_io(q, evs[i].tag, evs[i].result);
	while (q->n_pending == 0) {
		if (queue_done(q)) {
			io_uring_submit(&q->ring);
			return -ENODEV;
		}
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return take_events(q->pending, &q->n_pending, evs, max);
}

int ublkml_queue_inject(struct ublkml_queue *q, uint16_t tag, uint32_t op_flags,
			uint64_t start_sector, uint32_t nr_sectors)
{
	struct ublksrv_io_desc *iod;

	if (q->cdev_fd >= 0 || tag >= q->depth ||
	    q->t->kind == UBLKML_TGT_EVENTS)
		return -EINVAL;
	iod = &q->iods[tag];
	iod->op_flags = op_flags;
	iod->start_sector = start_sector;
	iod->nr_sectors = nr_sectors;
	iod->addr = 0;
	handle_request(q, tag);
	return 0;
}

int ublkml_queue_harvest(struct ublkml_queue *q, struct ublkml_event *out,
			 int max)
{
	int ret;

	if (q->cdev_fd >= 0)
		return -EINVAL;
	while (q->n_harvest == 0 && q->tgt_inflight > 0) {
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return take_events(q->harvest, &q->n_harvest, out, max);
}
