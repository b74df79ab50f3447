"""Bad input is refused at construction (or before any sampling), with the parameter named.

A table of invalid configurations for every algorithm and the DataModule, then a ``hypothesis``
fuzz of the constructors' arguments: whatever the values, construction either succeeds or raises
our ValueError/TypeError naming a parameter it was given, never an error from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rftlab import DAPO, GRPO, PPO, RolloutDataModule, SegmentRFT
from rftlab.tasks import Arithmetic, DatasetTask, RowsTask
from helpers import fit_tiny
from reliability_helpers import parity

TASK = Arithmetic(num_test=2)
NO_HELD_OUT = Arithmetic(num_test=0)
REWARDS = {"parity": parity}

# (constructor, arguments, error type, text the message must contain). Options inside a group are
# named with the group ("optim.weight_decay"); a wrong type inside a group is a ValueError of the
# group's check (a wrong type of a top-level argument stays a TypeError).
INVALID = [
    # ---- RFTModule options, through GRPO ------------------------------------------------------
    (GRPO, dict(lr=0.0), ValueError, "lr=0.0"),
    (GRPO, dict(lr=float("nan")), ValueError, "lr=nan"),
    (GRPO, dict(lr=float("inf")), ValueError, "lr=inf"),
    (GRPO, dict(lr="fast"), TypeError, "lr='fast'"),
    (GRPO, dict(lr=True), TypeError, "lr=True"),
    (GRPO, dict(policy={"model": "tiny", "lora_r": 0}), ValueError, "policy.lora_r=0"),
    (GRPO, dict(policy={"model": "tiny", "lora_r": 2.5}), ValueError, "policy.lora_r=2.5"),
    (GRPO, dict(policy={"model": "tiny", "lora_alpha": 0}), ValueError, "policy.lora_alpha"),
    (GRPO, dict(policy={"model": "tiny", "lora_dropout": 1.0}), ValueError, "policy.lora_dropout"),
    (GRPO, dict(policy={"model": "tiny", "lora_target_modules": []}, lora=True), ValueError, "policy.lora_target_modules"),
    (GRPO, dict(policy={"model": "tiny", "lora_target_modules": 7}), ValueError, "policy.lora_target_modules=7"),
    (GRPO, dict(lora="yes"), TypeError, "lora='yes'"),
    (GRPO, dict(optim={"weight_decay": -0.1}), ValueError, "optim.weight_decay"),
    (GRPO, dict(optim={"warmup_steps": -1}), ValueError, "optim.warmup_steps"),
    (GRPO, dict(optim={"max_grad_norm": -1.0}), ValueError, "optim.max_grad_norm"),
    (GRPO, dict(beta=-0.01), ValueError, "beta"),
    (GRPO, dict(policy={"model": "tiny", "dtype": "float8"}), ValueError, "policy.dtype"),
    (GRPO, dict(forward={"logprob_batch_size": 0}), ValueError, "forward.logprob_batch_size"),
    (GRPO, dict(log={"every_n_steps": 0}), ValueError, "log.every_n_steps"),
    (GRPO, dict(optim={"max_nonfinite_steps": 0}), ValueError, "optim.max_nonfinite_steps"),
    (GRPO, dict(policy={"model": "tiny", "seed": -1}), ValueError, "policy.seed=-1"),
    (GRPO, dict(log={"validate_at_start": "yes"}), ValueError, "log.validate_at_start"),
    (GRPO, dict(policy=""), ValueError, "policy.model=''"),
    (GRPO, dict(forward=3), TypeError, "forward=3"),
    # ---- GRPO ----------------------------------------------------------------------------------
    (GRPO, dict(clip={"eps_low": -0.1}), ValueError, "clip.eps_low"),
    (GRPO, dict(clip={"eps_low": 0.3, "eps_high": 0.2}), ValueError, "clip.eps_high"),
    (GRPO, dict(clip={"dual_clip": 1.0}), ValueError, "clip.dual_clip"),
    (GRPO, dict(advantage={"name": "grpo", "options": {"scale": "std"}}), ValueError, "advantage.options.scale='std'"),
    (GRPO, dict(loss={"agg": "mean"}), ValueError, "loss.agg='mean'"),
    (GRPO, dict(kl={"estimator": "k4"}), ValueError, "kl.estimator='k4'"),
    # ---- DAPO ----------------------------------------------------------------------------------
    (DAPO, dict(overlong={"buffer_len": -1}), ValueError, "overlong.buffer_len"),
    (DAPO, dict(overlong={"buffer_len": 8, "max_len": 8}), ValueError, "overlong.buffer_len"),
    (DAPO, dict(overlong={"penalty_factor": -1.0}), ValueError, "overlong.penalty_factor"),
    # ---- PPO -----------------------------------------------------------------------------------
    (PPO, dict(advantage={"name": "gae", "options": {"gamma": 1.5}}), ValueError, "advantage.options.gamma"),
    (PPO, dict(advantage={"name": "gae", "options": {"lam": -0.1}}), ValueError, "advantage.options.lam"),
    (PPO, dict(clip={"eps_low": 0.3, "eps_high": 0.1}), ValueError, "clip.eps_high"),
    (PPO, dict(critic={"value_clip": -1.0}), ValueError, "critic.value_clip"),
    (PPO, dict(critic={"vf_coef": -1.0}), ValueError, "critic.vf_coef"),
    (PPO, dict(loss={"agg": "token-mean", "entropy_coef": -1.0}), ValueError, "loss.entropy_coef"),
    (PPO, dict(critic={"kind": "value-model"}), ValueError, "critic.kind"),
    (PPO, dict(critic={"kind": "adapter"}, lora=False), ValueError, "critic.kind"),
    (PPO, dict(critic={"model": "tiny"}), ValueError, "critic.model"),
    (PPO, dict(critic={"lr": 0.0}), ValueError, "critic.lr"),
    (PPO, dict(critic={"warmup_steps": -1}), ValueError, "critic.warmup_steps"),
    (PPO, dict(kl={"in_reward": True, "target": 0.5}), ValueError, "kl.target=0.5"),  # an adaptive target needs beta > 0
    (PPO, dict(beta=0.1, kl={"in_reward": True, "target": 0.0}), ValueError, "kl.target"),
    (PPO, dict(beta=0.1, kl={"in_reward": True, "target": 0.5, "horizon": 0}), ValueError, "kl.horizon"),
    (PPO, dict(loss={"agg": "sum"}), ValueError, "loss.agg='sum'"),
    # ---- SegmentRFT ----------------------------------------------------------------------------
    (SegmentRFT, dict(step_critic="judge"), TypeError, "step_critic"),
    (SegmentRFT, dict(segments={"gamma": -0.5}), ValueError, "segments.gamma"),
    (SegmentRFT, dict(segments={"td_lambda": 1.5}), ValueError, "segments.td_lambda"),
    (SegmentRFT, dict(clip={"eps_low": 1.0, "eps_high": 1.0}), ValueError, "clip.eps_low"),  # was eps=1.0: in [0, 1)
    (SegmentRFT, dict(segments={"ratio_mode": "product"}), ValueError, "segments.ratio_mode='product'"),
    (SegmentRFT, dict(critic={"value_clip": -1.0}), ValueError, "critic.value_clip"),
    (SegmentRFT, dict(kl={"estimator": "k9"}), ValueError, "kl.estimator='k9'"),
    (SegmentRFT, dict(segments={"rollout_sync_every": 0}), ValueError, "segments.rollout_sync_every"),
    (SegmentRFT, dict(critic={"lr": -1.0}), ValueError, "critic.lr"),
    (SegmentRFT, dict(segments={"rewards": {"whiten": "all"}}), ValueError, "segments.rewards.whiten='all'"),
    (SegmentRFT, dict(segments={"rewards": {"window": 0}}), ValueError, "segments.rewards.window"),
    # ---- RolloutDataModule ---------------------------------------------------------------------
    (RolloutDataModule, dict(prompts_per_step=0), ValueError, "prompts_per_step"),
    (RolloutDataModule, dict(num_generations=0), ValueError, "num_generations"),
    (RolloutDataModule, dict(num_generations="8"), TypeError, "num_generations='8'"),
    (RolloutDataModule, dict(prompts_per_step=2.0), TypeError, "prompts_per_step=2.0"),
    (RolloutDataModule, dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (RolloutDataModule, dict(val_max_new_tokens=-1), ValueError, "val_max_new_tokens"),
    (RolloutDataModule, dict(num_iterations=0), ValueError, "num_iterations"),
    (RolloutDataModule, dict(prompts_per_step=2, num_minibatches=3), ValueError, "num_minibatches"),
    (RolloutDataModule, dict(prompts_per_step=6, num_minibatches=4), ValueError, "must divide prompts_per_step"),
    (RolloutDataModule, dict(max_gen_batches=0), ValueError, "max_gen_batches"),
    (RolloutDataModule, dict(temperature=0.0), ValueError, "temperature"),
    (RolloutDataModule, dict(temperature=1e-40), ValueError, "temperature"),
    (RolloutDataModule, dict(top_p=0.0), ValueError, "top_p"),
    (RolloutDataModule, dict(top_k=-1), ValueError, "top_k"),
    (RolloutDataModule, dict(sampler_backend="sglang"), ValueError, "sampler_backend='sglang'"),
    (RolloutDataModule, dict(max_prompt_length=0), ValueError, "max_prompt_length"),
    (RolloutDataModule, dict(prompt_truncation="middle"), ValueError, "prompt_truncation"),
    (RolloutDataModule, dict(reward_on_error="ignore"), ValueError, "reward_on_error"),
    (RolloutDataModule, dict(reward_timeout=0.0), ValueError, "reward_timeout"),
    (RolloutDataModule, dict(reward_timeout=1e30), ValueError, "reward_timeout"),
    (RolloutDataModule, dict(reward_executor="gpu"), ValueError, "reward_executor='gpu'"),
    (RolloutDataModule, dict(reward_weights=[1.0, 2.0]), ValueError, "reward_weights"),
    (RolloutDataModule, dict(rewards={}), ValueError, "reward"),
    (RolloutDataModule, dict(rewards={"r": 3}), TypeError, "not callable"),
    (RolloutDataModule, dict(rewards={"r": "not a function"}), ValueError, "'not a function' is not the import path"),
    (RolloutDataModule, dict(on_short_batch="wait"), ValueError, "on_short_batch"),
    (RolloutDataModule, dict(dynamic_sampling_tol=-1.0), ValueError, "dynamic_sampling_tol"),
    (RolloutDataModule, dict(dynamic_sampling=1), TypeError, "dynamic_sampling=1"),
    (RolloutDataModule, dict(dynamic_sampling="on"), TypeError, "dynamic_sampling='on'"),  # was DAPO's option
    (RolloutDataModule, dict(steps_per_epoch=0), ValueError, "steps_per_epoch"),
    (RolloutDataModule, dict(val_batch_size=0), ValueError, "val_batch_size"),
    (RolloutDataModule, dict(num_val_prompts=0), ValueError, "num_val_prompts"),
    (RolloutDataModule, dict(task=NO_HELD_OUT, num_val_prompts=4), ValueError, "no held-out split"),
    (RolloutDataModule, dict(task="arithmetic"), TypeError, "task='arithmetic'"),
    (RolloutDataModule, dict(seed=2**40), ValueError, "seed"),
]


def _build(cls, kwargs):
    if cls is RolloutDataModule:
        return RolloutDataModule(**{"task": TASK, "rewards": REWARDS, **kwargs})
    return cls(**{"policy": "tiny", **kwargs})


@pytest.mark.parametrize("cls, kwargs, error, text", INVALID,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v!r}'[:24] for k, v in kw.items())}" for c, kw, _, _ in INVALID])
def test_invalid_configuration_is_refused_at_construction(cls, kwargs, error, text):
    with pytest.raises(error) as info:
        _build(cls, kwargs)
    assert text in str(info.value), str(info.value)


def test_a_prompt_column_missing_from_a_dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) for i in range(4)))
    with pytest.raises(KeyError, match="no 'prompt' column.*columns="):
        DatasetTask(str(path))
    with pytest.raises(KeyError, match="column 'query' .*not found"):
        DatasetTask(str(path), columns={"prompt": "query"})
    assert len(DatasetTask(str(path), columns={"prompt": "question"}).train_rows()) == 4
    with pytest.raises(ValueError, match="has no 'prompt' column"):
        RowsTask([{"question": "q"}], rewards=REWARDS)


def _never_sample(*args, **kwargs):
    raise AssertionError("sampled before the configuration was checked")


# Combinations that need both halves (or the Trainer): refused in setup, before anything is sampled.
COMBINATIONS = [
    (lambda: PPO(policy="tiny"),
     dict(num_generations=1, dynamic_sampling=True), {}, "dynamic_sampling needs num_generations >= 2"),
    # the group size moved from the algorithm to the DataModule: GRPO and DAPO check it in setup
    (lambda: GRPO(policy="tiny"), dict(num_generations=1), {}, "num_generations=1 is invalid: must be >= 2 for GRPO"),
    (lambda: DAPO(policy="tiny"), dict(num_generations=1), {}, "num_generations=1"),  # dynamic sampling's check first
    (lambda: DAPO(policy="tiny", overlong={"buffer_len": 8}),
     dict(num_generations=2, max_new_tokens=8), {}, "overlong.buffer_len=8 is invalid: must be < the maximum length 8"),
    (lambda: GRPO(policy="tiny"),
     dict(num_generations=2, task=NO_HELD_OUT), dict(val_check_interval=2, limit_val_batches=1.0), "no held-out split"),
]


@pytest.mark.parametrize("make_module, dm_kwargs, trainer_kwargs, text", COMBINATIONS)
def test_incompatible_combinations_fail_before_sampling(make_module, dm_kwargs, trainer_kwargs, text, monkeypatch):
    module = make_module()
    monkeypatch.setattr(type(module), "generate", _never_sample)
    dm = RolloutDataModule(**{"task": TASK, "rewards": REWARDS, **dm_kwargs})
    with pytest.raises(ValueError, match=text):
        fit_tiny(module, dm, 4, **{"limit_val_batches": None, **trainer_kwargs})  # None: Lightning's default


# ---- fuzzing -------------------------------------------------------------------------------------
# Resources (model names, paths) are not fuzzed: they load files or the hub, and their errors
# come from there. Everything else is: the top-level arguments and every field of the option
# groups ("optim.weight_decay", "segments.rewards.window"), each given as a mapping.
NOT_FUZZED = {"self", "kwargs", "policy", "policy.model", "policy.init_checkpoint", "critic.model", "rewards"}
NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0), st.text(max_size=6),
    st.lists(st.one_of(st.integers(-2, 2), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _group_class(annotation) -> type | None:
    """The dataclass (option group) an annotation accepts, if any."""
    candidates = typing.get_args(annotation) if typing.get_args(annotation) else (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _fields(group: type, prefix: str) -> list[str]:
    """``prefix.field`` for every field of the group, nested groups expanded too."""
    names = []
    hints = typing.get_type_hints(group)
    for f in dataclasses.fields(group):
        name = f"{prefix}.{f.name}"
        names.append(name)
        nested = _group_class(hints[f.name])
        if nested is not None:
            names += _fields(nested, name)
    return names


def _arguments(cls) -> list[str]:
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass.__module__.startswith("rftlab"):
            hints = typing.get_type_hints(init)
            for n in inspect.signature(init).parameters:
                group = _group_class(hints.get(n))
                for name in [n, *(_fields(group, n) if group is not None else [])]:
                    if name not in NOT_FUZZED and name not in names:
                        names.append(name)
    return names


def _nest(kwargs: dict, name: str, value) -> bool:
    """Put ``value`` at the dotted ``name`` of ``kwargs`` (groups as mappings); False if a drawn
    value of an enclosing group (not a mapping) leaves no room for it."""
    *path, last = name.split(".")
    where = kwargs
    for part in path:
        default = {"model": "tiny"} if where is kwargs and part == "policy" else {}
        current = where.get(part, default)
        if isinstance(current, str) and where is kwargs and part == "policy":
            current = {"model": current}
        if not isinstance(current, dict):
            return False
        where[part] = where = dict(current)
    if isinstance(where.get(last), dict) and isinstance(value, dict):
        return False  # keep the nested values drawn before
    where[last] = value
    return True


@pytest.mark.parametrize("cls", [GRPO, DAPO, PPO, SegmentRFT, RolloutDataModule], ids=lambda c: c.__name__)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_constructor_arguments_fail_only_with_our_errors(cls, data):
    names = data.draw(st.lists(st.sampled_from(_arguments(cls)), min_size=1, max_size=3, unique=True))
    kwargs = {} if cls is RolloutDataModule else {"policy": "tiny"}
    # shallow names first, so a drawn group value and a field drawn inside it do not overwrite each other
    names = [n for n in sorted(names, key=lambda n: n.count(".")) if _nest(kwargs, n, data.draw(NASTY, label=n))]
    try:
        _build(cls, kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(n in message for n in names), f"{type(err).__name__} names none of {names}: {message}"


@pytest.fixture(scope="module")
def tiny_policy():
    module = GRPO(policy="tiny", lora=True)
    module.configure_model()
    return module


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(temperature=st.floats(1e-45, 1e6), top_p=st.floats(1e-9, 1.0), top_k=st.integers(0, 10**6),
       max_new_tokens=st.integers(1, 4))
def test_fuzzed_sampling_settings_either_fail_at_construction_or_sample_finite_log_probs(
        tiny_policy, temperature, top_p, top_k, max_new_tokens):
    try:
        dm = RolloutDataModule(task=TASK, rewards=REWARDS, prompts_per_step=1, num_generations=2, temperature=temperature,
                               top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    except ValueError as err:
        assert "temperature" in str(err) and temperature < 1e-3
        return
    rollout = dm.attach(tiny_policy).build_rollout()
    loss, _ = tiny_policy.compute_loss(rollout)
    assert math.isfinite(float(loss))
    assert torch.isfinite(tiny_policy.batched_logprobs(rollout)).all()
