"""The filesystem side of file transfers, shared by the broker and the guest driver.

* :mod:`filexfer.sender` -- scan the sources (counts, notices, problems), then
  stream them as protocol.filestream records, and delete them after a
  confirmed ``--move``;
* :mod:`filexfer.receiver` -- write an incoming stream, trusting nothing;
* :mod:`filexfer.fsops` -- the few calls Python lacks (``renameat2`` with
  RENAME_NOREPLACE, ``syncfs``) and removing a tree through directory
  descriptors.

Dependencies: this package uses :mod:`protocol` only, so both ``broker`` and
``guestdrv`` can use it without depending on each other.
"""
