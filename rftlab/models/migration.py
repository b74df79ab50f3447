"""Reading checkpoints whose hyper-parameters use the earlier flat option layout.

Checkpoints written before the option groups existed hold one flat list of options
(``lora_r``, ``eps_high``, ``critic_lr``, ...). ``migrate_hparams`` maps them onto the groups, so
``load_from_checkpoint``, ``rftlab export``/``generate``/``evaluate`` and ``init_checkpoint`` read
them; ``num_generations`` moved to the DataModule and is dropped here.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

#: Flat name -> (group, field) of options every algorithm had.
_COMMON = {
    "lora_r": ("policy", "lora_r"), "lora_alpha": ("policy", "lora_alpha"), "lora_dropout": ("policy", "lora_dropout"),
    "lora_target_modules": ("policy", "lora_target_modules"), "dtype": ("policy", "dtype"),
    "gradient_checkpointing": ("policy", "gradient_checkpointing"), "quantization": ("policy", "quantization"),
    "compute_dtype": ("policy", "compute_dtype"), "reference_placement": ("policy", "reference_placement"),
    "init_checkpoint": ("policy", "init_checkpoint"), "seed": ("policy", "seed"),
    "weight_decay": ("optim", "weight_decay"), "warmup_steps": ("optim", "warmup_steps"),
    "max_grad_norm": ("optim", "max_grad_norm"), "optimizer": ("optim", "optimizer"),
    "max_nonfinite_steps": ("optim", "max_nonfinite_steps"),
    "logprob_batch_size": ("forward", "logprob_batch_size"), "share_prompt": ("forward", "share_prompt"),
    "packing": ("forward", "packing"), "sampling_dtype": ("forward", "sampling_dtype"),
    "cache_weight_casts": ("forward", "cache_weight_casts"), "onednn_kernels": ("forward", "onednn_kernels"),
    "log_kl_every": ("kl", "log_every"), "kl_estimator": ("kl", "estimator"),
    "validate_at_start": ("log", "validate_at_start"), "log_every_n_steps": ("log", "every_n_steps"),
    "eps_low": ("clip", "eps_low"), "eps_high": ("clip", "eps_high"), "dual_clip": ("clip", "dual_clip"),
    "loss_agg": ("loss", "agg"), "mask_truncated_completions": ("loss", "mask_truncated"),
    "overlong_buffer_len": ("overlong", "buffer_len"), "overlong_max_len": ("overlong", "max_len"),
    "overlong_penalty_factor": ("overlong", "penalty_factor"),
    "kl_in_reward": ("kl", "in_reward"), "kl_target": ("kl", "target"), "kl_horizon": ("kl", "horizon"),
    "critic_model": ("critic", "model"), "critic_lr": ("critic", "lr"), "value_lr": ("critic", "lr"),
    "cliprange_value": ("critic", "value_clip"), "value_clip": ("critic", "value_clip"),
    "vf_coef": ("critic", "vf_coef"), "value_head_init_scale": ("critic", "head_init_scale"),
    "value_warmup_steps": ("critic", "warmup_steps"), "whiten_advantages": ("critic", "whiten_advantages"),
    "ent_coef": ("loss", "entropy_coef"), "td_lambda": ("segments", "td_lambda"),
    "ratio_mode": ("segments", "ratio_mode"), "rollout_sync_every": ("segments", "rollout_sync_every"),
}
_SEGMENT_REWARDS = ("alpha", "delta", "window", "kappa_pos", "kappa_neg", "base", "rho", "alpha_1", "alpha_2", "eps_std")
_DROPPED = ("num_generations", "dynamic_sampling")
_FLAT_MARKERS = ("num_generations", "lora_r", "dtype", "logprob_batch_size")


def is_flat(hparams: dict[str, Any]) -> bool:
    """Whether ``hparams`` use the flat layout (written before the option groups)."""
    return any(name in hparams for name in _FLAT_MARKERS)


def migrate_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Flat hyper-parameters mapped onto the option groups; grouped ones are returned unchanged.

    The algorithm is told apart by its options: SegmentRFT had ``rollout_sync_every``, PPO
    ``kl_in_reward``, SFT no clip range (its ``loss_agg`` stays); GRPO's ``scale`` becomes
    ``advantage.options.scale``.

    Args:
        hparams: a checkpoint's ``hyper_parameters``.
    """
    if not is_flat(hparams):
        return dict(hparams)
    segment = "rollout_sync_every" in hparams
    ppo = "kl_in_reward" in hparams
    sft = "eps_low" not in hparams and "eps" not in hparams  # SFT had no clip range
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, value in hparams.items():
        if name in _DROPPED:
            continue
        if sft and name == "loss_agg":
            out[name] = value
        elif segment and name == "eps":
            groups.setdefault("clip", {}).update(eps_low=value, eps_high=value)
        elif segment and name == "kl":
            groups.setdefault("kl", {})["estimator"] = value
        elif segment and name in ("gamma",):
            groups.setdefault("segments", {})[name] = value
        elif segment and name == "lam":
            groups.setdefault("segments", {}).setdefault("rewards", {})["progress_divisor"] = value
        elif segment and name == "reward_whiten":
            groups.setdefault("segments", {}).setdefault("rewards", {})["whiten"] = value
        elif segment and name in _SEGMENT_REWARDS:
            groups.setdefault("segments", {}).setdefault("rewards", {})[name] = value
        elif ppo and name in ("gamma", "lam"):
            groups.setdefault("advantage", {"name": "gae", "options": {}})["options"][name] = value
        elif ppo and name == "critic":
            groups.setdefault("critic", {})["kind"] = value
        elif name == "scale":
            groups.setdefault("advantage", {"name": "grpo", "options": {}})["options"]["scale"] = value
        elif name in _COMMON:
            group, field = _COMMON[name]
            groups.setdefault(group, {})[field] = value
        else:
            out[name] = value
    policy = groups.pop("policy", {})
    out["policy"] = {"model": hparams.get("policy", "default"), **policy}
    if "loss" in groups and not ppo and not segment:
        groups["loss"].setdefault("name", "ppo_clip")
    if segment:
        groups.pop("loss", None)
    return {**out, **groups}


def load_migrated(checkpoint_path: Any) -> Any:
    """``checkpoint_path``, or an in-memory copy of it with migrated hyper-parameters when they are flat.

    Args:
        checkpoint_path: a path or file-like object, as Lightning's ``load_from_checkpoint`` takes.
    """
    if not isinstance(checkpoint_path, (str, Path)):
        return checkpoint_path
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not is_flat(hparams):
        return checkpoint_path
    checkpoint["hyper_parameters"] = migrate_hparams(hparams)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer
