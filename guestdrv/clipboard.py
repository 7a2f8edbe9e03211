"""Guest clipboard backends: headless (in the driver), X11 (our selection owner, xclip) and
Wayland (our data-control owner, wl-clipboard).

A backend reads the guest's clipboard as a list of typed items (the
preferred first) and installs a paste.  Reading drives the standard
command-line tools rather than speaking X11 or Wayland here: xclip implements
the incremental (INCR) transfers that large X11 selections need, and
wl-clipboard is the reference client for the Wayland data-control protocols.

On X11 a paste is served by our own CLIPBOARD selection owner
(:mod:`guestdrv.x11owner`, python-xlib), in a process of its own like xclip's
foreground mode: every delivered type at once, so that Ctrl-V works in a text
editor and in an image editor alike, with INCR for large content.  On Wayland
our own data-control client (:mod:`guestdrv.wlowner`, pure Python) does the
same.  Without python-xlib, xclip serves the paste, and on a compositor without
a data-control protocol (GNOME's Mutter) wl-copy; they serve exactly one type
per process, so such a paste installs one item: text if the content has text,
else the PNG image, else the first item (:func:`choose_item`).

Every call to a tool has a deadline, because the clipboard owner is a guest
application, and the driver answers the broker from the same thread: reading
within TOOL_TIMEOUT_S, under the broker's gesture timeout; installing within
WRITE_TIMEOUT_S, which waits on no application.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Protocol

from control.cli import LOG_LEVELS
from guestdrv.errors import ClipboardError, ClipboardTooLarge, ClipboardUnsupported
from protocol import clipformat
from protocol.clipformat import MAX_ITEMS, MIME_RE, PNG_MIME, TEXT_MIME, ClipItem

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 3.0
"""Deadline for reading the whole clipboard: under the broker's default 5 s gesture
timeout, so a guest application that never answers makes a clear refusal, not a timeout."""
WRITE_TIMEOUT_S = 10.0
"""Deadline for installing a paste: the helper reads it and (the X11 owner) owns the
selection.  It takes well under a second; under heavy load it may take seconds, and it
waits on no application, only on the helper and the X server.  Longer than the broker's
5 s on purpose: a paste installed after the broker stopped waiting is still the user's
paste (the broker then reports it unconfirmed and keeps the global clipboard, the safe
side), whereas giving up would refuse it."""
OWNER_READY = "owned"
"""The line our owners (guestdrv.x11owner, guestdrv.wlowner) write on stdout once the
clipboard is theirs."""
OWNER_UNSUPPORTED = 3
"""The exit status of an owner whose desktop lacks what it needs (guestdrv.wlowner: a
compositor without a data-control protocol); the backend then falls back to its tool."""

# Targets that carry text, best first.  X11's STRING is Latin-1; the others are UTF-8.
_UTF8_TARGETS = ("UTF8_STRING", "text/plain;charset=utf-8", "text/plain;charset=UTF-8")
_LATIN1_TARGETS = ("STRING", "TEXT", "text/plain")


class ClipboardBackend(Protocol):
    name: str

    def read(self, limit: int) -> list[ClipItem]:
        """The clipboard's items, best first, at most `limit` bytes in all; [] when empty.

        Raises:
            ClipboardTooLarge: the preferred item alone is over `limit`.
            ClipboardError: the clipboard could not be read.
        """
        ...

    def write(self, items: Sequence[ClipItem]) -> None:
        """Install a paste as the clipboard.

        Raises:
            ClipboardError: the clipboard could not be set.
        """
        ...

    def withdraw(self) -> bool:
        """Clear the clipboard if it still holds our last paste; whether it did."""
        ...

    def close(self) -> None:
        """Stop serving (a desktop backend's helper process ends)."""
        ...


def choose_item(items: Sequence[ClipItem]) -> ClipItem:
    """The item to install when only one can be: text, else a PNG image, else the first."""
    for wanted in (TEXT_MIME, PNG_MIME):
        for item in items:
            if item.mime == wanted:
                return item
    return items[0]


class HeadlessClipboard:
    """An in-memory clipboard, set by ``guestdrv copy`` and read by ``guestdrv paste``."""

    name = "headless"

    def __init__(self) -> None:
        self._items: list[ClipItem] = []
        self._pasted: list[ClipItem] | None = None

    def read(self, limit: int) -> list[ClipItem]:
        size = sum(len(item.data) for item in self._items)
        if size > limit:
            raise ClipboardTooLarge(size, limit)
        return list(self._items)

    def write(self, items: Sequence[ClipItem]) -> None:
        self._items = [ClipItem(item.mime, bytes(item.data)) for item in items]
        self._pasted = self._items

    def withdraw(self) -> bool:
        if self._pasted is None or self._pasted is not self._items:
            return False
        self._items = []
        self._pasted = None
        return True

    def close(self) -> None:
        self._items = []


# Running the tools -------------------------------------------------------------
def _read_bounded(argv: list[str], limit: int, deadline: float) -> tuple[int, bytes | None, str]:
    """Run `argv`; return (exit code, its stdout or None if over `limit` bytes, its stderr).

    Raises:
        ClipboardError: the tool is missing or did not finish before `deadline`.
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise ClipboardError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    over = False
    streams = {proc.stdout: out, proc.stderr: err}
    try:
        with selectors.DefaultSelector() as sel:
            for stream in streams:
                os.set_blocking(stream.fileno(), False)
                sel.register(stream, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClipboardError(
                        f"{' '.join(argv[:1] + argv[-2:])} gave no answer in time "
                        "(the application that owns the clipboard does not respond)")
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 20)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buffer = streams[key.fileobj]  # type: ignore[index]
                    buffer += chunk
                    if buffer is out and len(out) > limit:
                        over = True
                        proc.kill()
                        sel.unregister(key.fileobj)
        code = proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ClipboardError(f"{argv[0]} did not exit in time") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return code, (None if over else bytes(out)), err.decode(errors="replace").strip()


def _feed(proc: subprocess.Popen[bytes], data: bytes | bytearray | memoryview, deadline: float,
          label: str) -> bool:
    """Write `data` to the helper's stdin and close it; whether it took all of it.

    A helper that exits before reading everything is not an error here: its exit
    status says why.

    Raises:
        ClipboardError: the helper did not read everything before `deadline`.
    """
    assert proc.stdin is not None
    view = memoryview(data).cast("B")
    fd = proc.stdin.fileno()
    os.set_blocking(fd, False)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            while view:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClipboardError(f"{label} did not read the paste within {WRITE_TIMEOUT_S:g} s")
                if sel.select(left):
                    with contextlib.suppress(BlockingIOError):
                        view = view[os.write(fd, view[: 1 << 20]):]
    except BrokenPipeError:
        return False
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    return True


def _first_line(proc: subprocess.Popen[bytes], deadline: float, label: str) -> str:
    """The helper's first line on stdout, stripped ("" if it closed stdout without one).

    Raises:
        ClipboardError: no line and no end of stdout before `deadline`.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    line = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in line and len(line) < 4096:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClipboardError(f"{label} did not take the clipboard within {WRITE_TIMEOUT_S:g} s")
            if sel.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                line += chunk
    return line.split(b"\n", 1)[0].decode(errors="replace").strip()


class _ServingTool:
    """The helper process that serves our last paste: xclip or wl-copy in the foreground,
    or our own X11 selection owner (guestdrv.x11owner)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str], data: bytes | bytearray | memoryview, *, label: str = "",
              reports_ready: bool = False) -> None:
        """Start the helper with `data` on its stdin; return once it serves it.

        A helper that `reports_ready` says so in one line on its stdout, OWNER_READY
        or "error: REASON", and its stderr goes to ours (the driver's log); its stdout
        stays open while it serves, so that it can see the driver go away.  For the
        others, serving means still running once they have read everything.

        Raises:
            ClipboardUnsupported: a helper that reports_ready exited with OWNER_UNSUPPORTED.
            ClipboardError: the tool is missing, exited, reported an error or was not
                serving within WRITE_TIMEOUT_S.
        """
        self.stop()
        label = label or argv[0]
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE if reports_ready else subprocess.DEVNULL,
                                    stderr=None if reports_ready else subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            raise ClipboardError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        self._proc = proc
        try:
            took_all = _feed(proc, data, deadline, label)
            if reports_ready:
                assert proc.stdout is not None
                line = _first_line(proc, deadline, label)
                if line == OWNER_READY:
                    return
                message = line.removeprefix("error: ")
            else:
                if not took_all:  # it exited before reading everything: wait for its status
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(max(0.1, deadline - time.monotonic()))
                if proc.poll() is None:
                    assert proc.stderr is not None
                    os.set_blocking(proc.stderr.fileno(), False)
                    return
                assert proc.stderr is not None
                message = proc.stderr.read().decode(errors="replace").strip()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            code = proc.poll()
            if reports_ready and code == OWNER_UNSUPPORTED:
                raise ClipboardUnsupported(message)
            status = "is still running" if code is None else f"exited with status {code}"
            raise ClipboardError(f"{label} {status}: {message or 'no message'}")
        except BaseException:
            self.stop()
            raise

    @property
    def serving(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> bool:
        """End the helper; whether it was still serving (so still owned the clipboard)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return False
        was_serving = proc.poll() is None
        if was_serving:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        return was_serving


def _other_mime_targets(targets: Sequence[str], taken: Sequence[str]) -> list[str]:
    """Further MIME-typed targets worth offering, in the owner's order.

    Other image types are skipped when PNG is there: toolkits convert on demand,
    so a screenshot would also travel as a BMP five times its size.
    """
    out = []
    for target in targets:
        if target in taken or target.startswith("text/plain") or not MIME_RE.fullmatch(target):
            continue
        if target.startswith("image/") and PNG_MIME in taken:
            continue
        out.append(target)
    return out


def _owner_argv(module: str) -> list[str]:
    """The command line of one of our owners: the driver's interpreter, at the driver's log level."""
    level = logging.getLevelName(log.getEffectiveLevel()).lower()
    return [sys.executable, "-m", module, "--log-level", level if level in LOG_LEVELS else "warning"]


class _ToolClipboard:
    """What the xclip and wl-clipboard backends share: choosing and reading targets."""

    name = "tool"

    def __init__(self) -> None:
        self._server = _ServingTool()

    def _list_targets(self, deadline: float) -> list[str] | None:
        raise NotImplementedError

    def _read_argv(self, target: str) -> list[str]:
        raise NotImplementedError

    def _write_argv(self, mime: str) -> list[str]:
        raise NotImplementedError

    def read(self, limit: int) -> list[ClipItem]:
        deadline = time.monotonic() + TOOL_TIMEOUT_S
        targets = self._list_targets(deadline)
        if not targets:
            return []
        wanted: list[tuple[str, str]] = []  # (target, MIME type it becomes)
        text = next((t for t in _UTF8_TARGETS if t in targets), None)
        if text is not None:
            wanted.append((text, TEXT_MIME))
        else:
            latin1 = next((t for t in _LATIN1_TARGETS if t in targets), None)
            if latin1 is not None:
                wanted.append((latin1, "latin1"))
        if PNG_MIME in targets:
            wanted.append((PNG_MIME, PNG_MIME))
        taken = [t for t, _ in wanted] + [PNG_MIME] * (PNG_MIME in targets)
        wanted += [(t, t) for t in _other_mime_targets(targets, taken)]
        items: list[ClipItem] = []
        budget = limit
        for target, mime in wanted[:MAX_ITEMS]:
            code, data, err = _read_bounded(self._read_argv(target), budget, deadline)
            if data is None:
                if not items:  # the preferred item alone is too large: refuse, never truncate
                    raise ClipboardTooLarge(budget + 1, limit)
                log.info("skipped %s: it does not fit in what is left of the limit", mime)
                continue
            if code != 0:
                log.info("could not read target %s: %s", target, err or f"status {code}")
                continue
            if mime == "latin1":
                data = data.decode("latin-1").encode()
                mime = TEXT_MIME
                if len(data) > budget:
                    raise ClipboardTooLarge(len(data), limit)
            if data:
                items.append(ClipItem(mime, data))
                budget -= len(data)
        return items

    def write(self, items: Sequence[ClipItem]) -> None:
        item = choose_item(items)
        self._server.start(self._write_argv(item.mime), item.data)
        log.info("serving %s (%d bytes) as the clipboard", item.mime, len(item.data))

    def _write_through_owner(self, argv: list[str], items: Sequence[ClipItem], label: str) -> None:
        """Install every item through one of our owners; it holds the clipboard when this returns.

        Raises:
            ClipboardUnsupported, ClipboardError: as _ServingTool.start.
        """
        payload = clipformat.encode(items)
        try:
            self._server.start(argv, payload, label=label, reports_ready=True)
        finally:
            payload[:] = bytes(len(payload))  # the owner holds its own copy (as the driver does)
        log.info("serving %s (%d bytes) as the clipboard", ", ".join(item.mime for item in items),
                 sum(len(item.data) for item in items))

    def withdraw(self) -> bool:
        return self._server.stop()

    def close(self) -> None:
        self._server.stop()


class X11Clipboard(_ToolClipboard):
    """The CLIPBOARD selection of the guest's X server.

    A paste is served by our own selection owner (guestdrv.x11owner, every type at
    once); without python-xlib, by xclip (one type).  Reading goes through xclip.
    """

    name = "x11"

    def __init__(self, xclip: str = "xclip", display: str | None = None, *,
                 owner: bool | None = None) -> None:
        """`owner`: serve pastes with guestdrv.x11owner (default: when python-xlib is installed)."""
        super().__init__()
        self.xclip = xclip
        self.display = display
        self._display = ["-display", display] if display else []
        self.use_owner = importlib.util.find_spec("Xlib") is not None if owner is None else owner
        if not self.use_owner:
            log.info("python-xlib is not installed: a paste installs one type, through xclip "
                     "(pip install -e '.[desktop]' to serve every type)")

    def _list_targets(self, deadline: float) -> list[str] | None:
        code, data, err = _read_bounded(self._read_argv("TARGETS"), 1 << 16, deadline)
        if code != 0 or data is None:
            if "display" in err.lower():
                raise ClipboardError(f"xclip: {err}")
            log.debug("no clipboard targets: %s", err)  # nobody owns the clipboard
            return None
        return data.decode(errors="replace").split()

    def _read_argv(self, target: str) -> list[str]:
        return [self.xclip, *self._display, "-selection", "clipboard", "-o", "-t", target]

    def _write_argv(self, mime: str) -> list[str]:
        # X11 applications ask for text as UTF8_STRING; xclip answers every target asked.
        target = "UTF8_STRING" if mime == TEXT_MIME else mime
        return [self.xclip, *self._display, "-quiet", "-selection", "clipboard", "-i", "-t", target]

    def owner_argv(self) -> list[str]:
        """The command line of our selection owner (the same interpreter as the driver)."""
        return _owner_argv("guestdrv.x11owner") + (["--display", self.display] if self.display else [])

    def write(self, items: Sequence[ClipItem]) -> None:
        if not self.use_owner:
            super().write(items)
            return
        self._write_through_owner(self.owner_argv(), items, "the X11 clipboard owner")


class WaylandClipboard(_ToolClipboard):
    """The Wayland clipboard.

    A paste is served by our own data-control client (guestdrv.wlowner, every type at
    once); on a compositor without a data-control protocol, by wl-copy (one type).
    Reading goes through wl-paste.
    """

    name = "wayland"

    def __init__(self, wl_paste: str = "wl-paste", wl_copy: str = "wl-copy") -> None:
        super().__init__()
        self.wl_paste = wl_paste
        self.wl_copy = wl_copy
        self.data_control = True
        """Whether the compositor may have a data-control protocol (until the owner finds none)."""

    def write(self, items: Sequence[ClipItem]) -> None:
        if self.data_control:
            try:
                self._write_through_owner(_owner_argv("guestdrv.wlowner"), items,
                                          "the Wayland clipboard owner")
                return
            except ClipboardUnsupported as exc:
                log.warning("%s: pasting through wl-copy from now on, one type per paste", exc)
                self.data_control = False
        super().write(items)

    def _list_targets(self, deadline: float) -> list[str] | None:
        code, data, err = _read_bounded([self.wl_paste, "--list-types"], 1 << 16, deadline)
        if code != 0 or data is None:
            if "no selection" not in err.lower() and "nothing is copied" not in err.lower():
                raise ClipboardError(f"wl-paste: {err or f'status {code}'}")
            return None
        return data.decode(errors="replace").split("\n")

    def _read_argv(self, target: str) -> list[str]:
        return [self.wl_paste, "--no-newline", "--type", target]

    def _write_argv(self, mime: str) -> list[str]:
        return [self.wl_copy, "--foreground", "--type", mime]


def make_backend(kind: str, environ: dict[str, str] | None = None) -> ClipboardBackend:
    """The backend for `kind` (auto: WAYLAND_DISPLAY -> wayland, DISPLAY -> x11, else headless).

    Raises:
        ClipboardError: `kind` is unknown, or its display variable is not set.
    """
    env = os.environ if environ is None else environ
    if kind == "auto":
        kind = "wayland" if env.get("WAYLAND_DISPLAY") else "x11" if env.get("DISPLAY") else "headless"
        log.info("clipboard: %s (detected)", kind)
    if kind == "headless":
        return HeadlessClipboard()
    if kind == "x11":
        if not env.get("DISPLAY"):
            raise ClipboardError("--clipboard x11 needs an X display: DISPLAY is not set")
        return X11Clipboard()
    if kind == "wayland":
        if not env.get("WAYLAND_DISPLAY"):
            raise ClipboardError("--clipboard wayland needs a Wayland session: WAYLAND_DISPLAY is not set")
        return WaylandClipboard()
    raise ClipboardError(f"unknown clipboard {kind!r}: use auto, x11, wayland or headless")
