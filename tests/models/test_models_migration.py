"""Checkpoints of the earlier flat option layout load through ``migrate_hparams``.

``data/flat_hparams.json`` holds the hyper-parameters the earlier flat constructors saved, one
algorithm each with non-default options; ``data/grpo_flat_layout.ckpt`` is a one-step tiny LoRA
GRPO checkpoint written by that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rftlab import DAPO, GRPO, PPO, SFT, SegmentRFT
from rftlab.models.export import load_checkpoint_policy
from rftlab.models.migration import is_flat, migrate_hparams

DATA = Path(__file__).parent / "data"
FLAT = json.loads((DATA / "flat_hparams.json").read_text())
CLASSES = {"GRPO": GRPO, "DAPO": DAPO, "PPO": PPO, "SegmentRFT": SegmentRFT, "SFT": SFT}


@pytest.mark.parametrize("name", sorted(FLAT))
def test_every_flat_layout_builds_the_new_class(name):
    hparams = {k: v for k, v in FLAT[name].items() if k != "critic" or name != "SegmentRFT"}
    assert is_flat(hparams)
    migrated = migrate_hparams(hparams)
    assert not is_flat(migrated)
    module = CLASSES[name](**migrated)
    assert module.policy_spec.model == "tiny" and module.policy_spec.lora


def test_migrated_values_land_in_their_groups():
    grpo = GRPO(**migrate_hparams(FLAT["GRPO"]))
    assert grpo.policy_spec.lora_r == 4 and grpo.policy_spec.seed == 3
    assert grpo.advantage_spec.options == {"scale": "batch"}
    assert (grpo.loss_spec.agg, grpo.loss_spec.mask_truncated) == ("token-mean", True)
    assert (grpo.clip_options.eps_high, grpo.clip_options.dual_clip) == (0.28, 3.0)
    assert grpo.kl_options.estimator == "k2" and grpo.beta == 0.04
    assert grpo.forward_options.packing == "never" and grpo.log_options.every_n_steps == 2
    ppo = PPO(**migrate_hparams(FLAT["PPO"]))
    assert ppo.advantage_spec.name == "gae" and ppo.advantage_spec.options == {"gamma": 0.9, "lam": 0.8}
    assert ppo.critic_options == ppo.critic_options.replace(kind="adapter", lr=1e-3, value_clip=0.3, vf_coef=0.2,
                                                            warmup_steps=1, whiten_advantages=False)
    assert ppo.loss_spec.entropy_coef == 0.01 and (ppo.kl_options.target, ppo.kl_options.horizon) == (6.0, 500)
    seg = SegmentRFT(**migrate_hparams({k: v for k, v in FLAT["SegmentRFT"].items() if k != "critic"}))
    assert (seg.clip_options.eps_low, seg.clip_options.eps_high, seg.kl_options.estimator) == (0.15, 0.15, "exact")
    assert seg.segment_options.rewards.progress_divisor == 2.0 and seg.segment_options.rewards.whiten == "chain"
    assert seg.segment_options.rewards.alpha == 1.2 and seg.segment_options.ratio_mode == "mean"
    assert (seg.critic_options.lr, seg.critic_options.value_clip) == (1e-3, 0.1)
    dapo = DAPO(**migrate_hparams(FLAT["DAPO"]))
    assert (dapo.overlong.buffer_len, dapo.overlong.max_len) == (4, 16) and dapo.optim_options.warmup_steps == 2


def test_grouped_hparams_pass_through_unchanged():
    grouped = dict(GRPO(policy="tiny", clip={"eps_high": 0.3}).hparams)
    assert not is_flat(grouped) and migrate_hparams(grouped) == grouped


def test_a_flat_checkpoint_loads_with_load_from_checkpoint_and_export():
    path = DATA / "grpo_flat_layout.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    module = GRPO.load_from_checkpoint(path)
    module.configure_model()
    assert module.clip_options.eps_high == 0.28 and module.policy_spec.lora_r == 4
    module.load_state_dict(saved["state_dict"], strict=False)
    trained = {k: v for k, v in saved["state_dict"].items() if "lora_" in k}
    assert trained and all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())
    exported = load_checkpoint_policy(path)
    assert exported.spec.lora_r == 4 and exported.spec.model == "tiny"


def test_new_checkpoints_hold_plain_options_and_load_with_weights_only(tmp_path):
    import lightning as L

    module = PPO(policy={"model": "tiny", "lora_r": 4}, lora=True, beta=0.1, critic={"kind": "adapter"},
                 kl={"target": 1.0}, clip={"eps_high": 0.3})
    module.configure_model()
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    saved = torch.load(tmp_path / "ppo.ckpt", map_location="cpu", weights_only=True)  # no rftlab classes inside
    assert saved["hyper_parameters"]["clip"] == {"eps_low": 0.2, "eps_high": 0.3, "dual_clip": None}
    back = PPO.load_from_checkpoint(tmp_path / "ppo.ckpt")
    for attr in ("policy_spec", "clip_options", "kl_options", "critic_options", "advantage_spec", "loss_spec"):
        assert getattr(back, attr) == getattr(module, attr), attr


def test_a_model_override_replaces_a_named_model():
    from rftlab.models.build import PolicySpec

    spec = PolicySpec.from_hparams({"policy": "tiny", "lora": True}, model="/moved/base")
    assert spec.model == "/moved/base" and spec.lora
    spec = PolicySpec.from_hparams({"policy": {"model": "tiny", "lora_r": 4}}, model="/moved/base")
    assert spec.model == "/moved/base" and spec.lora_r == 4
