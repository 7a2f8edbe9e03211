"""Which VM a host window belongs to: rules on the window's class and title.

A rule matches when its class pattern fully matches the window's WM_CLASS
instance or class name (case-insensitively) and its title pattern fully
matches the title; the VM is the rule's fixed `vm`, or the title's ``vm``
group.  First match wins; no match means the window belongs to no VM.

Both patterns must match: a web page titled "QEMU (bob)" in a browser is not
bob's console.  The guests cannot create host windows or set these titles
(the viewers put the VM name there from the host's configuration), so a
hostile guest cannot make a host window look like another VM's.

The rule file (``--window-map FILE``, TOML) lists rules tried before the
built-in ones::

    defaults = true            # keep the built-in rules after these (default true)

    [[window]]
    class = "remote-viewer"
    title = 'spice://host:5901.*'
    vm = "alice"               # a fixed VM instead of the title's (?P<vm>...) group
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.names import check_vm_name

log = logging.getLogger(__name__)

_VM = r"(?P<vm>[A-Za-z0-9][A-Za-z0-9_-]*)"


@dataclass(frozen=True, slots=True)
class WindowRule:
    name: str
    wm_class: re.Pattern[str]
    title: re.Pattern[str]
    vm: str | None = None

    def match(self, wm_class: Sequence[str], title: str) -> str | None:
        """The VM this rule gives the window, or None."""
        if not any(self.wm_class.fullmatch(name) for name in wm_class):
            return None
        found = self.title.fullmatch(title)
        if found is None:
            return None
        return self.vm or found.group("vm")


def rule(name: str, wm_class: str, title: str, vm: str | None = None) -> WindowRule:
    """Build a rule.

    Raises:
        ConfigError: a pattern does not compile, the title has no ``vm`` group and no
            fixed `vm` is given, or `vm` is not a safe VM name.
    """
    try:
        class_re = re.compile(wm_class, re.IGNORECASE)
        title_re = re.compile(title)
    except re.error as exc:
        raise ConfigError(f"window rule {name}: bad pattern: {exc}") from None
    if vm is not None:
        check_vm_name(vm)
    elif "vm" not in title_re.groupindex:
        raise ConfigError(f"window rule {name}: the title pattern needs a (?P<vm>...) group or a vm")
    return WindowRule(name, class_re, title_re, vm)


DEFAULT_RULES: tuple[WindowRule, ...] = (
    # virt-viewer: "alice - Virt Viewer", or "alice (1) - Virt Viewer" with several displays.
    rule("virt-viewer", "virt-viewer", rf"{_VM}( \(\d+\))? - Virt Viewer"),
    # remote-viewer titles itself from --title, else from the URI; "--title alice" is the way.
    rule("remote-viewer", "remote-viewer", rf"{_VM}( \(\d+\))? - Remote Viewer"),
    # virt-manager's console window: "alice on QEMU/KVM" (or "... User session").
    rule("virt-manager", "virt-manager", rf"{_VM} on QEMU/KVM( User session)?"),
    # QEMU's own GTK and SDL windows: "QEMU (alice)", with a grab hint appended at times.
    rule("qemu", r"qemu(-system-[a-z0-9_]+)?", rf"QEMU \({_VM}\)( - Press .*| \[.*\])?"),
)


def vm_for_window(wm_class: Sequence[str], title: str, rules: Sequence[WindowRule]) -> str | None:
    """The VM that owns a window with this class and title, or None (first match wins)."""
    for candidate in rules:
        vm = candidate.match(wm_class, title)
        if vm is not None:
            return vm
    return None


def load_rules(path: Path) -> list[WindowRule]:
    """The rules of a window-map file, followed by the defaults unless it says ``defaults = false``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a rule is invalid.
    """
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"defaults", "window"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (expected defaults, [[window]])")
    defaults = doc.get("defaults", True)
    windows = doc.get("window", [])
    if not isinstance(defaults, bool) or not isinstance(windows, list):
        raise ConfigError(f"{path}: 'defaults' must be true or false and 'window' a list of tables")
    rules = []
    for index, entry in enumerate(windows, 1):
        where = f"{path}: window rule {index}"
        if not isinstance(entry, dict) or set(entry) - {"class", "title", "vm"} \
                or not all(isinstance(v, str) for v in entry.values()):
            raise ConfigError(f"{where}: expected string keys class, title and optionally vm")
        if "class" not in entry or "title" not in entry:
            raise ConfigError(f"{where}: needs both class and title")
        rules.append(rule(f"{index}", entry["class"], entry["title"], entry.get("vm")))
    return rules + list(DEFAULT_RULES) if defaults else rules
