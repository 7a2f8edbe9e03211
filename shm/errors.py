"""The one error hierarchy of ivclip.

Every exception ivclip raises on purpose derives from :class:`IvclipError`::

    IvclipError
    ├── ShmError                   shared-memory transport (this package)
    │   ├── RegionError            a region cannot be created, opened or mapped
    │   │   ├── RegionBusyError    another live broker holds the region's lock
    │   │   └── BackingLostError   the file under a mapping shrank (a SIGBUS was caught)
    │   ├── LayoutError            a mapped region does not carry a valid ivclip header
    │   └── RingCorruptError       the peer wrote ring indices or a record that cannot be valid
    ├── ProtocolError              (protocol.errors) the clipboard protocol
    │   ├── LocalProtocolError     we asked for something the state does not allow
    │   ├── RemoteProtocolError    the peer sent something invalid
    │   └── ClipFormatError        typed clipboard content is malformed (protocol.clipformat)
    ├── ControlError               (control.errors) local control sockets and their requests
    ├── ClipboardError             (guestdrv.errors) the guest's X11 or Wayland clipboard failed
    │   ├── ClipboardTooLarge      it holds more than the limit
    │   ├── ClipboardUnsupported   the desktop lacks it (a compositor without data-control)
    │   ├── WaylandProtocolError   the compositor sent what the Wayland protocol forbids
    │   └── CompositorError        the compositor reported a fatal error of ours
    └── ConfigError                (broker.errors) bad command line or policy

"Remote" errors (LayoutError, RingCorruptError, RemoteProtocolError) mean the
other side wrote something invalid; the broker turns each of them into one
decision at one place: mark that VM faulty and re-initialise its region.
"""


class IvclipError(Exception):
    """Root of every error ivclip raises on purpose."""


class ShmError(IvclipError):
    """An error of the shared-memory transport."""


class RegionError(ShmError):
    """A region cannot be created, opened, locked or mapped."""


class RegionBusyError(RegionError):
    """Another live process (a broker) holds the region's lock."""


class BackingLostError(RegionError):
    """An access to a mapping hit a page past the end of its (truncated) backing file.

    Raised instead of dying of SIGBUS, by :class:`shm.memory.GuardedBuffer`;
    `buffer` is the one whose mapping lost its pages (for a copy between two
    mappings, the side that faulted).
    """

    def __init__(self, message: str, buffer: object = None) -> None:
        super().__init__(message)
        self.buffer = buffer


class LayoutError(ShmError):
    """A mapped region does not hold a valid, current ivclip header."""


class RingCorruptError(ShmError):
    """Ring indices or a record header read from shared memory cannot be valid.

    Raised by the side that validates what its peer wrote; the ring must not be
    used again until it is re-initialised.
    """
