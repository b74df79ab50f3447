"""`rftlab --help` lists every subcommand; the console script does not warn on every call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rftlab.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_top_level_help_lists_every_subcommand(argv, capsys):
    main(argv)
    out = capsys.readouterr().out
    for name in ["fit", "validate", "test", "predict", *SUBCOMMANDS]:
        assert f"\n  {name} " in out, f"{name} missing from rftlab --help:\n{out}"


def test_the_console_script_does_not_print_lightnings_args_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from rftlab.cli import main; sys.argv = ['rftlab', 'fit', '--help']; main()"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--model" in out.stdout
    assert "args parameter" not in out.stderr, out.stderr[-2000:]
