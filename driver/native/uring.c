/* A minimal io_uring for the pump's batched replies (uring.h says what for).
 *
 * One ring per pump, used by the pump thread alone, for IORING_OP_WRITEV only. A
 * round queues its replies, then one io_uring_enter submits them all and waits
 * for all of their completions: writes to an O_NONBLOCK /dev/fuse descriptor
 * complete inline (the kernel treats an O_NONBLOCK file as able to try without
 * blocking), so the completions are there when the call returns, and nothing
 * of a reply outlives the round that wrote it.
 *
 * The rings are shared with the kernel, which runs on other CPUs meanwhile (io-wq
 * workers, completions posted from task work): the indexes are read with acquire
 * and written with release, as the kernel's own io_uring.h asks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "uring.h"

#ifndef __NR_io_uring_setup  /* x86-64 and aarch64 (and most others) since 5.1 */
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#endif
#define AGAIN_LIMIT 100        /* EAGAIN/EBUSY retries, 100 us apart, before giving up */

struct vfsdrv_uring {
    int fd;
    uint32_t entries;
    int failed;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    uint32_t *sq_head, *sq_tail, sq_mask, *sq_array;
    uint32_t *cq_head, *cq_tail, cq_mask;
    struct io_uring_cqe *cqes;
    uint32_t queued;             /* SQEs written since the last submit */
};

static int uring_setup(uint32_t entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

/* Weak: the C unit tests (tests/native/test_uring.c) put faults in front of it. */
__attribute__((weak)) int vfsdrv_uring_enter(int fd, uint32_t to_submit, uint32_t min_complete,
                                             uint32_t flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

struct vfsdrv_uring *vfsdrv_uring_new(uint32_t entries)
{
    struct vfsdrv_uring *u = calloc(1, sizeof *u);
    if (!u)
        return NULL;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    u->fd = uring_setup(entries, &p);
    if (u->fd < 0) {
        free(u);
        return NULL;
    }
    if (!(p.features & IORING_FEAT_RW_CUR_POS)) {
        /* before 5.6 an offset of -1 is not "the file's position": every write would
         * fail; a writev each is as good */
        close(u->fd);
        free(u);
        return NULL;
    }
    u->entries = p.sq_entries;
    u->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    u->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (u->cq_map_len > u->sq_map_len)
            u->sq_map_len = u->cq_map_len;
        u->cq_map_len = u->sq_map_len;
    }
    u->sq_map = mmap(NULL, u->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     u->fd, IORING_OFF_SQ_RING);
    if (u->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        u->cq_map = u->sq_map;
    } else {
        u->cq_map = mmap(NULL, u->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         u->fd, IORING_OFF_CQ_RING);
        if (u->cq_map == MAP_FAILED) {
            u->cq_map = NULL;
            goto fail;
        }
    }
    u->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   u->fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED) {
        u->sqes = NULL;
        goto fail;
    }
    char *sq = u->sq_map, *cq = u->cq_map;
    u->sq_head = (uint32_t *)(sq + p.sq_off.head);
    u->sq_tail = (uint32_t *)(sq + p.sq_off.tail);
    u->sq_mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    u->sq_array = (uint32_t *)(sq + p.sq_off.array);
    u->cq_head = (uint32_t *)(cq + p.cq_off.head);
    u->cq_tail = (uint32_t *)(cq + p.cq_off.tail);
    u->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    for (uint32_t i = 0; i < p.sq_entries; i++)
        u->sq_array[i] = i;  /* SQE i sits at slot i of the ring: written once */
    return u;
fail:
    if (u->sq_map && u->sq_map != MAP_FAILED)
        munmap(u->sq_map, u->sq_map_len);
    if (u->cq_map && u->cq_map != u->sq_map)
        munmap(u->cq_map, u->cq_map_len);
    close(u->fd);
    free(u);
    return NULL;
}

void vfsdrv_uring_free(struct vfsdrv_uring *u)
{
    if (!u)
        return;
    if (u->sqes)
        munmap(u->sqes, u->sqes_len);
    if (u->cq_map != u->sq_map)
        munmap(u->cq_map, u->cq_map_len);
    munmap(u->sq_map, u->sq_map_len);
    close(u->fd);
    free(u);
}

uint32_t vfsdrv_uring_room(const struct vfsdrv_uring *u) { return u->entries; }

int vfsdrv_uring_failed(const struct vfsdrv_uring *u) { return u->failed; }

int vfsdrv_uring_writev(struct vfsdrv_uring *u, int fd, const struct iovec *iov, uint32_t n,
                        uint64_t user_data)
{
    if (u->queued == u->entries)
        return -1;
    /* only this thread moves the tail; the kernel's head is behind it by the SQEs
     * of the last submit, which it consumed before io_uring_enter returned */
    uint32_t tail = *u->sq_tail + u->queued;
    struct io_uring_sqe *sqe = &u->sqes[tail & u->sq_mask];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_WRITEV;
    sqe->fd = fd;
    sqe->off = (uint64_t)-1;  /* the file's position: a device has none */
    sqe->addr = (uint64_t)(uintptr_t)iov;
    sqe->len = n;
    sqe->user_data = user_data;
    u->queued++;
    return 0;
}

/* Take every completion there is. */
static uint32_t reap(struct vfsdrv_uring *u,
                     void (*done)(void *, uint64_t, int32_t), void *arg)
{
    uint32_t head = *u->cq_head;
    /* acquire: the CQEs up to the tail are written before the kernel's release of it */
    uint32_t tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    uint32_t n = 0;
    for (; head != tail; head++, n++) {
        struct io_uring_cqe *c = &u->cqes[head & u->cq_mask];
        done(arg, c->user_data, c->res);
    }
    /* release: we have read those CQEs before the kernel may write over them */
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

int vfsdrv_uring_submit(struct vfsdrv_uring *u,
                        void (*done)(void *arg, uint64_t user_data, int32_t res), void *arg)
{
    uint32_t n = u->queued, submitted = 0, completed = 0, again = 0;
    int calls = 0;
    if (!n)
        return 0;
    /* release: the SQEs are written before the kernel can see the tail that covers
     * them */
    __atomic_store_n(u->sq_tail, *u->sq_tail + n, __ATOMIC_RELEASE);
    u->queued = 0;
    while (submitted < n) {
        calls++;
        int rc = vfsdrv_uring_enter(u->fd, n - submitted, n - completed, IORING_ENTER_GETEVENTS);
        int err = rc < 0 ? errno : 0;  /* done() below may change errno */
        if (rc > 0)
            submitted += (uint32_t)rc;
        completed += reap(u, done, arg);
        if (rc > 0 || err == EINTR)
            continue;
        if ((err == EAGAIN || err == EBUSY) && ++again <= AGAIN_LIMIT) {
            struct timespec ts = {0, 100000};  /* short of memory for now */
            nanosleep(&ts, NULL);
            continue;
        }
        /* refused for good (or nothing taken, with no reason given): take back what
         * the kernel has not consumed */
        u->failed = 1;
        uint32_t head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
        uint32_t tail = *u->sq_tail;
        for (uint32_t i = head; i != tail; i++, completed++)
            done(arg, u->sqes[i & u->sq_mask].user_data, VFSDRV_URING_NOT_SENT);
        __atomic_store_n(u->sq_tail, head, __ATOMIC_RELEASE);
        break;  /* the consumed ones still complete below */
    }
    while (completed < n) {
        /* consumed writes that have not completed inline (an io-wq worker has them):
         * their memory is in use until they do, so wait for them */
        calls++;
        int rc = vfsdrv_uring_enter(u->fd, 0, n - completed, IORING_ENTER_GETEVENTS);
        int err = rc < 0 ? errno : 0;
        completed += reap(u, done, arg);
        if (rc < 0 && err != EINTR) {
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
        }
    }
    return calls;
}
