"""Optional vLLM rollout backend (``sampler_backend="vllm"``) for users with a CUDA GPU.

NOT RUN by rftlab's tests or on the machine it was written on (no GPU, no vllm). The tests cover the
guard (a clear error at construction without vllm or without CUDA) and the pure helpers below
(sampling arguments, prompt lists, padding vLLM's outputs, merged LoRA weights). It follows vLLM's
offline ``LLM`` API (V1 engine) the way TRL's colocate mode uses it; validate it on your GPU.

How it works:
- One ``vllm.LLM`` per policy, built on its first sampling call, in this process and on this GPU
  (colocated with training). ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in-process so
  its model can be reached and its weights loaded by reference. It is built from the policy's
  config alone (``load_format="dummy"``): no checkpoint is written or read, the weights come next.
- Weights are pushed (the vLLM model's ``load_weights``) before every sampling call. The DataModule
  samples once per rollout, right after the optimizer step(s) that preceded it, so this is a sync
  after each optimizer step that needs no optimizer hook and can never sample stale weights;
  validation pays one extra copy. The prefix cache is reset after each push: its KV blocks were
  computed with the old weights.
- LoRA: the adapter is merged into the pushed weights (W + scale * B A, computed per layer on the
  fly; the training model is untouched) rather than served with ``LoRARequest``, which needs the
  adapter saved to disk every step, ``enable_lora`` with a maximum rank, and vLLM's LoRA kernels,
  which decode slower than plain weights. The cost is one weight-sized sum per adapted layer per sync.
- Sampling: ``vllm.SamplingParams(n=G, temperature, top_p, top_k, max_tokens, seed)``; the seed is
  drawn from torch's generator, which the DataModule seeds per rollout. The token ids come back with
  the stop token included and are right-padded like the other backends' (``sample_completions``
  derives the mask from the first EOS).

Limits: the engine runs in the policy's parameter dtype (``dtype="bfloat16"`` on the module for a
bf16 engine; the Trainer's precision does not reach it). vLLM's kernels are not HF's, so
sampling-time and training-time log-probs differ slightly (the known inference/training mismatch;
no importance correction here). One process only (the DataModule rejects multi-process and sharded
strategies); no 4-bit/8-bit bases; no sleep mode, so the engine's KV cache stays allocated during
the update. Engine options (memory share, ...) are ``ENGINE_KWARGS``; set them before the first rollout.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rftlab.models.hf import hf_model
from rftlab.rollout.sampler import SamplingParams

# Passed to ``vllm.LLM``. Training shares the GPU, so vLLM gets a fraction of it (weights + KV cache),
# not its default 0.9; prefix caching lets the G samples of a prompt share its prefill.
ENGINE_KWARGS: dict[str, Any] = {"gpu_memory_utilization": 0.3, "enable_prefix_caching": True}

INSTALL_HINT = "pip install vllm (Linux with a CUDA GPU)"


def vllm_installed() -> bool:
    """Whether the vllm package can be imported (found without importing it: the import is slow)."""
    return importlib.util.find_spec("vllm") is not None


def check_vllm_available(parameter: str) -> None:
    """Raise ValueError, naming ``parameter``, unless vllm is installed and a CUDA device is visible.

    Args:
        parameter: the argument that asked for the backend ("sampler_backend", "backend").
    """
    if not vllm_installed():
        raise ValueError(f"{parameter}='vllm' needs the vllm package, which is not installed: {INSTALL_HINT}; "
                         f"or use {parameter}='rftlab'")
    if not torch.cuda.is_available():
        raise ValueError(f"{parameter}='vllm' needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                         f"False); use {parameter}='rftlab' on CPU")


# ---- pure helpers (tested without vllm) ------------------------------------------------------
def sampling_kwargs(params: SamplingParams, num_generations: int, eos_token_ids: Sequence[int], seed: int) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams`` that sample what the other backends sample.

    Args:
        params: rftlab's sampling parameters.
        num_generations: completions per prompt (vLLM's ``n``).
        eos_token_ids: ids that end a completion (empty with ``params.ignore_eos``).
        seed: per-request seed, so a seeded rollout is reproducible.
    """
    return {
        "n": num_generations,
        "max_tokens": params.max_new_tokens,
        # vLLM decodes greedily at temperature 0; its filters are then irrelevant.
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "top_k": -1 if params.greedy or params.top_k == 0 else params.top_k,  # -1 disables it in every vLLM version
        "stop_token_ids": list(eos_token_ids),
        "ignore_eos": params.ignore_eos,
        "seed": seed,
        "detokenize": False,  # token ids are all we return; the DataModule decodes them
    }


def prompt_token_lists(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt: (B, P) ids and mask -> B lists (vLLM takes no padding).

    Args:
        prompt_ids: (B, P) left-padded prompt tokens.
        prompt_mask: (B, P) 1 on real prompt tokens.
    """
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]


def completion_tensor(outputs: Sequence[Any], num_generations: int, pad_token_id: int) -> Tensor:
    """vLLM's ``RequestOutput`` list -> (B*G, T) completion tokens, right-padded, grouped by prompt.

    Row ``b * G + g`` is sample ``g`` of prompt ``b``, as with the other backends; T is the longest
    completion. Only ``outputs[b].outputs[g].token_ids`` and ``.index`` are read.

    Args:
        outputs: one request output per prompt, in prompt order (as ``LLM.generate`` returns them).
        num_generations: samples expected per prompt (G).
        pad_token_id: filler after a completion's end.
    """
    rows: list[list[int]] = []
    for b, request in enumerate(outputs):
        samples = sorted(request.outputs, key=lambda sample: sample.index)
        if len(samples) != num_generations:
            raise RuntimeError(f"vLLM returned {len(samples)} completions for prompt {b}, expected {num_generations}")
        rows.extend(list(sample.token_ids) for sample in samples)
    width = max([len(row) for row in rows] + [1])
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens


def _is_lora_layer(module: nn.Module) -> bool:
    # Duck-typed (a PEFT LoraLayer): rollout/ does not import peft or rftlab.models.
    return hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under their HF names, any active LoRA adapter merged in (W + scale * B A).

    A generator: each merged layer exists only while vLLM copies it, so a sync needs about one
    layer of extra memory. The training model is not modified (no ``merge_adapter``/``unmerge``,
    which would round the base weights in low precision every step).

    Args:
        model: a HF causal LM, PEFT-wrapped or not.
    """
    base = hf_model(model)
    lora_layers = {name: module for name, module in base.named_modules() if _is_lora_layer(module)}
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue  # the adapter's factors: merged into their base weight below
        name = name.replace(".base_layer.", ".")  # PEFT's wrapper -> the HF (and vLLM) name
        weight = param.detach()
        if not weight.is_floating_point():
            raise ValueError(f"sampler_backend='vllm' cannot push the quantized weight {name!r} ({weight.dtype}): "
                             "use it with an unquantized policy")
        layer = lora_layers.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if layer is not None and not layer.merged and not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield name, weight


# ---- the engine (needs vllm and a GPU) -------------------------------------------------------
class VLLMEngine:
    """A ``vllm.LLM`` holding a copy of one policy's weights, refreshed before each sampling call.

    Args:
        model: the policy (HF causal LM, PEFT-wrapped or not); its config and dtype shape the engine.
    """

    def __init__(self, model: nn.Module) -> None:
        import vllm

        # In-process engine: its model object is reachable for load_weights (TRL's colocate mode does the same).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        lm = hf_model(model)
        self._folder = tempfile.TemporaryDirectory(prefix="rftlab-vllm-")  # lives as long as the engine
        lm.config.save_pretrained(self._folder.name)  # config only: no generation_config, no weights
        dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
        self.llm = vllm.LLM(model=self._folder.name, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                            **ENGINE_KWARGS)

    def push_weights(self, model: nn.Module) -> None:
        """Copy the policy's current weights (LoRA merged) into the engine and drop stale cached prefixes."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            engine_model.load_weights(merged_weights(model))
        self.llm.reset_prefix_cache()

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int, params: SamplingParams,
               eos_token_ids: Sequence[int], pad_token_id: int) -> Tensor:
        """(B*G, T) completion tokens for (B, P) left-padded prompts; see ``sample_completions``.

        Args:
            prompt_ids: (B, P) left-padded prompt tokens.
            prompt_mask: (B, P) 1 on real prompt tokens.
            num_generations: completions per prompt (G).
            params: sampling parameters.
            eos_token_ids: ids that end a completion.
            pad_token_id: filler after a completion's end.
        """
        import vllm

        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from the generator the DataModule seeded
        request = vllm.SamplingParams(**sampling_kwargs(params, num_generations, eos_token_ids, seed))
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids, prompt_mask)]
        # Lightning's autocast (bf16-mixed) must not reach vLLM's kernels: they run in the engine's own dtype.
        with torch.autocast("cuda", enabled=False):
            outputs = self.llm.generate(prompts, request, use_tqdm=False)
        return completion_tensor(outputs, num_generations, pad_token_id).to(prompt_ids.device)


_ENGINES: "weakref.WeakKeyDictionary[nn.Module, VLLMEngine]" = weakref.WeakKeyDictionary()


def vllm_generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int,
                  params: SamplingParams, eos_token_ids: Sequence[int], pad_token_id: int) -> Tensor:
    """The vLLM branch of ``sample_completions``: (B*G, T) tokens sampled with the policy's current weights.

    Args:
        model: the policy; its engine is built on first use and kept while the policy lives.
        prompt_ids: (B, P) left-padded prompt tokens.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: completions per prompt (G).
        params: sampling parameters.
        eos_token_ids: ids that end a completion.
        pad_token_id: filler after a completion's end.
    """
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = VLLMEngine(model)
    engine.push_weights(model)
    return engine.sample(prompt_ids, prompt_mask, num_generations, params, eos_token_ids, pad_token_id)
