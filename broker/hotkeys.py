"""``python -m broker hotkeys``: the copy and paste gestures as host key combinations (X11).

The combinations are grabbed on the root window of the host X server (passive
key grabs).  The server then delivers the press, and the release of the same
key, to this process alone: the focused window, and so the VM behind it, never
sees either.  Guests cannot fake the gesture: they have no connection to the
host X server, and a key event a guest application synthesises stays inside
the guest.

A gesture goes to the VM whose window has the input focus (broker.windows
decides which VM that is).  A paste is refused when the focus reached that
window less than the focus guard ago (default 500 ms), so a window that pops
up just before the user presses the combination does not receive the paste.
The focus time is the moment this process saw the focus change, which can
only be later than the real change: the guard errs towards refusing.

Wayland sessions are refused: X grabs see no keys typed into Wayland windows,
and the X input focus says nothing about them.  Bind the compositor's own
shortcuts to ``python -m broker copy --focused`` under sway (broker.sway asks
sway which window has the focus), elsewhere to ``copy VM`` (see the README).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from broker.names import check_vm_name
from broker.notify import Notifier
from broker.windows import WindowRule, vm_for_window
from control.errors import ControlError, NotRunningError
from control.sockets import request

log = logging.getLogger(__name__)

DEFAULT_COPY = "ctrl+shift+c"
DEFAULT_PASTE = "ctrl+shift+v"
DEFAULT_FOCUS_GUARD_S = 0.5
GESTURE_TIMEOUT_S = 130.0
"""Longer than the broker's longest transfer (120 s), so its answer always arrives."""
MAX_TITLE = 80

_MODIFIERS = {"ctrl": "ControlMask", "control": "ControlMask", "shift": "ShiftMask",
              "alt": "Mod1Mask", "super": "Mod4Mask", "win": "Mod4Mask"}


def _xlib() -> Any:
    """Import python-xlib (the ``desktop`` extra), or explain how to get it.

    Raises:
        ConfigError: python-xlib is not installed.
    """
    try:
        import Xlib.display
        import Xlib.error
        import Xlib.X
        import Xlib.XK
    except ImportError:
        raise ConfigError("python-xlib is not installed: pip install 'ivclip[desktop]'") from None
    return Xlib


def check_x11_session(environ: Mapping[str, str] = os.environ) -> str:
    """The X display to use.

    Raises:
        ConfigError: a Wayland session (the focused window cannot be known through X), or no X display.
    """
    if environ.get("WAYLAND_DISPLAY"):
        raise ConfigError(
            "this is a Wayland session: the focused window cannot be determined through X11, and "
            "$SWAYSOCK is not set (under sway it points at sway's IPC socket); elsewhere bind the "
            "compositor's shortcuts to 'python -m broker copy VM' and 'python -m broker paste VM' "
            "(see the README)")
    display = environ.get("DISPLAY")
    if not display:
        raise ConfigError("no X display: $DISPLAY is not set")
    return display


@dataclass(frozen=True, slots=True)
class Combo:
    text: str
    modifiers: int
    keysym: int


def parse_combo(text: str) -> Combo | None:
    """'ctrl+shift+c' -> Combo; 'none' or 'off' -> None (the gesture is disabled).

    Raises:
        ConfigError: an unknown modifier or key, or no modifier at all (a bare key would
            be lost to every application).
    """
    xlib = _xlib()
    if text.strip().lower() in ("none", "off", "disabled", ""):
        return None
    *mods, key = [part.strip() for part in text.split("+")]
    mask = 0
    for mod in mods:
        name = _MODIFIERS.get(mod.lower())
        if name is None:
            raise ConfigError(f"unknown modifier {mod!r} in {text!r} (use ctrl, shift, alt, super)")
        mask |= getattr(xlib.X, name)
    if not mask:
        raise ConfigError(f"{text!r} has no modifier: a hotkey needs ctrl, shift, alt or super")
    keysym = xlib.XK.string_to_keysym(key) or xlib.XK.string_to_keysym(key.lower())
    if not keysym:
        raise ConfigError(f"unknown key {key!r} in {text!r} (X keysym names: c, v, Insert, F12...)")
    return Combo(text, mask, keysym)


@dataclass(frozen=True, slots=True)
class FocusedWindow:
    window: int
    wm_class: tuple[str, ...]
    title: str
    vm: str | None

    def describe(self) -> str:
        name = "/".join(self.wm_class) or "no class"
        return f"window of class {name}"


def focused_window(display: Any, rules: Sequence[WindowRule]) -> FocusedWindow | None:
    """The top-level client window that has the input focus, and its VM; None if none."""
    xlib = _xlib()
    try:
        focus = display.get_input_focus().focus
        if isinstance(focus, int):  # None or PointerRoot: no window has the focus
            return None
        client = _client_window(display, focus)
        if client is None:
            return None
        wm_class = tuple(client.get_wm_class() or ())
        title = _title(display, client)
    except xlib.error.XError as exc:  # the window went away while we looked
        log.debug("focused window vanished: %s", exc)
        return None
    vm = vm_for_window(wm_class, title, rules)
    if vm is not None:
        try:
            check_vm_name(vm)
        except ConfigError as exc:
            log.warning("window rule gave an unsafe VM name: %s", exc)
            vm = None
    return FocusedWindow(client.id, wm_class, title, vm)


def _client_window(display: Any, window: Any) -> Any:
    """The window carrying WM_CLASS: the focus window or an ancestor, else a child of its
    top-level (a window manager's frame has the focus and the client inside it)."""
    root = display.screen().root
    top = window
    current = window
    while current.id != root.id:
        if current.get_wm_class() is not None:
            return current
        top = current
        current = current.query_tree().parent
    frontier = [top]
    for _ in range(3):
        children = [c for w in frontier for c in w.query_tree().children]
        for child in children:
            if child.get_wm_class() is not None:
                return child
        frontier = children
    return None


def _title(display: Any, window: Any) -> str:
    net_name = window.get_full_property(display.intern_atom("_NET_WM_NAME"),
                                        display.intern_atom("UTF8_STRING"))
    if net_name is not None and net_name.value:
        raw = net_name.value
        return (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))[:1024]
    name = window.get_wm_name()
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return str(name or "")[:1024]


def focused_vm(display_name: str, rules: Sequence[WindowRule]) -> str:
    """The VM whose window has the focus on `display_name` (for ``copy --focused``).

    Raises:
        ConfigError: the display cannot be opened, or the focused window belongs to no VM.
    """
    xlib = _xlib()
    try:
        display = xlib.display.Display(display_name)
    except (xlib.error.DisplayError, xlib.error.ConnectionClosedError) as exc:
        raise ConfigError(f"cannot open the X display {display_name}: {exc}") from None
    try:
        focused = focused_window(display, rules)
    finally:
        display.close()
    if focused is None or focused.vm is None:
        what = focused.describe() if focused else "no window has the focus"
        raise ConfigError(f"the focused window belongs to no VM ({what}); nothing done")
    return focused.vm


GestureSender = Callable[[str, str], dict[str, Any]]


def broker_sender(socket_path: Path) -> GestureSender:
    """A function that sends one gesture to the broker and returns its reply."""

    def send(op: str, vm: str) -> dict[str, Any]:
        try:
            frame = request(socket_path, {"op": op, "vm": vm}, timeout_s=GESTURE_TIMEOUT_S, max_body=0)
        except NotRunningError:
            return {"ok": False, "message": f"the broker is not running (nothing listens on {socket_path})"}
        except ControlError as exc:
            return {"ok": False, "message": f"the broker did not answer: {exc}"}
        return frame.header

    return send


def perform_gesture(op: str, vm: str | None, what: str, focus_age_s: float, *, guard_s: float,
                    send: GestureSender, notifier: Notifier) -> bool:
    """Send gesture `op` for the focused window's `vm` and notify the outcome, or notify why
    nothing was sent: the window (`what`) belongs to no VM, or a paste came less than
    `guard_s` after the focus arrived.  Whether the gesture was sent."""
    summary = f"ivclip {op}"
    if vm is None:
        notifier.notify(summary, f"nothing done: the focused window belongs to no VM ({what})", ok=False)
        return False
    if op == "paste" and focus_age_s < guard_s:
        notifier.notify(summary, (
            f"refused: focus changed {focus_age_s * 1000:.0f} ms ago (to {vm}'s window); "
            "press the combination again to paste there"), ok=False)
        return False
    log.info("%s gesture for %s", op, vm)
    reply = send(op, vm)
    notifier.notify(summary, str(reply.get("message") or "no answer"), ok=bool(reply.get("ok")))
    return True


class StoppableLoop:
    """What both hotkey daemons share: a stop flag, and a pipe that wakes their select()
    for a signal or a stop() from another thread."""

    def __init__(self) -> None:
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    def close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


class HotkeyDaemon(StoppableLoop):
    """Grabs the combinations, turns presses into gestures, notifies the outcomes."""

    def __init__(self, *, display_name: str, rules: Sequence[WindowRule], send: GestureSender,
                 notifier: Notifier, copy: Combo | None, paste: Combo | None,
                 focus_guard_s: float = DEFAULT_FOCUS_GUARD_S) -> None:
        """Raises:
        ConfigError: the X display cannot be opened, both gestures are disabled, or a
            combination is grabbed by another program already.
        """
        if copy is None and paste is None:
            raise ConfigError("both the copy and the paste combination are disabled: nothing to do")
        self.xlib = _xlib()
        try:
            self.display = self.xlib.display.Display(display_name)
        except (self.xlib.error.DisplayError, self.xlib.error.ConnectionClosedError) as exc:
            raise ConfigError(f"cannot open the X display {display_name}: {exc}") from None
        self.root = self.display.screen().root
        self.rules = rules
        self.send = send
        self.notifier = notifier
        self.focus_guard_s = focus_guard_s
        self.gestures = 0
        self._bindings: dict[tuple[int, int], str] = {}
        self._focus: int | None = None
        self._focus_since = time.monotonic()
        super().__init__()
        try:
            for op, combo in (("copy", copy), ("paste", paste)):
                if combo is not None:
                    self._grab(op, combo)
            self._watch_focus()
        except BaseException:
            self.close()
            raise
        self._note_focus(time.monotonic())

    # Setup -------------------------------------------------------------------
    def _lock_masks(self) -> list[int]:
        """The lock-modifier states to grab as well: a grab is for one exact modifier state,
        and Caps Lock or Num Lock being on must not turn the hotkey into ordinary typing."""
        X = self.xlib.X
        num_lock = 0
        num_code = self.display.keysym_to_keycode(self.xlib.XK.string_to_keysym("Num_Lock"))
        for index, codes in enumerate(self.display.get_modifier_mapping()):
            if num_code and num_code in codes:
                num_lock = 1 << index
        return sorted({0, X.LockMask, num_lock, X.LockMask | num_lock})

    def _grab(self, op: str, combo: Combo) -> None:
        X = self.xlib.X
        keycode = self.display.keysym_to_keycode(combo.keysym)
        if not keycode:
            raise ConfigError(f"{combo.text}: the key is not on this keyboard")
        catcher = self.xlib.error.CatchError(self.xlib.error.BadAccess)
        for extra in self._lock_masks():
            # owner_events False and both modes async: the event is ours only, nothing freezes.
            self.root.grab_key(keycode, combo.modifiers | extra, False, X.GrabModeAsync,
                               X.GrabModeAsync, onerror=catcher)
        self.display.sync()
        if catcher.get_error() is not None:
            raise ConfigError(f"{combo.text} is already grabbed by another program; "
                              f"choose another combination with --{op}")
        self._bindings[(keycode, combo.modifiers)] = op
        log.info("%s gesture on %s", op, combo.text)

    def _watch_focus(self) -> None:
        X = self.xlib.X
        self.root.change_attributes(event_mask=X.SubstructureNotifyMask)
        for child in self.root.query_tree().children:
            self._watch_window(child)

    def _watch_window(self, window: Any) -> None:
        catcher = self.xlib.error.CatchError()  # it may be gone already: nothing to watch then
        window.change_attributes(event_mask=self.xlib.X.FocusChangeMask, onerror=catcher)

    # The loop ----------------------------------------------------------------
    def run(self) -> None:
        """Serve until stopped.

        Raises:
            ConfigError: the X server went away.
        """
        fd = self.display.fileno()
        log.info("hotkeys ready on %s", self.display.get_display_name())
        while not self._stopping:
            try:
                while self.display.pending_events():
                    self.handle(self.display.next_event())
            except self.xlib.error.ConnectionClosedError as exc:
                raise ConfigError(f"lost the X display: {exc}") from None
            ready, _, _ = select.select([fd, self._wake_r], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)

    def handle(self, event: Any) -> None:
        X = self.xlib.X
        now = time.monotonic()
        if event.type == X.KeyPress:
            clean = event.state & (X.ShiftMask | X.ControlMask | X.Mod1Mask | X.Mod4Mask)
            op = self._bindings.get((event.detail, clean))
            if op is not None:
                self.gesture(op, now)
        elif event.type in (X.FocusIn, X.FocusOut):
            self._note_focus(now)
        elif event.type == X.CreateNotify:
            self._watch_window(event.window)
        # KeyRelease of a grabbed key arrives here too and is dropped: swallowed.

    def _note_focus(self, now: float) -> FocusedWindow | None:
        focused = focused_window(self.display, self.rules)
        window = focused.window if focused else None
        if window != self._focus:
            self._focus = window
            self._focus_since = now
            log.debug("focus: %s", focused)
        return focused

    # Gestures ----------------------------------------------------------------
    def gesture(self, op: str, now: float) -> None:
        focused = self._note_focus(now)
        what = focused.describe() if focused else "no window"
        if perform_gesture(op, focused.vm if focused else None, what, now - self._focus_since,
                           guard_s=self.focus_guard_s, send=self.send, notifier=self.notifier):
            self.gestures += 1

    def close(self) -> None:
        try:
            self.display.close()
        except Exception:  # closing a broken X connection can raise anything Xlib has
            log.debug("closing the display failed", exc_info=True)
        self.close_wake_pipe()
        self.notifier.close()
