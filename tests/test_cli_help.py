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


def test_a_users_module_in_the_current_folder_resolves_from_yaml_without_pythonpath(tmp_path):
    # The console script's sys.path starts with its bin folder, not the current one: a YAML naming
    # `my_variants.MyGRPO` used to need PYTHONPATH=. (python -m puts the current folder first).
    script = Path(sys.executable).parent / "rftlab"
    assert script.exists(), "the rftlab console script is installed by `make install`"
    (tmp_path / "my_variants.py").write_text(
        "from rftlab import GRPO\n\n\nclass MyGRPO(GRPO):\n    pass\n\n\n"
        "def short(completions, **_):\n    return [float(len(c) < 8) for c in completions]\n")
    (tmp_path / "config.yaml").write_text(
        "model: {class_path: my_variants.MyGRPO, init_args: {policy: tiny}}\n"
        "data:\n  class_path: rftlab.RolloutDataModule\n  init_args:\n"
        "    task: {class_path: rftlab.tasks.Arithmetic}\n    rewards: {short: my_variants.short}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(script), "fit", "--config", "config.yaml", "--print_config"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: my_variants.MyGRPO" in out.stdout and "my_variants.short" in out.stdout


BAD_CONFIG = """model: {{class_path: rftlab.GRPO, init_args: {{policy: tiny, lr: {lr}}}}}
data:
  class_path: rftlab.RolloutDataModule
  init_args: {{task: {{class_path: rftlab.tasks.Arithmetic}}}}
trainer: {{max_steps: 1, logger: false}}
"""


@pytest.mark.parametrize("lr, says", [("-1", "lr=-1.0 is invalid: must be a finite number > 0"),
                                      ("abc", 'Parser key "lr"')])
def test_a_bad_value_in_yaml_is_a_short_error_and_debug_shows_the_traceback(tmp_path, capsys, lr, says):
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIG.format(lr=lr))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert says in err and "--debug" in err, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert len(err.strip().splitlines()) <= 12, err
    with pytest.raises(Exception) as raised:
        main(["fit", "--config", str(config), "--debug"])
    assert says in "".join(str(e) for e in _chain(raised.value))


def _chain(err):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _parsers():
    from rftlab.demo import demo_parser
    from rftlab.experiments.cli import compare_parser, evaluate_parser
    from rftlab.experiments.generation import generate_parser
    from rftlab.models.export import export_parser

    return {"compare": compare_parser(), "evaluate": evaluate_parser(), "export": export_parser(),
            "generate": generate_parser(), "demo": demo_parser()}


def test_every_flag_is_spelled_with_underscores_as_lightningclis_are():
    # LightningCLI's own flags are --ckpt_path, --seed_everything; one spelling across subcommands.
    # A dashed spelling may remain as an alias, but help and docs show the underscore one.
    for name, parser in _parsers().items():
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o not in ("--help", "--print_config")]
            if longs:
                assert "-" not in longs[0][2:], f"rftlab {name}: {longs[0]} (use {longs[0][:2] + longs[0][2:].replace('-', '_')})"


def test_dashed_aliases_still_parse():
    from rftlab.demo import demo_parser
    from rftlab.models.export import export_parser

    assert export_parser().parse_args(["--ckpt", "a", "--out", "b", "--adapter-only"]).adapter_only is True
    assert demo_parser().parse_args(["--eval-every", "5", "--ckpt-path", "x"]).eval_every == 5
