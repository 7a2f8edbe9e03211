"""broker.policy: the pure decision, table-driven, and the parser's errors with line numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.policy import (
    ALLOW_ALL,
    Policy,
    Request,
    check_ceiling,
    check_names,
    decide,
    load_policy,
    parse_policy,
    size_limit,
    text_refusal,
)
from protocol.clipformat import PNG_MIME, PNG_SIGNATURE, TEXT_MIME, ClipItem

POLICY = """\
# a policy with one of every kind of rule
default = "deny"
denied_paste = "wipe"

[[rule]]                       # line 5
what = "clipboard"
source = "work"
target = "@source"
decision = "deny"

[[rule]]                       # line 11
what = "clipboard"
source = "work"
target = "personal"
decision = "allow"

[[rule]]                       # line 17
source = "untrusted"
target = "*"
decision = "deny"

[[rule]]                       # line 22
what = "file"
source = "host"
target = "*"
decision = "allow"

[[rule]]                       # line 28
what = "*"
source = "*"
target = "@source"
decision = "allow"

[[rule]]                       # line 34
what = "clipboard"
source = "*"
target = "vault"
decision = "deny"

[[rule]]                       # line 40
what = "clipboard"
source = "*"
target = "*"
decision = "allow"

[limits.clipboard]
"*" = "1M"
personal = 4096
untrusted = "64K"

[limits.file]
"*" = "1G"
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY, "test.toml")


# (what, source, target, size) -> (allowed, deciding line or None, words in the reason)
CASES = [
    # line 5: pasting work's content back into work is denied, before line 28 would allow it
    (("clipboard", "work", "work", 10), (False, 5, "line 5")),
    # line 11: work -> personal allowed (within personal's 4096-byte limit) ...
    (("clipboard", "work", "personal", 4096), (True, 11, "line 11")),
    # ... and denied over it, by the limit's line
    (("clipboard", "work", "personal", 4097), (False, 48, "over the clipboard limit of 4096")),
    # line 17 (what omitted = any): untrusted may paste nowhere, not even into itself (17 before 28)
    (("clipboard", "untrusted", "work", 1), (False, 17, "line 17")),
    (("clipboard", "untrusted", "untrusted", 1), (False, 17, "line 17")),
    (("file", "untrusted", "work", 1), (False, 17, "line 17")),
    # line 22: files from the host go anywhere; a file from a VM to the host is not covered ...
    (("file", "host", "vault", 5 << 20), (True, 22, "line 22")),
    (("file", "work", "host", 1), (False, None, "default deny")),
    # ... and a file from the host over the file limit is denied
    (("file", "host", "vault", (1 << 30) + 1), (False, 52, "over the file limit")),
    # line 28: any VM may get its own content back (except work and untrusted, above)
    (("clipboard", "personal", "personal", 100), (True, 28, "line 28")),
    (("file", "personal", "personal", 100), (True, 28, "line 28")),
    # line 34: nothing clipboard goes into the vault
    (("clipboard", "personal", "vault", 1), (False, 34, "line 34")),
    # line 40: the rest of the clipboard traffic is allowed, within the default 1M limit
    (("clipboard", "vault", "work", 1 << 20), (True, 40, "line 40")),
    (("clipboard", "vault", "work", (1 << 20) + 1), (False, 47, "limit of 1048576 bytes for vault")),
    # the source's own limit counts as much as the target's
    (("clipboard", "personal", "work", 4097), (False, 48, "4096 bytes for personal, the source")),
    # default deny: a file between two VMs matches no rule
    (("file", "personal", "work", 1), (False, None, "default deny")),
]


@pytest.mark.parametrize(("request_", "expected"), CASES, ids=["-".join(map(str, r)) for r, _ in CASES])
def test_every_rule_allows_and_denies_as_written(
    policy: Policy, request_: tuple[str, str, str, int], expected: tuple[bool, int | None, str]
) -> None:
    decision = decide(policy, Request(*request_))
    allowed, line, words = expected
    assert (decision.allow, decision.line) == (allowed, line), decision
    assert words in decision.reason
    assert decision.reason.startswith("allowed by policy" if allowed else "denied by policy")


def test_every_rule_is_exercised_by_the_table(policy: Policy) -> None:
    # A rule added to POLICY without a case of its own makes this fail.
    deciding = {expected[1] for _, expected in CASES}
    assert {rule.line for rule in policy.rules} <= deciding
    assert {rule.allow for rule in policy.rules} == {True, False}


def test_settings_are_parsed(policy: Policy) -> None:
    assert not policy.default_allow and not policy.keep_on_deny
    assert size_limit(policy, "clipboard", "personal") == 4096
    assert size_limit(policy, "clipboard", "vault") == 1 << 20  # the "*" entry
    assert size_limit(policy, "file", "vault") == 1 << 30
    assert size_limit(ALLOW_ALL, "clipboard", "vault") is None


@pytest.mark.parametrize(("text", "allowed"), [
    ("", False),  # a policy file without a default denies
    ('default = "deny"', False),
    ('default = "allow"', True),
])
def test_the_default(text: str, allowed: bool) -> None:
    decision = decide(parse_policy(text), Request("clipboard", "a", "b", 1))
    assert decision.allow is allowed and decision.line is None


def test_without_a_policy_file_everything_is_allowed_even_back_into_the_source() -> None:
    for what, source, target in [("clipboard", "a", "b"), ("clipboard", "a", "a"), ("file", "host", "a")]:
        assert decide(ALLOW_ALL, Request(what, source, target, 1 << 30)).allow


def test_first_match_wins_in_both_orders() -> None:
    allow_first = '[[rule]]\nsource="a"\ntarget="b"\ndecision="allow"\n' \
                  '[[rule]]\nsource="a"\ntarget="b"\ndecision="deny"\n'
    deny_first = allow_first.replace('"allow"', '"x"').replace('"deny"', '"allow"').replace('"x"', '"deny"')
    request = Request("clipboard", "a", "b", 1)
    assert decide(parse_policy(allow_first), request).allow
    assert not decide(parse_policy(deny_first), request).allow


def test_pasting_back_into_the_source_is_a_rule_like_any_other() -> None:
    deny_self = parse_policy('default = "allow"\n[[rule]]\nsource="*"\ntarget="@source"\ndecision="deny"\n')
    assert not decide(deny_self, Request("clipboard", "a", "a", 1)).allow
    assert decide(deny_self, Request("clipboard", "a", "b", 1)).allow
    allow_self = parse_policy('[[rule]]\nsource="*"\ntarget="@source"\ndecision="allow"\n')
    assert decide(allow_self, Request("clipboard", "a", "a", 1)).allow
    assert not decide(allow_self, Request("clipboard", "a", "b", 1)).allow


# (policy text, line, words in the message)
BAD = [
    ('default = "allow"\nfoo = 1\n', 2, "unknown setting 'foo'"),
    ('default = "maybe"\n', 1, "default must be 'allow' or 'deny'"),
    ('denied_paste = "burn"\n', 1, "denied_paste must be"),
    ('default = "allow"\n\n[[rule]]\nsource = "a"\ntarget = "b"\ndecision = "perhaps"\n', 6,
     "decision must be"),
    ('[[rule]]\nsource = "a"\ntarget = "b"\n', 1, "the rule has no 'decision'"),
    ('[[rule]]\nsource = "a"\ntarget = "b"\ndecision = "allow"\n\n[[rule]]\nsource = "a"\n'
     'target = "b"\ndecision = "allow"\ncolour = "red"\n', 10, "unknown key 'colour'"),
    ('[[rule]]\nwhat = "screenshots"\nsource = "a"\ntarget = "b"\ndecision = "allow"\n', 2, "what must be"),
    ('[[rule]]\nsource = "../etc"\ntarget = "b"\ndecision = "allow"\n', 2, "not a safe identifier"),
    ('[[rule]]\nsource = "@source"\ntarget = "b"\ndecision = "allow"\n', 2, "source:"),
    ('[[rule]]\nsource = 7\ntarget = "b"\ndecision = "allow"\n', 2, "not a VM name"),
    ('[limits.clipboard]\nalice = "lots"\n', 2, "not a size"),
    ('[limits.clipboard]\nalice = true\n', 2, "not a size"),
    ('[limits.clipboard]\nalice = -1\n', 2, "out of range"),
    ('\n[limits.screen]\nalice = 1\n', 2, "unknown limits table 'screen'"),
    ('default = "allow"\n[[rule]\n', 2, "not valid TOML"),
    ('default = "allow"\ndefault = "deny"\n', 2, "not valid TOML"),  # a duplicate key
    ('rule = 5\n', 1, "[[rule]] tables"),
    ('[text]\nalice = "lax"\n', 2, "must be 'strict' or 'permissive'"),
    ('[text]\n"../x" = "strict"\n', 2, "not a safe identifier"),
    ('text = "strict"\n', 1, "[text] table"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD, ids=[b[2] for b in BAD])
def test_a_bad_file_is_refused_with_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, "p.toml")
    message = str(caught.value)
    assert message.startswith(f"p.toml: line {line}: "), message
    assert words in message


def test_names_the_broker_does_not_serve_are_refused_with_their_line() -> None:
    policy = parse_policy('[[rule]]\nsource = "alice"\ntarget = "bobb"\ndecision = "deny"\n', "p.toml")
    with pytest.raises(ConfigError, match=r"p.toml: line 1: the rule names 'bobb'"):
        check_names(policy, ["alice", "bob"])
    check_names(policy, ["alice", "bobb"])
    limits = parse_policy('[limits.clipboard]\n"*" = 5\ncarol = 7\n', "p.toml")
    with pytest.raises(ConfigError, match=r"line 3: a limit for 'carol'"):
        check_names(limits, ["alice"])


def test_text_policies_per_vm_with_a_default_and_their_lines() -> None:
    policy = parse_policy('default = "allow"\n[text]\n"*" = "strict"\nwork = "permissive"\n', "p.toml")
    trick = [ClipItem(TEXT_MIME, b"echo \x1b[2J")]
    fine = [ClipItem(TEXT_MIME, "\u2014 \U0001F600\r\n".encode()), ClipItem(PNG_MIME, PNG_SIGNATURE)]
    assert text_refusal(policy, "work", trick) is None
    assert text_refusal(policy, "bob", fine) is None
    assert text_refusal(policy, "bob", trick) == (
        f"not valid text for bob ({TEXT_MIME} holds the control character U+001B; "
        "text policy strict, p.toml line 3)")
    assert text_refusal(ALLOW_ALL, "bob", trick) is None  # no file: only the driver checks
    assert text_refusal(parse_policy('[text]\nwork = "strict"\n'), "bob", trick) is None
    with pytest.raises(ConfigError, match=r"p.toml: line 4: a text policy for 'work'"):
        check_names(policy, ["bob"])


def test_a_clipboard_limit_over_the_brokers_is_refused() -> None:
    policy = parse_policy('[limits.clipboard]\nalice = "32M"\n', "p.toml")
    with pytest.raises(ConfigError, match=r"line 2: the clipboard limit for alice .* --clipboard-limit"):
        check_ceiling(policy, 16 << 20)
    check_ceiling(policy, 32 << 20)


def test_load_policy_reads_a_file_and_reports_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    assert len(load_policy(path).rules) == 7
    with pytest.raises(ConfigError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.toml")


def test_a_policy_file_that_is_not_utf8_or_missing_gets_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_bytes(b'default = "deny"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"policy.toml: line 2: the policy file is not valid UTF-8"):
        load_policy(bad)
    with pytest.raises(ConfigError, match=r"cannot read the policy file .*missing.toml: No such file"):
        load_policy(tmp_path / "missing.toml")
