/* The one notify rule of the pump (pump.c) and the hiprio sender (hiprio.c), for
 * the C side only (not read by cffi): an eventfd write (vhost-user), or an MMIO
 * store of `notify_value`, 16 or 32 bits, to `notify_addr` (PCI; vfsdrv_mmio_write*
 * fence first, so the ring writes before it reach the device first). 0, or -errno
 * of the write. Static inline: -fPIC keeps a global function out of line (it could
 * be interposed), and the pump calls it once per round. */
#ifndef VFSDRV_KICK_H
#define VFSDRV_KICK_H

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

/* include vfsdrv_core.h first: it has no include guard (cffi cannot parse one) */

static inline int vfsdrv_kick(int32_t kick_fd, uint8_t *notify_addr, uint32_t notify_value,
                              uint32_t notify_width)
{
    if (kick_fd >= 0) {
        uint64_t one = 1;
        /* EAGAIN: the counter is full, so the device has a kick pending anyway */
        if (write(kick_fd, &one, 8) < 0 && errno != EAGAIN)
            return -errno;
    } else if (notify_width == 4) {
        vfsdrv_mmio_write32(notify_addr, notify_value);
    } else {
        vfsdrv_mmio_write16(notify_addr, (uint16_t)notify_value);
    }
    return 0;
}

#endif
