"""Bad input is refused at construction (or before any sampling), with the parameter named.

A table of invalid configurations for every algorithm and the DataModule, then a ``hypothesis``
fuzz of the constructors' arguments: whatever the values, construction either succeeds or raises
our ValueError/TypeError naming a parameter it was given, never an error from deep inside torch.
"""

from __future__ import annotations

import inspect
import json
import math

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

# (constructor, arguments, error type, text the message must contain)
INVALID = [
    # ---- RFTModule options, through GRPO ------------------------------------------------------
    (GRPO, dict(lr=0.0), ValueError, "lr=0.0"),
    (GRPO, dict(lr=float("nan")), ValueError, "lr=nan"),
    (GRPO, dict(lr=float("inf")), ValueError, "lr=inf"),
    (GRPO, dict(lr="fast"), TypeError, "lr='fast'"),
    (GRPO, dict(lr=True), TypeError, "lr=True"),
    (GRPO, dict(lora_r=0), ValueError, "lora_r=0"),
    (GRPO, dict(lora_r=2.5), TypeError, "lora_r=2.5"),
    (GRPO, dict(lora_alpha=0), ValueError, "lora_alpha"),
    (GRPO, dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (GRPO, dict(lora=True, lora_target_modules=[]), ValueError, "lora_target_modules"),
    (GRPO, dict(lora_target_modules=7), TypeError, "lora_target_modules=7"),
    (GRPO, dict(num_generations=0), ValueError, "num_generations"),
    (GRPO, dict(num_generations="8"), TypeError, "num_generations='8'"),
    (GRPO, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (GRPO, dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (GRPO, dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (GRPO, dict(beta=-0.01), ValueError, "beta"),
    (GRPO, dict(dtype="float8"), ValueError, "dtype"),
    (GRPO, dict(logprob_batch_size=0), ValueError, "logprob_batch_size"),
    (GRPO, dict(log_every_n_steps=0), ValueError, "log_every_n_steps"),
    (GRPO, dict(max_nonfinite_steps=0), ValueError, "max_nonfinite_steps"),
    (GRPO, dict(seed=-1), ValueError, "seed=-1"),
    (GRPO, dict(validate_at_start="yes"), TypeError, "validate_at_start"),
    (GRPO, dict(policy=""), ValueError, "policy"),
    # ---- GRPO ----------------------------------------------------------------------------------
    (GRPO, dict(num_generations=1), ValueError, "num_generations"),
    (GRPO, dict(eps_low=-0.1), ValueError, "eps_low"),
    (GRPO, dict(eps_low=0.3, eps_high=0.2), ValueError, "eps_high"),
    (GRPO, dict(dual_clip=1.0), ValueError, "dual_clip"),
    (GRPO, dict(scale="std"), ValueError, "scale='std'"),
    (GRPO, dict(loss_agg="mean"), ValueError, "loss_agg='mean'"),
    (GRPO, dict(kl_estimator="k4"), ValueError, "kl_estimator='k4'"),
    # ---- DAPO ----------------------------------------------------------------------------------
    (DAPO, dict(num_generations=1), ValueError, "num_generations"),
    (DAPO, dict(overlong_buffer_len=-1), ValueError, "overlong_buffer_len"),
    (DAPO, dict(overlong_buffer_len=8, overlong_max_len=8), ValueError, "overlong_buffer_len"),
    (DAPO, dict(overlong_penalty_factor=-1.0), ValueError, "overlong_penalty_factor"),
    (DAPO, dict(dynamic_sampling="on"), TypeError, "dynamic_sampling='on'"),
    # ---- PPO -----------------------------------------------------------------------------------
    (PPO, dict(gamma=1.5), ValueError, "gamma"),
    (PPO, dict(lam=-0.1), ValueError, "lam"),
    (PPO, dict(eps_low=0.3, eps_high=0.1), ValueError, "eps_high"),
    (PPO, dict(cliprange_value=-1.0), ValueError, "cliprange_value"),
    (PPO, dict(vf_coef=-1.0), ValueError, "vf_coef"),
    (PPO, dict(ent_coef=-1.0), ValueError, "ent_coef"),
    (PPO, dict(critic="value-model"), ValueError, "critic"),
    (PPO, dict(critic="adapter", lora=False), ValueError, "critic"),
    (PPO, dict(critic_model="tiny"), ValueError, "critic_model"),
    (PPO, dict(critic_lr=0.0), ValueError, "critic_lr"),
    (PPO, dict(value_warmup_steps=-1), ValueError, "value_warmup_steps"),
    (PPO, dict(kl_target=0.5), ValueError, "kl_target=0.5"),  # an adaptive target needs beta > 0
    (PPO, dict(beta=0.1, kl_target=0.0), ValueError, "kl_target"),
    (PPO, dict(beta=0.1, kl_target=0.5, kl_horizon=0), ValueError, "kl_horizon"),
    (PPO, dict(loss_agg="sum"), ValueError, "loss_agg='sum'"),
    # ---- SegmentRFT ----------------------------------------------------------------------------
    (SegmentRFT, dict(critic="judge"), TypeError, "critic"),
    (SegmentRFT, dict(gamma=-0.5), ValueError, "gamma"),
    (SegmentRFT, dict(td_lambda=1.5), ValueError, "td_lambda"),
    (SegmentRFT, dict(eps=1.0), ValueError, "eps"),
    (SegmentRFT, dict(ratio_mode="product"), ValueError, "ratio_mode='product'"),
    (SegmentRFT, dict(value_clip=-1.0), ValueError, "value_clip"),
    (SegmentRFT, dict(kl="k9"), ValueError, "kl='k9'"),
    (SegmentRFT, dict(rollout_sync_every=0), ValueError, "rollout_sync_every"),
    (SegmentRFT, dict(value_lr=-1.0), ValueError, "value_lr"),
    (SegmentRFT, dict(reward_whiten="all"), ValueError, "reward_whiten='all'"),
    (SegmentRFT, dict(window=0), ValueError, "window"),
    # ---- RolloutDataModule ---------------------------------------------------------------------
    (RolloutDataModule, dict(prompts_per_step=0), ValueError, "prompts_per_step"),
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
    (RolloutDataModule, dict(rewards={"r": "not a function"}), TypeError, "not callable"),
    (RolloutDataModule, dict(on_short_batch="wait"), ValueError, "on_short_batch"),
    (RolloutDataModule, dict(dynamic_sampling_tol=-1.0), ValueError, "dynamic_sampling_tol"),
    (RolloutDataModule, dict(dynamic_sampling=1), TypeError, "dynamic_sampling=1"),
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
    (lambda: PPO(policy="tiny", num_generations=1),
     dict(dynamic_sampling=True), {}, "dynamic_sampling needs num_generations >= 2"),
    (lambda: DAPO(policy="tiny", num_generations=2, overlong_buffer_len=8),
     dict(max_new_tokens=8), {}, "overlong_buffer_len=8 must be < the maximum length 8"),
    (lambda: GRPO(policy="tiny", num_generations=2),
     dict(task=NO_HELD_OUT), dict(val_check_interval=2, limit_val_batches=1.0), "no held-out split"),
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
# come from there. Everything else is.
NOT_FUZZED = {"self", "kwargs", "policy", "critic_model", "init_checkpoint", "rewards"}
NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0), st.text(max_size=6),
    st.lists(st.one_of(st.integers(-2, 2), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _arguments(cls) -> list[str]:
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass.__module__.startswith("rftlab"):
            names += [n for n in inspect.signature(init).parameters if n not in NOT_FUZZED and n not in names]
    return names


@pytest.mark.parametrize("cls", [GRPO, DAPO, PPO, SegmentRFT, RolloutDataModule], ids=lambda c: c.__name__)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_constructor_arguments_fail_only_with_our_errors(cls, data):
    names = data.draw(st.lists(st.sampled_from(_arguments(cls)), min_size=1, max_size=3, unique=True))
    kwargs = {name: data.draw(NASTY, label=name) for name in names}
    try:
        _build(cls, kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(n in message for n in names), f"{type(err).__name__} names none of {names}: {message}"


@pytest.fixture(scope="module")
def tiny_policy():
    module = GRPO(policy="tiny", num_generations=2, lora=True)
    module.configure_model()
    return module


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(temperature=st.floats(1e-45, 1e6), top_p=st.floats(1e-9, 1.0), top_k=st.integers(0, 10**6),
       max_new_tokens=st.integers(1, 4))
def test_fuzzed_sampling_settings_either_fail_at_construction_or_sample_finite_log_probs(
        tiny_policy, temperature, top_p, top_k, max_new_tokens):
    try:
        dm = RolloutDataModule(task=TASK, rewards=REWARDS, prompts_per_step=1, temperature=temperature, top_p=top_p,
                               top_k=top_k, max_new_tokens=max_new_tokens)
    except ValueError as err:
        assert "temperature" in str(err) and temperature < 1e-3
        return
    rollout = dm.attach(tiny_policy).build_rollout()
    loss, _ = tiny_policy.compute_loss(rollout)
    assert math.isfinite(float(loss))
    assert torch.isfinite(tiny_policy.batched_logprobs(rollout)).all()
