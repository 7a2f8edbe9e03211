"""The guest userspace driver: attaches to the ivshmem region and serves the broker."""
