/* SPDX-License-Identifier: MIT */
/*
 * The mem target: a RAM disk in anonymous memory of the server; every
 * request is answered at once (a fault may delay or fail it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "engine.h"

struct mem {
	uint8_t *data;
};

static void mem_free_tgt(struct ublkml_target *t)
{
	struct mem *m = t->priv;

	if (!m)
		return;
	if (m->data)
		munmap(m->data, t->size);
	free(m);
}

int ublkml_target_new_mem(struct ublkml_target **out, uint64_t size)
{
	int ret = target_alloc(out, UBLKML_TGT_MEM, size);
	struct mem *m;
	void *p;

	if (ret)
		return ret;
	m = calloc(1, sizeof(*m));
	if (!m) {
		ublkml_target_free(*out);
		*out = NULL;
		return -ENOMEM;
	}
	(*out)->priv = m;
	/* Anonymous pages read as zero and cost nothing until written. */
	p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED) {
		ret = -errno;
		ublkml_target_free(*out);
		*out = NULL;
		return ret;
	}
	m->data = p;
	return 0;
}

static void mem_handle_io(struct ublkml_queue *q, uint16_t tag)
{
	const struct tag_state *s = &q->ts[tag];
	uint8_t *data = ((struct mem *)q->t->priv)->data;
	int err = fault_error(q, 0, s->op);

	if (err) {
		answer_now(q, tag, err);	/* injected: nothing done */
		return;
	}
	switch (s->op) {
	case UBLK_IO_OP_READ:
		memcpy(ublkml_queue_buf(q, tag), data + s->off, s->len);
		answer_now(q, tag, (int32_t)s->len);
		return;
	case UBLK_IO_OP_WRITE:
		memcpy(data + s->off, ublkml_queue_buf(q, tag), s->len);
		answer_now(q, tag, (int32_t)s->len);
		return;
	case UBLK_IO_OP_FLUSH:
		answer_now(q, tag, 0);
		return;
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		memset(data + s->off, 0, s->len);
		answer_now(q, tag, 0);
		return;
	}
	complete_io(q, tag, -EOPNOTSUPP);
}

const struct ublkml_tgt_ops tgt_mem_ops = {
	.name = "mem",
	.kind = UBLKML_TGT_MEM,
	.handle_io = mem_handle_io,
	.free_tgt = mem_free_tgt,
};
