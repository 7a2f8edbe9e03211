"""Desktop notifications (freedesktop ``org.freedesktop.Notifications.Notify`` over D-Bus).

Every gesture outcome becomes one notification, so that a user who pressed a
hotkey learns what happened without a terminal.  jeepney speaks D-Bus in pure
Python; it is imported lazily and is optional (the ``desktop`` extra): without
it, or without a session bus or a notification daemon, the outcome still goes
to the log and the gesture itself is unaffected.  Notifying never raises.

Notification servers may render a subset of HTML in the body, so every body is
escaped: a message never carries guest content, but it does carry VM names and
MIME types.
"""

from __future__ import annotations

import html
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.Notifications"
OBJECT_PATH = "/org/freedesktop/Notifications"
APP_NAME = "ivclip"
CALL_TIMEOUT_S = 2.0
"""A notification daemon that hangs must not hold the next gesture up for long."""


class Notifier:
    """Sends notifications to the session bus (or `bus_address`), reusing one bubble."""

    def __init__(self, *, bus_address: str | None = None, expire_ms: int = 6000,
                 enabled: bool = True, log_outcomes: bool = True) -> None:
        """`log_outcomes`: also log each message (off where the caller prints it already)."""
        self.bus_address = bus_address
        self.log_outcomes = log_outcomes
        self.expire_ms = expire_ms
        self.enabled = enabled
        self._conn: Any = None
        self._last_id = 0
        self._warned = ""

    def notify(self, summary: str, body: str, *, ok: bool) -> bool:
        """Show one notification; whether the notification daemon took it."""
        if self.log_outcomes:
            log.log(logging.INFO if ok else logging.WARNING, "%s: %s", summary, body)
        if not self.enabled:
            return False
        try:
            from jeepney import DBusAddress, new_method_call
            from jeepney.io.blocking import open_dbus_connection
        except ImportError:
            self._warn_once("jeepney is not installed (pip install 'ivclip[desktop]'): no notifications")
            return False
        address = DBusAddress(OBJECT_PATH, bus_name=BUS_NAME, interface=BUS_NAME)
        urgency = 1 if ok else 2  # normal, critical: a refusal should not slip by unnoticed
        call = new_method_call(address, "Notify", "susssasa{sv}i", (
            APP_NAME, self._last_id, "edit-paste" if ok else "dialog-warning",
            summary, html.escape(body, quote=False), [], {"urgency": ("y", urgency)}, self.expire_ms))
        if self.bus_address is None and not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            self._warn_once("no desktop notifications: DBUS_SESSION_BUS_ADDRESS is not set "
                            "(not in a desktop session?)")
            return False
        try:
            if self._conn is None:
                self._conn = open_dbus_connection(bus=self.bus_address or "SESSION")
            reply = self._conn.send_and_get_reply(call, timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # jeepney raises many kinds (OSError, KeyError, TimeoutError...)
            self._drop_connection()
            self._warn_once(f"cannot reach the notification service: {type(exc).__name__}: {exc}")
            return False
        if reply.header.message_type.name != "method_return":
            self._warn_once(f"the notification service refused: {reply.body}")
            return False
        self._last_id = int(reply.body[0])
        self._warned = ""
        return True

    def _warn_once(self, message: str) -> None:
        if message != self._warned:
            log.warning("%s", message)
            self._warned = message

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                log.debug("closing the D-Bus connection failed", exc_info=True)

    def close(self) -> None:
        self._drop_connection()
