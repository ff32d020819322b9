/* The whole pump on socket pairs standing in for /dev/fuse (the blocking descriptor
 * and its O_NONBLOCK clone), against the in-memory device of ringdev.h: what the
 * control thread can ask a running pump. In test_core.c's table. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "testkit.h"

#define SMALL (4 * 4096)
#define LARGE (4096 + 131072 + 2 * 4096)

static void *run_pump(void *p) { return (void *)(intptr_t)vfsdrv_pump_run(p); }

static void send_setlkw(int fd, uint64_t unique)
{
    /* fuse_in_header (40) + fuse_lk_in (48): a write lock on the whole file */
    uint8_t buf[88] = {0};
    uint32_t len = sizeof buf, opcode = SETLKW, type = 1 /* F_WRLCK */;
    uint64_t nodeid = 2, end = ~0ull;
    memcpy(buf, &len, 4);
    memcpy(buf + 4, &opcode, 4);
    memcpy(buf + 8, &unique, 8);
    memcpy(buf + 16, &nodeid, 8);
    memcpy(buf + 40 + 16 + 8, &end, 8);   /* fuse_lk_in.lk.end */
    memcpy(buf + 40 + 16 + 16, &type, 4); /* fuse_lk_in.lk.type */
    CHECK(write(fd, buf, len) == (ssize_t)len, "write to the pump's socket");
}

/* Wait up to 5 s for the pump's stats to satisfy `ok`. */
static int wait_stats(struct vfsdrv_pump *p, int (*ok)(const struct vfsdrv_pump_stats *))
{
    struct vfsdrv_pump_stats s;
    for (int i = 0; i < 5000; i++) {
        vfsdrv_pump_get_stats(p, &s);
        if (ok(&s))
            return 1;
        usleep(1000);
    }
    return 0;
}
static int two_read_one_waiting(const struct vfsdrv_pump_stats *s)
{
    return s->requests == 2 && s->queue_full == 1;
}

/* Whether has_setlkw(unique) comes to say `want` within 5 s (the pump frees a
 * slot just after writing its reply). */
static int setlkw_seen(struct vfsdrv_pump *p, uint64_t unique, int want)
{
    for (int i = 0; i < 5000; i++) {
        if (vfsdrv_pump_has_setlkw(p, unique) == want)
            return want;
        usleep(1000);
    }
    return !want;
}

/* The device answers the chain on its ring with an error reply to `unique`. */
static void device_answers(struct rd_dev *d, int irq, uint64_t unique)
{
    struct rd_chain c;
    for (int i = 0; i < 5000 && !rd_pop(d, &c); i++)
        usleep(1000);
    struct vfsdrv_out_header h = {16, -11 /* EAGAIN */, unique};
    memcpy((void *)(uintptr_t)c.seg[c.n - 1].addr, &h, 16);
    rd_push(d, c.head, 16, c.entries);
    uint64_t one = 1;
    CHECK(write(irq, &one, 8) == 8, "irq");
}

/* The reply the pump wrote for the request read on `fd` (5 s at most). */
static uint64_t reply_unique(int fd)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    struct vfsdrv_out_header h = {0, 0, 0};
    if (poll(&pfd, 1, 5000) == 1 && read(fd, &h, sizeof h) == (ssize_t)sizeof h)
        return h.unique;
    return 0;
}

/* A SETLKW the pump has read but holds until the ring has room is one the relay
 * must forward an INTERRUPT for (the kernel sends it once): has_setlkw sees it
 * from the read on, not only once it is on the ring. */
void test_pump_pending_setlkw_is_seen(void)
{
    int blk[2], nb[2];
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, blk) == 0, "socketpair");
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, nb) == 0, "socketpair");
    int kick = eventfd(0, EFD_NONBLOCK), irq = eventfd(0, EFD_NONBLOCK);
    int ev = eventfd(0, EFD_NONBLOCK);
    struct rd_ring r;
    struct rd_dev d;
    struct vfsdrv_vq vq;
    rig_up(&r, &d, &vq, 2, 0, 0, 1);  /* two entries, no indirect: one request fills it */
    struct vfsdrv_slot slots[4];
    memset(slots, 0, sizeof slots);
    for (int i = 0; i < 4; i++) {
        slots[i].large = i >= 2;
        slots[i].size = slots[i].large ? LARGE : SMALL;
        slots[i].host = rd_zalloc(slots[i].size);
        slots[i].addr = (uint64_t)(uintptr_t)slots[i].host;
    }
    struct vfsdrv_pump_config cfg = {.fuse_fd = blk[0], .fuse_nb_fd = nb[0], .irq_fd = irq,
        .kick_fd = kick, .event_fd = ev, .poll_ms = 1, .max_io = 131072,
        .small_size = SMALL, .lock_wait = 1};
    char err[200];
    struct vfsdrv_pump *p = vfsdrv_pump_new(&cfg, &vq, slots, 4, err, sizeof err);
    CHECK(p != NULL, "%s", err);
    if (!p)
        return;
    pthread_t t;
    pthread_create(&t, NULL, run_pump, p);
    send_setlkw(blk[1], 100);  /* read idle (blocking): onto the ring, which it fills */
    struct vfsdrv_pump_stats s;
    for (int i = 0; i < 5000; i++) {
        vfsdrv_pump_get_stats(p, &s);
        if (s.in_flight == 1)
            break;
        usleep(1000);
    }
    send_setlkw(nb[1], 102);   /* read busy (the clone): no room, held by the pump */
    CHECK(wait_stats(p, two_read_one_waiting), "the second SETLKW was not held");
    EQ(vfsdrv_pump_has_setlkw(p, 100), 1);
    EQ(vfsdrv_pump_has_setlkw(p, 102), 1);  /* held, not yet on the ring */
    EQ(vfsdrv_pump_has_setlkw(p, 104), 0);
    device_answers(&d, irq, 100);
    EQ(reply_unique(blk[1]), 100);
    EQ(setlkw_seen(p, 100, 0), 0);
    EQ(vfsdrv_pump_has_setlkw(p, 102), 1);  /* now on the ring */
    device_answers(&d, irq, 102);
    EQ(reply_unique(nb[1]), 102);
    EQ(setlkw_seen(p, 102, 0), 0);
    send_setlkw(blk[1], 104);  /* read idle again; on the ring when the pump stops */
    EQ(setlkw_seen(p, 104, 1), 1);
    while (vfsdrv_pump_running(p)) {
        vfsdrv_pump_stop(p);
        usleep(1000);
    }
    pthread_join(t, NULL);
    /* the relay keeps exactly the slots still on the ring out of reuse */
    int on_ring = 0;
    for (int i = 0; i < 4; i++)
        if (slots[i].state == VFSDRV_SLOT_RING) {
            on_ring++;
            EQ(slots[i].unique, 104);
        }
    EQ(on_ring, 1);
    vfsdrv_pump_free(p);
    for (int i = 0; i < 4; i++)
        free(slots[i].host);
    int fds[] = {blk[0], blk[1], nb[0], nb[1], kick, irq, ev};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        close(fds[i]);
}
