/* An in-memory virtio device for the native core's C tests: ring memory (split or
 * packed) and the device side of both layouts, written from the spec (virtio 1.2
 * 2.7 and 2.8), not from driver/native, so that a test compares the driver with an
 * independent reading of the rules. Device addresses are host pointers.
 *
 * Shared by the unit tests (test_core.c, test_hiprio_client.c: x86-64 and
 * aarch64), budget.c (the instruction budget) and pump_bench.c. Header-only
 * (static inline): include it in each translation unit that needs it.
 */
#ifndef RINGDEV_H
#define RINGDEV_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vfsdrv_core.h"

#define RD_F_NEXT 1
#define RD_F_WRITE 2
#define RD_F_INDIRECT 4
#define RD_F_AVAIL (1u << 7)
#define RD_F_USED (1u << 15)
#define RD_MAX_SEGS 80

struct rd_ring {
    uint32_t size;
    int packed;
    uint8_t *desc;      /* split: descriptor table; packed: the descriptor ring */
    uint8_t *avail;     /* split: avail ring; packed: driver event area */
    uint8_t *used;      /* split: used ring; packed: device event area */
    uint8_t *indirect;  /* indirect_heads * VFSDRV_INDIRECT_MAX descriptors */
    uint32_t indirect_heads;
};

/* what the device saw of one chain */
struct rd_chain {
    uint16_t head;      /* split: head descriptor; packed: buffer id */
    uint16_t entries;   /* ring entries the chain took (packed: the used skip) */
    int indirect;
    uint32_t n;
    struct { uint64_t addr; uint32_t len; int write; } seg[RD_MAX_SEGS];
};

/* the device's private state: the driver never sees these */
struct rd_dev {
    struct rd_ring *r;
    uint16_t last_avail;   /* split: next avail entry; packed: ring position */
    uint16_t used_idx;     /* split: next used idx; packed: ring position */
    int avail_wrap, used_wrap;  /* packed */
};

static inline void *rd_zalloc(size_t n)
{
    void *p = aligned_alloc(4096, (n + 4095) & ~(size_t)4095);
    if (p)
        memset(p, 0, n);
    return p;
}

static inline void rd_ring_init(struct rd_ring *r, uint32_t size, int packed, uint32_t indirect_heads)
{
    memset(r, 0, sizeof *r);
    r->size = size;
    r->packed = packed;
    r->desc = rd_zalloc(16 * (size_t)size);
    r->avail = rd_zalloc(packed ? 4 : 6 + 2 * (size_t)size);
    r->used = rd_zalloc(packed ? 4 : 6 + 8 * (size_t)size);
    r->indirect_heads = indirect_heads;
    if (indirect_heads)
        r->indirect = rd_zalloc((size_t)indirect_heads * VFSDRV_INDIRECT_MAX * 16);
}

static inline void rd_ring_free(struct rd_ring *r)
{
    free(r->desc);
    free(r->avail);
    free(r->used);
    free(r->indirect);
}

static inline int rd_vq_init(struct vfsdrv_vq *vq, struct rd_ring *r, int event_idx)
{
    if (r->packed)
        return vfsdrv_vq_init_packed(vq, 0, r->size, r->desc, r->avail, r->used, r->indirect,
                                     (uint64_t)(uintptr_t)r->indirect, r->indirect_heads,
                                     event_idx);
    return vfsdrv_vq_init(vq, 0, r->size, r->desc, r->avail, r->used, r->indirect,
                          (uint64_t)(uintptr_t)r->indirect, r->indirect_heads, event_idx);
}

static inline void rd_dev_init(struct rd_dev *d, struct rd_ring *r)
{
    memset(d, 0, sizeof *d);
    d->r = r;
    d->avail_wrap = d->used_wrap = 1;
}

static inline uint16_t rd_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* one descriptor {addr, len, flags(split)|id(packed), next(split)|flags(packed)} */
static inline void rd_add_seg(struct rd_chain *c, const uint8_t *d, uint16_t flags)
{
    if (c->n < RD_MAX_SEGS) {
        c->seg[c->n].addr = rd_u64(d);
        c->seg[c->n].len = rd_u32(d + 8);
        c->seg[c->n].write = !!(flags & RD_F_WRITE);
    }
    c->n++;
}

/* an indirect table (split and packed use the same entry size; split follows next,
 * packed lists the entries in order) */
static inline void rd_walk_table(struct rd_chain *c, const uint8_t *d, int packed)
{
    uint64_t table = rd_u64(d);
    uint32_t count = rd_u32(d + 8) / 16;
    const uint8_t *t = (const uint8_t *)(uintptr_t)table;
    c->indirect = 1;
    if (packed) {
        for (uint32_t i = 0; i < count; i++)
            rd_add_seg(c, t + 16 * i, rd_u16(t + 16 * i + 14));
        return;
    }
    for (uint32_t i = 0, guard = 0; guard <= count; guard++) {
        uint16_t fl = rd_u16(t + 16 * i + 12);
        rd_add_seg(c, t + 16 * i, fl);
        if (!(fl & RD_F_NEXT))
            break;
        i = rd_u16(t + 16 * i + 14);
    }
}

/* Take the next available chain. 1: got one; 0: none. The index (split) or the
 * head's flags (packed) are read with acquire before the entries they expose. */
static inline int rd_pop(struct rd_dev *d, struct rd_chain *c)
{
    struct rd_ring *r = d->r;
    memset(c, 0, offsetof(struct rd_chain, seg));
    if (!r->packed) {
        uint16_t avail_idx = vfsdrv_load_acquire_u16(r->avail + 2);
        if (avail_idx == d->last_avail)
            return 0;
        uint16_t head = rd_u16(r->avail + 4 + 2 * (d->last_avail & (r->size - 1)));
        d->last_avail++;
        c->head = head;
        uint16_t i = head;
        for (uint32_t guard = 0; guard < r->size; guard++) {
            const uint8_t *e = r->desc + 16 * (size_t)i;
            uint16_t fl = rd_u16(e + 12);
            c->entries++;
            if (fl & RD_F_INDIRECT) {
                rd_walk_table(c, e, 0);
                break;
            }
            rd_add_seg(c, e, fl);
            if (!(fl & RD_F_NEXT))
                break;
            i = rd_u16(e + 14);
        }
        return 1;
    }
    uint16_t pos = d->last_avail;
    uint16_t fl = vfsdrv_load_acquire_u16(r->desc + 16 * (size_t)pos + 14);
    int avail = !!(fl & RD_F_AVAIL), used = !!(fl & RD_F_USED);
    if (avail != d->avail_wrap || used == d->avail_wrap)
        return 0;
    for (;;) {
        const uint8_t *e = r->desc + 16 * (size_t)pos;
        fl = rd_u16(e + 14);
        c->entries++;
        c->head = rd_u16(e + 12);  /* the buffer id: the last entry's counts */
        if (fl & RD_F_INDIRECT)
            rd_walk_table(c, e, 1);
        else
            rd_add_seg(c, e, fl);
        if (++pos == r->size) {
            pos = 0;
            d->avail_wrap ^= 1;
        }
        if (!(fl & RD_F_NEXT) || c->entries >= r->size)
            break;
    }
    d->last_avail = pos;
    return 1;
}

/* Return a buffer: `entries` is the packed used skip (the chain's ring entries). */
static inline void rd_push(struct rd_dev *d, uint32_t id, uint32_t len, uint16_t entries)
{
    struct rd_ring *r = d->r;
    if (!r->packed) {
        uint8_t *e = r->used + 4 + 8 * (size_t)(d->used_idx & (r->size - 1));
        memcpy(e, &id, 4);
        memcpy(e + 4, &len, 4);
        d->used_idx++;
        vfsdrv_store_release_u16(r->used + 2, d->used_idx);
        return;
    }
    uint8_t *e = r->desc + 16 * (size_t)d->used_idx;
    uint16_t id16 = (uint16_t)id;
    memcpy(e + 8, &len, 4);
    memcpy(e + 12, &id16, 2);
    uint16_t fl = d->used_wrap ? (RD_F_AVAIL | RD_F_USED) : 0;
    vfsdrv_store_release_u16(e + 14, fl);
    uint32_t next = d->used_idx + (uint32_t)entries;
    if (next >= r->size) {
        next -= r->size;
        d->used_wrap ^= 1;
    }
    d->used_idx = (uint16_t)next;
}

static inline int rd_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* A device about to sleep until the next kick: with EVENT_IDX (split) ask for a
 * kick once the driver passes what it has taken (avail_event), then look at the
 * ring again: a chain published before that store was seen would get no kick.
 * 1: more is available now (do not sleep). */
static inline int rd_want_kicks(struct rd_dev *d, int event_idx)
{
    struct rd_ring *r = d->r;
    if (!r->packed && event_idx)
        vfsdrv_store_u16(r->used + 4 + 8 * (size_t)r->size, d->last_avail);
    vfsdrv_mb();  /* store->load, as the driver's publish does on its side */
    if (!r->packed)
        return vfsdrv_load_acquire_u16(r->avail + 2) != d->last_avail;
    uint16_t fl = vfsdrv_load_acquire_u16(r->desc + 16 * (size_t)d->last_avail + 14);
    return !!(fl & RD_F_AVAIL) == d->avail_wrap && !!(fl & RD_F_USED) != d->avail_wrap;
}

/* Whether the driver wants an interrupt for the used entries returned since
 * `old` (split: used idx; packed: ring position), as vhost decides it: split
 * with EVENT_IDX against used_event, without it the NO_INTERRUPT flag; packed
 * the driver area's flags (DESC: its offset and wrap). */
static inline int rd_should_signal(struct rd_dev *d, int event_idx, uint16_t old)
{
    struct rd_ring *r = d->r;
    vfsdrv_mb();  /* our used entries before the driver's wish: it may just have re-armed */
    if (!r->packed) {
        if (event_idx)
            return rd_need_event(rd_u16(r->avail + 4 + 2 * (size_t)r->size), d->used_idx, old);
        return !(rd_u16(r->avail) & 1);
    }
    uint32_t area;
    memcpy(&area, r->avail, 4);
    uint16_t off_wrap = (uint16_t)area, flags = (uint16_t)(area >> 16);
    if (flags != 2 /* DESC */)
        return flags != 1 /* DISABLE */;
    uint16_t event = off_wrap & 0x7FFF;
    if ((off_wrap >> 15) != d->used_wrap)
        event = (uint16_t)(event - r->size);
    return rd_need_event(event, d->used_idx, old);
}

/* the driver's notification wish as the device reads it (split: used->flags; the
 * avail_event otherwise is the device's to write) */
static inline void rd_set_no_notify(struct rd_dev *d, int on)
{
    if (!d->r->packed)
        vfsdrv_store_u16(d->r->used, on ? 1 : 0);
    else
        vfsdrv_store_u16(d->r->used + 2, on ? 1 /* DISABLE */ : 0 /* ENABLE */);
}

#endif
