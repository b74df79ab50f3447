"""Registries of whole advantage estimators and policy losses: contracts, option checks, built-ins."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import (
    ADVANTAGE_CONTRACT,
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSS_CONTRACT,
    POLICY_LOSSES,
    call_plugin,
    check_plugin_options,
    gae,
    group_advantages,
    policy_loss,
    register_advantage,
    register_policy_loss,
    token_level_rewards,
)
from rftlab.core.registry import Registry


def test_builtin_names():
    assert {"grpo", "dr_grpo", "gae"} <= set(ADVANTAGE_ESTIMATORS.names())
    assert "ppo_clip" in POLICY_LOSSES


def test_grpo_estimator_hand_computed():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735; group [2, 2]... use G = 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.ones(4, 3)
    adv = call_plugin(ADVANTAGE_ESTIMATORS.get("grpo"), (rewards, 4, mask), {}, {})
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (0.5773503 + 1e-6)
    assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    dr = call_plugin(ADVANTAGE_ESTIMATORS.get("dr_grpo"), (rewards, 4, mask), {}, {})
    assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    batch = call_plugin(ADVANTAGE_ESTIMATORS.get("grpo"), (rewards, 2, mask), {}, {"scale": "batch"})
    assert_close(batch, group_advantages(rewards, 2, scale="batch"))


def test_gae_estimator_hand_computed_and_equal_to_the_two_steps():
    # One row, 3 real tokens, outcome 1 on the last; kl = 0.1 per token with coef 0.5 -> r = [-.05, -.05, .95]
    # V = [0.2, 0.4, 0.6], gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t = [0.85 - 0.2, 0.9 - 0.4, 0.95 - 0.6]
    rewards = torch.tensor([1.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])
    kl = torch.full((1, 4), 0.1)
    adv = call_plugin(ADVANTAGE_ESTIMATORS.get("gae"), (rewards, 1, mask), {"values": values, "kl": kl, "kl_coef": 0.5},
                      {"gamma": 1.0, "lam": 1.0})
    assert_close(adv, torch.tensor([[0.65, 0.5, 0.35, 0.0]]), rtol=1e-6, atol=1e-6)
    two_steps, _ = gae(token_level_rewards(rewards, mask, kl, 0.5), values, mask, 0.9, 0.8)
    one = call_plugin(ADVANTAGE_ESTIMATORS.get("gae"), (rewards, 1, mask), {"values": values, "kl": kl, "kl_coef": 0.5},
                      {"gamma": 0.9, "lam": 0.8})
    assert_close(one, two_steps)


def test_ppo_clip_is_policy_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(2, 5), torch.randn(2, 5)
    adv, mask = torch.randn(2), torch.ones(2, 5)
    supplied = {"eps_low": 0.1, "eps_high": 0.3, "dual_clip": 3.0, "agg": "token-mean"}
    loss, metrics = call_plugin(POLICY_LOSSES.get("ppo_clip"), (logp, old, adv, mask), supplied, {})
    ref_loss, ref_metrics = policy_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.3, agg="token-mean", dual_clip=3.0)
    assert_close(loss, ref_loss)
    assert metrics.keys() == ref_metrics.keys()


def test_supplied_inputs_reach_only_functions_that_name_them():
    seen = {}

    def narrow(rewards, group_size, mask, scale: float = 1.0):
        seen["narrow"] = scale
        return rewards * scale

    def wide(rewards, group_size, mask, **kwargs):
        seen["wide"] = sorted(kwargs)
        return rewards

    call_plugin(narrow, (torch.ones(2), 2, torch.ones(2, 1)), {"values": 1, "kl": 2}, {"scale": 2.0})
    call_plugin(wide, (torch.ones(2), 2, torch.ones(2, 1)), {"values": 1, "kl": 2}, {})
    assert seen == {"narrow": 2.0, "wide": ["kl", "values"]}


def _estimator(rewards, group_size, mask, values, beta: float = 0.5, mode: str = "a"):
    return rewards


@pytest.mark.parametrize("options, supplied, message", [
    ({"nope": 1}, {"values"}, r"advantage\.options\.nope is invalid: advantage 'est' takes no option 'nope'; its options: beta, mode"),
    ({"values": 1}, {"values"}, r"advantage\.options\.values is invalid: 'values' is supplied by the algorithm"),
    ({}, set(), r"advantage\.options\.values is missing: advantage 'est' requires it"),
    ({"beta": "high"}, {"values"}, r"advantage\.options\.beta='high' is invalid: must be a finite number"),
    ({"beta": float("nan")}, {"values"}, r"advantage\.options\.beta=nan is invalid"),
])
def test_option_errors_name_the_option(options, supplied, message):
    with pytest.raises(ValueError, match=message):
        check_plugin_options(_estimator, "advantage", "est", ADVANTAGE_CONTRACT, options, supplied, "advantage.options")


def test_options_fit_their_annotation_and_range_checks_run():
    check_plugin_options(_estimator, "advantage", "est", ADVANTAGE_CONTRACT, {"beta": 1.0}, {"values"}, "advantage.options")
    with pytest.raises(ValueError, match=r"advantage\.options\.lam=1\.5 is invalid: must be in \[0, 1\]"):
        check_plugin_options(ADVANTAGE_ESTIMATORS.get("gae"), "advantage", "gae", ADVANTAGE_CONTRACT, {"lam": 1.5},
                             {"values", "kl", "kl_coef"}, "advantage.options")
    with pytest.raises(ValueError, match=r"advantage\.options\.scale='nope'"):
        check_plugin_options(ADVANTAGE_ESTIMATORS.get("grpo"), "advantage", "grpo", ADVANTAGE_CONTRACT,
                             {"scale": "nope"}, set(), "advantage.options")


def test_a_function_without_the_contract_is_refused():
    def wrong(rewards, mask):
        return rewards

    with pytest.raises(ValueError, match=r"must take \(logp, old_logp, advantages, mask\) first"):
        check_plugin_options(wrong, "loss", "wrong", POLICY_LOSS_CONTRACT, {}, set(), "loss.options")


def test_register_decorators_and_duplicates():
    name = "test-only-estimator"

    @register_advantage(name)
    def estimator(rewards, group_size, mask):
        return rewards

    try:
        assert ADVANTAGE_ESTIMATORS.get(name) is estimator
        with pytest.raises(ValueError, match="already registered"):
            register_advantage(name, estimator)
        register_advantage(name, estimator, overwrite=True)
    finally:
        ADVANTAGE_ESTIMATORS._entries.pop(name)

    @register_policy_loss("test-only-loss")
    def loss(logp, old_logp, advantages, mask):
        return logp.sum(), {}

    POLICY_LOSSES._entries.pop("test-only-loss")
    assert isinstance(ADVANTAGE_ESTIMATORS, Registry)
