/* SPDX-License-Identifier: MIT */
/*
 * /dev/ublk-control: one SQE128 ring per control object; each command is
 * submitted and waited for on its own (control commands are rare).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"

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
