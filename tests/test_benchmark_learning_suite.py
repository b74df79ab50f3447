"""benchmarks/learning_suite.py on the tiny model: per-task results, the report's table and figure."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("reasoning_gym")


def test_every_suite_task_builds_and_is_of_a_kind():
    suite = load_benchmark("learning_suite")
    assert len(suite.SUITE) >= 8
    assert {kind for kind, *_ in suite.SUITE} >= {"arithmetic", "counting", "strings", "logic", "sequences"}
    for _, name, options, extract in suite.SUITE:
        task = suite.make_task(name, options, extract, num_test=2, seed=0)
        assert len(task.test_rows()) == 2 and task.train_rows()[0]["entry"]["question"]
    # 19% -> 29% is a gain of 10 points, whatever the floats' last bits say
    assert suite.gain({"accuracy_before": 0.19, "accuracy_after": 0.29}) == 10
    assert 100 * (0.29 - 0.19) < 10


def test_two_recipes_run_and_the_report_compares_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    suite = load_benchmark("learning_suite")
    common = ["--policy", "tiny", "--precision", "32-true", "--threads", "1", "--steps", "2", "--num-test", "4",
              "--max-new-tokens", "4", "--tasks", "syllogism,chain_sum"]
    for recipe in ("fast", "sparse"):
        suite.main(common + ["--recipe", recipe, "--out", str(tmp_path / recipe)])
    result = json.loads((tmp_path / "sparse" / "chain_sum.json").read_text())
    assert result["steps"] == 2 and [e["step"] for e in result["evals"]] == [0, 1, 2]
    assert result["recipe"]["dynamic_sampling"] and "entropy" in result["steps_log"][-1]
    assert json.loads((tmp_path / "fast" / "chain_sum.json").read_text())["recipe"]["temperature"] == 0.7
    suite.main(["--report", str(tmp_path / "fast"), str(tmp_path / "sparse"), "--report-out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "suite.md").read_text()
    assert "fast: after" in table and "sparse: gain" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`chain_sum`", "`syllogism`"]  # the suite's order
    before = 100 * result["accuracy_before"]
    constant = 100 * result["majority_share"]
    assert 0 < constant <= 100 and f"| `chain_sum` | arithmetic | {constant:.0f}% | {before:.0f}% |" in table
    assert (tmp_path / "report" / "suite.png").stat().st_size > 0


def test_the_trl_side_refuses_what_it_cannot_run_before_any_work(tmp_path, monkeypatch):
    suite = load_benchmark("learning_suite")
    common = ["--engine", "trl", "--policy", "tiny", "--tasks", "chain_sum", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="plain GRPO recipes only.*--recipe sparse.*fast"):
        suite.main(common + ["--recipe", "sparse"])
    monkeypatch.setattr(suite, "TRL_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(SystemExit, match="needs TRL in its own venv"):
        suite.main(common + ["--recipe", "readme"])
    assert not (tmp_path / "out").exists()


def test_every_suite_task_has_an_easy_stage_and_the_curriculum_recipe_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    suite = load_benchmark("learning_suite")
    assert set(suite.EASY) == {name for _, name, *_ in suite.SUITE}
    for _, name, options, extract in suite.SUITE:  # every easy configuration is one reasoning-gym accepts
        assert suite.make_task(name, suite.EASY[name], extract, num_test=0, seed=0).train_rows()[0]["answer"]
    assert not suite.is_plain_grpo(suite.RECIPES["curriculum"]), "TRL has no curriculum: not a TRL recipe"
    suite.main(["--policy", "tiny", "--precision", "32-true", "--threads", "1", "--steps", "2", "--num-test", "4",
                "--max-new-tokens", "4", "--tasks", "chain_sum", "--recipe", "curriculum", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "chain_sum.json").read_text())
    assert result["recipe"]["curriculum"] == 0.5 and result["steps"] == 2
    assert len(result["steps_log"]) == 2 and [e["step"] for e in result["evals"]] == [0, 1, 2]


def test_every_recipe_builds_and_the_overlong_recipe_changes_only_the_penalty():
    suite = load_benchmark("learning_suite")
    modules = {name: suite.build_module(recipe, "tiny", 0) for name, recipe in suite.RECIPES.items()}
    copy, overlong = modules["copy"], modules["copy_overlong"]
    assert type(overlong).__name__ == "DAPO" and overlong.overlong.buffer_len == 16
    assert overlong.overlong.penalty_factor == 1.0
    assert overlong.loss_spec.agg == copy.loss_spec.agg == "seq-mean-token-mean"
    assert (overlong.clip_options.eps_low, overlong.clip_options.eps_high) == (copy.clip_options.eps_low, copy.clip_options.eps_high)
    assert overlong.forward_options.sampling_dtype == copy.forward_options.sampling_dtype == "bfloat16"
    assert not suite.is_plain_grpo(suite.RECIPES["copy_overlong"]), "TRL's GRPOTrainer has no overlong penalty"


def test_the_dynamic_sampling_recipe_differs_from_copy_only_in_dynamic_sampling():
    suite = load_benchmark("learning_suite")
    copy, ds = suite.RECIPES["copy"], suite.RECIPES["copy_ds"]
    assert ds["dynamic_sampling"] and not copy["dynamic_sampling"] and ds["max_gen_batches"] == 4
    def rest(recipe):
        return {k: v for k, v in recipe.items() if k not in ("dynamic_sampling", "max_gen_batches")}

    assert rest(ds) == rest(copy)
    assert not suite.is_plain_grpo(ds), "TRL's GRPOTrainer has no dynamic sampling"


def test_the_kl_recipe_differs_from_copy_only_in_beta_and_reaches_the_module():
    suite = load_benchmark("learning_suite")
    copy, kl = suite.RECIPES["copy"], suite.RECIPES["copy_kl"]
    assert {k: v for k, v in kl.items() if k != "beta"} == copy and "beta" not in copy
    assert suite.build_module(kl, "tiny", 0).beta == 0.04
    assert suite.build_module(copy, "tiny", 0).beta == 0.0


def test_the_learning_rate_recipe_differs_from_copy_only_in_lr():
    suite = load_benchmark("learning_suite")
    copy, fast = suite.RECIPES["copy"], suite.RECIPES["copy_lr4"]
    assert {k: v for k, v in fast.items() if k != "lr"} == {k: v for k, v in copy.items() if k != "lr"}
    assert fast["lr"] == 2 * copy["lr"] == 4e-4


def test_the_batch_recipe_differs_from_copy_only_in_prompts_per_step():
    suite = load_benchmark("learning_suite")
    copy, p8 = suite.RECIPES["copy"], suite.RECIPES["copy_p8"]
    assert {k: v for k, v in p8.items() if k != "prompts"} == {k: v for k, v in copy.items() if k != "prompts"}
    assert p8["prompts"] == 2 * copy["prompts"] == 8


def test_the_report_shows_each_seeds_own_untrained_and_constant_scores(tmp_path):
    suite = load_benchmark("learning_suite")
    def result(before, after, constant):
        return {"kind": "arithmetic", "name": "gcd", "accuracy_before": before, "accuracy_after": after,
                "majority_share": constant, "wall_minutes": 1.0, "steps_log": [{"entropy": 1.0}]}

    for folder, values in {"seed0": (0.27, 0.47, 0.29), "seed1": (0.33, 0.57, 0.36), "again": (0.27, 0.30, 0.29)}.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "gcd.json").write_text(json.dumps(result(*values)))
    table = suite.report([tmp_path / "seed0", tmp_path / "seed1", tmp_path / "again"], tmp_path / "report")
    assert "| `gcd` | arithmetic | 29% / 36% | 27% / 33% | 47% | +20 | 57% | +24 | 30% | +3 |" in table


def test_the_plain_prompt_recipe_reaches_the_task_and_changes_nothing_else():
    import argparse

    suite = load_benchmark("learning_suite")
    copy, plain = suite.RECIPES["copy"], suite.RECIPES["copy_plain"]
    assert {k: v for k, v in plain.items() if k != "system_prompt"} == copy and "system_prompt" not in copy
    args = argparse.Namespace(num_test=2, seed=0, steps=2)
    _, name, options, extract = suite.SUITE[0]
    task = suite.make_training_task(name, options, extract, plain, args)
    default = suite.make_training_task(name, options, extract, copy, args)
    assert task.system_prompt == plain["system_prompt"] != default.system_prompt
    assert task.train_rows()[0]["prompt"][0] == {"role": "system", "content": plain["system_prompt"]}
    assert task.train_rows()[0]["prompt"][1:] == default.train_rows()[0]["prompt"][1:]


def test_the_passes_recipe_takes_two_optimizer_steps_per_rollout(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    suite = load_benchmark("learning_suite")
    copy, mu2 = suite.RECIPES["copy"], suite.RECIPES["copy_mu2"]
    assert {k: v for k, v in mu2.items() if k != "iterations"} == copy and mu2["iterations"] == 2
    assert not suite.is_plain_grpo(dict(suite.RECIPES["readme"], iterations=2))  # the TRL worker runs one pass per rollout
    suite.main(["--policy", "tiny", "--precision", "32-true", "--threads", "1", "--steps", "2", "--num-test", "2",
                "--max-new-tokens", "4", "--tasks", "syllogism", "--recipe", "copy_mu2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "syllogism.json").read_text())
    # 2 rollouts, 4 optimizer steps; held-out accuracy before, after the first rollout's passes, at the end
    assert (result["rollouts"], result["steps"]) == (2, 4) and [e["step"] for e in result["evals"]] == [0, 2, 4]
    assert len(result["steps_log"]) == 4


def test_the_dr_grpo_recipe_changes_only_the_advantage_and_the_aggregation():
    suite = load_benchmark("learning_suite")
    copy, dr = suite.RECIPES["copy"], suite.RECIPES["copy_dr"]
    assert {k: v for k, v in dr.items() if k != "module"} == {k: v for k, v in copy.items() if k != "module"}
    assert {k: v for k, v in dr["module"].items() if k not in ("advantage", "loss")} == copy["module"]
    module = suite.build_module(dr, "tiny", 0)
    assert (module.advantage_spec.name, module.loss_spec.agg) == ("dr_grpo", "seq-mean-token-sum-norm")
    assert suite.build_module(copy, "tiny", 0).advantage_spec.name == "grpo"
