"""The `vistr` command: every subcommand is reachable and building the parser stays light."""

import subprocess
import sys

from vistr.cli import COMMANDS, build_parser, main


def test_every_command_has_help(capsys) -> None:
    parser = build_parser()
    help_text = parser.format_help()
    for name in COMMANDS:
        assert name in help_text
        try:
            main([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        assert "usage: vistr " + name in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_building_the_parser_imports_neither_ray_nor_mlflow() -> None:
    code = (
        "import sys; from vistr.cli import build_parser; build_parser(); "
        "leaked = [m for m in ('ray', 'mlflow') if m in sys.modules]; print(leaked); sys.exit(bool(leaked))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
