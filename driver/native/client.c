/* The typed client's batched path: many requests per call, through the core.
 *
 * vfsdrv_client_add writes each request (fuse_in_header and body) into its DMA
 * slot, sizes and places its reply room by the core's rules (vfsdrv_reply_capacity,
 * vfsdrv_request_offset, vfsdrv_reply_offset), chains it with vfsdrv_vq_add and,
 * when asked, publishes the whole batch once (vfsdrv_vq_publish). The caller kicks
 * once if the device wants it.
 *
 * vfsdrv_client_harvest takes every used entry at once (vfsdrv_vq_harvest, which
 * validates each id and length) and judges each reply of a chain added here with
 * vfsdrv_check_reply, the rule every path uses; the result per request is compact
 * (slot, error, where the payload lies). A used entry of a chain added another
 * way (the Python path, same queue) is handed back as it is, for its owner.
 *
 * Both run without the GIL (cffi releases it). Nothing here keeps state of its
 * own: the slot table and head_slot (which slot each head descriptor carries)
 * belong to the caller, one head_slot per queue.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "vfsdrv_core.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "fuse_in_header is written in host order: virtio-fs on x86-64 and aarch64");

_Static_assert(sizeof(struct vfsdrv_in_header) == VFSDRV_IN_HEADER, "fuse_in_header is 40 bytes");

int vfsdrv_client_add(struct vfsdrv_vq *vq, struct vfsdrv_slot *slots, uint32_t nslots,
                      uint32_t *head_slot, const struct vfsdrv_creq *reqs, uint32_t n,
                      const uint8_t *bodies, uint32_t bodies_len, uint32_t max_io,
                      int32_t *status, int publish, int32_t *kick)
{
    uint64_t pos = 0;
    uint32_t added = 0;
    int full = 0;

    *kick = 0;

    /* the bodies must add up before anything is written */
    for (uint32_t k = 0; k < n; k++)
        pos += reqs[k].body_len;
    if (pos != bodies_len) {
        snprintf(vq->error, sizeof vq->error, "bodies of %llu bytes, %u given",
                 (unsigned long long)pos, bodies_len);
        return -EINVAL;
    }
    pos = 0;
    for (uint32_t k = 0; k < n; k++) {
        const struct vfsdrv_creq *r = &reqs[k];
        const uint8_t *body = bodies + pos;
        pos += r->body_len;
        status[k] = -EINVAL;
        if (r->slot >= nslots || slots[r->slot].state != VFSDRV_SLOT_FREE ||
            slots[r->slot].pages != NULL)
            continue;  /* not a slot of this table, in use, or not contiguous */
        struct vfsdrv_slot *s = &slots[r->slot];
        uint32_t cap = vfsdrv_reply_capacity(r->opcode, body, r->body_len, max_io);
        if (cap == VFSDRV_NO_REPLY)
            continue;  /* hiprio: the caller's path */
        uint64_t in_len = (uint64_t)VFSDRV_IN_HEADER + r->body_len;
        uint32_t req_off = vfsdrv_request_offset(r->opcode);
        if (req_off + in_len > s->size)
            continue;
        uint32_t reply_off = vfsdrv_reply_offset(req_off, (uint32_t)in_len);
        if ((uint64_t)reply_off + VFSDRV_OUT_HEADER + cap > s->size)
            continue;
        /* written even when the ring is full: the caller queues it as it stands */
        struct vfsdrv_in_header h = {
            .len = (uint32_t)in_len, .opcode = r->opcode, .unique = r->unique,
            .nodeid = r->nodeid, .uid = r->uid, .gid = r->gid, .pid = r->pid,
        };
        memcpy(s->host + req_off, &h, sizeof h);
        if (r->body_len)
            memcpy(s->host + req_off + VFSDRV_IN_HEADER, body, r->body_len);
        s->unique = r->unique;
        s->opcode = r->opcode;
        s->in_len = (uint32_t)in_len;
        s->req_off = req_off;
        s->reply_off = reply_off;
        s->cap = cap;
        if (full) {  /* keep the order: nothing after a refused chain goes first */
            status[k] = -ENOSPC;
            continue;
        }
        struct vfsdrv_seg segs[2] = {
            { s->addr + req_off, (uint32_t)in_len, 0 },
            { s->addr + reply_off, VFSDRV_OUT_HEADER + cap, VFSDRV_SEG_WRITE },
        };
        int head = vfsdrv_vq_add(vq, segs, 2);
        if (head < 0) {
            status[k] = head;
            if (head == -ENOSPC)
                full = 1;
            continue;
        }
        s->state = VFSDRV_SLOT_RING;
        head_slot[head] = r->slot;
        status[k] = head;
        added++;
    }
    if (publish && added)
        *kick = vfsdrv_vq_publish(vq);
    return (int)added;
}

int vfsdrv_client_harvest(struct vfsdrv_vq *vq, struct vfsdrv_slot *slots, uint32_t nslots,
                          uint32_t *head_slot, struct vfsdrv_used *used,
                          struct vfsdrv_cdone *out, uint32_t max, char *why, uint32_t why_len)
{
    int n = vfsdrv_vq_harvest(vq, used, max);
    for (int k = 0; k < n; k++) {
        uint32_t id = used[k].id;  /* < vq->size and in flight: the harvest checked */
        struct vfsdrv_cdone *d = &out[k];
        d->head = id;
        d->len = used[k].len;
        d->slot = head_slot[id];
        head_slot[id] = VFSDRV_CLIENT_NONE;
        d->error = 0;
        d->payload_off = 0;
        d->payload_len = 0;
        d->bad = 0;
        if (d->slot == VFSDRV_CLIENT_NONE)
            continue;  /* another path's chain: its owner completes it */
        if (d->slot >= nslots || slots[d->slot].state != VFSDRV_SLOT_RING) {
            /* cannot happen unless the caller's tables disagree: refuse the batch */
            snprintf(vq->error, sizeof vq->error, "head %u names slot %u, not in flight",
                     id, d->slot);
            return -EINVAL;
        }
        struct vfsdrv_slot *s = &slots[d->slot];
        struct vfsdrv_out_header h;
        s->state = VFSDRV_SLOT_FREE;
        if (vfsdrv_check_reply(s->host + s->reply_off, d->len, s->unique, s->opcode, s->cap,
                               0, &h, why, why_len) != 0)
            d->bad = 1;
        d->error = h.error;
        d->payload_off = s->reply_off + VFSDRV_OUT_HEADER;
        d->payload_len = h.len - VFSDRV_OUT_HEADER;
    }
    return n;
}
