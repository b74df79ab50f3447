"""compare() end to end on the tiny model: files, W&B runs, determinism, budgets, plug-in variants."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_params_changed, trainable_snapshot

from rftlab import GRPO
from rftlab.experiments import Budget, Variant, compare
from rftlab.tasks import Arithmetic
from wandb_records import complete, find_run_files, read_config, read_history, read_run_info


def parity(completions, **_):
    """Reward with variance on random text (module level: worker processes import it by name)."""
    return [float(len(c) % 2 == 0) for c in completions]


class SignAdvantageGRPO(GRPO):
    """A user's own variant, defined outside the package: advantages are the sign of GRPO's.

    It records its trainable weights at the start and end of training, so the test can check that
    training through ``compare`` really updated it.
    """

    snapshots: list[tuple[dict, dict]] = []

    def compute_advantages(self, rollout):
        rollout = super().compute_advantages(rollout)
        rollout.seq_advantages = torch.sign(rollout.seq_advantages)
        rollout.advantages = rollout.seq_advantages.unsqueeze(1).expand_as(rollout.completion_mask).contiguous()
        return rollout

    def on_train_start(self):
        self._start = trainable_snapshot(self)

    def on_train_end(self):
        SignAdvantageGRPO.snapshots.append((self._start, trainable_snapshot(self)))


MODEL = dict(policy="tiny", lr=1e-2)


def data(**overrides):
    return dict(task=Arithmetic(num_test=2), rewards={"parity": parity}, prompts_per_step=2, num_generations=4,
                max_new_tokens=5, val_batch_size=4, **overrides)


def flat_keys(options, prefix=""):
    """``{"model": {"loss": {"agg": x}}}`` -> ``{"model.loss.agg": x}`` (W&B nests dotted config keys)."""
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run(tmp_path, variants, **kwargs):
    options = dict(model=MODEL, data=data(), seeds=[0], budget=Budget(steps=2), eval_every=None, logger="none",
                   output_dir=tmp_path / "out", verbose=False, dashboards=False)
    options.update(kwargs)
    return compare(variants, **options)


def rewards(run_result):
    return [row["reward/mean"] for row in run_result.steps]


def test_two_variants_write_table_csv_figure_and_wandb_runs(tmp_path):
    variants = [Variant("grpo", GRPO),
                Variant("dr-grpo", "rftlab.GRPO", model={"advantage": "dr_grpo", "loss": {"agg": "seq-mean-token-sum-norm"}})]
    result = run(tmp_path, variants, logger="wandb", experiment="tiny-exp", dashboards=True)
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert "| grpo |" in table and "| dr-grpo |" in table
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["grpo", "dr-grpo"]
    assert all(math.isfinite(float(r["final_reward_mean"])) for r in rows)
    assert float(rows[0]["steps_mean"]) == 2
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert result.figure == out / "comparison.png"
    for name in ("grpo-seed0", "dr-grpo-seed0"):
        assert {"steps.csv", "evals.csv", "summary.json"} <= {p.name for p in (out / "runs" / name).iterdir()}

    files = [complete(f) for f in find_run_files(out)]
    assert len(files) == 2, "one W&B run per (variant, seed)"
    infos = {read_run_info(f)["job_type"]: (read_run_info(f), read_config(f), read_history(f)) for f in files}
    assert set(infos) == {"grpo", "dr-grpo"}
    for variant, (info, config, history) in infos.items():
        assert info["group"] == "tiny-exp" and info["name"] == variant and "seed0" in info["tags"]
        assert config["variant"] == variant and config["seed"] == 0
        assert any("reward/mean" in row for row in history), "training metrics reached W&B"
        assert any("val/accuracy" in row for row in history)
    # W&B nests dotted keys; either form carries the change.
    flat = flat_keys(infos["dr-grpo"][1]["variant_diff"])
    assert flat["model.advantage"] == "dr_grpo" and flat["model.loss.agg"] == "seq-mean-token-sum-norm"
    assert "model.advantage" not in infos["grpo"][1]["variant_diff"] and not infos["grpo"][1]["variant_diff"].get("model")


def test_same_seed_same_variant_gives_identical_rewards(tmp_path):
    # Two arms with the same settings under different names: they must train identically.
    result = run(tmp_path, [Variant("a", GRPO), Variant("b", GRPO)], budget=Budget(steps=3))
    a, b = result.runs
    assert rewards(a) == rewards(b) and len(rewards(a)) == 3
    assert [r["loss/policy"] for r in a.steps] == [r["loss/policy"] for r in b.steps]
    other = run(tmp_path / "seed1", [Variant("a", GRPO)], seeds=[1], budget=Budget(steps=3)).runs[0]
    assert [r["loss/policy"] for r in a.steps] != [r["loss/policy"] for r in other.steps], \
        "a different seed must give a different run (otherwise the check above proves nothing)"


def test_a_plugin_variant_defined_outside_the_package_trains_through_compare(tmp_path):
    SignAdvantageGRPO.snapshots.clear()
    path = f"{__name__}.SignAdvantageGRPO"  # by import path, as a YAML config names it
    result = run(tmp_path, [Variant("sign", path)], budget=Budget(steps=3))
    assert result.runs[0].algorithm == path
    assert len(SignAdvantageGRPO.snapshots) == 1
    before, after = SignAdvantageGRPO.snapshots[0]
    assert_params_changed(before, after, require="any", message="the plug-in's weights did not change")
    # Its own advantages were used: |sign| averages to a multiple of 1/8 over 8 completions
    # (GRPO's standardised advantages average to values such as 0.866).
    abs_means = [row["advantages/abs_mean"] for row in result.runs[0].steps]
    assert all(abs(8 * v - round(8 * v)) < 1e-5 for v in abs_means) and max(abs_means) > 0, abs_means
    assert "| sign |" in result.markdown


def test_token_and_minute_budgets_stop_the_runs(tmp_path):
    result = run(tmp_path, [Variant("tok", GRPO)], budget=Budget(tokens=30, steps=50))
    tokens = [row["rollout/generated_tokens_total"] for row in result.runs[0].steps]
    assert tokens[-1] >= 30 and (len(tokens) == 1 or tokens[-2] < 30), tokens
    assert len(tokens) < 50
    timed = run(tmp_path / "m", [Variant("min", GRPO)], budget=Budget(minutes=1e-4, steps=50))
    assert len(timed.runs[0].steps) == 1, "a budget of 6 ms stops after the first step"


def test_dynamic_sampling_is_charged_for_every_generated_token(tmp_path):
    # Parity on 5-token completions: some groups have zero variance and are re-sampled.
    result = run(tmp_path, [Variant("ds", GRPO, data={"dynamic_sampling": True, "max_gen_batches": 3})],
                 budget=Budget(steps=3))
    steps = result.runs[0].steps
    kept = [row["completions/mean_length"] * 2 * 4 for row in steps]  # tokens of the groups kept
    total = steps[-1]["rollout/generated_tokens_total"]
    assert total >= sum(kept) - 1e-6
    assert result.runs[0].generated_tokens == total


def test_parallel_processes(tmp_path):
    # Identical settings in two worker processes must give identical rewards, as in one process.
    result = run(tmp_path, [Variant("a", GRPO), Variant("b", GRPO)], processes=2, threads=1)
    a, b = result.runs
    assert (a.variant, b.variant) == ("a", "b") and len(rewards(a)) == 2
    assert rewards(a) == rewards(b)
    assert (tmp_path / "out" / "results.md").exists() and (tmp_path / "out" / "runs" / "b-seed0" / "summary.json").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variants=[]), "variants is empty"),
        (dict(variants=[Variant("a", GRPO), Variant("a", GRPO)]), "repeated: \\['a'\\]"),
        (dict(logger="mlflow"), "logger='mlflow' is invalid: must be one of wandb, csv, tensorboard, none"),
        (dict(processes=0), "processes=0"),
        (dict(seeds=[]), "seeds=\\[\\]"),
        (dict(seeds=[1, 1]), "unique"),
        (dict(budget={"epochs": 2}), "unknown key\\(s\\) \\['epochs'\\]"),
        (dict(budget={}), "budget is empty"),
        (dict(model={**MODEL, "seed": 3}), "'seed' is set by compare"),
        # The seed's new place is the policy group; compare writes the run's seed there (policy.seed).
        (dict(model={**MODEL, "policy": {"model": "tiny", "seed": 3}}), "'policy.seed' is set by compare"),
        (dict(model={**MODEL, "lrr": 1e-3}), "variant 'a'.*lrr"),
        (dict(model={**MODEL, "lr": -1.0}), "variant 'a'.*lr=-1.0 is invalid"),
        (dict(data={"prompts_per_step": 2}), "'task' is required"),
        (dict(only=["zzz"]), "only=\\['zzz'\\]"),
        (dict(pass_at_k={"num_samples": 0}), "num_samples=0"),
    ],
)
def test_bad_options_raise_before_any_training(tmp_path, kwargs, message):
    options = dict(variants=[Variant("a", GRPO)], model=MODEL, data=data(), output_dir=tmp_path, verbose=False)
    options.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        compare(**options)
    assert not (Path(tmp_path) / "runs").exists(), "nothing may run when the configuration is wrong"


def test_rftlab_compare_command_trains_from_a_yaml_config(tmp_path, capsys):
    from rftlab.cli import main

    config = tmp_path / "compare.yaml"
    config.write_text(f"""
experiment: cli-exp
seeds: [0]
budget: {{steps: 5}}
eval_every: null
logger: csv
model: {{policy: tiny, lr: 1.0e-2}}
data:
  task: {{class_path: rftlab.tasks.Arithmetic, init_args: {{num_test: 2}}}}
  num_generations: 2
  rewards: {{parity: {{class_path: rftlab.rewards.RegexFormat, init_args: {{pattern: "^.{{0,12}}$"}}}}}}
  prompts_per_step: 2
  max_new_tokens: 4
variants:
  - {{name: grpo, algorithm: rftlab.GRPO}}
  - {{name: plugin, algorithm: {__name__}.SignAdvantageGRPO}}
""")
    main(["compare", "--config", str(config), "--budget", "{steps: 1}", "--only", "[plugin]", "--output_dir", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert "| plugin |" in (out / "results.md").read_text() and "| grpo |" not in (out / "results.md").read_text()
    assert "| plugin |" in capsys.readouterr().out, "the table is printed at the end"
    metrics = next((out / "csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"reward/mean", "reward/parity/mean", "val/accuracy", "rollout/generated_tokens_total"} <= set(metrics)
    summary = json.loads((out / "runs" / "plugin-seed0" / "summary.json").read_text())["summary"]
    assert summary["steps"] == 1 and summary["algorithm"] == f"{__name__}.SignAdvantageGRPO"


def test_reward_functions_named_by_import_path_train_in_compare_as_in_fit(tmp_path):
    # `rftlab fit` resolves `rewards: {parity: module.function}` through its typed parser; compare's
    # options are plain dicts, so the same YAML gave "'parity' is not callable (str)".
    result = run(tmp_path, [Variant("grpo", GRPO)], budget=Budget(steps=1),
                 data=data() | {"rewards": {"parity": f"{__name__}.parity"}}).runs[0]
    assert len(rewards(result)) == 1 and "reward/parity/mean" in result.steps[0]


def test_a_reward_named_by_a_wrong_import_path_fails_naming_the_reward(tmp_path):
    with pytest.raises(ValueError, match=r"rewards: 'parity'.*no_such_module\.parity"):
        run(tmp_path, [Variant("grpo", GRPO)], data=data() | {"rewards": {"parity": "no_such_module.parity"}})
