/* The hiprio sender: FORGET, BATCH_FORGET and INTERRUPT on the hiprio queue (0).
 *
 * One owner of the hiprio ring, used by every pump (one thread per request queue)
 * and by the control thread, so everything here runs under one mutex. A request is
 * copied into one of the DMA buffers Python handed in and added as a single
 * device-readable segment (hiprio requests get no reply); vfsdrv_hiprio_flush
 * publishes everything added since the last flush once and kicks once unless the
 * device suppressed it, so a pump's round of many FORGETs costs one publish and at
 * most one kick.
 *
 * Hiprio interrupts stay off: buffers come back lazily, when a send finds too few
 * free (and when the statistics are read). A send that still finds no room returns
 * -ENOSPC and queues nothing: the caller keeps the request (the pump hands it to
 * the control plane, whose backlog retries). A BATCH_FORGET larger than a buffer is
 * split here, by the one splitting rule (vfsdrv_hiprio_pieces/piece), all pieces or
 * none, so a retry never sends a forget twice (the device would drop lookup counts
 * that the kernel still holds).
 *
 * Memory ordering: no barrier of its own. The mutex orders the driver-side ring
 * state between the threads (lock = acquire, unlock = release); towards the device
 * the vfsdrv_vq_* calls order it (a buffer's bytes are written before
 * vfsdrv_vq_add, and the release store of avail->idx in vfsdrv_vq_publish, or the
 * head flags' release for packed, makes them visible before the index); an MMIO
 * kick is preceded by a full fence inside vfsdrv_mmio_write*, an eventfd write is a
 * system call (a full barrier). The kick itself is kick.h's vfsdrv_kick, the
 * pump's too.
 *
 * A used entry the device gets wrong (vfsdrv_vq_harvest validates them) breaks the
 * sender for good; the reason stays readable (vfsdrv_hiprio_error) for the control
 * plane to report as a device failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vfsdrv_core.h"
#include "kick.h"  /* after vfsdrv_core.h */

#define OP_BATCH_FORGET 42
#define BATCH_FORGET_IN 8    /* fuse_batch_forget_in: count, dummy */
#define FORGET_ONE 16        /* fuse_forget_one: nodeid, nlookup */
#define BATCH_HEAD (VFSDRV_IN_HEADER + BATCH_FORGET_IN)

struct vfsdrv_hiprio {
    struct vfsdrv_hiprio_config cfg;
    struct vfsdrv_vq *vq;
    pthread_mutex_t lock;
    struct vfsdrv_hiprio_buf *bufs;
    uint32_t nbufs;
    uint32_t *free_bufs, nfree;
    uint32_t *head_buf;          /* ring head (split) or buffer id (packed) -> buffer */
    struct vfsdrv_used *used;
    int broken;
    struct vfsdrv_hiprio_stats stats;
    char error[VFSDRV_ERROR_LEN];
};

/* -- the splitting rule ----------------------------------------------------------- */
/* A BATCH_FORGET too big for `limit`: its forgets (count clamped to what the request
 * holds) and how many fit one piece. 0 when it cannot be split. */
static int batch_shape(const uint8_t *req, uint32_t len, uint32_t limit, uint32_t *count,
                       uint32_t *per)
{
    uint32_t opcode, n;
    if (len < BATCH_HEAD || limit < BATCH_HEAD + FORGET_ONE)
        return 0;
    memcpy(&opcode, req + 4, 4);
    if (opcode != OP_BATCH_FORGET)
        return 0;
    memcpy(&n, req + VFSDRV_IN_HEADER, 4);
    if (n > (len - BATCH_HEAD) / FORGET_ONE)
        n = (len - BATCH_HEAD) / FORGET_ONE;
    *count = n;
    *per = (limit - BATCH_HEAD) / FORGET_ONE;
    return 1;
}

uint32_t vfsdrv_hiprio_pieces(const uint8_t *req, uint32_t len, uint32_t limit)
{
    uint32_t count, per;
    if (len <= limit)
        return 1;
    if (!batch_shape(req, len, limit, &count, &per))
        return 0;
    return (count + per - 1) / per;  /* none: a BATCH_FORGET of nothing goes nowhere */
}

uint32_t vfsdrv_hiprio_piece(const uint8_t *req, uint32_t len, uint32_t limit, uint32_t k,
                             uint8_t *out)
{
    uint32_t count, per;
    if (len <= limit) {
        if (k)
            return 0;
        memcpy(out, req, len);
        return len;
    }
    if (!batch_shape(req, len, limit, &count, &per) || (uint64_t)k * per >= count)
        return 0;
    /* the same header (unique too: none gets a reply) with its own length and count */
    uint32_t first = k * per, n = count - first < per ? count - first : per;
    uint32_t size = BATCH_HEAD + n * FORGET_ONE, in[2] = {n, 0};
    memcpy(out, req, VFSDRV_IN_HEADER);
    memcpy(out, &size, 4);
    memcpy(out + VFSDRV_IN_HEADER, in, sizeof in);
    memcpy(out + BATCH_HEAD, req + BATCH_HEAD + (size_t)first * FORGET_ONE, n * FORGET_ONE);
    return size;
}

/* -- the sender ---------------------------------------------------------------------- */
static void break_locked(struct vfsdrv_hiprio *h, const char *fmt, ...)
{
    if (h->broken)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->error, sizeof h->error, fmt, ap);
    va_end(ap);
    h->broken = 1;
}

struct vfsdrv_hiprio *vfsdrv_hiprio_new(const struct vfsdrv_hiprio_config *cfg,
                                        struct vfsdrv_vq *vq,
                                        const struct vfsdrv_hiprio_buf *bufs, uint32_t nbufs,
                                        char *err, uint32_t err_len)
{
    if (!nbufs || cfg->buf_size < BATCH_HEAD + FORGET_ONE || cfg->buf_size > VFSDRV_PAGE) {
        snprintf(err, err_len, "need at least one buffer of %u..%u bytes",
                 BATCH_HEAD + FORGET_ONE, VFSDRV_PAGE);
        return NULL;
    }
    for (uint32_t i = 0; i < nbufs; i++)
        if ((uintptr_t)bufs[i].host & (VFSDRV_PAGE - 1)) {
            snprintf(err, err_len, "hiprio buffer %u is not page-aligned", i);
            return NULL;
        }
    struct vfsdrv_hiprio *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    h->cfg = *cfg;
    h->vq = vq;
    h->nbufs = nbufs;
    pthread_mutex_init(&h->lock, NULL);
    h->bufs = calloc(nbufs, sizeof *h->bufs);
    h->free_bufs = calloc(nbufs, sizeof *h->free_bufs);
    h->head_buf = calloc(vq->size, sizeof *h->head_buf);
    h->used = calloc(vq->size, sizeof *h->used);
    if (!h->bufs || !h->free_bufs || !h->head_buf || !h->used) {
        snprintf(err, err_len, "out of memory");
        vfsdrv_hiprio_free(h);
        return NULL;
    }
    memcpy(h->bufs, bufs, nbufs * sizeof *bufs);
    for (uint32_t i = 0; i < nbufs; i++)
        h->free_bufs[h->nfree++] = nbufs - 1 - i;
    /* nobody waits for hiprio completions: buffers are reclaimed when needed */
    vfsdrv_vq_disarm(vq);
    return h;
}

void vfsdrv_hiprio_free(struct vfsdrv_hiprio *h)
{
    if (!h)
        return;
    free(h->bufs);
    free(h->free_bufs);
    free(h->head_buf);
    free(h->used);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

static int reclaim_locked(struct vfsdrv_hiprio *h)
{
    if (h->broken)
        return -EIO;
    int total = 0;
    for (;;) {  /* with nothing in flight too: a used entry then is the device's fault */
        int n = vfsdrv_vq_harvest(h->vq, h->used, h->vq->size);
        if (n < 0) {
            break_locked(h, "hiprio queue: %s", h->vq->error);
            return -EIO;
        }
        /* each id is validated (in flight, once) by the harvest: one buffer each */
        for (int k = 0; k < n; k++)
            h->free_bufs[h->nfree++] = h->head_buf[h->used[k].id];
        total += n;
        if (n == 0 || h->vq->in_flight == 0)
            break;
    }
    h->stats.reclaimed += (uint64_t)total;
    return total;
}

int vfsdrv_hiprio_reclaim(struct vfsdrv_hiprio *h)
{
    pthread_mutex_lock(&h->lock);
    int rc = reclaim_locked(h);
    pthread_mutex_unlock(&h->lock);
    return rc;
}

int vfsdrv_hiprio_send(struct vfsdrv_hiprio *h, const uint8_t *req, uint32_t len)
{
    uint32_t limit = h->cfg.buf_size;
    uint32_t n = len >= VFSDRV_IN_HEADER ? vfsdrv_hiprio_pieces(req, len, limit) : 0;
    if (n == 0)
        return -EMSGSIZE;
    pthread_mutex_lock(&h->lock);
    int rc = 0;
    if (h->broken) {
        rc = -EIO;
        goto out;
    }
    /* one ring entry per piece (a single segment never goes indirect) */
    if ((h->nfree < n || h->vq->num_free < n) && reclaim_locked(h) < 0) {
        rc = -EIO;
        goto out;
    }
    if (h->nfree < n || h->vq->num_free < n) {
        h->stats.full++;
        rc = -ENOSPC;
        goto out;
    }
    for (uint32_t k = 0; k < n; k++) {
        uint32_t b = h->free_bufs[--h->nfree];
        uint32_t size = vfsdrv_hiprio_piece(req, len, limit, k, h->bufs[b].host);
        struct vfsdrv_seg seg = {h->bufs[b].addr, size, 0};
        int head = vfsdrv_vq_add(h->vq, &seg, 1);
        if (head < 0) {
            /* room was checked: the ring contradicts its own counters */
            h->free_bufs[h->nfree++] = b;
            break_locked(h, "hiprio queue: %s", h->vq->error);
            rc = -EIO;
            goto out;
        }
        h->head_buf[head] = b;
        h->stats.sent++;
    }
out:
    pthread_mutex_unlock(&h->lock);
    return rc;
}

int vfsdrv_hiprio_flush(struct vfsdrv_hiprio *h)
{
    pthread_mutex_lock(&h->lock);
    if (h->broken) {
        pthread_mutex_unlock(&h->lock);
        return -EIO;
    }
    if (h->vq->avail_idx == h->vq->published) {
        pthread_mutex_unlock(&h->lock);
        return 0;
    }
    h->stats.flushes++;
    int kick = vfsdrv_vq_publish(h->vq);
    if (kick)
        h->stats.kicks++;
    pthread_mutex_unlock(&h->lock);
    if (!kick)
        return 0;
    /* outside the lock: another thread's later publish needs no order with this
     * kick, only a kick of its own (which it decides for itself) */
    int rc = vfsdrv_kick(h->cfg.kick_fd, h->cfg.notify_addr, h->cfg.notify_value,
                         h->cfg.notify_width);
    if (rc == 0)
        return 1;
    pthread_mutex_lock(&h->lock);
    break_locked(h, "hiprio kick failed: %s", strerror(-rc));
    pthread_mutex_unlock(&h->lock);
    return -EIO;
}

int vfsdrv_hiprio_error(struct vfsdrv_hiprio *h, char *out, uint32_t out_len)
{
    pthread_mutex_lock(&h->lock);
    int broken = h->broken;
    if (out_len)
        snprintf(out, out_len, "%s", broken ? h->error : "");
    pthread_mutex_unlock(&h->lock);
    return broken;
}

void vfsdrv_hiprio_get_stats(struct vfsdrv_hiprio *h, struct vfsdrv_hiprio_stats *out)
{
    pthread_mutex_lock(&h->lock);
    reclaim_locked(h);  /* so in_flight says what the device still holds */
    *out = h->stats;
    out->in_flight = h->vq->in_flight;
    pthread_mutex_unlock(&h->lock);
}
