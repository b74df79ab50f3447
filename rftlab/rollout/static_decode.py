"""A static-cache decode loop for Llama-family models: the fast path of rftlab's own sampler.

Decoding one token at batch 8 reads every weight once and does little arithmetic, so on a CPU the
step is bound by memory traffic plus Python overhead. transformers' forward spends a large share
of each step in Python (module calls, a cache object that grows by concatenation, mask building).
This loop runs the same math with

* a key/value cache preallocated for the whole completion (no per-step concatenation),
* one fused q/k/v matmul and one fused gate/up matmul per layer (fewer, larger matmuls), on
  weights prepacked for oneDNN (``_Linear``); a policy being trained (``sampling_dtype=None``) is
  decoded on its own weights instead, without copies (``_Stacked``, ``_kernel``),
* the attention of the single new token as two small matmuls (``_attention``),
* the RoPE table computed once per call, the attention mask kept as one boolean table,
* finished rows kept in the batch (their compute is nearly free when weights dominate) and
  compacted only when half of them are done.

Measured on SmolLM2-135M in bf16, one thread, 8 completions: 174-185 tokens/s against 87-94 for
transformers' forward in the generic loop (``benchmarks/sampler_speed.py``).

It reads the weights of a plain (unwrapped, unquantized, unsharded) HF ``LlamaForCausalLM`` or a
model of the same layout (Qwen2 adds q/k/v biases; Mistral without a sliding window), so the
sampling copy (``forward.sampling_dtype``) decodes through it; anything else keeps the generic
loop of ``rftlab.rollout.decoding``. The random stream is the generic loop's (one uniform number
per running row per step, rows in the same order), so both sample the same tokens wherever their
logits agree.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rftlab.models.fused import adjacent_view, unsupported_reason
from rftlab.models.hf import position_ids_from_mask
from rftlab.rollout.sampler import SamplingParams


#: How ``_Linear`` multiplies: oneDNN on a prepacked copy, oneDNN on the weight as it is, or ``F.linear``.
Kernel = Literal["packed", "plain", "aten"]


class _Linear:
    """``x @ weight.T + bias`` with one of three kernels.

    "packed": oneDNN on a copy of the weight prepacked in its blocked layout. At decoding shapes (8
    rows) torch's default CPU kernel reads a bf16 weight at about half that speed (measured here:
    541 vs 293 us for a 3072 x 576 weight, one thread, the weights out of cache); prepacking costs a
    copy of the weight, made once per set of weights. Under CPU autocast a float32 weight is packed
    in autocast's dtype and the input cast to it, which is the cast autocast would make.
    "plain": oneDNN on the float32 weight itself, no copy (outside autocast). "aten": ``F.linear``.

    Args:
        weight: (out, in).
        bias: (out,) or None.
        kernel: "packed", "plain" or "aten".
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: Kernel) -> None:
        self.kernel = kernel
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.dtype = weight.dtype
        if kernel == "packed":
            if torch.is_autocast_enabled("cpu") and self.dtype == torch.float32:
                self.dtype = torch.get_autocast_dtype("cpu")
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.to(self.dtype))
            self.bias = None if bias is None else self.bias.to(self.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        if self.kernel == "aten":
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [None], "")


class _Stacked:
    """Linear layers applied to the same input, their outputs side by side (q/k/v, gate/up).

    One matmul when the weights lie back to back (``pack_fused_weights``) or are packed anyway (the
    copy is made once); otherwise one per layer, so no weight is copied.

    Args:
        linears: the ``nn.Linear`` layers, in output order.
        kernel: as ``_Linear``.
    """

    def __init__(self, linears: list[nn.Module], kernel: Kernel) -> None:
        weights = [lin.weight for lin in linears]
        biases = [lin.bias for lin in linears]
        has_bias = biases[0] is not None
        weight = adjacent_view(weights)
        bias = adjacent_view(biases) if has_bias else None
        if (weight is None or (has_bias and bias is None)) and kernel == "packed":
            weight, bias = torch.cat(weights), torch.cat(biases) if has_bias else None
        if weight is not None and (bias is not None or not has_bias):
            self.parts = [_Linear(weight, bias, kernel)]
        else:
            self.parts = [_Linear(w, b, kernel) for w, b in zip(weights, biases)]

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _kernel(model: nn.Module, kernels: str) -> Kernel:
    """The ``_Linear`` kernel for ``model``: prepacked copies for weights that do not train (the
    sampling copy); for a policy being trained (its weights change at every step, and copies would
    add its size to the memory) oneDNN on the float32 weights as they are, or ``F.linear``."""
    from rftlab.models.onednn import onednn_linear_available

    weight = model.lm_head.weight
    onednn = weight.device.type == "cpu" and onednn_linear_available()
    if kernels == "aten" or not onednn:
        if kernels == "onednn":
            raise ValueError("kernels='onednn' needs weights on a CPU and a torch build with oneDNN")
        return "aten"
    if kernels == "onednn" or not any(p.requires_grad for p in model.parameters()):
        if weight.dtype not in (torch.float32, torch.bfloat16):
            if kernels == "onednn":
                raise ValueError("kernels='onednn' needs float32 or bfloat16 weights")
            return "aten"
        return "packed"
    plain = weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return "plain" if plain else "aten"


@dataclass
class _Layer:
    input_norm: Tensor
    qkv: _Stacked
    o: _Linear
    post_norm: Tensor
    gate_up: _Stacked
    down: _Linear


def _attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new token per row, (n, h, 1, d), over (n, kvh, L, d) keys and values.

    The query heads that share a key/value head are stacked as rows of one matmul (grouped-query
    attention without repeating the cache). For a single query, torch's fused CPU kernel
    (``scaled_dot_product_attention``) took a fifth of a decoding step here; two small matmuls and a
    float32 softmax (as transformers' eager attention) cost a fraction of that.

    Args:
        q: (n, h, 1, d) queries.
        keys: (n, kvh, L, d).
        values: (n, kvh, L, d).
        mask: (n, 1, 1, L) boolean, True where the row may attend.
    """
    n, h, _, d = q.shape
    kvh = keys.shape[1]
    grouped = q.reshape(n, kvh, h // kvh, d)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * d**-0.5  # (n, kvh, g, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(n, h, 1, d)


class StaticDecoder:
    """The forward pass of a Llama-family model over a preallocated key/value cache.

    Args:
        model: a plain HF causal LM that ``unsupported_reason`` accepts.
        kernels: "onednn" prepacks the linear weights for oneDNN (a CPU, float32 or bfloat16
            weights), "aten" runs ``F.linear`` on them as they are, "auto" prepacks a model that
            does not train (the sampling copy) and runs a trained one without copying its weights.
        previous: an earlier decoder of the same model with the same kernels: its packed layers
            whose weights have not changed since are reused instead of packed again.
    """

    def __init__(self, model: nn.Module, kernels: Literal["auto", "onednn", "aten"] = "auto",
                 previous: "StaticDecoder | None" = None) -> None:
        if kernels not in ("auto", "onednn", "aten"):
            raise ValueError(f"kernels={kernels!r} is invalid: must be one of auto, onednn, aten")
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the static-cache decoder cannot run this model: {reason}")
        config = model.config
        self.rotary = model.model.rotary_emb  # not the model: a cache of decoders must not keep it alive
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.kernel = kernel = _kernel(model, kernels)
        # Packed units of the previous decoder whose weights have not changed since are reused: a
        # LoRA run changes only its adapted layers, and packing the others again (the output layer
        # alone is 28M weights here) would be most of the rebuild.
        reusable = previous.units if previous is not None and previous.kernel == kernel == "packed" else {}
        #: Packed units by the (address, version) of the weights they were made from.
        self.units: dict[tuple, _Linear | _Stacked] = {}

        def unit(linears: list[nn.Module], build: Callable[[], _Linear | _Stacked]) -> _Linear | _Stacked:
            if kernel != "packed":
                return build()
            key = tuple((t.data_ptr(), t._version) for lin in linears for t in (lin.weight, lin.bias) if t is not None)
            made = self.units[key] = reusable.get(key) or build()
            return made

        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = unit([model.lm_head], lambda: _Linear(model.lm_head.weight, None, kernel))
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=unit(qkv, lambda qkv=qkv: _Stacked(qkv, kernel)),
                o=unit([attn.o_proj], lambda o=attn.o_proj: _Linear(o.weight, o.bias, kernel)),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=unit(gate_up, lambda gate_up=gate_up: _Stacked(gate_up, kernel)),
                down=unit([mlp.down_proj], lambda down=mlp.down_proj: _Linear(down.weight, down.bias, kernel)),
            ))
        self.dtype = self.embed.dtype
        self.device = self.embed.device

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        # As transformers' LlamaRMSNorm: the statistics in float32, the scale in the model's dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def rope_table(self, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin for positions 0..length-1, (length, head_dim), from the model's own rotary module."""
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, positions)
        return cos[0], sin[0]

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, ids: Tensor, positions: Tensor, cache: list[tuple[Tensor, Tensor]], start: int,
                mask: Tensor, rope: tuple[Tensor, Tensor], repeat: int = 1, slots: int = 0) -> Tensor:
        """Last-position logits (n, V) for ``ids`` (n, s); their keys/values go to cache slots ``start:start+s``.

        Args:
            ids: (n, s) token ids.
            positions: (n, s) position ids.
            cache: per layer (keys, values), each (n * repeat, kv_heads, slots, head_dim); an empty
                list is filled with new tensors of ``slots`` slots, in the dtype the keys come out in
                (the weights' dtype, or autocast's).
            start: the first cache slot written.
            mask: (n, 1, s, start + s) boolean, True where a query may attend to a slot.
            rope: the ``rope_table``.
            repeat: write each row's keys/values into ``repeat`` consecutive cache rows (the prefill
                of a prompt shared by its group).
            slots: cache length when ``cache`` is allocated here.
        """
        n, s = ids.shape
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1)  # (n, 1, s, d)
        x = F.embedding(ids, self.embed)
        end = start + s
        allocate = not cache
        for i, layer in enumerate(self.layers):
            hidden = self._norm(x, layer.input_norm)
            qkv = layer.qkv(hidden).view(n, s, h + 2 * kvh, d).transpose(1, 2)
            qk = self._rotate(qkv[:, : h + kvh], cos, sin)  # queries and keys rotate together
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh :]
            if allocate:
                shape = (n * repeat, kvh, slots, d)
                cache.append((k.new_zeros(shape), v.new_zeros(shape)))
            keys, values = cache[i]
            if repeat > 1:
                keys[:, :, start:end] = k.repeat_interleave(repeat, dim=0)
                values[:, :, start:end] = v.repeat_interleave(repeat, dim=0)
                k_all, v_all = keys[::repeat, :, :end], values[::repeat, :, :end]
            else:
                keys[:, :, start:end], values[:, :, start:end] = k, v
                k_all, v_all = keys[:, :, :end], values[:, :, :end]
            attn = _attention(q, k_all, v_all, mask) if s == 1 else F.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=mask, enable_gqa=kvh != h)
            x = x + layer.o(attn.transpose(1, 2).reshape(n, s, h * d))
            hidden = self._norm(x, layer.post_norm)
            gate, up = layer.gate_up(hidden).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return self.lm_head(self._norm(x[:, -1], self.final_norm))


_DECODERS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, StaticDecoder]] = weakref.WeakKeyDictionary()


def decoder_for(model: nn.Module, kernels: Literal["auto", "onednn", "aten"] = "auto") -> StaticDecoder:
    """The ``StaticDecoder`` of ``model``, rebuilt only when its weights have changed since the last call.

    Prepacking copies every weight, so the decoder of a model that does not train (the sampling
    copy) is kept between calls: a validation pass decodes many batches with the same weights. A
    weight written in place (the copy's refresh, ``load_state_dict``) bumps its tensor's version
    counter, a replaced one has a new address: either rebuilds the decoder, which packs again only
    the layers whose weights changed. A change of autocast, which sets the packed dtype, packs every
    layer again. A model being trained copies nothing and is not kept.

    Args:
        model: a model ``unsupported_reason`` accepts.
        kernels: as ``StaticDecoder``.
    """
    if any(p.requires_grad for p in model.parameters()):
        return StaticDecoder(model, kernels)
    key = (kernels, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
           tuple((p.data_ptr(), p._version) for p in model.parameters()))
    cached = _DECODERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    previous = cached[1] if cached is not None and cached[0][:3] == key[:3] else None
    decoder = StaticDecoder(model, kernels, previous=previous)
    _DECODERS[model] = (key, decoder)
    return decoder


def static_decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    logprobs: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """``rftlab.rollout.decoding.decode`` on a preallocated cache: same arguments, same outputs.

    Args:
        model: a plain Llama-family HF causal LM (``unsupported_reason`` is None), in eval mode.
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: completions per prompt (G); row ``b * G + g``.
        params: sampling parameters.
        eos_token_ids: ids that end a completion.
        pad_token_id: filler after EOS.
        logprobs: also return the (B*G, T) float32 log-probs of the sampled tokens.
    """
    from rftlab.rollout.decoding import sample_next

    decoder = decoder_for(model)
    G, T = num_generations, params.max_new_tokens
    B, P = prompt_ids.shape
    N, slots = B * G, P + T
    device = prompt_ids.device
    cache: list[tuple[Tensor, Tensor]] = []
    positions = position_ids_from_mask(prompt_mask)
    rope = decoder.rope_table(int(positions.max()) + T + 1)
    real = prompt_mask.bool()
    # Prefill: causal over real prompt tokens; a padding query attends to itself only (its output
    # is never used, and a query that attends to nothing would make NaNs).
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=device)
    prefill_mask = (causal & real[:, None, :]) | eye
    logits = decoder.forward(prompt_ids, positions, cache, 0, prefill_mask.unsqueeze(1), rope, repeat=G, slots=slots)
    logits = logits.repeat_interleave(G, dim=0)
    # valid[n, slot]: row n may attend to that cache slot (its real prompt tokens, then its tokens).
    valid = torch.zeros(N, slots, dtype=torch.bool, device=device)
    valid[:, :P] = real.repeat_interleave(G, dim=0)
    next_position = positions[:, -1:].repeat_interleave(G, dim=0) + 1

    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)
    record = logprobs and not params.greedy
    token_logps = torch.zeros((N, T), dtype=torch.float32, device=device) if record else None
    rows = torch.arange(N, device=device)  # the output row of each batch row
    running = torch.ones(N, dtype=torch.bool, device=device)  # per batch row
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    feed = torch.full((N,), pad_token_id, dtype=torch.long, device=device)
    length = 0
    for step in range(T):
        live = running.nonzero().squeeze(-1)
        token, logp = sample_next(logits[live], params, logprobs=record)
        tokens[rows[live], step] = token
        if record:
            token_logps[rows[live], step] = logp
        length = step + 1
        running[live] = ~torch.isin(token, eos)
        if step == T - 1 or not bool(running.any()):
            break
        feed.fill_(pad_token_id)
        feed[live] = token
        if int(running.sum()) * 2 <= len(rows):
            # Half the batch is done: drop finished rows from the batch and the cache.
            keep = running.nonzero().squeeze(-1)
            cache = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in cache]
            rows, running, feed = rows[keep], running[keep], feed[keep]
            valid, next_position = valid[keep], next_position[keep]
        slot = P + step
        valid[:, slot] = True
        mask = valid[:, None, None, : slot + 1]
        logits = decoder.forward(feed.unsqueeze(-1), next_position, cache, slot, mask, rope)
        next_position = next_position + 1
    if not logprobs:
        return tokens[:, :length]
    return tokens[:, :length], (token_logps[:, :length] if record else None)
