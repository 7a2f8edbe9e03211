"""Guest clipboard backends: headless (in the driver), X11 (xclip) and Wayland (wl-clipboard
and our own data-control owner, guestdrv.wlowner).

A backend reads the guest's clipboard as a list of typed items (the
preferred first) and installs a paste.  The desktop backends read through
the standard command-line tools rather than speaking X11 or Wayland
themselves: xclip implements the incremental (INCR) transfers that large X11
selections need, in both directions, and wl-paste is the reference client
for the Wayland data-control protocols.

A Wayland paste installs every delivered type at once, so that Ctrl-V works
in a text editor and in an image editor alike: a process of our own
(guestdrv.wlowner, started through :meth:`_ServingTool.start_owner`) takes
the selection through the data-control protocol and serves it, and
:meth:`WaylandClipboard.write` returns once the selection is set.  On a
compositor without that protocol (GNOME's Mutter) it falls back to wl-copy.
xclip and wl-copy serve exactly one type per process, so there a paste
installs one item: text if the content has text, else the PNG image, else
the first item (:func:`choose_item`).

Every call to a tool has a deadline, because the clipboard owner is a guest
application, and the driver answers the broker from the same thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from guestdrv.errors import ClipboardError, ClipboardTooLarge, ClipboardUnsupported
from protocol import clipformat
from protocol.clipformat import MAX_ITEMS, MIME_RE, PNG_MIME, TEXT_MIME, ClipItem

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 3.0
"""Deadline for reading the whole clipboard: under the broker's default 5 s gesture
timeout, so a guest application that never answers makes a clear refusal, not a timeout."""

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


OWNER_READY = "ready"
"""What a clipboard owner of our own (guestdrv.wlowner) writes on standard output, first on
the line, once the clipboard is its; a failure is a line "error MESSAGE" and an exit."""
OWNER_UNSUPPORTED = 3
"""The exit status of an owner whose desktop lacks what it needs (no data-control protocol)."""


class _ServingTool:
    """The helper process (xclip, wl-copy in the foreground, our owner) that serves our last paste."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], data: bytes | bytearray | memoryview, *, stdout: int,
               stderr: int | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` (stopping the previous helper) and give it `data` on its standard input.

        Raises:
            ClipboardError: it cannot be run.
        """
        self.stop()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                    start_new_session=True, env=env)
        except OSError as exc:
            raise ClipboardError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except BrokenPipeError:  # it exited before reading everything: wait for its status
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(TOOL_TIMEOUT_S)
        self._proc = proc
        return proc

    def start(self, argv: list[str], data: bytes | bytearray | memoryview) -> None:
        """Raises:
        ClipboardError: the tool is missing or exited at once.
        """
        proc = self._spawn(argv, data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        code = proc.poll()
        if code is not None:
            message = proc.stderr.read().decode(errors="replace").strip()
            self.stop()
            raise ClipboardError(f"{argv[0]} exited with status {code}: {message or 'no message'}")
        os.set_blocking(proc.stderr.fileno(), False)

    def start_owner(self, argv: list[str], data: bytes | bytearray | memoryview,
                    env: dict[str, str] | None = None) -> str:
        """Start a clipboard owner of our own; return once the clipboard is its, with what
        followed OWNER_READY on its line (how it owns it).

        Its standard error stays ours (its log lines join the driver's); its standard output
        stays open while it serves, so that it sees the driver go away.

        Raises:
            ClipboardUnsupported: it exited with OWNER_UNSUPPORTED (the message is its own).
            ClipboardError: it cannot be run, failed (its message), or did not take the
                clipboard within TOOL_TIMEOUT_S.
        """
        deadline = time.monotonic() + TOOL_TIMEOUT_S
        proc = self._spawn(argv, data, stdout=subprocess.PIPE, stderr=None, env=env)
        assert proc.stdout is not None
        line = _read_line(proc.stdout.fileno(), deadline)
        word, _, rest = (line or b"").decode(errors="replace").strip().partition(" ")
        if word == OWNER_READY:
            return rest
        if line is not None:  # it failed and is exiting: its status tells which failure
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        self.stop()
        if line is None:
            raise ClipboardError(f"{argv[-1]} did not take the clipboard within {TOOL_TIMEOUT_S:g} s")
        if word == "error" and rest:
            raise (ClipboardUnsupported if proc.returncode == OWNER_UNSUPPORTED else ClipboardError)(rest)
        raise ClipboardError(f"{argv[-1]} exited with status {proc.returncode} without saying why")

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


def _read_line(fd: int, deadline: float, limit: int = 4096) -> bytes | None:
    """One line (at most `limit` bytes) from `fd`, what came before its end, or None at `deadline`."""
    line = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in line and len(line) < limit:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                return None
            chunk = os.read(fd, limit - len(line))
            if not chunk:
                break
            line += chunk
    return bytes(line.partition(b"\n")[0])


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

    def withdraw(self) -> bool:
        return self._server.stop()

    def close(self) -> None:
        self._server.stop()


class X11Clipboard(_ToolClipboard):
    """The CLIPBOARD selection of the guest's X server, through xclip."""

    name = "x11"

    def __init__(self, xclip: str = "xclip", display: str | None = None) -> None:
        super().__init__()
        self.xclip = xclip
        self._display = ["-display", display] if display else []

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


class WaylandClipboard(_ToolClipboard):
    """The Wayland clipboard: read through wl-paste, pasted through our own owner
    (guestdrv.wlowner: every type at once), or wl-copy (one type) on a compositor without a
    data-control protocol."""

    name = "wayland"

    def __init__(self, wl_paste: str = "wl-paste", wl_copy: str = "wl-copy",
                 owner: Sequence[str] = (sys.executable, "-m", "guestdrv.wlowner")) -> None:
        super().__init__()
        self.wl_paste = wl_paste
        self.wl_copy = wl_copy
        self.owner = list(owner)
        self.data_control = True
        """Whether the compositor may have a data-control protocol (until the owner finds none)."""

    def write(self, items: Sequence[ClipItem]) -> None:
        """Raises:
        ClipboardError: the clipboard could not be set (it is set when this returns).
        """
        if self.data_control:
            # The owner runs this very tree, whatever else sys.path may find first.
            root = str(Path(__file__).resolve().parent.parent)
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            # Its log lines join ours, at our level.
            level = max((n for n in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
                         if n <= log.getEffectiveLevel()), default=logging.DEBUG)
            argv = [*self.owner, "--log-level", logging.getLevelName(level).lower()]
            try:
                how = self._server.start_owner(argv, clipformat.encode(items),
                                               env={**os.environ, "PYTHONPATH": path})
            except ClipboardUnsupported as exc:
                log.warning("%s: pasting through wl-copy from now on, one type per paste", exc)
                self.data_control = False
            else:
                log.info("serving %s as the clipboard (%s)", ", ".join(i.mime for i in items), how)
                return
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
