"""How a VM attaches its region: QEMU options and the libvirt <shmem> element."""

from __future__ import annotations

from broker.names import check_vm_name, memdev_id, shm_path


def qemu_args(vm: str, size: int, prefix: str = "ivclip-") -> list[str]:
    """The QEMU options that give `vm` its region as an ivshmem-plain device."""
    check_vm_name(vm)
    backend = (
        f"memory-backend-file,id={memdev_id(vm)},size={size},"
        f"mem-path={shm_path(vm, prefix)},share=on"
    )
    return ["-object", backend, "-device", f"ivshmem-plain,memdev={memdev_id(vm)}"]


def libvirt_xml(vm: str, size: int, prefix: str = "ivclip-") -> str:
    """The <shmem> element for the VM's domain XML (libvirt maps /dev/shm/<name>)."""
    check_vm_name(vm)
    name = shm_path(vm, prefix).name
    return (
        f"<shmem name='{name}'>\n"
        "  <model type='ivshmem-plain'/>\n"
        f"  <size unit='M'>{size >> 20}</size>\n"
        "</shmem>"
    )
