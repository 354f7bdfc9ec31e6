"""The ``spacenet`` command: dispatch, help, and ``serve``'s configuration layers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spacenet.stream import cli, serve


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_command_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_subcommand_module_exists_and_has_main() -> None:
    import importlib

    for module_name, _ in cli.SUBCOMMANDS.values():
        assert callable(importlib.import_module(module_name).main)


def test_console_script_is_installed() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "spacenet.stream.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "serve" in proc.stdout


def test_serve_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACENET_TOPIC", "from-env")
    monkeypatch.setenv("SPACENET_EPOCHS", "7")
    args = serve.parse_args(["--topic", "from-flag", "--set", "lr=0.5", "--metrics-port", "-1"])
    cfg = serve.load_config(args)
    assert (cfg.topic, cfg.epochs, cfg.lr, cfg.metrics_port) == ("from-flag", 7, 0.5, -1)


def test_serve_rejects_bad_settings_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve.main(["--set", "epochz=3"]) == 2
    assert "unknown settings" in capsys.readouterr().err
