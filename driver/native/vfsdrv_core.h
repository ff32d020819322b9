/* vfsdrv's native core: the declarations shared by C and Python.
 *
 * This file is read twice: by the C compiler (every .c file here includes it) and by
 * cffi's cdef (driver/_native_build.py), so every struct is declared exactly once.
 * It must stay in the subset of C that cffi parses: no #include, no #if, only
 * integer #defines. tests/test_native_layout.py pins the layouts.
 */

/* ---- memory ordering and device registers (see barriers in core.c) ---- */
void vfsdrv_mb(void);
void vfsdrv_rmb(void);
void vfsdrv_wmb(void);
uint16_t vfsdrv_load_acquire_u16(void *p);
void vfsdrv_store_release_u16(void *p, uint16_t v);
void vfsdrv_store_u16(void *p, uint16_t v);
uint32_t vfsdrv_load_acquire_u32(void *p);
uint8_t vfsdrv_mmio_read8(void *p);
uint16_t vfsdrv_mmio_read16(void *p);
uint32_t vfsdrv_mmio_read32(void *p);
void vfsdrv_mmio_write8(void *p, uint8_t v);
void vfsdrv_mmio_write16(void *p, uint16_t v);
void vfsdrv_mmio_write32(void *p, uint32_t v);

/* ---- split virtqueue, driver side (virtio 1.2 2.7) ---- */
#define VFSDRV_INDIRECT_MAX 64
#define VFSDRV_SEG_WRITE 2
#define VFSDRV_ERROR_LEN 200

struct vfsdrv_seg {
    uint64_t addr;
    uint32_t len;
    uint32_t flags;          /* VFSDRV_SEG_WRITE: device-writable */
};

struct vfsdrv_used {
    uint32_t id;             /* head descriptor of the chain */
    uint32_t len;            /* bytes the device says it wrote */
};

struct vfsdrv_vq {
    uint8_t *desc;           /* descriptor table, avail ring, used ring (host pointers) */
    uint8_t *avail;
    uint8_t *used;
    uint8_t *indirect;       /* indirect_heads * VFSDRV_INDIRECT_MAX descriptors, or NULL */
    uint64_t indirect_addr;  /* device address of indirect */
    uint32_t indirect_heads; /* heads below this have a table; the others chain directly */
    uint16_t *next;          /* shadow free list: the device's view is never read back */
    uint16_t *chain_len;     /* ring descriptors held by each head; 0 = not in flight */
    uint32_t *writable;      /* device-writable bytes of each head's chain */
    uint32_t *seen;          /* batch stamp per head: a duplicate used id in one batch */
    uint32_t seen_gen;
    uint16_t size;
    uint16_t index;
    uint16_t free_head;
    uint16_t num_free;
    uint16_t avail_idx;      /* next avail->idx (free-running) */
    uint16_t published;      /* avail->idx the device has been shown */
    uint16_t last_used;
    uint16_t in_flight;
    uint8_t event_idx;
    uint8_t use_indirect;
    uint8_t interrupts_on;
    uint8_t pad;
    char error[200];         /* why the last call failed */
    /* packed ring (VIRTIO_F_RING_PACKED, virtio 1.2 2.8; packed.c): desc is the
     * descriptor ring, avail the driver event area, used the device event area;
     * next/free_head are the free buffer ids, chain_len the ring entries an id holds,
     * avail_idx/published count entries made available/notified (16-bit) */
    uint8_t packed;
    uint8_t avail_wrap;      /* wrap counter of next_avail (starts at 1) */
    uint8_t used_wrap;       /* wrap counter of next_used (starts at 1) */
    uint8_t pad2;
    uint16_t next_avail;     /* ring position of the next entry the driver writes */
    uint16_t next_used;      /* ring position of the next used entry */
    uint8_t in_order;        /* VIRTIO_F_IN_ORDER: a used entry completes every older buffer */
    uint8_t pad3;
    uint16_t order_head;     /* in_order: slot in order[] of the oldest buffer in flight */
    uint16_t *order;         /* in_order: buffer ids in the order they were made available */
};

int vfsdrv_vq_init(struct vfsdrv_vq *vq, uint32_t index, uint32_t size, uint8_t *desc,
                   uint8_t *avail, uint8_t *used, uint8_t *indirect, uint64_t indirect_addr,
                   uint32_t indirect_heads, int event_idx);
void vfsdrv_vq_destroy(struct vfsdrv_vq *vq);
int vfsdrv_vq_add(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n);
int vfsdrv_vq_publish(struct vfsdrv_vq *vq);
int vfsdrv_vq_used_pending(struct vfsdrv_vq *vq);
int vfsdrv_vq_harvest(struct vfsdrv_vq *vq, struct vfsdrv_used *out, uint32_t max);
int vfsdrv_vq_arm(struct vfsdrv_vq *vq);
void vfsdrv_vq_disarm(struct vfsdrv_vq *vq);

/* packed virtqueue: vfsdrv_vq_init_packed sets it up; every vfsdrv_vq_* call above
 * then works on it (core.c hands it to the vfsdrv_packed_* below) */
int vfsdrv_vq_init_packed(struct vfsdrv_vq *vq, uint32_t index, uint32_t size, uint8_t *ring,
                          uint8_t *driver_event, uint8_t *device_event, uint8_t *indirect,
                          uint64_t indirect_addr, uint32_t indirect_heads, int event_idx);
int vfsdrv_vq_set_in_order(struct vfsdrv_vq *vq);
int vfsdrv_packed_add(struct vfsdrv_vq *vq, const struct vfsdrv_seg *segs, uint32_t n);
int vfsdrv_packed_publish(struct vfsdrv_vq *vq);
int vfsdrv_packed_used_pending(struct vfsdrv_vq *vq);
int vfsdrv_packed_harvest(struct vfsdrv_vq *vq, struct vfsdrv_used *out, uint32_t max);
int vfsdrv_packed_arm(struct vfsdrv_vq *vq);
void vfsdrv_packed_disarm(struct vfsdrv_vq *vq);

/* ---- FUSE rules: reply room, request layout, reply validation ---- */
#define VFSDRV_PAGE 4096
#define VFSDRV_IN_HEADER 40
#define VFSDRV_OUT_HEADER 16
#define VFSDRV_WRITE_HEADERS 80
#define VFSDRV_LOCK_WAIT 1
#define VFSDRV_MAX_REPLY_ERRNO 511
#define VFSDRV_NO_REPLY 4294967295

struct vfsdrv_in_header {     /* fuse_in_header: what the device reads first */
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid;
    uint32_t gid;
    uint32_t pid;
    uint16_t total_extlen;
    uint16_t padding;
};

struct vfsdrv_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

uint32_t vfsdrv_reply_capacity(uint32_t opcode, const uint8_t *args, uint32_t args_len,
                               uint32_t max_io);
uint32_t vfsdrv_request_offset(uint32_t opcode);
uint32_t vfsdrv_reply_offset(uint32_t request_off, uint32_t in_len);
int vfsdrv_check_reply(const uint8_t *reply, uint32_t used_len, uint64_t unique,
                       uint32_t opcode, uint32_t cap, int may_wait,
                       struct vfsdrv_out_header *copy, char *why, uint32_t why_len);
int vfsdrv_valid_errno(int32_t error);
int vfsdrv_may_take_long(uint32_t opcode);
int vfsdrv_may_hold_queue(uint32_t opcode);

/* ---- the request pump: /dev/fuse <-> one request queue, one thread ---- */
#define VFSDRV_SLOT_FREE 0
#define VFSDRV_SLOT_RING 1
#define VFSDRV_SLOT_CONTROL 2
#define VFSDRV_SLOT_PENDING 3  /* read by the pump, waiting for room on the ring */
#define VFSDRV_SLOT_DISCARD 1

struct vfsdrv_slot {
    uint8_t *host;           /* page-aligned host address */
    uint64_t addr;           /* device address of byte 0 when contiguous */
    uint64_t *pages;         /* device address of each 4 KiB page, or NULL (contiguous) */
    uint32_t size;
    uint32_t large;
    uint64_t unique;         /* the request it carries */
    uint32_t opcode;
    uint32_t in_len;
    uint32_t req_off;
    uint32_t reply_off;
    uint32_t cap;
    int32_t fd;              /* the /dev/fuse descriptor that read it (gets the reply) */
    uint32_t state;          /* VFSDRV_SLOT_* */
    uint32_t flags;          /* VFSDRV_SLOT_DISCARD: the reply goes nowhere */
    uint64_t seq;            /* pump: its request count when this one was read (age
                              * order for -o request_timeout) */
};

struct vfsdrv_pump_config {
    int32_t fuse_fd;         /* blocking: read when nothing is in flight */
    int32_t fuse_nb_fd;      /* O_NONBLOCK clone of the same connection: read when busy */
    int32_t irq_fd;          /* used-buffer eventfd; -1: look at the ring every poll_ms */
    int32_t kick_fd;         /* eventfd kick; -1: MMIO store to notify_addr */
    int32_t event_fd;        /* the pump writes it when events wait for the control plane */
    int32_t poll_ms;
    uint8_t *notify_addr;
    uint32_t notify_value;
    uint32_t notify_width;   /* 2 or 4 */
    uint32_t max_io;
    uint32_t lock_wait;      /* SETLKW may be answered "wait" (notification queue on) */
    uint32_t small_size;
    uint32_t trace;          /* an event per request and reply (vfsdrv mount -d) */
    uint32_t poll_ns;        /* spin this long before sleeping: on the used ring when
                              * busy, on /dev/fuse when idle (vfsdrv mount -o
                              * poll_us=N); 0: never spin */
    uint32_t io_uring;       /* 1: a round's replies go out in one io_uring_enter when
                              * the kernel has io_uring (vfsdrv mount -o io_uring=0:
                              * a writev each) */
};

#define VFSDRV_EV_REQUEST 1
#define VFSDRV_EV_LOCK_WAIT 2
#define VFSDRV_EV_BAD_REPLY 3
#define VFSDRV_EV_BAD_REQUEST 4
#define VFSDRV_EV_TRACE_REQUEST 5
#define VFSDRV_EV_TRACE_REPLY 6
#define VFSDRV_EV_NO_IO_URING 7   /* the kernel refused a submission: a writev each from now */

struct vfsdrv_event {
    uint32_t kind;           /* VFSDRV_EV_* */
    uint32_t slot;           /* EV_REQUEST: the slot now held by the control plane */
    uint64_t unique;
    uint32_t opcode;
    int32_t fd;
    uint32_t len;
    int32_t error;
    uint64_t arg;            /* TRACE_REQUEST: nodeid; TRACE_REPLY: -error */
    char why[120];
};

struct vfsdrv_pump_stats {
    uint64_t requests;       /* read from /dev/fuse */
    uint64_t replies;        /* written to /dev/fuse */
    uint64_t bad_replies;
    uint64_t to_control;
    uint64_t lock_waits;
    uint64_t kicks;
    uint64_t wakeups;
    uint64_t syscalls;
    uint64_t eagain;
    uint64_t queue_full;
    uint64_t write_errors;
    uint64_t stalls;         /* times reading stopped for want of a slot or ring room */
    uint64_t in_flight;
    uint64_t hiprio;         /* FORGET/BATCH_FORGET handed to the hiprio sender */
    uint64_t polls;          /* spins (poll_ns) that found a completion */
    uint64_t poll_misses;    /* spins, either kind, that ran out of time (then a sleep) */
    uint64_t idle_polls;     /* idle spins (poll_ns) that found a request */
    uint64_t done_seq;       /* the highest slot seq answered so far (not a count) */
    uint64_t reply_batches;  /* io_uring_enter rounds that wrote replies */
    uint64_t batched_replies;  /* replies written by them */
};

#define VFSDRV_PUMP_STOPPED 0
#define VFSDRV_PUMP_CONN_GONE 1
#define VFSDRV_PUMP_BROKEN 2
#define VFSDRV_PUMP_FUSE_ERROR 3
#define VFSDRV_PUMP_KICK_FAILED 4

struct vfsdrv_pump;
struct vfsdrv_pump *vfsdrv_pump_new(const struct vfsdrv_pump_config *cfg, struct vfsdrv_vq *vq,
                                    struct vfsdrv_slot *slots, uint32_t nslots,
                                    char *err, uint32_t err_len);
int vfsdrv_pump_run(struct vfsdrv_pump *p);
void vfsdrv_pump_stop(struct vfsdrv_pump *p);
int vfsdrv_pump_running(struct vfsdrv_pump *p);
uint32_t vfsdrv_pump_events(struct vfsdrv_pump *p, struct vfsdrv_event *out, uint32_t max);
void vfsdrv_pump_give(struct vfsdrv_pump *p, uint32_t slot, uint32_t forward);
int vfsdrv_pump_has_setlkw(struct vfsdrv_pump *p, uint64_t unique);
uint64_t vfsdrv_pump_oldest(struct vfsdrv_pump *p);
uint32_t vfsdrv_pump_holding(struct vfsdrv_pump *p);
void vfsdrv_pump_get_stats(struct vfsdrv_pump *p, struct vfsdrv_pump_stats *out);
const char *vfsdrv_pump_error(struct vfsdrv_pump *p);
int vfsdrv_pump_io_uring(struct vfsdrv_pump *p);  /* 1: replies are batched (now) */
void vfsdrv_pump_free(struct vfsdrv_pump *p);

/* ---- the hiprio sender: FORGET, BATCH_FORGET, INTERRUPT on queue 0 (hiprio.c) ----
 * One owner of the hiprio ring, shared by the pumps and the control thread under a
 * mutex. Requests are copied into DMA buffers (one device-readable segment each; no
 * reply) and published by vfsdrv_hiprio_flush; buffers come back lazily when a
 * later send harvests the used ring (hiprio interrupts stay off). */
struct vfsdrv_hiprio_buf {
    uint8_t *host;           /* page-aligned host address */
    uint64_t addr;           /* device address (buf_size bytes, device-contiguous) */
};

struct vfsdrv_hiprio_config {
    int32_t kick_fd;         /* eventfd kick; -1: MMIO store to notify_addr */
    uint32_t notify_value;
    uint8_t *notify_addr;
    uint32_t notify_width;   /* 2 or 4 */
    uint32_t buf_size;       /* bytes in each buffer: at most VFSDRV_PAGE */
};

struct vfsdrv_hiprio_stats {
    uint64_t sent;           /* requests put on the ring (BATCH_FORGET pieces each count) */
    uint64_t flushes;        /* publishes that exposed something */
    uint64_t kicks;
    uint64_t full;           /* sends refused for want of a buffer or ring room */
    uint64_t reclaimed;      /* buffers the device gave back */
    uint64_t in_flight;
};

/* the splitting rule: how many requests of at most `limit` bytes carry `req` (1: as
 * it is; more: BATCH_FORGET pieces, the same header, count forgets each; 0: it
 * cannot be sent), and piece k of them, written to out (limit bytes of room) */
uint32_t vfsdrv_hiprio_pieces(const uint8_t *req, uint32_t len, uint32_t limit);
uint32_t vfsdrv_hiprio_piece(const uint8_t *req, uint32_t len, uint32_t limit, uint32_t k,
                             uint8_t *out);

struct vfsdrv_hiprio;
struct vfsdrv_hiprio *vfsdrv_hiprio_new(const struct vfsdrv_hiprio_config *cfg,
                                        struct vfsdrv_vq *vq,
                                        const struct vfsdrv_hiprio_buf *bufs, uint32_t nbufs,
                                        char *err, uint32_t err_len);
/* 0: queued (every piece); -ENOSPC: nothing queued, try later; -EMSGSIZE: cannot be
 * sent (too big, not a BATCH_FORGET); -EIO: the sender is broken */
int vfsdrv_hiprio_send(struct vfsdrv_hiprio *h, const uint8_t *req, uint32_t len);
/* publish what was queued, kick unless suppressed. 1: kicked, 0: no kick, -EIO: broken */
int vfsdrv_hiprio_flush(struct vfsdrv_hiprio *h);
/* harvest the used ring: buffers given back, or -EIO (broken) */
int vfsdrv_hiprio_reclaim(struct vfsdrv_hiprio *h);
/* 1 and why (into out) once broken, else 0 */
int vfsdrv_hiprio_error(struct vfsdrv_hiprio *h, char *out, uint32_t out_len);
void vfsdrv_hiprio_get_stats(struct vfsdrv_hiprio *h, struct vfsdrv_hiprio_stats *out);
void vfsdrv_hiprio_free(struct vfsdrv_hiprio *h);
/* before vfsdrv_pump_run: FORGET and BATCH_FORGET go to `h` (NULL: to the control plane) */
void vfsdrv_pump_set_hiprio(struct vfsdrv_pump *p, struct vfsdrv_hiprio *h);

/* ---- the typed client's batched path (client.c): a batch per call ----
 * The caller owns the slot table (struct vfsdrv_slot above; contiguous slots) and
 * one head_slot array per queue (queue size entries, VFSDRV_CLIENT_NONE when the
 * head carries no slot of the table). */
#define VFSDRV_CLIENT_NONE 4294967295

struct vfsdrv_creq {         /* one request to add */
    uint32_t slot;           /* index into the slot table: a free slot */
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid;
    uint32_t gid;
    uint32_t pid;
    uint32_t body_len;       /* its body: the next body_len bytes of `bodies` */
};

struct vfsdrv_cdone {        /* one used entry harvested */
    uint32_t slot;           /* VFSDRV_CLIENT_NONE: a chain added another way */
    uint32_t head;
    uint32_t len;            /* bytes the device says it wrote */
    int32_t error;           /* the validated copy's error (-EIO for a bad reply) */
    uint32_t payload_off;    /* the payload, where it lies in the slot */
    uint32_t payload_len;
    uint32_t bad;            /* 1: vfsdrv_check_reply refused the reply (why says why) */
    uint32_t pad;
};

/* write, size and chain each request (status[k]: its head, -ENOSPC: written but the
 * ring is full, any other -errno: not added, not for this path); publish once when
 * `publish`, *kick = 1 when the device wants a kick. Returns how many were added, or
 * -EINVAL (vq->error) */
int vfsdrv_client_add(struct vfsdrv_vq *vq, struct vfsdrv_slot *slots, uint32_t nslots,
                      uint32_t *head_slot, const struct vfsdrv_creq *reqs, uint32_t n,
                      const uint8_t *bodies, uint32_t bodies_len, uint32_t max_io,
                      int32_t *status, int publish, int32_t *kick);
/* every used entry (at most max), each reply of this path checked: count, or -errno
 * (vq->error says why; the ring's own faults as vfsdrv_vq_harvest reports them) */
int vfsdrv_client_harvest(struct vfsdrv_vq *vq, struct vfsdrv_slot *slots, uint32_t nslots,
                          uint32_t *head_slot, struct vfsdrv_used *used,
                          struct vfsdrv_cdone *out, uint32_t max, char *why, uint32_t why_len);
