"""cache_weight_casts: frozen linear weights cast once for autocast, with bit-identical results."""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import pytest
import torch
from helpers import fit_tiny
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rftlab import GRPO, RolloutDataModule
from rftlab.models.cast_cache import FrozenCastCache
from rftlab.models.loading import tiny_llama
from rftlab.tasks import Arithmetic
from tiny_models import lora_policy

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])



def frozen_linear_weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]


class CastCounter(TorchDispatchMode):
    """Counts casts (aten._to_copy) whose input is one of the watched tensors' storage."""

    def __init__(self, watched: list[torch.Tensor]) -> None:
        super().__init__()
        self.pointers = {t.data_ptr() for t in watched}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def forward_backward(model: nn.Module, cache: FrozenCastCache | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.active(model) if cache is not None else nullcontext():
        logits = model(input_ids=IDS).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_logits_and_gradients_are_bit_identical_to_plain_autocast():
    model = lora_policy()
    plain_logits, plain_grads = forward_backward(model, None)
    cache = FrozenCastCache()
    cached_logits, cached_grads = forward_backward(model, cache)
    assert len(cache) == len(frozen_linear_weights(model)) > 0
    assert plain_logits.dtype == torch.bfloat16 and torch.equal(cached_logits, plain_logits)
    assert plain_grads.keys() == cached_grads.keys() and plain_grads
    assert all(torch.equal(cached_grads[n], plain_grads[n]) for n in plain_grads)


def test_frozen_weights_are_cast_once_then_never_again():
    model = lora_policy()
    frozen = frozen_linear_weights(model)
    cache = FrozenCastCache()
    counts = []
    for use_cache in (False, True, True):
        counter = CastCounter(frozen)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), counter:
            with cache.active(model) if use_cache else nullcontext():
                for _ in range(3):  # three forwards, as three decoded tokens
                    model(input_ids=IDS)
        counts.append(counter.casts)
    # plain autocast: every frozen weight at every call; the cache: once each, on first use only
    assert counts == [3 * len(frozen), len(frozen), 0]


def test_the_model_gets_its_float32_weights_back_and_nothing_happens_without_autocast():
    model = lora_policy()
    before = {n: p for n, p in model.named_parameters()}
    cache = FrozenCastCache()
    with cache.active(model):  # autocast off: nothing swapped, nothing cached
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(cache) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.active(model):
        q = model.get_base_model().model.layers[0].self_attn.q_proj
        assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
        with cache.active(model):  # nested use (sampling inside a step) is a no-op
            pass
        assert q.base_layer.weight.dtype == torch.bfloat16
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_trainable_and_quantized_layers_are_left_to_autocast():
    full = tiny_llama(100, seed=0)  # every weight trains: autocast caches those casts itself
    cache = FrozenCastCache()
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.active(full):
        full(input_ids=IDS)
    assert len(cache) == 0

    class QuantLinear(nn.Linear):  # stands for bitsandbytes' Linear4bit / Linear8bitLt
        pass

    model = nn.Sequential(QuantLinear(4, 4), nn.Linear(4, 4)).requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.active(model):
        assert model[0].weight.dtype == torch.float32 and model[1].weight.dtype == torch.bfloat16


def test_a_copy_is_remade_when_its_weight_changes_in_place():
    model = lora_policy()
    cache = FrozenCastCache()
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.active(model):
        first = q.weight
    with torch.no_grad():
        q.weight.add_(1.0)  # e.g. load_state_dict of new base weights
    with torch.autocast("cpu", dtype=torch.bfloat16), cache.active(model):
        second = q.weight
    assert second is not first and torch.equal(second, q.weight.to(torch.bfloat16))
    assert not torch.equal(second, first)


def fit(tmp_path, cache_weight_casts: bool, **kwargs) -> GRPO:
    from tests.conftest import length_parity

    L.seed_everything(0)
    module = GRPO(**{"policy": "tiny", "lora": True, "lr": 5e-2, "log": {"validate_at_start": True},
                     # sampling with the policy itself (not the bf16 copy "auto" would take): its
                     # frozen weights are cast at every decoded token unless cached
                     "forward": {"cache_weight_casts": cache_weight_casts, "sampling_dtype": None}, **kwargs})
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards={"parity": length_parity}, prompts_per_step=2,
                           num_generations=3, max_new_tokens=5, val_batch_size=2, seed=0)
    module.configure_model()
    counter = CastCounter(frozen_linear_weights(module.policy))
    with counter:
        fit_tiny(module, dm, 3, tmp_path / str(cache_weight_casts), precision="bf16-mixed", val_check_interval=3,
                 limit_val_batches=None, enable_checkpointing=True)
    module.frozen_weight_casts = counter.casts
    return module


@pytest.mark.parametrize("kwargs", [dict(beta=0.1), dict(policy={"model": "tiny", "gradient_checkpointing": True})],
                         ids=["beta", "checkpointing"])
def test_grpo_under_bf16_mixed_trains_to_the_same_weights_with_the_cache(tmp_path, kwargs):
    cached = fit(tmp_path, True, **kwargs)
    plain = fit(tmp_path, False, **kwargs)
    assert len(cached.runtime._cast_cache) > 0 and len(plain.runtime._cast_cache) == 0
    once = len(frozen_linear_weights(cached.policy))
    if cached.policy_spec.gradient_checkpointing:
        # the backward's recompute runs outside the step, where autocast casts as usual
        assert once < cached.frozen_weight_casts < plain.frozen_weight_casts / 5
    else:
        # validation, 3 rollouts (sampling + scoring), 3 updates: each frozen weight cast once in all
        assert cached.frozen_weight_casts == once
        assert plain.frozen_weight_casts > 20 * once
    trained = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trained)
    for name, p in cached.named_parameters():
        assert p.dtype == torch.float32, name  # the policy never keeps a cast weight
        assert torch.equal(p, dict(plain.named_parameters())[name]), name
    assert cached.initial_val_accuracy == plain.initial_val_accuracy
    saved = torch.load(tmp_path / "True" / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=False)["state_dict"]
    assert saved and all(v.dtype == torch.float32 for v in saved.values())


def test_cache_weight_casts_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match="forward.cache_weight_casts='yes'"):
        GRPO(policy="tiny", forward={"cache_weight_casts": "yes"})
