"""Policy loading, LoRA, the adapter-disabled reference, completion logits."""

from __future__ import annotations

import re

import pytest
import torch

from rftlab.models import adapter_disabled, apply_lora, completion_logits, load_causal_lm, load_tokenizer
from rftlab.models.loading import ModelNotFoundError, tiny_llama


def test_tokenizer_always_has_a_pad_token(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    import json

    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token_id is not None
    assert reloaded.pad_token_id == reloaded.eos_token_id


def test_unknown_policy_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="policy="):
        load_causal_lm(str(tmp_path / "does-not-exist"))


def test_tiny_llama_is_seeded():
    a, b = tiny_llama(100, seed=1), tiny_llama(100, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lora_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match="lora_target_modules.*match no module"):
        apply_lora(tiny_llama(100), target_modules=["query_key_value"])


def test_adapter_disabled_logits_equal_the_base_model_exactly():
    base = tiny_llama(100, seed=0)
    reference = tiny_llama(100, seed=0)
    model = apply_lora(base, r=4)
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with adapter_disabled(model):
            off = model(input_ids=ids, attention_mask=mask).logits
        on = model(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off, expected)
    assert not torch.allclose(on, expected)


def _lora_model_with_a_critic_adapter():
    from rftlab.models.policy import add_adapter

    model = apply_lora(tiny_llama(100, seed=0), r=4)
    add_adapter(model, "critic", r=2, target_modules=["q_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def test_adapter_disabled_switches_every_adapter_back_and_keeps_what_trains():
    model = _lora_model_with_a_critic_adapter()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("critic" in n for n in trainable) and any("default" in n for n in trainable)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adapter_disabled(model):
            off = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad(), model.disable_adapter():  # PEFT's own switch (which freezes the critic's adapter)
        peft_off = model(input_ids=ids).logits
    assert torch.equal(off, peft_off) and not torch.allclose(off, before)
    assert torch.equal(after, before)


def test_adapter_disabled_leaves_a_layer_that_was_off_off():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _lora_model_with_a_critic_adapter()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].enable_adapters(False)
    with adapter_disabled(model):
        assert all(layer.disable_adapters for layer in layers)
    assert layers[0].disable_adapters
    assert not any(layer.disable_adapters for layer in layers[1:])


def test_a_loaded_model_runs_without_hub_kernels(tmp_path):
    # Hub kernels would be fetched over the network, and transformers re-kernelizes at every
    # train()/eval() switch when they are on (its default when the kernels package is installed).
    tiny_llama(100, seed=0).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    assert getattr(model, "use_kernels", False) is False


def test_logits_at_temperature_one_stay_as_the_head_made_them():
    from rftlab.core import selective_log_softmax, selective_log_softmax_and_entropy
    from rftlab.models.policy import _scaled

    logits = (3 * torch.randn(2, 3, 50)).to(torch.bfloat16)
    assert _scaled(logits, 1.0) is logits  # no float32 copy of the (N, T, V) tensor
    assert _scaled(logits, 2.0).dtype == torch.float32  # a division is made in float32
    assert torch.equal(_scaled(logits, 2.0), logits.float() / 2.0)
    full = torch.randn(2, 3, 5)
    assert _scaled(full, 1.0) is full
    # The log-prob helpers upcast bf16 logits themselves: the same numbers as from a float32 copy.
    ids = torch.randint(0, 50, (2, 3))
    assert torch.allclose(selective_log_softmax(logits, ids), selective_log_softmax(logits.float(), ids), atol=1e-6)
    logp, entropy = selective_log_softmax_and_entropy(logits, ids)
    logp32, entropy32 = selective_log_softmax_and_entropy(logits.float(), ids)
    assert logp.dtype == torch.float32 and torch.allclose(logp, logp32, atol=1e-6)
    assert torch.allclose(entropy, entropy32, atol=1e-6)


def test_completion_logits_match_a_full_forward_with_left_padding():
    model = tiny_llama(100, seed=0).eval()
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[11, 12, 0], [13, 14, 15]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        got = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=2.0)
        # Reference: row 0 alone without any padding.
        alone = model(input_ids=torch.tensor([[5, 6, 11, 12]])).logits
    assert got.shape == (2, 3, 100)
    # positions P-1.. predict the completion: logits of "6" predict 11, of "11" predict 12
    torch.testing.assert_close(got[0, :2], alone[0, 1:3] / 2.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["/nonexistent/model", "./no_such_model", "~/no_such_model", "a/b/c"])
def test_a_missing_folder_is_named_as_a_folder_not_a_hub_id(policy):
    # Before, transformers took these for hub ids and answered with a repository-name error.
    from rftlab.models import load_tokenizer

    with pytest.raises(ModelNotFoundError, match=rf"policy='{re.escape(policy)}': no such folder"):
        load_tokenizer(policy)


def test_a_folder_given_by_a_relative_path_loads(tmp_path, monkeypatch):
    from rftlab.models import load_tokenizer
    from rftlab.models.loading import default_model_dir

    monkeypatch.chdir(default_model_dir().parent)
    assert load_tokenizer(f"./{default_model_dir().name}").eos_token is not None


def test_a_folder_given_as_a_path_object_loads_and_a_missing_one_is_named(tmp_path):
    # default_model_dir() returns a Path; loaders and the policy group take it as they take its str.
    from pathlib import Path

    from rftlab.models import PolicySpec, load_tokenizer
    from rftlab.models.loading import default_model_dir, resolve_model_path

    assert load_tokenizer(default_model_dir()).vocab_size == load_tokenizer("default").vocab_size
    assert resolve_model_path(default_model_dir()) == str(default_model_dir())
    assert PolicySpec.resolve(default_model_dir()).model == str(default_model_dir())
    with pytest.raises(ModelNotFoundError, match=r"policy='.*missing': no such folder"):
        resolve_model_path(Path(tmp_path / "missing"))
