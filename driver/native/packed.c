/* vfsdrv native core: the packed virtqueue, driver side (VIRTIO_F_RING_PACKED,
 * virtio 1.2 2.8). core.c's vfsdrv_vq_* functions hand a packed queue to these,
 * so the pump and the Python wrapper drive both layouts through one interface.
 *
 * Layout: one descriptor ring of `size` entries {le64 addr; le32 len; le16 id;
 * le16 flags}, a driver event suppression area (written by us) and a device event
 * suppression area (written by the device), each {le16 off_wrap; le16 flags}.
 * In struct vfsdrv_vq: desc = the ring, avail = the driver area, used = the
 * device area. A chain takes consecutive ring entries; its buffer id (a head id,
 * as in split: < size) is what add() returns and harvest() reports.
 *
 * Ownership is in each descriptor's flags: the driver makes an entry available
 * with AVAIL = its wrap counter and USED = the inverse; the device marks the
 * chain's first entry used with AVAIL = USED = its wrap counter. Both counters
 * start at 1 and flip each time their position passes the end of the ring.
 *
 * Chains are exposed at add() (the head's flags, stored last with release, are
 * the publish point, as Linux's virtqueue_add_packed); publish() only decides
 * whether to notify. Completions may come in any order; with VIRTIO_F_IN_ORDER
 * (vfsdrv_vq_set_in_order, 2.8.18 "In-order use of descriptors") the device may
 * write one used entry for a batch, naming its last buffer: every buffer made
 * available before it completes too, "used completely" (its whole writable part),
 * and the device skips the batch's ring entries.
 *
 * Validation matches split: a used id out of range, not in flight or twice in one
 * batch, a length beyond the chain's writable part, a used entry when nothing is
 * in flight, or flags that are neither "available" nor "used" for the expected
 * wrap counter where a published chain must be (a device that flipped them
 * wrongly) fail with -EIO, the reason in vq->error, and change nothing: the whole
 * batch is checked before any of it completes. A device that never marks an entry
 * used cannot be told from a slow one here; the request's deadline (the caller's)
 * catches it, and the queue stays usable.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfsdrv_core.h"
#include "ring.h"  /* after vfsdrv_core.h, which has no include guard (cffi reads it) */

#define F_AVAIL (1u << 7)
#define F_USED (1u << 15)

#define EVENT_ENABLE 0
#define EVENT_DISABLE 1
#define EVENT_DESC 2
#define WRAP_BIT 15

struct pdesc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
_Static_assert(sizeof(struct pdesc) == 16, "pvirtq_desc is 16 bytes");

#define DESC_AT(vq, i) ((vq)->desc + 16 * (size_t)(i))
#define FLAGS_AT(vq, i) (DESC_AT(vq, i) + 14)

#define fail vfsdrv_ring_fail

/* the AVAIL/USED bits a driver writes to make an entry available in lap `wrap` */
static uint16_t avail_bits(int wrap)
{
    return wrap ? F_AVAIL : F_USED;
}

int vfsdrv_vq_init_packed(struct vfsdrv_vq *vq, uint32_t index, uint32_t size, uint8_t *ring,
                          uint8_t *driver_event, uint8_t *device_event, uint8_t *indirect,
                          uint64_t indirect_addr, uint32_t indirect_heads, int event_idx)
{
    memset(vq, 0, sizeof *vq);
    vq->index = (uint16_t)index;
    /* 2.8.10.1: any size up to 32768, not only powers of two */
    if (size == 0 || size > 32768)
        return fail(vq, -EINVAL, "size %u is not 1..32768", size);
    vq->packed = 1;
    vq->avail_wrap = 1;
    vq->used_wrap = 1;
    /* next[] is the free list of buffer ids: a chain holds at least one ring entry,
     * so with an entry free there is always an id free */
    int rc = vfsdrv_ring_setup(vq, size, ring, driver_event, device_event, indirect,
                               indirect_addr, indirect_heads, event_idx);
    if (rc)
        return rc;
    /* The ring is ours until the queue is enabled: zero it, so that no entry shows
     * flags of the first lap's colours (a reused ring would look used), and ask
     * for every interrupt (off_wrap 0, flags ENABLE) */
    memset(ring, 0, 16 * (size_t)size);
    __atomic_store_n((uint32_t *)vq->avail, 0, __ATOMIC_RELAXED);
    return 0;
}

/* VIRTIO_F_IN_ORDER negotiated: call after init, before the first add() */
int vfsdrv_vq_set_in_order(struct vfsdrv_vq *vq)
{
    if (!vq->packed)
        return fail(vq, -EINVAL, "in-order batches are implemented for packed rings only");
    if (vq->in_flight)
        return fail(vq, -EBUSY, "in-order mode set with buffers in flight");
    free(vq->order);
    vq->order = calloc(vq->size, sizeof *vq->order);
    if (!vq->order)
        return fail(vq, -ENOMEM, "out of memory");
    vq->order_head = 0;
    vq->in_order = 1;
    return 0;
}

int vfsdrv_packed_add(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n)
{
    uint32_t writable;
    int rc = vfsdrv_chain_check(vq, segs, n, &writable);
    if (rc)
        return rc;
    uint16_t id = vq->free_head;
    int indirect = vq->use_indirect && n > 1 && n <= VFSDRV_INDIRECT_MAX &&
                   id < vq->indirect_heads;
    uint32_t needed = indirect ? 1 : n;
    if (vq->num_free < needed)
        return fail(vq, -ENOSPC, "%u descriptors free, %u needed", vq->num_free, needed);

    uint16_t head = vq->next_avail, pos = head;
    int wrap = vq->avail_wrap;
    uint16_t head_flags;
    if (indirect) {
        /* 2.8.19: table entries in the packed format; WRITE is their only flag, the
         * id is reserved; the device learns the count from the ring entry's len */
        size_t table_off = (size_t)id * VFSDRV_INDIRECT_MAX * 16;
        uint8_t *table = vq->indirect + table_off;
        for (uint32_t i = 0; i < n; i++) {
            struct pdesc d = {segs[i].addr, segs[i].len, 0,
                              (segs[i].flags & VFSDRV_SEG_WRITE) ? F_WRITE : 0};
            memcpy(table + 16 * (size_t)i, &d, sizeof d);  /* read only after the head */
        }
        struct pdesc d = {vq->indirect_addr + table_off, n * 16, id, 0};
        memcpy(DESC_AT(vq, head), &d, 14);
        head_flags = F_INDIRECT | avail_bits(wrap);
        if (++pos == vq->size) {
            pos = 0;
            wrap ^= 1;
        }
    } else {
        head_flags = 0;
        for (uint32_t i = 0; i < n; i++) {
            /* each entry carries the wrap counter of its own position: a chain may
             * cross the end of the ring */
            uint16_t flags = ((segs[i].flags & VFSDRV_SEG_WRITE) ? F_WRITE : 0) |
                             (i + 1 < n ? F_NEXT : 0) | avail_bits(wrap);
            /* Linux writes the id into every entry; 2.8.6 needs it in the last */
            struct pdesc d = {segs[i].addr, segs[i].len, id, flags};
            if (i == 0) {
                memcpy(DESC_AT(vq, pos), &d, 14);  /* flags last, below */
                head_flags = flags;
            } else {
                /* the device reads these only after it saw the head available
                 * (acquire on its side, release of the head on ours) */
                memcpy(DESC_AT(vq, pos), &d, sizeof d);
            }
            if (++pos == vq->size) {
                pos = 0;
                wrap ^= 1;
            }
        }
    }
    vq->next_avail = pos;
    vq->avail_wrap = (uint8_t)wrap;
    vq->free_head = vq->next[id];
    vq->num_free -= needed;
    vq->chain_len[id] = (uint16_t)needed;
    vq->writable[id] = (uint32_t)writable;
    if (vq->in_order)  /* in_flight < size here: the slot is free */
        vq->order[(vq->order_head + vq->in_flight) % vq->size] = id;
    vq->in_flight++;
    vq->avail_idx = (uint16_t)(vq->avail_idx + needed);  /* entries made available */
    /* The publish point: release orders every store above (the rest of the chain,
     * an indirect table, the head's addr/len/id) before the flags that hand the
     * chain to the device, which reads the flags with acquire before the rest. */
    vfsdrv_store_release_u16(FLAGS_AT(vq, head), head_flags);
    return id;
}

static int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

int vfsdrv_packed_publish(struct vfsdrv_vq *vq)
{
    uint16_t added = (uint16_t)(vq->avail_idx - vq->published);
    if (added == 0)
        return 0;
    vq->published = vq->avail_idx;
    /* store->load: the head flags stored in add() must be visible before we read
     * the device's suppression state, or the device may decide to sleep on a ring
     * it saw empty while we decide not to kick (x86 needs this one too) */
    vfsdrv_mb();
    /* one 32-bit load: off_wrap and flags from the same device store */
    uint32_t snap = __atomic_load_n((uint32_t *)vq->used, __ATOMIC_RELAXED);
    uint16_t off_wrap = (uint16_t)snap, flags = (uint16_t)(snap >> 16);
    if (!vq->event_idx || flags != EVENT_DESC)
        return flags != EVENT_DISABLE;  /* DESC without EVENT_IDX is not allowed: notify */
    /* positions in the ring; an event offset from the other lap is a whole ring
     * behind (Linux's virtqueue_kick_prepare_packed) */
    uint16_t event = off_wrap & 0x7FFF;
    if ((off_wrap >> WRAP_BIT) != vq->avail_wrap)
        event = (uint16_t)(event - vq->size);
    uint16_t new_pos = vq->next_avail, old_pos = (uint16_t)(new_pos - added);
    return need_event(event, new_pos, old_pos);
}

/* The state of the entry at next_used: 1 used, 0 not (yet), -EIO impossible. The
 * flags are read with acquire: id and len are read only after them. */
static int used_state(struct vfsdrv_vq *vq, uint16_t pos, int wrap, uint32_t in_flight)
{
    uint16_t flags = vfsdrv_load_acquire_u16(FLAGS_AT(vq, pos));
    int avail = !!(flags & F_AVAIL), used = !!(flags & F_USED);
    if (in_flight == 0) {
        /* what sits here is last lap's (written with the other counter); an entry
         * in this lap's colours is the device's invention */
        if (avail == wrap)
            return fail(vq, -EIO, "entry %u has flags %#x (wrap %d) but nothing is in flight",
                        pos, flags, wrap);
        return 0;
    }
    /* a published chain starts here: we wrote avail=wrap, used=!wrap; the device
     * may only turn that into avail=used=wrap */
    if (avail == wrap && used == wrap)
        return 1;
    if (avail == wrap && used != wrap)
        return 0;
    return fail(vq, -EIO, "entry %u has flags %#x: neither available nor used in wrap %d "
                "(the device flipped them wrongly)", pos, flags, wrap);
}

int vfsdrv_packed_used_pending(struct vfsdrv_vq *vq)
{
    int st = used_state(vq, vq->next_used, vq->used_wrap, vq->in_flight);
    return st < 0 ? 1 : st;  /* an error is for harvest() to report */
}

int vfsdrv_packed_harvest(struct vfsdrv_vq *vq, struct vfsdrv_used *out, uint32_t max)
{
    if (++vq->seen_gen == 0) {  /* stamps wrapped: forget them all */
        memset(vq->seen, 0, vq->size * sizeof *vq->seen);
        vq->seen_gen = 1;
    }
    /* validate the whole batch before completing any of it: a bad entry leaves the
     * queue as it was (no completion lost, none duplicated) */
    uint16_t pos = vq->next_used;
    int wrap = vq->used_wrap;
    uint32_t n = 0, left = vq->in_flight;
    while (n < max) {
        int st = used_state(vq, pos, wrap, left);
        if (st < 0)
            return st;
        if (st == 0)
            break;
        struct pdesc d;
        memcpy(&d, DESC_AT(vq, pos), 12);  /* addr (ignored), len; id below */
        uint16_t id;
        memcpy(&id, DESC_AT(vq, pos) + 12, 2);
        uint32_t len = d.len;
        if (id >= vq->size)
            return fail(vq, -EIO, "used id %u out of range (size %u) at entry %u", id,
                        vq->size, pos);
        if (vq->chain_len[id] == 0 || vq->seen[id] == vq->seen_gen)
            return fail(vq, -EIO, "used id %u at entry %u is not in flight", id, pos);
        if (len > vq->writable[id])
            return fail(vq, -EIO, "used length %u exceeds the %u device-writable bytes of "
                        "buffer %u", len, vq->writable[id], id);
        /* the buffers this entry completes: itself, or with IN_ORDER every buffer
         * still in flight that was made available before it (found in order[]) */
        uint32_t batch = 1;
        if (vq->in_order) {
            uint32_t done = vq->in_flight - left;  /* order[] slots taken by this batch */
            while (batch <= left &&
                   vq->order[(vq->order_head + done + batch - 1) % vq->size] != id)
                batch++;
            if (batch > left)  /* cannot happen: an id in flight is in order[] */
                return fail(vq, -EIO, "used id %u at entry %u is not in flight", id, pos);
            if (n + batch > max) {
                if (n == 0)
                    return fail(vq, -EINVAL, "room for %u completions, an in-order batch "
                                "of %u", max, batch);
                break;  /* the next call takes the whole batch */
            }
        }
        for (uint32_t k = 0; k < batch; k++) {
            uint16_t b = vq->in_order
                ? vq->order[(vq->order_head + vq->in_flight - left) % vq->size] : id;
            vq->seen[b] = vq->seen_gen;
            out[n].id = b;
            /* a buffer the entry skips counts as used completely (2.8.18) */
            out[n].len = b == id ? len : vq->writable[b];
            n++;
            left--;
            /* the device wrote one entry for the chain (the batch) and skips the rest */
            uint32_t next = (uint32_t)pos + vq->chain_len[b];
            if (next >= vq->size) {
                next -= vq->size;
                wrap ^= 1;
            }
            pos = (uint16_t)next;
        }
    }
    if (n == 0)
        return 0;
    if (vq->in_order)
        vq->order_head = (uint16_t)((vq->order_head + n) % vq->size);
    for (uint32_t i = 0; i < n; i++)
        vfsdrv_ring_put_free(vq, (uint16_t)out[i].id, (uint16_t)out[i].id);
    vq->next_used = pos;
    vq->used_wrap = (uint8_t)wrap;
    vq->last_used = (uint16_t)(vq->last_used + n);
    /* with EVENT_IDX and interrupts wanted, ask for the next one at the new
     * position (as split moves used_event); flags stay DESC */
    if (vq->event_idx && vq->interrupts_on)
        vfsdrv_store_u16(vq->avail, (uint16_t)(pos | (wrap << WRAP_BIT)));
    return (int)n;
}

int vfsdrv_packed_arm(struct vfsdrv_vq *vq)
{
    vq->interrupts_on = 1;
    uint32_t v;
    if (vq->event_idx)
        v = (uint32_t)(vq->next_used | (vq->used_wrap << WRAP_BIT)) |
            ((uint32_t)EVENT_DESC << 16);
    else
        v = (uint32_t)EVENT_ENABLE << 16;
    /* off_wrap and flags in one 32-bit store: the device never sees DESC with a
     * stale offset (Linux needs a wmb between two 16-bit stores for that) */
    __atomic_store_n((uint32_t *)vq->avail, v, __ATOMIC_RELAXED);
    /* store->load: the re-arm is visible before we look at the ring again, so a
     * completion that raced with it is either seen now or interrupts us */
    vfsdrv_mb();
    int st = used_state(vq, vq->next_used, vq->used_wrap, vq->in_flight);
    return st != 0;  /* an invalid entry too: harvest() reports it */
}

void vfsdrv_packed_disarm(struct vfsdrv_vq *vq)
{
    vq->interrupts_on = 0;
    /* DISABLE for both modes (with EVENT_IDX, DESC would still fire once) */
    vfsdrv_store_u16(vq->avail + 2, EVENT_DISABLE);
}
