/* SPDX-License-Identifier: MIT */
/*
 * The ublk UAPI, declared by the project itself.
 *
 * Why not <linux/ublk_cmd.h>: Debian 12 ships the 6.1 header, which lacks the
 * ioctl-encoded commands and the newer feature flags.  The layout below follows
 * include/uapi/linux/ublk_cmd.h of Linux 6.12 field for field; the unit tests
 * pin every size and offset (tests/ublk_driver/test_uapi.py), and cffi checks
 * the same layout against the C compiler when the extension is built.
 */
#ifndef UBLKML_UBLK_UAPI_H
#define UBLKML_UBLK_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* Legacy control opcodes (plain numbers in sqe->cmd_op). */
#define UBLK_CMD_GET_QUEUE_AFFINITY	0x01
#define UBLK_CMD_GET_DEV_INFO		0x02
#define UBLK_CMD_ADD_DEV		0x04
#define UBLK_CMD_DEL_DEV		0x05
#define UBLK_CMD_START_DEV		0x06
#define UBLK_CMD_STOP_DEV		0x07
#define UBLK_CMD_SET_PARAMS		0x08
#define UBLK_CMD_GET_PARAMS		0x09
#define UBLK_CMD_START_USER_RECOVERY	0x10
#define UBLK_CMD_END_USER_RECOVERY	0x11
#define UBLK_CMD_GET_DEV_INFO2		0x12
#define UBLK_CMD_GET_FEATURES		0x13
#define UBLK_CMD_DEL_DEV_ASYNC		0x14

/* Legacy I/O opcodes. */
#define UBLK_IO_FETCH_REQ		0x20
#define UBLK_IO_COMMIT_AND_FETCH_REQ	0x21
#define UBLK_IO_NEED_GET_DATA		0x22

/* CQE results of I/O commands. */
#define UBLK_IO_RES_OK			0
#define UBLK_IO_RES_NEED_GET_DATA	1
#define UBLK_IO_RES_ABORT		(-19) /* -ENODEV */

/* Where the descriptor array of queue q_id lives in the char device. */
#define UBLKSRV_CMD_BUF_OFFSET		0
#define UBLK_MAX_QUEUE_DEPTH		4096
#define UBLK_MAX_NR_QUEUES		4096

/* Feature flags (ublksrv_ctrl_dev_info.flags), bit numbers as in 6.12. */
#define UBLK_F_SUPPORT_ZERO_COPY	(1ULL << 0)
#define UBLK_F_URING_CMD_COMP_IN_TASK	(1ULL << 1)
#define UBLK_F_NEED_GET_DATA		(1ULL << 2)
#define UBLK_F_USER_RECOVERY		(1ULL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE	(1ULL << 4)
#define UBLK_F_UNPRIVILEGED_DEV		(1ULL << 5)
#define UBLK_F_CMD_IOCTL_ENCODE		(1ULL << 6)
#define UBLK_F_USER_COPY		(1ULL << 7)
#define UBLK_F_ZONED			(1ULL << 8)
#define UBLK_F_USER_RECOVERY_FAIL_IO	(1ULL << 9)

/* Device states. */
#define UBLK_S_DEV_DEAD			0
#define UBLK_S_DEV_LIVE			1
#define UBLK_S_DEV_QUIESCED		2
#define UBLK_S_DEV_FAIL_IO		3

/* I/O operations in ublksrv_io_desc.op_flags bits 0-7, flags above. */
#define UBLK_IO_OP_READ			0
#define UBLK_IO_OP_WRITE		1
#define UBLK_IO_OP_FLUSH		2
#define UBLK_IO_OP_DISCARD		3
#define UBLK_IO_OP_WRITE_SAME		4
#define UBLK_IO_OP_WRITE_ZEROES		5
#define UBLK_IO_OP_ZONE_OPEN		10
#define UBLK_IO_OP_ZONE_CLOSE		11
#define UBLK_IO_OP_ZONE_FINISH		12
#define UBLK_IO_OP_ZONE_APPEND		13
#define UBLK_IO_OP_ZONE_RESET_ALL	14
#define UBLK_IO_OP_ZONE_RESET		15
#define UBLK_IO_OP_REPORT_ZONES		18

#define UBLK_IO_F_FAILFAST_DEV		(1U << 8)
#define UBLK_IO_F_FAILFAST_TRANSPORT	(1U << 9)
#define UBLK_IO_F_FAILFAST_DRIVER	(1U << 10)
#define UBLK_IO_F_META			(1U << 11)
#define UBLK_IO_F_FUA			(1U << 13)
#define UBLK_IO_F_NOUNMAP		(1U << 15)
#define UBLK_IO_F_SWAP			(1U << 16)

/* Parameter types and basic attributes. */
#define UBLK_PARAM_TYPE_BASIC		(1 << 0)
#define UBLK_PARAM_TYPE_DISCARD		(1 << 1)
#define UBLK_PARAM_TYPE_DEVT		(1 << 2)
#define UBLK_PARAM_TYPE_ZONED		(1 << 3)

#define UBLK_ATTR_READ_ONLY		(1 << 0)
#define UBLK_ATTR_ROTATIONAL		(1 << 1)
#define UBLK_ATTR_VOLATILE_CACHE	(1 << 2)
#define UBLK_ATTR_FUA			(1 << 3)

struct ublksrv_ctrl_cmd {
	__u32 dev_id;
	__u16 queue_id;		/* 0xffff for device-wide commands */
	__u16 len;
	__u64 addr;
	__u64 data[1];
	__u16 dev_path_len;
	__u16 pad;
	__u32 reserved;
};

struct ublksrv_ctrl_dev_info {
	__u16 nr_hw_queues;
	__u16 queue_depth;
	__u16 state;
	__u16 pad0;
	__u32 max_io_buf_bytes;
	__u32 dev_id;
	__s32 ublksrv_pid;
	__u32 pad1;
	__u64 flags;
	__u64 ublksrv_flags;
	__u32 owner_uid;
	__u32 owner_gid;
	__u64 reserved1;
	__u64 reserved2;
};

struct ublksrv_io_desc {
	__u32 op_flags;
	__u32 nr_sectors;	/* nr_zones for REPORT_ZONES */
	__u64 start_sector;
	__u64 addr;
};

struct ublksrv_io_cmd {
	__u16 q_id;
	__u16 tag;
	__s32 result;
	__u64 addr;		/* or zone_append_lba */
};

struct ublk_param_basic {
	__u32 attrs;
	__u8 logical_bs_shift;
	__u8 physical_bs_shift;
	__u8 io_opt_shift;
	__u8 io_min_shift;
	__u32 max_sectors;
	__u32 chunk_sectors;
	__u64 dev_sectors;
	__u64 virt_boundary_mask;
};

struct ublk_param_discard {
	__u32 discard_alignment;
	__u32 discard_granularity;
	__u32 max_discard_sectors;
	__u32 max_write_zeroes_sectors;
	__u16 max_discard_segments;
	__u16 reserved0;
};

struct ublk_param_devt {
	__u32 char_major;
	__u32 char_minor;
	__u32 disk_major;
	__u32 disk_minor;
};

struct ublk_param_zoned {
	__u32 max_open_zones;
	__u32 max_active_zones;
	__u32 max_zone_append_sectors;
	__u8 reserved[20];
};

struct ublk_params {
	__u32 len;
	__u32 types;
	struct ublk_param_basic basic;
	struct ublk_param_discard discard;
	struct ublk_param_devt devt;
	struct ublk_param_zoned zoned;
};

/* ioctl-encoded commands (6.4+, UBLK_F_CMD_IOCTL_ENCODE). */
#define UBLK_U_CMD_GET_QUEUE_AFFINITY	_IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO		_IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV		_IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV		_IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV		_IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV		_IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS		_IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS		_IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY	_IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY	_IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO2	_IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_FEATURES		_IOR('u', UBLK_CMD_GET_FEATURES, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV_ASYNC	_IOR('u', UBLK_CMD_DEL_DEV_ASYNC, struct ublksrv_ctrl_cmd)

#define UBLK_U_IO_FETCH_REQ		_IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ	_IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_NEED_GET_DATA		_IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd)

#endif /* UBLKML_UBLK_UAPI_H */
