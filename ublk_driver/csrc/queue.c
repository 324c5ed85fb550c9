/* SPDX-License-Identifier: MIT */
/*
 * One queue: its io_uring, descriptors and buffers, the ublk I/O commands
 * (FETCH_REQ, COMMIT_AND_FETCH_REQ), the loop that reaps CQEs and hands
 * requests to the target, and the completion records and summaries the ML
 * scorer reads.  See engine.h for the hot path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine.h"

static size_t round_up(size_t v, size_t a)
{
	return (v + a - 1) / a * a;
}

static size_t iods_len(uint16_t depth)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return round_up((size_t)depth * sizeof(struct ublksrv_io_desc), page);
}

/*
 * Queues served by processes: the driver lets one mm map the descriptors
 * (ublk_ch_mmap remembers the first mapper's mm and refuses any other), so
 * one process maps every queue's descriptors and then forks; each child's
 * queue borrows the mapping it inherited (ublkml_queue_new with iods).
 */
int ublkml_map_descriptors(int cdev_fd, uint16_t q_id, uint16_t depth, void **out)
{
	off_t off = UBLKSRV_CMD_BUF_OFFSET + (off_t)q_id *
		UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc);
	void *m;

	if (depth == 0 || depth > UBLK_MAX_QUEUE_DEPTH)
		return -EINVAL;
	/* The driver only allows a read-only mapping. */
	m = mmap(NULL, iods_len(depth), PROT_READ, MAP_SHARED | MAP_POPULATE,
		 cdev_fd, off);
	if (m == MAP_FAILED)
		return -errno;
	*out = m;
	return 0;
}

int ublkml_unmap_descriptors(void *iods, uint16_t depth)
{
	return munmap(iods, iods_len(depth)) ? -errno : 0;
}

int ublkml_queue_new(struct ublkml_queue **out, struct ublkml_target *t,
		     int cdev_fd, uint16_t q_id, uint16_t depth,
		     uint32_t buf_size, int ioctl_encode, uint32_t ring_flags,
		     void *iods)
{
	struct ublkml_queue *q;
	struct io_uring_params p;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	unsigned sq_entries, cq_entries;
	int ret;

	if (depth == 0 || depth > UBLK_MAX_QUEUE_DEPTH || buf_size == 0)
		return -EINVAL;
	q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	q->t = t;
	q->ops = t->ops;
	q->cdev_fd = cdev_fd;
	q->q_id = q_id;
	q->depth = depth;
	q->buf_size = buf_size;
	q->op_fetch = ioctl_encode ? UBLK_U_IO_FETCH_REQ : UBLK_IO_FETCH_REQ;
	q->op_commit = ioctl_encode ? UBLK_U_IO_COMMIT_AND_FETCH_REQ :
				      UBLK_IO_COMMIT_AND_FETCH_REQ;
	q->iods_len = iods_len(depth);
	q->ring.ring_fd = -1;
	q->n_paths = t->n_legs > 1 ? t->n_legs : 1;

	if (cdev_fd >= 0 && iods) {
		q->iods = iods;
		q->iods_borrowed = 1;
	} else if (cdev_fd >= 0) {
		void *m;

		ret = ublkml_map_descriptors(cdev_fd, q_id, depth, &m);
		if (ret < 0)
			goto fail;
		q->iods = m;
	} else {
		ret = harness_init(q);
		if (ret < 0)
			goto fail;
	}

	if (posix_memalign((void **)&q->bufs, page, (size_t)depth * buf_size)) {
		q->bufs = NULL;
		ret = -ENOMEM;
		goto fail;
	}
	q->ts = calloc(depth, sizeof(*q->ts));
	q->lio = calloc((size_t)depth * (size_t)q->n_paths, sizeof(*q->lio));
	q->qf = queue_faults_new();
	if (!q->ts || !q->lio || !q->qf) {
		ret = -ENOMEM;
		goto fail;
	}
	if (q->ops->init_queue) {
		ret = q->ops->init_queue(q);
		if (ret < 0)
			goto fail;
	}

	/* Room for one ublk command per tag, plus one I/O and one delay timer
	 * per leg per tag, plus the mirror's probes (TGT_EXTRA_CQES).  CLAMP:
	 * deep mirrors may ask for more than the kernel's maximum; a full SQ is
	 * drained, see get_sqe(). */
	sq_entries = (unsigned)depth * (1u + (unsigned)q->n_paths);
	cq_entries = 2u * sq_entries + TGT_EXTRA_CQES;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | ring_flags;
	p.cq_entries = cq_entries;
	ret = io_uring_queue_init_params(sq_entries, &q->ring, &p);
	if (ret == -EINVAL && (ring_flags & (IORING_SETUP_DEFER_TASKRUN |
					     IORING_SETUP_SINGLE_ISSUER))) {
		/* Kernels before 6.1 lack these: fall back to a plain ring. */
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
		p.cq_entries = cq_entries;
		ret = io_uring_queue_init_params(sq_entries, &q->ring, &p);
	}
	if (ret < 0) {
		q->ring.ring_fd = -1;
		goto fail;
	}
	/* Registered files and ring fd spare an fget/fput per SQE and per
	 * io_uring_enter: atomic operations that are costly on the hot path.
	 * Both are optional; plain fds work where registration fails. */
	{
		int fds[1 + UBLKML_MAX_LEGS], n = 0;

		q->fixed_cdev = q->fixed_backing = -1;
		if (cdev_fd >= 0)
			fds[n++] = cdev_fd;
		for (int i = 0; i < t->n_legs; i++)
			fds[n++] = t->legs[i].fd;
		if (n && io_uring_register_files(&q->ring, fds, (unsigned)n) == 0) {
			q->fixed_cdev = cdev_fd >= 0 ? 0 : -1;
			q->fixed_backing = t->n_legs ? (cdev_fd >= 0 ? 1 : 0) : -1;
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
	q->ring.ring_fd = -1;
	if (q->iods && q->cdev_fd >= 0) {	/* the harness frees its own */
		if (!q->iods_borrowed)		/* else its owner unmaps it */
			munmap(q->iods, q->iods_len);
		q->iods = NULL;
	}
	if (q->priv && q->ops->detach_queue && q->ops->detach_queue(q))
		return;
	queue_free_rest(q);
}

void queue_free_rest(struct ublkml_queue *q)
{
	if (q->ops->free_queue)
		q->ops->free_queue(q);
	harness_free(q);
	free(q->bufs);
	free(q->ts);
	free(q->lio);
	free(q->qf);
	free(q->rec);
	free(q->sums);
	free(q);
}

void ublkml_queue_set_spin(struct ublkml_queue *q, uint32_t spin_usec)
{
	q->spin_ns = (uint64_t)spin_usec * 1000u;
}

void *ublkml_queue_buf(struct ublkml_queue *q, uint16_t tag)
{
	if (q->tag_buf)		/* a target moves buffers */
		return q->tag_buf[tag];
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

struct io_uring_sqe *get_sqe(struct ublkml_queue *q)
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

/* ml.features.latency_bins in integers: frexp's exponent is the bit length. */
static unsigned lat_bin(uint32_t lat)
{
	int e;
	uint32_t top;

	if (!lat)
		return 0;
	e = 32 - __builtin_clz(lat);
	top = e >= 5 ? lat >> (e - 5) : lat << (5 - e);	/* 16..31 */
	return (unsigned)(e - 1) * 16u + top - 16u;
}

static void sum_add(uint64_t *p, uint64_t v)
{
	/* single writer (the queue thread); readers load words atomically */
	__atomic_store_n(p, *p + v, __ATOMIC_RELAXED);
}

static void summarize_io(struct ublkml_queue *q, uint8_t path, uint8_t op,
			 int32_t res, uint64_t lat)
{
	struct ublkml_path_summary *s = &q->sums[path % UBLKML_MAX_LEGS];
	uint32_t l = lat > UINT32_MAX ? UINT32_MAX : (uint32_t)lat;
	double sq = s->lat_sumsq + (double)l * (double)l;

	sum_add(&s->n, 1);
	if (res < 0)
		sum_add(&s->errors, 1);
	else if (op <= UBLK_IO_OP_WRITE && res > 0)
		sum_add(&s->bytes, (uint64_t)res);
	sum_add(&s->lat_sum, l);
	__atomic_store(&s->lat_sumsq, &sq, __ATOMIC_RELAXED);
	sum_add(&s->hist[lat_bin(l)], 1);
}

/* One completion: a request (path 0) or, for the mirror, a leg I/O or a
 * health probe (path = leg). */
void record(struct ublkml_queue *q, uint16_t tag, uint8_t path,
		   uint8_t op, uint64_t off, uint32_t len, int32_t res,
		   uint64_t t_start, uint16_t flags)
{
	struct ublkml_completion *c;
	uint64_t tail, now, lat;

	now = now_ns();
	lat = t_start && now > t_start ? now - t_start : 0;
	if (q->sums)
		summarize_io(q, path, op, res, lat);
	if (!q->rec)
		return;
	tail = __atomic_load_n(&q->rec_tail, __ATOMIC_ACQUIRE);
	if (q->rec_head - tail > q->rec_mask) {
		q->rec_dropped++;	/* the scorer is behind: never wait for it */
		return;
	}
	c = &q->rec[q->rec_head & q->rec_mask];
	c->t_ns = now;
	c->offset = off;
	c->length = len;
	c->lat_ns = lat > UINT32_MAX ? UINT32_MAX : (uint32_t)lat;
	c->result = res;
	c->q_id = q->q_id;
	c->tag = tag;
	c->op = op;
	c->path = path;
	c->flags = flags;
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

int ublkml_queue_enable_summaries(struct ublkml_queue *q)
{
	if (q->sums)
		return -EINVAL;
	q->sums = calloc(UBLKML_MAX_LEGS, sizeof(*q->sums));
	return q->sums ? 0 : -ENOMEM;
}

int ublkml_queue_read_summaries(struct ublkml_queue *q,
				struct ublkml_path_summary *out, int max_paths)
{
	int n = max_paths < UBLKML_MAX_LEGS ? max_paths : UBLKML_MAX_LEGS;
	const uint64_t *src;
	uint64_t *dst;

	if (!q->sums || n <= 0)
		return -EINVAL;
	src = (const uint64_t *)q->sums;
	dst = (uint64_t *)out;
	for (size_t i = 0; i < (size_t)n * sizeof(*out) / sizeof(uint64_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
	return n;
}

uint64_t ublkml_queue_records_dropped(const struct ublkml_queue *q)
{
	return __atomic_load_n(&q->rec_dropped, __ATOMIC_RELAXED);
}

void complete_io(struct ublkml_queue *q, uint16_t tag, int32_t res)
{
	if (res < 0) {
		const struct ublksrv_io_desc *iod = &q->iods[tag];

		q->st.errors++;
		q->st.last_error = res;
		q->st.last_error_op = iod->op_flags & 0xff;
		q->st.last_error_offset = iod->start_sector << SECTOR_SHIFT;
	}
	if ((q->rec || q->sums) && !(q->ops->flags & TGT_F_OWN_RECORDS)) {
		const struct ublksrv_io_desc *iod = &q->iods[tag];

		record(q, tag, 0, iod->op_flags & 0xff,
		       iod->start_sector << SECTOR_SHIFT,
		       iod->nr_sectors << SECTOR_SHIFT, res, q->ts[tag].t_start, 0);
	}
	if (q->cdev_fd < 0) {
		harness_answer(q, tag, res);
		return;
	}
	if (queue_io_cmd(q, tag, q->op_commit, res) < 0)
		q->st.errors++;
}

void path_finish(struct ublkml_queue *q, uint16_t tag, int path, int res)
{
	if (q->ops->path_done)
		q->ops->path_done(q, tag, path, res);
	else
		complete_io(q, tag, res);
}

/* ---- requests ------------------------------------------------------------ */

/* One request arrived in tag's descriptor: hand it to the target. */
void handle_request(struct ublkml_queue *q, uint16_t tag)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	struct ublkml_target *t = q->t;
	struct tag_state *s = &q->ts[tag];
	uint8_t op = iod->op_flags & 0xff;
	uint64_t off = iod->start_sector << SECTOR_SHIFT;
	uint32_t len = iod->nr_sectors << SECTOR_SHIFT;

	if (op < 8) {
		q->st.ops[op]++;
		q->st.bytes[op] += len;
	}
	if (q->rec || q->sums)
		s->t_start = now_ns();
	if ((op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE) && len > q->buf_size) {
		complete_io(q, tag, -EINVAL);
		return;
	}
	if (op != UBLK_IO_OP_FLUSH && (off > t->size || len > t->size - off)) {
		complete_io(q, tag, -EIO);
		return;
	}
	if (op == UBLK_IO_OP_FLUSH)
		off = len = 0;
	s->off = off;
	s->len = len;
	s->op = op;
	s->fua = !!(iod->op_flags & UBLK_IO_F_FUA);

	q->ops->handle_io(q, tag);
}

static void handle_cqe(struct ublkml_queue *q, const struct io_uring_cqe *cqe)
{
	uint64_t ud = cqe->user_data;
	uint16_t tag = (uint16_t)(ud & 0xffff);

	if (ud & TGT_IO_BIT) {
		int leg = (int)((ud >> UD_LEG_SHIFT) & 0xff);

		uint32_t kind = (uint32_t)((ud >> UD_KIND_SHIFT) & 0xff);

		if (kind == TGT_KIND_DELAY) {	/* res is -ETIME: the timer ran out */
			q->tgt_inflight--;
			path_finish(q, tag, leg, lio(q, tag, leg)->res);
		} else if (q->ops->tgt_io_done) {
			q->ops->tgt_io_done(q, cqe, kind, leg, tag);
		}
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

int queue_done(const struct ublkml_queue *q)
{
	return q->stopping && q->cmd_inflight == 0 && q->tgt_inflight == 0;
}

int ring_error(int ret)
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
int process_batch(struct ublkml_queue *q)
{
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
	return (int)reap(q);
}

int ublkml_queue_run(struct ublkml_queue *q)
{
	int ret;

	if ((q->ops->flags & TGT_F_CALLER) || q->cdev_fd < 0)
		return -EINVAL;
	while (!queue_done(q)) {
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return 0;
}

int take_events(struct ublkml_event *list, int *count,
		struct ublkml_event *out, int max)
{
	int n = *count < max ? *count : max;

	memcpy(out, list, (size_t)n * sizeof(*out));
	*count -= n;
	if (*count)
		memmove(list, list + n, (size_t)*count * sizeof(*out));
	return n;
}

unsigned reap(struct ublkml_queue *q)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;

	io_uring_for_each_cqe(&q->ring, head, cqe) {
		handle_cqe(q, cqe);
		n++;
	}
	io_uring_cq_advance(&q->ring, n);
	if (n)
		q->st.batches++;
	return n;
}
