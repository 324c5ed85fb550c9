/* SPDX-License-Identifier: MIT */
/*
 * Leg I/O: I/O on a backing file or block device, per leg.  A request of
 * the loop target is one leg I/O on leg 0; a mirror request is one (read)
 * or several (write, flush, discard, write-zeroes) leg I/Os.  Every leg I/O
 * ends in path_io_done(), which adds the leg's injected delay, then in
 * path_finish() (the mirror's path_done, or the request's answer).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>

#include "engine.h"

int leg_fd(struct ublkml_queue *q, int leg)
{
	return q->fixed_backing >= 0 ? q->fixed_backing + leg : q->t->legs[leg].fd;
}

void tgt_prep_done(struct ublkml_queue *q, struct io_uring_sqe *sqe,
			  uint64_t ud)
{
	if (q->fixed_backing >= 0)
		sqe->flags |= IOSQE_FIXED_FILE;
	io_uring_sqe_set_data64(sqe, ud);
	q->tgt_inflight++;
}

/* Queue (the rest of) one leg I/O.  0: queued; 1: done synchronously with
 * *sync_res (block-device discard/zeroout); < 0: could not queue. */
static int leg_submit(struct ublkml_queue *q, uint16_t tag, int leg,
		      int *sync_res)
{
	struct tag_state *s = &q->ts[tag];
	struct leg_io *l = lio(q, tag, leg);
	const struct backing *lg = &q->t->legs[leg];
	char *buf = ublkml_queue_buf(q, tag);
	int fd = leg_fd(q, leg);
	struct io_uring_sqe *sqe;

	switch (s->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
		sqe = get_sqe(q);
		if (!sqe)
			return -EBUSY;
		if (s->op == UBLK_IO_OP_READ) {
			io_uring_prep_read(sqe, fd, buf + l->done,
					   s->len - l->done, s->off + l->done);
		} else {
			/* Legs of a mirror write the same buffer: read-only. */
			io_uring_prep_write(sqe, fd, buf + l->done,
					    s->len - l->done, s->off + l->done);
			if (s->fua)
				sqe->rw_flags = RWF_DSYNC;
		}
		break;
	case UBLK_IO_OP_FLUSH:
		sqe = get_sqe(q);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
		break;
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		if (lg->is_bdev) {
			/* Rare operations: a synchronous ioctl keeps this simple.
			 * A device's discard need not read back as zeros; the
			 * target says so in its capabilities. */
			uint64_t range[2] = { s->off, s->len };
			int rc = ioctl(lg->fd, s->op == UBLK_IO_OP_DISCARD ?
				       BLKDISCARD : BLKZEROOUT, range);

			*sync_res = rc < 0 ? -errno : 0;
			return 1;
		}
		if (l->zero_fallback == 2) {
			/* Last resort: write zeros from this tag's buffer (all
			 * legs of the request write the same zeros). */
			uint32_t chunk = s->len - l->done;

			if (chunk > q->buf_size)
				chunk = q->buf_size;
			memset(buf, 0, chunk);
			sqe = get_sqe(q);
			if (!sqe)
				return -EBUSY;
			io_uring_prep_write(sqe, fd, buf, chunk, s->off + l->done);
			break;
		}
		sqe = get_sqe(q);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_fallocate(sqe, fd,
			(s->op == UBLK_IO_OP_WRITE_ZEROES && l->zero_fallback == 0 ?
			 FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) |
			FALLOC_FL_KEEP_SIZE, s->off, s->len);
		break;
	default:
		return -EOPNOTSUPP;
	}
	tgt_prep_done(q, sqe, tgt_ud(TGT_KIND_IO, (uint32_t)leg, tag));
	return 0;
}

void leg_start(struct ublkml_queue *q, uint16_t tag, int leg)
{
	struct leg_io *l = lio(q, tag, leg);
	int ret, sync_res = 0;

	l->done = 0;
	l->zero_fallback = 0;
	l->t_start = q->rec || q->sums || fault_on(q, leg) ? now_ns() : 0;
	ret = fault_error(q, leg, q->ts[tag].op);
	if (ret) {
		path_io_done(q, tag, leg, ret);	/* injected: never issued */
		return;
	}
	ret = leg_submit(q, tag, leg, &sync_res);
	if (ret == 1)
		path_io_done(q, tag, leg, sync_res);
	else if (ret < 0)
		path_io_done(q, tag, leg, ret);
}

/* A piece of a transfer moved res bytes: queue the rest (returns 1), or
 * leave the leg I/O's final result in *final (done_res once complete). */
static int continue_transfer(struct ublkml_queue *q, uint16_t tag, int leg,
			     int res, int done_res, int *final)
{
	struct leg_io *l = lio(q, tag, leg);
	int ret, unused;

	if (res == 0)
		res = -EIO;	/* EOF inside the device: backing shrank */
	if (res < 0) {
		*final = res;
		return 0;
	}
	l->done += (uint32_t)res;
	if (l->done < q->ts[tag].len) {
		ret = leg_submit(q, tag, leg, &unused);
		if (ret == 0)
			return 1;
		*final = ret;
		return 0;
	}
	*final = done_res;
	return 0;
}

void leg_cqe(struct ublkml_queue *q, uint16_t tag, int leg, int res)
{
	struct tag_state *s = &q->ts[tag];
	struct leg_io *l = lio(q, tag, leg);
	int ret, unused;

	q->tgt_inflight--;
	switch (s->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
		if (continue_transfer(q, tag, leg, res, (int)s->len, &res))
			return;
		break;
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		if (l->zero_fallback == 2) {
			if (continue_transfer(q, tag, leg, res, 0, &res))
				return;
			break;
		}
		if (res == -EOPNOTSUPP || res == -EINVAL) {
			/* Not every file system zeroes ranges (tmpfs) or punches
			 * holes: step down until something works. */
			l->zero_fallback++;
			if (s->op == UBLK_IO_OP_DISCARD && l->zero_fallback == 1)
				l->zero_fallback = 2;
			l->done = 0;
			ret = leg_submit(q, tag, leg, &unused);
			if (ret == 0)
				return;
			res = ret;
		}
		break;
	default:
		break;
	}
	path_io_done(q, tag, leg, res);
}
