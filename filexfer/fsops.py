"""Filesystem calls Python lacks, and descriptor-relative helpers.

Every directory below a trusted starting point is opened with
``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor, so a
symbolic link planted anywhere on the way is never followed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""How every directory below a trusted starting point is opened."""
_RENAME_NOREPLACE = 1

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not glibc-like: fall back below
    _libc = None


def open_dir(name: bytes | str, dir_fd: int) -> int:
    """Open the directory `name` inside `dir_fd` without following a symbolic link.

    Raises:
        OSError: ELOOP/ENOTDIR when it is a link or not a directory, and the usual others.
    """
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def exists(name: bytes, dir_fd: int) -> bool:
    """Whether anything (a dangling link included) has this name in `dir_fd`."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def rename_noreplace(src_fd: int, src: bytes, dst_fd: int, dst: bytes) -> None:
    """Rename, failing with FileExistsError when `dst` exists (never overwrites).

    Uses renameat2(RENAME_NOREPLACE).  Where the kernel or filesystem lacks it,
    a check then a rename: only a process racing us in the destination folder
    could slip in between, and the folder is the receiver's own.

    Raises:
        FileExistsError: `dst` exists.
        OSError: the rename failed otherwise.
    """
    if _libc is not None and hasattr(_libc, "renameat2"):
        if _libc.renameat2(src_fd, src, dst_fd, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    if exists(dst, dst_fd):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def syncfs(fd: int) -> None:
    """Flush the filesystem holding `fd` to stable storage (all of them where syncfs is missing).

    Raises:
        OSError: the flush failed (an I/O error: the data may not be on disk).
    """
    if _libc is not None and hasattr(_libc, "syncfs"):
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return
    os.sync()


def remove_tree(name: bytes, dir_fd: int) -> None:
    """Remove `name` inside `dir_fd` and everything below it, never following a link.

    A directory is made 0700 before it is opened: the stream set the modes, and
    one without u+r cannot be listed, one without u+wx not emptied.  The depth
    is bounded by what we created (protocol.filestream.MAX_DEPTH).

    Raises:
        OSError: something could not be removed.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if st.st_mode & 0o700 != 0o700:
        chmod_dir(name, dir_fd, 0o700)
    fd = open_dir(name, dir_fd)
    try:
        for child in os.listdir(fd):
            remove_tree(os.fsencode(child), fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def chmod_dir(name: bytes, dir_fd: int, mode: int) -> None:
    """Set the mode of the directory `name` inside `dir_fd`, which we may not be able to read.

    It is opened with O_PATH (no permission on it needed) and O_NOFOLLOW, so a
    link is never followed; fchmod refuses an O_PATH descriptor, so the mode is
    set through its /proc link, which names exactly the directory opened.

    Raises:
        OSError: ELOOP/ENOTDIR when it is a link or not a directory, ENOENT when
            /proc is not mounted, and the usual others.
    """
    fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)
