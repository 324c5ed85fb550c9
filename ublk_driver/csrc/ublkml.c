/* SPDX-License-Identifier: MIT */
/*
 * ublkml's native engine.  See ublkml.h for the conventions.
 *
 * The hot path
 * ------------
 * One queue = one io_uring + one thread.  The ring carries two kinds of
 * requests, told apart by bit 63 of user_data:
 *   - ublk I/O commands (FETCH_REQ, COMMIT_AND_FETCH_REQ) on /dev/ublkcN;
 *   - target I/O: read/write/fsync/fallocate on a loop or mirror leg, the
 *     timers of injected delays and mirror health probes (kind, leg and
 *     tag or probe slot are encoded in user_data, see tgt_ud()).
 * ublkml_queue_run() loops: submit everything prepared, wait for >= 1 CQE,
 * then walk every ready CQE.  A CQE of a ublk command means "a request is in
 * this tag's descriptor": the target handles it, either at once (null, mem:
 * the answer is prepared as the next COMMIT_AND_FETCH) or by queueing target
 * I/O whose CQE later prepares the commit.  Nothing reaches the kernel until
 * the next submit, so one io_uring_enter() carries a whole batch of commits
 * and new target I/O: the syscall cost is per batch, not per I/O, and no
 * Python runs at all for native targets.
 *
 * Event targets (Python plug-ins) get the same loop, but instead of handling
 * a request it is copied into a caller-supplied array; the caller answers
 * the whole array in one call.  So Python runs once per batch of
 * completions, plus the plug-in's own method per I/O.
 *
 * Leg I/O (loop = one leg, mirror = 2..8): leg_start() -> backing I/O ->
 * leg_cqe() (short transfers and zero-range fallbacks resubmit) ->
 * leg_io_done() (adds an injected delay as an IORING_OP_TIMEOUT, never a
 * sleep) -> leg_finish() -> the request's answer.  The mirror's fan-out,
 * read retry, dirty regions and probes are in the "mirror: the data path"
 * section; the resync protocol is at ublkml_mirror_resync().
 *
 * Stopping: STOP_DEV (from any thread or process) makes the driver complete
 * every outstanding FETCH/COMMIT with UBLK_IO_RES_ABORT (-ENODEV).  A tag
 * that sees it is never fetched again; the queue is done when no command
 * and no target I/O is in flight.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "ublkml.h"

#define TGT_IO_BIT	(1ULL << 63)
#define SECTOR_SHIFT	9

#ifndef RWF_DSYNC
#define RWF_DSYNC	0x00000002
#endif

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- control device ---------------------------------------------------- */

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

/* ---- targets ----------------------------------------------------------- */

/* One backing file or device: the loop target has one, a mirror 2..8. */
struct leg {
	int fd;
	int is_bdev;
	/* mirror only; all updated with atomics from several threads */
	uint64_t *dirty;	/* one bit per region this leg missed */
	uint64_t n_dirty;	/* bits set in dirty */
	uint64_t reads, writes, errors, probes;
};

/* A fault as queue threads read it: copied word by word with relaxed
 * atomics between the seqlock's sequence loads, so that the reader is
 * race-free in the C11 model and never waits for the writer. */
struct fault_data {
	struct ublkml_fault f;
	uint64_t t0;		/* ns: the schedule's clock starts here */
	uint64_t on;
};
#define FAULT_WORDS (sizeof(struct fault_data) / sizeof(uint64_t))
_Static_assert(sizeof(struct fault_data) % sizeof(uint64_t) == 0,
	       "fault_data is copied in 64-bit words");

struct fault_slot {
	uint32_t seq;		/* odd while a writer is inside */
	uint64_t w[FAULT_WORDS];
};

/* ---- mirror: the journal --------------------------------------------
 *
 * A mirror's leg states, dirty bits and per-region writes in flight can live
 * in a file mapped MAP_SHARED (ublkml puts it on tmpfs, next to the server's
 * state file).  Every store the queue threads make there is in the page
 * cache at once, so when the server dies (SIGKILL included) the next server
 * finds exactly what the dead one knew: which legs were ACTIVE, which
 * regions a leg missed, and which regions had writes in flight -- those may
 * differ between legs and are copied from an ACTIVE leg before the device
 * serves again (md's write-intent bitmap, for a process crash; a host crash
 * loses the tmpfs file, and the device, with it).  Nothing is added to the
 * I/O path: the same atomics hit a different page. */
#define JOURNAL_MAGIC	"ublkmlMJ"
#define JOURNAL_VERSION	1u

struct mirror_journal {
	char magic[8];
	uint32_t version;
	uint32_t n_legs;
	uint32_t region_shift;
	uint32_t states;
	uint64_t size;
	uint64_t n_regions;
	uint32_t resync_at[UBLKML_MAX_LEGS];
	uint8_t reserved[128 - 40 - 4 * UBLKML_MAX_LEGS];
	/* then uint32_t r_inflight[n_regions], padded to 8 bytes, then
	 * uint64_t dirty[n_legs][words] */
};
_Static_assert(sizeof(struct mirror_journal) == 128, "journal header is 128 bytes");

struct ublkml_target {
	int kind;
	uint64_t size;
	uint8_t *mem;			/* mem */
	int n_legs;			/* loop: 1, mirror: 2..8 */
	struct leg legs[UBLKML_MAX_LEGS];
	/* mirror: 2 bits of UBLKML_LEG_* per leg in one word, so that "is
	 * another leg still ACTIVE?" and the change are a single CAS.  It,
	 * r_inflight and the dirty bits live in the journal when there is one
	 * (see "mirror: the journal"), else in memory of our own. */
	uint32_t *states;
	uint32_t own_states;
	uint32_t *resync_at;		/* per leg: region + 1 being copied */
	uint32_t own_resync_at[UBLKML_MAX_LEGS];
	uint32_t region_shift;
	uint64_t n_regions;
	uint32_t *r_inflight;		/* per region: writes in flight */
	uint32_t *r_gen;		/* per region: writes ever submitted */
	struct mirror_journal *journal;	/* MAP_SHARED, or NULL */
	size_t journal_len;
	/* write epochs: lets a state change wait until no write that saw
	 * the previous states is still running (see write_barrier) */
	uint32_t w_epoch;
	uint64_t w_active[2];
	uint32_t probe_every;
	uint32_t probe_rr;
	pthread_mutex_t ctl;		/* control calls only, never the queues */
	struct fault_slot faults[UBLKML_MAX_LEGS];
};

static int target_alloc(struct ublkml_target **out, int kind, uint64_t size)
{
	struct ublkml_target *t = calloc(1, sizeof(*t));

	if (!t)
		return -ENOMEM;
	t->kind = kind;
	t->size = size;
	t->states = &t->own_states;
	t->resync_at = t->own_resync_at;
	for (int i = 0; i < UBLKML_MAX_LEGS; i++)
		t->legs[i].fd = -1;
	pthread_mutex_init(&t->ctl, NULL);
	*out = t;
	return 0;
}

int ublkml_target_new_null(struct ublkml_target **out, uint64_t size)
{
	return target_alloc(out, UBLKML_TGT_NULL, size);
}

int ublkml_target_new_events(struct ublkml_target **out, uint64_t size)
{
	return target_alloc(out, UBLKML_TGT_EVENTS, size);
}

int ublkml_target_new_mem(struct ublkml_target **out, uint64_t size)
{
	int ret = target_alloc(out, UBLKML_TGT_MEM, size);
	void *p;

	if (ret)
		return ret;
	/* Anonymous pages read as zero and cost nothing until written. */
	p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED) {
		ret = -errno;
		ublkml_target_free(*out);
		*out = NULL;
		return ret;
	}
	(*out)->mem = p;
	return 0;
}

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

static size_t journal_inflight_bytes(uint64_t n_regions)
{
	return (size_t)((n_regions * sizeof(uint32_t) + 7) & ~7ull);
}

/* Map the journal: a new (empty) file is laid out, a used one must describe
 * this mirror.  Returns 1 when the file was in use (a recovery). */
static int journal_map(struct ublkml_target *t, int fd, size_t words)
{
	size_t len = sizeof(struct mirror_journal) +
		     journal_inflight_bytes(t->n_regions) +
		     (size_t)t->n_legs * words * sizeof(uint64_t);
	struct mirror_journal *j;
	struct stat st;
	int used;

	if (fstat(fd, &st) < 0)
		return -errno;
	used = st.st_size != 0;
	if (used && (uint64_t)st.st_size != len)
		return -EBADMSG;	/* another mirror's, or damaged */
	if (!used && ftruncate(fd, (off_t)len) < 0)
		return -errno;
	j = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (j == MAP_FAILED)
		return -errno;
	if (used && (memcmp(j->magic, JOURNAL_MAGIC, 8) ||
		     j->version != JOURNAL_VERSION || j->n_legs != (uint32_t)t->n_legs ||
		     j->region_shift != t->region_shift || j->size != t->size ||
		     j->n_regions != t->n_regions)) {
		munmap(j, len);
		return -EBADMSG;
	}
	if (!used) {
		j->version = JOURNAL_VERSION;
		j->n_legs = (uint32_t)t->n_legs;
		j->region_shift = t->region_shift;
		j->size = t->size;
		j->n_regions = t->n_regions;
		memcpy(j->magic, JOURNAL_MAGIC, 8);	/* last: marks it complete */
	}
	t->journal = j;
	t->journal_len = len;
	t->states = &j->states;
	t->resync_at = j->resync_at;
	t->r_inflight = (uint32_t *)(j + 1);
	for (int i = 0; i < t->n_legs; i++)
		t->legs[i].dirty = (uint64_t *)((char *)(j + 1) +
			journal_inflight_bytes(t->n_regions)) + (size_t)i * words;
	return used;
}

static int copy_region(struct ublkml_target *t, int src, int dst, uint64_t r,
		       char *buf, uint64_t chunk);
static void dirty_set(struct leg *lg, uint64_t r);

/* A used journal: count the dirty bits, redo an interrupted resync copy,
 * and make the regions that had writes in flight equal on every leg that
 * is not FAILED (their writes may have reached some legs only). */
static int journal_replay(struct ublkml_target *t, size_t words)
{
	uint32_t states = __atomic_load_n(t->states, __ATOMIC_SEQ_CST);
	uint64_t chunk = 1ull << t->region_shift;
	char *buf = NULL;
	int src = -1, ret = 0;

	for (int i = 0; i < t->n_legs; i++) {
		struct leg *lg = &t->legs[i];

		lg->n_dirty = 0;
		for (size_t w = 0; w < words; w++)
			lg->n_dirty += (uint64_t)__builtin_popcountll(lg->dirty[w]);
		if (t->resync_at[i]) {
			dirty_set(lg, t->resync_at[i] - 1);
			t->resync_at[i] = 0;
		}
		if (src < 0 && ((states >> (2 * i)) & 3u) == UBLKML_LEG_ACTIVE)
			src = i;
	}
	if (src < 0)
		return -EBADMSG;	/* no ACTIVE leg: not a state we ever write */
	if (chunk > (1u << 20))
		chunk = 1u << 20;
	for (uint64_t r = 0; r < t->n_regions; r++) {
		if (!t->r_inflight[r])
			continue;
		if (!buf && posix_memalign((void **)&buf, 4096, chunk))
			return -ENOMEM;
		for (int i = 0; i < t->n_legs && !ret; i++) {
			uint32_t st = (states >> (2 * i)) & 3u;

			if (i == src || st == UBLKML_LEG_FAILED)
				continue;
			if (st == UBLKML_LEG_DEMOTED)
				dirty_set(&t->legs[i], r);	/* resync copies it */
			else
				ret = copy_region(t, src, i, r, buf, chunk);
		}
		if (ret)
			break;
		t->r_inflight[r] = 0;
	}
	if (!ret && buf) {
		for (int i = 0; i < t->n_legs; i++)
			if (i != src && fdatasync(t->legs[i].fd) < 0 && errno != EINVAL)
				ret = -errno;
	}
	free(buf);
	return ret;
}

int ublkml_target_new_mirror(struct ublkml_target **out, const int *fds,
			     const int *is_bdev, int n_legs, uint64_t size,
			     uint32_t region_shift, int journal_fd)
{
	struct ublkml_target *t;
	size_t words;
	int ret;

	if (n_legs < 2 || n_legs > UBLKML_MAX_LEGS || region_shift < 12 ||
	    region_shift > 30 || size == 0)
		return -EINVAL;
	ret = target_alloc(&t, UBLKML_TGT_MIRROR, size);
	if (ret)
		return ret;
	t->n_legs = n_legs;
	t->region_shift = region_shift;
	t->n_regions = (size + (1ull << region_shift) - 1) >> region_shift;
	t->probe_every = 8;
	words = (t->n_regions + 63) / 64;
	t->r_gen = calloc(t->n_regions, sizeof(uint32_t));
	if (!t->r_gen)
		goto nomem;
	for (int i = 0; i < n_legs; i++) {
		t->legs[i].fd = fds[i];
		t->legs[i].is_bdev = is_bdev[i];
	}
	if (journal_fd >= 0) {
		ret = journal_map(t, journal_fd, words);
		if (ret == 1)
			ret = journal_replay(t, words);
		if (ret < 0) {
			ublkml_target_free(t);
			return ret;
		}
		*out = t;
		return 0;
	}
	t->r_inflight = calloc(t->n_regions, sizeof(uint32_t));
	if (!t->r_inflight)
		goto nomem;
	for (int i = 0; i < n_legs; i++) {
		t->legs[i].dirty = calloc(words, sizeof(uint64_t));
		if (!t->legs[i].dirty)
			goto nomem;
	}
	*out = t;
	return 0;
nomem:
	ublkml_target_free(t);
	return -ENOMEM;
}

void ublkml_target_free(struct ublkml_target *t)
{
	if (!t)
		return;
	if (t->mem)
		munmap(t->mem, t->size);
	if (t->journal) {
		munmap(t->journal, t->journal_len);
	} else {
		for (int i = 0; i < UBLKML_MAX_LEGS; i++)
			free(t->legs[i].dirty);
		free(t->r_inflight);
	}
	free(t->r_gen);
	pthread_mutex_destroy(&t->ctl);
	free(t);
}

int ublkml_target_kind(const struct ublkml_target *t)
{
	return t->kind;
}

int ublkml_target_n_paths(const struct ublkml_target *t)
{
	if (t->kind == UBLKML_TGT_EVENTS)
		return 0;
	return t->kind == UBLKML_TGT_MIRROR ? t->n_legs : 1;
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

/* ---- faults: the control side ------------------------------------------ */

static void fault_write(struct fault_slot *s, const struct fault_data *d)
{
	uint64_t w[FAULT_WORDS];
	uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);

	memcpy(w, d, sizeof(w));
	__atomic_store_n(&s->seq, seq + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (size_t i = 0; i < FAULT_WORDS; i++)
		__atomic_store_n(&s->w[i], w[i], __ATOMIC_RELAXED);
	__atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE);
}

/* One attempt: 0 and *seq (even) when *d is a consistent copy, -EAGAIN
 * when a writer was inside.  Queue threads never retry in a loop: they keep
 * their previous copy and look again at the next I/O. */
static int fault_try_read(const struct fault_slot *s, struct fault_data *d,
			  uint32_t *seq)
{
	uint64_t w[FAULT_WORDS];
	uint32_t s1, s2;

	s1 = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
	if (s1 & 1)
		return -EAGAIN;
	for (size_t i = 0; i < FAULT_WORDS; i++)
		w[i] = __atomic_load_n(&s->w[i], __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	s2 = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
	if (s1 != s2)
		return -EAGAIN;
	memcpy(d, w, sizeof(w));
	*seq = s1;
	return 0;
}

int ublkml_target_set_fault(struct ublkml_target *t, uint32_t path,
			    const struct ublkml_fault *f)
{
	struct fault_data d;

	if (path >= (uint32_t)ublkml_target_n_paths(t))
		return -EINVAL;
	memset(&d, 0, sizeof(d));
	if (f) {
		if (f->mode > UBLKML_FAULT_RAMP || f->err_ppm > 1000000 ||
		    f->err_errno < 0 || f->err_errno > 4095 ||
		    (f->slow_x1000 && f->slow_x1000 < 1000) ||
		    (f->mode == UBLKML_FAULT_BURST &&
		     (!f->burst_period_ms || f->burst_on_ms > f->burst_period_ms)))
			return -EINVAL;
		d.f = *f;
		if (!d.f.slow_x1000)
			d.f.slow_x1000 = 1000;
		if (!d.f.err_errno)
			d.f.err_errno = EIO;
		d.t0 = now_ns();
		d.on = 1;
	}
	pthread_mutex_lock(&t->ctl);	/* one writer at a time per seqlock */
	fault_write(&t->faults[path], &d);
	pthread_mutex_unlock(&t->ctl);
	return 0;
}

int ublkml_target_get_fault(struct ublkml_target *t, uint32_t path,
			    struct ublkml_fault *out)
{
	struct fault_data d;
	uint32_t seq;

	if (path >= (uint32_t)ublkml_target_n_paths(t))
		return -EINVAL;
	pthread_mutex_lock(&t->ctl);	/* no writer inside: one read is enough */
	fault_try_read(&t->faults[path], &d, &seq);
	pthread_mutex_unlock(&t->ctl);
	*out = d.f;
	return d.on ? 1 : 0;
}

/* ---- mirror: leg states, dirty regions, write epochs --------------------- */

static uint32_t leg_state_of(uint32_t states, int leg)
{
	return (states >> (2 * leg)) & 3u;
}

static uint32_t states_load(struct ublkml_target *t)
{
	return __atomic_load_n(t->states, __ATOMIC_SEQ_CST);
}

static uint32_t legs_in(const struct ublkml_target *t, uint32_t states,
			uint32_t state)
{
	uint32_t mask = 0;

	for (int i = 0; i < t->n_legs; i++)
		if (leg_state_of(states, i) == state)
			mask |= 1u << i;
	return mask;
}

/* Move leg from any state in from_mask (bits 1 << UBLKML_LEG_*) to state.
 * -EBUSY when that would leave no ACTIVE leg, -EAGAIN when the leg is in
 * another state.  *was gets the previous state. */
static int leg_cas(struct ublkml_target *t, int leg, uint32_t from_mask,
		   uint32_t state, uint32_t *was)
{
	uint32_t old = states_load(t), nw, cur;

	do {
		cur = leg_state_of(old, leg);
		if (was)
			*was = cur;
		if (cur == state)
			return 0;
		if (!(from_mask & (1u << cur)))
			return -EAGAIN;
		if (cur == UBLKML_LEG_ACTIVE &&
		    !(legs_in(t, old, UBLKML_LEG_ACTIVE) & ~(1u << leg)))
			return -EBUSY;
		nw = (old & ~(3u << (2 * leg))) | (state << (2 * leg));
	} while (!__atomic_compare_exchange_n(t->states, &old, nw, 0,
					      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
	return 0;
}

#define ANY_LEG_STATE 7u

static void dirty_set(struct leg *lg, uint64_t r)
{
	uint64_t bit = 1ull << (r & 63);

	if (!(__atomic_fetch_or(&lg->dirty[r >> 6], bit, __ATOMIC_SEQ_CST) & bit))
		__atomic_fetch_add(&lg->n_dirty, 1, __ATOMIC_SEQ_CST);
}

static int dirty_clear(struct leg *lg, uint64_t r)
{
	uint64_t bit = 1ull << (r & 63);

	if (!(__atomic_fetch_and(&lg->dirty[r >> 6], ~bit, __ATOMIC_SEQ_CST) & bit))
		return 0;
	__atomic_fetch_sub(&lg->n_dirty, 1, __ATOMIC_SEQ_CST);
	return 1;
}

static void dirty_range(struct ublkml_target *t, int leg, uint64_t off,
			uint64_t len)
{
	uint64_t r, last;

	if (!len)
		return;
	last = (off + len - 1) >> t->region_shift;
	for (r = off >> t->region_shift; r <= last && r < t->n_regions; r++)
		dirty_set(&t->legs[leg], r);
}

static void dirty_clear_range(struct ublkml_target *t, int leg, uint64_t off,
			      uint64_t len)
{
	uint64_t r, last;

	if (!len)
		return;
	last = (off + len - 1) >> t->region_shift;
	for (r = off >> t->region_shift; r <= last && r < t->n_regions; r++)
		dirty_clear(&t->legs[leg], r);
}

/* Wait until every write that may have read the leg states before this
 * call has completed (the caller changed a state first).  A writer joins
 * the current epoch before it reads the states; flipping the epoch twice
 * and draining the old side each time catches every such writer (SRCU's
 * argument), and new writers, on the other side, cannot starve it. */
static void write_barrier(struct ublkml_target *t)
{
	struct timespec ts = { 0, 20000 };

	for (int i = 0; i < 2; i++) {
		uint32_t old = __atomic_fetch_add(&t->w_epoch, 1,
						  __ATOMIC_SEQ_CST) & 1;

		while (__atomic_load_n(&t->w_active[old], __ATOMIC_SEQ_CST))
			nanosleep(&ts, NULL);
	}
}

static uint64_t leg_dirty(struct ublkml_target *t, int leg)
{
	return __atomic_load_n(&t->legs[leg].n_dirty, __ATOMIC_SEQ_CST);
}

static int set_leg_state_locked(struct ublkml_target *t, int leg, uint32_t state)
{
	uint32_t cur = leg_state_of(states_load(t), leg);
	int ret;

	if (cur == state)
		return 0;
	if (state == UBLKML_LEG_ACTIVE) {
		if (leg_dirty(t, leg))
			return -EAGAIN;
		if (cur == UBLKML_LEG_FAILED) {
			/* Writes that saw it FAILED mark their regions dirty
			 * before they complete: let them finish, then look. */
			ret = leg_cas(t, leg, 1u << UBLKML_LEG_FAILED,
				      UBLKML_LEG_DEMOTED, NULL);
			if (ret)
				return ret;
			write_barrier(t);
			if (leg_dirty(t, leg)) {
				leg_cas(t, leg, 1u << UBLKML_LEG_DEMOTED,
					UBLKML_LEG_FAILED, NULL);
				return -EAGAIN;
			}
		}
		/* A queue thread that fails a write on this leg marks the
		 * region dirty and then moves the leg to FAILED, so a dirty
		 * bit set after the check above still ends in FAILED. */
		return leg_cas(t, leg, 1u << UBLKML_LEG_DEMOTED,
			       UBLKML_LEG_ACTIVE, NULL);
	}
	ret = leg_cas(t, leg, ANY_LEG_STATE, state, &cur);
	if (ret == 0 && cur == UBLKML_LEG_FAILED && state == UBLKML_LEG_DEMOTED)
		write_barrier(t);	/* from now on every write reaches it */
	return ret;
}

int ublkml_mirror_set_leg_state(struct ublkml_target *t, int leg, int state)
{
	int ret;

	if (t->kind != UBLKML_TGT_MIRROR || leg < 0 || leg >= t->n_legs ||
	    state < UBLKML_LEG_ACTIVE || state > UBLKML_LEG_FAILED)
		return -EINVAL;
	pthread_mutex_lock(&t->ctl);
	ret = set_leg_state_locked(t, leg, (uint32_t)state);
	pthread_mutex_unlock(&t->ctl);
	return ret;
}

int ublkml_mirror_leg_info(struct ublkml_target *t, int leg,
			   struct ublkml_leg_info *out)
{
	struct leg *lg;

	if (t->kind != UBLKML_TGT_MIRROR || leg < 0 || leg >= t->n_legs)
		return -EINVAL;
	lg = &t->legs[leg];
	memset(out, 0, sizeof(*out));
	out->state = leg_state_of(states_load(t), leg);
	out->dirty_regions = leg_dirty(t, leg);
	out->total_regions = t->n_regions;
	out->reads = __atomic_load_n(&lg->reads, __ATOMIC_RELAXED);
	out->writes = __atomic_load_n(&lg->writes, __ATOMIC_RELAXED);
	out->errors = __atomic_load_n(&lg->errors, __ATOMIC_RELAXED);
	out->probes = __atomic_load_n(&lg->probes, __ATOMIC_RELAXED);
	return 0;
}

int ublkml_mirror_set_probe_every(struct ublkml_target *t, uint32_t n)
{
	if (t->kind != UBLKML_TGT_MIRROR)
		return -EINVAL;
	__atomic_store_n(&t->probe_every, n, __ATOMIC_RELAXED);
	return 0;
}

static int copy_all(int fd_in, int fd_out, char *buf, uint64_t off, uint64_t len)
{
	while (len) {
		ssize_t n = pread(fd_in, buf, len, (off_t)off), m;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		for (ssize_t done = 0; done < n; done += m) {
			m = pwrite(fd_out, buf + done, (size_t)(n - done),
				   (off_t)(off + (uint64_t)done));
			if (m < 0 && errno == EINTR) {
				m = 0;
				continue;
			}
			if (m <= 0)
				return m < 0 ? -errno : -EIO;
		}
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

static int copy_region(struct ublkml_target *t, int src, int dst, uint64_t r,
		       char *buf, uint64_t chunk)
{
	uint64_t off = r << t->region_shift, len, end;
	int ret = 0;

	end = off + (1ull << t->region_shift);
	if (end > t->size)
		end = t->size;
	for (; off < end && !ret; off += len) {
		len = end - off < chunk ? end - off : chunk;
		ret = copy_all(t->legs[src].fd, t->legs[dst].fd, buf, off, len);
	}
	return ret;
}

static int pick_source(struct ublkml_target *t, int leg)
{
	uint32_t active = legs_in(t, states_load(t), UBLKML_LEG_ACTIVE) &
			  ~(1u << leg);

	return active ? __builtin_ctz(active) : -1;
}

/* The resync protocol, per dirty region r of the leg (queue threads raise
 * r_inflight[r] and r_gen[r] before they submit a write to r, and lower
 * r_inflight[r] when the whole request has completed):
 *   skip r while a write to it is in flight; remember its generation;
 *   clear the dirty bit (a writer that marks it again afterwards wins);
 *   copy the region from an ACTIVE leg with pread/pwrite;
 *   if a write to r started meanwhile (generation changed, or one is in
 *   flight), the copy may have overwritten newer data on the leg: mark r
 *   dirty again.  The leg is DEMOTED throughout, so every write that
 *   starts after the copy reaches it too. */
int ublkml_mirror_resync(struct ublkml_target *t, int leg, int max_regions)
{
	struct leg *lg;
	uint64_t rsize, chunk;
	char *buf = NULL;
	uint32_t cur;
	int copied = 0, ret = 0;

	if (t->kind != UBLKML_TGT_MIRROR || leg < 0 || leg >= t->n_legs ||
	    max_regions < 0)
		return -EINVAL;
	lg = &t->legs[leg];
	pthread_mutex_lock(&t->ctl);
	cur = leg_state_of(states_load(t), leg);
	if (cur == UBLKML_LEG_FAILED && max_regions) {
		ret = leg_cas(t, leg, 1u << UBLKML_LEG_FAILED,
			      UBLKML_LEG_DEMOTED, &cur);
		if (ret == 0)
			write_barrier(t);
	}
	pthread_mutex_unlock(&t->ctl);
	if (ret)
		return ret;
	if (cur == UBLKML_LEG_ACTIVE)
		return 0;	/* in sync by definition: it serves reads */
	if (!max_regions || !leg_dirty(t, leg))
		return (int)leg_dirty(t, leg);

	rsize = 1ull << t->region_shift;
	chunk = rsize < (1u << 20) ? rsize : (1u << 20);
	if (posix_memalign((void **)&buf, 4096, chunk))
		return -ENOMEM;
	for (uint64_t r = 0; r < t->n_regions && copied < max_regions; r++) {
		uint32_t gen;
		int src;

		if (!__atomic_load_n(&lg->dirty[r >> 6], __ATOMIC_RELAXED)) {
			r |= 63;	/* a clean word: skip 64 regions */
			continue;
		}
		if (!(__atomic_load_n(&lg->dirty[r >> 6], __ATOMIC_SEQ_CST) &
		      (1ull << (r & 63))))
			continue;
		if (__atomic_load_n(&t->r_inflight[r], __ATOMIC_SEQ_CST))
			continue;	/* busy: a later call takes it */
		gen = __atomic_load_n(&t->r_gen[r], __ATOMIC_SEQ_CST);
		/* A server killed between here and the end of the copy
		 * leaves resync_at in the journal: the next one redoes r. */
		__atomic_store_n(&t->resync_at[leg], (uint32_t)(r + 1),
				 __ATOMIC_SEQ_CST);
		if (!dirty_clear(lg, r)) {
			__atomic_store_n(&t->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			continue;
		}
		if (__atomic_load_n(&t->r_inflight[r], __ATOMIC_SEQ_CST) ||
		    __atomic_load_n(&t->r_gen[r], __ATOMIC_SEQ_CST) != gen) {
			dirty_set(lg, r);
			__atomic_store_n(&t->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			continue;
		}
		src = pick_source(t, leg);
		if (src < 0) {
			dirty_set(lg, r);
			__atomic_store_n(&t->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			ret = -EBUSY;	/* no ACTIVE leg to copy from */
			break;
		}
		ret = copy_region(t, src, leg, r, buf, chunk);
		if (ret) {
			dirty_set(lg, r);
			__atomic_store_n(&t->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			__atomic_fetch_add(&lg->errors, 1, __ATOMIC_RELAXED);
			break;
		}
		if (__atomic_load_n(&t->r_gen[r], __ATOMIC_SEQ_CST) != gen ||
		    __atomic_load_n(&t->r_inflight[r], __ATOMIC_SEQ_CST) ||
		    leg_state_of(states_load(t), src) != UBLKML_LEG_ACTIVE)
			dirty_set(lg, r);	/* raced with a write: again later */
		else
			copied++;
		__atomic_store_n(&t->resync_at[leg], 0, __ATOMIC_SEQ_CST);
	}
	free(buf);
	if (ret)
		return ret;
	if (copied && fdatasync(lg->fd) < 0 && errno != EINVAL)
		return -errno;
	return (int)leg_dirty(t, leg);
}

/* ---- queues ------------------------------------------------------------ */

/* user_data of target I/O: bit 63, then what the CQE finishes. */
#define UD_KIND_SHIFT	24
#define UD_LEG_SHIFT	16
enum {
	KIND_IO = 0,		/* a leg I/O of a request (tag) */
	KIND_DELAY = 1,		/* the injected delay of a leg I/O ended */
	KIND_PROBE = 2,		/* a health probe (probe slot) */
	KIND_PROBE_DELAY = 3,
	KIND_RELAY = 4,		/* a relay worker handed a batch back */
};

static uint64_t tgt_ud(uint32_t kind, uint32_t leg, uint32_t idx)
{
	return TGT_IO_BIT | (uint64_t)kind << UD_KIND_SHIFT |
	       (uint64_t)leg << UD_LEG_SHIFT | idx;
}

/* Per-tag state of a request in progress. */
struct tag_state {
	uint64_t off;		/* backing offset of the request */
	uint32_t len;		/* bytes of the request */
	uint8_t op;
	uint8_t fua;
	/* mirror */
	uint8_t pending;	/* leg I/Os not finished yet */
	uint8_t tried;		/* reads: legs that failed it */
	uint8_t active;		/* writes: ACTIVE legs when submitted */
	uint8_t ok_active;	/* writes: ACTIVE legs that succeeded */
	uint8_t must_fail;	/* a failed leg could not be failed */
	uint8_t epoch;		/* write epoch joined */
	uint8_t probed;		/* reads: a health probe went out with it */
	int32_t err;		/* first leg error */
	uint64_t t_start;	/* ns, only when records are on */
};

/* Per-tag, per-leg state of one leg I/O (loop, null and mem use leg 0). */
struct leg_io {
	uint64_t t_start;	/* ns, when records or a fault are on */
	uint32_t done;		/* bytes moved so far (short I/O resubmits) */
	int32_t res;		/* result held while an injected delay runs */
	uint8_t zero_fallback;	/* 0: fallocate, 1: punch, 2: writing zeros */
	struct __kernel_timespec ts;	/* read by the kernel at submit time */
};

/* A fault as one queue sees it: a copy, refreshed when the slot's sequence
 * moves, plus this queue's own PRNG (deterministic per seed and queue). */
struct qfault {
	uint32_t seq;
	int on;
	struct ublkml_fault f;
	uint64_t t0;
	uint64_t rng;
};

#define PROBE_SLOTS 4

/* A health probe: a copy of a user read sent to a DEMOTED leg.  It has its
 * own buffer and slot because it may outlive the request's tag. */
struct probe {
	uint8_t busy;
	uint8_t leg;
	uint32_t len;
	uint64_t off;
	uint64_t t_start;
	int32_t res;
	struct __kernel_timespec ts;
};

struct ublkml_queue {
	struct io_uring ring;
	struct ublkml_target *t;
	int cdev_fd;			/* < 0: harness */
	int fixed_cdev;			/* registered-file index, or -1 */
	int fixed_backing;		/* index of leg 0; legs follow */
	uint16_t q_id;
	uint16_t depth;
	uint32_t buf_size;
	uint32_t op_fetch;
	uint32_t op_commit;
	struct ublksrv_io_desc *iods;
	size_t iods_len;
	int iods_borrowed;	/* mapped by the parent of a queue process */
	char *bufs;
	struct tag_state *ts;
	int n_paths;			/* leg_io entries per tag */
	struct leg_io *lio;
	int cmd_inflight;
	int tgt_inflight;
	int stopping;
	uint64_t spin_ns;		/* hybrid polling budget, 0 = always sleep */
	/* event targets: requests reaped but not yet handed out */
	struct ublkml_event *pending;
	int n_pending;
	/* harness: results recorded instead of committed */
	struct ublkml_event *harvest;
	int n_harvest;
	struct ublkml_queue_stats st;
	/* completion records (SPSC: the queue thread produces) */
	struct ublkml_completion *rec;
	uint32_t rec_mask;
	uint64_t rec_head;		/* producer: next slot to write */
	uint64_t rec_tail;		/* consumer: next slot to read */
	uint64_t rec_dropped;
	struct ublkml_path_summary *sums;	/* [UBLKML_MAX_LEGS] or NULL */
	/* faults and mirror */
	struct qfault qf[UBLKML_MAX_LEGS];
	uint32_t read_rr;		/* round robin over ACTIVE legs */
	uint32_t reads_seen;		/* for probes: every Nth read */
	struct probe probes[PROBE_SLOTS];
	char *probe_bufs;
	/* event targets with a plug-in timeout (see "event targets: the
	 * relay"): the workers' rendezvous, and each tag's buffer (a tag whose
	 * plug-in call hung gets a fresh one) */
	struct relay *relay;
	char **tag_buf;
};

static void queue_free_rest(struct ublkml_queue *q);
static int relay_detach(struct ublkml_queue *q);
static void relay_cqe(struct ublkml_queue *q);

static size_t round_up(size_t v, size_t a)
{
	return (v + a - 1) / a * a;
}

static struct leg_io *lio(struct ublkml_queue *q, uint16_t tag, int leg)
{
	return &q->lio[(size_t)tag * (size_t)q->n_paths + (size_t)leg];
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
		q->iods = calloc(depth, sizeof(struct ublksrv_io_desc));
		q->harvest = calloc(depth, sizeof(struct ublkml_event));
		if (!q->iods || !q->harvest) {
			ret = -ENOMEM;
			goto fail;
		}
	}

	if (posix_memalign((void **)&q->bufs, page, (size_t)depth * buf_size)) {
		q->bufs = NULL;
		ret = -ENOMEM;
		goto fail;
	}
	if (t->kind == UBLKML_TGT_MIRROR &&
	    posix_memalign((void **)&q->probe_bufs, page,
			   (size_t)PROBE_SLOTS * buf_size)) {
		q->probe_bufs = NULL;
		ret = -ENOMEM;
		goto fail;
	}
	q->ts = calloc(depth, sizeof(*q->ts));
	q->lio = calloc((size_t)depth * (size_t)q->n_paths, sizeof(*q->lio));
	q->pending = calloc(depth, sizeof(struct ublkml_event));
	if (!q->ts || !q->lio || !q->pending) {
		ret = -ENOMEM;
		goto fail;
	}

	/* Room for one ublk command per tag, plus one I/O and one delay timer
	 * per leg per tag, plus probes.  CLAMP: deep mirrors may ask for more
	 * than the kernel's maximum; a full SQ is drained, see get_sqe(). */
	sq_entries = (unsigned)depth * (1u + (unsigned)q->n_paths);
	cq_entries = 2u * sq_entries + 2u * PROBE_SLOTS;
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
	if (q->iods) {
		if (q->iods_borrowed)
			;	/* its owner unmaps it */
		else if (q->cdev_fd >= 0)
			munmap(q->iods, q->iods_len);
		else
			free(q->iods);
		q->iods = NULL;
	}
	/* Relay workers may still run (a plug-in call that never returned):
	 * the last one to leave frees the rest, buffers included. */
	if (q->relay && relay_detach(q))
		return;
	queue_free_rest(q);
}

void ublkml_queue_set_spin(struct ublkml_queue *q, uint32_t spin_usec)
{
	q->spin_ns = (uint64_t)spin_usec * 1000u;
}

void *ublkml_queue_buf(struct ublkml_queue *q, uint16_t tag)
{
	if (q->tag_buf)		/* relayed event targets only */
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

static struct io_uring_sqe *get_sqe(struct ublkml_queue *q)
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
 * health probe (path = leg), into the summaries and/or the record ring. */
static void record(struct ublkml_queue *q, uint16_t tag, uint8_t path,
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

/* The answer to one request: commit it (or record it, in the harness). */
static void complete_io(struct ublkml_queue *q, uint16_t tag, int32_t res)
{
	if (res < 0) {
		const struct ublksrv_io_desc *iod = &q->iods[tag];

		q->st.errors++;
		q->st.last_error = res;
		q->st.last_error_op = iod->op_flags & 0xff;
		q->st.last_error_offset = iod->start_sector << SECTOR_SHIFT;
	}
	if ((q->rec || q->sums) && q->t->kind != UBLKML_TGT_MIRROR) {
		const struct ublksrv_io_desc *iod = &q->iods[tag];

		record(q, tag, 0, iod->op_flags & 0xff,
		       iod->start_sector << SECTOR_SHIFT,
		       iod->nr_sectors << SECTOR_SHIFT, res, q->ts[tag].t_start, 0);
	}
	if (q->cdev_fd < 0) {
		struct ublkml_event *e = &q->harvest[q->n_harvest++];

		e->tag = tag;
		e->result = res;
		return;
	}
	if (queue_io_cmd(q, tag, q->op_commit, res) < 0)
		q->st.errors++;
}

/* ---- faults: the queue side ------------------------------------------------
 *
 * Cost when no fault is set: one acquire load of the path's sequence number
 * per leg I/O (a shared, read-mostly cache line).  Delays never sleep the
 * queue thread: the leg I/O's result is held and an IORING_OP_TIMEOUT is
 * armed on the ring; its CQE finishes the leg I/O. */

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t xorshift64s(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dull;
}

static struct qfault *fault_get(struct ublkml_queue *q, int path)
{
	const struct fault_slot *s = &q->t->faults[path];
	struct qfault *c = &q->qf[path];

	if (__atomic_load_n(&s->seq, __ATOMIC_ACQUIRE) != c->seq) {
		struct fault_data d;
		uint64_t x;

		if (fault_try_read(s, &d, &c->seq))
			return c->on ? c : NULL;	/* the old copy, this once */
		c->on = (int)d.on;
		c->f = d.f;
		c->t0 = d.t0;
		/* Re-seeded at every set: the error sequence of a queue
		 * depends only on the seed and that queue's I/O sequence. */
		x = d.f.seed ^ (0x9e3779b97f4a7c15ull * (q->q_id + 1ull));
		c->rng = splitmix64(&x) | 1;
	}
	return c->on ? c : NULL;
}

/* The schedule's intensity now, 0..1. */
static double fault_level(const struct qfault *c, uint64_t now)
{
	uint64_t el = now > c->t0 ? now - c->t0 : 0;

	switch (c->f.mode) {
	case UBLKML_FAULT_BURST: {
		uint64_t per = (uint64_t)c->f.burst_period_ms * 1000000ull;
		uint64_t on = (uint64_t)c->f.burst_on_ms * 1000000ull;

		return per && el % per >= on ? 0.0 : 1.0;
	}
	case UBLKML_FAULT_RAMP: {
		uint64_t ramp = (uint64_t)c->f.ramp_ms * 1000000ull;

		return !ramp || el >= ramp ? 1.0 : (double)el / (double)ramp;
	}
	default:
		return 1.0;
	}
}

/* 0, or the -errno this leg I/O must fail with instead of being issued. */
static int fault_error(struct ublkml_queue *q, int path, uint8_t op)
{
	struct qfault *c = fault_get(q, path);
	uint64_t draw;

	if (!c || !c->f.err_ppm)
		return 0;
	if (c->f.err_ops && (op >= 32 || !(c->f.err_ops & (1u << op))))
		return 0;
	/* Drawn for every eligible I/O, whatever the intensity, so that the
	 * sequence does not depend on timing. */
	draw = xorshift64s(&c->rng) % 1000000u;
	if ((double)draw < (double)c->f.err_ppm * fault_level(c, now_ns()))
		return -c->f.err_errno;
	return 0;
}

/* ns to add to an I/O of the path that took service_ns. */
static uint64_t fault_extra_ns(struct ublkml_queue *q, int path,
			       uint64_t service_ns, uint64_t now)
{
	struct qfault *c = fault_get(q, path);
	double lvl, extra;

	if (!c)
		return 0;
	lvl = fault_level(c, now);
	extra = lvl * ((double)c->f.delay_us * 1000.0 +
		       (double)(c->f.slow_x1000 - 1000) / 1000.0 *
		       (double)service_ns);
	return extra > 0 ? (uint64_t)extra : 0;
}

static int arm_delay(struct ublkml_queue *q, struct __kernel_timespec *ts,
		     uint64_t ns, uint64_t ud)
{
	struct io_uring_sqe *sqe = get_sqe(q);

	if (!sqe)
		return -EBUSY;
	ts->tv_sec = (long long)(ns / 1000000000ull);
	ts->tv_nsec = (long long)(ns % 1000000000ull);
	io_uring_prep_timeout(sqe, ts, 0, 0);
	io_uring_sqe_set_data64(sqe, ud);
	q->tgt_inflight++;
	return 0;
}

/* ---- leg I/O: the loop target's logic, per leg -----------------------------
 *
 * A request of the loop target is one leg I/O on leg 0; a mirror request is
 * one (read) or several (write, flush, discard, write-zeroes) leg I/Os; null
 * and mem answer at once but pass through leg_io_done() when a fault is set
 * so that delays apply to them too.  Every leg I/O ends in leg_finish(). */

static void mirror_leg_finish(struct ublkml_queue *q, uint16_t tag, int leg,
			      int res);

static void leg_finish(struct ublkml_queue *q, uint16_t tag, int leg, int res)
{
	if (q->t->kind == UBLKML_TGT_MIRROR)
		mirror_leg_finish(q, tag, leg, res);
	else
		complete_io(q, tag, res);
}

/* The leg I/O's final result is known: add the path's injected delay. */
static void leg_io_done(struct ublkml_queue *q, uint16_t tag, int leg, int res)
{
	struct leg_io *l = lio(q, tag, leg);

	if (fault_get(q, leg)) {
		uint64_t now = now_ns();
		uint64_t extra = fault_extra_ns(q, leg, l->t_start && now > l->t_start ?
						now - l->t_start : 0, now);

		l->res = res;
		if (extra >= 1000 &&
		    arm_delay(q, &l->ts, extra, tgt_ud(KIND_DELAY, (uint32_t)leg, tag)) == 0)
			return;
	}
	leg_finish(q, tag, leg, res);
}

static int leg_fd(struct ublkml_queue *q, int leg)
{
	return q->fixed_backing >= 0 ? q->fixed_backing + leg : q->t->legs[leg].fd;
}

static void tgt_prep_done(struct ublkml_queue *q, struct io_uring_sqe *sqe,
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
	const struct leg *lg = &q->t->legs[leg];
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
	tgt_prep_done(q, sqe, tgt_ud(KIND_IO, (uint32_t)leg, tag));
	return 0;
}

/* Start one leg I/O of the request in tag (it ends in leg_finish, maybe
 * before this returns). */
static void leg_start(struct ublkml_queue *q, uint16_t tag, int leg)
{
	struct leg_io *l = lio(q, tag, leg);
	int ret, sync_res = 0;

	l->done = 0;
	l->zero_fallback = 0;
	l->t_start = q->rec || q->sums || fault_get(q, leg) ? now_ns() : 0;
	ret = fault_error(q, leg, q->ts[tag].op);
	if (ret) {
		leg_io_done(q, tag, leg, ret);	/* injected: never issued */
		return;
	}
	ret = leg_submit(q, tag, leg, &sync_res);
	if (ret == 1)
		leg_io_done(q, tag, leg, sync_res);
	else if (ret < 0)
		leg_io_done(q, tag, leg, ret);
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

/* The CQE of a leg I/O's backing operation. */
static void leg_cqe(struct ublkml_queue *q, uint16_t tag, int leg, int res)
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
	leg_io_done(q, tag, leg, res);
}

/* null and mem: the answer is known now; a fault may still delay it. */
static void answer_now(struct ublkml_queue *q, uint16_t tag, int res)
{
	if (!fault_get(q, 0)) {
		complete_io(q, tag, res);
		return;
	}
	lio(q, tag, 0)->t_start = now_ns();
	leg_io_done(q, tag, 0, res);
}

/* ---- mirror: the data path ---------------------------------------------------
 *
 * Reads go to one ACTIVE leg, round robin per queue; a failed leg read is
 * retried on another ACTIVE leg and the failing leg becomes FAILED, so the
 * user sees an error only when no good leg is left.  Writes, flushes,
 * discards and write-zeroes go to every ACTIVE and DEMOTED leg; the request
 * succeeds when an ACTIVE leg did and no failing leg had to stay ACTIVE.
 * A failing leg becomes FAILED and its regions dirty; FAILED legs get no
 * I/O, only dirty bits.  Each leg I/O (and each probe) makes one completion
 * record with path = leg, so the scorer sees every leg, writes included. */

static int pick_leg(uint32_t mask, uint32_t n)
{
	n %= (uint32_t)__builtin_popcount(mask);
	while (n--)
		mask &= mask - 1;
	return __builtin_ctz(mask);
}

static void probe_finish(struct ublkml_queue *q, int slot, int res)
{
	struct probe *p = &q->probes[slot];
	struct leg *lg = &q->t->legs[p->leg];

	__atomic_fetch_add(&lg->probes, 1, __ATOMIC_RELAXED);
	if (res < 0)
		__atomic_fetch_add(&lg->errors, 1, __ATOMIC_RELAXED);
	if (q->rec || q->sums)
		record(q, UBLKML_PROBE_TAG, p->leg, UBLK_IO_OP_READ, p->off,
		       p->len, res, p->t_start, 0);
	p->busy = 0;
}

static void probe_done(struct ublkml_queue *q, int slot, int res)
{
	struct probe *p = &q->probes[slot];

	if (fault_get(q, p->leg)) {
		uint64_t now = now_ns();
		uint64_t extra = fault_extra_ns(q, p->leg, p->t_start && now > p->t_start ?
						now - p->t_start : 0, now);

		p->res = res;
		if (extra >= 1000 &&
		    arm_delay(q, &p->ts, extra,
			      tgt_ud(KIND_PROBE_DELAY, p->leg, (uint32_t)slot)) == 0)
			return;
	}
	probe_finish(q, slot, res);
}

/* Every Nth user read also goes to a DEMOTED leg; nobody waits for it.
 * Returns 1 when a probe went out (queued with the user read: its record is
 * flagged UBLKML_REC_PROBED, see mirror_leg_finish). */
static int maybe_probe(struct ublkml_queue *q, uint32_t demoted, uint64_t off,
		       uint32_t len)
{
	struct ublkml_target *t = q->t;
	uint32_t every = __atomic_load_n(&t->probe_every, __ATOMIC_RELAXED);
	struct io_uring_sqe *sqe;
	struct probe *p = NULL;
	int slot, leg, err;

	if (!demoted || !every || ++q->reads_seen % every)
		return 0;
	for (slot = 0; slot < PROBE_SLOTS; slot++) {
		if (!q->probes[slot].busy) {
			p = &q->probes[slot];
			break;
		}
	}
	if (!p)
		return 0;	/* all busy: a slow leg is not probed harder */
	leg = pick_leg(demoted, q->reads_seen / every);
	p->busy = 1;
	p->leg = (uint8_t)leg;
	p->off = off;
	p->len = len < q->buf_size ? len : q->buf_size;
	p->t_start = now_ns();
	err = fault_error(q, leg, UBLK_IO_OP_READ);
	if (err) {
		probe_done(q, slot, err);
		return 0;
	}
	sqe = get_sqe(q);
	if (!sqe) {
		p->busy = 0;
		return 0;
	}
	io_uring_prep_read(sqe, leg_fd(q, leg),
			   q->probe_bufs + (size_t)slot * q->buf_size, p->len, off);
	tgt_prep_done(q, sqe, tgt_ud(KIND_PROBE, (uint32_t)leg, (uint32_t)slot));
	return 1;
}

static void regions_begin(struct ublkml_target *t, struct tag_state *s)
{
	uint64_t last = (s->off + s->len - 1) >> t->region_shift;

	for (uint64_t r = s->off >> t->region_shift; r <= last; r++) {
		__atomic_fetch_add(&t->r_inflight[r], 1, __ATOMIC_SEQ_CST);
		__atomic_fetch_add(&t->r_gen[r], 1, __ATOMIC_SEQ_CST);
	}
}

static void regions_end(struct ublkml_target *t, struct tag_state *s)
{
	uint64_t last = (s->off + s->len - 1) >> t->region_shift;

	for (uint64_t r = s->off >> t->region_shift; r <= last; r++)
		__atomic_fetch_sub(&t->r_inflight[r], 1, __ATOMIC_SEQ_CST);
}

static int modifies(uint8_t op)
{
	return op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_DISCARD ||
	       op == UBLK_IO_OP_WRITE_ZEROES;
}

static void mirror_request(struct ublkml_queue *q, uint16_t tag)
{
	struct ublkml_target *t = q->t;
	struct tag_state *s = &q->ts[tag];
	uint32_t states, active, writes;

	switch (s->op) {
	case UBLK_IO_OP_READ:
		states = states_load(t);
		active = legs_in(t, states, UBLKML_LEG_ACTIVE);
		s->tried = 0;
		s->pending = 1;
		if (!active) {	/* cannot happen: the last ACTIVE leg stays */
			complete_io(q, tag, -EIO);
			return;
		}
		s->probed = (uint8_t)maybe_probe(q, legs_in(t, states, UBLKML_LEG_DEMOTED),
						 s->off, s->len);
		leg_start(q, tag, pick_leg(active, q->read_rr++));
		return;
	case UBLK_IO_OP_WRITE:
	case UBLK_IO_OP_FLUSH:
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		break;
	default:
		complete_io(q, tag, -EOPNOTSUPP);
		return;
	}
	if (modifies(s->op)) {
		/* Order matters (see write_barrier and the resync protocol):
		 * announce the write to its regions and join the epoch, then
		 * read the leg states, then mark the FAILED legs dirty. */
		regions_begin(t, s);
		s->epoch = __atomic_load_n(&t->w_epoch, __ATOMIC_SEQ_CST) & 1;
		__atomic_fetch_add(&t->w_active[s->epoch], 1, __ATOMIC_SEQ_CST);
	}
	states = states_load(t);
	active = legs_in(t, states, UBLKML_LEG_ACTIVE);
	writes = active | legs_in(t, states, UBLKML_LEG_DEMOTED);
	if (modifies(s->op))
		for (int i = 0; i < t->n_legs; i++)
			if (!(writes & (1u << i)))
				dirty_range(t, i, s->off, s->len);
	s->active = (uint8_t)active;
	s->ok_active = 0;
	s->must_fail = 0;
	s->err = 0;
	/* Set before the first leg starts: a leg may finish synchronously. */
	s->pending = (uint8_t)__builtin_popcount(writes);
	while (writes) {
		int leg = __builtin_ctz(writes);

		writes &= writes - 1;
		leg_start(q, tag, leg);
	}
}

static void mirror_leg_finish(struct ublkml_queue *q, uint16_t tag, int leg,
			      int res)
{
	struct ublkml_target *t = q->t;
	struct tag_state *s = &q->ts[tag];
	struct leg *lg = &t->legs[leg];
	int want = s->op == UBLK_IO_OP_READ || s->op == UBLK_IO_OP_WRITE ?
		   (int)s->len : 0;
	uint32_t was;

	if (q->rec || q->sums)
		record(q, tag, (uint8_t)leg, s->op, s->off, s->len, res,
		       lio(q, tag, leg)->t_start,
		       s->op == UBLK_IO_OP_READ && s->probed ? UBLKML_REC_PROBED : 0);
	if (s->op == UBLK_IO_OP_READ) {
		uint32_t others;

		__atomic_fetch_add(&lg->reads, 1, __ATOMIC_RELAXED);
		if (res == want) {
			complete_io(q, tag, res);
			return;
		}
		__atomic_fetch_add(&lg->errors, 1, __ATOMIC_RELAXED);
		s->tried |= (uint8_t)(1u << leg);
		/* Like md's read-error repair: the region is rewritten from a
		 * good leg by the next resync. */
		if (leg_cas(t, leg, ANY_LEG_STATE, UBLKML_LEG_FAILED, &was) == 0 &&
		    was != UBLKML_LEG_FAILED)
			dirty_range(t, leg, s->off, s->len);
		others = legs_in(t, states_load(t), UBLKML_LEG_ACTIVE) & ~s->tried;
		if (others) {
			leg_start(q, tag, pick_leg(others, q->read_rr++));
			return;
		}
		complete_io(q, tag, res < 0 ? res : -EIO);
		return;
	}

	__atomic_fetch_add(&lg->writes, 1, __ATOMIC_RELAXED);
	if (res != want) {
		__atomic_fetch_add(&lg->errors, 1, __ATOMIC_RELAXED);
		/* Dirty first, FAILED second: a promotion that checks the
		 * dirty count in between still sees the leg end FAILED. */
		if (modifies(s->op))
			dirty_range(t, leg, s->off, s->len);
		else	/* a failed flush may have lost any earlier write */
			dirty_range(t, leg, 0, t->size);
		if (leg_cas(t, leg, ANY_LEG_STATE, UBLKML_LEG_FAILED, NULL) < 0) {
			/* The last ACTIVE leg failed it: the request fails, so
			 * the range is undefined anyway, and dirty bits on a
			 * leg that stays ACTIVE would only block promotions. */
			s->must_fail = 1;
			dirty_clear_range(t, leg, s->op == UBLK_IO_OP_FLUSH ? 0 : s->off,
					  s->op == UBLK_IO_OP_FLUSH ? t->size : s->len);
		}
		if (!s->err)
			s->err = res < 0 ? res : -EIO;
	} else if (s->active & (1u << leg)) {
		s->ok_active++;
	}
	if (--s->pending)
		return;
	if (modifies(s->op)) {
		regions_end(t, s);
		__atomic_fetch_sub(&t->w_active[s->epoch], 1, __ATOMIC_SEQ_CST);
	}
	complete_io(q, tag, s->ok_active && !s->must_fail ? want :
			    (s->err ? s->err : -EIO));
}

/* ---- requests ------------------------------------------------------------ */

/* One request arrived in tag's descriptor: hand it to the target. */
static void handle_request(struct ublkml_queue *q, uint16_t tag)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	struct ublkml_target *t = q->t;
	struct tag_state *s = &q->ts[tag];
	uint8_t op = iod->op_flags & 0xff;
	uint64_t off = iod->start_sector << SECTOR_SHIFT;
	uint32_t len = iod->nr_sectors << SECTOR_SHIFT;
	char *buf = ublkml_queue_buf(q, tag);
	int err;

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

	switch (t->kind) {
	case UBLKML_TGT_NULL:
	case UBLKML_TGT_MEM:
		err = fault_error(q, 0, op);
		if (err) {
			answer_now(q, tag, err);	/* injected: nothing done */
			return;
		}
		switch (op) {
		case UBLK_IO_OP_READ:
			if (t->mem)
				memcpy(buf, t->mem + off, len);
			answer_now(q, tag, (int32_t)len);
			return;
		case UBLK_IO_OP_WRITE:
			if (t->mem)
				memcpy(t->mem + off, buf, len);
			answer_now(q, tag, (int32_t)len);
			return;
		case UBLK_IO_OP_FLUSH:
			answer_now(q, tag, 0);
			return;
		case UBLK_IO_OP_DISCARD:
		case UBLK_IO_OP_WRITE_ZEROES:
			if (t->mem)
				memset(t->mem + off, 0, len);
			answer_now(q, tag, 0);
			return;
		}
		break;
	case UBLKML_TGT_LOOP:
		leg_start(q, tag, 0);
		return;
	case UBLKML_TGT_MIRROR:
		mirror_request(q, tag);
		return;
	case UBLKML_TGT_EVENTS: {
		struct ublkml_event *e = &q->pending[q->n_pending++];

		e->tag = tag;
		e->op = op;
		e->op_flags = iod->op_flags;
		e->nr_sectors = iod->nr_sectors;
		e->start_sector = iod->start_sector;
		e->result = -EIO;
		return;
	}
	}
	complete_io(q, tag, -EOPNOTSUPP);
}

static void handle_cqe(struct ublkml_queue *q, const struct io_uring_cqe *cqe)
{
	uint64_t ud = cqe->user_data;
	uint16_t tag = (uint16_t)(ud & 0xffff);

	if (ud & TGT_IO_BIT) {
		int leg = (int)((ud >> UD_LEG_SHIFT) & 0xff);

		switch ((ud >> UD_KIND_SHIFT) & 0xff) {
		case KIND_IO:
			leg_cqe(q, tag, leg, cqe->res);
			break;
		case KIND_DELAY:	/* res is -ETIME: the timer ran out */
			q->tgt_inflight--;
			leg_finish(q, tag, leg, lio(q, tag, leg)->res);
			break;
		case KIND_PROBE:
			q->tgt_inflight--;
			probe_done(q, tag, cqe->res);
			break;
		case KIND_PROBE_DELAY:
			q->tgt_inflight--;
			probe_finish(q, tag, q->probes[tag].res);
			break;
		case KIND_RELAY:
			relay_cqe(q);
			break;
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
static int queue_done(const struct ublkml_queue *q)
{
	return q->stopping && q->cmd_inflight == 0 && q->tgt_inflight == 0;
}

static int ring_error(int ret)
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
static int process_batch(struct ublkml_queue *q)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;
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
	io_uring_for_each_cqe(&q->ring, head, cqe) {
		handle_cqe(q, cqe);
		n++;
	}
	io_uring_cq_advance(&q->ring, n);
	if (n)
		q->st.batches++;
	return (int)n;
}

int ublkml_queue_run(struct ublkml_queue *q)
{
	int ret;

	if (q->t->kind == UBLKML_TGT_EVENTS || q->cdev_fd < 0)
		return -EINVAL;
	while (!queue_done(q)) {
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Move up to max events from the front of a list into out. */
static int take_events(struct ublkml_event *list, int *count,
		       struct ublkml_event *out, int max)
{
	int n = *count < max ? *count : max;

	memcpy(out, list, (size_t)n * sizeof(*out));
	*count -= n;
	if (*count)
		memmove(list, list + n, (size_t)*count * sizeof(*out));
	return n;
}

int ublkml_queue_commit_and_wait(struct ublkml_queue *q,
				 struct ublkml_event *evs, int n_done, int max)
{
	int ret;

	if (q->t->kind != UBLKML_TGT_EVENTS || q->cdev_fd < 0 || max <= 0)
		return -EINVAL;
	for (int i = 0; i < n_done; i++)
		complete_io(q, evs[i].tag, evs[i].result);
	while (q->n_pending == 0) {
		if (queue_done(q)) {
			io_uring_submit(&q->ring);
			return -ENODEV;
		}
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return take_events(q->pending, &q->n_pending, evs, max);
}

int ublkml_queue_inject(struct ublkml_queue *q, uint16_t tag, uint32_t op_flags,
			uint64_t start_sector, uint32_t nr_sectors)
{
	struct ublksrv_io_desc *iod;

	if (q->cdev_fd >= 0 || tag >= q->depth ||
	    (q->t->kind == UBLKML_TGT_EVENTS && !q->relay))
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
	while (q->n_harvest == 0 && q->tgt_inflight > 0) {
		ret = process_batch(q);
		if (ret < 0)
			return ret;
	}
	return take_events(q->harvest, &q->n_harvest, out, max);
}

/* ---- event targets: the relay ----------------------------------------------
 *
 * A plug-in method may never return.  Only the thread that fetched a queue's
 * tags may commit them (and the ring is SINGLE_ISSUER), so if plug-in calls
 * ran on that thread a hung call would stall the whole queue.  With a
 * timeout the work is split:
 *
 *   - the ring thread (ublkml_queue_relay) keeps the ring: it reaps
 *     requests, posts them as a batch, commits the answers;
 *   - workers (Python threads in ublkml_relay_next) take a batch, call the
 *     plug-in per event, write each result into their own event array and
 *     hand the answers back and wake the ring thread if it sleeps (see
 *     relay_wait: on a condition variable while a batch is out and its
 *     holder is fresh, else in the ring, woken by an eventfd read).
 *
 * Normally one batch is out at a time, so a queue's plug-in calls run one
 * after the other, as without a relay.  The ring thread watches the
 * answered prefix of every worker's array (a worker answers in order):
 *
 *   - stalled: a worker's prefix has not grown for stall_ns while requests
 *     wait.  The next batch (new requests only) goes to an idle worker, so a
 *     slow call delays only the requests batched with it.  Calls of one
 *     queue may then run at once on two threads (as they do for a plug-in
 *     with several queues).
 *   - hung: no growth for timeout_ns.  The worker is given up ("fired"): the
 *     event it is stuck on fails with -ETIMEDOUT and its tag gets a fresh
 *     buffer (the hung call keeps the old one, so whatever it does with it
 *     when, if ever, it returns cannot touch a later request's data); the
 *     events after it are cancelled in the worker's array (op =
 *     UBLKML_OP_CANCELLED: the handler skips them) and go back to the front
 *     of the pending list.  The next note tells a worker (the Python side
 *     logs which method hung).  A fired worker that comes back learns it
 *     (came_back), its retired buffers are freed, and it serves again.
 *
 * A worker that takes a batch and leaves no idle worker behind is asked to
 * start a spare (note.spawn), up to 2 + max_stuck workers.
 *
 * Race left open: the worker reads an event's op after storing the previous
 * result; the ring thread cancels, fences, then re-reads the results.  A
 * worker whose hung call returns within the same nanoseconds may serve the
 * next event while it is also re-posted (a write may then be applied
 * twice).  Closing it would take an atomic claim per I/O from Python, a C
 * call per I/O.
 */

struct ublkml_relay_worker {
	struct ublkml_queue *q;
	/* under the relay's mu */
	struct ublkml_event *evs;	/* the batch it holds, or NULL */
	int n;
	int fired;			/* given up: its answers are not wanted */
	int seen;			/* answered prefix at t_seen */
	uint64_t t_seen;
	uint64_t t_taken;
	int came_back;
	uint64_t late_ns;
	uint32_t buf_gen;		/* tag buffers as it last saw them */
	char **retired;			/* buffers its hung call may still use */
	int n_retired;
	struct ublkml_relay_worker *next;
};

struct relay {
	pthread_mutex_t mu;
	pthread_cond_t cv;		/* idle workers wait for a batch */
	pthread_cond_t ans_cv;		/* the ring thread waits for answers */
	int efd;			/* workers -> ring thread asleep in the ring */
	uint64_t efd_val;
	int efd_armed;			/* ring thread only */
	int fresh;			/* ring thread only: see relay_wait */
	uint64_t timeout_ns;
	uint64_t stall_ns;
	uint64_t poll_ns;
	int max_stuck;
	struct ublkml_event *done, *back;	/* ring thread's scratch */
	/* everything below: under mu */
	struct ublkml_event *batch;	/* posted, not taken yet */
	int n_batch;
	int posted;
	uint64_t t_posted;
	struct ublkml_event *ans;	/* answers handed back, not committed */
	int n_ans;
	int n_holding;			/* workers holding a batch */
	int ring_waiting;		/* on ans_cv */
	int ring_sleeping;		/* in the ring */
	int closing;			/* workers leave */
	int dead;			/* queue freed: the last worker frees it */
	int n_workers, n_idle, n_stuck;
	int spawning;			/* spares asked for, not joined yet */
	uint32_t buf_gen;
	uint64_t timeouts, late, unserved;
	uint32_t unreported;		/* timeouts no note has reported yet */
	struct ublkml_event last;	/* the last event failed by the timeout */
	uint64_t last_stuck_ns;
	struct ublkml_relay_worker *workers;
	/* harness: requests fed while the relay runs (ublkml_queue_relay_feed) */
	struct ublkml_event *inbox;
	int n_inbox;
	int feeding;			/* more may come: do not finish */
};

static int in_bufs(const struct ublkml_queue *q, const char *p)
{
	return p >= q->bufs && p < q->bufs + (size_t)q->depth * q->buf_size;
}

static void free_retired(struct ublkml_queue *q, struct ublkml_relay_worker *w)
{
	for (int i = 0; i < w->n_retired; i++)
		if (!in_bufs(q, w->retired[i]))
			free(w->retired[i]);
	free(w->retired);
	w->retired = NULL;
	w->n_retired = 0;
}

int ublkml_queue_relay_init(struct ublkml_queue *q, uint64_t timeout_ns,
			    int max_stuck)
{
	struct relay *r;

	if (q->t->kind != UBLKML_TGT_EVENTS || q->relay || timeout_ns == 0 ||
	    max_stuck < 0)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->batch = calloc(q->depth, sizeof(*r->batch));
	r->done = calloc(q->depth, sizeof(*r->done));
	r->back = calloc(q->depth, sizeof(*r->back));
	r->ans = calloc(q->depth, sizeof(*r->ans));
	r->inbox = calloc(q->depth, sizeof(*r->inbox));
	q->tag_buf = calloc(q->depth, sizeof(*q->tag_buf));
	r->efd = eventfd(0, EFD_CLOEXEC);
	if (!r->batch || !r->done || !r->back || !r->ans || !r->inbox || !q->tag_buf ||
	    r->efd < 0) {
		int ret = r->efd < 0 ? -errno : -ENOMEM;

		if (r->efd >= 0)
			close(r->efd);
		free(r->inbox);
		free(r->batch);
		free(r->done);
		free(r->back);
		free(r->ans);
		free(q->tag_buf);
		q->tag_buf = NULL;
		free(r);
		return ret;
	}
	for (int i = 0; i < q->depth; i++)
		q->tag_buf[i] = q->bufs + (size_t)i * q->buf_size;
	pthread_mutex_init(&r->mu, NULL);
	pthread_cond_init(&r->cv, NULL);
	{
		pthread_condattr_t a;

		pthread_condattr_init(&a);
		pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
		pthread_cond_init(&r->ans_cv, &a);
		pthread_condattr_destroy(&a);
	}
	r->timeout_ns = timeout_ns;
	/* A call that has not returned after stall_ns no longer holds up new
	 * requests; one that has not after timeout_ns fails its I/O. */
	r->stall_ns = timeout_ns / 4 < 20000000 ? timeout_ns / 4 : 20000000;
	/* While a batch is out the ring thread looks every poll_ns: a hung
	 * call fails between timeout and timeout + poll. */
	r->poll_ns = timeout_ns / 8;
	if (r->poll_ns > r->stall_ns)
		r->poll_ns = r->stall_ns;
	if (r->poll_ns < 1000000)
		r->poll_ns = 1000000;
	r->max_stuck = max_stuck;
	q->relay = r;
	return 0;
}

/* Queue freed while workers remain (a call that never returned): they are
 * told to leave, and the last one frees the queue's memory.  1: deferred. */
static int relay_detach(struct ublkml_queue *q)
{
	struct relay *r = q->relay;
	int keep;

	pthread_mutex_lock(&r->mu);
	r->dead = 1;
	r->closing = 1;
	keep = r->n_workers > 0;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	return keep;
}

static void relay_free(struct ublkml_queue *q)
{
	struct relay *r = q->relay;

	if (q->tag_buf) {
		for (int i = 0; i < q->depth; i++)
			if (!in_bufs(q, q->tag_buf[i]))
				free(q->tag_buf[i]);
		free(q->tag_buf);
		q->tag_buf = NULL;
	}
	if (!r)
		return;
	while (r->workers) {		/* none left unless never detached */
		struct ublkml_relay_worker *w = r->workers;

		r->workers = w->next;
		free_retired(q, w);
		free(w);
	}
	close(r->efd);
	pthread_cond_destroy(&r->ans_cv);
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->mu);
	free(r->batch);
	free(r->done);
	free(r->back);
	free(r->ans);
	free(r->inbox);
	free(r);
	q->relay = NULL;
}

static void queue_free_rest(struct ublkml_queue *q)
{
	relay_free(q);
	free(q->bufs);
	free(q->probe_bufs);
	free(q->ts);
	free(q->lio);
	free(q->pending);
	free(q->harvest);
	free(q->rec);
	free(q->sums);
	free(q);
}

int ublkml_relay_join(struct ublkml_queue *q, struct ublkml_relay_worker **out)
{
	struct relay *r = q->relay;
	struct ublkml_relay_worker *w;

	if (!r)
		return -EINVAL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->q = q;
	pthread_mutex_lock(&r->mu);
	if (r->closing) {
		pthread_mutex_unlock(&r->mu);
		free(w);
		return -ENODEV;
	}
	w->buf_gen = r->buf_gen;
	w->next = r->workers;
	r->workers = w;
	r->n_workers++;
	if (r->spawning)
		r->spawning--;
	pthread_mutex_unlock(&r->mu);
	*out = w;
	return 0;
}

/* The hung calls not reported yet (under mu). */
static void relay_hangs(struct relay *r, struct ublkml_relay_note *note)
{
	note->stuck = (uint32_t)r->n_stuck;
	note->timeouts = r->timeouts;
	note->late = r->late;
	note->new_timeouts = r->unreported;
	if (r->unreported) {
		note->tag = r->last.tag;
		note->op = r->last.op;
		note->op_flags = r->last.op_flags;
		note->nr_sectors = r->last.nr_sectors;
		note->start_sector = r->last.start_sector;
		note->stuck_ns = r->last_stuck_ns;
		r->unreported = 0;
	}
}

static void relay_note(struct relay *r, struct ublkml_relay_worker *w,
		       struct ublkml_relay_note *note)
{
	memset(note, 0, sizeof(*note));
	note->buf_gen = r->buf_gen;
	w->buf_gen = r->buf_gen;
	note->came_back = (uint32_t)w->came_back;
	note->late_ns = w->late_ns;
	w->came_back = 0;
	relay_hangs(r, note);
}

int ublkml_queue_relay_report(struct ublkml_queue *q,
			      struct ublkml_relay_note *note)
{
	struct relay *r = q->relay;
	int any;

	memset(note, 0, sizeof(*note));
	if (!r)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	any = r->unreported != 0;
	relay_hangs(r, note);
	pthread_mutex_unlock(&r->mu);
	return any;
}

/* Wake the ring thread if it sleeps in the ring (under mu): an eventfd
 * write completes the read it keeps armed there. */
static void relay_kick_ring(struct relay *r)
{
	uint64_t one = 1;

	if (!r->ring_sleeping)
		return;
	r->ring_sleeping = 0;
	/* Cannot block: the counter is far from its limit. */
	if (write(r->efd, &one, sizeof(one)) < 0)
		r->ring_sleeping = 1;	/* unreachable; it polls anyway */
}

/* Wake the ring thread if it waits for answers (under mu): on ans_cv, or
 * in the ring. */
static void relay_kick(struct relay *r)
{
	if (r->ring_waiting) {
		r->ring_waiting = 0;
		pthread_cond_signal(&r->ans_cv);
	}
	relay_kick_ring(r);
}

int ublkml_relay_next(struct ublkml_relay_worker *w, struct ublkml_event *evs,
		      int n_done, int max, struct ublkml_relay_note *note)
{
	struct ublkml_queue *q = w->q;
	struct relay *r = q->relay;
	int n, flags = 0, last;

	if (max < q->depth)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	if (w->evs) {			/* it held a batch */
		if (w->fired) {		/* ... and was given up meanwhile */
			w->fired = 0;
			w->came_back = 1;
			w->late_ns = now_ns() - w->t_taken;
			r->n_stuck--;
			r->late++;
			free_retired(q, w);
		} else {
			n = n_done < w->n ? n_done : w->n;
			for (int i = 0; i < n; i++)
				r->ans[r->n_ans++] = w->evs[i];
			r->n_holding--;
			relay_kick(r);
		}
		w->evs = NULL;
	}
	while (!r->closing && !r->posted) {
		r->n_idle++;
		pthread_cond_wait(&r->cv, &r->mu);
		r->n_idle--;
	}
	if (r->closing) {
		struct ublkml_relay_worker **pp = &r->workers;

		while (*pp != w)
			pp = &(*pp)->next;
		*pp = w->next;
		r->n_workers--;
		last = r->dead && r->n_workers == 0;
		pthread_mutex_unlock(&r->mu);
		free_retired(q, w);
		free(w);
		if (last)
			queue_free_rest(q);
		return -ENODEV;
	}
	n = r->n_batch;
	memcpy(evs, r->batch, (size_t)n * sizeof(*evs));
	for (int i = 0; i < n; i++)
		evs[i].result = UBLKML_RELAY_PENDING;
	w->evs = evs;
	w->n = n;
	w->t_taken = now_ns();
	w->seen = 0;
	w->t_seen = w->t_taken;
	r->posted = 0;
	r->n_holding++;
	if (w->buf_gen != r->buf_gen || r->unreported || w->came_back) {
		relay_note(r, w, note);
		flags = UBLKML_RELAY_NOTE;
	}
	/* No idle worker left behind: ask for a spare (one at a time). */
	if (r->n_idle + r->spawning == 0 &&
	    r->n_workers + r->spawning < 2 + r->max_stuck) {
		if (!flags) {
			relay_note(r, w, note);
			flags = UBLKML_RELAY_NOTE;
		}
		note->spawn = 1;
		r->spawning++;		/* until the spare joins */
	}
	pthread_mutex_unlock(&r->mu);
	return n | flags;
}

int ublkml_queue_relay_stats(struct ublkml_queue *q,
			     struct ublkml_relay_stats *out)
{
	struct relay *r = q->relay;

	memset(out, 0, sizeof(*out));
	if (!r)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	out->timeouts = r->timeouts;
	out->late = r->late;
	out->unserved = r->unserved;
	out->stuck = (uint32_t)r->n_stuck;
	out->workers = (uint32_t)r->n_workers;
	pthread_mutex_unlock(&r->mu);
	return 0;
}

static void relay_cqe(struct ublkml_queue *q)
{
	q->relay->efd_armed = 0;	/* re-armed by the loop */
}

static int relay_arm(struct ublkml_queue *q, struct relay *r)
{
	struct io_uring_sqe *sqe = get_sqe(q);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_read(sqe, r->efd, &r->efd_val, sizeof(r->efd_val), 0);
	io_uring_sqe_set_data64(sqe, tgt_ud(KIND_RELAY, 0, 0));
	r->efd_armed = 1;
	return 0;
}

/* Answered prefix of a worker's array (a worker answers in order). */
static int answered_prefix(const struct ublkml_relay_worker *w)
{
	int i = 0;

	while (i < w->n && __atomic_load_n(&w->evs[i].result, __ATOMIC_ACQUIRE) !=
			   UBLKML_RELAY_PENDING)
		i++;
	return i;
}

/* Give up worker w, stuck on event k (under mu): its answers so far, and
 * -ETIMEDOUT for k, go to done[]; the events it did not reach go back to
 * the front of pending.  Returns how many answers, or -ENOMEM (then nothing
 * changed: tried again at the next look). */
static int relay_fire(struct ublkml_queue *q, struct relay *r,
		      struct ublkml_relay_worker *w, int k, uint64_t now,
		      struct ublkml_event *done)
{
	struct ublkml_event *evs = w->evs;
	char *fresh = NULL, **retired;
	int n = w->n, n_done = 0, n_back = 0;
	uint16_t tag = evs[k].tag;

	if (posix_memalign((void **)&fresh, (size_t)sysconf(_SC_PAGESIZE),
			   q->buf_size))
		return -ENOMEM;
	retired = realloc(w->retired, (size_t)(w->n_retired + 1) * sizeof(char *));
	if (!retired) {
		free(fresh);
		return -ENOMEM;
	}
	w->retired = retired;
	for (int i = k + 1; i < n; i++)
		__atomic_store_n(&evs[i].op, UBLKML_OP_CANCELLED, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	r->last = evs[k];
	for (int i = 0; i < n; i++) {
		int32_t res = __atomic_load_n(&evs[i].result, __ATOMIC_ACQUIRE);
		struct ublkml_event e = evs[i];

		if (i == k && res == UBLKML_RELAY_PENDING) {
			e.result = -ETIMEDOUT;
			done[n_done++] = e;
		} else if (i > k && (res == UBLKML_RELAY_PENDING ||
				     res == UBLKML_RELAY_CANCELLED)) {
			/* Not served: again, with its real op (the
			 * descriptor still holds the request). */
			e.op = (uint8_t)(q->iods[e.tag].op_flags & 0xff);
			e.result = -EIO;
			r->back[n_back++] = e;
		} else {
			e.result = res;
			done[n_done++] = e;
		}
	}
	if (n_back) {
		memmove(q->pending + n_back, q->pending,
			(size_t)q->n_pending * sizeof(*q->pending));
		memcpy(q->pending, r->back, (size_t)n_back * sizeof(*r->back));
		q->n_pending += n_back;
	}
	/* The hung call keeps its buffer; the tag gets the fresh one. */
	w->retired[w->n_retired++] = q->tag_buf[tag];
	q->tag_buf[tag] = fresh;
	r->buf_gen++;
	w->fired = 1;
	r->n_holding--;			/* the ring thread no longer waits for it */
	r->n_stuck++;
	r->timeouts++;
	r->unreported++;
	r->last_stuck_ns = now - w->t_seen;
	return n_done;
}

/* Collect answers, give up hung workers, post pending requests to an idle
 * worker when none holds a batch or every holder is stalled.  Returns the
 * time to the next look (ns) while batches are out, else 0; r->fresh says
 * whether a holder is fresh (or an idle worker was just given a batch). */
static uint64_t relay_turn(struct ublkml_queue *q, struct relay *r)
{
	struct ublkml_event *done = r->done;
	int n_done, busy = 0;
	uint64_t now, next = 0;

	pthread_mutex_lock(&r->mu);
	/* Read the clock under mu: a worker stamps t_seen (under mu) when it
	 * takes a batch, and a clock read before the lock could be older than
	 * that stamp; now - t_seen would then wrap to a huge age and fire a
	 * worker that had just started (seen in CI: ETIMEDOUT after 4 s with a
	 * 30 s timeout). */
	now = now_ns();
	for (int i = 0; i < r->n_inbox; i++) {	/* harness only */
		struct ublkml_event *e = &r->inbox[i];
		struct ublksrv_io_desc *iod = &q->iods[e->tag];

		iod->op_flags = e->op_flags;
		iod->start_sector = e->start_sector;
		iod->nr_sectors = e->nr_sectors;
		handle_request(q, e->tag);
	}
	r->n_inbox = 0;
	n_done = r->n_ans;
	memcpy(done, r->ans, (size_t)n_done * sizeof(*done));
	r->n_ans = 0;
	if (r->n_holding) {
		for (struct ublkml_relay_worker *w = r->workers; w; w = w->next) {
			int k;

			if (!w->evs || w->fired)
				continue;
			k = answered_prefix(w);
			if (k != w->seen) {
				w->seen = k;
				w->t_seen = now;
			} else if (k < w->n && now - w->t_seen >= r->timeout_ns) {
				int ret = relay_fire(q, r, w, k, now, done + n_done);

				if (ret >= 0) {
					n_done += ret;
					continue;
				}
			}
			if (now - w->t_seen < r->stall_ns)
				busy = 1;	/* a fresh holder: keep the order */
		}
	}
	if (r->posted && now - r->t_posted >= r->timeout_ns) {
		/* Nobody took it: every worker is stuck or busy. */
		for (int i = 0; i < r->n_batch; i++) {
			done[n_done] = r->batch[i];
			done[n_done++].result = -ETIMEDOUT;
		}
		r->unserved += (uint64_t)r->n_batch;
		r->posted = 0;
	}
	if (!r->posted && !busy && q->n_pending) {
		r->n_batch = take_events(q->pending, &q->n_pending, r->batch, q->depth);
		r->posted = 1;
		r->t_posted = now;
		if (r->n_idle) {
			pthread_cond_signal(&r->cv);
			busy = 1;	/* a worker takes it now: fresh */
		}
	}
	r->fresh = busy;
	if (r->n_holding || r->posted)
		next = r->poll_ns;
	if (q->cdev_fd >= 0)
		pthread_mutex_unlock(&r->mu);
	for (int i = 0; i < n_done; i++)
		complete_io(q, done[i].tag, done[i].result);
	if (q->cdev_fd < 0)		/* harness: answers are read under mu */
		pthread_mutex_unlock(&r->mu);
	return next;
}

static int relay_finished(struct ublkml_queue *q, struct relay *r)
{
	int idle;

	pthread_mutex_lock(&r->mu);
	idle = !r->n_holding && !r->posted && !r->n_ans && !r->n_inbox && !r->feeding;
	pthread_mutex_unlock(&r->mu);
	if (!idle || q->n_pending)
		return 0;
	if (q->cdev_fd < 0)
		return q->tgt_inflight == 0;	/* harness: all answered */
	return queue_done(q);
}

static void reap(struct ublkml_queue *q)
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
}

/* Submit, then sleep until there is something to do, and take every ready
 * CQE.  Two ways to sleep:
 *
 *   - a batch out and its holder fresh (r->fresh): on ans_cv, until a
 *     worker answers (or wait_ns).  New requests that arrive meanwhile
 *     could not be posted anyway (they wait for that batch's answers), so
 *     the ring thread need not wake for them: one futex hand-over per batch
 *     instead of a wake-up per request and a task-work completion of the
 *     eventfd read;
 *   - otherwise (nothing out, or every holder stalled, or a batch nobody
 *     has taken yet): in the ring, woken by a CQE -- a new request, which
 *     must be posted at once when the holders are stalled, or the eventfd
 *     read a worker's answer completes.  (Sleeping on ans_cv here too, as
 *     bc087af did, left requests that came while every holder was stalled
 *     unseen until the next poll, and posted only one poll later: up to
 *     2 * poll_ns instead of at once.)
 */
static int relay_wait(struct ublkml_queue *q, struct relay *r, uint64_t wait_ns)
{
	struct io_uring_cqe *cqe;
	int ret;

	if (wait_ns && r->fresh) {
		struct timespec ts;
		uint64_t until;

		ret = io_uring_submit_and_get_events(&q->ring);
		if (ring_error(ret))
			return ret;
		reap(q);
		until = now_ns() + wait_ns;
		ts.tv_sec = (time_t)(until / 1000000000u);
		ts.tv_nsec = (long)(until % 1000000000u);
		pthread_mutex_lock(&r->mu);
		/* Not n_inbox: a fed request stands for a CQE, which does
		 * not end this sleep either. */
		if (!r->n_ans && !r->closing) {
			r->ring_waiting = 1;
			pthread_cond_timedwait(&r->ans_cv, &r->mu, &ts);
			r->ring_waiting = 0;
		}
		pthread_mutex_unlock(&r->mu);
		return 0;
	}
	pthread_mutex_lock(&r->mu);
	if (r->n_ans || r->n_inbox) {	/* work came meanwhile: no sleep */
		pthread_mutex_unlock(&r->mu);
		ret = io_uring_submit_and_get_events(&q->ring);
		if (ring_error(ret))
			return ret;
		reap(q);
		return 0;
	}
	r->ring_sleeping = 1;
	pthread_mutex_unlock(&r->mu);
	if (wait_ns) {
		struct __kernel_timespec ts = {
			.tv_sec = (long long)(wait_ns / 1000000000u),
			.tv_nsec = (long long)(wait_ns % 1000000000u),
		};

		ret = io_uring_submit_and_wait_timeout(&q->ring, &cqe, 1, &ts, NULL);
	} else {
		ret = io_uring_submit_and_wait(&q->ring, 1);
	}
	pthread_mutex_lock(&r->mu);
	r->ring_sleeping = 0;
	pthread_mutex_unlock(&r->mu);
	if (ring_error(ret))
		return ret;
	reap(q);
	return 0;
}

int ublkml_queue_relay(struct ublkml_queue *q)
{
	struct relay *r = q->relay;
	int ret = 0;

	if (!r)
		return -EINVAL;
	for (;;) {
		uint64_t wait_ns = relay_turn(q, r);

		if (relay_finished(q, r))
			break;
		if (!r->efd_armed && (ret = relay_arm(q, r)) < 0)
			break;
		ret = relay_wait(q, r, wait_ns);
		if (ret < 0)
			break;
	}
	pthread_mutex_lock(&r->mu);
	r->closing = 1;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	io_uring_submit(&q->ring);
	return ret < 0 ? ret : 0;
}

/* Harness: hand a request to a running relay (any thread).  feeding = 1
 * before the relay starts keeps it from finishing between requests; 0 with
 * tag < 0 says no more will come. */
int ublkml_queue_relay_feed(struct ublkml_queue *q, int tag, uint32_t op_flags,
			    uint64_t start_sector, uint32_t nr_sectors, int feeding)
{
	struct relay *r = q->relay;
	int ret = 0;

	if (!r || q->cdev_fd >= 0 || tag >= q->depth)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	r->feeding = feeding;
	if (tag >= 0) {
		if (r->n_inbox >= q->depth) {
			ret = -EBUSY;
		} else {
			struct ublkml_event *e = &r->inbox[r->n_inbox++];

			e->tag = (uint16_t)tag;
			e->op_flags = op_flags;
			e->start_sector = start_sector;
			e->nr_sectors = nr_sectors;
		}
	}
	/* Like a new request's CQE: wakes a ring thread asleep in the ring,
	 * not one waiting on ans_cv (relay_wait), so the harness sees the
	 * ring thread as late as a device would. */
	relay_kick_ring(r);
	pthread_mutex_unlock(&r->mu);
	return ret;
}

/* Harness only: the answers so far, while the relay runs (any thread). */
int ublkml_queue_relay_harvest(struct ublkml_queue *q, struct ublkml_event *out,
			       int max)
{
	struct relay *r = q->relay;
	int n;

	if (!r || q->cdev_fd >= 0)
		return -EINVAL;
	pthread_mutex_lock(&r->mu);
	n = take_events(q->harvest, &q->n_harvest, out, max);
	pthread_mutex_unlock(&r->mu);
	return n;
}
