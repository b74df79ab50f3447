"""The static-cache decode loop: the generic loop's logits, tokens and log-probs, on fewer Python ops."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rftlab.models.loading import tiny_llama
from rftlab.rollout.decoding import decode
from rftlab.rollout.sampler import (
    SamplingParams,
    completion_mask_from_eos,
    left_pad,
    sample_completions,
    sampling_mode,
)
from rftlab.models.fused import fuse, pack_fused_weights, unsupported_reason
from rftlab.rollout.static_decode import StaticDecoder, decoder_for, static_decode
from tiny_models import lora_policy

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10]]


def tiny_qwen2() -> torch.nn.Module:
    """A random 2-layer Qwen2: the Llama layout plus q/k/v biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.3)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases, so a loop that drops them fails
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.5)
    return model.eval()


def _both(model, params, eos, G=3, logprobs=True):
    ids, mask = left_pad(PROMPTS, 0)
    out = {}
    for name, loop in (("generic", decode), ("static", static_decode)):
        torch.manual_seed(0)
        with sampling_mode(model):
            out[name] = loop(model, ids, mask, G, params, eos, 0, logprobs=logprobs)
    return out


@pytest.mark.parametrize("make", [lambda: tiny_llama(200, seed=0), tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=1.0),
                                    SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9),
                                    SamplingParams(max_new_tokens=12, greedy=True)], ids=["t1", "t07-top-p", "greedy"])
def test_same_tokens_and_logprobs_as_the_generic_loop(make, params):
    model = make().eval()
    # Stop tokens that some rows sample early: rows end at different steps, so the static loop
    # compacts its batch mid-way.
    free = _both(model, params, eos=[-1])["generic"][0]
    eos = sorted({int(free[0, 2]), int(free[4, 5])})
    out = _both(model, params, eos=eos)
    (a, la), (b, lb) = out["generic"], out["static"]
    assert torch.equal(a, b)
    lengths = completion_mask_from_eos(b, eos)[0].sum(1)
    assert lengths.min() <= 3 and lengths.max() == 12, f"rows must finish at different steps: {lengths}"
    if params.greedy:
        assert la is None and lb is None
    else:
        assert_close(la, lb, rtol=0, atol=1e-5)


def test_prefill_and_decode_logits_equal_the_full_forward():
    model = tiny_llama(200, seed=3).eval()
    decoder = StaticDecoder(model)
    ids, mask = left_pad([[7, 8, 9, 10, 11, 12], [13, 14, 15]], 0)
    P = ids.shape[1]
    from rftlab.models.hf import position_ids_from_mask

    positions = position_ids_from_mask(mask)
    rope = decoder.rope_table(32)
    cache: list = []
    real = mask.bool()
    prefill_mask = (torch.ones(P, P, dtype=torch.bool).tril() & real[:, None, :]) | torch.eye(P, dtype=torch.bool)
    with torch.no_grad():
        logits = decoder.forward(ids, positions, cache, 0, prefill_mask.unsqueeze(1), rope, slots=P + 1)
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        assert_close(logits, full, rtol=1e-5, atol=1e-5)
        # One decoded token on top of the cache = the last position of the full forward on P + 1 tokens.
        nxt = torch.tensor([[21], [22]])
        step_mask = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], 1)[:, None, None, :]
        step = decoder.forward(nxt, positions[:, -1:] + 1, cache, P, step_mask, rope)
        ids2, mask2 = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        full2 = model(input_ids=ids2, attention_mask=mask2, position_ids=position_ids_from_mask(mask2)).logits[:, -1]
        assert_close(step, full2, rtol=1e-5, atol=1e-5)


def test_packed_weights_are_views_that_follow_updates():
    model = tiny_llama(200, seed=0).eval()
    ids, mask = left_pad(PROMPTS, 0)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    pack_fused_weights(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    attn = model.model.layers[0].self_attn
    qkv = fuse([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert qkv.data_ptr() == attn.q_proj.weight.data_ptr(), "packed weights must fuse without a copy"
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # as the sampling copy's refresh writes in place
    assert_close(qkv[attn.q_proj.weight.shape[0] : attn.q_proj.weight.shape[0] + attn.k_proj.weight.shape[0]],
                 attn.k_proj.weight, rtol=0, atol=0)
    # Unpacked weights are concatenated into a new tensor instead.
    plain = tiny_llama(200, seed=0).model.layers[0].self_attn
    fused = fuse([plain.q_proj.weight, plain.k_proj.weight, plain.v_proj.weight])
    assert fused.data_ptr() != plain.q_proj.weight.data_ptr()
    assert torch.equal(fused, torch.cat([plain.q_proj.weight, plain.k_proj.weight, plain.v_proj.weight]))


def test_other_models_keep_the_generic_loop(monkeypatch):
    assert unsupported_reason(tiny_llama(200)) is None
    assert "adapter" in unsupported_reason(lora_policy())
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="cannot run this model: model_type 'gpt2'"):
        StaticDecoder(gpt2)
    # sample_completions routes a LoRA policy to the generic loop and a plain Llama to the static one.
    calls = []
    monkeypatch.setattr("rftlab.rollout.static_decode.StaticDecoder.forward",
                        lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(RuntimeError("static")))
    ids, mask = left_pad(PROMPTS, 0)
    sample_completions(lora_policy(), ids, mask, 2, SamplingParams(max_new_tokens=3), [-1], 0)
    assert calls == []
    with pytest.raises(RuntimeError, match="static"):
        sample_completions(tiny_llama(100), ids, mask, 2, SamplingParams(max_new_tokens=3), [-1], 0)


def test_bf16_copy_and_autocast_agree_with_the_generic_loop():
    """In bf16 (the sampling copy) and under bf16 autocast (a full fine-tune's bf16-mixed run) the
    two loops run the same ops in the same dtypes: log-probs agree to bf16 rounding."""
    bf16 = tiny_llama(200, seed=0).to(torch.bfloat16).eval()
    pack_fused_weights(bf16)
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    out = _both(bf16, params, eos=[-1])
    assert out["static"][0].shape == out["generic"][0].shape == (9, 10)
    same = out["static"][0] == out["generic"][0]
    assert same[:, 0].all(), "the first token comes from the same prefill logits"
    fp32 = tiny_llama(200, seed=0).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _both(fp32, params, eos=[-1])
    assert torch.equal(auto["static"][0], auto["generic"][0])
    assert_close(auto["static"][1], auto["generic"][1], rtol=0, atol=0.05)


def test_the_decoder_is_kept_until_a_weight_changes():
    model = tiny_qwen2()  # untied head: changing it changes the greedy tokens
    model.requires_grad_(False)  # as the sampling copy: only a model that does not train is kept
    first = decoder_for(model)
    assert first.kernel == "packed"
    assert decoder_for(model) is first
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder_for(model) is not first  # autocast packs bf16 weights
    params = SamplingParams(max_new_tokens=6, greedy=True)
    ids, mask = left_pad(PROMPTS, 0)
    with sampling_mode(model):
        before = static_decode(model, ids, mask, 1, params, [-1], 0)
    cached = decoder_for(model)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    assert decoder_for(model) is not cached
    with sampling_mode(model):
        after = static_decode(model, ids, mask, 1, params, [-1], 0)
        expected = decode(model, ids, mask, 1, params, [-1], 0)
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_a_rebuilt_decoder_packs_again_only_the_layers_that_changed():
    model = tiny_qwen2()
    model.requires_grad_(False)
    first = decoder_for(model)
    with torch.no_grad():  # as a LoRA refresh of the sampling copy: one attention projection changes
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    second = decoder_for(model)
    assert second is not first
    assert second.layers[0].qkv is not first.layers[0].qkv  # packed again from the new weights
    assert second.layers[0].o is first.layers[0].o and second.layers[0].gate_up is first.layers[0].gate_up
    assert second.lm_head is first.lm_head
    assert all(b.qkv is a.qkv and b.down is a.down for a, b in zip(first.layers[1:], second.layers[1:]))
    params = SamplingParams(max_new_tokens=6, greedy=True)
    ids, mask = left_pad(PROMPTS, 0)
    with sampling_mode(model):
        assert torch.equal(static_decode(model, ids, mask, 1, params, [-1], 0),
                           decode(model, ids, mask, 1, params, [-1], 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another packed dtype: nothing is reused
        third = decoder_for(model)
    assert third.lm_head is not second.lm_head and third.layers[1].down is not second.layers[1].down


@pytest.mark.parametrize("kernels", ["onednn", "aten"])
def test_both_linear_kernels_match_the_generic_loop(kernels, monkeypatch):
    import rftlab.rollout.static_decode as sd

    model = tiny_llama(200, seed=2).eval()
    monkeypatch.setattr(sd, "decoder_for", lambda m, kernels_=kernels: StaticDecoder(m, kernels_))
    out = _both(model, SamplingParams(max_new_tokens=10, temperature=1.0), eos=[-1])
    assert torch.equal(out["static"][0], out["generic"][0])
    assert_close(out["static"][1], out["generic"][1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="kernels='fast' is invalid: must be one of auto, onednn, aten"):
        StaticDecoder(model, "fast")


def test_a_trained_model_is_decoded_without_copies_of_its_weights():
    model = tiny_llama(200, seed=0).eval()  # parameters that require grad: a policy being trained
    first = decoder_for(model)
    assert decoder_for(model) is not first, "a trained model's decoder is not kept"
    assert first.kernel in ("plain", "aten")
    layer, attn = first.layers[0], model.model.layers[0].self_attn
    # q/k/v are not back to back: three matmuls on the module weights themselves, no concatenated copy
    assert [part.weight.data_ptr() for part in layer.qkv.parts] == [
        attn.q_proj.weight.data_ptr(), attn.k_proj.weight.data_ptr(), attn.v_proj.weight.data_ptr()]
    assert first.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder_for(model).kernel == "aten"  # autocast casts as it would in transformers' forward
    out = _both(model, SamplingParams(max_new_tokens=8, temperature=1.0), eos=[-1])
    assert torch.equal(out["static"][0], out["generic"][0])
