/* What the split (core.c) and packed (packed.c) rings share, for the C side only
 * (not read by cffi). */
#ifndef VFSDRV_RING_H
#define VFSDRV_RING_H

/* include vfsdrv_core.h first: it has no include guard (cffi cannot parse one) */

/* Record why a ring call failed in vq->error ("queue N[ (packed)]: ...") and
 * return rc. */
__attribute__((format(printf, 3, 4)))
int vfsdrv_ring_fail(struct vfsdrv_vq *vq, int rc, const char *fmt, ...);

/* The rules every chain obeys whatever the layout (virtio 1.2 2.7.4, 2.8.5):
 * at least one buffer and no more than the queue holds, device-readable buffers
 * before device-writable ones, at most 2^32 - 1 bytes. 0 and the device-writable
 * byte count in *writable, or -EINVAL with the reason in vq->error. */
/* The shadow state both layouts keep per head (or buffer id): the free list through
 * next[], chain_len, writable, seen; all free. 0, or -ENOMEM. */
int vfsdrv_ring_shadow_init(struct vfsdrv_vq *vq, uint32_t size);

int vfsdrv_chain_check(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n,
                       uint32_t *writable);

#endif
