"""Shared-memory transport: regions, their fixed layout, and lock-free rings.

Knows nothing of clipboards, files or VMs; `broker` and `guestdrv` build on it.
"""
