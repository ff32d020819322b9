/* Coverage-guided fuzz target of the native core's validation (issue 10 item 19):
 * the functions that judge what a device hands back.
 *
 *   vfsdrv_check_reply      a reply header and its used length, in a buffer of
 *                           exactly used_len bytes (a read past it is an ASan report)
 *   vfsdrv_vq_harvest       split and packed (also IN_ORDER) rings the fuzzer writes:
 *                           a stateful script of add / publish / used entry / used
 *                           index / harvest operations
 *   vfsdrv_reply_capacity   reply room from request arguments of exactly args_len
 *   vfsdrv_request_offset, vfsdrv_reply_offset
 *
 * Besides the sanitizers, each call's result is checked against the rule it
 * implements (abort() on a breach, which libFuzzer reports as a crash):
 * an accepted reply is one the kernel takes; a harvested entry is a chain that
 * was in flight, once, within its writable length; a refused batch changes
 * nothing; the free count adds up.
 *
 * Built by tests/fuzz/run-fuzz-core.sh: with clang, -fsanitize=fuzzer,address,
 * undefined (libFuzzer); without clang, gcc with -DVFSDRV_RANDOM_MAIN: the main()
 * below feeds random inputs for the given seconds, with no coverage feedback (a
 * weaker search, said so in its output).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfsdrv_core.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "fuzz_core: rule broken at %s:%d: %s\n", __FILE__,      \
                    __LINE__, #cond);                                                \
            abort();                                                                 \
        }                                                                            \
    } while (0)

struct input {
    const uint8_t *p;
    size_t n;
};

static uint32_t take(struct input *in, unsigned bytes)
{
    uint32_t v = 0;
    for (unsigned i = 0; i < bytes; i++) {
        v |= (uint32_t)(in->n ? *in->p : 0) << (8 * i);
        if (in->n) {
            in->p++;
            in->n--;
        }
    }
    return v;
}

static uint64_t take64(struct input *in)
{
    uint64_t lo = take(in, 4);
    return lo | (uint64_t)take(in, 4) << 32;
}

/* ---- vfsdrv_check_reply ------------------------------------------------------- */
static void fuzz_check_reply(struct input *in)
{
    uint32_t used_len = take(in, 2);
    uint64_t unique = take64(in);
    uint32_t opcode = take(in, 1);
    uint32_t cap = take(in, 1) & 1 ? VFSDRV_NO_REPLY : take(in, 3);
    int may_wait = take(in, 1) & 1;
    /* exactly used_len bytes: the device wrote them, nothing beyond is ours */
    uint8_t *reply = malloc(used_len ? used_len : 1);
    if (!reply)
        return;
    size_t have = in->n < used_len ? in->n : used_len;
    memcpy(reply, in->p, have);
    memset(reply + have, 0, used_len - have);
    uint32_t shape = take(in, 1);
    if (used_len >= 16 && shape & 1) {
        /* a structured header (raw bytes rarely make one): the fields a device gets
         * wrong, each from the values that sit on the rules' edges */
        static const int32_t errors[] = {0, 1, -1, -5, -511, -512, -513, -4095, -4096,
                                         2, 0x7fffffff, -0x7fffffff - 1};
        uint32_t e = take(in, 1), l = take(in, 1);
        int32_t error = e & 0x80 ? (int32_t)take(in, 4) : errors[e % 12];
        if (e & 0x40)
            error = -(int32_t)(take(in, 2) % 4200);
        uint32_t len = l & 3 ? (l & 1 ? 16 : used_len) : take(in, 4);
        if (l & 4)
            len = 16 + take(in, 2) % (used_len - 15);
        memcpy(reply, &len, 4);
        memcpy(reply + 4, &error, 4);
        uint64_t u = shape & 2 ? take64(in) : unique;  /* usually the request's unique */
        memcpy(reply + 8, &u, 8);
    }
    struct vfsdrv_out_header copy;
    char why[120];
    memset(why, 'x', sizeof why);
    int rc = vfsdrv_check_reply(reply, used_len, unique, opcode, cap, may_wait, &copy, why,
                                sizeof why);
    CHECK(copy.unique == unique);
    if (rc == 0) {
        if (opcode == 38 && used_len == 0) {  /* FUSE_DESTROY handed back empty */
            CHECK(copy.len == 16 && copy.error == 0);
        } else {
            CHECK(copy.len >= 16 && copy.len <= used_len);
            CHECK(cap == VFSDRV_NO_REPLY || copy.len - 16 <= cap);
            if (copy.error > 0)
                CHECK(copy.error == VFSDRV_LOCK_WAIT && may_wait && copy.len == 16);
            else
                CHECK(copy.error >= -VFSDRV_MAX_REPLY_ERRNO);
            CHECK(copy.error == 0 || copy.len == 16);
            uint32_t hlen;
            int32_t herr;
            memcpy(&hlen, reply, 4);
            memcpy(&herr, reply + 4, 4);
            CHECK(hlen == copy.len && herr == copy.error);  /* forwarded as written */
        }
    } else {
        CHECK(rc == -EIO);
        CHECK(copy.len == 16 && copy.error == -EIO);  /* what the kernel gets instead */
        CHECK(memchr(why, '\0', sizeof why) != NULL);
    }
    free(reply);
}

/* ---- vfsdrv_reply_capacity and the slot layout ------------------------------------ */
static void fuzz_capacity(struct input *in)
{
    uint32_t opcode = take(in, 1);
    uint32_t max_io = take(in, 3) + 1;
    uint32_t args_len = take(in, 1) % 48;
    uint8_t *args = malloc(args_len ? args_len : 1);
    if (!args)
        return;
    for (uint32_t i = 0; i < args_len; i++)
        args[i] = (uint8_t)take(in, 1);
    uint32_t cap = vfsdrv_reply_capacity(opcode, args, args_len, max_io);
    if (opcode == 15 || opcode == 28 || opcode == 44)  /* READ, READDIR(PLUS) */
        CHECK(cap <= max_io);
    CHECK(cap == VFSDRV_NO_REPLY || cap <= (max_io > 4096 ? max_io : 4096));
    free(args);
    uint32_t req_off = vfsdrv_request_offset(opcode);
    CHECK(req_off < VFSDRV_PAGE);
    uint32_t in_len = take(in, 3);  /* requests fit a slot: far below 2^24 */
    uint32_t reply_off = vfsdrv_reply_offset(req_off, in_len);
    CHECK((reply_off + VFSDRV_OUT_HEADER) % VFSDRV_PAGE == 0);
    CHECK(reply_off >= req_off + in_len);
    CHECK(reply_off - (req_off + in_len) < VFSDRV_PAGE);
}

/* ---- rings ---------------------------------------------------------------------- */
#define MAX_SIZE 256

struct ring_model {
    struct vfsdrv_vq vq;
    uint32_t size;
    int packed;
    uint8_t *desc, *avail, *used, *indirect;
    uint8_t in_flight[MAX_SIZE];   /* the harness's own record, never the core's */
    uint32_t writable[MAX_SIZE];
    uint32_t count;
    /* the pretend device */
    uint16_t dev_used_idx;         /* split: used->idx it writes */
    uint16_t dev_pos;              /* packed: next ring position, wrap counter */
    int dev_wrap;
};

static int ring_setup(struct ring_model *r, struct input *in)
{
    memset(r, 0, sizeof *r);
    uint32_t b = take(in, 1);
    r->packed = b & 1;
    r->size = 1u << ((b >> 1) % 9);  /* 1..256 */
    int event_idx = (b >> 5) & 1;
    int indirect = (b >> 6) & 1;
    uint32_t heads = indirect ? r->size : 0;
    if (heads)
        r->indirect = calloc((size_t)heads * VFSDRV_INDIRECT_MAX, 16);
    int rc;
    if (r->packed) {
        r->desc = calloc(r->size, 16);
        r->avail = calloc(1, 4);
        r->used = calloc(1, 4);
        if (!r->desc || !r->avail || !r->used)
            return -1;
        rc = vfsdrv_vq_init_packed(&r->vq, 2, r->size, r->desc, r->avail, r->used,
                                   r->indirect, 0x100000, heads, event_idx);
        r->dev_wrap = 1;
        if (rc == 0 && (b >> 7) & 1)  /* VIRTIO_F_IN_ORDER: one entry completes older ones */
            rc = vfsdrv_vq_set_in_order(&r->vq);
    } else {
        r->desc = calloc(r->size, 16);
        r->avail = calloc(1, 6 + 2 * (size_t)r->size);
        r->used = calloc(1, 6 + 8 * (size_t)r->size);
        if (!r->desc || !r->avail || !r->used)
            return -1;
        rc = vfsdrv_vq_init(&r->vq, 2, r->size, r->desc, r->avail, r->used, r->indirect,
                            0x100000, heads, event_idx);
    }
    CHECK(rc == 0);
    return 0;
}

static void ring_free(struct ring_model *r)
{
    vfsdrv_vq_destroy(&r->vq);
    free(r->desc);
    free(r->avail);
    free(r->used);
    free(r->indirect);
}

static void ring_add(struct ring_model *r, struct input *in)
{
    struct vfsdrv_seg segs[6];
    uint32_t n = 1 + take(in, 1) % 5, readable = take(in, 1) % (n + 1), writable = 0;
    for (uint32_t i = 0; i < n; i++) {
        segs[i].addr = 0x200000 + 0x1000 * (uint64_t)i;
        segs[i].len = take(in, 2);
        segs[i].flags = i >= readable ? VFSDRV_SEG_WRITE : 0;
        if (i >= readable)
            writable += segs[i].len;
    }
    uint16_t free_before = r->vq.num_free;
    int head = vfsdrv_vq_add(&r->vq, segs, n);
    if (head < 0) {
        CHECK(r->vq.num_free == free_before);
        return;
    }
    CHECK((uint32_t)head < r->size);
    CHECK(!r->in_flight[head]);  /* an id still in flight is never handed out again */
    r->in_flight[head] = 1;
    r->writable[head] = writable;
    r->count++;
}

/* the device marks something used: usually a chain in flight (so that harvests
 * succeed and state moves on), sometimes anything at all */
static void ring_use(struct ring_model *r, struct input *in)
{
    uint32_t how = take(in, 1);
    uint32_t id = take(in, 2), len = take(in, 4);
    if (how & 1 && r->count) {
        uint32_t k = id % r->count;
        for (uint32_t i = 0; i < r->size; i++)
            if (r->in_flight[i] && k-- == 0) {
                id = i;
                break;
            }
        if (how & 2)
            len = r->writable[id] ? len % (r->writable[id] + 1) : 0;
    }
    if (r->packed) {
        uint16_t flags = (uint16_t)take(in, 2);
        if (how & 4)  /* a well-formed used descriptor: AVAIL = USED = the wrap counter */
            flags = r->dev_wrap ? (1u << 7) | (1u << 15) : 0;
        uint8_t *d = r->desc + 16 * (size_t)(r->dev_pos % r->size);
        memcpy(d + 8, &len, 4);
        uint16_t id16 = (uint16_t)id;
        memcpy(d + 12, &id16, 2);
        __atomic_store_n((uint16_t *)(d + 14), flags, __ATOMIC_RELEASE);
        uint32_t step = 1;
        if (id < r->size && r->in_flight[id] && r->vq.chain_len && r->vq.chain_len[id])
            step = r->vq.chain_len[id];
        uint32_t pos = r->dev_pos + step;
        if (pos >= r->size) {
            pos -= r->size;
            r->dev_wrap ^= 1;
        }
        r->dev_pos = (uint16_t)(pos % r->size);
    } else {
        uint8_t *e = r->used + 4 + 8 * (size_t)(r->dev_used_idx & (r->size - 1));
        memcpy(e, &id, 4);
        memcpy(e + 4, &len, 4);
        r->dev_used_idx++;
        __atomic_store_n((uint16_t *)(r->used + 2), r->dev_used_idx, __ATOMIC_RELEASE);
    }
}

static void ring_harvest(struct ring_model *r, struct input *in)
{
    struct vfsdrv_used out[MAX_SIZE + 1];
    uint32_t max = 1 + take(in, 1) % (MAX_SIZE + 1);
    uint16_t in_flight = r->vq.in_flight, num_free = r->vq.num_free;
    int rc = vfsdrv_vq_harvest(&r->vq, out, max);
    if (rc < 0) {
        /* -EINVAL: less room than an in-order batch completes (the caller's error) */
        CHECK(rc == -EIO || (rc == -EINVAL && r->vq.in_order && max < in_flight));
        CHECK(r->vq.in_flight == in_flight && r->vq.num_free == num_free);  /* nothing moved */
        CHECK(memchr(r->vq.error, '\0', sizeof r->vq.error) != NULL);
        return;
    }
    CHECK((uint32_t)rc <= max);
    uint8_t seen[MAX_SIZE] = {0};
    for (int i = 0; i < rc; i++) {
        uint32_t id = out[i].id;
        CHECK(id < r->size);
        CHECK(r->in_flight[id]);           /* only a chain that was in flight */
        CHECK(!seen[id]);                  /* once */
        CHECK(out[i].len <= r->writable[id]);  /* within what the device may write */
        seen[id] = 1;
        r->in_flight[id] = 0;
        r->count--;
    }
    CHECK(r->vq.in_flight == r->count);
}

static void fuzz_ring(struct input *in)
{
    struct ring_model r;
    if (ring_setup(&r, in) == 0) {
        for (int steps = 0; in->n && steps < 400; steps++) {
            switch (take(in, 1) % 6) {
            case 0: case 1:
                ring_add(&r, in);
                break;
            case 2:
                vfsdrv_vq_publish(&r.vq);
                break;
            case 3:
                ring_use(&r, in);
                break;
            case 4:
                if (!r.packed) {  /* a used index that jumps anywhere */
                    r.dev_used_idx = (uint16_t)take(in, 2);
                    __atomic_store_n((uint16_t *)(r.used + 2), r.dev_used_idx,
                                     __ATOMIC_RELEASE);
                } else {
                    ring_use(&r, in);
                }
                break;
            default:
                ring_harvest(&r, in);
            }
        }
    }
    ring_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    switch (take(&in, 1) % 3) {
    case 0:
        fuzz_check_reply(&in);
        break;
    case 1:
        fuzz_capacity(&in);
        break;
    default:
        fuzz_ring(&in);
    }
    return 0;
}

#ifdef VFSDRV_RANDOM_MAIN
/* No libFuzzer (no clang): random inputs for argv[1] seconds, no coverage feedback. */
#include <time.h>

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    unsigned seed = argc > 2 ? (unsigned)atoi(argv[2]) : (unsigned)time(NULL);
    srand(seed);
    fprintf(stderr, "fuzz_core: random inputs (no coverage guidance: clang's libFuzzer "
            "is not installed), seed %u, %.0f s\n", seed, seconds);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint8_t buf[4096];
    unsigned long runs = 0;
    do {
        size_t n = (size_t)rand() % sizeof buf;
        for (size_t i = 0; i < n; i++)
            buf[i] = (uint8_t)rand();
        LLVMFuzzerTestOneInput(buf, n);
        runs++;
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((double)(t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
    fprintf(stderr, "fuzz_core: %lu runs, no rule broken\n", runs);
    return 0;
}
#endif
