"""QLoRA / 8-bit loading with bitsandbytes on the tiny model, and the AVX512-BF16 repack trap."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import CSVLogger

from rftlab import GRPO, PolicySpec, RolloutDataModule
from rftlab.models.quantization import keep_cpu_4bit_trainable, linear4bit_layers
from rftlab.tasks import Arithmetic

bnb = pytest.importorskip("bitsandbytes")


def _cpu_repacks_4bit() -> bool:
    """Whether bitsandbytes takes its AVX512-BF16 inference path here (where the trap exists)."""
    return bool(bnb.functional.has_avx512bf16())


def _lora_b_grads_after_rollout(module: GRPO, vary_reward) -> dict[str, float | None]:
    """Sample and score one rollout (eval mode, no grad), then one training loss + backward.

    Returns each lora_B weight's gradient norm (None when it got no gradient). lora_B is checked
    because LoRA initialises B to zero, which makes every lora_A gradient zero on the first step.
    """
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4).attach(module)
    batch = dm.next_minibatch()  # generate (sampling_mode: eval + no_grad) and score_rollout (no_grad)
    module.train()
    module.zero_grad()
    # A loss that reaches every layer regardless of the sampled advantages (which may all be zero).
    logits = module.policy_logits(batch)
    logits.float().pow(2).mean().backward()
    return {n: (None if p.grad is None else float(p.grad.norm())) for n, p in module.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_4bit_lora_gets_gradients_in_every_layer_after_a_rollout(tiny_grpo, vary_reward, quantization):
    module = tiny_grpo(policy={"model": "tiny", "lora": True, "quantization": quantization})
    assert linear4bit_layers(module.policy), "the base should be quantized"
    assert all(not layer.support_avx512bf16_for_cpu for layer in linear4bit_layers(module.policy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = _lora_b_grads_after_rollout(module, vary_reward)
    assert not [w for w in caught if "gemv_4bit" in str(w.message)]
    assert grads
    dead = [n for n, g in grads.items() if not g]
    assert not dead, f"no gradient through {len(dead)}/{len(grads)} LoRA layers after a rollout: {dead[:3]}"


@pytest.mark.skipif(not _cpu_repacks_4bit(), reason="the repack trap needs a CPU with AVX512-BF16")
def test_without_the_fix_a_rollout_silently_kills_lora_gradients(tiny_grpo, vary_reward):
    # The same check as above must fail when bitsandbytes' CPU repack is left on, as it is by default.
    module = tiny_grpo(policy={"model": "tiny", "lora": True, "quantization": "nf4"})
    for layer in linear4bit_layers(module.policy):
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    with pytest.warns(UserWarning, match="gemv_4bit"):  # the only visible sign of the bug
        grads = _lora_b_grads_after_rollout(module, vary_reward)
    dead = [n for n, g in grads.items() if not g]
    assert len(dead) > len(grads) // 2, f"expected the repack to block gradients, got {grads}"
    assert keep_cpu_4bit_trainable(module.policy) == len(linear4bit_layers(module.policy))


def test_int8_lora_trains_one_step(tiny_grpo, vary_reward):
    module = tiny_grpo(policy={"model": "tiny", "lora": True, "quantization": "int8"})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.policy.modules())
    grads = _lora_b_grads_after_rollout(module, vary_reward)
    assert grads and all(grads.values())


def test_quantization_keeps_the_model_close_to_the_unquantized_one(tokenizer):
    plain = GRPO(policy="tiny")
    plain.configure_model()
    quantized = GRPO(policy={"model": "tiny", "lora": True, "quantization": "nf4"})
    quantized.configure_model()
    ids = torch.randint(3, len(tokenizer), (2, 6))
    with torch.no_grad():
        a = plain.policy(input_ids=ids).logits
        b = quantized.policy(input_ids=ids).logits
    # nf4 rounds each weight to one of 16 levels: close, but not equal (so really quantized).
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_a_quantized_model_releases_the_checkpoint_file(tmp_path, tokenizer):
    """The layers left unquantized are copied out of the safetensors memory map, so the whole file
    (read while quantizing) does not stay resident (tied weights stay tied)."""
    import gc

    from rftlab.models.loading import load_causal_lm, tiny_llama

    folder = tmp_path / "model"
    tiny = tiny_llama(len(tokenizer))
    tiny.config.tie_word_embeddings = True
    tiny.tie_weights()
    tiny.save_pretrained(folder)
    model = load_causal_lm(str(folder), quantization="nf4")
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if str(folder) in line]
    assert mapped == []
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    ids = torch.randint(3, len(tokenizer), (1, 5))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_compute_dtype_reaches_the_4bit_layers():
    module = GRPO(policy=PolicySpec(model="tiny", lora=True, quantization="nf4", compute_dtype="bfloat16"))
    module.configure_model()
    assert {layer.compute_dtype for layer in linear4bit_layers(module.policy)} == {torch.bfloat16}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(quantization="nf8", lora=True), ValueError,
         "policy.quantization='nf8' is invalid: must be one of 'none', 'nf4', 'fp4', 'int8'"),
        (dict(quantization="nf4"), ValueError, "policy.quantization='nf4' is invalid: must be 'none' unless lora=True"),
        (dict(quantization="nf4", lora=True, compute_dtype="float64"), ValueError,
         "policy.compute_dtype='float64' is invalid"),
    ],
)
def test_bad_quantization_options_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        GRPO(policy={"model": "tiny", **kwargs})


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"quantization='nf4' needs bitsandbytes.*pip install"):
        GRPO(policy={"model": "tiny", "lora": True, "quantization": "nf4"})
    with pytest.raises(ImportError, match=r"optim.optimizer='adamw8bit' needs bitsandbytes"):
        GRPO(policy="tiny", optim={"optimizer": "adamw8bit"})
    GRPO(policy="tiny", lora=True)  # plain LoRA does not need it


def test_qlora_fit_with_bf16_autocast_changes_the_adapter_and_logs(tmp_path, tiny_grpo, vary_reward):
    module = tiny_grpo(policy={"model": "tiny", "lora": True, "quantization": "nf4"}, lr=5e-2, beta=0.1)
    before = trainable_snapshot(module)
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4)
    logger = CSVLogger(tmp_path)
    fit_tiny(module, dm, 2, tmp_path, logger=logger, precision="bf16-mixed")
    assert_params_changed(before, module, names=lambda n: "lora_B" in n, require="any",
                          message="the adapter did not train")
    assert module.ref_policy is None, "an adapter run needs no reference copy"
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/policy", "kl", "grad_norm"} <= set(logged)
