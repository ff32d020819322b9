/* Unit tests of the hiprio sender (driver/native/hiprio.c) and of the typed
 * client's batched path (driver/native/client.c) against the in-memory device
 * (ringdev.h), on the split and the packed ring. Linked into test_core (the runner
 * and its table are test_core.c's), so that they run wherever the core's tests do:
 * x86-64 and, cross-compiled, aarch64 under qemu-user.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "testkit.h"

/* ---------------------------------------------------------------------------- */
/* The hiprio sender (hiprio.c) on the in-memory device: each request one
 * device-readable segment, one publish and at most one kick per flush, buffers
 * back from the used ring, a full sender queueing nothing, BATCH_FORGET split with
 * every forget once and in order, a bad used entry breaking it with a reason. */
#define H_BUF 4096

struct hrig {
    struct rd_ring r;
    struct rd_dev d;
    struct vfsdrv_vq vq;
    struct vfsdrv_hiprio *h;
    struct vfsdrv_hiprio_buf bufs[16];
    uint8_t *mem;
    int efd;                 /* the kick eventfd: its count is the kicks */
};

/* a ring of `size`, `nbufs` page-aligned buffers of which `buf_size` bytes are used */
static void hrig_up_ev(struct hrig *t, uint32_t size, int packed, uint32_t nbufs,
                       uint32_t buf_size, int event_idx)
{
    rig_up(&t->r, &t->d, &t->vq, size, packed, 0, event_idx);
    t->mem = rd_zalloc((size_t)nbufs * H_BUF);
    for (uint32_t i = 0; i < nbufs; i++)
        t->bufs[i] = (struct vfsdrv_hiprio_buf){t->mem + (size_t)i * H_BUF,
                                                (uint64_t)(uintptr_t)(t->mem + (size_t)i * H_BUF)};
    t->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(t->efd >= 0, "eventfd: %s", strerror(errno));
    struct vfsdrv_hiprio_config cfg = {t->efd, 0, NULL, 0, buf_size};
    char err[120] = "";
    t->h = vfsdrv_hiprio_new(&cfg, &t->vq, t->bufs, nbufs, err, sizeof err);
    CHECK(t->h != NULL, "hiprio_new: %s", err);
}

static void hrig_up(struct hrig *t, uint32_t size, int packed, uint32_t nbufs, uint32_t buf_size)
{
    hrig_up_ev(t, size, packed, nbufs, buf_size, 0);
}

static void hrig_down(struct hrig *t)
{
    vfsdrv_hiprio_free(t->h);
    close(t->efd);
    free(t->mem);
    vfsdrv_vq_destroy(&t->vq);
    rd_ring_free(&t->r);
}

static uint64_t kicks_of(struct hrig *t)
{
    uint64_t n = 0;
    if (read(t->efd, &n, 8) != 8)
        return 0;  /* EAGAIN: no kick since the last look */
    return n;
}

static struct vfsdrv_hiprio_stats hstats(struct hrig *t)
{
    struct vfsdrv_hiprio_stats s;
    vfsdrv_hiprio_get_stats(t->h, &s);
    return s;
}

static void in_header(uint8_t *out, uint32_t len, uint32_t opcode, uint64_t unique,
                      uint64_t nodeid)
{
    struct vfsdrv_in_header h = {.len = len, .opcode = opcode, .unique = unique,
                                 .nodeid = nodeid, .uid = 1, .gid = 2, .pid = 3};
    memcpy(out, &h, sizeof h);
}

/* FORGET: header + fuse_forget_in {nlookup} (48 bytes) */
static uint32_t make_forget(uint8_t *out, uint64_t unique, uint64_t nodeid, uint64_t nlookup)
{
    in_header(out, 48, FORGET, unique, nodeid);
    memcpy(out + 40, &nlookup, 8);
    return 48;
}

/* BATCH_FORGET of `n` forgets {first + i, i + 1} whose count field says `count` */
static uint32_t make_batch(uint8_t *out, uint64_t unique, uint32_t n, uint32_t count,
                           uint64_t first)
{
    uint32_t len = 48 + 16 * n, in[2] = {count, 0};
    in_header(out, len, BATCH_FORGET, unique, 0);
    memcpy(out + 40, in, 8);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t one[2] = {first + i, i + 1};
        memcpy(out + 48 + 16 * i, one, 16);
    }
    return len;
}

/* Take every chain the device can see: each must be one device-readable segment
 * (no reply room). Returns how many (at most max). */
static uint32_t take_all(struct hrig *t, struct rd_chain *c, uint32_t max)
{
    uint32_t n = 0;
    while (n < max && rd_pop(&t->d, &c[n])) {
        CHECK(c[n].n == 1 && !c[n].seg[0].write && !c[n].indirect,
              "hiprio chain %u: %u segments, write %d", n, c[n].n, c[n].seg[0].write);
        n++;
    }
    return n;
}

static const uint8_t *data_of(const struct rd_chain *c)
{
    return (const uint8_t *)(uintptr_t)c->seg[0].addr;
}

static void give_back(struct hrig *t, const struct rd_chain *c, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        rd_push(&t->d, c[i].head, 0, c[i].entries);
}

void test_hiprio_new_rejects_bad_config(void)
{
    struct rd_ring r;
    struct rd_dev d;
    struct vfsdrv_vq vq;
    rig_up(&r, &d, &vq, 8, 0, 0, 0);
    uint8_t *mem = rd_zalloc(2 * H_BUF);
    struct vfsdrv_hiprio_buf ok = {mem, (uintptr_t)mem}, odd = {mem + 64, (uintptr_t)mem + 64};
    struct { struct vfsdrv_hiprio_buf *b; uint32_t n, size; const char *why; } bad[] = {
        {&ok, 0, 4096, "at least one buffer"},
        {&ok, 1, 63, "at least one buffer"},   /* under one header + one forget */
        {&ok, 1, 4097, "at least one buffer"},
        {&odd, 1, 4096, "not page-aligned"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct vfsdrv_hiprio_config cfg = {-1, 0, NULL, 2, bad[i].size};
        char err[120] = "";
        CHECK(vfsdrv_hiprio_new(&cfg, &vq, bad[i].b, bad[i].n, err, sizeof err) == NULL,
              "case %zu accepted", i);
        CHECK(strstr(err, bad[i].why) != NULL, "case %zu: '%s'", i, err);
    }
    free(mem);
    vfsdrv_vq_destroy(&vq);
    rd_ring_free(&r);
}

/* many sends: nothing visible (split) before the flush, one publish, one kick */
void test_hiprio_one_publish_one_kick(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct hrig t;
        hrig_up(&t, 16, packed, 8, H_BUF);
        uint8_t req[5][64];
        uint32_t len[5];
        for (int i = 0; i < 5; i++) {
            len[i] = make_forget(req[i], 2 * i + 2, 100 + i, i + 1);
            EQ(vfsdrv_hiprio_send(t.h, req[i], len[i]), 0);
        }
        struct rd_chain c[16];
        if (!packed)  /* (a packed entry is the device's once its flags are stored) */
            EQ(take_all(&t, c, 16), 0);
        uint16_t avail_before = t.vq.avail_idx;
        CHECK(t.vq.published != avail_before, "published before the flush");
        EQ(vfsdrv_hiprio_flush(t.h), 1);
        EQ(t.vq.published, avail_before);  /* all five in one publish */
        EQ(kicks_of(&t), 1);
        EQ(vfsdrv_hiprio_flush(t.h), 0);   /* nothing new: no publish, no kick */
        EQ(kicks_of(&t), 0);
        EQ(take_all(&t, c, 16), 5);
        for (int i = 0; i < 5; i++) {
            EQ(c[i].seg[0].len, len[i]);
            CHECK(!memcmp(data_of(&c[i]), req[i], len[i]), "request %d differs", i);
            EQ(c[i].seg[0].addr & (H_BUF - 1), 0);  /* one of the buffers */
        }
        struct vfsdrv_hiprio_stats s = hstats(&t);
        EQ(s.sent, 5);
        EQ(s.flushes, 1);
        EQ(s.kicks, 1);
        EQ(s.full, 0);
        EQ(s.in_flight, 5);
        /* the device asks for no kicks: published all the same, not kicked */
        rd_set_no_notify(&t.d, 1);
        EQ(vfsdrv_hiprio_send(t.h, req[0], len[0]), 0);
        EQ(vfsdrv_hiprio_send(t.h, req[1], len[1]), 0);
        EQ(vfsdrv_hiprio_flush(t.h), 0);
        EQ(kicks_of(&t), 0);
        EQ(take_all(&t, c + 5, 11), 2);
        s = hstats(&t);
        EQ(s.flushes, 2);
        EQ(s.kicks, 1);
        /* hiprio interrupts stay off: nobody waits for these buffers */
        give_back(&t, c, 7);
        EQ(rd_should_signal(&t.d, 0, 0), 0);
        EQ(vfsdrv_hiprio_reclaim(t.h), 7);
        EQ(hstats(&t).in_flight, 0);
        hrig_down(&t);
    }
}

/* With VIRTIO_F_EVENT_IDX: the flush kicks only when the publish passes the
 * device's avail_event, and the device is asked for no used-buffer interrupts
 * (packed: DISABLE; split: used_event is left where it is, so only the first
 * used entries pass it, as with Linux's disable_cb, and none after). */
void test_hiprio_event_idx(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct hrig t;
        hrig_up_ev(&t, 16, packed, 8, H_BUF, 1);
        uint8_t req[64];
        struct rd_chain c[16];
        uint32_t unique = 2, taken = 0, signals = 0;
        uint16_t used_old = 0;
        for (int round = 0; round < 6; round++) {
            for (int i = 0; i < 3; i++, unique += 2)
                EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, unique, 7, 1)), 0);
            /* the device wants a kick every other round (split: avail_event at
             * where this flush starts, or where it ends; packed: ENABLE/DISABLE) */
            int want = round % 2 == 0;
            uint16_t from = t.vq.published;
            if (packed)
                rd_set_no_notify(&t.d, !want);
            else
                vfsdrv_store_u16(t.r.used + 4 + 8 * 16, want ? from : (uint16_t)(from + 3));
            EQ(vfsdrv_hiprio_flush(t.h), want);
            EQ(kicks_of(&t), want);
            uint32_t n = take_all(&t, c, 16);
            EQ(n, 3);
            taken += n;
            give_back(&t, c, n);
            /* (split: the first entries pass used_event 0, as with Linux) */
            if (rd_should_signal(&t.d, 1, used_old) && (packed || round > 0))
                signals++;
            used_old = t.d.used_idx;
            EQ(vfsdrv_hiprio_reclaim(t.h), 3);
        }
        EQ(signals, 0);
        EQ(taken, 18);
        hrig_down(&t);
    }
}

/* an MMIO kick (kick_fd -1): the notify value stored at the notify address, at
 * its width */
void test_hiprio_mmio_kick(void)
{
    for (uint32_t width = 2; width <= 4; width += 2) {
        struct rd_ring r;
        struct rd_dev d;
        struct vfsdrv_vq vq;
        rig_up(&r, &d, &vq, 8, 0, 0, 0);
        uint8_t *mem = rd_zalloc(H_BUF);
        uint32_t doorbell[2] = {0xAAAAAAAAu, 0xAAAAAAAAu};
        struct vfsdrv_hiprio_buf b = {mem, (uintptr_t)mem};
        struct vfsdrv_hiprio_config cfg = {-1, 0xBEEF1234u, (uint8_t *)doorbell, width, 256};
        char err[120] = "";
        struct vfsdrv_hiprio *h = vfsdrv_hiprio_new(&cfg, &vq, &b, 1, err, sizeof err);
        CHECK(h != NULL, "%s", err);
        uint8_t req[64];
        if (h) {
            EQ(vfsdrv_hiprio_send(h, req, make_forget(req, 2, 5, 1)), 0);
            EQ(vfsdrv_hiprio_flush(h), 1);
        }
        /* 16 bits: the low half of the value, the rest of the word untouched (little
         * endian: the low half is the first two bytes) */
        EQ(doorbell[0], width == 4 ? 0xBEEF1234u : 0xAAAA1234u);
        EQ(doorbell[1], 0xAAAAAAAAu);
        vfsdrv_hiprio_free(h);
        free(mem);
        vfsdrv_vq_destroy(&vq);
        rd_ring_free(&r);
    }
}

/* Full for want of buffers, then for want of ring room: -ENOSPC with nothing
 * queued; the device giving buffers back makes room (the send reclaims). */
void test_hiprio_full_and_reclaim(void)
{
    for (int packed = 0; packed < 2; packed++) {
        /* 4 buffers on a ring of 8: the buffers run out first */
        struct hrig t;
        hrig_up(&t, 8, packed, 4, H_BUF);
        uint8_t req[64];
        struct rd_chain c[8];
        for (int i = 0; i < 4; i++)
            EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 10 + 2 * i, 7, 1)), 0);
        EQ(vfsdrv_hiprio_flush(t.h), 1);
        EQ(take_all(&t, c, 8), 4);
        struct snap s0 = snap_of(&t.vq);
        uint16_t avail0 = t.vq.avail_idx;
        EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 20, 7, 1)), -ENOSPC);
        CHECK(snap_same(s0, snap_of(&t.vq)), "a refused send changed the ring");
        EQ(t.vq.avail_idx, avail0);
        EQ(vfsdrv_hiprio_flush(t.h), 0);
        EQ(take_all(&t, c + 4, 4), 0);
        struct vfsdrv_hiprio_stats s = hstats(&t);
        EQ(s.sent, 4);
        EQ(s.full, 1);
        EQ(s.in_flight, 4);
        /* the device uses two (the second and the fourth): the next sends get them */
        rd_push(&t.d, c[1].head, 0, c[1].entries);
        rd_push(&t.d, c[3].head, 0, c[3].entries);
        for (int i = 0; i < 2; i++)
            EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 30 + 2 * i, 8, 1)), 0);
        EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 34, 8, 1)), -ENOSPC);
        EQ(vfsdrv_hiprio_flush(t.h), 1);
        EQ(take_all(&t, c + 4, 4), 2);
        for (int i = 4; i < 6; i++)  /* the buffers given back, in some order */
            CHECK(c[i].seg[0].addr == c[1].seg[0].addr || c[i].seg[0].addr == c[3].seg[0].addr,
                  "chain %d in buffer %#llx, not a reclaimed one", i,
                  (unsigned long long)c[i].seg[0].addr);
        CHECK(c[4].seg[0].addr != c[5].seg[0].addr, "one buffer twice");
        EQ(rd_u64(data_of(&c[4]) + 8), 30);  /* unique: the order they were sent */
        EQ(rd_u64(data_of(&c[5]) + 8), 32);
        s = hstats(&t);
        EQ(s.sent, 6);
        EQ(s.full, 2);
        EQ(s.reclaimed, 2);
        EQ(s.in_flight, 4);
        hrig_down(&t);

        /* 8 buffers on a ring of 4: the ring runs out first */
        hrig_up(&t, 4, packed, 8, H_BUF);
        for (int i = 0; i < 4; i++)
            EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 2 + 2 * i, 7, 1)), 0);
        s0 = snap_of(&t.vq);
        EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 99, 7, 1)), -ENOSPC);
        CHECK(snap_same(s0, snap_of(&t.vq)), "a refused send changed the ring");
        EQ(vfsdrv_hiprio_flush(t.h), 1);
        EQ(take_all(&t, c, 8), 4);
        for (int i = 0; i < 4; i++)
            EQ(rd_u64(data_of(&c[i]) + 8), 2 + 2 * i);
        give_back(&t, c, 4);
        EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 99, 7, 1)), 0);
        EQ(hstats(&t).reclaimed, 4);
        hrig_down(&t);
    }
}

/* Many rounds of a device that gives back a different part of what it holds each
 * time (out of order): a buffer is never reused while the device holds it (its
 * bytes stay those the device took), never held twice, and every request arrives
 * once, in order. Buffers and ring sizes chosen so that heads and buffers differ. */
void test_hiprio_buffers_never_shared(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct hrig t;
        hrig_up(&t, 8, packed, 5, 128);
        struct rd_chain held[16];
        uint64_t held_unique[16];
        uint32_t nheld = 0, next_unique = 0, seen = 0;
        uint8_t req[64];
        for (uint32_t round = 0; round < 300 && !test_failed; round++) {
            for (int i = 0; i < 8; i++) {
                int rc = vfsdrv_hiprio_send(t.h, req, make_forget(req, next_unique, 9, 1));
                if (rc == -ENOSPC)
                    break;
                EQ(rc, 0);
                next_unique++;
            }
            vfsdrv_hiprio_flush(t.h);
            struct rd_chain c[16];
            uint32_t n = take_all(&t, c, 16);
            for (uint32_t i = 0; i < n && nheld < 16; i++) {
                held[nheld] = c[i];
                held_unique[nheld] = rd_u64(data_of(&c[i]) + 8);
                EQ(held_unique[nheld], seen);  /* once each, in the order sent */
                seen++;
                nheld++;
            }
            CHECK(nheld <= 5, "the device holds %u chains, with 5 buffers", nheld);
            for (uint32_t i = 0; i < nheld; i++) {
                EQ(rd_u64(data_of(&held[i]) + 8), held_unique[i]);  /* not rewritten */
                for (uint32_t j = 0; j < i; j++)
                    CHECK(held[i].seg[0].addr != held[j].seg[0].addr, "one buffer held twice");
            }
            /* give back about half, a different half each round */
            uint32_t kept = 0;
            for (uint32_t i = 0; i < nheld; i++) {
                if ((i + round) % 2 == 0 || (round % 7 == 3))
                    rd_push(&t.d, held[i].head, 0, held[i].entries);
                else {
                    held[kept] = held[i];
                    held_unique[kept++] = held_unique[i];
                }
            }
            nheld = kept;
        }
        EQ(seen, next_unique);
        CHECK(seen > 600, "only %u sent", seen);
        struct vfsdrv_hiprio_stats s = hstats(&t);
        EQ(s.sent, seen);
        EQ(s.in_flight, nheld);
        EQ(s.reclaimed, seen - nheld);
        hrig_down(&t);
    }
}

/* forgets of all chains, in the order the device took them: (nodeid, nlookup);
 * each piece checked for a well-formed header (the original's, its own len/count) */
static uint32_t forgets_of(const struct rd_chain *c, uint32_t n, const uint8_t *orig,
                           uint64_t (*out)[2], uint32_t max)
{
    uint32_t got = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = data_of(&c[i]);
        uint32_t len = rd_u32(p), count = rd_u32(p + 40);
        EQ(len, c[i].seg[0].len);
        EQ(rd_u32(p + 4), BATCH_FORGET);
        CHECK(!memcmp(p + 8, orig + 8, 32), "piece %u: header beyond len/opcode differs", i);
        EQ(rd_u32(p + 44), 0);
        EQ(len, 48 + 16 * count);
        CHECK(count >= 1, "piece %u of no forgets", i);
        for (uint32_t k = 0; k < count && got < max; k++, got++) {
            out[got][0] = rd_u64(p + 48 + 16 * k);
            out[got][1] = rd_u64(p + 56 + 16 * k);
        }
    }
    return got;
}

/* A BATCH_FORGET bigger than a buffer: split into pieces (all or none), every
 * forget once and in order, also when the first try finds too few buffers. */
void test_hiprio_batch_forget_split(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct hrig t;
        const uint32_t limit = 48 + 16 * 3;  /* three forgets a piece */
        hrig_up(&t, 16, packed, 4, limit);
        static uint8_t req[48 + 16 * 40], one[64];
        uint64_t got[40][2];
        struct rd_chain c[16];

        /* fits one buffer: goes as it is */
        uint32_t len = make_batch(req, 50, 3, 3, 1000);
        EQ(vfsdrv_hiprio_pieces(req, len, limit), 1);
        EQ(vfsdrv_hiprio_send(t.h, req, len), 0);
        vfsdrv_hiprio_flush(t.h);
        EQ(take_all(&t, c, 16), 1);
        EQ(c[0].seg[0].len, len);
        CHECK(!memcmp(data_of(&c[0]), req, len), "a batch that fits was changed");
        give_back(&t, c, 1);

        /* 10 forgets: 4 pieces (3, 3, 3, 1); one buffer taken by a FORGET leaves 3 */
        len = make_batch(req, 52, 10, 10, 2000);
        EQ(vfsdrv_hiprio_pieces(req, len, limit), 4);
        EQ(vfsdrv_hiprio_send(t.h, one, make_forget(one, 54, 77, 1)), 0);
        uint64_t sent0 = hstats(&t).sent;  /* (reads the used ring: before the snapshot) */
        struct snap s0 = snap_of(&t.vq);
        EQ(vfsdrv_hiprio_send(t.h, req, len), -ENOSPC);
        CHECK(snap_same(s0, snap_of(&t.vq)), "part of a refused batch was queued");
        EQ(hstats(&t).sent, sent0);
        vfsdrv_hiprio_flush(t.h);
        EQ(take_all(&t, c, 16), 1);  /* only the FORGET */
        EQ(rd_u32(data_of(&c[0]) + 4), FORGET);
        give_back(&t, c, 1);
        EQ(vfsdrv_hiprio_send(t.h, req, len), 0);  /* the retry: every piece */
        EQ(vfsdrv_hiprio_flush(t.h), 1);
        EQ(take_all(&t, c, 16), 4);
        uint32_t counts[4] = {3, 3, 3, 1};
        for (int i = 0; i < 4; i++)
            EQ(rd_u32(data_of(&c[i]) + 40), counts[i]);
        EQ(forgets_of(c, 4, req, got, 40), 10);
        for (uint32_t i = 0; i < 10; i++) {
            EQ(got[i][0], 2000 + i);
            EQ(got[i][1], i + 1);
        }
        EQ(hstats(&t).sent, 1 + 1 + 4);
        give_back(&t, c, 4);

        /* a count larger than the request holds: the forgets that are there */
        len = make_batch(req, 56, 7, 1000, 3000);
        EQ(vfsdrv_hiprio_pieces(req, len, limit), 3);
        EQ(vfsdrv_hiprio_send(t.h, req, len), 0);
        vfsdrv_hiprio_flush(t.h);
        EQ(take_all(&t, c, 16), 3);
        EQ(forgets_of(c, 3, req, got, 40), 7);
        for (uint32_t i = 0; i < 7; i++)
            EQ(got[i][0], 3000 + i);
        give_back(&t, c, 3);

        /* more pieces than buffers: never fits, refused whole each time */
        len = make_batch(req, 58, 13, 13, 4000);
        EQ(vfsdrv_hiprio_pieces(req, len, limit), 5);
        EQ(vfsdrv_hiprio_send(t.h, req, len), -ENOSPC);
        /* cannot be sent at all: a header short, too big and not a BATCH_FORGET, a
         * BATCH_FORGET too big with no forgets */
        EQ(vfsdrv_hiprio_send(t.h, req, 39), -EMSGSIZE);
        in_header(req, 200, INTERRUPT, 60, 0);
        EQ(vfsdrv_hiprio_send(t.h, req, 200), -EMSGSIZE);
        len = make_batch(req, 62, 0, 0, 0);
        memset(req + len, 0, 100);
        EQ(vfsdrv_hiprio_pieces(req, len + 100, limit), 0);
        EQ(vfsdrv_hiprio_send(t.h, req, len + 100), -EMSGSIZE);
        vfsdrv_hiprio_flush(t.h);
        EQ(take_all(&t, c, 16), 0);
        EQ(hstats(&t).in_flight, 0);
        hrig_down(&t);
    }
}

/* A used entry the device gets wrong breaks the sender for good, with a reason;
 * found by a reclaim or by a send that needed room. */
static void hiprio_bad_case(int packed, const char *kind, int by_send)
{
    struct hrig t;
    hrig_up(&t, 8, packed, 2, H_BUF);
    uint8_t req[64];
    struct rd_chain c[8];
    EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 2, 7, 1)), 0);
    EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 4, 7, 1)), 0);
    EQ(vfsdrv_hiprio_flush(t.h), 1);
    EQ(take_all(&t, c, 8), 2);
    const char *expect = NULL;
    if (!strcmp(kind, "range")) {
        rd_push(&t.d, packed ? 8 : 9, 0, 1);
        expect = packed ? "used id 8 out of range" : "used id 9 out of range";
    } else if (!strcmp(kind, "duplicate")) {
        rd_push(&t.d, c[0].head, 0, 1);
        rd_push(&t.d, c[0].head, 0, 1);
        expect = "not in flight";
    } else {  /* never added */
        uint32_t id = 0;
        while (id == c[0].head || id == c[1].head)
            id++;
        rd_push(&t.d, id, 0, 1);
        expect = "not in flight";
    }
    char why[VFSDRV_ERROR_LEN];
    EQ(vfsdrv_hiprio_error(t.h, why, sizeof why), 0);
    EQ(why[0], 0);
    if (by_send)  /* both buffers in flight: the send must reclaim first */
        EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 6, 7, 1)), -EIO);
    else
        EQ(vfsdrv_hiprio_reclaim(t.h), -EIO);
    EQ(vfsdrv_hiprio_error(t.h, why, sizeof why), 1);
    CHECK(strstr(why, "hiprio queue: ") == why && strstr(why, expect),
          "%s %s: '%s' lacks '%s'", packed ? "packed" : "split", kind, why, expect);
    /* broken for good: nothing more goes out, the first reason stays */
    uint16_t avail = t.vq.avail_idx;
    EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 8, 7, 1)), -EIO);
    EQ(vfsdrv_hiprio_flush(t.h), -EIO);
    EQ(vfsdrv_hiprio_reclaim(t.h), -EIO);
    EQ(t.vq.avail_idx, avail);
    EQ(kicks_of(&t), 1);
    char again[VFSDRV_ERROR_LEN];
    EQ(vfsdrv_hiprio_error(t.h, again, sizeof again), 1);
    CHECK(!strcmp(why, again), "the reason changed: '%s' -> '%s'", why, again);
    hrig_down(&t);
}

void test_hiprio_bad_used_id(void)
{
    for (int packed = 0; packed < 2; packed++)
        for (int by_send = 0; by_send < 2; by_send++) {
            hiprio_bad_case(packed, "range", by_send);
            hiprio_bad_case(packed, "duplicate", by_send);
            hiprio_bad_case(packed, "never-added", by_send);
        }
    /* a used entry with nothing in flight is the device's fault too */
    for (int packed = 0; packed < 2; packed++) {
        struct hrig t;
        hrig_up(&t, 8, packed, 2, H_BUF);
        rd_push(&t.d, 0, 0, 1);
        EQ(vfsdrv_hiprio_reclaim(t.h), -EIO);
        EQ(vfsdrv_hiprio_error(t.h, NULL, 0), 1);
        hrig_down(&t);
    }
}

/* a kick that fails (an eventfd that is not writable) breaks the sender too */
void test_hiprio_kick_failure(void)
{
    struct hrig t;
    hrig_up(&t, 8, 0, 2, H_BUF);
    vfsdrv_hiprio_free(t.h);
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0, "/dev/null: %s", strerror(errno));
    struct vfsdrv_hiprio_config cfg = {fd, 0, NULL, 0, H_BUF};
    char err[120] = "";
    t.h = vfsdrv_hiprio_new(&cfg, &t.vq, t.bufs, 2, err, sizeof err);
    CHECK(t.h != NULL, "%s", err);
    uint8_t req[64];
    EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 2, 7, 1)), 0);
    EQ(vfsdrv_hiprio_flush(t.h), -EIO);
    char why[VFSDRV_ERROR_LEN];
    EQ(vfsdrv_hiprio_error(t.h, why, sizeof why), 1);
    CHECK(strstr(why, "hiprio kick failed: ") == why && strstr(why, strerror(EBADF)), "'%s'", why);
    EQ(vfsdrv_hiprio_send(t.h, req, make_forget(req, 4, 7, 1)), -EIO);
    close(fd);
    hrig_down(&t);
}

/* The pumps and the control thread share the sender: senders in several threads,
 * a device thread giving buffers back; every FORGET arrives once, each thread's
 * in the order it sent them. */
#define HT_THREADS 3
#define HT_PER 3000u

struct hthread {
    struct hrig *t;
    uint32_t id;
    uint32_t retries;
    int failed;
};

static void *hiprio_sender_thread(void *arg)
{
    struct hthread *s = arg;
    uint8_t req[64];
    for (uint32_t i = 0; i < HT_PER && !s->failed; i++) {
        uint32_t len = make_forget(req, ((uint64_t)s->id << 32) | i, 1000 + s->id, i);
        for (uint32_t spins = 0;; spins++) {
            int rc = vfsdrv_hiprio_send(s->t->h, req, len);
            if (rc == 0)
                break;
            if (rc != -ENOSPC) {
                s->failed = 1;
                break;
            }
            s->retries++;
            vfsdrv_hiprio_flush(s->t->h);  /* what is queued must go, or nothing comes back */
            pause_now_and_then(spins | 63);
        }
        if (i % 4 == 3)
            vfsdrv_hiprio_flush(s->t->h);
    }
    vfsdrv_hiprio_flush(s->t->h);
    return NULL;
}

struct hdev {
    struct hrig *t;
    int stop;
    uint32_t next[HT_THREADS];
    uint32_t wrong;
};

static void *hiprio_device_thread(void *arg)
{
    struct hdev *v = arg;
    struct rd_chain c;
    for (uint32_t spins = 0; !__atomic_load_n(&v->stop, __ATOMIC_ACQUIRE); spins++) {
        if (!rd_pop(&v->t->d, &c)) {
            pause_now_and_then(spins);
            continue;
        }
        const uint8_t *p = data_of(&c);
        uint64_t unique = rd_u64(p + 8);
        uint32_t th = (uint32_t)(unique >> 32), i = (uint32_t)unique;
        if (c.n != 1 || rd_u32(p + 4) != FORGET || th >= HT_THREADS || i != v->next[th] ||
            rd_u64(p + 16) != 1000 + th || rd_u64(p + 40) != i)
            __atomic_store_n(&v->wrong, v->wrong + 1, __ATOMIC_RELEASE);
        else
            __atomic_store_n(&v->next[th], v->next[th] + 1, __ATOMIC_RELEASE);
        rd_push(&v->t->d, c.head, 0, c.entries);
    }
    return NULL;
}

void test_hiprio_threaded(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct hrig *t = rd_zalloc(sizeof *t);
        hrig_up(t, 8, packed, 6, 256);
        struct hdev *v = rd_zalloc(sizeof *v);
        v->t = t;
        struct hthread s[HT_THREADS];
        pthread_t dev, th[HT_THREADS];
        pthread_create(&dev, NULL, hiprio_device_thread, v);
        for (uint32_t k = 0; k < HT_THREADS; k++) {
            s[k] = (struct hthread){t, k, 0, 0};
            pthread_create(&th[k], NULL, hiprio_sender_thread, &s[k]);
        }
        for (uint32_t k = 0; k < HT_THREADS; k++)
            pthread_join(th[k], NULL);
        /* wait for the device to take what was flushed last */
        for (uint32_t spins = 0; spins < 2000000; spins++) {
            uint32_t seen = 0;
            for (uint32_t k = 0; k < HT_THREADS; k++)
                seen += __atomic_load_n(&v->next[k], __ATOMIC_ACQUIRE);
            if (seen + __atomic_load_n(&v->wrong, __ATOMIC_ACQUIRE) >= HT_THREADS * HT_PER)
                break;
            pause_now_and_then(spins | 63);
        }
        __atomic_store_n(&v->stop, 1, __ATOMIC_RELEASE);
        pthread_join(dev, NULL);
        EQ(v->wrong, 0);
        for (uint32_t k = 0; k < HT_THREADS; k++) {
            EQ(s[k].failed, 0);
            EQ(v->next[k], HT_PER);
        }
        struct vfsdrv_hiprio_stats st = hstats(t);
        EQ(st.sent, HT_THREADS * HT_PER);
        EQ(st.reclaimed, HT_THREADS * HT_PER);
        EQ(st.in_flight, 0);
        EQ(vfsdrv_hiprio_error(t->h, NULL, 0), 0);
        hrig_down(t);
        free(v);
        free(t);
    }
}

/* ---------------------------------------------------------------------------- */
/* The typed client's batched path (client.c): a batch written, chained and
 * published in one call; harvest judges each reply by vfsdrv_check_reply, and a
 * bad one fails only its own request. */
#define C_SLOT (3 * 4096)
#define C_SLOTS 8

struct crig {
    struct rd_ring r;
    struct rd_dev d;
    struct vfsdrv_vq vq;
    struct vfsdrv_slot slots[C_SLOTS];
    uint8_t *mem;
    uint32_t head_slot[16];
};

static void crig_up(struct crig *t, uint32_t size, int packed)
{
    rig_up(&t->r, &t->d, &t->vq, size, packed, 0, 0);
    t->mem = rd_zalloc((size_t)C_SLOTS * C_SLOT);
    for (uint32_t i = 0; i < C_SLOTS; i++) {
        uint8_t *host = t->mem + (size_t)i * C_SLOT;
        t->slots[i] = (struct vfsdrv_slot){.host = host, .addr = (uint64_t)(uintptr_t)host,
                                           .size = C_SLOT, .fd = -1,
                                           .state = VFSDRV_SLOT_FREE};
    }
    for (uint32_t i = 0; i < 16; i++)
        t->head_slot[i] = VFSDRV_CLIENT_NONE;
}

static void crig_down(struct crig *t)
{
    free(t->mem);
    vfsdrv_vq_destroy(&t->vq);
    rd_ring_free(&t->r);
}

static struct vfsdrv_creq creq(uint32_t slot, uint32_t opcode, uint64_t unique, uint64_t nodeid,
                               uint32_t body_len)
{
    return (struct vfsdrv_creq){slot, opcode, unique, nodeid, 1000, 1001, 42, body_len};
}

/* The device answers a chain: out header {len, error, unique} and len - 16
 * payload bytes (a pattern of the unique), used length `used`. */
static void answer(struct rd_dev *d, const struct rd_chain *c, uint32_t len, int32_t error,
                   uint64_t unique, uint32_t used)
{
    if (c->n != 2) {  /* not a chain of this path (or none): answering it would crash */
        CHECK(0, "chain %u has %u segments", c->head, c->n);
        return;
    }
    uint8_t *rep = (uint8_t *)(uintptr_t)c->seg[1].addr;
    uint32_t room = c->seg[1].len;
    struct vfsdrv_out_header h = {len, error, unique};
    memcpy(rep, &h, sizeof h);
    for (uint32_t i = 16; i < len && i < room; i++)
        rep[i] = (uint8_t)(unique + i);
    rd_push(d, c->head, used, c->entries);
}

static uint64_t unique_of(const struct rd_chain *c)
{
    return rd_u64((const uint8_t *)(uintptr_t)c->seg[0].addr + 8);
}

/* Five kinds in one batch (GETATTR, LOOKUP, UNLINK, READ, WRITE: their own request
 * offsets and reply rooms), published once; answered out of order, harvested each
 * with its status and payload. A chain of another path on the same queue comes
 * back as such. Then a batch added unpublished: the caller publishes it. */
void test_client_batch(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct crig t;
        crig_up(&t, 16, packed);
        uint8_t bodies[512] = {0}, getattr_in[16] = {0}, read_in[40] = {0}, write_in[140] = {0};
        uint32_t read_size = 1000, write_size = 100;
        memcpy(read_in + 16, &read_size, 4);
        memcpy(write_in + 16, &write_size, 4);
        for (int i = 40; i < 140; i++)
            write_in[i] = (uint8_t)i;
        struct { uint32_t opcode; const void *body; uint32_t body_len; uint32_t cap; } kinds[5] = {
            {GETATTR, getattr_in, 16, 104}, {LOOKUP, "hello", 6, 128}, {UNLINK, "x", 2, 0},
            {READ, read_in, 40, 1000}, {WRITE, write_in, 140, 8},
        };
        struct vfsdrv_creq reqs[5];
        uint32_t pos = 0;
        for (uint32_t k = 0; k < 5; k++) {
            reqs[k] = creq(k, kinds[k].opcode, 10 + 2 * k, 1 + k, kinds[k].body_len);
            memcpy(bodies + pos, kinds[k].body, kinds[k].body_len);
            pos += kinds[k].body_len;
        }
        int32_t status[5], kick = -1;
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 5, bodies, pos, 131072,
                             status, 1, &kick), 5);
        EQ(kick, 1);
        EQ(t.vq.published, t.vq.avail_idx);  /* published, */
        EQ(vfsdrv_vq_publish(&t.vq), 0);     /* all of it at once */
        for (uint32_t k = 0; k < 5; k++) {
            CHECK(status[k] >= 0 && status[k] < 16, "status[%u] = %d", k, status[k]);
            EQ(t.head_slot[status[k]], k);
            EQ(t.slots[k].state, VFSDRV_SLOT_RING);
        }
        /* what the device reads: the header and body, the reply room where the
         * layout rules put it */
        struct rd_chain c[8];
        for (uint32_t k = 0; k < 5; k++) {
            EQ(rd_pop(&t.d, &c[k]), 1);
            EQ(c[k].head, status[k]);
            EQ(c[k].n, 2);
            uint32_t in_len = 40 + kinds[k].body_len;
            uint32_t req_off = vfsdrv_request_offset(kinds[k].opcode);
            uint8_t *host = t.slots[k].host;
            EQ(c[k].seg[0].addr, (uintptr_t)(host + req_off));
            EQ(c[k].seg[0].len, in_len);
            EQ(c[k].seg[0].write, 0);
            struct vfsdrv_in_header h;
            memcpy(&h, host + req_off, sizeof h);
            EQ(h.len, in_len);
            EQ(h.opcode, kinds[k].opcode);
            EQ(h.unique, 10 + 2 * k);
            EQ(h.nodeid, 1 + k);
            EQ(h.uid, 1000);
            EQ(h.gid, 1001);
            EQ(h.pid, 42);
            EQ(h.total_extlen, 0);
            CHECK(!memcmp(host + req_off + 40, kinds[k].body, kinds[k].body_len), "body %u", k);
            EQ(c[k].seg[1].addr, (uintptr_t)(host + vfsdrv_reply_offset(req_off, in_len)));
            EQ(c[k].seg[1].len, 16 + kinds[k].cap);
            EQ(c[k].seg[1].write, 1);
        }
        EQ(rd_pop(&t.d, &c[5]), 0);
        /* in reverse: GETATTR 104 bytes, LOOKUP ENOENT, UNLINK done, READ 500 bytes
         * (short), WRITE 8 bytes */
        uint32_t len[5] = {120, 16, 16, 516, 24}, used[5] = {120, 16, 16, 516, 24};
        int32_t err[5] = {0, -ENOENT, 0, 0, 0};
        for (uint32_t k = 5; k-- > 0;)
            answer(&t.d, &c[k], len[k], err[k], 10 + 2 * k, used[k]);
        struct vfsdrv_used u[16];
        struct vfsdrv_cdone done[16];
        char why[120] = "";
        EQ(vfsdrv_client_harvest(&t.vq, t.slots, C_SLOTS, t.head_slot, u, done, 16, why,
                                 sizeof why), 5);
        for (uint32_t j = 0; j < 5; j++) {
            uint32_t k = 4 - j;
            const struct vfsdrv_cdone *d = &done[j];
            EQ(d->slot, k);
            EQ(d->head, status[k]);
            EQ(d->len, used[k]);
            EQ(d->error, err[k]);
            EQ(d->bad, 0);
            uint32_t req_off = vfsdrv_request_offset(kinds[k].opcode);
            EQ(d->payload_off, vfsdrv_reply_offset(req_off, 40 + kinds[k].body_len) + 16);
            EQ(d->payload_len, len[k] - 16);
            for (uint32_t i = 0; i < d->payload_len; i++)
                if (t.slots[k].host[d->payload_off + i] != (uint8_t)(10 + 2 * k + 16 + i)) {
                    CHECK(0, "payload of slot %u differs at %u", k, i);
                    break;
                }
            EQ(t.slots[k].state, VFSDRV_SLOT_FREE);
            EQ(t.head_slot[status[k]], VFSDRV_CLIENT_NONE);
        }
        EQ(why[0], 0);
        EQ(t.vq.num_free, 16);
        EQ(t.vq.in_flight, 0);

        /* a chain of the Python path first, then a batch the caller publishes */
        uint8_t other[64];
        struct vfsdrv_seg s[1] = {seg(other, 64, 1)};
        int other_head = vfsdrv_vq_add(&t.vq, s, 1);
        CHECK(other_head >= 0, "%s", t.vq.error);
        for (uint32_t k = 0; k < 3; k++)
            reqs[k] = creq(5 + k, GETATTR, 40 + 2 * k, 1, 16);
        memset(bodies, 0, 48);
        kick = -1;
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 3, bodies, 48, 131072,
                             status, 0, &kick), 3);
        EQ(kick, 0);
        if (!packed)
            EQ(rd_pop(&t.d, &c[0]), 0);  /* not published: the device sees nothing */
        EQ(vfsdrv_vq_publish(&t.vq), 1);
        EQ(rd_pop(&t.d, &c[0]), 1);
        EQ(c[0].head, other_head);
        for (uint32_t k = 1; k < 4; k++) {
            EQ(rd_pop(&t.d, &c[k]), 1);
            EQ(c[k].head, status[k - 1]);
        }
        rd_push(&t.d, c[0].head, 7, c[0].entries);
        for (uint32_t k = 1; k < 4; k++)
            answer(&t.d, &c[k], 120, 0, 40 + 2 * (k - 1), 120);
        EQ(vfsdrv_client_harvest(&t.vq, t.slots, C_SLOTS, t.head_slot, u, done, 16, why,
                                 sizeof why), 4);
        EQ(done[0].slot, VFSDRV_CLIENT_NONE);  /* its owner's to complete */
        EQ(done[0].head, other_head);
        EQ(done[0].len, 7);
        EQ(done[0].bad, 0);
        for (uint32_t k = 1; k < 4; k++) {
            EQ(done[k].slot, 5 + k - 1);
            EQ(done[k].bad, 0);
            EQ(done[k].payload_len, 104);
        }
        crig_down(&t);
    }
}

/* One batch, each reply wrong its own way: only that request fails (-EIO, bad,
 * the reason in why), the good ones around it complete. Harvested one at a time
 * so that each reason can be read. */
void test_client_bad_replies(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct crig t;
        crig_up(&t, 16, packed);
        struct vfsdrv_creq reqs[C_SLOTS];
        uint8_t bodies[16 * C_SLOTS] = {0};
        int32_t status[C_SLOTS], kick;
        for (uint32_t k = 0; k < 8; k++)
            reqs[k] = creq(k, GETATTR, 100 + k, 1, 16);
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 8, bodies,
                             sizeof bodies, 131072, status, 1, &kick), 8);
        struct rd_chain c[8];
        for (uint32_t k = 0; k < 8; k++)
            EQ(rd_pop(&t.d, &c[k]), 1);
        /* (len, error, unique, used): what each reply says */
        struct { uint32_t len; int32_t error; uint64_t unique; uint32_t used; const char *why; }
        rep[8] = {
            {120, 0, 100, 120, NULL},
            {120, 0, 1101, 120, "unique"},               /* another request's */
            {16, -512, 102, 16, "out of range"},         /* an errno the kernel refuses */
            {16, 7, 103, 16, "positive error"},
            {128, 0, 104, 120, "outside 16.."},          /* longer than it wrote */
            {24, -ENOENT, 105, 24, "carries 8 payload bytes"},  /* an error with a payload */
            {8, 0, 106, 8, "shorter than the out header"},
            {16, -EACCES, 107, 16, NULL},
        };
        for (uint32_t k = 0; k < 8; k++)
            answer(&t.d, &c[k], rep[k].len, rep[k].error, rep[k].unique, rep[k].used);
        struct vfsdrv_used u[1];
        struct vfsdrv_cdone d[1];
        for (uint32_t k = 0; k < 8; k++) {
            char why[120] = "";
            EQ(vfsdrv_client_harvest(&t.vq, t.slots, C_SLOTS, t.head_slot, u, d, 1, why,
                                     sizeof why), 1);
            EQ(d[0].slot, k);
            EQ(d[0].len, rep[k].used);
            EQ(t.slots[k].state, VFSDRV_SLOT_FREE);  /* done either way */
            if (rep[k].why) {
                EQ(d[0].bad, 1);
                EQ(d[0].error, -EIO);
                EQ(d[0].payload_len, 0);
                CHECK(strstr(why, rep[k].why) != NULL, "reply %u: '%s' lacks '%s'", k, why,
                      rep[k].why);
            } else {
                EQ(d[0].bad, 0);
                EQ(d[0].error, rep[k].error);
                EQ(d[0].payload_len, rep[k].len - 16);
                EQ(why[0], 0);
            }
        }
        EQ(t.vq.in_flight, 0);

        /* a used length beyond the reply room is the ring's fault: the whole harvest
         * fails (the core's rule), no slot is completed, the head map is kept */
        for (uint32_t k = 0; k < 2; k++)
            reqs[k] = creq(k, GETATTR, 200 + k, 1, 16);
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 2, bodies, 32, 131072,
                             status, 1, &kick), 2);
        EQ(rd_pop(&t.d, &c[0]), 1);
        EQ(rd_pop(&t.d, &c[1]), 1);
        struct rd_dev before = t.d;
        answer(&t.d, &c[0], 120, 0, 200, 120);
        answer(&t.d, &c[1], 120, 0, 201, 121);
        struct vfsdrv_used u2[4];
        struct vfsdrv_cdone d2[4];
        char why[120] = "";
        EQ(vfsdrv_client_harvest(&t.vq, t.slots, C_SLOTS, t.head_slot, u2, d2, 4, why,
                                 sizeof why), -EIO);
        CHECK(strstr(t.vq.error, "exceeds the 120 device-writable bytes"), "%s", t.vq.error);
        EQ(t.slots[0].state, VFSDRV_SLOT_RING);
        EQ(t.slots[1].state, VFSDRV_SLOT_RING);
        EQ(t.head_slot[status[0]], 0);
        t.d = before;  /* the device corrects its entries */
        answer(&t.d, &c[0], 120, 0, 200, 120);
        answer(&t.d, &c[1], 120, 0, 201, 120);
        EQ(vfsdrv_client_harvest(&t.vq, t.slots, C_SLOTS, t.head_slot, u2, d2, 4, why,
                                 sizeof why), 2);
        EQ(d2[0].bad + d2[1].bad, 0);
        crig_down(&t);
    }
}

/* What client_add refuses, per request (the rest of the batch goes in), and a ring
 * that fills mid-batch: the rest is written but not chained, in order. */
void test_client_add_refusals(void)
{
    for (int packed = 0; packed < 2; packed++) {
        struct crig t;
        crig_up(&t, 8, packed);
        static uint8_t bodies[16 * 8 + 9000];
        memset(bodies, 0, sizeof bodies);
        int32_t status[8], kick = -1;
        struct vfsdrv_creq reqs[8];
        /* the bodies must add up: nothing is written otherwise */
        reqs[0] = creq(0, GETATTR, 2, 1, 16);
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 1, bodies, 15, 131072,
                             status, 1, &kick), -EINVAL);
        CHECK(strstr(t.vq.error, "bodies of 16 bytes, 15 given"), "%s", t.vq.error);
        EQ(t.vq.num_free, 8);
        EQ(t.slots[0].unique, 0);
        /* one batch: a good one, then each refusal, then a good one */
        uint64_t pages[3] = {0, 4096, 8192};
        t.slots[2].state = VFSDRV_SLOT_CONTROL;  /* in use */
        t.slots[3].pages = pages;                /* not contiguous */
        reqs[0] = creq(0, GETATTR, 10, 1, 16);
        reqs[1] = creq(C_SLOTS, GETATTR, 12, 1, 16);   /* not a slot of the table */
        reqs[2] = creq(2, GETATTR, 14, 1, 16);
        reqs[3] = creq(3, GETATTR, 16, 1, 16);
        reqs[4] = creq(4, FORGET, 18, 1, 8);          /* no reply: hiprio's */
        reqs[5] = creq(5, LOOKUP, 20, 1, 9000);        /* request + reply room > the slot */
        reqs[6] = creq(6, GETATTR, 22, 1, 16);
        uint32_t total = 16 * 4 + 8 + 16 + 9000;
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 7, bodies, total, 131072,
                             status, 1, &kick), 2);
        EQ(kick, 1);
        CHECK(status[0] >= 0 && status[6] >= 0, "%d %d", status[0], status[6]);
        for (int k = 1; k < 6; k++)
            EQ(status[k], -EINVAL);
        EQ(t.slots[2].state, VFSDRV_SLOT_CONTROL);
        EQ(t.slots[3].state, VFSDRV_SLOT_FREE);
        EQ(t.slots[4].state, VFSDRV_SLOT_FREE);
        EQ(t.slots[5].state, VFSDRV_SLOT_FREE);
        EQ(t.vq.in_flight, 2);
        struct rd_chain c[8];
        EQ(rd_pop(&t.d, &c[0]), 1);
        EQ(rd_pop(&t.d, &c[1]), 1);
        EQ(rd_pop(&t.d, &c[2]), 0);
        EQ(unique_of(&c[0]), 10);
        EQ(unique_of(&c[1]), 22);
        /* 4 descriptors left: two chains go in, the next two are written, not chained */
        const uint32_t free_slots[4] = {1, 4, 5, 7};
        for (uint32_t k = 0; k < 4; k++)
            reqs[k] = creq(free_slots[k], GETATTR, 30 + 2 * k, 1, 16);
        EQ(vfsdrv_client_add(&t.vq, t.slots, C_SLOTS, t.head_slot, reqs, 4, bodies, 64, 131072,
                             status, 1, &kick), 2);
        CHECK(status[0] >= 0 && status[1] >= 0, "%d %d", status[0], status[1]);
        EQ(status[2], -ENOSPC);
        EQ(status[3], -ENOSPC);
        for (uint32_t k = 2; k < 4; k++) {
            struct vfsdrv_slot *s = &t.slots[reqs[k].slot];
            EQ(s->state, VFSDRV_SLOT_FREE);  /* still the caller's, to queue */
            EQ(s->unique, 30 + 2 * k);       /* but written, as it stands */
            EQ(rd_u64(s->host + s->req_off + 8), 30 + 2 * k);
            EQ(s->cap, 104);
        }
        EQ(rd_pop(&t.d, &c[2]), 1);
        EQ(rd_pop(&t.d, &c[3]), 1);
        EQ(rd_pop(&t.d, &c[4]), 0);
        EQ(unique_of(&c[2]), 30);
        EQ(unique_of(&c[3]), 32);
        for (uint32_t k = 0; k < 4; k++)
            answer(&t.d, &c[k], 16, 0, unique_of(&c[k]), 16);
        struct vfsdrv_used u[8];
        struct vfsdrv_cdone d[8];
        char why[120] = "";
        EQ(vfsdrv_client_harvest(&t.vq, t.slots, C_SLOTS, t.head_slot, u, d, 8, why, sizeof why),
           4);
        for (uint32_t k = 0; k < 4; k++)  /* a GETATTR answered by a bare header: fine */
            EQ(d[k].bad, 0);
        EQ(t.vq.num_free, 8);
        crig_down(&t);
    }
}

