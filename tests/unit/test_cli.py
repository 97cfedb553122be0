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


def test_top_level_help_imports_no_subcommand_module() -> None:
    """`vistr --help` declares no subcommand's arguments, so none of their modules (or torch) load."""
    code = (
        "import sys; from vistr.cli import COMMANDS, main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "loaded = [m for m in ('torch', *(spec.partition('#')[0] for spec, _ in COMMANDS.values())) if m in sys.modules]\n"
        "print(loaded, file=sys.stderr); sys.exit(bool(loaded))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "synth" in done.stdout and "jobs" in done.stdout  # every subcommand is still listed


def test_the_requested_command_is_the_first_word_that_is_not_an_option() -> None:
    from vistr.cli import requested_command

    assert requested_command(["-h"]) == ""
    assert requested_command(["train", "cfg.yaml", "--resume"]) == "train"
    assert requested_command(["--help", "predict"]) == "predict"


def test_subcommand_help_does_not_import_torch() -> None:
    """`vistr CMD --help` answers at once (torch alone takes ~1 s to import): only `train`, whose
    module is the Ray Train worker, loads it at import."""
    code = (
        "import sys; from vistr.cli import COMMANDS, main\n"
        "heavy = []\n"
        "for name in COMMANDS:\n"
        "    if name == 'train':\n"
        "        continue\n"
        "    try: main([name, '--help'])\n"
        "    except SystemExit: pass\n"
        "    if 'torch' in sys.modules: heavy.append(name); break\n"
        "print(heavy, file=sys.stderr); sys.exit(bool(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
