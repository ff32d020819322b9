/* The instruction budget's fixed workload: N FUSE requests through the native
 * core the way the relay's pump (driver/native/pump.c) handles each one, minus
 * the syscalls: parse the request header, size the reply room
 * (vfsdrv_reply_capacity), place request and reply in a slot
 * (vfsdrv_request_offset/vfsdrv_reply_offset), copy the request into it, add the
 * chain (vfsdrv_vq_add), publish once per batch (vfsdrv_vq_publish), harvest
 * (vfsdrv_vq_harvest), validate the reply (vfsdrv_check_reply) and build the
 * iovec that would go to /dev/fuse. The in-memory device (ringdev.h) answers
 * every GETATTR with a valid fuse_attr_out.
 *
 *   budget split|packed DEPTH N
 *
 * The driver's share is in functions named driver_*, which
 * tests/test_native_budget.py counts alone with
 *   valgrind --tool=callgrind --toggle-collect='driver_*'
 * (the kernel's and the device's share, in kernel_* and device_*, is not counted).
 * Exits 1 unless every request got its valid reply.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "ringdev.h"  /* and vfsdrv_core.h (no include guard: cffi reads it) */

#define GETATTR 3
#define GETATTR_IN 16
#define ATTR_OUT 104
#define SLOT_SIZE (2 * VFSDRV_PAGE)
#define MAX_DEPTH 64
#define MAX_IO 131072

struct slot {
    uint8_t *host;
    uint64_t unique;
    uint32_t opcode, in_len, req_off, reply_off, cap;
};

static struct vfsdrv_vq vq;
static struct rd_ring ring;
static struct rd_dev dev;
static struct slot slots[MAX_DEPTH];
static uint8_t *landing[MAX_DEPTH];  /* where "the kernel" put each request (the read() buffer) */
static uint32_t head_slot[32768];
static struct vfsdrv_used used[MAX_DEPTH];
static struct iovec last_iov[2];     /* what would be written to /dev/fuse */
static uint64_t replies, bad;

/* the kernel's share: a GETATTR request in the read() buffer */
__attribute__((noinline)) static void kernel_fill(uint32_t k, uint64_t unique)
{
    uint8_t *p = landing[k];
    uint32_t len = VFSDRV_IN_HEADER + GETATTR_IN, opcode = GETATTR;
    uint64_t nodeid = 1 + unique % 100;
    memset(p, 0, len);
    memcpy(p, &len, 4);
    memcpy(p + 4, &opcode, 4);
    memcpy(p + 8, &unique, 8);
    memcpy(p + 16, &nodeid, 8);
}

/* the pump's dispatch() + add_slot() for a batch, then one publish */
__attribute__((noinline)) static int driver_submit(uint32_t batch)
{
    for (uint32_t k = 0; k < batch; k++) {
        const uint8_t *req = landing[k];
        uint32_t len, opcode;
        uint64_t unique;
        memcpy(&len, req, 4);
        memcpy(&opcode, req + 4, 4);
        memcpy(&unique, req + 8, 8);
        uint32_t cap = vfsdrv_reply_capacity(opcode, req + VFSDRV_IN_HEADER,
                                             len - VFSDRV_IN_HEADER, MAX_IO);
        struct slot *s = &slots[k];
        s->req_off = vfsdrv_request_offset(opcode);
        s->reply_off = vfsdrv_reply_offset(s->req_off, len);
        if (s->reply_off + VFSDRV_OUT_HEADER + cap > SLOT_SIZE)
            return -1;
        memcpy(s->host + s->req_off, req, len);  /* landing buffer -> small slot */
        s->unique = unique;
        s->opcode = opcode;
        s->in_len = len;
        s->cap = cap;
        uint64_t base = (uint64_t)(uintptr_t)s->host;
        struct vfsdrv_seg segs[2] = {
            {base + s->req_off, len, 0},
            {base + s->reply_off, VFSDRV_OUT_HEADER + cap, VFSDRV_SEG_WRITE},
        };
        int head = vfsdrv_vq_add(&vq, segs, 2);
        if (head < 0)
            return -1;
        head_slot[head] = k;
    }
    vfsdrv_vq_publish(&vq);  /* the kick decision; the kick itself is a syscall */
    return 0;
}

/* the device's share: answer every GETATTR with a valid reply */
__attribute__((noinline)) static void device_serve(void)
{
    struct rd_chain c;
    while (rd_pop(&dev, &c)) {
        const uint8_t *req = (const uint8_t *)(uintptr_t)c.seg[0].addr;
        uint8_t *rep = (uint8_t *)(uintptr_t)c.seg[1].addr;
        struct vfsdrv_out_header h = {VFSDRV_OUT_HEADER + ATTR_OUT, 0, 0};
        memcpy(&h.unique, req + 8, 8);
        memcpy(rep, &h, sizeof h);
        memset(rep + sizeof h, 0x5a, ATTR_OUT);
        rd_push(&dev, c.head, h.len, c.entries);
    }
}

/* the pump's harvest() + complete(): validate, build the reply's iovec */
__attribute__((noinline)) static int driver_complete(void)
{
    int n = vfsdrv_vq_harvest(&vq, used, MAX_DEPTH);
    if (n < 0)
        return -1;
    for (int k = 0; k < n; k++) {
        struct slot *s = &slots[head_slot[used[k].id]];
        struct vfsdrv_out_header h;
        char why[120];
        int rc = vfsdrv_check_reply(s->host + s->reply_off, used[k].len, s->unique, s->opcode,
                                    s->cap, 0, &h, why, sizeof why);
        if (rc != 0) {
            bad++;
            continue;
        }
        static struct vfsdrv_out_header sent;
        sent = h;
        last_iov[0] = (struct iovec){&sent, sizeof sent};
        last_iov[1] = (struct iovec){s->host + s->reply_off + VFSDRV_OUT_HEADER,
                                     h.len - VFSDRV_OUT_HEADER};
        replies++;
    }
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s split|packed DEPTH N\n", argv[0]);
        return 2;
    }
    int packed = !strcmp(argv[1], "packed");
    uint32_t depth = (uint32_t)atoi(argv[2]), n = (uint32_t)atoi(argv[3]);
    if (depth < 1 || depth > MAX_DEPTH || n < depth) {
        fprintf(stderr, "budget: DEPTH 1..%d, N >= DEPTH\n", MAX_DEPTH);
        return 2;
    }
    rd_ring_init(&ring, 128, packed, 0);
    rd_dev_init(&dev, &ring);
    if (rd_vq_init(&vq, &ring, 1) != 0) {
        fprintf(stderr, "budget: %s\n", vq.error);
        return 1;
    }
    for (uint32_t k = 0; k < depth; k++) {
        slots[k].host = rd_zalloc(SLOT_SIZE);
        landing[k] = rd_zalloc(VFSDRV_PAGE);
    }
    uint64_t unique = 2;
    for (uint32_t done = 0; done < n;) {
        uint32_t batch = n - done < depth ? n - done : depth;
        for (uint32_t k = 0; k < batch; k++, unique += 2)
            kernel_fill(k, unique);
        if (driver_submit(batch) < 0) {
            fprintf(stderr, "budget: submit failed: %s\n", vq.error);
            return 1;
        }
        device_serve();
        int got = driver_complete();
        if (got != (int)batch) {
            fprintf(stderr, "budget: harvested %d of %u: %s\n", got, batch, vq.error);
            return 1;
        }
        done += batch;
    }
    printf("budget: %s ring, depth %u: %llu requests, %llu valid replies, %llu bad\n",
           packed ? "packed" : "split", depth, (unsigned long long)n,
           (unsigned long long)replies, (unsigned long long)bad);
    return replies == n && bad == 0 && last_iov[1].iov_len == ATTR_OUT ? 0 : 1;
}
