/* SPDX-License-Identifier: MIT */
/*
 * The mirror target (RAID1 over 2..UBLKML_MAX_LEGS files or devices): leg
 * states, dirty regions and write epochs; its journal; the resync; the data
 * path (fan-out, read retry, health probes).  Leg I/O itself is backing.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"

struct mirror_journal;

/* Per leg; all updated with atomics from several threads. */
struct mirror_leg {
	uint64_t *dirty;	/* one bit per region this leg missed */
	uint64_t n_dirty;	/* bits set in dirty */
	uint64_t reads, writes, errors, probes;
};

struct mirror {
	struct mirror_leg legs[UBLKML_MAX_LEGS];
	/* 2 bits of UBLKML_LEG_* per leg in one word, so that "is another
	 * leg still ACTIVE?" and the change are a single CAS.  It, r_inflight
	 * and the dirty bits live in the journal when there is one (see "the
	 * journal"), else in memory of our own. */
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
	pthread_mutex_t ctl;		/* control calls only, never the queues */
};

/* user_data kinds of a probe's read and of its injected delay. */
enum {
	KIND_PROBE = TGT_KIND_PRIVATE,
	KIND_PROBE_DELAY,
};

#define PROBE_SLOTS 4
_Static_assert(2 * PROBE_SLOTS <= TGT_EXTRA_CQES, "room for probes in the CQ");

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

/* Per tag of a queue: the request's leg I/Os. */
struct mirror_tag {
	uint8_t pending;	/* leg I/Os not finished yet */
	uint8_t tried;		/* reads: legs that failed it */
	uint8_t active;		/* writes: ACTIVE legs when submitted */
	uint8_t ok_active;	/* writes: ACTIVE legs that succeeded */
	uint8_t must_fail;	/* a failed leg could not be failed */
	uint8_t epoch;		/* write epoch joined */
	uint8_t probed;		/* reads: a health probe went out with it */
	int32_t err;		/* first leg error */
};

/* Per queue. */
struct mirror_queue {
	uint32_t read_rr;		/* round robin over ACTIVE legs */
	uint32_t reads_seen;		/* for probes: every Nth read */
	struct probe probes[PROBE_SLOTS];
	char *probe_bufs;
	struct mirror_tag *tags;
};

/* ---- the journal --------------------------------------------
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

static int copy_region(struct ublkml_target *t, int src, int dst, uint64_t r,
		       char *buf, uint64_t chunk);
static void dirty_set(struct mirror_leg *lg, uint64_t r);

static size_t journal_inflight_bytes(uint64_t n_regions)
{
	return (size_t)((n_regions * sizeof(uint32_t) + 7) & ~7ull);
}

/* Map the journal: a new (empty) file is laid out, a used one must describe
 * this mirror.  Returns 1 when the file was in use (a recovery). */
static int journal_map(struct ublkml_target *t, int fd, size_t words)
{
	struct mirror *m = t->priv;
	size_t len = sizeof(struct mirror_journal) +
		     journal_inflight_bytes(m->n_regions) +
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
		     j->region_shift != m->region_shift || j->size != t->size ||
		     j->n_regions != m->n_regions)) {
		munmap(j, len);
		return -EBADMSG;
	}
	if (!used) {
		j->version = JOURNAL_VERSION;
		j->n_legs = (uint32_t)t->n_legs;
		j->region_shift = m->region_shift;
		j->size = t->size;
		j->n_regions = m->n_regions;
		memcpy(j->magic, JOURNAL_MAGIC, 8);	/* last: marks it complete */
	}
	m->journal = j;
	m->journal_len = len;
	m->states = &j->states;
	m->resync_at = j->resync_at;
	m->r_inflight = (uint32_t *)(j + 1);
	for (int i = 0; i < t->n_legs; i++)
		m->legs[i].dirty = (uint64_t *)((char *)(j + 1) +
			journal_inflight_bytes(m->n_regions)) + (size_t)i * words;
	return used;
}

/* A used journal: count the dirty bits, redo an interrupted resync copy,
 * and make the regions that had writes in flight equal on every leg that
 * is not FAILED (their writes may have reached some legs only). */
static int journal_replay(struct ublkml_target *t, size_t words)
{
	struct mirror *m = t->priv;
	uint32_t states = __atomic_load_n(m->states, __ATOMIC_SEQ_CST);
	uint64_t chunk = 1ull << m->region_shift;
	char *buf = NULL;
	int src = -1, ret = 0;

	for (int i = 0; i < t->n_legs; i++) {
		struct mirror_leg *lg = &m->legs[i];

		lg->n_dirty = 0;
		for (size_t w = 0; w < words; w++)
			lg->n_dirty += (uint64_t)__builtin_popcountll(lg->dirty[w]);
		if (m->resync_at[i]) {
			dirty_set(lg, m->resync_at[i] - 1);
			m->resync_at[i] = 0;
		}
		if (src < 0 && ((states >> (2 * i)) & 3u) == UBLKML_LEG_ACTIVE)
			src = i;
	}
	if (src < 0)
		return -EBADMSG;	/* no ACTIVE leg: not a state we ever write */
	if (chunk > (1u << 20))
		chunk = 1u << 20;
	for (uint64_t r = 0; r < m->n_regions; r++) {
		if (!m->r_inflight[r])
			continue;
		if (!buf && posix_memalign((void **)&buf, 4096, chunk))
			return -ENOMEM;
		for (int i = 0; i < t->n_legs && !ret; i++) {
			uint32_t st = (states >> (2 * i)) & 3u;

			if (i == src || st == UBLKML_LEG_FAILED)
				continue;
			if (st == UBLKML_LEG_DEMOTED)
				dirty_set(&m->legs[i], r);	/* resync copies it */
			else
				ret = copy_region(t, src, i, r, buf, chunk);
		}
		if (ret)
			break;
		m->r_inflight[r] = 0;
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
	struct mirror *m;
	size_t words;
	int ret;

	if (n_legs < 2 || n_legs > UBLKML_MAX_LEGS || region_shift < 12 ||
	    region_shift > 30 || size == 0)
		return -EINVAL;
	ret = target_alloc(&t, UBLKML_TGT_MIRROR, size);
	if (ret)
		return ret;
	m = calloc(1, sizeof(*m));
	if (!m)
		goto nomem;
	pthread_mutex_init(&m->ctl, NULL);
	m->states = &m->own_states;
	m->resync_at = m->own_resync_at;
	t->priv = m;
	t->n_legs = n_legs;
	m->region_shift = region_shift;
	m->n_regions = (size + (1ull << region_shift) - 1) >> region_shift;
	m->probe_every = 8;
	words = (m->n_regions + 63) / 64;
	m->r_gen = calloc(m->n_regions, sizeof(uint32_t));
	if (!m->r_gen)
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
	m->r_inflight = calloc(m->n_regions, sizeof(uint32_t));
	if (!m->r_inflight)
		goto nomem;
	for (int i = 0; i < n_legs; i++) {
		m->legs[i].dirty = calloc(words, sizeof(uint64_t));
		if (!m->legs[i].dirty)
			goto nomem;
	}
	*out = t;
	return 0;
nomem:
	ublkml_target_free(t);
	return -ENOMEM;
}

static void mirror_free_tgt(struct ublkml_target *t)
{
	struct mirror *m = t->priv;

	if (!m)
		return;
	if (m->journal) {
		munmap(m->journal, m->journal_len);
	} else {
		for (int i = 0; i < UBLKML_MAX_LEGS; i++)
			free(m->legs[i].dirty);
		free(m->r_inflight);
	}
	free(m->r_gen);
	pthread_mutex_destroy(&m->ctl);
	free(m);
}

/* ---- leg states, dirty regions, write epochs ------------------------------ */

static uint32_t leg_state_of(uint32_t states, int leg)
{
	return (states >> (2 * leg)) & 3u;
}

static uint32_t states_load(struct ublkml_target *t)
{
	struct mirror *m = t->priv;
	return __atomic_load_n(m->states, __ATOMIC_SEQ_CST);
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
	struct mirror *m = t->priv;
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
	} while (!__atomic_compare_exchange_n(m->states, &old, nw, 0,
					      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
	return 0;
}

#define ANY_LEG_STATE 7u

static void dirty_set(struct mirror_leg *lg, uint64_t r)
{
	uint64_t bit = 1ull << (r & 63);

	if (!(__atomic_fetch_or(&lg->dirty[r >> 6], bit, __ATOMIC_SEQ_CST) & bit))
		__atomic_fetch_add(&lg->n_dirty, 1, __ATOMIC_SEQ_CST);
}

static int dirty_clear(struct mirror_leg *lg, uint64_t r)
{
	uint64_t bit = 1ull << (r & 63);

	if (!(__atomic_fetch_and(&lg->dirty[r >> 6], ~bit, __ATOMIC_SEQ_CST) & bit))
		return 0;
	__atomic_fetch_sub(&lg->n_dirty, 1, __ATOMIC_SEQ_CST);
	return 1;
}

/* The regions [*first, *end) that the bytes [off, off + len) touch. */
static void regions_of(const struct mirror *m, uint64_t off, uint64_t len,
		       uint64_t *first, uint64_t *end)
{
	uint64_t last;

	*first = off >> m->region_shift;
	*end = *first;
	if (!len)
		return;
	last = (off + len - 1) >> m->region_shift;
	*end = last < m->n_regions ? last + 1 : m->n_regions;
}

static void dirty_range(struct ublkml_target *t, int leg, uint64_t off,
			uint64_t len)
{
	struct mirror *m = t->priv;
	uint64_t r, end;

	regions_of(m, off, len, &r, &end);
	for (; r < end; r++)
		dirty_set(&m->legs[leg], r);
}

static void dirty_clear_range(struct ublkml_target *t, int leg, uint64_t off,
			      uint64_t len)
{
	struct mirror *m = t->priv;
	uint64_t r, end;

	regions_of(m, off, len, &r, &end);
	for (; r < end; r++)
		dirty_clear(&m->legs[leg], r);
}

/* Wait until every write that may have read the leg states before this
 * call has completed (the caller changed a state first).  A writer joins
 * the current epoch before it reads the states; flipping the epoch twice
 * and draining the old side each time catches every such writer (SRCU's
 * argument), and new writers, on the other side, cannot starve it. */
static void write_barrier(struct ublkml_target *t)
{
	struct mirror *m = t->priv;
	struct timespec ts = { 0, 20000 };

	for (int i = 0; i < 2; i++) {
		uint32_t old = __atomic_fetch_add(&m->w_epoch, 1,
						  __ATOMIC_SEQ_CST) & 1;

		while (__atomic_load_n(&m->w_active[old], __ATOMIC_SEQ_CST))
			nanosleep(&ts, NULL);
	}
}

static uint64_t leg_dirty(struct ublkml_target *t, int leg)
{
	struct mirror *m = t->priv;
	return __atomic_load_n(&m->legs[leg].n_dirty, __ATOMIC_SEQ_CST);
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
	struct mirror *m = t->priv;
	int ret;

	if (t->ops != &tgt_mirror_ops || leg < 0 || leg >= t->n_legs ||
	    state < UBLKML_LEG_ACTIVE || state > UBLKML_LEG_FAILED)
		return -EINVAL;
	pthread_mutex_lock(&m->ctl);
	ret = set_leg_state_locked(t, leg, (uint32_t)state);
	pthread_mutex_unlock(&m->ctl);
	return ret;
}

int ublkml_mirror_leg_info(struct ublkml_target *t, int leg,
			   struct ublkml_leg_info *out)
{
	struct mirror *m = t->priv;
	struct mirror_leg *lg;

	if (t->ops != &tgt_mirror_ops || leg < 0 || leg >= t->n_legs)
		return -EINVAL;
	lg = &m->legs[leg];
	memset(out, 0, sizeof(*out));
	out->state = leg_state_of(states_load(t), leg);
	out->dirty_regions = leg_dirty(t, leg);
	out->total_regions = m->n_regions;
	out->reads = __atomic_load_n(&lg->reads, __ATOMIC_RELAXED);
	out->writes = __atomic_load_n(&lg->writes, __ATOMIC_RELAXED);
	out->errors = __atomic_load_n(&lg->errors, __ATOMIC_RELAXED);
	out->probes = __atomic_load_n(&lg->probes, __ATOMIC_RELAXED);
	return 0;
}

int ublkml_mirror_set_probe_every(struct ublkml_target *t, uint32_t n)
{
	struct mirror *m = t->priv;
	if (t->ops != &tgt_mirror_ops)
		return -EINVAL;
	__atomic_store_n(&m->probe_every, n, __ATOMIC_RELAXED);
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
	struct mirror *m = t->priv;
	uint64_t off = r << m->region_shift, len, end;
	int ret = 0;

	end = off + (1ull << m->region_shift);
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
	struct mirror *m = t->priv;
	struct mirror_leg *lg;
	uint64_t rsize, chunk;
	char *buf = NULL;
	uint32_t cur;
	int copied = 0, ret = 0;

	if (t->ops != &tgt_mirror_ops || leg < 0 || leg >= t->n_legs ||
	    max_regions < 0)
		return -EINVAL;
	lg = &m->legs[leg];
	pthread_mutex_lock(&m->ctl);
	cur = leg_state_of(states_load(t), leg);
	if (cur == UBLKML_LEG_FAILED && max_regions) {
		ret = leg_cas(t, leg, 1u << UBLKML_LEG_FAILED,
			      UBLKML_LEG_DEMOTED, &cur);
		if (ret == 0)
			write_barrier(t);
	}
	pthread_mutex_unlock(&m->ctl);
	if (ret)
		return ret;
	if (cur == UBLKML_LEG_ACTIVE)
		return 0;	/* in sync by definition: it serves reads */
	if (!max_regions || !leg_dirty(t, leg))
		return (int)leg_dirty(t, leg);

	rsize = 1ull << m->region_shift;
	chunk = rsize < (1u << 20) ? rsize : (1u << 20);
	if (posix_memalign((void **)&buf, 4096, chunk))
		return -ENOMEM;
	for (uint64_t r = 0; r < m->n_regions && copied < max_regions; r++) {
		uint32_t gen;
		int src;

		if (!__atomic_load_n(&lg->dirty[r >> 6], __ATOMIC_RELAXED)) {
			r |= 63;	/* a clean word: skip 64 regions */
			continue;
		}
		if (!(__atomic_load_n(&lg->dirty[r >> 6], __ATOMIC_SEQ_CST) &
		      (1ull << (r & 63))))
			continue;
		if (__atomic_load_n(&m->r_inflight[r], __ATOMIC_SEQ_CST))
			continue;	/* busy: a later call takes it */
		gen = __atomic_load_n(&m->r_gen[r], __ATOMIC_SEQ_CST);
		/* A server killed between here and the end of the copy
		 * leaves resync_at in the journal: the next one redoes r. */
		__atomic_store_n(&m->resync_at[leg], (uint32_t)(r + 1),
				 __ATOMIC_SEQ_CST);
		if (!dirty_clear(lg, r)) {
			__atomic_store_n(&m->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			continue;
		}
		if (__atomic_load_n(&m->r_inflight[r], __ATOMIC_SEQ_CST) ||
		    __atomic_load_n(&m->r_gen[r], __ATOMIC_SEQ_CST) != gen) {
			dirty_set(lg, r);
			__atomic_store_n(&m->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			continue;
		}
		src = pick_source(t, leg);
		if (src < 0) {
			dirty_set(lg, r);
			__atomic_store_n(&m->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			ret = -EBUSY;	/* no ACTIVE leg to copy from */
			break;
		}
		ret = copy_region(t, src, leg, r, buf, chunk);
		if (ret) {
			dirty_set(lg, r);
			__atomic_store_n(&m->resync_at[leg], 0, __ATOMIC_SEQ_CST);
			__atomic_fetch_add(&lg->errors, 1, __ATOMIC_RELAXED);
			break;
		}
		if (__atomic_load_n(&m->r_gen[r], __ATOMIC_SEQ_CST) != gen ||
		    __atomic_load_n(&m->r_inflight[r], __ATOMIC_SEQ_CST) ||
		    leg_state_of(states_load(t), src) != UBLKML_LEG_ACTIVE)
			dirty_set(lg, r);	/* raced with a write: again later */
		else
			copied++;
		__atomic_store_n(&m->resync_at[leg], 0, __ATOMIC_SEQ_CST);
	}
	free(buf);
	if (ret)
		return ret;
	if (copied && fdatasync(t->legs[leg].fd) < 0 && errno != EINVAL)
		return -errno;
	return (int)leg_dirty(t, leg);
}


/* ---- the data path -----------------------------------------------------------
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
	struct mirror *m = q->t->priv;
	struct mirror_queue *mq = q->priv;
	struct probe *p = &mq->probes[slot];
	struct mirror_leg *lg = &m->legs[p->leg];

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
	struct mirror_queue *mq = q->priv;
	struct probe *p = &mq->probes[slot];

	if (fault_on(q, p->leg)) {
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
	struct mirror *m = q->t->priv;
	struct mirror_queue *mq = q->priv;
	uint32_t every = __atomic_load_n(&m->probe_every, __ATOMIC_RELAXED);
	struct io_uring_sqe *sqe;
	struct probe *p = NULL;
	int slot, leg, err;

	if (!demoted || !every || ++mq->reads_seen % every)
		return 0;
	for (slot = 0; slot < PROBE_SLOTS; slot++) {
		if (!mq->probes[slot].busy) {
			p = &mq->probes[slot];
			break;
		}
	}
	if (!p)
		return 0;	/* all busy: a slow leg is not probed harder */
	leg = pick_leg(demoted, mq->reads_seen / every);
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
			   mq->probe_bufs + (size_t)slot * q->buf_size, p->len, off);
	tgt_prep_done(q, sqe, tgt_ud(KIND_PROBE, (uint32_t)leg, (uint32_t)slot));
	return 1;
}

static void regions_begin(struct ublkml_target *t, struct tag_state *s)
{
	struct mirror *m = t->priv;
	uint64_t last = (s->off + s->len - 1) >> m->region_shift;

	for (uint64_t r = s->off >> m->region_shift; r <= last; r++) {
		__atomic_fetch_add(&m->r_inflight[r], 1, __ATOMIC_SEQ_CST);
		__atomic_fetch_add(&m->r_gen[r], 1, __ATOMIC_SEQ_CST);
	}
}

static void regions_end(struct ublkml_target *t, struct tag_state *s)
{
	struct mirror *m = t->priv;
	uint64_t last = (s->off + s->len - 1) >> m->region_shift;

	for (uint64_t r = s->off >> m->region_shift; r <= last; r++)
		__atomic_fetch_sub(&m->r_inflight[r], 1, __ATOMIC_SEQ_CST);
}

static int modifies(uint8_t op)
{
	return op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_DISCARD ||
	       op == UBLK_IO_OP_WRITE_ZEROES;
}

static void mirror_request(struct ublkml_queue *q, uint16_t tag)
{
	struct mirror *m = q->t->priv;
	struct mirror_queue *mq = q->priv;
	struct mirror_tag *mt = &mq->tags[tag];
	struct ublkml_target *t = q->t;
	struct tag_state *s = &q->ts[tag];
	uint32_t states, active, writes;

	switch (s->op) {
	case UBLK_IO_OP_READ:
		states = states_load(t);
		active = legs_in(t, states, UBLKML_LEG_ACTIVE);
		mt->tried = 0;
		mt->pending = 1;
		if (!active) {	/* cannot happen: the last ACTIVE leg stays */
			complete_io(q, tag, -EIO);
			return;
		}
		mt->probed = (uint8_t)maybe_probe(q, legs_in(t, states, UBLKML_LEG_DEMOTED),
						 s->off, s->len);
		leg_start(q, tag, pick_leg(active, mq->read_rr++));
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
		mt->epoch = __atomic_load_n(&m->w_epoch, __ATOMIC_SEQ_CST) & 1;
		__atomic_fetch_add(&m->w_active[mt->epoch], 1, __ATOMIC_SEQ_CST);
	}
	states = states_load(t);
	active = legs_in(t, states, UBLKML_LEG_ACTIVE);
	writes = active | legs_in(t, states, UBLKML_LEG_DEMOTED);
	if (modifies(s->op))
		for (int i = 0; i < t->n_legs; i++)
			if (!(writes & (1u << i)))
				dirty_range(t, i, s->off, s->len);
	mt->active = (uint8_t)active;
	mt->ok_active = 0;
	mt->must_fail = 0;
	mt->err = 0;
	/* Set before the first leg starts: a leg may finish synchronously. */
	mt->pending = (uint8_t)__builtin_popcount(writes);
	while (writes) {
		int leg = __builtin_ctz(writes);

		writes &= writes - 1;
		leg_start(q, tag, leg);
	}
}

static void mirror_leg_finish(struct ublkml_queue *q, uint16_t tag, int leg,
			      int res)
{
	struct mirror *m = q->t->priv;
	struct mirror_queue *mq = q->priv;
	struct mirror_tag *mt = &mq->tags[tag];
	struct ublkml_target *t = q->t;
	struct tag_state *s = &q->ts[tag];
	struct mirror_leg *lg = &m->legs[leg];
	int want = s->op == UBLK_IO_OP_READ || s->op == UBLK_IO_OP_WRITE ?
		   (int)s->len : 0;
	uint32_t was;

	if (q->rec || q->sums)
		record(q, tag, (uint8_t)leg, s->op, s->off, s->len, res,
		       lio(q, tag, leg)->t_start,
		       s->op == UBLK_IO_OP_READ && mt->probed ? UBLKML_REC_PROBED : 0);
	if (s->op == UBLK_IO_OP_READ) {
		uint32_t others;

		__atomic_fetch_add(&lg->reads, 1, __ATOMIC_RELAXED);
		if (res == want) {
			complete_io(q, tag, res);
			return;
		}
		__atomic_fetch_add(&lg->errors, 1, __ATOMIC_RELAXED);
		mt->tried |= (uint8_t)(1u << leg);
		/* Like md's read-error repair: the region is rewritten from a
		 * good leg by the next resync. */
		if (leg_cas(t, leg, ANY_LEG_STATE, UBLKML_LEG_FAILED, &was) == 0 &&
		    was != UBLKML_LEG_FAILED)
			dirty_range(t, leg, s->off, s->len);
		others = legs_in(t, states_load(t), UBLKML_LEG_ACTIVE) & ~mt->tried;
		if (others) {
			leg_start(q, tag, pick_leg(others, mq->read_rr++));
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
			mt->must_fail = 1;
			dirty_clear_range(t, leg, s->op == UBLK_IO_OP_FLUSH ? 0 : s->off,
					  s->op == UBLK_IO_OP_FLUSH ? t->size : s->len);
		}
		if (!mt->err)
			mt->err = res < 0 ? res : -EIO;
	} else if (mt->active & (1u << leg)) {
		mt->ok_active++;
	}
	if (--mt->pending)
		return;
	if (modifies(s->op)) {
		regions_end(t, s);
		__atomic_fetch_sub(&m->w_active[mt->epoch], 1, __ATOMIC_SEQ_CST);
	}
	complete_io(q, tag, mt->ok_active && !mt->must_fail ? want :
			    (mt->err ? mt->err : -EIO));
}

/* ---- the ops ---------------------------------------------------------------- */

static int mirror_init_queue(struct ublkml_queue *q)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	struct mirror_queue *mq = calloc(1, sizeof(*mq));

	if (!mq)
		return -ENOMEM;
	q->priv = mq;
	mq->tags = calloc(q->depth, sizeof(*mq->tags));
	if (!mq->tags)
		return -ENOMEM;
	if (posix_memalign((void **)&mq->probe_bufs, page,
			   (size_t)PROBE_SLOTS * q->buf_size)) {
		mq->probe_bufs = NULL;
		return -ENOMEM;
	}
	return 0;
}

static void mirror_free_queue(struct ublkml_queue *q)
{
	struct mirror_queue *mq = q->priv;

	if (!mq)
		return;
	free(mq->probe_bufs);
	free(mq->tags);
	free(mq);
	q->priv = NULL;
}

static void mirror_tgt_io_done(struct ublkml_queue *q, const struct io_uring_cqe *cqe,
			       uint32_t kind, int leg, uint16_t idx)
{
	struct mirror_queue *mq = q->priv;

	switch (kind) {
	case TGT_KIND_IO:
		leg_cqe(q, idx, leg, cqe->res);
		break;
	case KIND_PROBE:
		q->tgt_inflight--;
		probe_done(q, idx, cqe->res);
		break;
	case KIND_PROBE_DELAY:
		q->tgt_inflight--;
		probe_finish(q, idx, mq->probes[idx].res);
		break;
	}
}

const struct ublkml_tgt_ops tgt_mirror_ops = {
	.name = "mirror",
	.kind = UBLKML_TGT_MIRROR,
	.flags = TGT_F_OWN_RECORDS,
	.handle_io = mirror_request,
	.tgt_io_done = mirror_tgt_io_done,
	.path_done = mirror_leg_finish,
	.free_tgt = mirror_free_tgt,
	.init_queue = mirror_init_queue,
	.free_queue = mirror_free_queue,
};
