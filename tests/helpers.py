"""Shared test helpers: one quiet Trainer fit on the tiny model, and "did the weights move" checks.

Import as ``from helpers import fit_tiny, trainable_snapshot, ...`` (``tests/`` is on ``sys.path``
through ``tests/conftest.py``, like ``wandb_records`` and ``tiny_models``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch import Tensor


def fit_tiny(module: L.LightningModule, datamodule: L.LightningDataModule | None, max_steps: int,
             tmp_path: str | Path | None = None, *, logger: Any = False, callbacks: Sequence[L.Callback] = (),
             ckpt_path: str | Path | None = None, **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``module`` for ``max_steps`` with the quiet CPU Trainer the tests use; returns the Trainer.

    Defaults (each one a keyword in ``trainer_kwargs`` to override): ``accelerator="cpu"``, no progress
    bar, no model summary, checkpointing off (``enable_checkpointing=False``) unless a checkpoint callback
    is in ``callbacks`` or ``enable_checkpointing=True`` is passed, ``limit_val_batches=0`` (pass
    ``limit_val_batches=None`` for Lightning's default, every validation batch),
    ``num_sanity_val_steps=0`` and ``log_every_n_steps=1``.

    Args:
        module: the LightningModule to train (an algorithm on the tiny policy).
        datamodule: the DataModule passed to ``trainer.fit`` (``None`` when the module brings its data).
        max_steps: the number of optimizer steps (``Trainer(max_steps=...)``).
        tmp_path: the Trainer's ``default_root_dir`` (where Lightning writes logs and checkpoints); left
            to Lightning when ``None``.
        logger: the Trainer's logger: ``False`` (none), a logger, or a list of loggers.
        callbacks: callbacks added to the Trainer.
        ckpt_path: a checkpoint to resume from (``trainer.fit(..., ckpt_path=...)``).
        **trainer_kwargs: any other ``L.Trainer`` argument; overrides the defaults above.
    """
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    options: dict[str, Any] = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                                   enable_checkpointing=checkpointing, limit_val_batches=0, num_sanity_val_steps=0,
                                   log_every_n_steps=1)
    options.update(trainer_kwargs)
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    trainer = L.Trainer(max_steps=max_steps, logger=logger, callbacks=list(callbacks), **options)
    trainer.fit(module, datamodule=datamodule, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer


Params = torch.nn.Module | Mapping[str, Tensor]
Names = Iterable[str] | Callable[[str], bool] | None


def trainable_snapshot(module: torch.nn.Module, *, frozen: bool = False) -> dict[str, Tensor]:
    """Detached clones of ``module``'s trainable parameters, by name.

    Args:
        module: the module (a LightningModule, a policy, a value head) whose parameters are copied.
        frozen: copy the frozen parameters (``requires_grad=False``) instead of the trainable ones.
    """
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad != frozen}


def _compare(before: Mapping[str, Tensor], now: Params, names: Names) -> tuple[list[str], list[str]]:
    """The checked names that changed and those that did not."""
    current = dict(now.named_parameters()) if isinstance(now, torch.nn.Module) else dict(now)
    if names is None:
        checked = list(before)
    elif callable(names):
        checked = [n for n in before if names(n)]
    else:
        checked = list(names)
        missing = [n for n in checked if n not in before]
        assert not missing, f"not in the snapshot: {missing[:5]}"
    assert checked, "no parameter to compare (empty snapshot or no name selected)"
    absent = [n for n in checked if n not in current]
    assert not absent, f"no longer parameters of the module: {absent[:5]}"
    changed = [n for n in checked if not torch.equal(before[n], current[n].detach())]
    return changed, [n for n in checked if n not in changed]


def assert_params_changed(before: Mapping[str, Tensor], module: Params, *, names: Names = None,
                          require: Literal["all", "any"] = "all", message: str = "") -> None:
    """Assert the parameters in ``before`` (all, or ``names``) differ in ``module`` now.

    Args:
        before: a ``trainable_snapshot`` taken earlier.
        module: the module now, or a later snapshot (a name -> tensor mapping).
        names: which snapshot entries to check: a list of names, a predicate on the name, or ``None`` (all).
        require: ``"all"``: every checked parameter changed; ``"any"``: at least one did.
        message: prefixed to the failure message, which lists the unchanged parameters.
    """
    changed, unchanged = _compare(before, module, names)
    ok = not unchanged if require == "all" else bool(changed)
    prefix = f"{message}: " if message else ""
    assert ok, (f"{prefix}{len(unchanged)} of {len(changed) + len(unchanged)} parameters unchanged "
                f"(require={require!r}): {unchanged[:8]}")


def assert_params_unchanged(before: Mapping[str, Tensor], module: Params, names: Names = None, *,
                            message: str = "") -> None:
    """Assert every parameter in ``before`` (or in ``names``) is exactly equal in ``module`` now.

    Args:
        before: a snapshot taken earlier (``trainable_snapshot``, or with ``frozen=True``).
        module: the module now, or a later snapshot (a name -> tensor mapping).
        names: which snapshot entries to check: a list of names, a predicate on the name, or ``None`` (all).
        message: prefixed to the failure message, which lists the changed parameters.
    """
    changed, _ = _compare(before, module, names)
    prefix = f"{message}: " if message else ""
    assert not changed, f"{prefix}{len(changed)} parameters changed: {changed[:8]}"


def eos_likely(module: L.LightningModule, bias: float = 10.0) -> None:
    """Give the policy's LM head a bias towards its first stop token, so sampled turns end.

    The tiny random policy almost never samples EOS (1 in ~49k), so multi-turn episodes would
    never reach a second turn; with ``bias=10`` about a third of its tokens end the turn. The new
    head copies the old weights and is frozen; calling it twice does nothing more.
    """
    from rftlab.models.hf import stop_token_ids

    lm = module.policy.get_output_embeddings()
    if getattr(lm, "bias", None) is not None:
        return
    eos = stop_token_ids(module.policy, module.tokenizer)[0]
    head = torch.nn.Linear(lm.in_features, lm.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    head.requires_grad_(False)
    module.policy.set_output_embeddings(head)
