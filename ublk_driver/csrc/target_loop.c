/* SPDX-License-Identifier: MIT */
/*
 * The loop target: a file or block device behind the ublk device, one leg
 * of backing I/O per request (backing.c).
 */
#include "engine.h"

/* fd stays owned by the caller. */
int ublkml_target_new_loop(struct ublkml_target **out, int fd, int is_bdev,
			   uint64_t size)
{
	int ret = target_alloc(out, UBLKML_TGT_LOOP, size);

	if (ret)
		return ret;
	(*out)->n_legs = 1;
	(*out)->legs[0].fd = fd;
	(*out)->legs[0].is_bdev = is_bdev;
	return 0;
}

static void loop_handle_io(struct ublkml_queue *q, uint16_t tag)
{
	leg_start(q, tag, 0);
}

static void loop_tgt_io_done(struct ublkml_queue *q, const struct io_uring_cqe *cqe,
			     uint32_t kind, int leg, uint16_t tag)
{
	if (kind == TGT_KIND_IO)
		leg_cqe(q, tag, leg, cqe->res);
}

const struct ublkml_tgt_ops tgt_loop_ops = {
	.name = "loop",
	.kind = UBLKML_TGT_LOOP,
	.handle_io = loop_handle_io,
	.tgt_io_done = loop_tgt_io_done,
};
