/* SPDX-License-Identifier: MIT */
/*
 * The test harness: a queue built with cdev_fd < 0 has no ublk driver
 * behind it.  Its descriptors live in the heap, requests come from
 * ublkml_queue_inject and answers are collected (ublkml_queue_harvest)
 * instead of committed, so unit tests check target logic on any host.
 */
#include <errno.h>
#include <stdlib.h>

#include "engine.h"

struct harness {
	struct ublkml_event *harvest;	/* answers not collected yet */
	int n_harvest;
};

int harness_init(struct ublkml_queue *q)
{
	q->harness = calloc(1, sizeof(*q->harness));
	if (!q->harness)
		return -ENOMEM;
	q->iods = calloc(q->depth, sizeof(struct ublksrv_io_desc));
	q->harness->harvest = calloc(q->depth, sizeof(struct ublkml_event));
	if (!q->iods || !q->harness->harvest)
		return -ENOMEM;		/* harness_free frees what there is */
	return 0;
}

void harness_free(struct ublkml_queue *q)
{
	if (!q->harness)
		return;
	free(q->iods);
	q->iods = NULL;
	free(q->harness->harvest);
	free(q->harness);
	q->harness = NULL;
}

void harness_answer(struct ublkml_queue *q, uint16_t tag, int32_t res)
{
	struct harness *h = q->harness;
	struct ublkml_event *e = &h->harvest[h->n_harvest++];

	e->tag = tag;
	e->result = res;
}

int harness_take(struct ublkml_queue *q, struct ublkml_event *out, int max)
{
	return take_events(q->harness->harvest, &q->harness->n_harvest, out, max);
}

int ublkml_queue_inject(struct ublkml_queue *q, uint16_t tag, uint32_t op_flags,
			uint64_t start_sector, uint32_t nr_sectors)
{
	struct ublksrv_io_desc *iod;

	if (q->cdev_fd >= 0 || tag >= q->depth ||
	    (q->ops->inject_ok && !q->ops->inject_ok(q)))
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
	while (q->harness->n_harvest == 0 && q->tgt_inflight > 0) {
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return harness_take(q, out, max);
}
