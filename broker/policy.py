"""Who may paste where: the policy file and the one pure function that decides.

The policy file is TOML, given with ``python -m broker serve --config PATH``::

    default = "deny"            # when no rule matches: "allow" or "deny" (default: deny)
    denied_paste = "keep"       # what a denied paste does to the global clipboard:
                                # "keep" it for another paste (default) or "wipe" it

    [[rule]]                    # rules are tried in file order; the first match wins
    what = "clipboard"          # "clipboard", "file" or "*"
    source = "work"             # a VM, "host" (file transfers from the host) or "*"
    target = "personal"         # a VM, "host", "*", or "@source": the VM the content came from
    decision = "deny"           # "allow" or "deny"

    [limits.clipboard]          # per-VM size limits; "*" for every VM not named
    "*" = "16M"                 # an integer of bytes, or a string with K, M or G (binary)
    untrusted = "64K"

    [limits.file]
    "*" = "1G"

    [text]                      # the paste-side text policy per VM; "*" for every VM not named
    "*" = "strict"              # "strict": valid UTF-8 text without control characters
    work = "permissive"         # (but tab, newline, CRLF); "permissive": the broker does not check

A limit applies to both directions: the most the broker takes from that VM
on a copy and the most it hands to it on a paste (or file transfer).  The
broker's ``--clipboard-limit`` stays the ceiling of every clipboard limit; it
bounds the memory a guest can make the broker allocate.

A VM's text policy is checked by the broker before a paste to that VM moves a
byte (:func:`text_refusal`); the guest driver's own ``--text-policy`` still
applies inside the guest, so a paste must pass both.

Without ``--config`` the broker uses :data:`ALLOW_ALL`: every pair allowed,
pasting back into the source VM included, with the broker's own limit.

:func:`decide` is pure (request in, decision out, no I/O, no clock); the
broker acts on the decision in one place.  Any error in the file refuses the
start with the file name and line number (:func:`load_policy`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from broker.names import HOST, check_vm_name
from protocol.clipformat import ClipItem, TextPolicy, check_item

WHATS = ("clipboard", "file")
ANY = "*"
SAME_AS_SOURCE = "@source"
_DECISIONS = {"allow": True, "deny": False}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MAX_LIMIT = 1 << 40
"""No limit may claim more than 1 TiB (the protocol's own bound on a transfer)."""


@dataclass(frozen=True, slots=True)
class Rule:
    line: int
    what: str  # "clipboard", "file" or "*"
    source: str  # a VM name, "host" or "*"
    target: str  # a VM name, "host", "*" or "@source"
    allow: bool

    def matches(self, what: str, source: str, target: str) -> bool:
        return (
            self.what in (ANY, what)
            and self.source in (ANY, source)
            and (
                self.target == ANY
                or self.target == target
                or (self.target == SAME_AS_SOURCE and target == source)
            )
        )

    def describe(self) -> str:
        return (f"line {self.line}: {self.what} {self.source} -> {self.target} "
                f"{'allow' if self.allow else 'deny'}")


@dataclass(frozen=True, slots=True)
class Limit:
    line: int
    size: int


@dataclass(frozen=True, slots=True)
class TextSetting:
    line: int
    policy: TextPolicy


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default_allow: bool = False
    keep_on_deny: bool = True
    limits: Mapping[str, Mapping[str, Limit]] = field(default_factory=dict)  # what -> vm|"*" -> Limit
    origin: str = "<built-in>"
    text: Mapping[str, TextSetting] = field(default_factory=dict)  # vm|"*" -> its text policy


ALLOW_ALL = Policy(default_allow=True, origin="no policy file: everything allowed")


@dataclass(frozen=True, slots=True)
class Request:
    what: str  # "clipboard" or "file"
    source: str
    target: str
    size: int


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    reason: str  # one line for the user and the audit log, never content
    line: int | None = None


def size_limit(policy: Policy, what: str, vm: str) -> int | None:
    """The policy's size limit for `vm` (its own entry, else "*"), or None when it has none."""
    table = policy.limits.get(what, {})
    limit = table.get(vm) or table.get(ANY)
    return None if limit is None else limit.size


def decide(policy: Policy, request: Request) -> Decision:
    """May `request.source`'s content of `request.size` bytes go to `request.target`?

    The first rule that matches decides, else the default; then the size limits
    of both ends must hold.  Pure: no I/O, no clock, no state.
    """
    for rule in policy.rules:
        if rule.matches(request.what, request.source, request.target):
            if not rule.allow:
                return Decision(False, f"denied by policy ({policy.origin} {rule.describe()})", rule.line)
            decision = Decision(True, f"allowed by policy ({policy.origin} {rule.describe()})", rule.line)
            break
    else:
        if not policy.default_allow:
            return Decision(False, f"denied by policy ({policy.origin}: default deny)")
        decision = Decision(True, f"allowed by policy ({policy.origin}: default allow)")
    for end, vm in (("source", request.source), ("target", request.target)):
        table = policy.limits.get(request.what, {})
        limit = table.get(vm) or table.get(ANY)
        if limit is not None and request.size > limit.size:
            return Decision(False, (
                f"denied by policy ({policy.origin} line {limit.line}: {request.size} bytes are over "
                f"the {request.what} limit of {limit.size} bytes for {vm}, the {end})"), limit.line)
    return decision


def text_refusal(policy: Policy, target: str, items: Sequence[ClipItem]) -> str | None:
    """Why the policy file's text policy for `target` refuses `items`, or None.

    Pure, like :func:`decide`; a VM the file gives no text policy (and no "*")
    is not checked here, only by its own driver.
    """
    setting = policy.text.get(target) or policy.text.get(ANY)
    if setting is None:
        return None
    for item in items:
        why = check_item(item, setting.policy)
        if why is not None:
            return (f"not valid text for {target} ({why}; text policy {setting.policy.value}, "
                    f"{policy.origin} line {setting.line})")
    return None


# Parsing ---------------------------------------------------------------------
class _Lines:
    """Where things are in the file, for error messages (tomllib gives no positions)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
    _KEY = re.compile(r"""^\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""")

    def __init__(self, text: str) -> None:
        self.tables: list[tuple[str, int]] = []  # (header name, line), in order
        self.keys: dict[tuple[str, int, str], int] = {}  # (table, occurrence, key) -> line
        seen: dict[str, int] = {}
        table, occurrence = "", 0
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER.match(line)
            if header:
                table = header.group(2).replace('"', "").replace("'", "").replace(" ", "")
                occurrence = seen[table] = seen.get(table, -1) + 1
                self.tables.append((table, number))
                continue
            key = self._KEY.match(line)
            if key:
                name = next(g for g in key.groups() if g is not None)
                self.keys.setdefault((table, occurrence, name), number)

    def table(self, name: str, occurrence: int = 0, default: int = 1) -> int:
        found = [line for table, line in self.tables if table == name]
        return found[occurrence] if occurrence < len(found) else default

    def key(self, table: str, key: str, occurrence: int = 0) -> int:
        return self.keys.get((table, occurrence, key)) or (self.table(table, occurrence) if table else 1)


def parse_size(value: object) -> int:
    """An integer of bytes, or '64K', '16M', '1GiB'.

    Raises:
        ValueError: anything else, or a size over 1 TiB.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    else:
        raise ValueError(f"{value!r} is not a size (examples: 65536, \"64K\", \"16M\")")
    if not 0 <= size <= MAX_LIMIT:
        raise ValueError(f"size {size} is out of range (0 to 1 TiB)")
    return size


def _name(value: object, *, target: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a VM name")
    if value in (ANY, HOST) or (target and value == SAME_AS_SOURCE):
        return value
    try:
        return check_vm_name(value)
    except ConfigError as exc:
        special = f'"{ANY}", "{HOST}"' + (f' or "{SAME_AS_SOURCE}"' if target else "")
        raise ValueError(f"{exc} (or use {special})") from None


def _choice(value: object, choices: Mapping[str, bool], what: str) -> bool:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be {' or '.join(repr(c) for c in choices)}, not {value!r}")
    return choices[value]


def parse_policy(text: str, origin: str = "<policy>") -> Policy:
    """Parse a policy file's text.

    Raises:
        ConfigError: invalid TOML, an unknown key, or a bad value; the message
            names `origin` and the line.
    """
    lines = _Lines(text)

    def fail(line: int, message: str) -> ConfigError:
        return ConfigError(f"{origin}: line {line}: {message}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise fail(int(found.group(1)) if found else 1, f"not valid TOML: {exc}") from None

    for key in data:
        if key not in ("default", "denied_paste", "rule", "limits", "text"):
            raise fail(lines.key("", key), f"unknown setting {key!r} (expected default, denied_paste, "
                                           "[[rule]], [limits.clipboard] / [limits.file] or [text])")
    try:
        default_allow = _choice(data.get("default", "deny"), _DECISIONS, "default")
    except ValueError as exc:
        raise fail(lines.key("", "default"), str(exc)) from None
    try:
        keep = _choice(data.get("denied_paste", "keep"), {"keep": True, "wipe": False}, "denied_paste")
    except ValueError as exc:
        raise fail(lines.key("", "denied_paste"), str(exc)) from None

    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise fail(lines.key("", "rule"), "rules are written as [[rule]] tables")
    rules: list[Rule] = []
    for index, raw in enumerate(raw_rules):
        line = lines.table("rule", index)
        if not isinstance(raw, dict):
            raise fail(line, "rules are written as [[rule]] tables")
        for key in raw:
            if key not in ("what", "source", "target", "decision"):
                raise fail(lines.key("rule", key, index),
                           f"unknown key {key!r} in a rule (expected what, source, target, decision)")
        for key in ("source", "target", "decision"):
            if key not in raw:
                raise fail(line, f"the rule has no {key!r}")
        try:
            what = raw.get("what", ANY)
            if what not in (*WHATS, ANY):
                raise ValueError(f"what must be 'clipboard', 'file' or '*', not {what!r}")
        except ValueError as exc:
            raise fail(lines.key("rule", "what", index), str(exc)) from None
        values: dict[str, Any] = {}
        for key in ("source", "target"):
            try:
                values[key] = _name(raw[key], target=key == "target")
            except ValueError as exc:
                raise fail(lines.key("rule", key, index), f"{key}: {exc}") from None
        try:
            allow = _choice(raw["decision"], _DECISIONS, "decision")
        except ValueError as exc:
            raise fail(lines.key("rule", "decision", index), str(exc)) from None
        rules.append(Rule(line, str(what), values["source"], values["target"], allow))

    raw_limits = data.get("limits", {})
    if not isinstance(raw_limits, dict):
        raise fail(lines.key("", "limits"), "limits are written as [limits.clipboard] and [limits.file]")
    limits: dict[str, dict[str, Limit]] = {}
    for what, table in raw_limits.items():
        if what not in WHATS or not isinstance(table, dict):
            raise fail(lines.table(f"limits.{what}", default=lines.key("limits", what)),
                       f"unknown limits table {what!r} (expected [limits.clipboard] or [limits.file])")
        limits[what] = {}
        for vm, value in table.items():
            line = lines.key(f"limits.{what}", vm)
            try:
                name = ANY if vm == ANY else check_vm_name(vm)
            except ConfigError as exc:
                raise fail(line, str(exc)) from None
            try:
                limits[what][name] = Limit(line, parse_size(value))
            except ValueError as exc:
                raise fail(line, f"limit for {vm}: {exc}") from None
    return Policy(tuple(rules), default_allow, keep, limits, origin, _parse_text(data, lines, fail))


def _parse_text(data: Mapping[str, Any], lines: _Lines, fail: Callable[[int, str], ConfigError]
                ) -> dict[str, TextSetting]:
    raw = data.get("text", {})
    if not isinstance(raw, dict):
        raise fail(lines.key("", "text"), 'text policies are written as a [text] table (vm = "strict")')
    choices = {policy.value: policy for policy in TextPolicy}
    settings: dict[str, TextSetting] = {}
    for vm, value in raw.items():
        line = lines.key("text", vm)
        try:
            name = ANY if vm == ANY else check_vm_name(vm)
        except ConfigError as exc:
            raise fail(line, str(exc)) from None
        if not isinstance(value, str) or value not in choices:
            raise fail(line, f"the text policy for {vm} must be 'strict' or 'permissive', not {value!r}")
        settings[name] = TextSetting(line, choices[value])
    return settings


def load_policy(path: Path) -> Policy:
    """Read and parse the policy file at `path`.

    Raises:
        ConfigError: it cannot be read, or :func:`parse_policy` refuses it.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the policy file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: the policy file is not valid UTF-8") from None
    return parse_policy(text, str(path))


def check_names(policy: Policy, vms: list[str]) -> None:
    """Refuse a policy that names a VM the broker does not serve: a typo in a deny
    rule would otherwise silently allow what it meant to deny.

    Raises:
        ConfigError: with the line of the first unknown name.
    """
    known = {*vms, ANY, HOST, SAME_AS_SOURCE}
    for rule in policy.rules:
        for name in (rule.source, rule.target):
            if name not in known:
                raise ConfigError(f"{policy.origin}: line {rule.line}: the rule names {name!r}, "
                                  f"which this broker does not serve ({', '.join(vms)})")
    for table in policy.limits.values():
        for name, limit in table.items():
            if name not in known:
                raise ConfigError(f"{policy.origin}: line {limit.line}: a limit for {name!r}, "
                                  f"which this broker does not serve ({', '.join(vms)})")
    for name, setting in policy.text.items():
        if name not in known:
            raise ConfigError(f"{policy.origin}: line {setting.line}: a text policy for {name!r}, "
                              f"which this broker does not serve ({', '.join(vms)})")


def check_ceiling(policy: Policy, ceiling: int) -> None:
    """Refuse clipboard limits over the broker's own limit (it bounds our memory).

    Raises:
        ConfigError: with the line of the first limit over `ceiling`.
    """
    for name, limit in policy.limits.get("clipboard", {}).items():
        if limit.size > ceiling:
            raise ConfigError(f"{policy.origin}: line {limit.line}: the clipboard limit for {name} "
                              f"({limit.size} bytes) is over the broker's --clipboard-limit of "
                              f"{ceiling} bytes")
