"""From a training checkpoint to a model ``transformers`` loads: ``rftlab export``.

    rftlab export --ckpt runs/demo/checkpoints/last.ckpt --out exported/          (merged HF folder)
    rftlab export --ckpt last.ckpt --out adapter/ --adapter_only                  (PEFT adapter folder)
    rftlab export --ckpt last.ckpt --out exported/ --base /new/path/to/base       (base model moved)

A checkpoint of an adapter run holds only the trainable weights (``RFTModule.on_save_checkpoint``);
its hyper-parameters name the base model and the LoRA/quantization options, so the policy is rebuilt
with ``build_policy`` exactly as in training, the weights loaded, and the adapter merged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from rftlab.models.build import PolicySpec, build_policy, load_base_model
from rftlab.models.loading import TINY_POLICY, ModelNotFoundError, load_tokenizer, resolve_model_path
from rftlab.models.migration import migrate_hparams
from rftlab.models.policy import apply_lora
from rftlab.models.precision import dtype_from_name
from rftlab.models.quantization import dequantized

POLICY_PREFIX = "policy."  # RFTModule keeps the network in ``self.policy``
EXPORT_INFO = "rftlab_export.json"


class CheckpointPolicy(NamedTuple):
    """A policy rebuilt from a checkpoint.

    Attributes:
        model: the HF model (PEFT-wrapped unless merged or fully fine-tuned), in eval mode.
        tokenizer: its tokenizer (with a pad token).
        spec: the options it was built with.
        checkpoint: the checkpoint's metadata (``epoch``, ``global_step``, ``hyper_parameters``).
    """

    model: nn.Module
    tokenizer: Any
    spec: PolicySpec
    checkpoint: dict[str, Any]


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (``ModelParallelStrategy``: one shard
    file per process, ``.metadata`` and Lightning's ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def load_lightning_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint as one dict: a ``.ckpt`` file, or a sharded checkpoint folder whose
    shards are gathered into whole tensors here, in one process and without a process group.

    Args:
        path: the ``.ckpt`` file or the distributed checkpoint folder.
        map_location: as ``torch.load``.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        data = torch.load(path / "meta.pt", map_location=map_location, weights_only=False)
        with tempfile.TemporaryDirectory() as tmp:
            whole = Path(tmp) / "whole.pt"
            dcp_to_torch_save(path, whole)
            data["state_dict"] = torch.load(whole, map_location=map_location, weights_only=False)["state_dict"]
        return data
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={str(path)!r} is neither a file nor a sharded checkpoint folder")
    # weights_only=False: Lightning checkpoints carry hyper-parameters (plain Python objects).
    return torch.load(path, map_location=map_location, weights_only=False)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint written by an rftlab algorithm (on CPU); clear errors otherwise.

    Args:
        path: the ``.ckpt`` file, or a sharded checkpoint folder (``ModelParallelStrategy``).
    """
    data = load_lightning_checkpoint(path)
    if not isinstance(data, dict) or "state_dict" not in data or "policy" not in data.get("hyper_parameters", {}):
        raise ValueError(f"checkpoint {str(path)!r} was not written by an rftlab algorithm "
                         "(no state_dict, or no 'policy' hyper-parameter)")
    data["hyper_parameters"] = migrate_hparams(data["hyper_parameters"])  # earlier option layouts too
    return data


def load_policy_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's ``policy.*`` weights into ``model``; every trainable weight must be there.

    Weights of other modules (critics, value heads, a second adapter) are ignored.

    Args:
        model: the rebuilt policy (PEFT-wrapped when the run trained an adapter).
        state_dict: the checkpoint's ``state_dict``.
        source: the checkpoint's path, for the error message.
    """
    own = model.state_dict()
    weights = {k[len(POLICY_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}
    weights = {k: v for k, v in weights.items() if k in own}
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in weights)
    if missing:
        raise KeyError(f"checkpoint {source!r} lacks trainable policy weights {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}: was it trained with other LoRA options?")
    model.load_state_dict(weights, strict=False)


def _base_not_found(source: str, spec: PolicySpec, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"checkpoint {source!r} was trained from policy.model={spec.model!r}, which cannot be found ({err}); "
        "pass the same base model as base=... (rftlab export/generate: --base PATH)"
    )


def load_checkpoint_policy(
    checkpoint: str | Path,
    base: str | None = None,
    merge: bool = False,
    dtype: str | None = None,
    device: torch.device | str | None = None,
) -> CheckpointPolicy:
    """Rebuild the policy of a checkpoint of any rftlab algorithm (SFT, GRPO, DAPO, PPO, ...).

    Args:
        checkpoint: the ``.ckpt`` file.
        base: the base model, when the one named in the checkpoint has moved (default: that one).
        merge: merge the LoRA adapter into the base weights (a plain HF model); a quantized base is
            dequantized first, so the merged weights are the ones the adapter was trained on.
        dtype: dtype name of the returned model (default: the training dtype).
        device: where quantized weights are placed (default CPU).
    """
    source = str(checkpoint)
    data = read_checkpoint(checkpoint)
    hparams = data["hyper_parameters"]
    spec = PolicySpec.from_hparams(hparams, gradient_checkpointing=False, **({"model": base} if base else {}))
    try:
        tokenizer = load_tokenizer(spec.model)
        vocab = len(tokenizer)
        if merge and spec.lora and spec.quantization != "none":
            model = dequantized(load_base_model(spec, vocab, device), dtype_from_name(spec.dtype))
            model = apply_lora(model, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.lora_target_modules)
        else:
            model = build_policy(spec, vocab, device)
    except ModelNotFoundError as err:
        raise _base_not_found(source, spec, err) from err
    load_policy_weights(model, data["state_dict"], source)
    if merge and spec.lora:
        model = model.merge_and_unload(adapter_names=["default"])
    if dtype is not None and not (spec.quantization != "none" and not merge):
        model = model.to(dtype_from_name(dtype))
    info = {k: v for k, v in data.items() if k in ("epoch", "global_step", "hyper_parameters")}
    return CheckpointPolicy(model.eval(), tokenizer, spec, info)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    adapter_only: bool = False,
    base: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a checkpoint's policy as a folder ``transformers`` (or ``peft``) loads.

    Merged (default): ``AutoModelForCausalLM.from_pretrained(out)`` gives the trained policy's
    logits. ``adapter_only``: a PEFT adapter folder (``PeftModel.from_pretrained(base, out)``)
    whose ``base_model_name_or_path`` is the base model's folder; for a run that started from an
    ``init_checkpoint``, that starting policy is exported into ``out/base`` and named instead.
    The tokenizer and an ``rftlab_export.json`` (source, step, policy options) are written too.

    Args:
        checkpoint: the ``.ckpt`` file of any rftlab algorithm.
        out: the output folder (created; existing files are overwritten).
        adapter_only: write only the LoRA adapter (the run must have trained one).
        base: the base model, when the one named in the checkpoint has moved.
        dtype: dtype name of the written weights (default: the training dtype).
    """
    out = Path(out)
    hparams = read_checkpoint(checkpoint)["hyper_parameters"]
    if adapter_only and not PolicySpec.from_hparams(hparams).lora:
        raise ValueError(f"adapter_only=True but checkpoint {str(checkpoint)!r} trained all weights (lora=False): "
                         "there is no adapter to export; export the merged model instead")
    loaded = load_checkpoint_policy(checkpoint, base=base, merge=not adapter_only, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    spec = loaded.spec
    if adapter_only:
        if spec.init_checkpoint is not None:
            base_path = str(export_checkpoint(spec.init_checkpoint, out / "base", base=spec.model, dtype=dtype).resolve())
        else:  # the random "tiny" policy has no folder: its name is kept
            base_path = spec.model if spec.model == TINY_POLICY else resolve_model_path(spec.model)
        loaded.model.peft_config["default"].base_model_name_or_path = base_path
    # save_embedding_layers=False: LoRA never trains the embeddings, and PEFT's "auto" check would
    # look the base model's config up on the hub (no network at run time; "tiny" is not there).
    loaded.model.save_pretrained(out, **({"save_embedding_layers": False} if adapter_only else {}))
    loaded.tokenizer.save_pretrained(out)
    info = {"source": str(Path(checkpoint).resolve()), "global_step": loaded.checkpoint.get("global_step"),
            "adapter_only": adapter_only, "policy": dataclasses.asdict(spec),
            "vocab_size": loaded.model.config.vocab_size}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
    return out


def export_parser() -> Any:
    """The parser of ``rftlab export``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="rftlab export", description="Write a checkpoint's policy as a Hugging Face "
                            "model folder (adapter merged) or as a PEFT adapter folder.", default_meta=False)
    parser.add_argument("--ckpt", type=str, required=True, help="a Lightning .ckpt of any rftlab algorithm")
    parser.add_argument("--out", type=str, required=True, help="output folder")
    parser.add_argument("--adapter_only", "--adapter-only", dest="adapter_only", action="store_true",
                        help="write only the LoRA adapter (PEFT format) instead of merged weights")
    parser.add_argument("--base", type=str | None, default=None,
                        help="the base model, if the one named in the checkpoint has moved")
    parser.add_argument("--dtype", type=str | None, default=None, help="float32, bfloat16 or float16 (default: as trained)")
    return parser


def export_main(argv: list[str] | None = None) -> Path:
    """Entry point of ``rftlab export``."""
    args = export_parser().parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out, adapter_only=args.adapter_only, base=args.base, dtype=args.dtype)
    kind = "adapter" if args.adapter_only else "merged model"
    print(f"exported {args.ckpt} -> {out} ({kind}); load it with {loading_hint(out, args.adapter_only)}")
    return out


def loading_hint(out: Path, adapter_only: bool) -> str:
    """The call that loads an exported folder.

    Args:
        out: the folder ``export_checkpoint`` wrote.
        adapter_only: whether it holds only the adapter.
    """
    if not adapter_only:
        return f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
    info = json.loads((out / EXPORT_INFO).read_text())
    policy = info["policy"]
    if policy["model"] == TINY_POLICY and policy.get("init_checkpoint") is None:
        # The random test model has no folder: the adapter's base_model_name_or_path cannot point
        # to one, and AutoPeftModel would look "tiny" up on the hub.
        return (f"peft.PeftModel.from_pretrained(rftlab.models.loading.tiny_llama({info['vocab_size']}, "
                f"seed={policy['seed']}), {str(out)!r})  (the base is rftlab's random 'tiny' model)")
    return f"peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r})"
