/* A minimal io_uring (no liburing) for one job: the replies of one pump round go to
 * /dev/fuse in one io_uring_enter instead of a writev each. C side only (cffi does
 * not read this file). uring.c says why at each barrier. */
#ifndef VFSDRV_URING_H
#define VFSDRV_URING_H

#include <stdint.h>
#include <sys/uio.h>

struct vfsdrv_uring;

/* NULL when this kernel or its policy gives no io_uring (ENOSYS, EPERM from
 * io_uring_disabled or a seccomp filter): the caller writes one reply at a time. */
struct vfsdrv_uring *vfsdrv_uring_new(uint32_t entries);
void vfsdrv_uring_free(struct vfsdrv_uring *u);
/* how many writes one submission takes */
uint32_t vfsdrv_uring_room(const struct vfsdrv_uring *u);
/* Queue a writev of iov[0..n) to fd; user_data comes back with its result. The iovec
 * array and the memory it names must stay until vfsdrv_uring_submit returns. 0, or -1
 * when the submission is full (submit first). */
int vfsdrv_uring_writev(struct vfsdrv_uring *u, int fd, const struct iovec *iov, uint32_t n,
                        uint64_t user_data);
/* What done() gets for a write the kernel never took (nothing of it was written):
 * the caller writes it itself. */
#define VFSDRV_URING_NOT_SENT INT32_MIN
/* Submit what is queued and wait until every one of them has completed; done(arg,
 * user_data, res) is called once for each (res: bytes written, -errno, or
 * VFSDRV_URING_NOT_SENT). Returns the number of io_uring_enter calls it made (for
 * the syscall count). */
int vfsdrv_uring_submit(struct vfsdrv_uring *u,
                        void (*done)(void *arg, uint64_t user_data, int32_t res), void *arg);
/* 1 once the kernel refused a submission for a reason that will not pass (the
 * caller then stops using this ring) */
int vfsdrv_uring_failed(const struct vfsdrv_uring *u);
/* io_uring_enter(2) itself (a weak symbol: the C unit tests wrap it with faults) */
int vfsdrv_uring_enter(int fd, uint32_t to_submit, uint32_t min_complete, uint32_t flags);

#endif
