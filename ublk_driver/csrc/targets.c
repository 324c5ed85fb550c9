/* SPDX-License-Identifier: MIT */
/*
 * The target registry and what every target has: a size, backing files (if
 * any), a fault slot per completion path and its ops table.  The targets
 * themselves are target_*.c, one file each.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include "engine.h"

/* A new target: its file, its ops here, its file in _build.py's sources. */
static const struct ublkml_tgt_ops *const registry[] = {
	&tgt_null_ops,
	&tgt_mem_ops,
	&tgt_loop_ops,
	&tgt_events_ops,
	&tgt_mirror_ops,
};

const struct ublkml_tgt_ops *tgt_ops_of_kind(int kind)
{
	for (size_t i = 0; i < sizeof(registry) / sizeof(registry[0]); i++)
		if (registry[i]->kind == kind)
			return registry[i];
	return NULL;
}

int target_alloc(struct ublkml_target **out, int kind, uint64_t size)
{
	const struct ublkml_tgt_ops *ops = tgt_ops_of_kind(kind);
	struct ublkml_target *t;

	if (!ops)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->faults = faults_new();
	if (!t->faults) {
		free(t);
		return -ENOMEM;
	}
	t->ops = ops;
	t->size = size;
	for (int i = 0; i < UBLKML_MAX_LEGS; i++)
		t->legs[i].fd = -1;
	*out = t;
	return 0;
}

void ublkml_target_free(struct ublkml_target *t)
{
	if (!t)
		return;
	if (t->ops->free_tgt)
		t->ops->free_tgt(t);
	faults_free(t->faults);
	free(t);
}

int ublkml_target_kind(const struct ublkml_target *t)
{
	return t->ops->kind;
}

int ublkml_target_n_paths(const struct ublkml_target *t)
{
	if (t->ops->flags & TGT_F_CALLER)
		return 0;
	return t->n_legs > 1 ? t->n_legs : 1;
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
