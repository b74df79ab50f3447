"""Registry: lookup, error messages, user plug-ins, and that core stays pure."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rftlab.core as core
from rftlab.core import ADVANTAGE_SCALES, AGGREGATIONS, KL_ESTIMATORS, Registry


def test_register_get_names_contains():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a", lambda: "a")
    assert reg.get("b") is b  # decorator returns the function unchanged
    assert reg.get("a")() == "a"
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg and ["unhashable"] not in reg
    assert list(reg) == ["a", "b"] and len(reg) == 2


def test_unknown_name_lists_sorted_valid_names():
    reg = Registry("widget")
    for name in ["zeta", "alpha", "mid"]:
        reg.register(name, lambda: None)
    with pytest.raises(ValueError) as err:
        reg.get("foo")
    assert str(err.value) == "unknown widget 'foo'; valid: alpha, mid, zeta"
    with pytest.raises(ValueError, match="unknown widget"):
        reg.get(["not", "hashable"])


def test_duplicate_registration_needs_overwrite():
    reg = Registry("widget")
    reg.register("x", lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", lambda: 2)
    reg.register("x", lambda: 3, overwrite=True)
    assert reg.get("x")() == 3


def test_bad_registrations():
    reg = Registry("widget")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", lambda: 1)
    with pytest.raises(TypeError, match="callable"):
        reg.register("x", 42)


def test_builtin_registries_and_messages():
    assert AGGREGATIONS.names() == [
        "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-mean",
    ]
    assert ADVANTAGE_SCALES.names() == ["batch", "group", "none"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    with pytest.raises(ValueError) as err:
        core.aggregate(torch.zeros(1, 1), torch.ones(1, 1), "foo")
    assert str(err.value) == (
        "unknown aggregation 'foo'; valid: seq-mean-token-mean, seq-mean-token-sum, "
        "seq-mean-token-sum-norm, token-mean"
    )


def test_user_variants_work_through_the_public_functions(monkeypatch):
    # Roll the global registries back after the test.
    for reg in (AGGREGATIONS, ADVANTAGE_SCALES, KL_ESTIMATORS):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))

    @AGGREGATIONS.register("token-max")
    def token_max(per_token, mask, max_len):
        return per_token.masked_fill(mask == 0, float("-inf")).max()

    @ADVANTAGE_SCALES.register("rloo")
    def rloo(grouped, eps):  # leave-one-out baseline
        g = grouped.shape[-1]
        return grouped - (grouped.sum(-1, keepdim=True) - grouped) / (g - 1)

    @KL_ESTIMATORS.register("abs")
    def kl_abs(d):
        return d.abs()

    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert core.aggregate(torch.tensor([[1.0, 2.0, 9.0]]), mask, "token-max") == 2.0
    # rewards [1, 0, 0]: 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5
    adv = core.group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, scale="rloo")
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5]))
    loss, _ = core.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1), mask, agg="token-max")
    assert loss == -1.0  # r = 1, A = 1: l = -1 on every token
    torch.testing.assert_close(core.kl_penalty(torch.zeros(2), torch.tensor([0.5, -0.5]), "abs"),
                               torch.tensor([0.5, 0.5]))
    assert "rloo" in ADVANTAGE_SCALES.names()


def test_core_imports_no_lightning_or_transformers():
    """rftlab.core is pure tensor math: its files import torch and the stdlib, nothing of rftlab above it."""
    import ast

    core_dir = Path(core.__file__).parent
    forbidden = ("lightning", "pytorch_lightning", "transformers", "peft", "wandb", "bitsandbytes")
    for path in core_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
                if name.startswith("rftlab"):
                    assert name.startswith("rftlab.core"), f"{path.name} imports {name}"


def test_public_names():
    for name in ["selective_log_softmax", "entropy_from_logits", "group_advantages", "policy_loss",
                 "aggregate", "kl_penalty", "gae", "whiten", "value_loss", "explained_variance",
                 "overlong_penalty", "Registry", "AGGREGATIONS", "ADVANTAGE_SCALES", "KL_ESTIMATORS"]:
        assert name in core.__all__ and hasattr(core, name)


def test_takes_input_reads_the_signature_of_plain_and_unhashable_callables():
    from dataclasses import dataclass

    from rftlab.core.registry import takes_input

    @dataclass
    class Piece:  # eq=True makes instances unhashable: no cache entry, same answer
        scale: float = 1.0

        def __call__(self, logp, kl=None):
            return logp

    def plain(logp, eps_high=0.2):
        return logp

    assert takes_input(Piece(), "kl") and not takes_input(Piece(), "eps_high")
    assert takes_input(plain, "eps_high") and not takes_input(plain, "kl")
    assert takes_input(lambda logp, **kw: logp, "anything")
