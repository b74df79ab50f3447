"""Variant and Budget specs, imports by path, config diffs, and the shipped compare configs."""

from __future__ import annotations

from pathlib import Path

import pytest

import rftlab
from rftlab import GRPO
from rftlab.cli import SUBCOMMANDS
from rftlab.experiments import Budget, Variant, config_diff, import_object, instantiate
from rftlab.experiments.cli import compare_parser
from rftlab.tasks import Arithmetic

COMPARE_CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("compare_*.yaml"))


class NotAnAlgorithm:
    pass


def test_variant_accepts_a_class_or_an_import_path():
    assert Variant("a", GRPO).algorithm_class() is GRPO
    assert Variant("b", "rftlab.GRPO").algorithm_path == "rftlab.algorithms.grpo.GRPO"
    spec = Variant.from_spec({"name": "c", "algorithm": "rftlab.algorithms.GRPO", "model": {"advantage": "dr_grpo"}})
    assert spec.algorithm_class() is GRPO and spec.model == {"advantage": "dr_grpo"} and spec.data == {}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "a b", "algorithm": "rftlab.GRPO"}, "name='a b' is invalid"),
        ({"name": "a", "algorithm": "rftlab.NoSuchAlgo"}, "variant 'a': algorithm='rftlab.NoSuchAlgo' cannot be imported"),
        ({"name": "a", "algorithm": f"{__name__}.NotAnAlgorithm"}, "must be a subclass of rftlab.RFTModule"),
        ({"name": "a", "algorithm": "rftlab.GRPO", "modle": {}}, "unknown key\\(s\\) \\['modle'\\]; allowed keys: name, algorithm, model, data"),
        ({"algorithm": "rftlab.GRPO"}, "has no 'name'"),
        ({"name": "a", "model": [1]}, "model=\\[1\\] is invalid"),
    ],
)
def test_bad_variants_are_reported(spec, message):
    with pytest.raises(ValueError, match=message):
        Variant.from_spec(spec)


@pytest.mark.parametrize(
    "spec, message",
    [({"steps": 0}, "steps=0 is invalid"), ({"tokens": 1.5}, "tokens=1.5"), ({"minutes": -1}, "minutes=-1"),
     ({"minutes": float("inf")}, "minutes=inf")],
)
def test_bad_budgets_are_reported(spec, message):
    with pytest.raises(ValueError, match=message):
        Budget.from_spec(spec)


def test_budget_forms():
    assert Budget.from_spec(5) == Budget(steps=5)
    assert Budget.from_spec({"minutes": 10}).describe() == "10 training minutes"
    assert Budget(steps=3, tokens=1000).describe() == "3 steps or 1,000 generated tokens"


def test_import_object_and_instantiate():
    assert import_object("rftlab.tasks.Arithmetic") is Arithmetic
    with pytest.raises(ValueError, match="not an import path"):
        import_object("Arithmetic")
    built = instantiate({"task": {"class_path": "rftlab.tasks.Arithmetic", "init_args": {"num_test": 3}}, "n": [1, {"x": 2}]})
    assert isinstance(built["task"], Arithmetic) and len(built["task"].test_rows()) == 3 and built["n"] == [1, {"x": 2}]
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['num_test'\\] next to class_path"):
        instantiate({"class_path": "rftlab.tasks.Arithmetic", "num_test": 3})


def test_config_diff_lists_only_what_the_variant_changes():
    shared_model = {"policy": "tiny", "lr": 1e-3}
    variant = Variant("v", GRPO, model={"lr": 1e-3, "advantage": "dr_grpo"}, data={"dynamic_sampling": True})
    assert config_diff(variant, shared_model, {"prompts_per_step": 2}) == {
        "algorithm": "rftlab.algorithms.grpo.GRPO", "model.advantage": "dr_grpo", "data.dynamic_sampling": True}


def test_compare_and_evaluate_are_rftlab_subcommands():
    assert set(SUBCOMMANDS) >= {"compare", "evaluate"}
    for target in SUBCOMMANDS.values():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=[p.name for p in COMPARE_CONFIGS])
def test_shipped_compare_config_parses_and_builds(path, tmp_path):
    import yaml

    from rftlab.experiments.compare import RunJob

    cfg = compare_parser().parse_args(["--config", str(path)]).as_dict()
    assert cfg["seeds"] and cfg["variants"]
    policy = cfg["model"].get("policy")
    if isinstance(policy, dict) and policy.get("init_checkpoint"):
        # A warm-up checkpoint (policy.init_checkpoint) must be what a shipped config writes (its
        # last.ckpt); a stand-in file takes its place here, as the constructors only check that the file exists.
        written = []
        for other in path.parent.glob("*.yaml"):
            for callback in (yaml.safe_load(other.read_text()).get("trainer") or {}).get("callbacks") or []:
                dirpath = (callback.get("init_args") or {}).get("dirpath")
                if dirpath:
                    written.append(f"{dirpath}/last.ckpt")
        assert policy["init_checkpoint"] in written
        (tmp_path / "warmup.ckpt").write_bytes(b"")
        policy["init_checkpoint"] = str(tmp_path / "warmup.ckpt")
    budget = Budget.from_spec(cfg["budget"])
    pending = [v["algorithm"] for v in cfg["variants"] if v["algorithm"].startswith("rftlab.")
               and not hasattr(rftlab, v["algorithm"].split(".")[1])]
    variants = [Variant.from_spec(v) for v in cfg["variants"] if v["algorithm"] not in pending]
    for variant in variants:
        job = RunJob(experiment=cfg["experiment"], variant=variant, seed=0, model=cfg["model"], data=cfg["data"],
                     budget=budget, eval_every=cfg["eval_every"], trainer=cfg["trainer"], logger="none", project="p",
                     output_dir="unused", threads=1, pass_at_k=None, dashboards=True)
        module, datamodule = job.build()  # constructors validate every option; no weights are loaded
        assert module.policy is None and isinstance(module, variant.algorithm_class())
    if pending:
        pytest.skip(f"{pending} not in rftlab yet (being written); the other variants build")


def test_wrong_budget_in_compare_config_is_reported(tmp_path):
    from rftlab.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("variants: [{name: a, algorithm: rftlab.GRPO}]\nmodel: {policy: tiny}\n"
                      "data: {task: {class_path: rftlab.tasks.Arithmetic}}\nbudget: {hours: 2}\n")
    with pytest.raises(ValueError, match="budget: unknown key\\(s\\) \\['hours'\\]"):
        main(["compare", "--config", str(config), "--output_dir", str(tmp_path / "out")])
