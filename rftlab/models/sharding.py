"""FSDP2 sharding of the policy and its companions (``torch.distributed.fsdp.fully_shard``).

Lightning's ``ModelParallelStrategy`` sets up a device mesh and calls the module's
``configure_model``; ``RFTModule`` then shards every model it holds with ``shard_model``: each
decoder layer is its own unit (its weights are gathered just before it runs and freed after), the
rest of the model (embeddings, final norm, head) the root unit. This is the layout of TorchTitan,
verl's FSDP2 workers and NeMo-RL's DTensor path, here on CPU processes with gloo as on GPUs with
NCCL.

Every process must then run each forward together: the decode loop runs in lockstep
(``decode(lockstep=True)``), and the number of forward passes per rollout is agreed across
processes (see ``rftlab.rollout.distributed``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


DtypeName = Literal["float32", "bfloat16", "float16"]


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (a PEFT wrapper's base model, or ``model``).

    The root unit must be the module whose ``forward`` runs at every step: ``generate`` of a PEFT
    model calls its base model directly, so sharding the wrapper would leave the root weights
    sharded when they are used.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM, by the classes it declares it must not
    split (``_no_split_modules``, e.g. ``LlamaDecoderLayer``).

    Raises a ``ValueError`` naming the model class and the classes looked for when none is found.

    Args:
        model: a causal LM (or a PEFT wrapper around one).
    """
    base = causal_lm(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot shard {type(base).__name__}: no decoder layer found (looked for the classes of its "
            f"_no_split_modules: {sorted(names) or 'none declared'}); FSDP2 sharding needs a transformers "
            "causal LM whose layer class is declared there"
        )
    return layers


def shard_model(
    model: nn.Module,
    mesh: Any,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard ``model`` in place over ``mesh``: each decoder layer a unit, the rest the root.

    Args:
        model: a causal LM (or a PEFT wrapper: its base model is sharded, adapters included).
        mesh: a 1-D device mesh (the data-parallel dimension of the strategy's mesh).
        param_dtype: dtype the gathered weights compute in (None: as stored).
        reduce_dtype: dtype gradients are reduced in (None: as computed).
        reshard_after_forward: free gathered weights after each unit's forward (less memory, one
            more gather in backward).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(causal_lm(model), mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def shard_module(module: nn.Module, mesh: Any) -> None:
    """Shard a small module (a value head) as one unit, so that its gradients are averaged too.

    Args:
        module: any module whose ``forward`` is called directly.
        mesh: the data-parallel device mesh.
    """
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh)


def root_is_sharded(model: nn.Module) -> bool:
    """Whether the causal LM inside ``model`` is an FSDP2 root unit (``shard_model`` was applied)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(causal_lm(model), FSDPModule)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with every process in the data-parallel dimension.

    ``ModelParallelStrategy(data_parallel_size="auto")`` puts the processes of a node in the
    tensor-parallel dimension, which rftlab does not use; this strategy shards over all of them
    (``data_parallel_size`` = nodes x processes per node, ``tensor_parallel_size`` = 1), so a config
    needs no sizes and follows ``--trainer.devices`` and ``--trainer.num_nodes``.

    Args:
        param_dtype: dtype the gathered weights compute in, "float32", "bfloat16" or "float16"
            (None: as stored; the Trainer's ``*-mixed`` precision still autocasts).
        reduce_dtype: dtype gradients are reduced in (None: as computed).
        reshard_after_forward: free each gathered layer after its forward (less memory; it is
            gathered again for backward).
        save_distributed_checkpoint: write checkpoints as folders of shards (True) or gather one
            full file on rank 0 (False).
        process_group_backend: "gloo" on CPUs, "nccl" on GPUs (default: chosen by the device).
        timeout: how long a collective may wait for the other processes.
    """

    def __init__(self, param_dtype: DtypeName | None = None, reduce_dtype: DtypeName | None = None,
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        from rftlab.models.precision import dtype_from_name

        #: What ``RFTModule.shard`` passes to ``shard_model`` (FSDP2's mixed precision policy).
        self.sharding = {
            "param_dtype": dtype_from_name(param_dtype, "FSDP2Strategy.param_dtype") if param_dtype else None,
            "reduce_dtype": dtype_from_name(reduce_dtype, "FSDP2Strategy.reduce_dtype") if reduce_dtype else None,
            "reshard_after_forward": bool(reshard_after_forward),
        }
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout or default_pg_timeout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
