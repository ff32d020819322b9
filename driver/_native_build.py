"""Build script for vfsdrv._native: the few operations Python cannot express.

Python issues no memory barriers and gives no guarantee about the width of a
store into a memoryview. Rings shared with a device and MMIO registers need both:
  * a release store of avail->idx after the ring entry (the device must not see
    the index before the entry), an acquire load of used->idx before reading the
    used entries, and a full fence between publishing avail->idx and reading
    avail_event/flags (store->load ordering, which even x86 TSO does not give);
  * single, naturally sized, volatile accesses to device registers.
On x86-64 these are plain moves plus mfence; on aarch64 "dmb osh" barriers, which
order against a DMA master as well as other CPUs (the barriers "suitable for
hardware devices" that VIRTIO_F_ORDER_PLATFORM asks for).
"""

from cffi import FFI

CDEF = """
void vfsdrv_mb(void);
void vfsdrv_rmb(void);
void vfsdrv_wmb(void);
uint16_t vfsdrv_load_acquire_u16(void *p);
void vfsdrv_store_release_u16(void *p, uint16_t v);
uint32_t vfsdrv_load_acquire_u32(void *p);
uint8_t vfsdrv_mmio_read8(void *p);
uint16_t vfsdrv_mmio_read16(void *p);
uint32_t vfsdrv_mmio_read32(void *p);
void vfsdrv_mmio_write8(void *p, uint8_t v);
void vfsdrv_mmio_write16(void *p, uint16_t v);
void vfsdrv_mmio_write32(void *p, uint32_t v);
"""

SOURCE = r"""
#include <stdint.h>
/* Fences. On aarch64 the device (a DMA master) is in the outer-shareable domain, so
 * the barriers are "dmb osh*" (what Linux's dma_*mb() use for VIRTIO_F_ORDER_PLATFORM),
 * which also order against other CPUs. Elsewhere (x86-64: TSO, mfence for store->load)
 * the C11 fences are enough for both. */
#if defined(__aarch64__)
#define VFSDRV_MB()  __asm__ __volatile__("dmb osh" ::: "memory")
#define VFSDRV_RMB() __asm__ __volatile__("dmb oshld" ::: "memory")
#define VFSDRV_WMB() __asm__ __volatile__("dmb oshst" ::: "memory")
#else
#define VFSDRV_MB()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define VFSDRV_RMB() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define VFSDRV_WMB() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif
static void vfsdrv_mb(void) { VFSDRV_MB(); }
static void vfsdrv_rmb(void) { VFSDRV_RMB(); }
static void vfsdrv_wmb(void) { VFSDRV_WMB(); }
/* release: every earlier store is visible to the device before this one */
static void vfsdrv_store_release_u16(void *p, uint16_t v)
{ VFSDRV_WMB(); __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
/* acquire: no later load is satisfied before this one */
static uint16_t vfsdrv_load_acquire_u16(void *p)
{ uint16_t v = __atomic_load_n((uint16_t *)p, __ATOMIC_RELAXED); VFSDRV_RMB(); return v; }
static uint32_t vfsdrv_load_acquire_u32(void *p)
{ uint32_t v = __atomic_load_n((uint32_t *)p, __ATOMIC_RELAXED); VFSDRV_RMB(); return v; }
/* MMIO: volatile, naturally sized, ordered after earlier ring writes by a full fence. */
static uint8_t vfsdrv_mmio_read8(void *p) { VFSDRV_MB(); return *(volatile uint8_t *)p; }
static uint16_t vfsdrv_mmio_read16(void *p) { VFSDRV_MB(); return *(volatile uint16_t *)p; }
static uint32_t vfsdrv_mmio_read32(void *p) { VFSDRV_MB(); return *(volatile uint32_t *)p; }
static void vfsdrv_mmio_write8(void *p, uint8_t v) { VFSDRV_MB(); *(volatile uint8_t *)p = v; }
static void vfsdrv_mmio_write16(void *p, uint16_t v) { VFSDRV_MB(); *(volatile uint16_t *)p = v; }
static void vfsdrv_mmio_write32(void *p, uint32_t v) { VFSDRV_MB(); *(volatile uint32_t *)p = v; }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vfsdrv._native", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
