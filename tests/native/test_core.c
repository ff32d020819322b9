/* Unit tests of the native core (driver/native: core.c, packed.c), built with the
 * driver's sources and test_hiprio_client.c (the hiprio sender, hiprio.c; the
 * typed client's batched path, client.c) into one program and run on x86-64 and,
 * cross-compiled, on aarch64 under qemu-user (tests/native/run-aarch64.sh,
 * tests/test_native_aarch64.py).
 *
 *   test_core [NAME...]    run all tests, or those whose name contains NAME
 *
 * Prints "ok NAME" per test and "FAIL file:line: ..." per failed check; exits 1
 * when any check failed. The checks and the common set-up are tests/native/testkit.h,
 * the device side tests/native/ringdev.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testkit.h"

int failures;
int test_failed;

/* ---------------------------------------------------------------------------- */
static void test_init_rejects_bad_sizes(void)
{
    struct vfsdrv_vq vq;
    uint8_t mem[64];
    uint32_t bad[] = {0, 3, 12, 65536};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        EQ(vfsdrv_vq_init(&vq, 7, bad[i], mem, mem, mem, NULL, 0, 0, 0), -EINVAL);
        CHECK(strstr(vq.error, "queue 7") && strstr(vq.error, "power of two"), "%s", vq.error);
        vfsdrv_vq_destroy(&vq);
    }
    /* packed rings take any size up to 32768 */
    EQ(vfsdrv_vq_init_packed(&vq, 1, 0, mem, mem, mem, NULL, 0, 0, 0), -EINVAL);
    EQ(vfsdrv_vq_init_packed(&vq, 1, 32769, mem, mem, mem, NULL, 0, 0, 0), -EINVAL);
    struct rd_ring r;
    rd_ring_init(&r, 5, 1, 0);
    EQ(rd_vq_init(&vq, &r, 0), 0);
    vfsdrv_vq_destroy(&vq);
    rd_ring_free(&r);
}

static void test_add_rejects_bad_chains(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct rd_ring r;
        struct vfsdrv_vq vq;
        uint8_t buf[64];
        rd_ring_init(&r, 4, packed, 0);
        EQ(rd_vq_init(&vq, &r, 0), 0);
        struct vfsdrv_seg s[5] = {seg(buf, 8, 0), seg(buf, 8, 1), seg(buf, 8, 0),
                                  seg(buf, 8, 1), seg(buf, 8, 1)};
        EQ(vfsdrv_vq_add(&vq, s, 0), -EINVAL);
        EQ(vfsdrv_vq_add(&vq, s, 3), -EINVAL);  /* readable after writable */
        CHECK(strstr(vq.error, "readable buffer after a writable"), "%s", vq.error);
        EQ(vfsdrv_vq_add(&vq, s + 3, 5 - 3 + 3), -EINVAL);  /* 5 > size 4 */
        struct vfsdrv_seg huge[2] = {seg(buf, 0xFFFFFFFFu, 0), seg(buf, 2, 1)};
        EQ(vfsdrv_vq_add(&vq, huge, 2), -EINVAL);  /* more than 2^32 bytes */
        EQ(vq.num_free, 4);
        EQ(vq.in_flight, 0);
        /* the ring fills: 2 + 2 descriptors, then no room */
        CHECK(vfsdrv_vq_add(&vq, s, 2) >= 0, "%s", vq.error);
        CHECK(vfsdrv_vq_add(&vq, s, 2) >= 0, "%s", vq.error);
        EQ(vfsdrv_vq_add(&vq, s, 1), -ENOSPC);
        EQ(vq.num_free, 0);
        vfsdrv_vq_destroy(&vq);
        rd_ring_free(&r);
    }
}

/* add several, publish once: the device sees nothing before publish (split: the
 * index; packed exposes each chain at add, so only the notify decision waits) */
static void test_roundtrip_and_batching(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct rd_ring r;
        struct rd_dev d;
        struct vfsdrv_vq vq;
        rig_up(&r, &d, &vq, 8, packed, 0, 0);
        uint8_t req[8][64], rep[8][128];
        int heads[8];
        for (int i = 0; i < 8; i++) {
            memset(req[i], i + 1, sizeof req[i]);
            struct vfsdrv_seg s[2] = {seg(req[i], 56, 0), seg(rep[i], 120, 1)};
            heads[i] = vfsdrv_vq_add(&vq, s, 2);
            CHECK(heads[i] >= 0 && heads[i] < 8, "head %d: %s", heads[i], vq.error);
            if (i == 3 && !packed) {
                struct rd_chain c;
                EQ(rd_pop(&d, &c), 0);  /* avail->idx not moved yet */
            }
            if (i == 3)
                break;
        }
        EQ(vfsdrv_vq_publish(&vq), 1);  /* no suppression: notify */
        EQ(vfsdrv_vq_publish(&vq), 0);  /* nothing new */
        struct rd_chain c[4];
        for (int i = 0; i < 4; i++) {
            EQ(rd_pop(&d, &c[i]), 1);
            EQ(c[i].head, heads[i]);
            EQ(c[i].n, 2);
            EQ(c[i].seg[0].addr, (uintptr_t)req[i]);
            EQ(c[i].seg[0].len, 56);
            EQ(c[i].seg[0].write, 0);
            EQ(c[i].seg[1].addr, (uintptr_t)rep[i]);
            EQ(c[i].seg[1].len, 120);
            EQ(c[i].seg[1].write, 1);
        }
        struct rd_chain none;
        EQ(rd_pop(&d, &none), 0);
        EQ(vfsdrv_vq_used_pending(&vq), 0);
        /* completed out of order */
        int order[4] = {2, 0, 3, 1};
        for (int i = 0; i < 4; i++)
            rd_push(&d, c[order[i]].head, 16 + order[i], c[order[i]].entries);
        CHECK(vfsdrv_vq_used_pending(&vq) > 0, "pending");
        struct vfsdrv_used u[8];
        EQ(vfsdrv_vq_harvest(&vq, u, 8), 4);
        for (int i = 0; i < 4; i++) {
            EQ(u[i].id, heads[order[i]]);
            EQ(u[i].len, 16 + order[i]);
        }
        EQ(vq.num_free, 8);
        EQ(vq.in_flight, 0);
        EQ(vfsdrv_vq_harvest(&vq, u, 8), 0);
        /* the device asks not to be notified */
        rd_set_no_notify(&d, 1);
        struct vfsdrv_seg s[2] = {seg(req[0], 56, 0), seg(rep[0], 120, 1)};
        CHECK(vfsdrv_vq_add(&vq, s, 2) >= 0, "%s", vq.error);
        EQ(vfsdrv_vq_publish(&vq), 0);
        rd_set_no_notify(&d, 0);
        CHECK(vfsdrv_vq_add(&vq, s, 2) >= 0, "%s", vq.error);
        EQ(vfsdrv_vq_publish(&vq), 1);
        vfsdrv_vq_destroy(&vq);
        rd_ring_free(&r);
    }
}

/* harvest() can return fewer than are pending (max); the rest stay for later */
static void test_harvest_max(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct rd_ring r;
        struct rd_dev d;
        struct vfsdrv_vq vq;
        rig_up(&r, &d, &vq, 8, packed, 0, 0);
        uint8_t b[16];
        for (int i = 0; i < 5; i++) {
            struct vfsdrv_seg s[1] = {seg(b, 16, 1)};
            CHECK(vfsdrv_vq_add(&vq, s, 1) >= 0, "%s", vq.error);
        }
        vfsdrv_vq_publish(&vq);
        struct rd_chain c;
        while (rd_pop(&d, &c))
            rd_push(&d, c.head, 4, c.entries);
        struct vfsdrv_used u[8];
        EQ(vfsdrv_vq_harvest(&vq, u, 2), 2);
        EQ(vq.in_flight, 3);
        EQ(vfsdrv_vq_harvest(&vq, u, 8), 3);
        EQ(vq.in_flight, 0);
        vfsdrv_vq_destroy(&vq);
        rd_ring_free(&r);
    }
}

/* A device that writes a bad used entry: harvest fails with -EIO, says why, and
 * changes nothing (the whole batch is checked before any of it completes); once the
 * entry is right the same batch harvests. */
static void bad_entry_case(int packed, const char *name, const char *expect)
{
    struct rd_ring r;
    struct rd_dev d;
    struct vfsdrv_vq vq;
    rig_up(&r, &d, &vq, 8, packed, 0, 0);
    uint8_t req[2][64], rep[2][64];
    int h[2];
    for (int i = 0; i < 2; i++) {
        struct vfsdrv_seg s[2] = {seg(req[i], 40, 0), seg(rep[i], 32, 1)};
        h[i] = vfsdrv_vq_add(&vq, s, 2);
    }
    vfsdrv_vq_publish(&vq);
    struct rd_chain c[2];
    EQ(rd_pop(&d, &c[0]), 1);
    EQ(rd_pop(&d, &c[1]), 1);
    struct rd_dev before = d;
    rd_push(&d, h[0], 16, 2);  /* a good one first: must not complete either */
    if (!strcmp(name, "range"))
        rd_push(&d, packed ? 8 : 9, 16, 2);
    else if (!strcmp(name, "duplicate"))
        rd_push(&d, h[0], 16, 2);
    else if (!strcmp(name, "not-in-flight")) {
        /* an id in range that was never added */
        uint32_t id = 0;
        while (id == (uint32_t)h[0] || id == (uint32_t)h[1])
            id++;
        rd_push(&d, id, 16, 2);
    } else if (!strcmp(name, "length"))
        rd_push(&d, h[1], 33, 2);  /* 32 writable bytes */
    else if (!strcmp(name, "ahead")) {
        /* split: used->idx three ahead with two in flight */
        rd_push(&d, h[1], 16, 2);
        rd_push(&d, h[1], 16, 2);
    } else if (!strcmp(name, "flags")) {
        /* packed: the next entry's flags say AVAIL != wrap (the device flipped the
         * wrong bit) where a published chain must be */
        uint16_t fl = RD_F_USED;
        vfsdrv_store_release_u16(r.desc + 16 * 2 + 14, fl);
    }
    struct snap s0 = snap_of(&vq);
    struct vfsdrv_used u[4];
    EQ(vfsdrv_vq_harvest(&vq, u, 4), -EIO);
    CHECK(strstr(vq.error, expect) != NULL, "%s: '%s' lacks '%s'", name, vq.error, expect);
    CHECK(snap_same(s0, snap_of(&vq)), "%s: a failed harvest changed the queue", name);
    EQ(vfsdrv_vq_harvest(&vq, u, 4), -EIO);  /* still bad, still unchanged */
    CHECK(snap_same(s0, snap_of(&vq)), "%s: second failed harvest changed the queue", name);
    /* the device corrects its entries (same positions, same index) */
    d = before;
    if (packed)
        memset(r.desc + 16 * 2, 0, 16);  /* undo a forged flag */
    rd_push(&d, h[0], 16, 2);
    rd_push(&d, h[1], 32, 2);
    EQ(vfsdrv_vq_harvest(&vq, u, 4), 2);
    EQ(u[0].id, h[0]);
    EQ(u[1].id, h[1]);
    EQ(u[1].len, 32);
    EQ(vq.num_free, 8);
    vfsdrv_vq_destroy(&vq);
    rd_ring_free(&r);
}

static void test_bad_used_entries(void)
{
    for (int packed = 0; packed < 2; packed++) {
        bad_entry_case(packed, "range", "out of range");
        bad_entry_case(packed, "duplicate", "not in flight");
        bad_entry_case(packed, "not-in-flight", "not in flight");
        bad_entry_case(packed, "length", "exceeds the 32 device-writable bytes");
    }
    bad_entry_case(0, "ahead", "only 2 chains are in flight");
    bad_entry_case(1, "flags", "neither available nor used");
}

/* a used entry when nothing is in flight */
static void test_used_entry_with_nothing_in_flight(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct rd_ring r;
        struct rd_dev d;
        struct vfsdrv_vq vq;
        rig_up(&r, &d, &vq, 4, packed, 0, 0);
        rd_push(&d, 0, 0, 1);
        struct vfsdrv_used u[4];
        EQ(vfsdrv_vq_harvest(&vq, u, 4), -EIO);
        EQ(vq.num_free, 4);
        vfsdrv_vq_destroy(&vq);
        rd_ring_free(&r);
    }
}

/* Past 65536 requests: split's free-running 16-bit indices wrap (avail->idx,
 * used->idx, used_event, avail_event and the notify decision across the wrap);
 * packed's wrap counters flip once per lap. Batches of 1..size, completed in
 * reverse, chains of 1..3 descriptors (packed chains cross the end of the ring). */
static void wrap_case(int packed, int event_idx)
{
    const uint32_t size = 8;
    struct rd_ring r;
    struct rd_dev d;
    struct vfsdrv_vq vq;
    rig_up(&r, &d, &vq, size, packed, 0, event_idx);
    uint8_t req[8][48], rep[8][64];
    uint32_t done = 0, added = 0, notifies = 0, batch_no = 0;
    int bad = 0;
    while (done < 70000 && !bad) {
        uint32_t nseg = 1 + batch_no % 3, batch = 1 + batch_no % (size / nseg);
        uint16_t old = (uint16_t)added;
        int ids[8];
        for (uint32_t i = 0; i < batch; i++) {
            uint32_t tag = added + i;
            memcpy(req[i], &tag, 4);
            struct vfsdrv_seg s[3] = {seg(req[i], 48, 0), seg(rep[i], 32, 1),
                                      seg(rep[i] + 32, 32, 1)};
            ids[i] = vfsdrv_vq_add(&vq, s, nseg);
            if (ids[i] < 0) {
                CHECK(0, "add at %u: %s", added, vq.error);
                bad = 1;
                break;
            }
        }
        if (bad)
            break;
        added += batch;
        if (event_idx && !packed) {
            /* the device wants a kick when idx passes avail_event: alternately
             * where this batch starts (notify) and where it ends (no notify) */
            uint16_t event = (batch_no & 1) ? old : (uint16_t)added;
            vfsdrv_store_u16(r.used + 4 + 8 * size, event);
            int want = (batch_no & 1) != 0;
            int got = vfsdrv_vq_publish(&vq);
            if (got != want) {
                CHECK(0, "publish at %u (old %u event %u) said %d", added, old, event, got);
                bad = 1;
            }
            notifies += (uint32_t)got;
        } else {
            notifies += (uint32_t)vfsdrv_vq_publish(&vq);
        }
        if (!packed && rd_u16(r.avail + 2) != (uint16_t)added) {
            CHECK(0, "avail->idx %u, expected %u", rd_u16(r.avail + 2), (uint16_t)added);
            bad = 1;
        }
        struct rd_chain c[8];
        for (uint32_t i = 0; i < batch; i++) {
            if (rd_pop(&d, &c[i]) != 1 || c[i].head != ids[i] || c[i].n != nseg ||
                rd_u32((uint8_t *)(uintptr_t)c[i].seg[0].addr) != (uint32_t)(added - batch + i)) {
                CHECK(0, "device saw the wrong chain at %u", added - batch + i);
                bad = 1;
                break;
            }
        }
        if (bad)
            break;
        for (uint32_t i = batch; i-- > 0;)
            rd_push(&d, c[i].head, nseg > 1 ? 32 : 0, c[i].entries);
        struct vfsdrv_used u[8];
        int n = vfsdrv_vq_harvest(&vq, u, 8);
        if (n != (int)batch) {
            CHECK(0, "harvest at %u returned %d (%s)", done, n, vq.error);
            break;
        }
        for (uint32_t i = 0; i < batch; i++)
            if (u[i].id != (uint32_t)ids[batch - 1 - i]) {
                CHECK(0, "harvested id %u, expected %d", u[i].id, ids[batch - 1 - i]);
                bad = 1;
            }
        done += batch;
        if (!packed && event_idx && rd_u16(r.avail + 4 + 2 * size) != (uint16_t)done) {
            CHECK(0, "used_event %u, expected %u", rd_u16(r.avail + 4 + 2 * size),
                  (uint16_t)done);
            bad = 1;
        }
        batch_no++;
    }
    CHECK(done >= 70000, "stopped at %u", done);
    EQ(vq.num_free, size);
    EQ(vq.last_used, (uint16_t)done);
    if (!packed)
        EQ(rd_u16(r.used + 2), (uint16_t)done);
    CHECK(notifies > 0, "never notified");
    vfsdrv_vq_destroy(&vq);
    rd_ring_free(&r);
}

static void test_index_wraparound(void)
{
    wrap_case(0, 0);
    wrap_case(0, 1);
    wrap_case(1, 0);
    wrap_case(1, 1);
}

/* Indirect: heads below indirect_heads take one ring descriptor pointing at their
 * table (virtio 1.2 2.7.5.3 / 2.8.19); others chain directly; one-buffer chains
 * never go indirect. */
static void test_indirect(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct rd_ring r;
        struct rd_dev d;
        struct vfsdrv_vq vq;
        rig_up(&r, &d, &vq, 8, packed, 4, 0);
        uint8_t b[8][96];
        int h[8];
        for (int i = 0; i < 4; i++) {
            struct vfsdrv_seg s[3] = {seg(b[i], 40, 0), seg(b[i] + 40, 16, 1),
                                      seg(b[i] + 56, 40, 1)};
            h[i] = vfsdrv_vq_add(&vq, s, 3);
            CHECK(h[i] >= 0 && h[i] < 4, "head %d", h[i]);
        }
        EQ(vq.num_free, 4);  /* one ring descriptor each */
        struct vfsdrv_seg s3[3] = {seg(b[4], 40, 0), seg(b[4] + 40, 16, 1), seg(b[4] + 56, 40, 1)};
        h[4] = vfsdrv_vq_add(&vq, s3, 3);  /* id 4 >= indirect_heads: direct */
        EQ(h[4], 4);
        EQ(vq.num_free, 1);
        EQ(vfsdrv_vq_add(&vq, s3, 3), -ENOSPC);
        struct vfsdrv_seg one[1] = {seg(b[5], 8, 1)};
        EQ(vfsdrv_vq_add(&vq, one, 1) >= 0, 1);
        vfsdrv_vq_publish(&vq);
        struct rd_chain c;
        for (int i = 0; i < 6; i++) {
            EQ(rd_pop(&d, &c), 1);
            EQ(c.indirect, i < 4);
            EQ(c.entries, i < 4 ? 1 : (i == 4 ? 3 : 1));
            EQ(c.n, i < 5 ? 3 : 1);
            if (i < 5) {
                EQ(c.seg[0].addr, (uintptr_t)b[i]);
                EQ(c.seg[0].write, 0);
                EQ(c.seg[1].addr, (uintptr_t)b[i] + 40);
                EQ(c.seg[1].write, 1);
                EQ(c.seg[2].len, 40);
                EQ(c.seg[2].write, 1);
            }
            if (i < 4 && !packed) {
                /* the table of head h sits at indirect_addr + h * 64 * 16 */
                const uint8_t *e = r.desc + 16 * (size_t)h[i];
                EQ(rd_u64(e), (uintptr_t)r.indirect + (size_t)h[i] * VFSDRV_INDIRECT_MAX * 16);
                EQ(rd_u32(e + 8), 48);
            }
            rd_push(&d, c.head, i < 5 ? 56 : 8, c.entries);
        }
        struct vfsdrv_used u[8];
        EQ(vfsdrv_vq_harvest(&vq, u, 8), 6);
        EQ(vq.num_free, 8);
        vfsdrv_vq_destroy(&vq);
        rd_ring_free(&r);
    }
}

/* Interrupt suppression: disarm/arm write what the device reads, arm() says
 * whether completions slipped in meanwhile. */
static void test_arm_disarm(void)
{
    for (int packed = 0; packed < 2; packed++)
        for (int ev = 0; ev < 2; ev++) {
            struct rd_ring r;
            struct rd_dev d;
            struct vfsdrv_vq vq;
            rig_up(&r, &d, &vq, 4, packed, 0, ev);
            uint8_t b[16];
            struct vfsdrv_seg s[1] = {seg(b, 16, 1)};
            vfsdrv_vq_disarm(&vq);
            if (!packed && !ev)
                EQ(rd_u16(r.avail), 1);          /* VIRTQ_AVAIL_F_NO_INTERRUPT */
            if (packed)
                EQ(rd_u16(r.avail + 2), 1);      /* RING_EVENT_FLAGS_DISABLE */
            EQ(vfsdrv_vq_arm(&vq), 0);
            if (!packed && !ev)
                EQ(rd_u16(r.avail), 0);
            if (packed)
                EQ(rd_u16(r.avail + 2), ev ? 2 : 0);  /* DESC with EVENT_IDX, else ENABLE */
            vfsdrv_vq_add(&vq, s, 1);
            vfsdrv_vq_publish(&vq);
            struct rd_chain c;
            EQ(rd_pop(&d, &c), 1);
            vfsdrv_vq_disarm(&vq);
            rd_push(&d, c.head, 3, c.entries);
            EQ(vfsdrv_vq_arm(&vq), 1);  /* a completion arrived while disarmed */
            struct vfsdrv_used u[4];
            EQ(vfsdrv_vq_harvest(&vq, u, 4), 1);
            if (!packed && ev)
                EQ(rd_u16(r.avail + 4 + 2 * 4), 1);  /* used_event = last_used */
            if (packed && ev) {
                EQ(rd_u16(r.avail), 1 | (1 << 15));  /* next position 1, wrap 1 */
                EQ(rd_u16(r.avail + 2), 2);
            }
            EQ(vfsdrv_vq_arm(&vq), 0);
            vfsdrv_vq_destroy(&vq);
            rd_ring_free(&r);
        }
}

/* ---------------------------------------------------------------------------- */
/* vfsdrv_check_reply: every rejection class, and what is sent instead */
static int check(uint32_t used_len, uint32_t len, int32_t error, uint64_t unique,
                 uint32_t opcode, uint32_t cap, int may_wait, struct vfsdrv_out_header *copy,
                 char *why)
{
    uint8_t reply[256] = {0};
    struct vfsdrv_out_header h = {len, error, unique};
    memcpy(reply, &h, sizeof h);
    why[0] = 0;
    return vfsdrv_check_reply(reply, used_len, 77, opcode, cap, may_wait, copy, why, 120);
}

#define REJECT(why_part, ...) do { \
    struct vfsdrv_out_header c_ = {0, 0, 0}; \
    char w_[120]; \
    EQ(check(__VA_ARGS__, &c_, w_), -EIO); \
    CHECK(strstr(w_, why_part) != NULL, "'%s' lacks '%s'", w_, why_part); \
    EQ(c_.len, 16); EQ(c_.error, -EIO); EQ(c_.unique, 77); \
} while (0)

#define ACCEPT(...) do { \
    struct vfsdrv_out_header c_; \
    char w_[120]; \
    EQ(check(__VA_ARGS__, &c_, w_), 0); \
    CHECK(w_[0] == 0, "why set on success: %s", w_); \
} while (0)

static void test_check_reply(void)
{
    /* (used_len, hdr.len, hdr.error, hdr.unique, opcode, cap, may_wait) */
    ACCEPT(120, 120, 0, 77, GETATTR, 104, 0);
    ACCEPT(200, 120, 0, 77, GETATTR, 104, 0);        /* used may exceed the header's len */
    ACCEPT(16, 16, -2, 77, LOOKUP, 128, 0);          /* ENOENT */
    ACCEPT(16, 16, -511, 77, LOOKUP, 128, 0);        /* the last errno the kernel takes */
    ACCEPT(16, 16, 0, 77, UNLINK, 0, 0);
    ACCEPT(40, 40, 0, 77, FORGET, VFSDRV_NO_REPLY, 0);  /* no room check without a reply */
    ACCEPT(16, 16, VFSDRV_LOCK_WAIT, 77, SETLKW, 0, 1);

    REJECT("shorter than the out header", 15, 16, 0, 77, GETATTR, 104, 0);
    REJECT("shorter than the out header", 0, 16, 0, 77, GETATTR, 104, 0);
    REJECT("unique", 120, 120, 0, 78, GETATTR, 104, 0);
    REJECT("outside 16..", 120, 15, 0, 77, GETATTR, 104, 0);
    REJECT("outside 16..", 100, 120, 0, 77, GETATTR, 104, 0);  /* len beyond used */
    REJECT("exceeds the 104 bytes of room", 121, 121, 0, 77, GETATTR, 104, 0);
    REJECT("exceeds the 0 bytes of room", 17, 17, 0, 77, UNLINK, 0, 0);
    /* errors the kernel refuses (fuse_dev_do_write: error <= -512 or > 0 leaves the
     * request pending forever) */
    REJECT("out of range", 16, 16, -512, 77, LOOKUP, 128, 0);
    REJECT("out of range", 16, 16, -4095, 77, LOOKUP, 128, 0);
    REJECT("out of range", 16, 16, -1000, 77, LOOKUP, 128, 0);
    REJECT("out of range", 16, 16, -4096, 77, LOOKUP, 128, 0);
    REJECT("out of range", 16, 16, INT_MIN, 77, LOOKUP, 128, 0);
    REJECT("positive error", 16, 16, 5, 77, LOOKUP, 128, 0);
    REJECT("positive error", 16, 16, INT_MAX, 77, LOOKUP, 128, 1);
    REJECT("carries 8 payload bytes", 24, 24, -2, 77, LOOKUP, 128, 0);
    /* LOCK_WAIT only for a SETLKW the caller may park, and only as a bare header */
    REJECT("positive error 1", 16, 16, VFSDRV_LOCK_WAIT, 77, SETLKW, 0, 0);
    REJECT("positive error", 16, 16, VFSDRV_LOCK_WAIT, 77, GETATTR, 104, 0);
    REJECT("exceeds", 24, 24, VFSDRV_LOCK_WAIT, 77, SETLKW, 0, 1);
    REJECT("positive error", 24, 24, VFSDRV_LOCK_WAIT, 77, SETLKW, 8, 1);
    REJECT("positive error 2", 16, 16, 2, 77, SETLKW, 0, 1);

    /* DESTROY may come back with used length 0 (the Rust virtiofsd); nothing else */
    struct vfsdrv_out_header c;
    char why[120];
    EQ(vfsdrv_check_reply(NULL, 0, 9, DESTROY, 0, 0, &c, why, sizeof why), 0);
    EQ(c.len, 16);
    EQ(c.error, 0);
    EQ(c.unique, 9);
    REJECT("shorter", 0, 16, 0, 77, INIT, 64, 0);
    ACCEPT(16, 16, 0, 77, DESTROY, 0, 0);
    REJECT("shorter", 8, 16, 0, 77, DESTROY, 0, 0);

    /* the copy is what counts: the device rewriting its header afterwards changes
     * nothing that is forwarded */
    uint8_t reply[120];
    struct vfsdrv_out_header h = {120, 0, 5};
    memcpy(reply, &h, sizeof h);
    EQ(vfsdrv_check_reply(reply, 120, 5, GETATTR, 104, 0, &c, why, sizeof why), 0);
    h.unique = 6;
    h.len = 16;
    memcpy(reply, &h, sizeof h);
    EQ(c.unique, 5);
    EQ(c.len, 120);

    /* a tiny why buffer is truncated, never overrun */
    char small[8];
    memset(small, 'x', sizeof small);
    EQ(vfsdrv_check_reply(reply, 120, 5, GETATTR, 104, 0, &c, small, 4), -EIO);
    EQ(strlen(small), 3);
    EQ(small[5], 'x');
}

static void test_valid_errno(void)
{
    EQ(vfsdrv_valid_errno(0), 1);
    EQ(vfsdrv_valid_errno(-1), 1);
    EQ(vfsdrv_valid_errno(-511), 1);
    EQ(vfsdrv_valid_errno(-512), 0);
    EQ(vfsdrv_valid_errno(-4095), 0);
    EQ(vfsdrv_valid_errno(1), 0);
    EQ(vfsdrv_valid_errno(INT_MIN), 0);
    EQ(vfsdrv_valid_errno(INT_MAX), 0);
}

/* ---------------------------------------------------------------------------- */
static uint32_t cap_of(uint32_t opcode, uint32_t arg_at, uint32_t arg, uint32_t args_len)
{
    uint8_t args[64] = {0};
    memcpy(args + arg_at, &arg, 4);
    return vfsdrv_reply_capacity(opcode, args, args_len, 131072);
}

static void test_reply_capacity(void)
{
    EQ(cap_of(FORGET, 0, 0, 8), VFSDRV_NO_REPLY);
    EQ(cap_of(BATCH_FORGET, 0, 0, 8), VFSDRV_NO_REPLY);
    EQ(cap_of(INTERRUPT, 0, 0, 8), VFSDRV_NO_REPLY);
    EQ(cap_of(LOOKUP, 0, 0, 6), 128);      /* fuse_entry_out */
    EQ(cap_of(MKDIR, 0, 0, 16), 128);
    EQ(cap_of(GETATTR, 0, 0, 16), 104);    /* fuse_attr_out */
    EQ(cap_of(SETATTR, 0, 0, 88), 104);
    EQ(cap_of(READLINK, 0, 0, 0), 4096);
    EQ(cap_of(OPEN, 0, 0, 8), 16);
    EQ(cap_of(CREATE, 0, 0, 24), 144);     /* entry + open */
    EQ(cap_of(WRITE, 0, 0, 40), 8);
    EQ(cap_of(STATFS, 0, 0, 0), 80);
    EQ(cap_of(GETLK, 0, 0, 48), 24);
    EQ(cap_of(INIT, 0, 0, 64), 64);
    EQ(cap_of(LSEEK, 0, 0, 24), 8);
    EQ(cap_of(UNLINK, 0, 0, 4), 0);
    EQ(cap_of(SETLK, 0, 0, 48), 0);
    EQ(cap_of(SETLKW, 0, 0, 48), 0);
    EQ(cap_of(DESTROY, 0, 0, 0), 0);
    /* READ/READDIR: fuse_read_in.size at offset 16, capped at max_io */
    EQ(cap_of(READ, 16, 4096, 40), 4096);
    EQ(cap_of(READ, 16, 1 << 20, 40), 131072);
    EQ(cap_of(READDIR, 16, 100, 40), 100);
    EQ(cap_of(READ, 16, 4096, 19), 0);     /* too short to say */
    EQ(cap_of(READ, 16, 4096, 20), 4096);
    /* GETXATTR/LISTXATTR: size 0 asks for the size only */
    EQ(cap_of(GETXATTR, 0, 0, 8), 8);
    EQ(cap_of(LISTXATTR, 0, 0, 8), 8);
    EQ(cap_of(GETXATTR, 0, 50, 8), 50);
    EQ(cap_of(GETXATTR, 0, 1 << 30, 8), 131072);
    EQ(cap_of(GETXATTR, 0, 50, 3), 0);
    EQ(cap_of(9999, 0, 0, 0), 4096);       /* unknown: a page */
}

static void test_layout(void)
{
    /* a WRITE's data (after two 40-byte headers) lands on a page boundary */
    EQ(vfsdrv_request_offset(WRITE), 4096 - 80);
    EQ(vfsdrv_request_offset(WRITE) + VFSDRV_WRITE_HEADERS, 4096);
    EQ(vfsdrv_request_offset(READ), 0);
    EQ(vfsdrv_request_offset(GETATTR), 0);
    /* the reply's header ends on a page boundary, after the request */
    EQ(vfsdrv_reply_offset(0, 56), 4096 - 16);
    EQ(vfsdrv_reply_offset(0, 4080), 4096 - 16);   /* exactly fits */
    EQ(vfsdrv_reply_offset(0, 4081), 8192 - 16);
    EQ(vfsdrv_reply_offset(4016, 80 + 4096), 12288 - 16);
    for (uint32_t off = 0; off < 9000; off += 997)
        for (uint32_t len = 40; len < 20000; len += 1231) {
            uint32_t r = vfsdrv_reply_offset(off, len);
            if ((r + 16) % 4096 != 0 || r < off + len || r >= off + len + 4096) {
                CHECK(0, "reply_offset(%u, %u) = %u", off, len, r);
                return;
            }
        }
}

/* ---------------------------------------------------------------------------- */
/* Barriers, across threads. A producer fills entries with plain (relaxed) stores
 * and publishes a 16-bit index with vfsdrv_store_release_u16; a consumer reads the
 * index with vfsdrv_load_acquire_u16 and then the entries: it must never see an
 * entry older than the index says. A smoke test: it catches a helper the compiler
 * may reorder around, and on real aarch64 hardware a missing dmb; under qemu-user
 * on an x86-64 host the emulated CPU is as strongly ordered as the host (TSO), so
 * there the fences themselves are guarded by the disassembly check in
 * tests/test_native_aarch64.py. */

#define SM_ENTRIES 64
#define SM_WORDS 4
#define SM_COUNT 300000u

struct smoke {
    uint64_t data[SM_ENTRIES][SM_WORDS];
    uint16_t prod_idx __attribute__((aligned(64)));
    uint16_t cons_idx __attribute__((aligned(64)));
    uint32_t stale;
};

static void *smoke_producer(void *arg)
{
    struct smoke *s = arg;
    for (uint32_t seq = 0; seq < SM_COUNT; seq++) {
        for (uint32_t spins = 0;
             (uint16_t)(seq - vfsdrv_load_acquire_u16(&s->cons_idx)) >= SM_ENTRIES; spins++)
            pause_now_and_then(spins);  /* full: wait for the consumer */
        for (int w = 0; w < SM_WORDS; w++)
            __atomic_store_n(&s->data[seq % SM_ENTRIES][w], (uint64_t)seq * SM_WORDS + w,
                             __ATOMIC_RELAXED);
        vfsdrv_store_release_u16(&s->prod_idx, (uint16_t)(seq + 1));
    }
    return NULL;
}

static void *smoke_consumer(void *arg)
{
    struct smoke *s = arg;
    uint32_t seq = 0;
    for (uint32_t spins = 0; seq < SM_COUNT; spins++) {
        uint16_t idx = vfsdrv_load_acquire_u16(&s->prod_idx);
        if ((uint16_t)seq == idx)
            pause_now_and_then(spins);
        for (; (uint16_t)seq != idx; seq++)
            for (int w = 0; w < SM_WORDS; w++)
                if (__atomic_load_n(&s->data[seq % SM_ENTRIES][w], __ATOMIC_RELAXED) !=
                    (uint64_t)seq * SM_WORDS + w)
                    s->stale++;
        /* release: our reads of the entries happen before the producer reuses them */
        vfsdrv_store_release_u16(&s->cons_idx, (uint16_t)seq);
    }
    return NULL;
}

static void test_barriers_threaded(void)
{
    struct smoke *s = rd_zalloc(sizeof *s);
    pthread_t a, b;
    pthread_create(&b, NULL, smoke_consumer, s);
    pthread_create(&a, NULL, smoke_producer, s);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    EQ(s->stale, 0);
    EQ(s->prod_idx, (uint16_t)SM_COUNT);
    free(s);
}

/* The ring itself with a device thread: the driver writes a tag into each request
 * and adds/publishes; the device thread takes chains (acquire on avail->idx or the
 * packed flags), writes the tag + 1 into the reply, returns the chain (release);
 * the driver harvests and must find the device's tag in every reply. */
#define DEV_COUNT 60000u

struct devthread {
    struct rd_ring r;
    struct rd_dev d;
    int stop;
    uint32_t served;
};

static void *device_thread(void *arg)
{
    struct devthread *t = arg;
    struct rd_chain c;
    for (uint32_t spins = 0; !__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE); spins++) {
        if (!rd_pop(&t->d, &c)) {
            pause_now_and_then(spins);
            continue;
        }
        uint32_t tag = rd_u32((uint8_t *)(uintptr_t)c.seg[0].addr);
        tag++;
        memcpy((uint8_t *)(uintptr_t)c.seg[1].addr, &tag, 4);
        rd_push(&t->d, c.head, 4, c.entries);
        t->served++;
    }
    return NULL;
}

static void ring_threaded_case(int packed)
{
    struct devthread *t = rd_zalloc(sizeof *t);
    struct vfsdrv_vq vq;
    rig_up(&t->r, &t->d, &vq, 16, packed, 0, 1);
    static uint32_t req[16][4], rep[16][4];
    uint32_t tag_of[16];
    pthread_t th;
    pthread_create(&th, NULL, device_thread, t);
    uint32_t sent = 0, got = 0, wrong = 0;
    for (uint32_t spins = 0; got < DEV_COUNT; spins++) {
        while (sent < DEV_COUNT && vq.num_free >= 2) {
            /* the slot is picked by the head the chain gets */
            uint32_t slot = vq.free_head;
            req[slot][0] = sent * 2 + 1;
            rep[slot][0] = 0;
            struct vfsdrv_seg s[2] = {seg(req[slot], 16, 0), seg(rep[slot], 16, 1)};
            int h = vfsdrv_vq_add(&vq, s, 2);
            if (h < 0 || (uint32_t)h != slot) {
                CHECK(0, "add: %d (%s)", h, vq.error);
                goto out;
            }
            tag_of[h] = sent * 2 + 1;
            sent++;
        }
        vfsdrv_vq_publish(&vq);
        struct vfsdrv_used u[16];
        int n = vfsdrv_vq_harvest(&vq, u, 16);
        if (n < 0) {
            CHECK(0, "harvest: %s", vq.error);
            goto out;
        }
        for (int k = 0; k < n; k++)
            if (rep[u[k].id][0] != tag_of[u[k].id] + 1 || u[k].len != 4)
                wrong++;
        got += (uint32_t)n;
        if (n == 0)
            pause_now_and_then(spins);
    }
out:
    __atomic_store_n(&t->stop, 1, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    EQ(wrong, 0);
    EQ(got, DEV_COUNT);
    vfsdrv_vq_destroy(&vq);
    rd_ring_free(&t->r);
    free(t);
}

static void test_ring_threaded(void)
{
    ring_threaded_case(0);
    ring_threaded_case(1);
}

/* ---------------------------------------------------------------------------- */
static const struct { const char *name; void (*fn)(void); } tests[] = {
    {"init_rejects_bad_sizes", test_init_rejects_bad_sizes},
    {"add_rejects_bad_chains", test_add_rejects_bad_chains},
    {"roundtrip_and_batching", test_roundtrip_and_batching},
    {"harvest_max", test_harvest_max},
    {"bad_used_entries", test_bad_used_entries},
    {"used_entry_with_nothing_in_flight", test_used_entry_with_nothing_in_flight},
    {"index_wraparound", test_index_wraparound},
    {"indirect", test_indirect},
    {"arm_disarm", test_arm_disarm},
    {"check_reply", test_check_reply},
    {"valid_errno", test_valid_errno},
    {"reply_capacity", test_reply_capacity},
    {"layout", test_layout},
    {"barriers_threaded", test_barriers_threaded},
    {"ring_threaded", test_ring_threaded},
    {"hiprio_new_rejects_bad_config", test_hiprio_new_rejects_bad_config},
    {"hiprio_one_publish_one_kick", test_hiprio_one_publish_one_kick},
    {"hiprio_event_idx", test_hiprio_event_idx},
    {"hiprio_mmio_kick", test_hiprio_mmio_kick},
    {"hiprio_full_and_reclaim", test_hiprio_full_and_reclaim},
    {"hiprio_buffers_never_shared", test_hiprio_buffers_never_shared},
    {"hiprio_batch_forget_split", test_hiprio_batch_forget_split},
    {"hiprio_bad_used_id", test_hiprio_bad_used_id},
    {"hiprio_kick_failure", test_hiprio_kick_failure},
    {"hiprio_threaded", test_hiprio_threaded},
    {"client_batch", test_client_batch},
    {"client_bad_replies", test_client_bad_replies},
    {"client_add_refusals", test_client_add_refusals},
    {"uring_faults", test_uring_faults},
    {"pump_pending_setlkw_is_seen", test_pump_pending_setlkw_is_seen},
};

int main(int argc, char **argv)
{
    int ran = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        int want = argc < 2;
        for (int a = 1; a < argc; a++)
            want |= strstr(tests[i].name, argv[a]) != NULL;
        if (!want)
            continue;
        test_failed = 0;
        tests[i].fn();
        printf("%s %s\n", test_failed ? "FAIL" : "ok", tests[i].name);
        fflush(stdout);
        ran++;
    }
    printf("%d tests, %d failed checks\n", ran, failures);
    return failures || ran == 0 ? 1 : 0;
}
