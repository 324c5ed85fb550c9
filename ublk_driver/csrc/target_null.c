/* SPDX-License-Identifier: MIT */
/*
 * The null target: reads return the buffer as it is, writes go nowhere;
 * every request is answered at once (a fault may delay or fail it).
 */
#include <errno.h>

#include "engine.h"

int ublkml_target_new_null(struct ublkml_target **out, uint64_t size)
{
	return target_alloc(out, UBLKML_TGT_NULL, size);
}

static void null_handle_io(struct ublkml_queue *q, uint16_t tag)
{
	const struct tag_state *s = &q->ts[tag];
	int err = fault_error(q, 0, s->op);

	if (err) {
		answer_now(q, tag, err);	/* injected: nothing done */
		return;
	}
	switch (s->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
		answer_now(q, tag, (int32_t)s->len);
		return;
	case UBLK_IO_OP_FLUSH:
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		answer_now(q, tag, 0);
		return;
	}
	complete_io(q, tag, -EOPNOTSUPP);
}

const struct ublkml_tgt_ops tgt_null_ops = {
	.name = "null",
	.kind = UBLKML_TGT_NULL,
	.handle_io = null_handle_io,
};
