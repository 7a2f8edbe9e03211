"""Window-to-VM rules (pure, every rule's allow and deny) and notifications on a private bus."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.lab import NotificationReceiver, SessionBus
from broker.notify import Notifier
from broker.windows import DEFAULT_RULES, load_rules, vm_for_window

VIEWER, QEMU = ("virt-viewer", "Virt-viewer"), ("qemu-system-x86_64", "Qemu-system-x86_64")


@pytest.mark.parametrize(("wm_class", "title", "vm"), [
    (VIEWER, "alice - Virt Viewer", "alice"),
    (VIEWER, "alice (1) - Virt Viewer", "alice"),
    (("remote-viewer", "Remote-viewer"), "bob - Remote Viewer", "bob"),
    (("virt-manager", "Virt-manager"), "win-10 on QEMU/KVM", "win-10"),
    (("virt-manager", "Virt-manager"), "dev_box on QEMU/KVM User session", "dev_box"),
    (QEMU, "QEMU (alice)", "alice"),
    (QEMU, "QEMU (alice) - Press Ctrl+Alt+G to release grab", "alice"),
    (("qemu", "Qemu"), "QEMU (bob)", "bob"),
    # deny: right title, wrong class; right class, wrong title; an unsafe name
    (("firefox", "Firefox"), "QEMU (bob)", None),
    (("xterm", "XTerm"), "alice - Virt Viewer", None),
    (VIEWER, "Virt Viewer", None),
    (VIEWER, "alice - Virt Viewer - extra", None),
    (QEMU, "QEMU", None),
    (QEMU, "QEMU (../etc)", None),
    (("virt-manager", "Virt-manager"), "Virtual Machine Manager", None),
    ((), "QEMU (bob)", None),
])
def test_default_rules(wm_class: tuple[str, ...], title: str, vm: str | None) -> None:
    assert vm_for_window(wm_class, title, DEFAULT_RULES) == vm


def test_a_rule_file_comes_first_and_can_drop_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "windows.toml"
    path.write_text('[[window]]\nclass = "remote-viewer"\ntitle = "spice://host:5901.*"\nvm = "alice"\n')
    rules = load_rules(path)
    assert vm_for_window(("remote-viewer",), "spice://host:5901 - Remote Viewer", rules) == "alice"
    assert vm_for_window(QEMU, "QEMU (bob)", rules) == "bob"
    path.write_text('defaults = false\n[[window]]\nclass = "x"\ntitle = "(?P<vm>\\\\w+)!"\n')
    rules = load_rules(path)
    assert vm_for_window(("x",), "carol!", rules) == "carol"
    assert vm_for_window(QEMU, "QEMU (bob)", rules) is None


@pytest.mark.parametrize(("text", "message"), [
    ("[[window]\n", "not valid TOML"),
    ("colour = 1\n", "unknown keys ['colour']"),
    ("[[window]]\nclass = 'x'\n", "needs both class and title"),
    ("[[window]]\nclass = 'x'\ntitle = 'no group'\n", "needs a (?P<vm>...) group"),
    ("[[window]]\nclass = '('\ntitle = '(?P<vm>x)'\n", "bad pattern"),
    ("[[window]]\nclass = 'x'\ntitle = 'y'\nvm = '../x'\n", "not a safe identifier"),
    ("[[window]]\nclass = 'x'\ntitle = 'y'\nvm = 3\n", "expected string keys"),
    ("defaults = 'yes'\n", "'defaults' must be true or false"),
])
def test_bad_rule_files_are_refused_clearly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "windows.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert message in str(info.value)


@pytest.fixture
def receiver() -> Iterator[tuple[str, NotificationReceiver]]:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (apt-get install dbus)")
    pytest.importorskip("jeepney", reason="jeepney not installed (pip install -e '.[desktop]')")
    with SessionBus() as bus:
        recv = NotificationReceiver(bus.address)
        try:
            yield bus.address, recv
        finally:
            recv.close()


def test_notifications_reach_a_real_receiver_escaped_with_urgency(
        receiver: tuple[str, NotificationReceiver]) -> None:
    address, recv = receiver
    notifier = Notifier(bus_address=address)
    try:
        assert notifier.notify("ivclip copy", "copied 5 bytes from alice (text/plain;charset=utf-8)", ok=True)
        assert notifier.notify("ivclip paste", "refused: not valid text for <bob>", ok=False)
    finally:
        notifier.close()
    assert recv.wait_for(2) == [
        ("ivclip copy", "copied 5 bytes from alice (text/plain;charset=utf-8)", 1),
        ("ivclip paste", "refused: not valid text for &lt;bob&gt;", 2),
    ]


def test_without_a_notification_service_the_outcome_is_logged(
        receiver: tuple[str, NotificationReceiver], caplog: pytest.LogCaptureFixture) -> None:
    address, recv = receiver
    recv.close()  # the bus stays, but nobody serves notifications any more
    notifier = Notifier(bus_address=address)
    with caplog.at_level("INFO"):
        assert not notifier.notify("ivclip copy", "copied 5 bytes from alice", ok=True)
        assert not notifier.notify("ivclip copy", "copied 6 bytes from alice", ok=True)
    notifier.close()
    text = caplog.text
    assert "copied 5 bytes from alice" in text and "copied 6 bytes from alice" in text
    assert text.count("the notification service refused") == 1  # warned once, not per gesture
