/* vfsdrv native core: barriers, the split virtqueue (driver side; a packed queue
 * is handed to packed.c at the top of each vfsdrv_vq_* call) and the FUSE
 * rules every request path uses (reply room per opcode, request layout in a slot,
 * validation of a device's reply). The relay's pump (pump.c) and the Python core
 * (vfsdrv.virtio.virtqueue, vfsdrv.fs) both call these: each rule exists once.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfsdrv_core.h"
#include "ring.h"  /* after vfsdrv_core.h, which has no include guard (cffi reads it) */

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio rings are little-endian; this core stores fields natively"
#endif

/* Fences. On aarch64 the device (a DMA master) is in the outer-shareable domain,
 * so the barriers are "dmb osh*" (what Linux's dma_*mb() use for
 * VIRTIO_F_ORDER_PLATFORM), which also order against other CPUs. On x86-64 (TSO)
 * the C11 fences suffice: only the full fence emits an instruction (gcc's locked
 * "or" on the stack, which orders write-back memory and the uncached BAR mappings
 * vfio-pci gives; we never map BARs write-combining). */
#if defined(__aarch64__)
#define MB()  __asm__ __volatile__("dmb osh" ::: "memory")
#define RMB() __asm__ __volatile__("dmb oshld" ::: "memory")
#define WMB() __asm__ __volatile__("dmb oshst" ::: "memory")
#else
#define MB()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define RMB() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define WMB() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif

void vfsdrv_mb(void) { MB(); }
void vfsdrv_rmb(void) { RMB(); }
void vfsdrv_wmb(void) { WMB(); }

/* A single naturally sized store: the other side never sees half of it (a 2-byte
 * memcpy may be done byte by byte). */
void vfsdrv_store_u16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
/* release: every earlier store (descriptors, ring entries) is visible first */
void vfsdrv_store_release_u16(void *p, uint16_t v)
{ WMB(); __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
/* acquire: no later load (used entries) is satisfied before this one */
uint16_t vfsdrv_load_acquire_u16(void *p)
{ uint16_t v = __atomic_load_n((uint16_t *)p, __ATOMIC_RELAXED); RMB(); return v; }
uint32_t vfsdrv_load_acquire_u32(void *p)
{ uint32_t v = __atomic_load_n((uint32_t *)p, __ATOMIC_RELAXED); RMB(); return v; }
/* MMIO: volatile, naturally sized, after a full fence so that ring writes reach
 * memory before the device is told to look at them. */
uint8_t vfsdrv_mmio_read8(void *p) { MB(); return *(volatile uint8_t *)p; }
uint16_t vfsdrv_mmio_read16(void *p) { MB(); return *(volatile uint16_t *)p; }
uint32_t vfsdrv_mmio_read32(void *p) { MB(); return *(volatile uint32_t *)p; }
void vfsdrv_mmio_write8(void *p, uint8_t v) { MB(); *(volatile uint8_t *)p = v; }
void vfsdrv_mmio_write16(void *p, uint16_t v) { MB(); *(volatile uint16_t *)p = v; }
void vfsdrv_mmio_write32(void *p, uint32_t v) { MB(); *(volatile uint32_t *)p = v; }

/* ------------------------------------------------------------------------------
 * Split virtqueue. Layout (virtio 1.2 2.7):
 *   desc  16 * size  {le64 addr; le32 len; le16 flags; le16 next}
 *   avail flags, idx, ring[size], used_event
 *   used  flags, idx, ring[size] {le32 id; le32 len}, avail_event
 */
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
_Static_assert(sizeof(struct desc) == 16, "virtq_desc is 16 bytes");

#define AVAIL_IDX(vq) ((vq)->avail + 2)
#define AVAIL_RING(vq, i) ((vq)->avail + 4 + 2 * (i))
#define USED_EVENT(vq) ((vq)->avail + 4 + 2 * (vq)->size)
#define USED_IDX(vq) ((vq)->used + 2)
#define USED_ELEM(vq, i) ((vq)->used + 4 + 8 * (i))
#define AVAIL_EVENT(vq) ((vq)->used + 4 + 8 * (vq)->size)

int vfsdrv_ring_fail(struct vfsdrv_vq *vq, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(vq->error, sizeof vq->error, "queue %u%s: ", vq->index,
                     vq->packed ? " (packed)" : "");
    if (n > 0 && (size_t)n < sizeof vq->error)
        vsnprintf(vq->error + n, sizeof vq->error - n, fmt, ap);
    va_end(ap);
    return rc;
}
#define fail vfsdrv_ring_fail

int vfsdrv_chain_check(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n,
                       uint32_t *writable)
{
    if (n == 0)
        return fail(vq, -EINVAL, "a chain needs at least one buffer");
    if (n > vq->size)
        return fail(vq, -EINVAL, "chain of %u descriptors exceeds queue size %u", n, vq->size);
    uint64_t total = 0, wlen = 0;
    int in_write = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (segs[i].flags & VFSDRV_SEG_WRITE) {
            in_write = 1;
            wlen += segs[i].len;
        } else if (in_write) {
            return fail(vq, -EINVAL, "device-readable buffer after a writable one");
        }
        total += segs[i].len;
    }
    if (total > 0xFFFFFFFFu)
        return fail(vq, -EINVAL, "a chain must not exceed 2^32 bytes");
    *writable = (uint32_t)wlen;
    return 0;
}

int vfsdrv_vq_init(struct vfsdrv_vq *vq, uint32_t index, uint32_t size, uint8_t *desc,
                   uint8_t *avail, uint8_t *used, uint8_t *indirect, uint64_t indirect_addr,
                   uint32_t indirect_heads, int event_idx)
{
    memset(vq, 0, sizeof *vq);
    vq->index = (uint16_t)index;
    if (size == 0 || size > 32768 || (size & (size - 1)))
        return fail(vq, -EINVAL, "size %u is not a power of two <= 32768", size);
    return vfsdrv_ring_setup(vq, size, desc, avail, used, indirect, indirect_addr,
                             indirect_heads, event_idx);
}

int vfsdrv_ring_shadow_init(struct vfsdrv_vq *vq, uint32_t size)
{
    vq->next = calloc(size, sizeof *vq->next);
    vq->chain_len = calloc(size, sizeof *vq->chain_len);
    vq->writable = calloc(size, sizeof *vq->writable);
    vq->seen = calloc(size, sizeof *vq->seen);
    if (!vq->next || !vq->chain_len || !vq->writable || !vq->seen) {
        vfsdrv_vq_destroy(vq);
        return fail(vq, -ENOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < size; i++)
        vq->next[i] = (uint16_t)((i + 1) % size);
    vq->num_free = (uint16_t)size;
    return 0;
}

void vfsdrv_vq_destroy(struct vfsdrv_vq *vq)
{
    free(vq->order);  /* packed with IN_ORDER only (packed.c) */
    vq->order = NULL;
    free(vq->next);
    free(vq->chain_len);
    free(vq->writable);
    free(vq->seen);
    vq->next = vq->chain_len = NULL;
    vq->writable = vq->seen = NULL;
}

static void put_desc(uint8_t *table, uint32_t i, uint64_t addr, uint32_t len, uint16_t flags,
                     uint16_t next)
{
    struct desc d = {addr, len, flags, next};
    memcpy(table + 16 * (size_t)i, &d, sizeof d);  /* read by the device only after publish */
}

int vfsdrv_vq_add(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n)
{
    if (vq->packed)
        return vfsdrv_packed_add(vq, segs, n);
    uint32_t writable;
    int rc = vfsdrv_chain_check(vq, segs, n, &writable);
    if (rc)
        return rc;
    int indirect = vq->use_indirect && n > 1 && n <= VFSDRV_INDIRECT_MAX &&
                   vq->free_head < vq->indirect_heads;
    uint32_t needed = indirect ? 1 : n;
    if (vq->num_free < needed)
        return fail(vq, -ENOSPC, "%u descriptors free, %u needed", vq->num_free, needed);
    uint16_t head = vq->free_head;
    if (indirect) {
        size_t table_off = (size_t)head * VFSDRV_INDIRECT_MAX * 16;
        uint8_t *table = vq->indirect + table_off;
        for (uint32_t i = 0; i < n; i++) {
            uint16_t flags = (segs[i].flags & VFSDRV_SEG_WRITE) ? F_WRITE : 0;
            int last = i == n - 1;
            put_desc(table, i, segs[i].addr, segs[i].len, last ? flags : flags | F_NEXT,
                     last ? 0 : (uint16_t)(i + 1));
        }
        put_desc(vq->desc, head, vq->indirect_addr + table_off, n * 16, F_INDIRECT, 0);
        vq->free_head = vq->next[head];
    } else {
        uint16_t d = head;
        for (uint32_t i = 0; i < n; i++) {
            uint16_t flags = (segs[i].flags & VFSDRV_SEG_WRITE) ? F_WRITE : 0;
            uint16_t nxt = vq->next[d];
            int last = i == n - 1;
            put_desc(vq->desc, d, segs[i].addr, segs[i].len, last ? flags : flags | F_NEXT,
                     last ? 0 : nxt);
            d = nxt;
        }
        vq->free_head = d;
    }
    vq->num_free -= needed;
    vq->chain_len[head] = (uint16_t)needed;
    vq->writable[head] = (uint32_t)writable;
    vq->in_flight++;
    /* the device reads the entry only after the release of avail->idx; still one
     * naturally sized store, never a byte-wise copy */
    uint16_t slot = vq->avail_idx & (vq->size - 1);
    vfsdrv_store_u16(AVAIL_RING(vq, slot), head);
    vq->avail_idx++;
    return head;
}

static int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

int vfsdrv_vq_publish(struct vfsdrv_vq *vq)
{
    if (vq->packed)
        return vfsdrv_packed_publish(vq);
    uint16_t new_idx = vq->avail_idx, old = vq->published;
    if (new_idx == old)
        return 0;
    /* release: descriptors and ring entries before the index that exposes them */
    vfsdrv_store_release_u16(AVAIL_IDX(vq), new_idx);
    vq->published = new_idx;
    /* store->load: our index must be visible before we read the device's
     * suppression state, or both sides may decide the other will act (x86 too) */
    MB();
    if (vq->event_idx)
        return need_event(__atomic_load_n((uint16_t *)AVAIL_EVENT(vq), __ATOMIC_RELAXED),
                          new_idx, old);
    return !(__atomic_load_n((uint16_t *)vq->used, __ATOMIC_RELAXED) & USED_F_NO_NOTIFY);
}

int vfsdrv_vq_used_pending(struct vfsdrv_vq *vq)
{
    if (vq->packed)
        return vfsdrv_packed_used_pending(vq);
    return (uint16_t)(vfsdrv_load_acquire_u16(USED_IDX(vq)) - vq->last_used);
}

int vfsdrv_vq_harvest(struct vfsdrv_vq *vq, struct vfsdrv_used *out, uint32_t max)
{
    if (vq->packed)
        return vfsdrv_packed_harvest(vq, out, max);
    /* acquire: the entries are read after the index that says they are there */
    uint16_t idx = vfsdrv_load_acquire_u16(USED_IDX(vq));
    uint32_t pending = (uint16_t)(idx - vq->last_used);
    if (pending == 0)
        return 0;
    if (pending > vq->in_flight)
        return fail(vq, -EIO, "used index %u is %u ahead of %u, but only %u chains are in flight",
                    idx, pending, vq->last_used, vq->in_flight);
    if (pending > max)
        pending = max;
    if (++vq->seen_gen == 0) {  /* stamps wrapped: forget them all */
        memset(vq->seen, 0, vq->size * sizeof *vq->seen);
        vq->seen_gen = 1;
    }
    /* validate the whole batch before completing any of it: a bad entry leaves the
     * queue as it was (no completion lost, none duplicated) */
    uint16_t pos = vq->last_used;
    for (uint32_t i = 0; i < pending; i++, pos++) {
        uint32_t e[2];
        memcpy(e, USED_ELEM(vq, pos & (vq->size - 1)), 8);
        uint32_t id = e[0], len = e[1];
        if (id >= vq->size)
            return fail(vq, -EIO, "used id %u out of range (size %u)", id, vq->size);
        if (vq->chain_len[id] == 0 || vq->seen[id] == vq->seen_gen)
            return fail(vq, -EIO, "used id %u is not in flight", id);
        if (len > vq->writable[id])
            return fail(vq, -EIO, "used length %u exceeds the %u device-writable bytes of chain %u",
                        len, vq->writable[id], id);
        vq->seen[id] = vq->seen_gen;
        out[i].id = id;
        out[i].len = len;
    }
    for (uint32_t i = 0; i < pending; i++) {
        uint16_t head = (uint16_t)out[i].id, tail = head;
        for (uint16_t k = 1; k < vq->chain_len[head]; k++)
            tail = vq->next[tail];
        vfsdrv_ring_put_free(vq, head, tail);
    }
    vq->last_used = pos;
    if (vq->event_idx && vq->interrupts_on)
        vfsdrv_store_u16(USED_EVENT(vq), vq->last_used);
    return (int)pending;
}

int vfsdrv_vq_arm(struct vfsdrv_vq *vq)
{
    if (vq->packed)
        return vfsdrv_packed_arm(vq);
    vq->interrupts_on = 1;
    if (vq->event_idx)
        vfsdrv_store_u16(USED_EVENT(vq), vq->last_used);
    else
        vfsdrv_store_u16(vq->avail, 0);
    /* store->load: the re-arm is visible before we look at used->idx again, so a
     * completion that raced with it is either seen now or interrupts us */
    MB();
    return vfsdrv_load_acquire_u16(USED_IDX(vq)) != vq->last_used;
}

void vfsdrv_vq_disarm(struct vfsdrv_vq *vq)
{
    if (vq->packed) {
        vfsdrv_packed_disarm(vq);
        return;
    }
    vq->interrupts_on = 0;
    if (!vq->event_idx)  /* with EVENT_IDX used_event simply stops advancing */
        vfsdrv_store_u16(vq->avail, AVAIL_F_NO_INTERRUPT);
}

/* ------------------------------------------------------------------------------
 * FUSE rules.
 */
enum {
    OP_LOOKUP = 1, OP_FORGET = 2, OP_GETATTR = 3, OP_SETATTR = 4, OP_READLINK = 5,
    OP_SYMLINK = 6, OP_MKNOD = 8, OP_MKDIR = 9, OP_UNLINK = 10, OP_RMDIR = 11, OP_RENAME = 12,
    OP_LINK = 13, OP_OPEN = 14, OP_READ = 15, OP_WRITE = 16, OP_STATFS = 17, OP_RELEASE = 18,
    OP_FSYNC = 20, OP_SETXATTR = 21, OP_GETXATTR = 22, OP_LISTXATTR = 23, OP_REMOVEXATTR = 24,
    OP_FLUSH = 25, OP_INIT = 26, OP_OPENDIR = 27, OP_READDIR = 28, OP_RELEASEDIR = 29,
    OP_FSYNCDIR = 30, OP_GETLK = 31, OP_SETLK = 32, OP_SETLKW = 33, OP_ACCESS = 34,
    OP_CREATE = 35, OP_INTERRUPT = 36, OP_BMAP = 37, OP_DESTROY = 38, OP_POLL = 40,
    OP_NOTIFY_REPLY = 41, OP_BATCH_FORGET = 42, OP_FALLOCATE = 43, OP_READDIRPLUS = 44,
    OP_RENAME2 = 45, OP_LSEEK = 46, OP_COPY_FILE_RANGE = 47, OP_SYNCFS = 50, OP_TMPFILE = 51,
};

/* reply payload sizes (tests/test_native_layout.py checks them against the FUSE structs) */
#define ENTRY_OUT 128
#define ATTR_OUT 104
#define OPEN_OUT 16
#define WRITE_OUT 8
#define STATFS_OUT 80
#define LK_OUT 24
#define INIT_OUT 64
#define LSEEK_OUT 8
#define GETXATTR_OUT 8
#define PATH_MAX_ 4096
#define UNKNOWN_REPLY 4096

static uint32_t le32_at(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Bytes of device-writable room after the out header, sized exactly per opcode
 * (virtiofsd fills the whole writable part of a READ, so spare room is not
 * harmless). VFSDRV_NO_REPLY: the request gets no reply (hiprio). */
uint32_t vfsdrv_reply_capacity(uint32_t opcode, const uint8_t *args, uint32_t args_len,
                               uint32_t max_io)
{
    switch (opcode) {
    case OP_FORGET: case OP_BATCH_FORGET: case OP_INTERRUPT:
        return VFSDRV_NO_REPLY;
    case OP_LOOKUP: case OP_MKNOD: case OP_MKDIR: case OP_SYMLINK: case OP_LINK:
        return ENTRY_OUT;
    case OP_GETATTR: case OP_SETATTR:
        return ATTR_OUT;
    case OP_READLINK:
        return PATH_MAX_;
    case OP_OPEN: case OP_OPENDIR:
        return OPEN_OUT;
    case OP_CREATE: case OP_TMPFILE:
        return ENTRY_OUT + OPEN_OUT;
    case OP_WRITE: case OP_COPY_FILE_RANGE:
        return WRITE_OUT;
    case OP_STATFS:
        return STATFS_OUT;
    case OP_GETLK:
        return LK_OUT;
    case OP_INIT:
        return INIT_OUT;
    case OP_LSEEK: case OP_BMAP: case OP_POLL:
        return 8;
    case OP_UNLINK: case OP_RMDIR: case OP_RENAME: case OP_RENAME2: case OP_RELEASE:
    case OP_RELEASEDIR: case OP_FSYNC: case OP_FSYNCDIR: case OP_FLUSH: case OP_SETXATTR:
    case OP_REMOVEXATTR: case OP_SETLK: case OP_SETLKW: case OP_ACCESS: case OP_FALLOCATE:
    case OP_DESTROY: case OP_SYNCFS: case OP_NOTIFY_REPLY:
        return 0;
    case OP_READ: case OP_READDIR: case OP_READDIRPLUS: {
        if (args_len < 20)  /* fuse_read_in.size at offset 16 */
            return 0;
        uint32_t size = le32_at(args + 16);
        return size < max_io ? size : max_io;
    }
    case OP_GETXATTR: case OP_LISTXATTR: {
        if (args_len < 4)
            return 0;
        uint32_t size = le32_at(args);
        if (size == 0)
            return GETXATTR_OUT;
        return size < max_io ? size : max_io;
    }
    default:
        return UNKNOWN_REPLY;
    }
}

/* Where a request starts in its slot: a WRITE's data (after the two 40-byte
 * headers) lands on a page boundary, as O_DIRECT in the backend requires. */
uint32_t vfsdrv_request_offset(uint32_t opcode)
{
    return opcode == OP_WRITE ? VFSDRV_PAGE - VFSDRV_WRITE_HEADERS : 0;
}

/* Where the reply goes: its out header 16 bytes before a page boundary, so the
 * payload (READ data) is page-aligned. */
uint32_t vfsdrv_reply_offset(uint32_t request_off, uint32_t in_len)
{
    uint64_t end = (uint64_t)request_off + in_len + VFSDRV_OUT_HEADER;
    return (uint32_t)(((end + VFSDRV_PAGE - 1) & ~(uint64_t)(VFSDRV_PAGE - 1)) - VFSDRV_OUT_HEADER);
}

/* Requests during which a sound device that serves its queue in order may answer
 * nothing else for long: an FSYNC or FSYNCDIR (the host's disk writes back what it
 * holds). While one is in flight, -o request_timeout's "nothing completed" rule is
 * quiet for that queue. */
int vfsdrv_may_hold_queue(uint32_t opcode)
{
    return opcode == 20 /* FSYNC */ || opcode == 30 /* FSYNCDIR */;
}

/* Requests a sound device may take any time over: those above, and a SETLKW (a
 * device without the notification queue holds it until the lock is free; it
 * serves the rest meanwhile, or the holder's unlock could not reach it).
 * -o request_timeout does not count them, in the pumps and in the pyfuse3
 * frontend alike. */
int vfsdrv_may_take_long(uint32_t opcode)
{
    return opcode == 33 /* SETLKW */ || vfsdrv_may_hold_queue(opcode);
}

/* The kernel's /dev/fuse takes error 0 or -1..-511 (fuse_dev_do_write refuses
 * error <= -512 and > 0 with EINVAL and leaves the request pending forever). */
int vfsdrv_valid_errno(int32_t error)
{
    return error <= 0 && error >= -VFSDRV_MAX_REPLY_ERRNO;
}

/* Validate a reply the device wrote. The header is copied out of DMA memory
 * first and only the copy is judged and forwarded: the device cannot change the
 * unique or the length after the check. Returns 0 (copy is the header to send,
 * copy->error may be VFSDRV_LOCK_WAIT when may_wait) or -EIO (why says why; copy
 * is an EIO reply to send instead). */
int vfsdrv_check_reply(const uint8_t *reply, uint32_t used_len, uint64_t unique,
                       uint32_t opcode, uint32_t cap, int may_wait,
                       struct vfsdrv_out_header *copy, char *why, uint32_t why_len)
{
    struct vfsdrv_out_header h;
    if (opcode == OP_DESTROY && used_len == 0) {
        /* the session is over: a device may hand the buffer back empty (the Rust
         * virtiofsd does); that is not a fault */
        copy->len = VFSDRV_OUT_HEADER;
        copy->error = 0;
        copy->unique = unique;
        return 0;
    }
    if (used_len < VFSDRV_OUT_HEADER) {
        snprintf(why, why_len, "used length %u is shorter than the out header", used_len);
        goto bad;
    }
    memcpy(&h, reply, sizeof h);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);  /* h is ours from here on: no re-read */
    if (h.unique != unique) {
        snprintf(why, why_len, "reply unique %llu != request unique %llu",
                 (unsigned long long)h.unique, (unsigned long long)unique);
        goto bad;
    }
    if (h.len < VFSDRV_OUT_HEADER || h.len > used_len) {
        snprintf(why, why_len, "out header len %u outside 16..%u (used length)", h.len, used_len);
        goto bad;
    }
    if (cap != VFSDRV_NO_REPLY && h.len - VFSDRV_OUT_HEADER > cap) {
        snprintf(why, why_len, "reply of %u bytes exceeds the %u bytes of room", h.len, cap);
        goto bad;
    }
    if (h.error > 0) {
        if (!(h.error == VFSDRV_LOCK_WAIT && may_wait && h.len == VFSDRV_OUT_HEADER)) {
            snprintf(why, why_len, "positive error %d in reply to opcode %u", h.error, opcode);
            goto bad;
        }
    } else if (!vfsdrv_valid_errno(h.error)) {
        snprintf(why, why_len, "error %d out of range (the kernel takes -1..-%d)", h.error,
                 VFSDRV_MAX_REPLY_ERRNO);
        goto bad;
    } else if (h.error != 0 && h.len != VFSDRV_OUT_HEADER) {
        snprintf(why, why_len, "error reply %d carries %u payload bytes", h.error,
                 h.len - VFSDRV_OUT_HEADER);
        goto bad;
    }
    *copy = h;
    return 0;
bad:
    copy->len = VFSDRV_OUT_HEADER;
    copy->error = -EIO;
    copy->unique = unique;
    return -EIO;
}
