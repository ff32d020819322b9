/*
 * nulldev: a null virtio-fs device for measuring the driver alone (as SPDK's null
 * bdev or Linux's null_blk do for block drivers). A vhost-user-fs backend that
 * answers every request at C speed with a valid canned reply, one thread per
 * virtqueue, no file I/O.
 *
 *   cc -O2 -pthread -o nulldev nulldev.c
 *   nulldev --socket PATH [--queues N] [--tag TAG] [--no-event-idx] [--attr-timeout S]
 *           [--stats FILE] [--die-with-parent] [--once] [-v]
 *
 * It is a benchmark fixture, not part of the installed driver (tools/nulldev.py
 * builds it into a cache directory).
 *
 * The file system: inode 1 is the root directory holding
 *   hello    the text below (READ returns it);
 *   pattern  64 MiB whose byte at offset o is o % 251 (READ fills it);
 *   null     1 GiB whose READ reports the bytes without writing them (their content
 *            is whatever the buffer held: null_blk without memory backing).
 * WRITE to any file is accepted and discarded; namespace changes get EROFS;
 * GETXATTR gets ENODATA; opcodes it does not know get ENOSYS.
 *
 * vhost-user (QEMU docs/interop/vhost-user.rst): features VERSION_1,
 * PROTOCOL_FEATURES and (unless --no-event-idx) RING_EVENT_IDX; protocol features
 * MQ, REPLY_ACK, CONFIG (tag and num_request_queues in the config space) and STATUS.
 * Queue 0 is hiprio, queues 1..N the request queues (no notification queue). One
 * connection at a time; with --once it exits when the frontend disconnects.
 * --stats FILE keeps per-queue counters (requests, kicks, wakes, interrupts,
 * batches: five u64 per queue, queue 0 first) in a shared file a benchmark reads.
 *
 * Everything read from guest memory is validated (ring indexes, descriptor indexes,
 * chain length and loops, addresses and lengths, request header lengths): a
 * driver that breaks the ring rules gets its queue stopped with a message on
 * stderr naming the queue and the fault, and the device status gets
 * DEVICE_NEEDS_RESET (never a crash, never a silent hang).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- vhost-user ---------------------------------------------------------------- */
enum {
	VU_GET_FEATURES = 1, VU_SET_FEATURES = 2, VU_SET_OWNER = 3, VU_RESET_OWNER = 4,
	VU_SET_MEM_TABLE = 5, VU_SET_VRING_NUM = 8, VU_SET_VRING_ADDR = 9,
	VU_SET_VRING_BASE = 10, VU_GET_VRING_BASE = 11, VU_SET_VRING_KICK = 12,
	VU_SET_VRING_CALL = 13, VU_SET_VRING_ERR = 14, VU_GET_PROTOCOL_FEATURES = 15,
	VU_SET_PROTOCOL_FEATURES = 16, VU_GET_QUEUE_NUM = 17, VU_SET_VRING_ENABLE = 18,
	VU_GET_CONFIG = 24, VU_SET_CONFIG = 25, VU_SET_STATUS = 39, VU_GET_STATUS = 40,
};
#define VU_VERSION 0x1u
#define VU_VERSION_MASK 0x3u
#define VU_FLAG_REPLY 0x4u
#define VU_FLAG_NEED_REPLY 0x8u
#define VU_VRING_IDX_MASK 0xffu
#define VU_VRING_NOFD (1u << 8)
#define VU_MAX_PAYLOAD (4096 + 256)
#define VU_MAX_FDS 8
#define VU_MAX_REGIONS 8

#define PROTO_MQ (1ull << 0)
#define PROTO_REPLY_ACK (1ull << 3)
#define PROTO_CONFIG (1ull << 9)
#define PROTO_STATUS (1ull << 16)
#define PROTOCOL_FEATURES (PROTO_MQ | PROTO_REPLY_ACK | PROTO_CONFIG | PROTO_STATUS)

#define F_PROTOCOL_FEATURES (1ull << 30)
#define F_EVENT_IDX (1ull << 29)
#define F_INDIRECT_DESC (1ull << 28)
#define F_VERSION_1 (1ull << 32)

#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_NEEDS_RESET 64u

struct vu_header {
	uint32_t request, flags, size;
};

struct vu_region {
	uint64_t gpa, size, uva, mmap_offset;
};

/* ---- split virtqueue (virtio 1.2 2.7) -------------------------------------------- */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define MAX_QUEUE_SIZE 32768
#define MAX_SEGS 512 /* per direction: a 1 MiB payload in 4 KiB pieces and then some */

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct vring_avail {
	uint16_t flags, idx, ring[]; /* then used_event */
};

struct vring_used_elem {
	uint32_t id, len;
};

struct vring_used {
	uint16_t flags, idx;
	struct vring_used_elem ring[]; /* then avail_event */
};

/* ---- FUSE (include/uapi/linux/fuse.h, 7.38) ----------------------------------------- */
enum {
	FUSE_LOOKUP = 1, FUSE_FORGET = 2, FUSE_GETATTR = 3, FUSE_SETATTR = 4,
	FUSE_READLINK = 5, FUSE_SYMLINK = 6, FUSE_MKNOD = 8, FUSE_MKDIR = 9, FUSE_UNLINK = 10,
	FUSE_RMDIR = 11, FUSE_RENAME = 12, FUSE_LINK = 13, FUSE_OPEN = 14, FUSE_READ = 15,
	FUSE_WRITE = 16, FUSE_STATFS = 17, FUSE_RELEASE = 18, FUSE_FSYNC = 20,
	FUSE_SETXATTR = 21, FUSE_GETXATTR = 22, FUSE_LISTXATTR = 23, FUSE_REMOVEXATTR = 24,
	FUSE_FLUSH = 25, FUSE_INIT = 26, FUSE_OPENDIR = 27, FUSE_READDIR = 28,
	FUSE_RELEASEDIR = 29, FUSE_FSYNCDIR = 30, FUSE_ACCESS = 34, FUSE_CREATE = 35,
	FUSE_INTERRUPT = 36, FUSE_DESTROY = 38, FUSE_BATCH_FORGET = 42, FUSE_READDIRPLUS = 44,
	FUSE_RENAME2 = 45, FUSE_SYNCFS = 50, FUSE_TMPFILE = 51,
};

#define FUSE_ASYNC_READ (1u << 0)
#define FUSE_BIG_WRITES (1u << 5)
#define FUSE_DO_READDIRPLUS (1u << 13)
#define FUSE_ASYNC_DIO (1u << 15)
#define FUSE_PARALLEL_DIROPS (1u << 18)
#define FUSE_MAX_PAGES (1u << 22)
#define FUSE_INIT_EXT (1u << 30)
#define INIT_GRANTED (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | \
		      FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES | FUSE_INIT_EXT)
#define MAX_WRITE (1u << 20)
#define PAGE_SIZE 4096u

struct fuse_in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t total_extlen, padding;
};

struct fuse_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};

struct fuse_attr {
	uint64_t ino, size, blocks, atime, mtime, ctime;
	uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};

struct fuse_entry_out {
	uint64_t nodeid, generation, entry_valid, attr_valid;
	uint32_t entry_valid_nsec, attr_valid_nsec;
	struct fuse_attr attr;
};

struct fuse_attr_out {
	uint64_t attr_valid;
	uint32_t attr_valid_nsec, dummy;
	struct fuse_attr attr;
};

struct fuse_init_in {
	uint32_t major, minor, max_readahead, flags, flags2, unused[11];
};

struct fuse_init_out {
	uint32_t major, minor, max_readahead, flags;
	uint16_t max_background, congestion_threshold;
	uint32_t max_write, time_gran;
	uint16_t max_pages, map_alignment;
	uint32_t flags2, max_stack_depth, unused[6];
};

struct fuse_open_out {
	uint64_t fh;
	uint32_t open_flags;
	int32_t backing_id;
};

struct fuse_rw_in { /* fuse_read_in and fuse_write_in share this layout */
	uint64_t fh, offset;
	uint32_t size, rw_flags;
	uint64_t lock_owner;
	uint32_t flags, padding;
};

struct fuse_write_out {
	uint32_t size, padding;
};

struct fuse_getxattr_io { /* fuse_getxattr_in and fuse_getxattr_out */
	uint32_t size, padding;
};

struct fuse_statfs_out {
	uint64_t blocks, bfree, bavail, files, ffree;
	uint32_t bsize, namelen, frsize, padding, spare[6];
};

struct fuse_dirent {
	uint64_t ino, off;
	uint32_t namelen, type;
	char name[];
};

_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_statfs_out) == 80, "fuse_statfs_out");
_Static_assert(sizeof(struct fuse_rw_in) == 40, "fuse_read_in");

/* ---- the canned file system ------------------------------------------------------- */
struct node {
	uint64_t ino;
	const char *name;
	uint32_t mode;
	uint64_t size;
	int kind; /* how READ fills the data */
};
enum { K_DIR, K_TEXT, K_PATTERN, K_NULL };
static const char HELLO[] = "hello from the null device\n";
#define PATTERN_SIZE (64ull << 20)
#define PATTERN_MOD 251
static const struct node NODES[] = {
	{1, ".", 040755, 4096, K_DIR},
	{2, "hello", 0100644, sizeof(HELLO) - 1, K_TEXT},
	{3, "pattern", 0100644, PATTERN_SIZE, K_PATTERN},
	{4, "null", 0100644, 1ull << 30, K_NULL},
};
#define NNODES (sizeof(NODES) / sizeof(NODES[0]))
static uint8_t *pattern_table; /* PATTERN_MOD + MAX_WRITE bytes: memcpy source for any offset */
static uint64_t start_time;
static uint64_t attr_timeout = 1;

/* ---- device state ----------------------------------------------------------------- */
struct region {
	uint64_t gpa, size, uva;
	uint8_t *host;
	void *map;
	size_t map_len;
};

struct queue {
	int index;
	unsigned num;
	uint64_t desc_uva, avail_uva, used_uva;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t *used_event, *avail_event;
	int kick_fd, call_fd, stop_fd;
	bool addr_set, kicked, enabled, running, broken;
	uint16_t last_avail, used_idx, base;
	pthread_t thread;
	/* statistics of this connection, read by the control thread after the queue
	 * thread stops */
	uint64_t requests, kicks, wakes, calls, batches;
	struct qstats *total; /* the same, over the process's life, shared (--stats) */
};

/* --stats FILE: counters another process may read at any time (a benchmark taking
 * kicks and interrupts per request); each is written by its queue's thread alone,
 * with single 64-bit stores */
struct qstats {
	uint64_t requests, kicks, wakes, calls, batches;
};

static void count(uint64_t *c, uint64_t n)
{
	__atomic_store_n(c, *c + n, __ATOMIC_RELAXED);
}

#define MAX_QUEUES 65
static struct qstats private_stats[MAX_QUEUES], *stats = private_stats;

static struct {
	int sock;
	uint64_t features, protocol, status;
	bool event_idx;
	int nregions;
	struct region regions[VU_MAX_REGIONS];
	int nq;
	struct queue q[MAX_QUEUES];
	int initialized; /* FUSE_INIT done (atomic: every queue thread reads it) */
	int needs_reset; /* a queue broke (atomic) */
} dev;

static struct {
	const char *socket, *tag, *stats;
	int queues;
	bool event_idx, once, verbose, die_with_parent;
} opt = {NULL, "null", NULL, 1, true, false, false, false};

static volatile sig_atomic_t stopping;

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("nulldev: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

#define debug(...) do { if (opt.verbose) say(__VA_ARGS__); } while (0)

/* Guest-physical -> our pointer, only when [gpa, gpa+len) lies in one region. */
static uint8_t *gpa_to_host(uint64_t gpa, uint64_t len)
{
	for (int i = 0; i < dev.nregions; i++) {
		struct region *r = &dev.regions[i];
		if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
			return r->host + (gpa - r->gpa);
	}
	return NULL;
}

static uint8_t *uva_to_host(uint64_t uva, uint64_t len)
{
	for (int i = 0; i < dev.nregions; i++) {
		struct region *r = &dev.regions[i];
		if (uva >= r->uva && uva - r->uva < r->size && len <= r->size - (uva - r->uva))
			return r->host + (uva - r->uva);
	}
	return NULL;
}

/* ---- one request chain ----------------------------------------------------------------- */
struct seg {
	uint8_t *p;
	uint32_t len;
};

struct chain {
	struct seg rd[MAX_SEGS], wr[MAX_SEGS];
	int nr, nw;
	uint64_t rlen, wlen;
};

struct qerr {
	char msg[160];
};

static int chain_fault(struct qerr *e, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
	return -1;
}

/* Walk and validate a descriptor chain. The table is read once per descriptor into
 * a local copy, so a driver rewriting it under us cannot make us use a value we
 * did not check. */
static int chain_walk(struct queue *q, uint16_t head, struct chain *c, struct qerr *e)
{
	c->nr = c->nw = 0;
	c->rlen = c->wlen = 0;
	if (head >= q->num)
		return chain_fault(e, "head %u out of range (size %u)", head, q->num);
	unsigned i = head, count = 0;
	for (;;) {
		struct vring_desc d;
		memcpy(&d, (const void *)&q->desc[i], sizeof(d));
		if (++count > q->num)
			return chain_fault(e, "chain from head %u loops (more than %u descriptors)",
					   head, q->num);
		if (d.flags & VRING_DESC_F_INDIRECT)
			return chain_fault(e, "descriptor %u is indirect (not negotiated)", i);
		uint8_t *p = gpa_to_host(d.addr, d.len);
		if (p == NULL && d.len)
			return chain_fault(e, "descriptor %u: %#llx+%u outside guest memory", i,
					   (unsigned long long)d.addr, d.len);
		if (d.flags & VRING_DESC_F_WRITE) {
			if (c->nw == MAX_SEGS)
				return chain_fault(e, "chain from head %u: over %d writable descriptors",
						   head, MAX_SEGS);
			c->wr[c->nw++] = (struct seg){p, d.len};
			c->wlen += d.len;
		} else {
			if (c->nw)
				return chain_fault(e, "descriptor %u: readable after writable", i);
			if (c->nr == MAX_SEGS)
				return chain_fault(e, "chain from head %u: over %d readable descriptors",
						   head, MAX_SEGS);
			c->rd[c->nr++] = (struct seg){p, d.len};
			c->rlen += d.len;
		}
		if (!(d.flags & VRING_DESC_F_NEXT))
			return 0;
		if (d.next >= q->num)
			return chain_fault(e, "descriptor %u: next %u out of range (size %u)", i,
					   d.next, q->num);
		i = d.next;
	}
}

static size_t chain_read(const struct chain *c, void *dst, size_t n)
{
	size_t done = 0;
	for (int i = 0; i < c->nr && done < n; i++) {
		size_t k = c->rd[i].len < n - done ? c->rd[i].len : n - done;
		memcpy((uint8_t *)dst + done, c->rd[i].p, k);
		done += k;
	}
	return done;
}

/* Copy `n` bytes (or, with src NULL, pattern bytes for file offset `foff`) into the
 * writable part at offset `off`; the caller checked off + n <= wlen. */
static void chain_put(const struct chain *c, uint64_t off, const void *src, uint64_t foff, size_t n)
{
	const uint8_t *s = src;
	for (int i = 0; i < c->nw && n; i++) {
		if (off >= c->wr[i].len) {
			off -= c->wr[i].len;
			continue;
		}
		size_t k = c->wr[i].len - off < n ? c->wr[i].len - off : n;
		if (s) {
			memcpy(c->wr[i].p + off, s, k);
			s += k;
		} else {
			/* pattern: fill in pieces of at most MAX_WRITE from the shifted table */
			size_t left = k;
			uint8_t *d = c->wr[i].p + off;
			while (left) {
				size_t m = left < MAX_WRITE ? left : MAX_WRITE;
				memcpy(d, pattern_table + foff % PATTERN_MOD, m);
				d += m;
				foff += m;
				left -= m;
			}
		}
		n -= k;
		off = 0;
	}
}

/* ---- FUSE replies ------------------------------------------------------------------------ */
static const struct node *node_of(uint64_t ino)
{
	return ino >= 1 && ino <= NNODES ? &NODES[ino - 1] : NULL;
}

static void fill_attr(struct fuse_attr *a, const struct node *n)
{
	memset(a, 0, sizeof(*a));
	a->ino = n->ino;
	a->size = n->size;
	a->blocks = (n->size + 511) / 512;
	a->atime = a->mtime = a->ctime = start_time;
	a->mode = n->mode;
	a->nlink = n->kind == K_DIR ? 2 : 1;
	a->blksize = PAGE_SIZE;
}

static void fill_entry(struct fuse_entry_out *o, const struct node *n)
{
	memset(o, 0, sizeof(*o));
	o->nodeid = n->ino;
	o->entry_valid = o->attr_valid = attr_timeout;
	fill_attr(&o->attr, n);
}

#define ARGS_MAX 8192 /* request bytes copied out of guest memory: headers, names */

struct reply {
	uint8_t buf[8192];
	size_t len;       /* payload bytes in buf (after the out header) */
	uint64_t extra;   /* READ data written straight into the chain after buf */
	const struct node *data_node;
	uint64_t data_off;
	int error;        /* negative errno, or 0 */
	bool none;        /* no reply at all (FORGET, BATCH_FORGET, INTERRUPT) */
};

static int do_readdir(struct reply *r, const struct fuse_rw_in *in, bool plus, uint64_t room)
{
	static const char *const names[] = {".", "..", "hello", "pattern", "null"};
	static const uint64_t inos[] = {1, 1, 2, 3, 4};
	size_t pos = 0;
	uint64_t limit = room < sizeof(r->buf) ? room : sizeof(r->buf);
	limit = in->size < limit ? in->size : limit;
	for (uint64_t k = in->offset; k < 5; k++) {
		size_t nl = strlen(names[k]);
		size_t dsz = (sizeof(struct fuse_dirent) + nl + 7) & ~(size_t)7;
		size_t esz = plus ? sizeof(struct fuse_entry_out) : 0;
		if (pos + esz + dsz > limit)
			break;
		const struct node *n = node_of(inos[k]);
		if (plus) {
			struct fuse_entry_out eo;
			if (k >= 2)
				fill_entry(&eo, n);
			else
				memset(&eo, 0, sizeof(eo)); /* nodeid 0: the kernel skips . and .. */
			memcpy(r->buf + pos, &eo, esz);
			pos += esz;
		}
		struct fuse_dirent *d = (struct fuse_dirent *)(r->buf + pos);
		memset(d, 0, dsz);
		d->ino = n->ino;
		d->off = k + 1;
		d->namelen = nl;
		d->type = (n->mode >> 12) & 0xf;
		memcpy(d->name, names[k], nl);
		pos += dsz;
	}
	r->len = pos;
	return 0;
}

/* Build the reply to one request; `room` is the writable payload room after the
 * out header. Returns the error (negative errno) or 0. */
static int serve_fuse(const struct fuse_in_header *h, const uint8_t *args, size_t alen,
		      uint64_t body_len, uint64_t room, struct reply *r)
{
	const struct node *n = node_of(h->nodeid);
	switch (h->opcode) {
	case FUSE_INIT: {
		struct fuse_init_in in = {0};
		if (alen < 16)
			return -EINVAL;
		memcpy(&in, args, alen < sizeof(in) ? alen : sizeof(in));
		if (in.major != 7)
			return -EPROTO;
		struct fuse_init_out o = {0};
		o.major = 7;
		o.minor = in.minor < 38 ? in.minor : 38;
		o.max_readahead = in.max_readahead;
		o.flags = in.flags & INIT_GRANTED;
		o.max_background = 64;
		o.congestion_threshold = 48;
		o.max_write = MAX_WRITE;
		o.time_gran = 1;
		o.max_pages = MAX_WRITE / PAGE_SIZE;
		memcpy(r->buf, &o, sizeof(o));
		r->len = o.minor >= 23 ? sizeof(o) : 24;
		__atomic_store_n(&dev.initialized, 1, __ATOMIC_RELEASE);
		return 0;
	}
	case FUSE_FORGET:
	case FUSE_BATCH_FORGET:
	case FUSE_INTERRUPT:
		r->none = true;
		return 0;
	}
	if (!__atomic_load_n(&dev.initialized, __ATOMIC_ACQUIRE))
		return -EIO; /* nothing before FUSE_INIT */
	switch (h->opcode) {
	case FUSE_DESTROY:
		__atomic_store_n(&dev.initialized, 0, __ATOMIC_RELEASE);
		return 0;
	case FUSE_LOOKUP: {
		if (h->nodeid != 1)
			return n ? -ENOTDIR : -ENOENT;
		if (alen == 0 || args[alen - 1] != 0)
			return -EINVAL; /* the name must be NUL-terminated */
		if (strlen((const char *)args) > 255)
			return -ENAMETOOLONG; /* as a file system's NAME_MAX says */
		for (size_t i = 1; i < NNODES; i++)
			if (strcmp((const char *)args, NODES[i].name) == 0) {
				fill_entry((struct fuse_entry_out *)r->buf, &NODES[i]);
				r->len = sizeof(struct fuse_entry_out);
				return 0;
			}
		return -ENOENT;
	}
	case FUSE_GETATTR:
	case FUSE_SETATTR: {
		if (!n)
			return -ENOENT;
		struct fuse_attr_out *o = (struct fuse_attr_out *)r->buf;
		memset(o, 0, sizeof(*o));
		o->attr_valid = attr_timeout;
		fill_attr(&o->attr, n);
		r->len = sizeof(*o);
		return 0;
	}
	case FUSE_OPEN:
	case FUSE_OPENDIR: {
		if (!n)
			return -ENOENT;
		if ((n->kind == K_DIR) != (h->opcode == FUSE_OPENDIR))
			return n->kind == K_DIR ? -EISDIR : -ENOTDIR;
		struct fuse_open_out o = {.fh = n->ino};
		memcpy(r->buf, &o, sizeof(o));
		r->len = sizeof(o);
		return 0;
	}
	case FUSE_READ: {
		struct fuse_rw_in in;
		if (alen < sizeof(in))
			return -EINVAL;
		memcpy(&in, args, sizeof(in));
		if (!n)
			return -ENOENT;
		if (n->kind == K_DIR)
			return -EISDIR;
		uint64_t want = in.size < room ? in.size : room;
		uint64_t avail = in.offset < n->size ? n->size - in.offset : 0;
		uint64_t k = want < avail ? want : avail;
		if (n->kind == K_TEXT) {
			memcpy(r->buf, HELLO + in.offset, k);
			r->len = k;
		} else {
			r->extra = k;
			r->data_node = n;
			r->data_off = in.offset;
		}
		return 0;
	}
	case FUSE_WRITE: {
		struct fuse_rw_in in;
		if (alen < sizeof(in))
			return -EINVAL;
		memcpy(&in, args, sizeof(in));
		if (!n)
			return -ENOENT;
		if (n->kind == K_DIR)
			return -EISDIR;
		if (in.size > body_len - sizeof(in))
			return -EINVAL; /* fewer data bytes than it announces */
		struct fuse_write_out o = {.size = in.size};
		memcpy(r->buf, &o, sizeof(o));
		r->len = sizeof(o);
		return 0;
	}
	case FUSE_STATFS: {
		struct fuse_statfs_out o = {.blocks = 1 << 20, .bfree = 1 << 20, .bavail = 1 << 20,
					    .files = NNODES, .bsize = PAGE_SIZE,
					    .namelen = 255, .frsize = PAGE_SIZE};
		memcpy(r->buf, &o, sizeof(o));
		r->len = sizeof(o);
		return 0;
	}
	case FUSE_RELEASE:
	case FUSE_RELEASEDIR:
	case FUSE_FLUSH:
	case FUSE_FSYNC:
	case FUSE_FSYNCDIR:
	case FUSE_SYNCFS:
	case FUSE_ACCESS:
		return n || h->opcode == FUSE_SYNCFS ? 0 : -ENOENT;
	case FUSE_GETXATTR:
		return -ENODATA;
	case FUSE_LISTXATTR: {
		struct fuse_getxattr_io in;
		if (alen < sizeof(in))
			return -EINVAL;
		memcpy(&in, args, sizeof(in));
		if (in.size == 0) {
			struct fuse_getxattr_io o = {0};
			memcpy(r->buf, &o, sizeof(o));
			r->len = sizeof(o);
		}
		return 0; /* no attributes: an empty list */
	}
	case FUSE_READDIR:
	case FUSE_READDIRPLUS: {
		struct fuse_rw_in in;
		if (alen < sizeof(in))
			return -EINVAL;
		memcpy(&in, args, sizeof(in));
		if (!n)
			return -ENOENT;
		if (n->kind != K_DIR)
			return -ENOTDIR;
		return do_readdir(r, &in, h->opcode == FUSE_READDIRPLUS, room);
	}
	case FUSE_SYMLINK: case FUSE_MKNOD: case FUSE_MKDIR: case FUSE_UNLINK: case FUSE_RMDIR:
	case FUSE_RENAME: case FUSE_RENAME2: case FUSE_LINK: case FUSE_CREATE: case FUSE_TMPFILE:
	case FUSE_SETXATTR: case FUSE_REMOVEXATTR:
		return -EROFS;
	default:
		return -ENOSYS;
	}
}

/* Serve one chain; returns the bytes written into its writable part, or -1 when
 * the chain breaks the ring rules (message in e). */
static long serve_chain(struct queue *q, uint16_t head, struct chain *c, struct reply *r,
			struct qerr *e)
{
	if (chain_walk(q, head, c, e) < 0)
		return -1;
	uint8_t req[ARGS_MAX];
	size_t got = chain_read(c, req, sizeof(req));
	struct fuse_in_header h;
	if (got < sizeof(h)) {
		say("queue %d: request of %llu bytes, shorter than a fuse_in_header: no reply",
		    q->index, (unsigned long long)c->rlen);
		return 0;
	}
	memcpy(&h, req, sizeof(h));
	r->len = 0;
	r->extra = 0;
	r->data_node = NULL;
	r->none = false;
	uint64_t room = c->wlen >= sizeof(struct fuse_out_header)
		? c->wlen - sizeof(struct fuse_out_header) : 0;
	int err;
	if (h.len != c->rlen) {
		say("queue %d: unique %llu opcode %u: header says %u bytes, chain has %llu",
		    q->index, (unsigned long long)h.unique, h.opcode, h.len,
		    (unsigned long long)c->rlen);
		err = -EINVAL;
	} else {
		size_t alen = got - sizeof(h);
		err = serve_fuse(&h, req + sizeof(h), alen, c->rlen - sizeof(h), room, r);
	}
	if (r->none)
		return 0;
	if (err) {
		r->len = 0;
		r->extra = 0;
	}
	if (c->wlen < sizeof(struct fuse_out_header)) {
		say("queue %d: unique %llu opcode %u: %llu writable bytes, no room for a reply",
		    q->index, (unsigned long long)h.unique, h.opcode, (unsigned long long)c->wlen);
		return 0;
	}
	if (r->len + r->extra > room) {
		say("queue %d: unique %llu opcode %u: reply of %zu bytes, room for %llu: EIO",
		    q->index, (unsigned long long)h.unique, h.opcode, r->len,
		    (unsigned long long)room);
		err = -EIO;
		r->len = r->extra = 0;
	}
	struct fuse_out_header o = {
		.len = sizeof(o) + r->len + r->extra, .error = err, .unique = h.unique};
	chain_put(c, 0, &o, 0, sizeof(o));
	if (r->len)
		chain_put(c, sizeof(o), r->buf, 0, r->len);
	if (r->extra && r->data_node->kind == K_PATTERN)
		chain_put(c, sizeof(o) + r->len, NULL, r->data_off, r->extra);
	return o.len;
}

/* ---- the queue thread ------------------------------------------------------------------- */
static bool need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
	return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static void queue_broken(struct queue *q, const char *why)
{
	say("queue %d broken: %s; the queue stops (device needs reset)", q->index, why);
	q->broken = true;
	__atomic_store_n(&dev.needs_reset, 1, __ATOMIC_RELEASE);
}

/* Publish the used entries added since `*old` and interrupt the driver unless it
 * suppressed that. */
static void publish(struct queue *q, uint16_t *old)
{
	if (q->used_idx == *old)
		return;
	/* release: the used elements are visible before the index that covers them */
	__atomic_store_n(&q->used->idx, q->used_idx, __ATOMIC_RELEASE);
	/* full fence: our used->idx store must be visible before we read used_event or
	 * avail->flags, or we could miss the driver's request for an interrupt (it
	 * writes used_event, then reads used->idx: a store->load pattern) */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	bool signal;
	if (dev.event_idx)
		signal = need_event(__atomic_load_n(q->used_event, __ATOMIC_RELAXED), q->used_idx, *old);
	else
		signal = !(__atomic_load_n(&q->avail->flags, __ATOMIC_RELAXED) &
			   VRING_AVAIL_F_NO_INTERRUPT);
	*old = q->used_idx;
	q->batches++;
	count(&q->total->batches, 1);
	if (signal && q->call_fd >= 0) {
		q->calls++;
		count(&q->total->calls, 1);
		if (eventfd_write(q->call_fd, 1) < 0)
			say("queue %d: call failed: %s", q->index, strerror(errno));
	}
}

/* Serve what is available; false when the ring is broken. */
static bool process(struct queue *q, struct chain *c, struct reply *r)
{
	/* acquire: the ring entries and descriptors are read after the index */
	uint16_t avail = __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE);
	uint16_t pending = avail - q->last_avail;
	if (pending > q->num) {
		char why[96];
		snprintf(why, sizeof(why), "avail idx %u is %u past our %u, more than the size %u",
			 avail, pending, q->last_avail, q->num);
		queue_broken(q, why);
		return false;
	}
	uint16_t old = q->used_idx;
	while (q->last_avail != avail) {
		uint16_t head = __atomic_load_n(&q->avail->ring[q->last_avail % q->num],
						__ATOMIC_RELAXED);
		struct qerr e;
		long n = serve_chain(q, head, c, r, &e);
		if (n < 0) {
			publish(q, &old);
			queue_broken(q, e.msg);
			return false;
		}
		q->last_avail++;
		struct vring_used_elem *u = &q->used->ring[q->used_idx % q->num];
		u->id = head;
		u->len = (uint32_t)n;
		q->used_idx++;
		q->requests++;
		count(&q->total->requests, 1);
		if ((uint16_t)(q->used_idx - old) >= 32)
			publish(q, &old); /* long batches: let the driver start on the first */
	}
	publish(q, &old);
	return true;
}

static void notifications(struct queue *q, bool on)
{
	if (dev.event_idx) {
		if (on) /* kick me when you make entry last_avail available */
			__atomic_store_n(q->avail_event, q->last_avail, __ATOMIC_RELAXED);
		return; /* off: avail_event stays behind, so the driver does not kick */
	}
	__atomic_store_n(&q->used->flags, on ? 0 : VRING_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
}

static void *queue_main(void *arg)
{
	struct queue *q = arg;
	char name[16];
	snprintf(name, sizeof(name), "nulldev-q%d", q->index);
	pthread_setname_np(pthread_self(), name);
	struct chain *c = malloc(sizeof(*c));
	struct reply *r = malloc(sizeof(*r));
	if (!c || !r) {
		say("queue %d: out of memory", q->index);
		exit(1);
	}
	struct pollfd p[2] = {{.fd = q->kick_fd, .events = POLLIN}, {.fd = q->stop_fd, .events = POLLIN}};
	for (;;) {
		while (!q->broken) {
			notifications(q, false);
			if (!process(q, c, r))
				break;
			notifications(q, true);
			/* full fence: the re-enable store is visible before we look at avail idx
			 * again; else the driver may add, see notifications off, and not kick */
			__atomic_thread_fence(__ATOMIC_SEQ_CST);
			if (__atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE) == q->last_avail)
				break;
		}
		if (poll(p, 2, -1) < 0 && errno != EINTR) {
			say("queue %d: poll: %s", q->index, strerror(errno));
			break;
		}
		if (p[1].revents)
			break;
		if (p[0].revents) {
			eventfd_t v;
			if (eventfd_read(q->kick_fd, &v) == 0) {
				q->kicks += v; /* the counter sums the driver's writes */
				count(&q->total->kicks, v);
			}
			q->wakes++;
			count(&q->total->wakes, 1);
		}
	}
	free(c);
	free(r);
	return NULL;
}

static void queue_stop(struct queue *q)
{
	if (!q->running)
		return;
	eventfd_write(q->stop_fd, 1);
	pthread_join(q->thread, NULL);
	close(q->stop_fd);
	q->running = false;
	debug("queue %d stopped: %llu requests, %llu wakes, %llu calls", q->index,
	      (unsigned long long)q->requests, (unsigned long long)q->wakes,
	      (unsigned long long)q->calls);
}

static bool rings_mapped(struct queue *q)
{
	unsigned n = q->num;
	q->desc = (struct vring_desc *)uva_to_host(q->desc_uva, 16ull * n);
	q->avail = (struct vring_avail *)uva_to_host(q->avail_uva, 6 + 2ull * n);
	q->used = (struct vring_used *)uva_to_host(q->used_uva, 6 + 8ull * n);
	if (!q->desc || !q->avail || !q->used)
		return false;
	q->used_event = &q->avail->ring[n];
	q->avail_event = (uint16_t *)&q->used->ring[n];
	return true;
}

static void queue_maybe_start(struct queue *q)
{
	bool live = !(dev.protocol & PROTO_STATUS) || (dev.status & STATUS_DRIVER_OK);
	if (q->running || !q->addr_set || !q->kicked || !q->enabled || !live || q->broken)
		return;
	if (!rings_mapped(q)) {
		say("queue %d: ring addresses outside guest memory; not started", q->index);
		return;
	}
	q->stop_fd = eventfd(0, EFD_CLOEXEC);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old); /* signals go to the control thread */
	int rc = pthread_create(&q->thread, NULL, queue_main, q);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc) {
		say("queue %d: pthread_create: %s", q->index, strerror(rc));
		close(q->stop_fd);
		return;
	}
	q->running = true;
	debug("queue %d started (size %u, event_idx %d)", q->index, q->num, dev.event_idx);
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void unmap_regions(void)
{
	for (int i = 0; i < dev.nregions; i++)
		munmap(dev.regions[i].map, dev.regions[i].map_len);
	dev.nregions = 0;
}

static void device_reset(void)
{
	for (int i = 0; i < MAX_QUEUES; i++) {
		struct queue *q = &dev.q[i];
		queue_stop(q);
		close_fd(&q->kick_fd);
		close_fd(&q->call_fd);
		memset(q, 0, sizeof(*q));
		q->total = &stats[i];
		q->index = i;
		q->kick_fd = q->call_fd = q->stop_fd = -1;
	}
	dev.nq = 1 + opt.queues;
	dev.features = dev.protocol = dev.status = 0;
	dev.event_idx = false;
	__atomic_store_n(&dev.initialized, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&dev.needs_reset, 0, __ATOMIC_RELEASE);
}

/* ---- control: vhost-user messages ----------------------------------------------------------- */
static int recv_all(int fd, void *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t k = recv(fd, (uint8_t *)buf + done, n - done, 0);
		if (k == 0)
			return -1;
		if (k < 0) {
			if (errno == EINTR && !stopping)
				continue;
			return -1;
		}
		done += k;
	}
	return 0;
}

/* One message: 0, or -1 when the frontend went away (or a malformed header). */
static int recv_msg(struct vu_header *h, uint8_t *payload, int *fds, int *nfds)
{
	char control[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
	struct iovec iov = {h, sizeof(*h)};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
			   .msg_controllen = sizeof(control)};
	ssize_t k;
	do {
		k = recvmsg(dev.sock, &m, MSG_CMSG_CLOEXEC);
	} while (k < 0 && errno == EINTR && !stopping);
	*nfds = 0;
	if (k <= 0)
		return -1; /* (the control buffer is only valid after data arrived) */
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			int n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			if (n > VU_MAX_FDS - *nfds)
				n = VU_MAX_FDS - *nfds; /* MSG_CTRUNC already: cannot be more */
			memcpy(fds + *nfds, CMSG_DATA(cm), n * sizeof(int));
			*nfds += n;
		}
	if (m.msg_flags & MSG_CTRUNC) {
		say("message %u came with more than %d fds", h->request, VU_MAX_FDS);
		return -1;
	}
	if (k < (ssize_t)sizeof(*h) && recv_all(dev.sock, (uint8_t *)h + k, sizeof(*h) - k) < 0)
		return -1;
	if ((h->flags & VU_VERSION_MASK) != VU_VERSION || h->size > VU_MAX_PAYLOAD) {
		say("malformed message: request %u flags %#x size %u", h->request, h->flags, h->size);
		return -1;
	}
	return h->size ? recv_all(dev.sock, payload, h->size) : 0;
}

static void send_reply(uint32_t request, const void *payload, uint32_t size)
{
	uint8_t buf[sizeof(struct vu_header) + VU_MAX_PAYLOAD];
	struct vu_header h = {request, VU_VERSION | VU_FLAG_REPLY, size};
	memcpy(buf, &h, sizeof(h));
	if (size)
		memcpy(buf + sizeof(h), payload, size);
	size_t n = sizeof(h) + size, done = 0;
	while (done < n) {
		ssize_t k = send(dev.sock, buf + done, n - done, MSG_NOSIGNAL);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return; /* the frontend is gone; the next recv says so */
		}
		done += k;
	}
}

static void send_u64(uint32_t request, uint64_t v)
{
	send_reply(request, &v, sizeof(v));
}

static uint8_t config_space[44];

static void make_config(void)
{
	memset(config_space, 0, sizeof(config_space));
	memcpy(config_space, opt.tag, strlen(opt.tag)); /* NUL-padded, 36 bytes at most */
	uint32_t nrq = opt.queues, nbs = 0;
	memcpy(config_space + 36, &nrq, 4);
	memcpy(config_space + 40, &nbs, 4);
}

struct vring_state {
	uint32_t index, num;
};

struct vring_addr {
	uint32_t index, flags;
	uint64_t desc, used, avail, log;
};

/* Returns 0 on success, -1 to refuse (NACK); replies itself for GET_* messages. */
static int handle(const struct vu_header *h, const uint8_t *p, int *fds, int nfds)
{
	uint64_t u = 0;
	struct vring_state st = {0};
	if (h->size >= 8)
		memcpy(&u, p, 8);
	memcpy(&st, p, h->size < sizeof(st) ? h->size : sizeof(st));
	struct queue *q = NULL;
	switch (h->request) {
	case VU_SET_VRING_NUM: case VU_SET_VRING_ADDR: case VU_SET_VRING_BASE:
	case VU_GET_VRING_BASE: case VU_SET_VRING_ENABLE:
		if (h->size < sizeof(st) || st.index >= (unsigned)dev.nq) {
			say("request %u: queue index %u outside 0..%d", h->request, st.index, dev.nq - 1);
			if (h->request == VU_GET_VRING_BASE)
				send_reply(h->request, &st, sizeof(st));
			return -1;
		}
		q = &dev.q[st.index];
		break;
	case VU_SET_VRING_KICK: case VU_SET_VRING_CALL: case VU_SET_VRING_ERR:
		if (h->size < 8 || (u & VU_VRING_IDX_MASK) >= (unsigned)dev.nq) {
			say("request %u: queue index %llu outside 0..%d", h->request,
			    (unsigned long long)(u & VU_VRING_IDX_MASK), dev.nq - 1);
			return -1;
		}
		q = &dev.q[u & VU_VRING_IDX_MASK];
		break;
	}
	switch (h->request) {
	case VU_GET_FEATURES:
		send_u64(h->request, F_VERSION_1 | F_PROTOCOL_FEATURES |
			 (opt.event_idx ? F_EVENT_IDX : 0));
		return 0;
	case VU_SET_FEATURES: {
		uint64_t offered = F_VERSION_1 | F_PROTOCOL_FEATURES | (opt.event_idx ? F_EVENT_IDX : 0);
		if (h->size < 8 || u & ~offered) {
			say("SET_FEATURES %#llx: not all offered", (unsigned long long)u);
			return -1;
		}
		for (int i = 0; i < dev.nq; i++)
			if (dev.q[i].running) {
				say("SET_FEATURES while queue %d runs", i);
				return -1;
			}
		dev.features = u;
		dev.event_idx = u & F_EVENT_IDX;
		return 0;
	}
	case VU_GET_PROTOCOL_FEATURES:
		send_u64(h->request, PROTOCOL_FEATURES);
		return 0;
	case VU_SET_PROTOCOL_FEATURES:
		if (h->size < 8 || u & ~PROTOCOL_FEATURES)
			return -1;
		dev.protocol = u;
		return 0;
	case VU_SET_OWNER:
		return 0;
	case VU_RESET_OWNER:
		for (int i = 0; i < dev.nq; i++)
			queue_stop(&dev.q[i]);
		return 0;
	case VU_GET_QUEUE_NUM:
		send_u64(h->request, dev.nq);
		return 0;
	case VU_SET_MEM_TABLE: {
		uint32_t nreg;
		if (h->size < 8)
			return -1;
		memcpy(&nreg, p, 4);
		if (nreg == 0 || nreg > VU_MAX_REGIONS || (int)nreg != nfds ||
		    h->size < 8 + nreg * sizeof(struct vu_region)) {
			say("SET_MEM_TABLE: %u regions, %d fds, %u bytes", nreg, nfds, h->size);
			return -1;
		}
		bool was[MAX_QUEUES];
		for (int i = 0; i < dev.nq; i++) {
			was[i] = dev.q[i].running;
			queue_stop(&dev.q[i]);
		}
		unmap_regions();
		for (uint32_t i = 0; i < nreg; i++) {
			struct vu_region vr;
			memcpy(&vr, p + 8 + i * sizeof(vr), sizeof(vr));
			size_t len = vr.size + vr.mmap_offset;
			if (vr.size == 0 || len < vr.size) {
				say("SET_MEM_TABLE: region %u of size %llu", i, (unsigned long long)vr.size);
				unmap_regions();
				return -1;
			}
			void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], 0);
			if (m == MAP_FAILED) {
				say("SET_MEM_TABLE: mmap of region %u: %s", i, strerror(errno));
				unmap_regions();
				return -1;
			}
			dev.regions[dev.nregions++] = (struct region){
				vr.gpa, vr.size, vr.uva, (uint8_t *)m + vr.mmap_offset, m, len};
		}
		for (int i = 0; i < dev.nq; i++)
			if (was[i])
				queue_maybe_start(&dev.q[i]);
		return 0;
	}
	case VU_SET_VRING_NUM:
		if (q->running || st.num == 0 || st.num > MAX_QUEUE_SIZE)
			return -1;
		q->num = st.num;
		return 0;
	case VU_SET_VRING_ADDR: {
		struct vring_addr a;
		if (h->size < sizeof(a) || q->running || q->num == 0)
			return -1;
		memcpy(&a, p, sizeof(a));
		if (a.desc % 16 || a.avail % 2 || a.used % 4) {
			say("queue %u: misaligned ring addresses", st.index);
			return -1;
		}
		q->desc_uva = a.desc;
		q->avail_uva = a.avail;
		q->used_uva = a.used;
		if (!rings_mapped(q)) {
			say("queue %u: ring addresses outside guest memory", st.index);
			return -1;
		}
		q->addr_set = true;
		return 0;
	}
	case VU_SET_VRING_BASE:
		if (q->running)
			return -1;
		q->base = q->last_avail = st.num;
		return 0;
	case VU_GET_VRING_BASE: {
		queue_stop(q); /* the ring stops; it starts again with the next KICK */
		q->kicked = false;
		close_fd(&q->kick_fd);
		struct vring_state r = {st.index, q->last_avail};
		send_reply(h->request, &r, sizeof(r));
		return 0;
	}
	case VU_SET_VRING_KICK:
	case VU_SET_VRING_CALL:
	case VU_SET_VRING_ERR: {
		int fd = -1;
		if (!(u & VU_VRING_NOFD)) {
			if (nfds < 1)
				return -1;
			fd = fds[0];
			fds[0] = -1; /* taken */
		}
		if (h->request == VU_SET_VRING_ERR) {
			if (fd >= 0)
				close(fd);
			return 0;
		}
		bool was = q->running;
		queue_stop(q);
		if (h->request == VU_SET_VRING_CALL) {
			close_fd(&q->call_fd);
			q->call_fd = fd;
		} else {
			if (fd < 0) {
				say("queue %d: polled rings (no kick fd) are not supported", q->index);
				return -1;
			}
			close_fd(&q->kick_fd);
			q->kick_fd = fd;
			if (!q->kicked) {
				/* the ring (re)starts here, as in libvhost-user: our used index is
				 * the ring's, the avail one the base we were given */
				q->kicked = true;
				q->last_avail = q->base;
				if (rings_mapped(q))
					q->used_idx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
				if (!(dev.features & F_PROTOCOL_FEATURES))
					q->enabled = true;
			}
			was = true;
		}
		if (was)
			queue_maybe_start(q);
		return 0;
	}
	case VU_SET_VRING_ENABLE:
		if (st.num > 1)
			return -1;
		q->enabled = st.num;
		if (q->enabled)
			queue_maybe_start(q);
		else
			queue_stop(q);
		return 0;
	case VU_GET_CONFIG: {
		uint32_t off, size;
		uint8_t out[12 + sizeof(config_space)];
		if (h->size < 12) {
			send_reply(h->request, NULL, 0);
			return -1;
		}
		memcpy(&off, p, 4);
		memcpy(&size, p + 4, 4);
		if (size != h->size - 12 || off > sizeof(config_space) ||
		    size > sizeof(config_space) - off) {
			say("GET_CONFIG of %u bytes at %u outside %zu", size, off, sizeof(config_space));
			send_reply(h->request, NULL, 0);
			return -1;
		}
		memcpy(out, p, 12);
		memcpy(out + 12, config_space + off, size);
		send_reply(h->request, out, 12 + size);
		return 0;
	}
	case VU_SET_STATUS: {
		if (!(dev.protocol & PROTO_STATUS) || h->size < 8)
			return -1;
		uint64_t s = u & 0xff;
		if (s == 0) {
			for (int i = 0; i < dev.nq; i++)
				queue_stop(&dev.q[i]);
			dev.status = 0;
			__atomic_store_n(&dev.needs_reset, 0, __ATOMIC_RELEASE);
			for (int i = 0; i < dev.nq; i++)
				dev.q[i].broken = false;
			return 0;
		}
		if (s & STATUS_FEATURES_OK && !(dev.status & STATUS_FEATURES_OK) && !dev.features)
			s &= ~STATUS_FEATURES_OK; /* no feature set to accept */
		dev.status = s;
		if (s & STATUS_DRIVER_OK)
			for (int i = 0; i < dev.nq; i++)
				queue_maybe_start(&dev.q[i]);
		return 0;
	}
	case VU_GET_STATUS:
		send_u64(h->request, dev.status |
			 (__atomic_load_n(&dev.needs_reset, __ATOMIC_ACQUIRE) ? STATUS_NEEDS_RESET : 0));
		return 0;
	default:
		say("unsupported vhost-user request %u", h->request);
		switch (h->request) { /* those with a defined reply still get one */
		case 36: /* GET_MAX_MEM_SLOTS */
			send_u64(h->request, 0);
		}
		return -1;
	}
}

static bool has_reply(uint32_t request)
{
	switch (request) {
	case VU_GET_FEATURES: case VU_GET_PROTOCOL_FEATURES: case VU_GET_QUEUE_NUM:
	case VU_GET_VRING_BASE: case VU_GET_CONFIG: case VU_GET_STATUS: case 36:
		return true;
	}
	return false;
}

static void print_stats(void)
{
	uint64_t total = 0;
	for (int i = 0; i < dev.nq; i++)
		total += dev.q[i].requests;
	if (!total)
		return;
	for (int i = 0; i < dev.nq; i++) {
		struct queue *q = &dev.q[i];
		if (q->requests)
			say("queue %d: %llu requests, %llu kicks, %llu wakes, %llu interrupts, "
			    "%llu batches", i, (unsigned long long)q->requests,
			    (unsigned long long)q->kicks, (unsigned long long)q->wakes,
			    (unsigned long long)q->calls, (unsigned long long)q->batches);
	}
}

static void serve_connection(void)
{
	static uint8_t payload[VU_MAX_PAYLOAD];
	device_reset();
	for (;;) {
		struct vu_header h;
		int fds[VU_MAX_FDS], nfds;
		if (recv_msg(&h, payload, fds, &nfds) < 0) {
			for (int i = 0; i < nfds; i++)
				close(fds[i]);
			break;
		}
		debug("request %u flags %#x size %u fds %d", h.request, h.flags, h.size, nfds);
		int rc = handle(&h, payload, fds, nfds);
		for (int i = 0; i < nfds; i++)
			if (fds[i] >= 0)
				close(fds[i]);
		if (rc < 0)
			say("request %u refused", h.request);
		if (!has_reply(h.request) && (h.flags & VU_FLAG_NEED_REPLY) &&
		    (dev.protocol & PROTO_REPLY_ACK))
			send_u64(h.request, rc < 0 ? 1 : 0);
	}
	for (int i = 0; i < dev.nq; i++)
		queue_stop(&dev.q[i]);
	print_stats();
	device_reset();
	unmap_regions();
	close(dev.sock);
	dev.sock = -1;
}

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: nulldev --socket PATH [--queues N] [--tag TAG] [--no-event-idx]\n"
		   "               [--attr-timeout S] [--stats FILE] [--die-with-parent] [--once] [-v]\n"
		   "A null vhost-user virtio-fs device: canned replies at C speed, one thread per\n"
		   "queue. --queues is num_request_queues (1..64, default 1).\n");
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"socket", required_argument, NULL, 's'}, {"queues", required_argument, NULL, 'q'},
		{"tag", required_argument, NULL, 't'}, {"no-event-idx", no_argument, NULL, 'E'},
		{"attr-timeout", required_argument, NULL, 'a'}, {"once", no_argument, NULL, 'o'},
		{"stats", required_argument, NULL, 'S'}, {"die-with-parent", no_argument, NULL, 'P'}, {"verbose", no_argument, NULL, 'v'}, {"help", no_argument, NULL, 'h'}, {0}};
	int ch;
	while ((ch = getopt_long(argc, argv, "s:q:t:a:S:ovh", longopts, NULL)) != -1) {
		switch (ch) {
		case 's': opt.socket = optarg; break;
		case 'q': opt.queues = atoi(optarg); break;
		case 't': opt.tag = optarg; break;
		case 'E': opt.event_idx = false; break;
		case 'a': attr_timeout = strtoull(optarg, NULL, 10); break;
		case 'o': opt.once = true; break;
		case 'S': opt.stats = optarg; break;
		case 'P': opt.die_with_parent = true; break;
		case 'v': opt.verbose = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!opt.socket || opt.queues < 1 || opt.queues > MAX_QUEUES - 1 || !opt.tag[0] ||
	    strlen(opt.tag) > 36) {
		usage(stderr);
		return 2;
	}
	/* a benchmark killed outright must not leave its device listening forever */
	if (opt.die_with_parent && prctl(PR_SET_PDEATHSIG, SIGTERM) < 0)
		say("PR_SET_PDEATHSIG: %s", strerror(errno));
	start_time = time(NULL);
	make_config();
	pattern_table = malloc(PATTERN_MOD + MAX_WRITE);
	if (!pattern_table)
		return 1;
	for (size_t i = 0; i < PATTERN_MOD + MAX_WRITE; i++)
		pattern_table[i] = i % PATTERN_MOD;
	if (opt.stats) {
		/* per queue: requests, kicks (eventfd writes), wakes, interrupts, batches */
		size_t len = sizeof(struct qstats) * MAX_QUEUES;
		int fd = open(opt.stats, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0 || ftruncate(fd, len) < 0 ||
		    (stats = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
			say("--stats %s: %s", opt.stats, strerror(errno));
			return 1;
		}
		close(fd);
	}
	for (int i = 0; i < MAX_QUEUES; i++) {
		dev.q[i].kick_fd = dev.q[i].call_fd = dev.q[i].stop_fd = -1;
		dev.q[i].total = &stats[i];
	}

	struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: accept/recv return */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(opt.socket) >= sizeof(addr.sun_path)) {
		say("socket path too long");
		return 2;
	}
	strcpy(addr.sun_path, opt.socket);
	unlink(opt.socket);
	if (bind(ls, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(ls, 1) < 0) {
		say("%s: %s", opt.socket, strerror(errno));
		return 1;
	}
	say("listening on %s: %d request queue(s), tag %s, event_idx %s", opt.socket, opt.queues,
	    opt.tag, opt.event_idx ? "offered" : "not offered");
	while (!stopping) {
		dev.sock = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (dev.sock < 0) {
			if (errno == EINTR)
				continue;
			say("accept: %s", strerror(errno));
			break;
		}
		serve_connection();
		if (opt.once)
			break;
	}
	close(ls);
	unlink(opt.socket);
	return 0;
}
