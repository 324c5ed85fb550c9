"""cffi build script (API mode): compiles the engine in csrc/ against liburing.

API mode rather than ABI mode because liburing's prep helpers are
``static inline`` and the UAPI layout must be checked by a C compiler: every
struct below is declared in full, so cffi's generated code asserts that each
field's offset and size match ``csrc/ublk_uapi.h`` at build time.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"

CDEF = """
/* ---- UAPI constants ---- */
#define UBLK_CMD_GET_QUEUE_AFFINITY ...
#define UBLK_CMD_GET_DEV_INFO ...
#define UBLK_CMD_ADD_DEV ...
#define UBLK_CMD_DEL_DEV ...
#define UBLK_CMD_START_DEV ...
#define UBLK_CMD_STOP_DEV ...
#define UBLK_CMD_SET_PARAMS ...
#define UBLK_CMD_GET_PARAMS ...
#define UBLK_CMD_START_USER_RECOVERY ...
#define UBLK_CMD_END_USER_RECOVERY ...
#define UBLK_CMD_GET_DEV_INFO2 ...
#define UBLK_CMD_GET_FEATURES ...
#define UBLK_CMD_DEL_DEV_ASYNC ...
#define UBLK_IO_FETCH_REQ ...
#define UBLK_IO_COMMIT_AND_FETCH_REQ ...
#define UBLK_IO_NEED_GET_DATA ...
#define UBLK_U_CMD_GET_QUEUE_AFFINITY ...
#define UBLK_U_CMD_GET_DEV_INFO ...
#define UBLK_U_CMD_ADD_DEV ...
#define UBLK_U_CMD_DEL_DEV ...
#define UBLK_U_CMD_START_DEV ...
#define UBLK_U_CMD_STOP_DEV ...
#define UBLK_U_CMD_SET_PARAMS ...
#define UBLK_U_CMD_GET_PARAMS ...
#define UBLK_U_CMD_START_USER_RECOVERY ...
#define UBLK_U_CMD_END_USER_RECOVERY ...
#define UBLK_U_CMD_GET_DEV_INFO2 ...
#define UBLK_U_CMD_GET_FEATURES ...
#define UBLK_U_CMD_DEL_DEV_ASYNC ...
#define UBLK_U_IO_FETCH_REQ ...
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ ...
#define UBLK_U_IO_NEED_GET_DATA ...
#define IORING_OP_URING_CMD ...
#define IORING_SETUP_SQE128 ...
#define IORING_SETUP_COOP_TASKRUN ...
#define IORING_SETUP_TASKRUN_FLAG ...
#define IORING_SETUP_SINGLE_ISSUER ...
#define IORING_SETUP_DEFER_TASKRUN ...

struct ublksrv_ctrl_cmd {
    uint32_t dev_id;
    uint16_t queue_id;
    uint16_t len;
    uint64_t addr;
    uint64_t data[1];
    uint16_t dev_path_len;
    uint16_t pad;
    uint32_t reserved;
};

struct ublksrv_ctrl_dev_info {
    uint16_t nr_hw_queues;
    uint16_t queue_depth;
    uint16_t state;
    uint16_t pad0;
    uint32_t max_io_buf_bytes;
    uint32_t dev_id;
    int32_t ublksrv_pid;
    uint32_t pad1;
    uint64_t flags;
    uint64_t ublksrv_flags;
    uint32_t owner_uid;
    uint32_t owner_gid;
    uint64_t reserved1;
    uint64_t reserved2;
};

struct ublksrv_io_desc {
    uint32_t op_flags;
    uint32_t nr_sectors;
    uint64_t start_sector;
    uint64_t addr;
};

struct ublksrv_io_cmd {
    uint16_t q_id;
    uint16_t tag;
    int32_t result;
    uint64_t addr;
};

struct ublk_param_basic {
    uint32_t attrs;
    uint8_t logical_bs_shift;
    uint8_t physical_bs_shift;
    uint8_t io_opt_shift;
    uint8_t io_min_shift;
    uint32_t max_sectors;
    uint32_t chunk_sectors;
    uint64_t dev_sectors;
    uint64_t virt_boundary_mask;
};

struct ublk_param_discard {
    uint32_t discard_alignment;
    uint32_t discard_granularity;
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint16_t max_discard_segments;
    uint16_t reserved0;
};

struct ublk_param_devt {
    uint32_t char_major;
    uint32_t char_minor;
    uint32_t disk_major;
    uint32_t disk_minor;
};

struct ublk_param_zoned {
    uint32_t max_open_zones;
    uint32_t max_active_zones;
    uint32_t max_zone_append_sectors;
    uint8_t reserved[20];
};

struct ublk_params {
    uint32_t len;
    uint32_t types;
    struct ublk_param_basic basic;
    struct ublk_param_discard discard;
    struct ublk_param_devt devt;
    struct ublk_param_zoned zoned;
};

/* ---- engine ---- */
#define UBLKML_TGT_NULL ...
#define UBLKML_TGT_MEM ...
#define UBLKML_TGT_LOOP ...
#define UBLKML_TGT_EVENTS ...
#define UBLKML_TGT_MIRROR ...
#define UBLKML_MAX_LEGS ...
#define UBLKML_PROBE_TAG ...
#define UBLKML_REC_PROBED ...
#define UBLKML_FAULT_CONST ...
#define UBLKML_FAULT_BURST ...
#define UBLKML_FAULT_RAMP ...
#define UBLKML_LEG_ACTIVE ...
#define UBLKML_LEG_DEMOTED ...
#define UBLKML_LEG_FAILED ...

struct ublkml_fault {
    uint32_t delay_us;
    uint32_t slow_x1000;
    uint8_t mode;
    uint8_t pad0[3];
    uint32_t burst_period_ms;
    uint32_t burst_on_ms;
    uint32_t ramp_ms;
    uint32_t err_ppm;
    uint32_t err_ops;
    int32_t err_errno;
    uint32_t pad1;
    uint64_t seed;
};

struct ublkml_leg_info {
    uint32_t state;
    uint32_t pad0;
    uint64_t dirty_regions;
    uint64_t total_regions;
    uint64_t reads;
    uint64_t writes;
    uint64_t errors;
    uint64_t probes;
};

struct ublkml_completion {
    uint64_t t_ns;
    uint64_t offset;
    uint32_t length;
    uint32_t lat_ns;
    int32_t result;
    uint16_t q_id;
    uint16_t tag;
    uint8_t op;
    uint8_t path;
    uint16_t flags;
    uint32_t pad1;
};

#define UBLKML_SUM_BINS ...
struct ublkml_path_summary {
    uint64_t n;
    uint64_t errors;
    uint64_t bytes;
    uint64_t lat_sum;
    double lat_sumsq;
    uint64_t hist[512];
};

struct ublkml_ctrl;
struct ublkml_target;
struct ublkml_queue;

struct ublkml_event {
    uint16_t tag;
    uint8_t op;
    uint8_t pad0;
    uint32_t op_flags;
    uint32_t nr_sectors;
    int32_t result;
    uint64_t start_sector;
};

struct ublkml_queue_stats {
    uint64_t ops[8];
    uint64_t bytes[8];
    uint64_t errors;
    uint64_t batches;
    int32_t last_error;
    uint32_t last_error_op;
    uint64_t last_error_offset;
};

#define UBLKML_OP_CANCELLED ...
#define UBLKML_RELAY_PENDING ...
#define UBLKML_RELAY_CANCELLED ...
#define UBLKML_RELAY_NOTE ...

struct ublkml_relay_worker;

struct ublkml_relay_note {
    uint32_t buf_gen;
    uint32_t stuck;
    uint64_t timeouts;
    uint64_t late;
    uint32_t spawn;
    uint32_t came_back;
    uint64_t late_ns;
    uint32_t new_timeouts;
    uint16_t tag;
    uint8_t op;
    uint8_t pad0;
    uint32_t op_flags;
    uint32_t nr_sectors;
    uint64_t start_sector;
    uint64_t stuck_ns;
};

struct ublkml_relay_stats {
    uint64_t timeouts;
    uint64_t late;
    uint64_t unserved;
    uint32_t stuck;
    uint32_t workers;
};

int ublkml_ctrl_open(struct ublkml_ctrl **out, const char *path);
void ublkml_ctrl_close(struct ublkml_ctrl *c);
int ublkml_ctrl_cmd(struct ublkml_ctrl *c, uint32_t cmd_op, uint32_t dev_id,
                    uint16_t queue_id, void *buf, uint16_t len, uint64_t data0);

int ublkml_target_new_null(struct ublkml_target **out, uint64_t size);
int ublkml_target_new_mem(struct ublkml_target **out, uint64_t size);
int ublkml_target_new_loop(struct ublkml_target **out, int fd, int is_bdev, uint64_t size);
int ublkml_target_new_events(struct ublkml_target **out, uint64_t size);
int ublkml_target_new_mirror(struct ublkml_target **out, const int *fds, const int *is_bdev,
                             int n_legs, uint64_t size, uint32_t region_shift, int journal_fd);
void ublkml_target_free(struct ublkml_target *t);
int ublkml_target_kind(const struct ublkml_target *t);
int ublkml_target_n_paths(const struct ublkml_target *t);
int ublkml_target_set_fault(struct ublkml_target *t, uint32_t path,
                            const struct ublkml_fault *f);
int ublkml_target_get_fault(struct ublkml_target *t, uint32_t path, struct ublkml_fault *out);
int ublkml_mirror_set_leg_state(struct ublkml_target *t, int leg, int state);
int ublkml_mirror_leg_info(struct ublkml_target *t, int leg, struct ublkml_leg_info *out);
int ublkml_mirror_set_probe_every(struct ublkml_target *t, uint32_t n);
int ublkml_mirror_resync(struct ublkml_target *t, int leg, int max_regions);
int ublkml_dio_alignment(int fd, int is_bdev);

int ublkml_queue_new(struct ublkml_queue **out, struct ublkml_target *t, int cdev_fd,
                     uint16_t q_id, uint16_t depth, uint32_t buf_size, int ioctl_encode,
                     uint32_t ring_flags, void *iods);
int ublkml_map_descriptors(int cdev_fd, uint16_t q_id, uint16_t depth, void **out);
int ublkml_unmap_descriptors(void *iods, uint16_t depth);
void ublkml_queue_free(struct ublkml_queue *q);
int ublkml_queue_submit_fetches(struct ublkml_queue *q);
int ublkml_set_thread_name(const char *name);
void ublkml_queue_set_spin(struct ublkml_queue *q, uint32_t spin_usec);
int ublkml_queue_run(struct ublkml_queue *q);
int ublkml_queue_commit_and_wait(struct ublkml_queue *q, struct ublkml_event *evs,
                                 int n_done, int max);
void *ublkml_queue_buf(struct ublkml_queue *q, uint16_t tag);
uint32_t ublkml_queue_buf_size(const struct ublkml_queue *q);
void ublkml_queue_get_stats(const struct ublkml_queue *q, struct ublkml_queue_stats *out);
int ublkml_queue_inject(struct ublkml_queue *q, uint16_t tag, uint32_t op_flags,
                        uint64_t start_sector, uint32_t nr_sectors);
int ublkml_queue_enable_records(struct ublkml_queue *q, uint32_t capacity);
int ublkml_queue_read_records(struct ublkml_queue *q, struct ublkml_completion *out, int max);
uint64_t ublkml_queue_records_dropped(const struct ublkml_queue *q);
int ublkml_queue_enable_summaries(struct ublkml_queue *q);
int ublkml_queue_read_summaries(struct ublkml_queue *q, struct ublkml_path_summary *out,
                                int max_paths);
int ublkml_queue_harvest(struct ublkml_queue *q, struct ublkml_event *out, int max);
int ublkml_queue_relay_init(struct ublkml_queue *q, uint64_t timeout_ns, int max_stuck);
int ublkml_queue_relay(struct ublkml_queue *q);
int ublkml_relay_join(struct ublkml_queue *q, struct ublkml_relay_worker **out);
int ublkml_relay_next(struct ublkml_relay_worker *w, struct ublkml_event *evs, int n_done,
                      int max, struct ublkml_relay_note *note);
int ublkml_queue_relay_stats(struct ublkml_queue *q, struct ublkml_relay_stats *out);
int ublkml_queue_relay_report(struct ublkml_queue *q, struct ublkml_relay_note *note);
int ublkml_queue_relay_feed(struct ublkml_queue *q, int tag, uint32_t op_flags,
                            uint64_t start_sector, uint32_t nr_sectors, int feeding);
int ublkml_queue_relay_harvest(struct ublkml_queue *q, struct ublkml_event *out, int max);
"""

#: the engine's C files (csrc/engine.h says what each holds); a new native
#: target adds its target_*.c here and its ops to the registry in targets.c
SOURCES = (
    "control.c",
    "targets.c",
    "queue.c",
    "faults.c",
    "backing.c",
    "harness.c",
    "target_null.c",
    "target_mem.c",
    "target_loop.c",
    "target_mirror.c",
    "target_relay.c",
)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "ublk_driver._ublkml_cffi",
    '#include "ublkml.h"\n#include <liburing.h>\n',
    sources=[os.path.relpath(CSRC / name) for name in SOURCES],
    include_dirs=[os.path.relpath(CSRC)],
    libraries=["uring"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
