"""Multi-process training: Lightning DDP on CPU (2 processes, gloo), and the GPU recipes' guards.

The DDP run is a subprocess (``reliability_ddp_script.py``; Lightning re-launches it for rank 1)
that trains GRPO and then DAPO for 4 steps; the assertions read what each process recorded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rftlab import RolloutDataModule
from rftlab.core import group_advantages
from rftlab.tasks import Arithmetic
from reliability_helpers import parity, subprocess_env

SCRIPT = Path(__file__).with_name("reliability_ddp_script.py")
CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = subprocess_env()
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {a: [torch.load(out / f"{a}_rank{r}.pt", weights_only=False) for r in (0, 1)]
            for a in ("grpo", "dapo", "multiturn")}
    runs["checkpoint"] = out / "dapo.ckpt"
    return runs


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_both_processes_take_the_same_steps_and_end_with_the_same_weights(ddp_runs, algorithm):
    ranks = ddp_runs[algorithm]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert [[s["step"] for s in r["steps"]] for r in ranks] == [[1, 2, 3, 4]] * 2
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_each_group_stays_on_one_process(ddp_runs, algorithm):
    ranks = ddp_runs[algorithm]
    prompts = [{p for s in r["steps"] for p in s["prompts"]} for r in ranks]
    assert prompts[0] and prompts[1] and not prompts[0] & prompts[1], "processes sample disjoint prompts"
    for rank in ranks:
        for step in rank["steps"]:
            group, rewards = torch.tensor(step["group"]), torch.tensor(step["rewards"])
            for g in group.unique():
                assert len({step["prompts"][i] for i in (group == g).nonzero().flatten().tolist()}) == 1
            # advantages come from this process's own groups only (G = 2 consecutive completions)
            expected = group_advantages(rewards, 2)
            torch.testing.assert_close(torch.tensor(step["seq_advantages"]), expected)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_logged_metrics_are_reduced_over_processes(ddp_runs, algorithm):
    ranks = ddp_runs[algorithm]
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        n0, n1 = len(s0["rewards"]), len(s1["rewards"])
        expected = (s0["local"]["reward/mean"] * n0 + s1["local"]["reward/mean"] * n1) / (n0 + n1)
        assert s0["logged"]["reward/mean"] == pytest.approx(expected) == s1["logged"]["reward/mean"]
    if algorithm == "dapo":  # the processes saw different rewards, so the reduction is not a no-op
        assert any(s0["local"]["reward/mean"] != s1["local"]["reward/mean"] for s0, s1 in zip(*(r["steps"] for r in ranks)))


def test_episodes_of_different_turn_counts_keep_processes_in_step(ddp_runs):
    r0, r1 = ddp_runs["multiturn"]
    assert r0["global_step"] == r1["global_step"] == 4
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in r1["steps"]]
    turns = [[s["local"]["episodes/turns_mean"] for s in r["steps"]] for r in (r0, r1)]
    assert all(t == 1.0 for t in turns[0]) and max(turns[1]) > 1.0  # rank 1's episodes run longer
    for name, weight in r0["weights"].items():  # DDP averaged the same gradients on both
        torch.testing.assert_close(weight, r1["weights"][name])


def test_a_nonfinite_loss_on_one_process_is_skipped_by_both(ddp_runs):
    ranks = ddp_runs["grpo"]
    assert [r["nonfinite_steps"] for r in ranks] == [1, 1]
    assert [r["steps"][1]["logged"]["faults/nonfinite_steps"] for r in ranks] == [1.0, 1.0]


def test_uneven_dynamic_sampling_keeps_processes_in_step(ddp_runs):
    ranks = ddp_runs["dapo"]
    gen = [[s["local"]["dynamic_sampling/gen_batches"] for s in r["steps"]] for r in ranks]
    kept = [[s["local"]["dynamic_sampling/kept_fraction"] for s in r["steps"]] for r in ranks]
    assert gen == [[1.0] * 4, [2.0] * 4], "rank 1 needed a second generation round every time"
    assert kept[0] != kept[1]
    # Rank 1 kept one varied group and was topped up to num_minibatches=2 with a zero-variance one
    # (zero advantage): still 2 minibatches, 2 steps per rollout, like rank 0.
    advantages = [torch.tensor(s["seq_advantages"]).abs().sum().item() for s in ranks[1]["steps"]]
    assert sorted(a == 0 for a in advantages) == [False, False, True, True]


def test_the_checkpoint_holds_every_process_s_stream_and_generators(ddp_runs):
    checkpoint = torch.load(ddp_runs["checkpoint"], weights_only=True)
    stream, ours = checkpoint["RolloutDataModule"], checkpoint["rftlab"]
    assert stream["world_size"] == 2 and len(stream["ranks"]) == 2 and len(ours["rng"]) == 2
    # rank 1 drew two generation rounds per rollout: its prompt stream is twice as far along
    assert [r["prompt_cursor"] for r in stream["ranks"]] == [4, 8]
    for r in (0, 1):  # the script seeded process r with 1000 + r right before saving
        assert torch.equal(ours["rng"][r]["torch"], torch.Generator().manual_seed(1000 + r).get_state())


def _fake_trainer(strategy_name: str, **strategy_attrs) -> SimpleNamespace:
    strategy = type(strategy_name, (), strategy_attrs)()
    return SimpleNamespace(strategy=strategy, max_steps=10, val_check_interval=1.0, limit_val_batches=1.0)


@pytest.mark.parametrize("strategy, attrs", [
    ("FSDPStrategy", {}),
    ("DeepSpeedStrategy", {"config": {"zero_optimization": {"stage": 3}}}),
])
def test_sharded_strategies_refuse_the_rftlab_sampler(strategy, attrs):
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity})
    with pytest.raises(ValueError, match=f"sampler_backend='rftlab' cannot sample under {strategy}.*sampler_backend='hf'"):
        dm.check_trainer(_fake_trainer(strategy, **attrs), "fit")
    RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}, sampler_backend="hf").check_trainer(
        _fake_trainer(strategy, **attrs), "fit")
    # ZeRO stage 2 keeps whole weights on every process: rftlab's own loop is fine there
    dm.check_trainer(_fake_trainer("DeepSpeedStrategy", config={"zero_optimization": {"stage": 2}}), "fit")


def test_the_fsdp_recipe_trains_on_two_cpu_processes_and_exports(tmp_path):
    # configs/grpo_fsdp.yaml as written (FSDP2, full fine-tuning, a sharded reference, rftlab's own
    # sampler in lockstep), with CPU and tiny-model overrides: it trains, writes a sharded
    # checkpoint folder, and rftlab export turns that folder into a transformers model.
    env = subprocess_env()
    env.pop("LOCAL_RANK", None)
    cli = [sys.executable, "-m", "rftlab.cli"]
    fit = subprocess.run(cli + [
        "fit", "--config", str(CONFIGS / "grpo_fsdp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--model.init_args.policy", "tiny", "--model.init_args.log.validate_at_start", "false",
        "--data.init_args.prompts_per_step", "1", "--data.init_args.num_generations", "2",
        "--data.init_args.max_new_tokens", "4", "--data.init_args.task.init_args.num_test", "4",
    ], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and (folder / ".metadata").is_file()
    export = subprocess.run(cli + ["export", "--ckpt", str(folder), "--out", str(tmp_path / "exported")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "exported" / "model.safetensors").is_file()

def test_fsdp2_lets_the_rftlab_sampler_run_and_refuses_vllm():
    # Under ModelParallelStrategy (FSDP2Strategy) rftlab's own loop decodes in lockstep; vLLM,
    # which would need whole weights in one process, is refused at setup.
    from rftlab.models import FSDP2Strategy

    trainer = SimpleNamespace(strategy=FSDP2Strategy(), max_steps=10, val_check_interval=1.0, limit_val_batches=1.0,
                              world_size=2)
    RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}).check_trainer(trainer, "fit")
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity})
    object.__setattr__(dm.sampling, "backend", "vllm")  # vllm is not installed here: past its import check
    with pytest.raises(ValueError, match=r"sampler_backend='vllm' supports one process \(one engine\), got FSDP2Strategy"):
        dm.check_trainer(trainer, "fit")


def test_multi_turn_episodes_are_refused_under_sharded_weights():
    from rftlab.environments import TryAgain
    from rftlab.models import FSDP2Strategy

    trainer = SimpleNamespace(strategy=FSDP2Strategy(), max_steps=10, val_check_interval=1.0, limit_val_batches=1.0,
                              world_size=2)
    task = Arithmetic(num_test=0)
    dm = RolloutDataModule(task=task, rewards={"parity": parity}, environment=TryAgain(task))
    with pytest.raises(ValueError, match="multi-turn episodes .* cannot be sampled under FSDP2Strategy"):
        dm.check_trainer(trainer, "fit")

