"""vfsdrv.pci: PCI functions through VFIO, with no knowledge of virtio.

Modules, one job each:
  vfio       the VFIO/iommufd ABI: cffi structs (layout-tested), ioctl numbers, ioctl()
  sysfs      addresses, identity, IOMMU groups, driver binding (driver_override) + restore
  container  the group/container API: type1v2 and no-IOMMU; the IommuContext interface
  iommufd    the iommufd + device cdev path
  device     VfioPciDevice: config space, BAR windows (never over the MSI-X table),
             memory/bus-master enable, reset, MSI-X and request IRQs as eventfds
  dma        pinned DMA memory: huge or 4 KiB pages, pagemap physical addresses,
             identity (IOVA == PA) or contiguous IOVA mappings, translate(offset)
  config     generic config-space parsing (capability list, MSI-X)
  function   the PciFunction interface and natural-width RegisterWindows
  resource   read-only inspection through sysfs (config + resourceN)
  emulated   an in-memory PciFunction for tests
  errors     the errors a user meets, each with its fix

Typical use goes through the virtio-pci transport::

    from vfsdrv.tools.pci_functions import find_by_tag, open_fs_function
    transport = open_fs_function(find_by_tag("myfs"))     # binds to vfio-pci if needed
    ...                                           # VirtioFs(transport).start()
    transport.close()
    Sysfs().unbind_vfio(bdf)                      # back to virtio-pci
"""
