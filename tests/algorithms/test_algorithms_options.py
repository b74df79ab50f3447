"""Option groups: every invalid choice fails at construction naming the group and the field."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rftlab import (
    DAPO,
    GRPO,
    PPO,
    SFT,
    ClipOptions,
    CriticOptions,
    KLOptions,
    LossSpec,
    PolicySpec,
    SegmentRFT,
)

# (algorithm, keyword, bad value, the "group.field=value" the error must name)
INVALID = [
    (GRPO, "policy", {"model": ""}, "policy.model=''"),
    (GRPO, "policy", {"lora_target_modules": [], "lora": True}, "policy.lora_target_modules=[]"),
    (GRPO, "policy", {"dtype": "float64"}, "policy.dtype='float64'"),
    (GRPO, "policy", {"quantization": "nf3"}, "policy.quantization='nf3'"),
    (GRPO, "policy", {"quantization": "nf4"}, "policy.quantization='nf4'"),  # needs lora
    (GRPO, "policy", {"compute_dtype": "int8"}, "policy.compute_dtype='int8'"),
    (GRPO, "policy", {"lora_r": 0}, "policy.lora_r=0"),
    (GRPO, "policy", {"lora_alpha": -1}, "policy.lora_alpha=-1"),
    (GRPO, "policy", {"lora_dropout": 1.0}, "policy.lora_dropout=1.0"),
    (GRPO, "policy", {"reference_placement": "disk"}, "policy.reference_placement='disk'"),
    (GRPO, "policy", {"seed": -1}, "policy.seed=-1"),
    (GRPO, "policy", {"init_checkpoint": "/nonexistent.ckpt"}, "policy.init_checkpoint='/nonexistent.ckpt'"),
    (GRPO, "policy", {"nonsense": 1}, "policy.nonsense"),
    (GRPO, "forward", {"packing": "sometimes"}, "forward.packing='sometimes'"),
    (GRPO, "forward", {"sampling_dtype": "float32"}, "forward.sampling_dtype='float32'"),
    (GRPO, "forward", {"logprob_batch_size": 0}, "forward.logprob_batch_size=0"),
    (GRPO, "forward", {"share_prompt": "yes"}, "forward.share_prompt='yes'"),
    (GRPO, "optim", {"optimizer": "sgd"}, "optim.optimizer='sgd'"),
    (GRPO, "optim", {"weight_decay": -0.1}, "optim.weight_decay=-0.1"),
    (GRPO, "optim", {"warmup_steps": -1}, "optim.warmup_steps=-1"),
    (GRPO, "optim", {"max_grad_norm": -1.0}, "optim.max_grad_norm=-1.0"),
    (GRPO, "optim", {"max_nonfinite_steps": 0}, "optim.max_nonfinite_steps=0"),
    (GRPO, "kl", {"estimator": "k9"}, "kl.estimator='k9'"),
    (GRPO, "kl", {"estimator": "exact"}, "kl.estimator='exact'"),  # SegmentRFT only
    (GRPO, "kl", {"in_reward": True}, "kl.in_reward=True"),  # "grpo" takes no KL (reinforce_pp does)
    (GRPO, "kl", {"target": 6.0}, "kl.target=6.0"),  # PPO only
    (PPO, "kl", {"target": -1.0}, "kl.target=-1.0"),
    (GRPO, "kl", {"horizon": 0}, "kl.horizon=0"),
    (GRPO, "kl", {"log_every": 0}, "kl.log_every=0"),
    (GRPO, "kl", {"log_every": 5}, "kl.log_every=5"),  # full fine-tuning, beta 0: no reference
    (GRPO, "clip", {"eps_low": -0.1}, "clip.eps_low=-0.1"),
    (GRPO, "clip", {"eps_high": 0.1}, "clip.eps_high=0.1"),
    (GRPO, "clip", {"dual_clip": 1.0}, "clip.dual_clip=1.0"),
    (GRPO, "clip", {"dual_clip": float("inf")}, "clip.dual_clip=inf"),
    (GRPO, "log", {"every_n_steps": 0}, "log.every_n_steps=0"),
    (GRPO, "log", {"validate_at_start": 1}, "log.validate_at_start=1"),
    (GRPO, "advantage", "nope", "advantage.name='nope'"),
    (GRPO, "advantage", "gae", "advantage.options.values is missing"),  # GRPO supplies no values
    (GRPO, "advantage", {"name": "grpo", "options": {"scale": "nope"}}, "advantage.options.scale='nope'"),
    (GRPO, "advantage", {"name": "grpo", "options": {"temperature": 2}}, "advantage.options.temperature"),
    (GRPO, "loss", "nope", "loss.name='nope'"),
    (GRPO, "loss", {"agg": "median"}, "loss.agg='median'"),
    (GRPO, "loss", {"entropy_coef": -1.0}, "loss.entropy_coef=-1.0"),
    (GRPO, "loss", {"entropy_target": -1.0}, "loss.entropy_target=-1.0"),
    (GRPO, "loss", {"entropy_step": 0.0}, "loss.entropy_step=0.0"),
    (GRPO, "loss", {"entropy_max_coef": -1.0}, "loss.entropy_max_coef=-1.0"),
    (GRPO, "loss", {"top_entropy_quantile": 0.0}, "loss.top_entropy_quantile=0.0"),
    (GRPO, "loss", {"correction": {"mode": "tis"}}, "loss.correction.mode='tis'"),
    (GRPO, "loss", {"correction": {"cap": 0.0}}, "loss.correction.cap=0.0"),
    (GRPO, "loss", {"correction": {"low": 1.5}}, "loss.correction.low=1.5"),
    (GRPO, "loss", {"correction": {"high": 0.5}}, "loss.correction.high=0.5"),
    (GRPO, "loss", {"correction": {"bogus": 1}}, "loss.correction.bogus"),
    (GRPO, "loss", {"options": {"eps_low": 0.1}}, "loss.options.eps_low is invalid: 'eps_low' is supplied"),
    (DAPO, "overlong", {"buffer_len": -1}, "overlong.buffer_len=-1"),
    (DAPO, "overlong", {"buffer_len": 8, "max_len": 8}, "overlong.buffer_len=8"),
    (DAPO, "overlong", {"penalty_factor": -1.0}, "overlong.penalty_factor=-1.0"),
    (PPO, "critic", {"kind": "twin"}, "critic.kind='twin'"),
    (PPO, "critic", {"kind": "adapter"}, "critic.kind='adapter'"),  # needs lora
    (PPO, "critic", {"model": "tiny"}, "critic.model='tiny'"),  # only with kind "model"
    (PPO, "critic", {"lr": 0.0}, "critic.lr=0.0"),
    (PPO, "critic", {"vf_coef": -1.0}, "critic.vf_coef=-1.0"),
    (PPO, "critic", {"value_clip": -0.1}, "critic.value_clip=-0.1"),
    (PPO, "critic", {"head_init_scale": -1.0}, "critic.head_init_scale=-1.0"),
    (PPO, "critic", {"warmup_steps": -1}, "critic.warmup_steps=-1"),
    (PPO, "advantage", {"name": "gae", "options": {"lam": 1.5}}, "advantage.options.lam=1.5"),
    (PPO, "advantage", {"name": "gae", "options": {"gamma": -0.5}}, "advantage.options.gamma=-0.5"),
    (SegmentRFT, "critic", {"kind": "model"}, "critic.kind='model'"),
    (SegmentRFT, "segments", {"gamma": 2.0}, "segments.gamma=2.0"),
    (SegmentRFT, "segments", {"td_lambda": -1.0}, "segments.td_lambda=-1.0"),
    (SegmentRFT, "segments", {"ratio_mode": "max"}, "segments.ratio_mode='max'"),
    (SegmentRFT, "segments", {"rollout_sync_every": 0}, "segments.rollout_sync_every=0"),
    (SegmentRFT, "segments", {"rewards": {"window": 0}}, "segments.rewards.window=0"),
    (SegmentRFT, "segments", {"rewards": {"whiten": "group"}}, "segments.rewards.whiten='group'"),
    (SegmentRFT, "kl", {"estimator": "k9"}, "kl.estimator='k9'"),
]


@pytest.mark.parametrize("cls, keyword, value, named", INVALID, ids=[f"{c.__name__}-{n}" for c, _, _, n in INVALID])
def test_invalid_choice_fails_at_construction_naming_group_and_field(cls, keyword, value, named):
    kwargs = {"policy": "tiny", keyword: value} if keyword != "policy" else {"policy": {"model": "tiny", **value}}
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as err:
        cls(**kwargs)
    assert named in str(err.value), str(err.value)


@pytest.mark.parametrize("cls, keyword, value, named", [
    (GRPO, "lr", 0.0, "lr=0.0"), (GRPO, "lr", float("nan"), "lr=nan"), (GRPO, "beta", -0.1, "beta=-0.1"),
    (GRPO, "lora", "yes", "lora='yes'"), (SFT, "beta", 0.1, "beta=0.1"), (SFT, "loss_agg", "median", "loss_agg='median'"),
    (SegmentRFT, "step_critic", 3, "step_critic=3"), (GRPO, "clip", 0.2, "clip=0.2"),
])
def test_invalid_top_level_keywords_are_named(cls, keyword, value, named):
    with pytest.raises((ValueError, TypeError)) as err:
        cls(policy="tiny", **{keyword: value})
    assert named in str(err.value), str(err.value)


def test_groups_as_dataclasses_or_mappings_give_the_same_module():
    a = PPO(policy=PolicySpec(model="tiny", lora_r=8), lora=True, clip=ClipOptions(eps_high=0.3),
            critic=CriticOptions(kind="adapter"), kl=KLOptions(in_reward=False), loss=LossSpec(agg="token-mean"))
    b = PPO(policy={"model": "tiny", "lora_r": 8}, lora=True, clip={"eps_high": 0.3}, critic={"kind": "adapter"},
            kl={"in_reward": False}, loss={"agg": "token-mean"})
    for attr in ("policy_spec", "clip_options", "critic_options", "kl_options", "loss_spec", "advantage_spec"):
        assert getattr(a, attr) == getattr(b, attr)
    assert a.policy_spec.lora and a.policy_spec.lora_r == 8


def test_a_mapping_changes_only_its_fields_of_the_algorithms_default_group():
    assert SegmentRFT(policy="tiny", critic={"vf_coef": 0.5}).critic_options.whiten_advantages is False
    assert PPO(policy="tiny", critic={"vf_coef": 0.5}).critic_options.whiten_advantages is True
    assert PPO(policy="tiny", beta=0.1, kl={"target": 1.0}).kl_options.in_reward is True
    assert DAPO(policy="tiny", clip={"dual_clip": 3.0}).clip_options.eps_high == 0.28
    assert DAPO(policy="tiny", loss={"mask_truncated": True}).loss_spec.agg == "token-mean"
    assert PPO(policy="tiny", advantage={"options": {"lam": 0.9}}).advantage_spec.name == "gae"


def test_a_partial_spec_in_yaml_keeps_the_algorithms_defaults(tmp_path, monkeypatch):
    from rftlab.cli import make_cli

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "dapo.yaml"
    config.write_text("model: {class_path: rftlab.DAPO, init_args: {policy: tiny, loss: {mask_truncated: true}}}\n"
                      "data: {class_path: rftlab.RolloutDataModule, init_args: {task: {class_path: rftlab.tasks.Arithmetic}}}\n")
    cli = make_cli(["--config", str(config), "--trainer.logger", "false"], run=False)
    assert cli.model.loss_spec.agg == "token-mean" and cli.model.loss_spec.mask_truncated is True
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text("model: {class_path: rftlab.PPO, init_args: {policy: tiny, advantage: {options: {lam: 0.9}}}}\n"
                   "data: {class_path: rftlab.RolloutDataModule, init_args: {task: {class_path: rftlab.tasks.Arithmetic}}}\n")
    cli = make_cli(["--config", str(ppo), "--trainer.logger", "false"], run=False)
    assert cli.model.advantage_spec.name == "gae" and cli.model.advantage_spec.options == {"lam": 0.9}


def test_the_lora_keyword_counts_before_the_policy_group_is_checked():
    qlora = GRPO(policy={"model": "tiny", "quantization": "nf4"}, lora=True)
    assert qlora.policy_spec.lora and qlora.policy_spec.quantization == "nf4"


def test_a_loss_name_keeps_the_algorithms_aggregation():
    assert DAPO(policy="tiny", loss="ppo_clip").loss_spec.agg == "token-mean"
    assert GRPO(policy="tiny", loss="ppo_clip").loss_spec.agg == "seq-mean-token-mean"
    assert PPO(policy="tiny").advantage_spec.name == "gae"


@pytest.mark.parametrize("cls", [GRPO, DAPO, PPO, SegmentRFT, SFT])
def test_at_most_twelve_top_level_keywords(cls):
    names = set()
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__ and klass.__module__.startswith("rftlab"):
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert len(names) <= 12, sorted(names)


def test_fit_help_lists_the_literal_choices(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this checkout's rftlab
    out = subprocess.run([sys.executable, "-m", "rftlab.cli", "fit", "--model", "rftlab.PPO", "--print_config"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("critic:", "kind: shared", "packing: auto", "clip:", "eps_high: 0.2", "advantage:", "name: gae"):
        assert line in out.stdout, line
    help_text = subprocess.run([sys.executable, "-m", "rftlab.cli", "fit", "--model.help", "rftlab.PPO"],
                               capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert "{shared,adapter,model}" in help_text.stdout, help_text.stdout[-3000:]
    assert "{auto,always,never}" in help_text.stdout
