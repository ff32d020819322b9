/* The C unit tests' shared harness: the checks (CHECK, EQ: count a failure, say
 * where, go on), the FUSE opcodes they use, and the set-up most tests start from.
 * Used by test_core.c (the ring core, the FUSE rules; the runner and its table)
 * and test_hiprio_client.c (the hiprio sender, the client's batched path), test_uring.c
 * and test_pump.c (the whole pump on socket pairs), which are linked into one
 * program, test_core. Header-only; the device side is
 * ringdev.h.
 */
#ifndef TESTKIT_H
#define TESTKIT_H

#include <sched.h>
#include <stdint.h>
#include <stdio.h>

#include "ringdev.h"  /* and vfsdrv_core.h, which has no include guard (cffi reads it) */

/* the checks' tallies, defined once (test_core.c) for the whole program */
extern int failures;     /* failed checks */
extern int test_failed;  /* the running test has failed a check */

#define CHECK(cond, ...) do { \
    if (!(cond)) { \
        failures++; test_failed = 1; \
        fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        fprintf(stderr, __VA_ARGS__); \
        fputc('\n', stderr); \
    } \
} while (0)

#define EQ(a, b) do { \
    long long a_ = (long long)(a), b_ = (long long)(b); \
    CHECK(a_ == b_, "%lld != %lld", a_, b_); \
} while (0)

/* FUSE opcodes the tests use (linux/fuse.h) */
enum { LOOKUP = 1, FORGET = 2, GETATTR = 3, SETATTR = 4, READLINK = 5, MKDIR = 9, UNLINK = 10,
       OPEN = 14, READ = 15, WRITE = 16, STATFS = 17, GETXATTR = 22, LISTXATTR = 23, INIT = 26,
       READDIR = 28, GETLK = 31, SETLK = 32, SETLKW = 33, CREATE = 35, INTERRUPT = 36,
       DESTROY = 38, BATCH_FORGET = 42, LSEEK = 46 };

static inline struct vfsdrv_seg seg(void *p, uint32_t len, int write)
{
    return (struct vfsdrv_seg){(uint64_t)(uintptr_t)p, len, write ? VFSDRV_SEG_WRITE : 0};
}

/* state the driver keeps that a failed harvest must leave alone */
struct snap { uint16_t num_free, in_flight, last_used, free_head, next_used; uint8_t used_wrap; };
static inline struct snap snap_of(const struct vfsdrv_vq *vq)
{
    return (struct snap){vq->num_free, vq->in_flight, vq->last_used, vq->free_head,
                         vq->next_used, vq->used_wrap};
}
static inline int snap_same(struct snap a, struct snap b)
{
    return a.num_free == b.num_free && a.in_flight == b.in_flight &&
           a.last_used == b.last_used && a.free_head == b.free_head &&
           a.next_used == b.next_used && a.used_wrap == b.used_wrap;
}

/* what most tests start from: a ring of `size` entries, the device on it, the
 * driver's queue */
static inline void rig_up(struct rd_ring *r, struct rd_dev *d, struct vfsdrv_vq *vq, uint32_t size,
                   int packed, uint32_t indirect_heads, int event_idx)
{
    rd_ring_init(r, size, packed, indirect_heads);
    rd_dev_init(d, r);
    EQ(rd_vq_init(vq, r, event_idx), 0);
}

/* the machine may have fewer free cores than threads: let the other side run */
static inline void pause_now_and_then(uint32_t spins)
{
    if (spins % 64 == 63)
        sched_yield();
}

/* test_hiprio_client.c's tests, in test_core.c's table */
void test_hiprio_new_rejects_bad_config(void);
void test_hiprio_one_publish_one_kick(void);
void test_hiprio_event_idx(void);
void test_hiprio_mmio_kick(void);
void test_hiprio_full_and_reclaim(void);
void test_hiprio_buffers_never_shared(void);
void test_hiprio_batch_forget_split(void);
void test_hiprio_bad_used_id(void);
void test_hiprio_kick_failure(void);
void test_hiprio_threaded(void);
void test_client_batch(void);
void test_client_bad_replies(void);
void test_client_add_refusals(void);
/* test_uring.c */
void test_uring_faults(void);
/* test_pump.c */
void test_pump_pending_setlkw_is_seen(void);

#endif
