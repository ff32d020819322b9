/* uring.c (a round's replies in one io_uring_enter) under the faults a kernel can
 * hand it, on a real io_uring writing into a pipe: io_uring_enter is uring.c's weak
 * vfsdrv_uring_enter, wrapped here. Every write must be reported exactly once, with
 * what the kernel did or VFSDRV_URING_NOT_SENT (the pump then writes it itself),
 * and nothing may spin for ever. Linked into test_core (testkit.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "testkit.h"
#include "uring.h"

enum fault { NONE, EINTR_ONCE, EAGAIN_ALWAYS, EPERM_ALWAYS, ZERO_TAKEN, ONE_AT_A_TIME };
static enum fault fault;
static int enter_calls;

int vfsdrv_uring_enter(int fd, uint32_t to_submit, uint32_t min_complete, uint32_t flags)
{
    enter_calls++;
    switch (fault) {
    case EINTR_ONCE:
        if (enter_calls == 1) {
            errno = EINTR;
            return -1;
        }
        break;
    case EAGAIN_ALWAYS:
        errno = EAGAIN;
        return -1;
    case EPERM_ALWAYS:
        errno = EPERM;
        return -1;
    case ZERO_TAKEN:
        if (to_submit)
            return 0;
        break;
    case ONE_AT_A_TIME:  /* as a kernel short of memory: one SQE taken per call */
        if (to_submit > 1) {
            to_submit = 1;
            min_complete = 0;
        }
        break;
    case NONE:
        break;
    }
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

#define NW 8
static int reported[NW];
static int32_t result[NW];

static void done(void *arg, uint64_t user_data, int32_t res)
{
    (void)arg;
    if (user_data < NW) {
        reported[user_data]++;
        result[user_data] = res;
    }
}

/* Queue NW 8-byte writes into the pipe, submit under `f`; the enter calls made. */
static int round_under(struct vfsdrv_uring *u, int wfd, enum fault f, char rec[NW][8],
                       struct iovec iov[NW])
{
    memset(reported, 0, sizeof reported);
    fault = f;
    enter_calls = 0;
    for (int i = 0; i < NW; i++) {
        memset(rec[i], 'a' + i, 8);
        iov[i] = (struct iovec){rec[i], 8};
        EQ(vfsdrv_uring_writev(u, wfd, &iov[i], 1, (uint64_t)i), 0);
    }
    int calls = vfsdrv_uring_submit(u, done, NULL);
    fault = NONE;
    for (int i = 0; i < NW; i++)
        EQ(reported[i], 1);
    return calls;
}

/* what the pipe holds: each record once, whole */
static void check_pipe(int rfd, int want)
{
    char buf[NW * 8 + 1];
    ssize_t n = read(rfd, buf, sizeof buf);
    if (!want) {
        CHECK(n < 0 && errno == EAGAIN, "the pipe holds %zd bytes", n);
        return;
    }
    EQ(n, NW * 8);
    int seen[NW] = {0};
    for (ssize_t k = 0; k + 8 <= n; k += 8) {
        int i = buf[k] - 'a';
        CHECK(i >= 0 && i < NW, "record %d", i);
        if (i >= 0 && i < NW) {
            seen[i]++;
            for (int b = 0; b < 8; b++)
                EQ(buf[k + b], 'a' + i);
        }
    }
    for (int i = 0; i < NW; i++)
        EQ(seen[i], 1);
}

void test_uring_faults(void)
{
    int p[2];
    CHECK(pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0, "pipe: %s", strerror(errno));
    char rec[NW][8];
    struct iovec iov[NW];
    struct { enum fault f; int sent; int calls; } cases[] = {
        {NONE, 1, 1},            /* one syscall for the whole round */
        {EINTR_ONCE, 1, 2},      /* retried */
        {ONE_AT_A_TIME, 1, NW},  /* a partial submission goes on where it stopped */
        {NONE, 1, 1},            /* and leaves the ring as good as new */
    };
    struct vfsdrv_uring *u = vfsdrv_uring_new(NW);
    if (!u) {
        /* qemu-user has no io_uring: the pump writes each reply (test_native_aarch64.py
         * requires this line only where the kernel refuses io_uring) */
        printf("uring: no io_uring here (%s): the pump writes each reply\n", strerror(errno));
        close(p[0]);
        close(p[1]);
        return;
    }
    EQ(vfsdrv_uring_room(u) >= NW, 1);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int calls = round_under(u, p[1], cases[c].f, rec, iov);
        EQ(calls, cases[c].calls);
        for (int i = 0; i < NW; i++)
            EQ(result[i], 8);
        check_pipe(p[0], 1);
        EQ(vfsdrv_uring_failed(u), 0);
    }
    /* refusals: nothing written, every write handed back, the ring marked failed */
    enum fault refusals[] = {EPERM_ALWAYS, ZERO_TAKEN, EAGAIN_ALWAYS};
    for (size_t c = 0; c < sizeof refusals / sizeof refusals[0]; c++) {
        vfsdrv_uring_free(u);
        u = vfsdrv_uring_new(NW);
        CHECK(u != NULL, "a second ring");
        if (!u)
            break;
        int calls = round_under(u, p[1], refusals[c], rec, iov);
        for (int i = 0; i < NW; i++)
            EQ(result[i], VFSDRV_URING_NOT_SENT);
        check_pipe(p[0], 0);
        EQ(vfsdrv_uring_failed(u), 1);
        /* EAGAIN is retried a bounded number of times, then given up */
        CHECK(calls >= 1 && calls <= 101, "%d calls", calls);
    }
    vfsdrv_uring_free(u);
    close(p[0]);
    close(p[1]);
}
