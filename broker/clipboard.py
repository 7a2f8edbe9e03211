"""The global clipboard: held only in the broker's private memory, never on disk."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class GlobalClipboard:
    """What the last copy gesture took, until a paste gesture hands it on and wipes it."""

    data: bytearray | None = field(default=None, repr=False)
    source: str = ""
    copied_at: float = 0.0  # wall-clock time, for status only
    types: list[tuple[str, int]] = field(default_factory=list)
    """(MIME type, size) of each item, from the validated container header."""

    @property
    def size(self) -> int:
        return 0 if self.data is None else len(self.data)

    @property
    def empty(self) -> bool:
        return self.data is None

    @property
    def content_size(self) -> int:
        """The bytes of the items, without the container's header."""
        return sum(size for _, size in self.types)

    def take(self, data: bytearray, source: str, types: list[tuple[str, int]]) -> None:
        """Replace the content (the old content is wiped first)."""
        self.wipe()
        self.data = data
        self.source = source
        self.types = types
        self.copied_at = time.time()

    def wipe(self) -> None:
        """Overwrite the content in place, then drop it."""
        if self.data is not None:
            # Same length, so this works even while a paste still holds views of it.
            self.data[:] = bytes(len(self.data))
        self.data = None
        self.source = ""
        self.types = []
        self.copied_at = 0.0
