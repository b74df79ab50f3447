"""RFTModule: the thin base LightningModule every rftlab algorithm (built-in or yours) extends.

It wires the policy (built from the ``policy`` group, run by ``rftlab.models.PolicyRuntime``) to the
two protocol methods the RolloutDataModule calls (``generate`` and ``score_rollout``, see
``rftlab.rollout.protocol``), to optimisation and to held-out validation. A subclass implements
``compute_advantages`` and ``compute_loss``; ``GRPO`` shows the pattern (the docs guide "Plug-in variants"
lists the hooks a subclass may override).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor

from rftlab.algorithms.faults import NonFiniteGuard
from rftlab.algorithms.monitoring import Monitoring
from rftlab.algorithms.options import ClipOptions, KLOptions, LogOptions, OptimOptions
from rftlab.algorithms.state import ModuleState
from rftlab.algorithms.timing import StepTimer
from rftlab.core import KL_ESTIMATORS, selective_log_softmax
from rftlab.core.arguments import check_init_arguments
from rftlab.core.plugins import DEFAULT_CALLBACKS
from rftlab.models.build import PolicySpec, build_policy, frozen_reference
from rftlab.models.hf import evaluation_mode, stop_token_ids
from rftlab.models.loading import load_tokenizer
from rftlab.models.optim import check_optimizer, optimizer_with_warmup
from rftlab.models.runtime import ForwardOptions, PolicyRuntime
from rftlab.models.sharding import shard_model
from rftlab.rollout.distributed import max_over_ranks, reduce_metrics
from rftlab.rollout.rollout import Rollout
from rftlab.rollout.episodes import EpisodeDriver
from rftlab.rollout.sampler import SamplingParams, sample_completions, sample_episodes


class RFTModule(Monitoring, ModuleState, L.LightningModule):
    """Policy, protocol and optimisation shared by all algorithms.

    Args:
        policy: a model name ("default": the bundled SmolLM2-135M-Instruct; "tiny": a random test
            model; a local folder; a hub id, downloaded only because you named it), or the whole
            policy group (``rftlab.models.PolicySpec``: dtype, quantization, LoRA rank, ...).
        lora: train a LoRA adapter instead of all weights (overrides ``policy.lora`` when given).
        lr: learning rate.
        beta: coefficient of the KL to the reference policy; 0 skips the reference forward.
        forward: how forwards are laid out and run (``rftlab.models.ForwardOptions``).
        optim: optimizer, weight decay, warm-up, gradient clipping, non-finite steps (``OptimOptions``).
        kl: KL estimator and monitoring (``KLOptions``).
        clip: clip ranges of the policy ratio (``ClipOptions``).
        log: logging cadence and validation before training (``LogOptions``).
    """

    #: The DataModule drops zero-variance groups when its own ``dynamic_sampling`` is None and this is True.
    prefers_dynamic_sampling: bool = False
    #: Whether the module trains on reference completions (``SFTDataModule``) rather than its own samples.
    trains_on_references: bool = False
    #: Whether ``kl.in_reward`` means something to this algorithm (GRPO's family, PPO).
    kl_in_reward_supported: bool = False
    #: Whether ``kl.target`` (an adaptive KL coefficient) means something to this algorithm (PPO).
    kl_target_supported: bool = False

    def __init__(
        self,
        policy: str | PolicySpec = "default",
        lora: bool | None = None,
        lr: float = 1e-5,
        beta: float = 0.0,
        forward: ForwardOptions = ForwardOptions(),
        optim: OptimOptions = OptimOptions(),
        kl: KLOptions = KLOptions(),
        clip: ClipOptions = ClipOptions(),
        log: LogOptions = LogOptions(),
    ) -> None:
        # Types first (of every subclass's arguments too): a string where a number belongs must fail
        # here, naming the parameter, not in a comparison below or deep inside torch.
        check_init_arguments(self, inspect.currentframe())
        super().__init__()
        self._groups: dict[str, Any] = {}  # resolved option groups, what hparams and checkpoints hold
        self.policy_spec = self._groups["policy"] = PolicySpec.resolve(policy, lora)
        self.policy_spec.check()
        self.forward_options = self.option_group("forward", forward, ForwardOptions)
        self.optim_options = self.option_group("optim", optim, OptimOptions)
        self.kl_options = self.option_group("kl", kl, KLOptions)
        self.clip_options = self.option_group("clip", clip, ClipOptions)
        self.log_options = self.option_group("log", log, LogOptions)
        _require(lr > 0, "lr", lr, "a finite number > 0")
        _require(beta >= 0, "beta", beta, ">= 0")
        check_optimizer(self.optim_options.optimizer, "optim.optimizer")
        self.kl_options.check_for(type(self).__name__, self.kl_estimators(), self.kl_in_reward_supported,
                                  has_reference=self.policy_spec.lora or beta > 0,
                                  target_supported=self.kl_target_supported)
        _require(self.forward_options.sampling_dtype in (None, "auto") or self.policy_spec.quantization == "none",
                 "forward.sampling_dtype", self.forward_options.sampling_dtype,
                 f"None with policy.quantization={self.policy_spec.quantization!r} (a quantized base has no weights to copy)")
        self.save_hyperparameters()
        self.policy: torch.nn.Module | None = None
        self.sharded = False  # set by shard() under ModelParallelStrategy (FSDP2)
        self.ref_policy: torch.nn.Module | None = None
        self.runtime = PolicyRuntime(self.forward_options, self.policy_spec.reference_placement)
        self.faults = NonFiniteGuard(self.optim_options.max_nonfinite_steps)
        # Lightning's load_from_checkpoint decides strictness before configure_model, and adapter
        # (or reference-copy) checkpoints hold only trainable weights; refined in configure_model.
        self.strict_loading = not (self.policy_spec.lora or beta > 0)
        self._tokenizer = None
        self.init_validation_metrics()
        self._pending_rng: dict[str, Any] | None = None  # restored when training starts

    def kl_estimators(self) -> list[str]:
        """The names ``kl.estimator`` may take (the registered KL estimators)."""
        return KL_ESTIMATORS.names()

    # ---- the policy ------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The policy's tokenizer (loaded on first use; always has a pad token)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy_spec.model)
        return self._tokenizer

    @property
    def beta(self) -> float:
        return float(self.hparams.beta)

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs are computed (subclasses with other KL terms override)."""
        return self.beta > 0

    @property
    def needs_reference_model(self) -> bool:
        """Whether a reference model is kept (a frozen copy, or the adapter switched off)."""
        return self.needs_reference

    def configure_model(self) -> None:
        """Load the policy (and a frozen reference copy only for full fine-tuning with a KL term)."""
        if self.policy is not None:
            return
        model = build_policy(self.policy_spec, vocab_size=len(self.tokenizer), device=self._policy_device())
        if not self.policy_spec.lora and self.needs_reference_model:
            # Full fine-tuning has no adapter to switch off: keep a frozen copy of the start policy.
            self.set_reference_policy(frozen_reference(model, self.policy_spec.reference_placement))
        self.policy = model
        self.configure_extra_modules()
        # Checkpoints keep only what trains (adapter, heads): frozen base weights come from `policy`.
        self.strict_loading = not self.policy_spec.lora and self.ref_policy is None
        mesh = self._data_parallel_mesh()
        if mesh is not None:
            self.shard(mesh)

    def _data_parallel_mesh(self) -> Any:
        """The strategy's data-parallel device mesh under ``ModelParallelStrategy`` (FSDP2), else None."""
        trainer = self._trainer
        mesh = getattr(trainer.strategy, "_device_mesh", None) if trainer is not None else None
        if mesh is None:
            return None
        if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"ModelParallelStrategy: tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported; rftlab "
                "shards with FSDP2 over data_parallel_size only (tensor_parallel_size=1)"
            )
        return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh

    def shard(self, mesh: Any) -> None:
        """Shard every model this module holds with FSDP2 (``rftlab.models.sharding``).

        The policy and a full reference copy layer by layer; subclasses shard their own modules
        (``shard_extra_modules``). Every trainable weight must be in a unit: FSDP2 averages only the
        gradients of sharded weights.

        Args:
            mesh: the 1-D data-parallel device mesh.
        """
        options = self.sharding_options()
        shard_model(self.policy, mesh, **options)
        if self.ref_policy is not None and self.ref_policy is not self.policy:
            shard_model(self.ref_policy, mesh, **options)
        self.shard_extra_modules(mesh)
        #: Sharded weights: every forward is a collective, so processes sample and score in lockstep.
        self.sharded = True

    def sharding_options(self) -> dict[str, Any]:
        """``shard_model``'s options from the strategy (``FSDP2Strategy``'s mixed precision), or none."""
        trainer = self._trainer
        return dict(getattr(trainer.strategy, "sharding", None) or {}) if trainer is not None else {}

    def shard_extra_modules(self, mesh: Any) -> None:
        """Hook: shard the modules ``configure_extra_modules`` added (critics, value heads)."""

    def _policy_device(self) -> torch.device:
        # The strategy's device when attached to a Trainer (the module may still be on the CPU).
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def set_reference_policy(self, reference: torch.nn.Module) -> None:
        """Install a frozen reference copy; one kept in CPU memory is hidden from Lightning (no ``.to()``, not saved)."""
        if self.policy_spec.reference_placement == "device":
            self.ref_policy = reference
            return
        self._modules.pop("ref_policy", None)
        object.__setattr__(self, "ref_policy", reference)

    def configure_extra_modules(self) -> None:
        """Hook for subclasses to add modules (value heads, critics) after the policy exists."""

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int,
                 params: SamplingParams, episodes: EpisodeDriver | None = None) -> Any:
        """Sample completions with the current policy (protocol method used by the DataModule).

        Returns the protocol's three tensors and the sampler's log-probs of the sampled tokens
        (``Rollout.sampler_logp``; None when greedy or when the backend does not report them);
        with ``episodes`` (multi-turn), the ``EpisodeTokens`` of ``decode_episodes``.
        """
        self.configure_model()
        eos = stop_token_ids(self.policy, self.tokenizer)
        # The sampling copy is taken before the cast cache swaps weights: it merges float32 ones.
        model = self.runtime.sampling_model(self.policy, self.global_step if self._trainer is not None else None,
                                            self.sampling_dtype())
        with self.precision_context(), self.runtime.kernels(model, sampling=True):
            if episodes is not None:
                return sample_episodes(model, prompt_ids.to(self.device), prompt_mask.to(self.device), num_generations,
                                       params, eos, self.tokenizer.pad_token_id, episodes)
            return sample_completions(model, prompt_ids.to(self.device), prompt_mask.to(self.device), num_generations,
                                      params, eos_token_ids=eos, pad_token_id=self.tokenizer.pad_token_id, logprobs=True,
                                      lockstep=self.sharded)

    def sampling_dtype(self) -> str | None:
        """``forward.sampling_dtype`` with "auto" resolved: "bfloat16" when this run computes in bf16.

        A run in bf16 already rounds its forward to bf16, so a bf16 copy changes the sampled
        distribution by little, and decodes several times faster than the policy under autocast; a
        float32 run samples with the policy itself. A quantized base has no weights to copy, and a
        sharded policy has no whole weights in one process.
        """
        dtype = self.forward_options.sampling_dtype
        if dtype != "auto":
            return dtype
        if self.policy_spec.quantization != "none" or self.sharded:
            return None
        if self._trainer is not None:
            in_bf16 = str(self._trainer.precision).startswith("bf16")
        else:  # outside fit: bf16 autocast around the call (``evaluate(precision="bf16-mixed")``)
            device = self.device.type
            in_bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        in_bf16 = in_bf16 or next(self.policy.parameters()).dtype == torch.bfloat16
        return "bfloat16" if in_bf16 else None

    def precision_context(self) -> Any:
        """The Trainer's precision context (autocast under ``*-mixed``), cached weight casts, oneDNN linears."""
        trainer = self._trainer
        return self.runtime.precision(self.policy, trainer.precision_plugin.forward_context() if trainer else None)

    def policy_logits(self, batch: Rollout, reference: bool = False) -> Tensor:
        """(N, T, V) temperature-scaled logits of the policy (or the reference) on the completions."""
        return self.runtime.logits(self.policy, self.ref_policy, reference, batch.prompt_ids, batch.prompt_mask,
                                   batch.completion_ids, batch.attention_mask, batch.temperature)

    def batched_logprobs(self, rollout: Rollout, reference: bool = False) -> Tensor:
        """Log-probs of the rollout's completions, in chunks of ``forward.logprob_batch_size``, no grad."""
        out = []
        with evaluation_mode(self.policy):  # no dropout: the log-probs of the distribution that sampled
            for mb, real in self.rollout_chunks(rollout):
                logits = self.policy_logits(mb, reference=reference)
                if real:
                    out.append(selective_log_softmax(logits, mb.completion_ids).float())
        return torch.cat(out)

    def rollout_chunks(self, rollout: Rollout) -> Iterator[tuple[Rollout, bool]]:
        """The rollout in consecutive chunks of ``forward.logprob_batch_size`` rows, each with True.

        Under sharded weights every forward is a collective, and a rollout's size can differ across
        processes (dynamic sampling), so placeholder chunks follow (the first chunk again, with
        False: run the forward, drop its output) until every process has run as many.
        """
        step = self.forward_options.logprob_batch_size
        starts = range(0, len(rollout), step)
        for i in starts:
            yield rollout.select(torch.arange(i, min(i + step, len(rollout))), trim=False), True
        if self.sharded:
            for _ in range(max_over_ranks(len(starts)) - len(starts)):
                yield rollout.select(torch.arange(min(step, len(rollout))), trim=False), False

    # ---- scoring a rollout (protocol) ------------------------------------------------------
    def score_rollout(self, rollout: Rollout) -> Rollout:
        """Annotate a fresh rollout: old/ref log-probs where needed, then advantages (protocol method)."""
        rollout = rollout.to(self.device)
        with torch.no_grad(), self.precision_context():
            start = time.perf_counter()
            rollout = self.record_sampling_state(rollout)
            rollout.metrics["timing/logprobs"] = time.perf_counter() - start
            if self.needs_reference:
                start = time.perf_counter()
                rollout.ref_logp = self.batched_logprobs(rollout, reference=True)
                rollout.metrics["timing/ref"] = time.perf_counter() - start
            elif self.monitors_kl():
                start = time.perf_counter()
                rollout.metrics["kl"] = self.monitored_kl(rollout)
                rollout.metrics["timing/kl_monitor"] = time.perf_counter() - start
            return self.compute_advantages(rollout)

    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """Hook (no grad): what the sampling policy computes, recorded once at rollout time.

        The default records old log-probs when the rollout feeds several updates; with one update
        they equal the detached current ones (no forward). Critics record old values here too.
        """
        if rollout.num_updates > 1:
            rollout.old_logp = self.batched_logprobs(rollout)
        return rollout

    def check_datamodule(self, datamodule: Any) -> None:
        """Hook: raise on settings incompatible with the DataModule's (called before any sampling).

        The base checks that prompt and completion budgets fit the policy's context; an override
        adds its own checks and calls this one.

        Args:
            datamodule: the DataModule about to feed this module (``RolloutDataModule`` or a subclass).
        """
        self._check_context_length(datamodule)

    def _check_context_length(self, datamodule: Any) -> None:
        """Raise if ``max_prompt_length`` + a completion budget exceeds the policy's context length.

        Past the context the positions run beyond what the model was built for: training goes on
        silently on garbage (or fails deep in a kernel), so it is refused before any sampling.

        Args:
            datamodule: has ``encoder.max_prompt_length``, ``sampling.max_new_tokens`` and
                ``val_sampling.max_new_tokens``.
        """
        limit = self._context_length()
        if limit is None:
            return
        prompt = getattr(getattr(datamodule, "encoder", None), "max_prompt_length", None)
        for name, budget in self._completion_budgets(datamodule):
            total = budget + (prompt or 0)
            if total <= limit:
                continue
            # Without prompt truncation (no max_prompt_length) the completion budget alone is known.
            used = f"max_prompt_length={prompt} + {name}={budget} = {total}" if prompt else f"{name}={budget}"
            raise ValueError(
                f"{used} tokens exceeds the context length of policy {self.policy_spec.model!r} "
                f"({limit} tokens, its config's max_position_embeddings): a prompt and its completion must fit "
                f"in the context together; lower max_prompt_length or {name}"
            )

    def _context_length(self) -> int | None:
        """The policy's context length: from the built policy, else from its config (no weights loaded)."""
        from rftlab.models.loading import config_context_length, model_context_length

        if self.policy is not None and getattr(self.policy, "config", None) is not None:
            return config_context_length(self.policy.config)
        # The DataModule checks before configure_model builds the policy: read the config, once.
        cached = getattr(self, "_context_length_cache", None)
        if cached is None or cached[0] != self.policy_spec.model:
            cached = self._context_length_cache = (self.policy_spec.model, model_context_length(self.policy_spec.model))
        return cached[1]

    @staticmethod
    def _completion_budgets(datamodule: Any) -> list[tuple[str, int]]:
        """(parameter name, tokens) of the DataModule's training and validation completion budgets.

        Args:
            datamodule: has ``sampling`` and ``val_sampling`` (``SamplingParams``); either may be absent.
        """
        budgets: list[tuple[str, int]] = []
        train = getattr(getattr(datamodule, "sampling", None), "max_new_tokens", None)
        if train is not None:
            budgets.append(("max_new_tokens", int(train)))
        val = getattr(getattr(datamodule, "val_sampling", None), "max_new_tokens", None)
        if val is not None and val != train:
            budgets.append(("val_max_new_tokens", int(val)))
        return budgets

    def shape_rewards(self, rollout: Rollout) -> Tensor:
        """Hook: the (N,) rewards the algorithm trains on, from the verifier totals (before dynamic sampling)."""
        return rollout.rewards

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """Fill ``rollout.advantages`` (and returns/values if the algorithm has a critic)."""
        raise NotImplementedError

    # ---- training --------------------------------------------------------------------------
    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one minibatch and the metrics to log (namespaced names)."""
        raise NotImplementedError

    def training_step(self, batch: Rollout, batch_idx: int) -> Tensor | None:
        # Lightning runs this under its autocast; the backward keeps the cached casts it saved.
        with self.runtime.weight_casts(self.policy), self.runtime.kernels(self.policy):
            loss, metrics = self.compute_loss(batch)
        step = {**batch.metrics, "rollout/policy_lag": self.global_step - batch.policy_version,
                **metrics, "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
        # Under DDP each process trains on its own groups: log the mean over processes (weighted by
        # sequences), reduced once here because processes may log different keys.
        step = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in step.items()}
        for name, value in reduce_metrics(step, len(batch)).items():
            self.log(name, value, on_step=True, batch_size=len(batch), prog_bar=name == "reward/mean")
        return self.faults.screen_loss(self, loss)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.faults.screen_gradients(self)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.optim_options.max_grad_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Hook: optimizer parameter groups (e.g. a critic with its own lr); the first group's lr is logged."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        opt = self.optim_options
        return optimizer_with_warmup(opt.optimizer, self.optimizer_param_groups(), self.hparams.lr, opt.weight_decay,
                                     opt.warmup_steps)

    def configure_callbacks(self) -> list[L.Callback]:
        """Lightning hook: the registered default callbacks (``DEFAULT_CALLBACKS``) whose type the
        Trainer does not have yet, so a run built in Python gets what ``rftlab fit`` gets; the
        user's own (a ``CompletionTable(every_n_steps=3)``) are kept. ``log.default_callbacks=False``
        leaves only the step timer (the ``timing/*`` metrics of the algorithm)."""
        # Each type once per Trainer (a validate() after fit() asks again).
        factories = [StepTimer, *(DEFAULT_CALLBACKS.values() if self.log_options.default_callbacks else [])]
        added: list[L.Callback] = []
        for factory in factories:
            callback = factory()
            if not any(isinstance(existing, type(callback)) for existing in [*self.trainer.callbacks, *added]):
                added.append(callback)
        return added

    def run_config(self) -> dict[str, Any]:
        """What tells this run from another beyond the hyperparameters Lightning logs itself: the
        algorithm's import path, and the DataModule's task and options (its ``run_config``)."""
        config: dict[str, Any] = {"algorithm": f"{type(self).__module__}.{type(self).__qualname__}"}
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "run_config"):
            config.update(datamodule.run_config())
        return config

    def on_fit_start(self) -> None:
        if self.log_options.every_n_steps is not None:
            self.trainer.log_every_n_steps = self.log_options.every_n_steps
        config = self.run_config()
        for logger in self.loggers:
            logger.log_hyperparams(config)
        self.warn_if_nothing_is_saved()
        self.say_why_kl_is_absent()
        # Evaluated here rather than in on_train_start so that training clocks do not count it.
        self.validate_before_training()



def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming the parameter, its value and the allowed range."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")
