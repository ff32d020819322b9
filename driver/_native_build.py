"""Build script for vfsdrv._native: the few operations Python cannot express.

Python issues no memory barriers and gives no guarantee about the width of a
store into a memoryview. Rings shared with a device and MMIO registers need both:
  * a release store of avail->idx after the ring entry (the device must not see
    the index before the entry), an acquire load of used->idx before reading the
    used entries, and a full fence between publishing avail->idx and reading
    avail_event/flags (store->load ordering, which even x86 TSO does not give);
  * single, naturally sized, volatile accesses to device registers.
C11 atomics compile to plain moves plus mfence on x86-64 and to stlr/ldar/dmb on
aarch64, which is what the virtio spec's "suitable memory barrier" asks for.
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
static void vfsdrv_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static void vfsdrv_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static void vfsdrv_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static uint16_t vfsdrv_load_acquire_u16(void *p)
{ return __atomic_load_n((uint16_t *)p, __ATOMIC_ACQUIRE); }
static void vfsdrv_store_release_u16(void *p, uint16_t v)
{ __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
static uint32_t vfsdrv_load_acquire_u32(void *p)
{ return __atomic_load_n((uint32_t *)p, __ATOMIC_ACQUIRE); }
/* MMIO: volatile, naturally sized, ordered against earlier ring writes by a full fence. */
static uint8_t vfsdrv_mmio_read8(void *p)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); return *(volatile uint8_t *)p; }
static uint16_t vfsdrv_mmio_read16(void *p)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); return *(volatile uint16_t *)p; }
static uint32_t vfsdrv_mmio_read32(void *p)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); return *(volatile uint32_t *)p; }
static void vfsdrv_mmio_write8(void *p, uint8_t v)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); *(volatile uint8_t *)p = v; }
static void vfsdrv_mmio_write16(void *p, uint16_t v)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); *(volatile uint16_t *)p = v; }
static void vfsdrv_mmio_write32(void *p, uint32_t v)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); *(volatile uint32_t *)p = v; }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vfsdrv._native", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
