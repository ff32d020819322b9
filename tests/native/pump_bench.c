/* The whole request pump (driver/native/pump.c) under a fixed workload, for the
 * instruction budget: a real FUSE connection (/dev/fuse, mounted here: root only;
 * run it in a private mount namespace, `unshare -m`, so that nothing outlives it),
 * the pump on its own thread exactly as the relay runs it (blocking and
 * O_NONBLOCK clones of the connection, an irq eventfd, a kick eventfd), an
 * in-process device thread answering every GETATTR from the ring (ringdev.h), and
 * THREADS workload threads calling statx(AT_STATX_FORCE_SYNC) on the mount root:
 * one GETATTR each, always sent to the "server".
 *
 *   pump_bench N [THREADS] [split|packed]
 *   pump_bench --socket N [split|packed]
 *
 * --socket needs neither root nor /dev/fuse (nor FUSE_DEV_IOC_CLONE, which
 * qemu-user does not translate): an AF_UNIX SOCK_SEQPACKET pair stands in for the
 * connection, one request at a time from a thread of ours that checks each reply
 * (the pump reads the blocking descriptor whenever nothing is in flight, so at
 * depth 1 every request arrives there). It runs the pump on aarch64 under qemu.
 *
 * tests/test_native_budget.py counts the pump thread alone with
 *   valgrind --tool=callgrind --toggle-collect=vfsdrv_pump_run
 * and divides by the requests the pump reports. Prints the pump's statistics;
 * exits 1 unless every request got a valid reply.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ringdev.h"  /* and vfsdrv_core.h (no include guard: cffi reads it) */

#define MAX_IO 131072
#define NSMALL 16
#define NLARGE 4
#define SMALL_SIZE (2 * VFSDRV_PAGE)
/* a landing slot takes a whole read(): /dev/fuse wants room for max_write + headers */
#define LARGE_SIZE (VFSDRV_PAGE + MAX_IO + 2 * VFSDRV_PAGE)

static struct rd_ring ring;
static struct rd_dev dev;
static int kick_fd, irq_fd, stop_device;
static uint64_t served, not_getattr;
static char mnt[] = "/tmp/vfsdrv-pump-bench.XXXXXX";
static uint32_t per_thread;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* answer one chain: GETATTR gets a valid fuse_attr_out, anything else ENOSYS */
static void serve(const struct rd_chain *c)
{
    const uint8_t *req = (const uint8_t *)(uintptr_t)c->seg[0].addr;
    struct fuse_in_header in;
    memcpy(&in, req, sizeof in);
    struct { struct fuse_out_header h; struct fuse_attr_out a; } rep;
    memset(&rep, 0, sizeof rep);
    rep.h.unique = in.unique;
    if (in.opcode == FUSE_GETATTR && c->n == 2) {
        rep.h.len = sizeof rep;
        rep.a.attr.ino = 1;
        rep.a.attr.mode = S_IFDIR | 0755;
        rep.a.attr.nlink = 2;
        rep.a.attr.blksize = 4096;
    } else {
        rep.h.len = sizeof rep.h;
        rep.h.error = -ENOSYS;
        not_getattr++;
    }
    uint32_t room = c->seg[c->n - 1].len;
    uint32_t len = rep.h.len < room ? rep.h.len : room;
    memcpy((void *)(uintptr_t)c->seg[c->n - 1].addr, &rep, len);
    rd_push(&dev, c->head, len, c->entries);
    served++;
}

/* the device: woken by a kick, answers every chain on the ring, signals irq_fd
 * when the driver asked for it (EVENT_IDX, as virtiofsd/vhost do) */
static void *device_thread(void *arg)
{
    (void)arg;
    for (;;) {
        uint64_t v;
        if (read(kick_fd, &v, 8) != 8 && errno != EINTR)
            die("device: read kick");
        if (__atomic_load_n(&stop_device, __ATOMIC_ACQUIRE))
            return NULL;
        do {
            struct rd_chain c;
            uint16_t old = dev.used_idx;
            int any = 0;
            while (rd_pop(&dev, &c)) {
                serve(&c);
                any = 1;
            }
            uint64_t one = 1;
            if (any && rd_should_signal(&dev, 1, old) && write(irq_fd, &one, 8) != 8)
                die("device: signal irq");
        } while (rd_want_kicks(&dev, 1));
    }
}

static void *pump_thread(void *p)
{
    int rc = vfsdrv_pump_run(p);
    return (void *)(intptr_t)rc;
}

static void *stat_thread(void *arg)
{
    const char *path = arg;
    for (uint32_t i = 0; i < per_thread; i++) {
        struct statx stx;
        if (statx(AT_FDCWD, path, AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, &stx) != 0)
            die("statx");
    }
    return NULL;
}

/* The workload runs in another process (exec'd: not counted, not traced): were it
 * a thread of ours, a crash here would leave it waiting forever for a reply from a
 * server that shares its fate (the connection only aborts when our /dev/fuse
 * descriptors close, which waits for every thread). */
static int stat_workload(const char *path, uint32_t threads)
{
    pthread_t st[64];
    for (uint32_t t = 0; t < threads; t++)
        pthread_create(&st[t], NULL, stat_thread, (void *)path);
    for (uint32_t t = 0; t < threads; t++)
        pthread_join(st[t], NULL);
    return 0;
}

/* --socket: the kernel's side of the connection, one GETATTR at a time */
static int sock_peer;
static uint32_t sock_requests, sock_good;

static void *socket_feeder(void *arg)
{
    (void)arg;
    for (uint32_t i = 0; i < sock_requests; i++) {
        struct { struct fuse_in_header h; struct fuse_getattr_in a; } req;
        memset(&req, 0, sizeof req);
        req.h.len = sizeof req;
        req.h.opcode = FUSE_GETATTR;
        req.h.unique = 2 * (uint64_t)i + 2;
        req.h.nodeid = 1;
        if (write(sock_peer, &req, sizeof req) != sizeof req)
            die("feeder: write");
        uint8_t buf[512];
        ssize_t got = read(sock_peer, buf, sizeof buf);
        struct fuse_out_header h;
        if (got < (ssize_t)sizeof h)
            die("feeder: read");
        memcpy(&h, buf, sizeof h);
        struct fuse_attr_out a;
        memcpy(&a, buf + sizeof h, sizeof a);
        if (got == (ssize_t)(sizeof h + sizeof a) && h.len == got && h.error == 0 &&
            h.unique == req.h.unique && a.attr.ino == 1)
            sock_good++;
    }
    return NULL;
}

/* FUSE_INIT is the control plane's; answer it before the pump starts */
static void answer_init(int fd)
{
    static uint8_t buf[LARGE_SIZE];
    ssize_t n = read(fd, buf, sizeof buf);
    struct fuse_in_header in;
    if (n < (ssize_t)sizeof in)
        die("read INIT");
    memcpy(&in, buf, sizeof in);
    if (in.opcode != FUSE_INIT) {
        fprintf(stderr, "pump_bench: first request is opcode %u\n", in.opcode);
        exit(1);
    }
    struct { struct fuse_out_header h; struct fuse_init_out o; } rep;
    memset(&rep, 0, sizeof rep);
    rep.h.len = sizeof rep;
    rep.h.unique = in.unique;
    rep.o.major = FUSE_KERNEL_VERSION;
    rep.o.minor = 31;
    rep.o.max_write = MAX_IO;
    rep.o.max_background = 16;
    rep.o.congestion_threshold = 12;
    rep.o.time_gran = 1;
    if (write(fd, &rep, sizeof rep) != sizeof rep)
        die("write INIT reply");
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "--stat")) {  /* the workload process */
        per_thread = (uint32_t)atoi(argv[3]);
        return stat_workload(argv[2], (uint32_t)atoi(argv[4]));
    }
    int socket_mode = argc > 1 && !strcmp(argv[1], "--socket");
    if (socket_mode) {
        argv++;
        argc--;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: %s N [THREADS] [split|packed] | --socket N [split|packed]\n",
                argv[0]);
        return 2;
    }
    alarm(120);  /* a hang ends here; the workload then sees the connection abort */
    uint32_t n = (uint32_t)atoi(argv[1]);
    uint32_t threads = !socket_mode && argc > 2 ? (uint32_t)atoi(argv[2]) : 1;
    const char *layout = argc > (socket_mode ? 2 : 3) ? argv[socket_mode ? 2 : 3] : "split";
    int packed = !strcmp(layout, "packed");
    if (threads < 1 || threads > 64 || n < threads)
        return 2;
    per_thread = n / threads;

    int fds[2];
    if (socket_mode) {
        int sp[2], idle[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) ||
            socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, idle))
            die("socketpair");
        fds[0] = sp[0];
        fds[1] = idle[0];  /* never readable: at depth 1 nothing arrives while busy */
        sock_peer = sp[1];
        sock_requests = n;
    } else {
        int fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC);
        if (fuse < 0)
            die("/dev/fuse");
        if (!mkdtemp(mnt))
            die("mkdtemp");
        char opts[128];
        snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0", fuse);
        if (mount("vfsdrv-pump-bench", mnt, "fuse.vfsdrv-pump-bench", MS_NOSUID | MS_NODEV,
                  opts))
            die("mount");
        answer_init(fuse);
        /* the relay's two clones of the session: blocking (idle) and non-blocking (busy) */
        for (int k = 0; k < 2; k++) {
            fds[k] = open("/dev/fuse", O_RDWR | O_CLOEXEC | (k ? O_NONBLOCK : 0));
            uint32_t session = (uint32_t)fuse;
            if (fds[k] < 0 || ioctl(fds[k], FUSE_DEV_IOC_CLONE, &session))
                die("FUSE_DEV_IOC_CLONE");
        }
    }
    kick_fd = eventfd(0, EFD_CLOEXEC);
    irq_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (kick_fd < 0 || irq_fd < 0 || event_fd < 0)
        die("eventfd");

    struct vfsdrv_vq vq;
    rd_ring_init(&ring, 128, packed, 0);
    rd_dev_init(&dev, &ring);
    if (rd_vq_init(&vq, &ring, 1)) {
        fprintf(stderr, "pump_bench: %s\n", vq.error);
        return 1;
    }
    struct vfsdrv_slot slots[NSMALL + NLARGE];
    memset(slots, 0, sizeof slots);
    for (int i = 0; i < NSMALL + NLARGE; i++) {
        slots[i].large = i >= NSMALL;
        slots[i].size = slots[i].large ? LARGE_SIZE : SMALL_SIZE;
        slots[i].host = rd_zalloc(slots[i].size);
        slots[i].addr = (uint64_t)(uintptr_t)slots[i].host;
    }
    struct vfsdrv_pump_config cfg = {
        .fuse_fd = fds[0], .fuse_nb_fd = fds[1], .irq_fd = irq_fd, .kick_fd = kick_fd,
        .event_fd = event_fd, .poll_ms = 1, .max_io = MAX_IO, .small_size = SMALL_SIZE,
        /* PUMP_BENCH_IO_URING=1: replies batched as the relay does by default (off
         * for the instruction budget: valgrind does not follow io_uring) */
        .io_uring = getenv("PUMP_BENCH_IO_URING") && !strcmp(getenv("PUMP_BENCH_IO_URING"), "1"),
    };
    char err[200];
    struct vfsdrv_pump *p = vfsdrv_pump_new(&cfg, &vq, slots, NSMALL + NLARGE, err, sizeof err);
    if (!p) {
        fprintf(stderr, "pump_bench: %s\n", err);
        return 1;
    }
    pthread_t pt, dt;
    pthread_create(&dt, NULL, device_thread, NULL);
    pthread_create(&pt, NULL, pump_thread, p);
    int status = 0;
    if (socket_mode) {
        pthread_t ft;
        pthread_create(&ft, NULL, socket_feeder, NULL);
        pthread_join(ft, NULL);
    } else {
        char per[16], nthreads[16];
        snprintf(per, sizeof per, "%u", per_thread);
        snprintf(nthreads, sizeof nthreads, "%u", threads);
        pid_t child = fork();
        if (child == 0) {  /* the /dev/fuse descriptors are O_CLOEXEC */
            execl(argv[0], argv[0], "--stat", mnt, per, nthreads, (char *)NULL);
            _exit(127);
        }
        if (child < 0 || waitpid(child, &status, 0) != child)
            die("workload process");
    }

    /* stop() is repeated: a signal sent just before the pump enters read() is lost */
    while (vfsdrv_pump_running(p) || !served) {
        vfsdrv_pump_stop(p);
        usleep(1000);
    }
    void *rc;
    pthread_join(pt, &rc);
    __atomic_store_n(&stop_device, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(kick_fd, &one, 8) != 8)
        die("stop device");
    pthread_join(dt, NULL);

    struct vfsdrv_pump_stats s;
    vfsdrv_pump_get_stats(p, &s);
    struct vfsdrv_event ev[16];
    uint32_t nev = vfsdrv_pump_events(p, ev, 16);
    printf("pump_bench: %s ring, %u threads: requests %llu replies %llu bad_replies %llu "
           "to_control %llu syscalls %llu kicks %llu wakeups %llu eagain %llu events %u "
           "exit %d reply_batches %llu batched_replies %llu io_uring %d\n",
           packed ? "packed" : "split", threads,
           (unsigned long long)s.requests, (unsigned long long)s.replies,
           (unsigned long long)s.bad_replies, (unsigned long long)s.to_control,
           (unsigned long long)s.syscalls, (unsigned long long)s.kicks,
           (unsigned long long)s.wakeups, (unsigned long long)s.eagain, nev, (int)(intptr_t)rc,
           (unsigned long long)s.reply_batches, (unsigned long long)s.batched_replies,
           vfsdrv_pump_io_uring(p));
    for (uint32_t k = 0; k < nev; k++)
        printf("pump_bench: event %u opcode %u: %s\n", ev[k].kind, ev[k].opcode, ev[k].why);
    vfsdrv_pump_free(p);
    if (!socket_mode) {
        if (umount2(mnt, MNT_DETACH))
            perror("umount");
        rmdir(mnt);
    } else if (sock_good != n) {
        fprintf(stderr, "pump_bench: %u of %u replies right\n", sock_good, n);
        status = 1 << 8;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "pump_bench: the workload failed (status %#x)\n", status);
    int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && s.requests == (uint64_t)per_thread * threads && s.replies == s.requests &&
             s.bad_replies == 0 && not_getattr == 0 && nev == 0 &&
             (intptr_t)rc == VFSDRV_PUMP_STOPPED;
    return ok ? 0 : 1;
}
