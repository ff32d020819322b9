/* The request pump: one thread moves FUSE requests between /dev/fuse and one
 * virtio-fs request queue, without the GIL.
 *
 * A round: harvest every used entry (validate, write each reply to the /dev/fuse
 * descriptor that read its request), read every request the kernel has (into a
 * DMA slot, sized by the shared rules in core.c), add them all, publish once,
 * kick once unless the device suppressed it. Then sleep:
 *   - nothing in flight: a blocking read() on the blocking descriptor, so one
 *     request at queue depth 1 costs read + kick + epoll_wait + writev. When it
 *     returns, the requests queued behind it are read too (O_NONBLOCK) so that one
 *     kick covers them; that look backs off while it finds none (queue depth 1);
 *   - requests in flight: epoll_wait on the O_NONBLOCK clone (more requests), the
 *     used-buffer eventfd (edge-triggered: never read, re-armed by each signal) and
 *     the control eventfd.
 *     With a poll window (cfg.poll_ns, vfsdrv mount -o poll_us=N, off by default)
 *     the pump first spins on the used ring for up to that long: a fast device's
 *     completion then costs no sleep and wake-up (a context switch each), at the
 *     price of the CPU burnt spinning. The window backs off after misses in a row
 *     (slow requests: create, fsync), so they do not burn it every time.
 *   - nothing in flight with a poll window: before the blocking read, O_NONBLOCK
 *     reads for up to the window, so that a program's next request right after its
 *     reply costs no wake-up of the pump either (backed off the same way).
 * FORGET and BATCH_FORGET go straight to the hiprio sender (hiprio.c) when the pump
 * has one: copied out of the landing slot (which stays the landing slot), flushed
 * once per round with the request queue's own publish. When the sender is full
 * they take the control plane's path below, whose backlog retries.
 * Everything else goes to the control plane (Python) as an event: INIT,
 * INTERRUPT, DESTROY, NOTIFY_REPLY (the slot is lent to it), a SETLKW the device
 * answered "wait" (the final reply comes from the notification queue), a bad reply
 * (already answered with EIO here; the event is for the log).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "vfsdrv_core.h"
#include "kick.h"  /* after vfsdrv_core.h */
#include "uring.h"

#define READ_BATCH 64
#define TAG_FUSE 1
#define TAG_IRQ 2
#define TAG_CTL 3
#define RING_WATCHDOG_MS 1000  /* requests in flight, no interrupt: look anyway */
#define POLL_CLOCK_EVERY 16    /* spins between two looks at the clock */
#define IDLE_LOOK_NS 2000      /* idle poll window: one read of /dev/fuse per 2 us */
/* The poll window is for latency at low depth: with more in flight, completions come
 * in batches anyway, and a spin only takes the CPU a device on the same CPUs needs
 * (measured on 2 vCPUs: 16 in flight fell from 158k to 38k requests/s, a kick each) */
#define POLL_MAX_IN_FLIGHT 4
#define URING_ENTRIES 128      /* replies sent in one io_uring_enter, at most */
#define BACKOFF_MAX 6          /* after misses in a row, skip up to 2^5 - 1 looks */

/* A look that may find nothing -- a spin on the used ring, a read of /dev/fuse that
 * may end in EAGAIN -- costs the pump each time it misses. After the 2nd, 3rd, ...
 * miss in a row it is skipped for 1, 3, 7, ... up to 2^(BACKOFF_MAX-1) - 1 rounds, so
 * a workload where it never pays pays for it about once in 32 rounds; a hit resets
 * it. */
struct backoff {
    uint32_t skip;               /* looks still to skip */
    uint32_t miss_run;           /* misses in a row */
};

static int backoff_skip(struct backoff *b)
{
    if (!b->skip)
        return 0;
    b->skip--;
    return 1;
}

static void backoff_hit(struct backoff *b) { b->miss_run = 0; }

static void backoff_miss(struct backoff *b)
{
    if (b->miss_run < BACKOFF_MAX)
        b->miss_run++;
    b->skip = (1u << (b->miss_run - 1)) - 1;
}

/* A validated reply waiting for the round's send: the header is the pump's copy
 * (what the device can still rewrite is never what was checked); the payload is
 * where the device put it. */
struct reply_out {
    struct vfsdrv_out_header h;
    struct iovec iov[2];
    uint32_t niov;
    uint32_t len;                /* the used entry's length (for the log) */
};

struct vfsdrv_pump {
    struct vfsdrv_pump_config cfg;
    struct vfsdrv_vq *vq;
    struct vfsdrv_slot *slots;
    uint32_t nslots;
    uint32_t *free_small, nfree_small;
    uint32_t *free_large, nfree_large;
    int32_t landing;             /* large slot that the next read lands in, or -1 */
    uint32_t *pending;           /* slots waiting for ring room, FIFO */
    uint32_t pend_head, pend_count;
    uint32_t *head_slot;         /* ring head -> slot */
    struct vfsdrv_seg *segs;
    uint32_t max_segs;
    struct vfsdrv_used *used;
    struct vfsdrv_hiprio *hiprio;  /* FORGET/BATCH_FORGET go here; NULL: to the control plane */
    int hiprio_added;            /* sent to hiprio since the last flush */
    int epfd, ctl_fd;
    int fuse_polled;
    int conn_gone;
    struct backoff poll;         /* the poll window (skipped: sleep at once) */
    struct backoff more;         /* reading on after the idle read woke the pump */
    struct backoff idle;         /* the idle poll window on /dev/fuse */
    int poll_peek;               /* the last spin found a completion: look at /dev/fuse first */
    struct vfsdrv_uring *uring;  /* a round's replies in one syscall; NULL: a writev each */
    int uring_on;                /* atomic: uring != NULL, for the control thread */
    struct reply_out *outs;      /* per slot: its reply while it waits for the send */
    uint32_t *out_q, nout;       /* slots whose reply waits for this round's send */
    /* shared with the control thread */
    pthread_mutex_t lock;
    struct vfsdrv_event *events;
    uint32_t nevents, cap_events;
    uint32_t *given;             /* slot | (forward << 31) */
    uint32_t ngiven;
    int gives;                   /* atomic: given is not empty */
    int stop;                    /* atomic */
    int in_block;                /* atomic: blocked in read() on the blocking fd */
    int running;                 /* atomic */
    pthread_t thread;
    struct vfsdrv_pump_stats stats;
    char error[VFSDRV_ERROR_LEN];
};

/* The control thread interrupts a blocking read() with this signal; its handler
 * does nothing (installed without SA_RESTART, so read() returns EINTR). */
static void wake_handler(int sig) { (void)sig; }
static int wake_signal(void) { return SIGRTMIN + 3; }

#define STAT(p, f) __atomic_fetch_add(&(p)->stats.f, 1, __ATOMIC_RELAXED)

static void set_error(struct vfsdrv_pump *p, const char *fmt, const char *arg)
{
    snprintf(p->error, sizeof p->error, fmt, arg);
}

struct vfsdrv_pump *vfsdrv_pump_new(const struct vfsdrv_pump_config *cfg, struct vfsdrv_vq *vq,
                                    struct vfsdrv_slot *slots, uint32_t nslots,
                                    char *err, uint32_t err_len)
{
    struct vfsdrv_pump *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    p->cfg = *cfg;
    p->vq = vq;
    p->slots = slots;
    p->nslots = nslots;
    p->landing = -1;
    p->epfd = p->ctl_fd = -1;
    pthread_mutex_init(&p->lock, NULL);
    p->free_small = calloc(nslots, sizeof *p->free_small);
    p->free_large = calloc(nslots, sizeof *p->free_large);
    p->pending = calloc(nslots, sizeof *p->pending);
    p->given = calloc(nslots, sizeof *p->given);
    p->head_slot = calloc(vq->size, sizeof *p->head_slot);
    p->used = calloc(vq->size, sizeof *p->used);
    uint32_t biggest = 0;
    for (uint32_t i = 0; i < nslots; i++)
        if (slots[i].size > biggest)
            biggest = slots[i].size;
    p->max_segs = 2 * (biggest / VFSDRV_PAGE + 2);
    p->segs = calloc(p->max_segs, sizeof *p->segs);
    p->cap_events = 64;
    p->events = calloc(p->cap_events, sizeof *p->events);
    p->outs = calloc(nslots, sizeof *p->outs);
    p->out_q = calloc(nslots, sizeof *p->out_q);
    if (!p->free_small || !p->free_large || !p->pending || !p->given || !p->head_slot ||
        !p->used || !p->segs || !p->events || !p->outs || !p->out_q) {
        snprintf(err, err_len, "out of memory");
        vfsdrv_pump_free(p);
        return NULL;
    }
    for (uint32_t i = 0; i < nslots; i++) {
        struct vfsdrv_slot *s = &slots[i];
        if (((uintptr_t)s->host & (VFSDRV_PAGE - 1)) || s->size < 2 * VFSDRV_PAGE) {
            snprintf(err, err_len, "slot %u is not page-aligned or too small", i);
            vfsdrv_pump_free(p);
            return NULL;
        }
        s->state = VFSDRV_SLOT_FREE;
        if (s->large)
            p->free_large[p->nfree_large++] = i;
        else
            p->free_small[p->nfree_small++] = i;
    }
    if (!p->nfree_large) {
        snprintf(err, err_len, "the pump needs at least one large slot");
        vfsdrv_pump_free(p);
        return NULL;
    }
    p->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->ctl_fd < 0 || p->epfd < 0) {
        snprintf(err, err_len, "eventfd/epoll: %s", strerror(errno));
        vfsdrv_pump_free(p);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = TAG_CTL};
    int rc = epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->ctl_fd, &ev);
    if (rc == 0 && cfg->irq_fd >= 0) {
        /* edge-triggered: each signal from the device wakes us once; the eventfd's
         * counter is never read (one syscall less per wake-up) */
        ev.events = EPOLLIN | EPOLLET;
        ev.data.u32 = TAG_IRQ;
        rc = epoll_ctl(p->epfd, EPOLL_CTL_ADD, cfg->irq_fd, &ev);
    }
    if (rc != 0) {
        snprintf(err, err_len, "epoll_ctl: %s", strerror(errno));
        vfsdrv_pump_free(p);
        return NULL;
    }
    if (cfg->io_uring)  /* NULL when the kernel gives none: a writev per reply */
        p->uring = vfsdrv_uring_new(nslots < URING_ENTRIES ? nslots : URING_ENTRIES);
    p->uring_on = p->uring != NULL;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = wake_handler;  /* no SA_RESTART: a blocked read() returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(wake_signal(), &sa, NULL);
    return p;
}

void vfsdrv_pump_free(struct vfsdrv_pump *p)
{
    if (!p)
        return;
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->ctl_fd >= 0)
        close(p->ctl_fd);
    free(p->free_small);
    free(p->free_large);
    free(p->pending);
    free(p->given);
    free(p->head_slot);
    free(p->used);
    free(p->segs);
    free(p->events);
    free(p->outs);
    free(p->out_q);
    vfsdrv_uring_free(p->uring);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/* -- talking to the control plane ---------------------------------------------- */
/* The control thread sleeps on event_fd: events wait for it, or a broken hiprio
 * sender does (it reads vfsdrv_hiprio_error). */
static void wake_control(struct vfsdrv_pump *p)
{
    uint64_t one = 1;
    STAT(p, syscalls);
    if (write(p->cfg.event_fd, &one, 8) < 0 && errno != EAGAIN)
        STAT(p, write_errors);
}

static void push_event_arg(struct vfsdrv_pump *p, uint32_t kind, uint32_t slot, uint64_t unique,
                           uint32_t opcode, int32_t fd, uint32_t len, const char *why,
                           uint64_t arg)
{
    pthread_mutex_lock(&p->lock);
    if (p->nevents == p->cap_events) {
        struct vfsdrv_event *more = realloc(p->events, 2 * p->cap_events * sizeof *more);
        if (!more) {  /* keep the slot accounting right; only the log line is lost */
            pthread_mutex_unlock(&p->lock);
            return;
        }
        p->events = more;
        p->cap_events *= 2;
    }
    struct vfsdrv_event *e = &p->events[p->nevents++];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    e->slot = slot;
    e->unique = unique;
    e->opcode = opcode;
    e->fd = fd;
    e->len = len;
    e->arg = arg;
    if (why)
        snprintf(e->why, sizeof e->why, "%s", why);
    pthread_mutex_unlock(&p->lock);
    wake_control(p);
}

static void push_event(struct vfsdrv_pump *p, uint32_t kind, uint32_t slot, uint64_t unique,
                       uint32_t opcode, int32_t fd, uint32_t len, const char *why)
{
    push_event_arg(p, kind, slot, unique, opcode, fd, len, why, 0);
}

uint32_t vfsdrv_pump_events(struct vfsdrv_pump *p, struct vfsdrv_event *out, uint32_t max)
{
    pthread_mutex_lock(&p->lock);
    uint32_t n = p->nevents < max ? p->nevents : max;
    memcpy(out, p->events, n * sizeof *out);
    memmove(p->events, p->events + n, (p->nevents - n) * sizeof *out);
    p->nevents -= n;
    pthread_mutex_unlock(&p->lock);
    return n;
}

static void interrupt_read(struct vfsdrv_pump *p)
{
    /* seq_cst pairs with the pump's store of in_block and load of gives/stop */
    if (__atomic_load_n(&p->in_block, __ATOMIC_SEQ_CST) &&
        __atomic_load_n(&p->running, __ATOMIC_SEQ_CST))
        pthread_kill(p->thread, wake_signal());
}

void vfsdrv_pump_give(struct vfsdrv_pump *p, uint32_t slot, uint32_t forward)
{
    if (slot >= p->nslots)
        return;
    pthread_mutex_lock(&p->lock);
    p->given[p->ngiven++] = slot | (forward ? 1u << 31 : 0);
    pthread_mutex_unlock(&p->lock);
    __atomic_store_n(&p->gives, 1, __ATOMIC_SEQ_CST);
    uint64_t one = 1;
    if (write(p->ctl_fd, &one, 8) < 0) { /* full counter: the pump wakes anyway */ }
    interrupt_read(p);
}

void vfsdrv_pump_stop(struct vfsdrv_pump *p)
{
    __atomic_store_n(&p->stop, 1, __ATOMIC_SEQ_CST);
    uint64_t one = 1;
    if (write(p->ctl_fd, &one, 8) < 0) { /* as above */ }
    /* a signal sent just before the pump enters read() is lost: callers repeat
     * stop() until vfsdrv_pump_running() says 0 */
    interrupt_read(p);
}

int vfsdrv_pump_running(struct vfsdrv_pump *p)
{
    return __atomic_load_n(&p->running, __ATOMIC_SEQ_CST);
}

int vfsdrv_pump_has_setlkw(struct vfsdrv_pump *p, uint64_t unique)
{
    /* read-only scan from the control thread. A SETLKW waiting for ring room counts:
     * the kernel sends its INTERRUPT once, and the wait reply is still to come. */
    for (uint32_t i = 0; i < p->nslots; i++) {
        struct vfsdrv_slot *s = &p->slots[i];
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if ((state == VFSDRV_SLOT_RING || state == VFSDRV_SLOT_PENDING) &&
            s->opcode == 33 /* SETLKW */ && s->unique == unique)
            return 1;
    }
    return 0;
}

/* The seq of the oldest request on the ring, those that may take long aside, or
 * UINT64_MAX. A read-only scan from the control thread, as above: a slot reused
 * meanwhile only makes the answer younger. */
uint64_t vfsdrv_pump_oldest(struct vfsdrv_pump *p)
{
    uint64_t oldest = UINT64_MAX;
    for (uint32_t i = 0; i < p->nslots; i++) {
        struct vfsdrv_slot *s = &p->slots[i];
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != VFSDRV_SLOT_RING ||
            vfsdrv_may_take_long(__atomic_load_n(&s->opcode, __ATOMIC_RELAXED)))
            continue;
        uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
        if (seq < oldest)
            oldest = seq;
    }
    return oldest;
}

/* How many requests on the ring may hold the queue (vfsdrv_may_hold_queue): a
 * read-only scan from the control thread, as above. */
uint32_t vfsdrv_pump_holding(struct vfsdrv_pump *p)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < p->nslots; i++) {
        struct vfsdrv_slot *s = &p->slots[i];
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == VFSDRV_SLOT_RING &&
            vfsdrv_may_hold_queue(__atomic_load_n(&s->opcode, __ATOMIC_RELAXED)))
            n++;
    }
    return n;
}

void vfsdrv_pump_get_stats(struct vfsdrv_pump *p, struct vfsdrv_pump_stats *out)
{
    uint64_t *src = (uint64_t *)&p->stats, *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / 8; i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    out->in_flight = p->vq->in_flight;
}

const char *vfsdrv_pump_error(struct vfsdrv_pump *p) { return p->error; }

int vfsdrv_pump_io_uring(struct vfsdrv_pump *p)
{
    return __atomic_load_n(&p->uring_on, __ATOMIC_RELAXED);
}

void vfsdrv_pump_set_hiprio(struct vfsdrv_pump *p, struct vfsdrv_hiprio *h) { p->hiprio = h; }

/* -- slots ---------------------------------------------------------------------- */
static void free_slot(struct vfsdrv_pump *p, uint32_t i)
{
    struct vfsdrv_slot *s = &p->slots[i];
    __atomic_store_n(&s->state, VFSDRV_SLOT_FREE, __ATOMIC_RELEASE);
    s->flags = 0;
    if (!s->large)
        p->free_small[p->nfree_small++] = i;
    else if (p->landing < 0)
        p->landing = (int32_t)i;
    else
        p->free_large[p->nfree_large++] = i;
}

static int ensure_landing(struct vfsdrv_pump *p)
{
    if (p->landing < 0 && p->nfree_large)
        p->landing = (int32_t)p->free_large[--p->nfree_large];
    return p->landing >= 0;
}

/* Device-contiguous pieces of [off, off+len) of a slot. */
static uint32_t slot_segs(const struct vfsdrv_slot *s, uint32_t off, uint32_t len,
                          uint32_t flags, struct vfsdrv_seg *out, uint32_t room)
{
    if (!s->pages) {
        out[0] = (struct vfsdrv_seg){s->addr + off, len, flags};
        return 1;
    }
    uint32_t n = 0;
    do {
        uint32_t in_page = off & (VFSDRV_PAGE - 1);
        uint32_t chunk = VFSDRV_PAGE - in_page;
        if (chunk > len)
            chunk = len;
        uint64_t addr = s->pages[off / VFSDRV_PAGE] + in_page;
        if (n && out[n - 1].addr + out[n - 1].len == addr)
            out[n - 1].len += chunk;
        else if (n < room)
            out[n++] = (struct vfsdrv_seg){addr, chunk, flags};
        else
            return 0;
        off += chunk;
        len -= chunk;
    } while (len);
    return n;
}

static void write_error(struct vfsdrv_pump *p, int fd, uint64_t unique, int error);

/* Put a slot's request on the ring. 1: added; 0: no room (try later). */
static int add_slot(struct vfsdrv_pump *p, uint32_t i)
{
    struct vfsdrv_slot *s = &p->slots[i];
    uint32_t n = slot_segs(s, s->req_off, s->in_len, 0, p->segs, p->max_segs);
    uint32_t m = n ? slot_segs(s, s->reply_off, VFSDRV_OUT_HEADER + s->cap, VFSDRV_SEG_WRITE,
                               p->segs + n, p->max_segs - n) : 0;
    int head = m ? vfsdrv_vq_add(p->vq, p->segs, n + m) : -EINVAL;
    if (head == -ENOSPC)
        return 0;
    if (head < 0) {  /* cannot happen with the slots we build; never leave it pending */
        STAT(p, write_errors);
        push_event(p, VFSDRV_EV_BAD_REQUEST, i, s->unique, s->opcode, s->fd, 0, p->vq->error);
        write_error(p, s->fd, s->unique, -EIO);
        free_slot(p, i);
        return 1;
    }
    p->head_slot[head] = i;
    __atomic_store_n(&s->state, VFSDRV_SLOT_RING, __ATOMIC_RELEASE);
    return 1;
}

static void submit(struct vfsdrv_pump *p, uint32_t i)
{
    if (p->pend_count == 0 && add_slot(p, i))
        return;
    STAT(p, queue_full);
    p->pending[(p->pend_head + p->pend_count++) % p->nslots] = i;
}

static void submit_pending(struct vfsdrv_pump *p)
{
    while (p->pend_count) {
        if (!add_slot(p, p->pending[p->pend_head]))
            return;
        p->pend_head = (p->pend_head + 1) % p->nslots;
        p->pend_count--;
    }
}

static int flush(struct vfsdrv_pump *p)
{
    if (p->hiprio_added) {
        /* this round's FORGETs: one publish, one kick (unless suppressed). A broken
         * sender (its kick failed) is the control plane's to report: wake it, it
         * reads vfsdrv_hiprio_error; later forgets reach it as events anyway. */
        p->hiprio_added = 0;
        int kicked = vfsdrv_hiprio_flush(p->hiprio);
        if (kicked > 0 && p->cfg.kick_fd >= 0)
            STAT(p, syscalls);  /* (hiprio's kick is as the request queue's) */
        if (kicked < 0)
            wake_control(p);
    }
    if (!vfsdrv_vq_publish(p->vq))
        return 0;
    STAT(p, kicks);
    if (p->cfg.kick_fd >= 0)
        STAT(p, syscalls);
    int rc = vfsdrv_kick(p->cfg.kick_fd, p->cfg.notify_addr, p->cfg.notify_value,
                  p->cfg.notify_width);
    if (rc < 0) {
        set_error(p, "kick failed: %s", strerror(-rc));
        return -1;
    }
    return 0;
}

/* -- /dev/fuse ------------------------------------------------------------------ */
static void wrote(struct vfsdrv_pump *p, ssize_t rc)
{
    if (rc >= 0)
        return;
    if (errno == ENOENT)  /* the request was interrupted or aborted meanwhile */
        return;
    if (errno == ENODEV || errno == ECONNABORTED)
        p->conn_gone = 1;
    else
        STAT(p, write_errors);
}

static void write_error(struct vfsdrv_pump *p, int fd, uint64_t unique, int error)
{
    struct vfsdrv_out_header h = {VFSDRV_OUT_HEADER, error, unique};
    STAT(p, syscalls);
    wrote(p, write(fd, &h, sizeof h));
}

/* A reply written (res: bytes, or -errno): count it, say what the log needs, free
 * the slot. */
static void reply_written(struct vfsdrv_pump *p, uint32_t i, int32_t res)
{
    struct vfsdrv_slot *s = &p->slots[i];
    struct reply_out *o = &p->outs[i];
    STAT(p, replies);
    if (res < 0) {
        errno = -res;
        wrote(p, -1);
    }
    if (res == -EINVAL) {
        /* a payload the kernel's own checks reject (e.g. an attr of the wrong size):
         * it answers the program EIO itself; say which reply it was */
        STAT(p, bad_replies);
        push_event(p, VFSDRV_EV_BAD_REPLY, i, s->unique, s->opcode, s->fd, o->len,
                   "the kernel refused the reply (its payload does not fit the request)");
    }
    if (p->cfg.trace)
        push_event_arg(p, VFSDRV_EV_TRACE_REPLY, i, s->unique, s->opcode, s->fd,
                       o->h.len - VFSDRV_OUT_HEADER, NULL, (uint64_t)(int64_t)-o->h.error);
    free_slot(p, i);
}

static int32_t write_reply(struct vfsdrv_pump *p, uint32_t i)
{
    struct reply_out *o = &p->outs[i];
    STAT(p, syscalls);
    ssize_t n = writev(p->slots[i].fd, o->iov, (int)o->niov);
    return n < 0 ? -errno : (int32_t)n;
}

static void uring_done(void *arg, uint64_t user_data, int32_t res)
{
    struct vfsdrv_pump *p = arg;
    uint32_t i = (uint32_t)user_data;
    if (res == VFSDRV_URING_NOT_SENT) {
        res = write_reply(p, i);
    } else if (res < 0 && res != -ENOENT && res != -ENODEV && res != -ECONNABORTED) {
        /* io_uring's own refusal must not cost a reply: a writev decides. Where it
         * was /dev/fuse's (EINVAL: the kernel refused the payload and failed the
         * request), the writev finds the request gone (ENOENT): keep the first. */
        int32_t again = write_reply(p, i);
        if (!(res == -EINVAL && again == -ENOENT))
            res = again;
    }
    reply_written(p, i, res);
}

/* Write the replies this round has queued: with an io_uring and more than one to
 * write, one io_uring_enter for all of them (syscalls per request: 1 + what a
 * round costs / its requests, against 2 + that with a writev each). */
static void send_replies(struct vfsdrv_pump *p)
{
    uint32_t n = p->nout, ring_fd = 0, batch = 0;
    p->nout = 0;
    /* only replies to requests read on the O_NONBLOCK clone go through the ring: io_uring
     * would hand a write to the blocking descriptor (the idle read's) to a worker
     * thread on a kernel where /dev/fuse cannot say "would block" (only O_NONBLOCK
     * files are tried inline) */
    for (uint32_t k = 0; p->uring && k < n; k++)
        ring_fd += p->slots[p->out_q[k]].fd == p->cfg.fuse_nb_fd;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = p->out_q[k];
        if (ring_fd > 1 && p->slots[i].fd == p->cfg.fuse_nb_fd)
            p->out_q[batch++] = i;
        else  /* alone, or for the blocking descriptor: a writev */
            reply_written(p, i, write_reply(p, i));
    }
    if (!batch)
        return;
    for (uint32_t k = 0; k < batch; k++) {
        uint32_t i = p->out_q[k];
        if (vfsdrv_uring_writev(p->uring, p->cfg.fuse_nb_fd, p->outs[i].iov, p->outs[i].niov,
                                i) < 0)  /* cannot happen: batch <= room; never drop one */
            reply_written(p, i, write_reply(p, i));
    }
    int calls = vfsdrv_uring_submit(p->uring, uring_done, p);
    __atomic_fetch_add(&p->stats.syscalls, (uint64_t)calls, __ATOMIC_RELAXED);
    if (!vfsdrv_uring_failed(p->uring)) {
        __atomic_fetch_add(&p->stats.batched_replies, batch, __ATOMIC_RELAXED);
        STAT(p, reply_batches);
        return;
    }
    /* refused for good (uring_done wrote what it did not take): a writev each from
     * now on, and the control plane says so once */
    vfsdrv_uring_free(p->uring);
    p->uring = NULL;
    __atomic_store_n(&p->uring_on, 0, __ATOMIC_RELAXED);
    push_event(p, VFSDRV_EV_NO_IO_URING, 0, 0, 0, p->cfg.fuse_nb_fd, 0,
               "the kernel refused io_uring_enter: replies are written one by one");
}

static void complete(struct vfsdrv_pump *p, uint32_t i, uint32_t len)
{
    struct vfsdrv_slot *s = &p->slots[i];
    struct reply_out *o = &p->outs[i];
    char why[120];
    int may_wait = p->cfg.lock_wait && s->opcode == 33 /* SETLKW */;
    if (s->seq > p->stats.done_seq)  /* only this thread writes it */
        __atomic_store_n(&p->stats.done_seq, s->seq, __ATOMIC_RELAXED);
    int rc = vfsdrv_check_reply(s->host + s->reply_off, len, s->unique, s->opcode, s->cap,
                                may_wait, &o->h, why, sizeof why);
    if (s->flags & VFSDRV_SLOT_DISCARD) {
        /* a request of the control plane's (NOTIFY_REPLY): nobody takes a reply */
    } else if (rc != 0) {
        STAT(p, bad_replies);
        push_event(p, VFSDRV_EV_BAD_REPLY, i, s->unique, s->opcode, s->fd, len, why);
        write_error(p, s->fd, s->unique, -EIO);
    } else if (o->h.error == VFSDRV_LOCK_WAIT) {
        STAT(p, lock_waits);
        push_event(p, VFSDRV_EV_LOCK_WAIT, i, s->unique, s->opcode, s->fd, 0, NULL);
    } else {
        /* the validated copy of the header, then the payload where the device put it;
         * written with the round's other replies (send_replies) */
        o->iov[0] = (struct iovec){&o->h, sizeof o->h};
        o->iov[1] = (struct iovec){s->host + s->reply_off + VFSDRV_OUT_HEADER,
                                   o->h.len - VFSDRV_OUT_HEADER};
        o->niov = o->h.len > VFSDRV_OUT_HEADER ? 2 : 1;
        o->len = len;
        p->out_q[p->nout++] = i;
        if (!p->uring || p->nout == vfsdrv_uring_room(p->uring))
            send_replies(p);
        return;
    }
    free_slot(p, i);
}

static int harvest(struct vfsdrv_pump *p)
{
    for (;;) {
        int n = vfsdrv_vq_harvest(p->vq, p->used, p->vq->size);
        if (n < 0) {
            set_error(p, "%s", p->vq->error);
            return -1;
        }
        if (n == 0)
            return 0;
        for (int k = 0; k < n; k++)
            complete(p, p->head_slot[p->used[k].id], p->used[k].len);
        send_replies(p);
    }
}

static int to_control(uint32_t opcode)
{
    switch (opcode) {
    case 2: case 42: case 36:   /* FORGET, BATCH_FORGET, INTERRUPT: hiprio */
    case 26: case 38: case 41:  /* INIT, DESTROY, NOTIFY_REPLY */
        return 1;
    default:
        return 0;
    }
}

/* A request just read into the landing slot (at VFSDRV_PAGE - 80, so that a
 * WRITE's data is page-aligned where it was read). */
static void dispatch(struct vfsdrv_pump *p, ssize_t n, int fd)
{
    uint32_t li = (uint32_t)p->landing;
    struct vfsdrv_slot *land = &p->slots[li];
    const uint32_t land_off = VFSDRV_PAGE - VFSDRV_WRITE_HEADERS;
    uint8_t *req = land->host + land_off;
    STAT(p, requests);
    if (n < VFSDRV_IN_HEADER) {
        push_event(p, VFSDRV_EV_BAD_REQUEST, li, 0, 0, fd, (uint32_t)n, "short read from /dev/fuse");
        return;
    }
    uint32_t len, opcode;
    uint64_t unique;
    memcpy(&len, req, 4);
    memcpy(&opcode, req + 4, 4);
    memcpy(&unique, req + 8, 8);
    if (len != (uint32_t)n) {
        push_event(p, VFSDRV_EV_BAD_REQUEST, li, unique, opcode, fd, (uint32_t)n,
                   "header length differs from the read");
        write_error(p, fd, unique, -EIO);
        return;
    }
    if (p->cfg.trace) {
        uint64_t nodeid;
        memcpy(&nodeid, req + 16, 8);
        push_event_arg(p, VFSDRV_EV_TRACE_REQUEST, li, unique, opcode, fd, len, NULL, nodeid);
    }
    if (p->hiprio && (opcode == 2 || opcode == 42) /* FORGET, BATCH_FORGET */ &&
        vfsdrv_hiprio_send(p->hiprio, req, len) == 0) {
        /* copied into a hiprio buffer: the landing slot is free for the next read */
        STAT(p, hiprio);
        p->hiprio_added = 1;
        return;
    }
    if (to_control(opcode)) {
        land->unique = unique;
        land->opcode = opcode;
        land->in_len = len;
        land->req_off = land_off;
        land->fd = fd;
        __atomic_store_n(&land->state, VFSDRV_SLOT_CONTROL, __ATOMIC_RELEASE);
        p->landing = -1;
        STAT(p, to_control);
        push_event(p, VFSDRV_EV_REQUEST, li, unique, opcode, fd, len, NULL);
        return;
    }
    uint32_t cap = vfsdrv_reply_capacity(opcode, req + VFSDRV_IN_HEADER, len - VFSDRV_IN_HEADER,
                                         p->cfg.max_io);
    uint32_t si = li, off = land_off;
    uint32_t small_off = vfsdrv_request_offset(opcode);
    if (p->nfree_small &&
        (uint64_t)vfsdrv_reply_offset(small_off, len) + VFSDRV_OUT_HEADER + cap <= p->cfg.small_size) {
        si = p->free_small[--p->nfree_small];
        off = small_off;
        memcpy(p->slots[si].host + off, req, len);  /* a few hundred bytes */
    } else {
        p->landing = -1;  /* submitted from where it landed */
    }
    struct vfsdrv_slot *s = &p->slots[si];
    s->unique = unique;
    __atomic_store_n(&s->opcode, opcode, __ATOMIC_RELAXED);  /* vfsdrv_pump_oldest reads it */
    __atomic_store_n(&s->seq, p->stats.requests, __ATOMIC_RELAXED);
    s->in_len = len;
    s->req_off = off;
    s->reply_off = vfsdrv_reply_offset(off, len);
    s->cap = cap;
    s->fd = fd;
    s->flags = 0;
    if ((uint64_t)s->reply_off + VFSDRV_OUT_HEADER + cap > s->size) {
        push_event(p, VFSDRV_EV_BAD_REQUEST, si, unique, opcode, fd, len,
                   "reply room does not fit a slot");
        write_error(p, fd, unique, -EIO);
        free_slot(p, si);
        return;
    }
    /* release: the fields above first, for vfsdrv_pump_has_setlkw */
    __atomic_store_n(&s->state, VFSDRV_SLOT_PENDING, __ATOMIC_RELEASE);
    submit(p, si);
}

static void set_fuse_polling(struct vfsdrv_pump *p, int on)
{
    if (on == p->fuse_polled)
        return;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = TAG_FUSE};
    epoll_ctl(p->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, p->cfg.fuse_nb_fd, &ev);
    p->fuse_polled = on;
}

/* 1 when a request was read, 0 when none is there, -1 on a fatal error */
static int read_one(struct vfsdrv_pump *p, int fd)
{
    struct vfsdrv_slot *land = &p->slots[p->landing];
    const uint32_t off = VFSDRV_PAGE - VFSDRV_WRITE_HEADERS;
    STAT(p, syscalls);
    ssize_t n = read(fd, land->host + off, land->size - off);
    if (n >= 0) {
        dispatch(p, n, fd);
        return 1;
    }
    switch (errno) {
    case EAGAIN:
        STAT(p, eagain);
        return 0;
    case EINTR:
    case ENOENT:  /* the request was interrupted before we got it */
        return 0;
    case ENODEV:
    case ECONNABORTED:
        p->conn_gone = 1;
        return 0;
    default:
        set_error(p, "reading /dev/fuse: %s", strerror(errno));
        return -1;
    }
}

/* Read what the kernel has on the O_NONBLOCK descriptor, up to READ_BATCH requests
 * and while there is a slot to land in: the number read, or -1 on a fatal error.
 * One publish and kick then cover them all. */
static int read_batch(struct vfsdrv_pump *p)
{
    int n = 0;
    while (n < READ_BATCH && !p->conn_gone && !p->pend_count && ensure_landing(p)) {
        int got = read_one(p, p->cfg.fuse_nb_fd);
        if (got <= 0)
            return got < 0 ? -1 : n;
        n++;
    }
    return n;
}

/* The idle read() just returned a request. Others may already wait behind it (several
 * requesters, a queue depth): read them too before the publish, or each would cost a
 * kick and a round of its own. At queue depth 1 this look only finds EAGAIN, so it
 * backs off after misses. -1 on a fatal error. */
static int read_more(struct vfsdrv_pump *p)
{
    if (backoff_skip(&p->more))
        return 0;
    int n = read_batch(p);
    if (n > 0)
        backoff_hit(&p->more);
    else if (n == 0)
        backoff_miss(&p->more);
    return n < 0 ? -1 : 0;
}

static void take_gives(struct vfsdrv_pump *p)
{
    __atomic_store_n(&p->gives, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&p->lock);
    uint32_t n = p->ngiven;
    uint32_t buf[n ? n : 1];
    memcpy(buf, p->given, n * sizeof *buf);
    p->ngiven = 0;
    pthread_mutex_unlock(&p->lock);
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = buf[k] & ~(1u << 31);
        struct vfsdrv_slot *s = &p->slots[i];
        if (!(buf[k] >> 31)) {
            free_slot(p, i);
            continue;
        }
        /* forward the request it holds; the device's reply goes nowhere */
        s->cap = vfsdrv_reply_capacity(s->opcode, s->host + s->req_off + VFSDRV_IN_HEADER,
                                       s->in_len - VFSDRV_IN_HEADER, p->cfg.max_io);
        if (s->cap == VFSDRV_NO_REPLY)
            s->cap = 0;
        s->reply_off = vfsdrv_reply_offset(s->req_off, s->in_len);
        s->flags = VFSDRV_SLOT_DISCARD;
        submit(p, i);
    }
}

/* -- the poll window ------------------------------------------------------------ */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("isb" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* the vDSO: no syscall */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spin on the used ring for up to cfg.poll_ns. 1: a completion is there; 0: the
 * window ran out, is being skipped, or the control plane wants the pump (a give
 * or stop also wrote the control eventfd, so the epoll_wait that follows returns
 * at once: teardown is never delayed by a window). A miss doubles the number of
 * windows skipped next (struct backoff); a hit resets it. */
__attribute__((noinline)) static int poll_used(struct vfsdrv_pump *p)
{
    if (backoff_skip(&p->poll))
        return 0;
    uint64_t deadline = 0;
    for (uint32_t i = 0;; i++) {
        if (vfsdrv_vq_used_pending(p->vq)) {
            STAT(p, polls);
            backoff_hit(&p->poll);
            return 1;
        }
        if (i % POLL_CLOCK_EVERY == 0) {
            if (__atomic_load_n(&p->gives, __ATOMIC_RELAXED) ||
                __atomic_load_n(&p->stop, __ATOMIC_RELAXED))
                return 0;
            uint64_t t = now_ns();
            if (!deadline)
                deadline = t + p->cfg.poll_ns;
            else if (t >= deadline)
                break;
        }
        cpu_relax();
    }
    STAT(p, poll_misses);
    backoff_miss(&p->poll);
    return 0;
}

/* Idle, with a poll window: look at /dev/fuse (O_NONBLOCK reads) for up to
 * cfg.poll_ns before sleeping in the blocking read, so that the next request of a
 * program that just got its reply costs no wake-up. 1: a request was read; 0: none
 * (or a give/stop); -1: fatal. */
__attribute__((noinline)) static int poll_fuse(struct vfsdrv_pump *p)
{
    if (backoff_skip(&p->idle))
        return 0;
    uint64_t deadline = now_ns() + p->cfg.poll_ns;
    do {
        if (__atomic_load_n(&p->gives, __ATOMIC_RELAXED) ||
            __atomic_load_n(&p->stop, __ATOMIC_RELAXED))
            return 0;
        int r = read_one(p, p->cfg.fuse_nb_fd);
        if (r != 0) {
            if (r > 0) {
                STAT(p, idle_polls);
                backoff_hit(&p->idle);
            }
            return r;
        }
        if (p->conn_gone)
            return 0;
        /* each look is a syscall: space them, at a cost of up to that much latency */
        uint64_t t, next = now_ns() + IDLE_LOOK_NS;
        while ((t = now_ns()) < next && t < deadline)
            cpu_relax();
    } while (now_ns() < deadline);
    STAT(p, poll_misses);
    backoff_miss(&p->idle);
    return 0;
}

int vfsdrv_pump_run(struct vfsdrv_pump *p)
{
    struct vfsdrv_vq *vq = p->vq;
    int rc = VFSDRV_PUMP_STOPPED;
    p->thread = pthread_self();
    __atomic_store_n(&p->running, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        if (__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST))
            break;
        if (__atomic_load_n(&p->gives, __ATOMIC_SEQ_CST))
            take_gives(p);
        if (harvest(p) < 0) {
            rc = VFSDRV_PUMP_BROKEN;
            break;
        }
        submit_pending(p);
        if (flush(p) < 0) {
            rc = VFSDRV_PUMP_KICK_FAILED;
            break;
        }
        if (p->conn_gone) {
            rc = VFSDRV_PUMP_CONN_GONE;
            break;
        }
        if (vq->in_flight == 0 && p->pend_count == 0 && ensure_landing(p)) {
            /* idle: (after the poll window, if any) sleep in read() itself. The
             * seq_cst store/load pair with interrupt_read() so that a give or stop
             * either is seen here or sends the signal that ends the read. */
            p->poll_peek = 0;  /* nothing in flight: this read is the look */
            int r = p->cfg.poll_ns ? poll_fuse(p) : 0;
            if (r == 0 && !p->conn_gone) {
                __atomic_store_n(&p->in_block, 1, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&p->gives, __ATOMIC_SEQ_CST) ||
                    __atomic_load_n(&p->stop, __ATOMIC_SEQ_CST)) {
                    __atomic_store_n(&p->in_block, 0, __ATOMIC_SEQ_CST);
                    continue;
                }
                r = read_one(p, p->cfg.fuse_fd);
                __atomic_store_n(&p->in_block, 0, __ATOMIC_SEQ_CST);
            }
            if (r > 0)  /* and those queued behind it: one kick for all */
                r = read_more(p);
            if (r < 0) {
                rc = VFSDRV_PUMP_FUSE_ERROR;
                break;
            }
            continue;
        }
        /* busy: sleep until a completion, a request or the control plane */
        int timeout = -1;
        if (p->cfg.irq_fd < 0)
            timeout = vq->in_flight ? p->cfg.poll_ms : -1;
        else if (vq->in_flight && vfsdrv_vq_arm(vq))
            continue;  /* completions arrived while we were busy */
        else if (vq->in_flight)
            /* look at the ring now and then anyway: harvest() then catches a device
             * that wrote (or garbled) it without the interrupt it owed us */
            timeout = RING_WATCHDOG_MS;
        int can_read = p->pend_count == 0 && ensure_landing(p);
        if (!can_read && p->fuse_polled)
            STAT(p, stalls);
        set_fuse_polling(p, can_read);
        if (p->cfg.poll_ns && vq->in_flight && vq->in_flight <= POLL_MAX_IN_FLIGHT) {
            if (p->poll_peek) {
                /* completions keep coming: take what /dev/fuse and the control plane
                 * have (epoll_wait without sleeping) before spinning again, or a
                 * steady stream of them would keep the pump from reading requests */
                p->poll_peek = 0;
                timeout = 0;
            } else if (poll_used(p)) {
                p->poll_peek = 1;
                continue;
            }
        }
        struct epoll_event evs[4];
        STAT(p, syscalls);
        STAT(p, wakeups);
        int ne = epoll_wait(p->epfd, evs, 4, timeout);
        if (ne < 0 && errno != EINTR) {
            set_error(p, "epoll_wait: %s", strerror(errno));
            rc = VFSDRV_PUMP_FUSE_ERROR;
            break;
        }
        for (int k = 0; k < ne; k++) {
            if (evs[k].data.u32 == TAG_CTL) {
                uint64_t v;
                STAT(p, syscalls);
                if (read(p->ctl_fd, &v, 8) < 0) { /* EAGAIN: already drained */ }
            } else if (evs[k].data.u32 == TAG_FUSE && read_batch(p) < 0) {
                rc = VFSDRV_PUMP_FUSE_ERROR;
                goto out;
            }
        }
    }
out:
    set_fuse_polling(p, 0);
    __atomic_store_n(&p->running, 0, __ATOMIC_SEQ_CST);
    return rc;
}
