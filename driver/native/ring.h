/* What the split (core.c) and packed (packed.c) rings share, for the C side only
 * (not read by cffi). */
#ifndef VFSDRV_RING_H
#define VFSDRV_RING_H

/* include vfsdrv_core.h first: it has no include guard (cffi cannot parse one) */

/* descriptor flags, the same bits in both layouts (virtio 1.2 2.7.5, 2.8.3) */
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

/* Record why a ring call failed in vq->error ("queue N[ (packed)]: ...") and
 * return rc. */
__attribute__((format(printf, 3, 4)))
int vfsdrv_ring_fail(struct vfsdrv_vq *vq, int rc, const char *fmt, ...);

/* The rules every chain obeys whatever the layout (virtio 1.2 2.7.4, 2.8.5):
 * at least one buffer and no more than the queue holds, device-readable buffers
 * before device-writable ones, at most 2^32 - 1 bytes. 0 and the device-writable
 * byte count in *writable, or -EINVAL with the reason in vq->error. */
int vfsdrv_chain_check(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n,
                       uint32_t *writable);

/* The shadow state both layouts keep per head (or buffer id): the free list through
 * next[], chain_len, writable, seen; all free. 0, or -ENOMEM. */
int vfsdrv_ring_shadow_init(struct vfsdrv_vq *vq, uint32_t size);

/* What vfsdrv_vq_init and vfsdrv_vq_init_packed both set once the size is checked
 * (each layout has its own size rule): the areas, indirect tables, interrupts on,
 * then the shadow state. vq was zeroed by the caller. 0, or -ENOMEM. The areas
 * are the layout's own: desc/avail/used, or ring/driver event/device event. */
static inline int vfsdrv_ring_setup(struct vfsdrv_vq *vq, uint32_t size, uint8_t *desc,
                                    uint8_t *avail, uint8_t *used, uint8_t *indirect,
                                    uint64_t indirect_addr, uint32_t indirect_heads,
                                    int event_idx)
{
    vq->size = (uint16_t)size;  /* 32768 fits; 16-bit arithmetic wraps as the spec's */
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    vq->indirect = indirect;
    vq->indirect_addr = indirect_addr;
    vq->indirect_heads = indirect_heads;
    vq->use_indirect = indirect != NULL && indirect_heads > 0;
    vq->event_idx = event_idx != 0;
    vq->interrupts_on = 1;
    return vfsdrv_ring_shadow_init(vq, size);
}

/* A used chain back on the shadow free list: head..tail linked through next[] (a
 * packed buffer id is its own tail), its chain_len[head] entries free again. The
 * caller has validated head (in flight). */
static inline void vfsdrv_ring_put_free(struct vfsdrv_vq *vq, uint16_t head, uint16_t tail)
{
    vq->next[tail] = vq->free_head;
    vq->free_head = head;
    vq->num_free += vq->chain_len[head];
    vq->chain_len[head] = 0;
    vq->in_flight--;
}

#endif
