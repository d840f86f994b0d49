"""``cli.console_main``: the command in a process of its own (``python -m``, the script)."""

from __future__ import annotations

import gc

import pytest

from trio_imappool import __main__ as dunder_main
from trio_imappool.cli import _main


def test_the_console_entry_runs_main_between_two_freezes_of_the_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))

    def fake_main(argv: object = None) -> int:
        calls.append("main")
        return 3

    monkeypatch.setattr(_main, "main", fake_main)
    assert _main.console_main() == 3
    assert calls == ["freeze", "main", "freeze"]

    def failing_main(argv: object = None) -> int:
        calls.append("main")
        raise KeyboardInterrupt

    calls.clear()
    monkeypatch.setattr(_main, "main", failing_main)
    with pytest.raises(KeyboardInterrupt):
        _main.console_main()
    assert calls == ["freeze", "main", "freeze"]


def test_python_dash_m_uses_the_console_entry_and_keeps_the_old_name() -> None:
    assert dunder_main.console_main is _main.console_main
    assert dunder_main.main is _main.main  # what scripts of earlier installations import
