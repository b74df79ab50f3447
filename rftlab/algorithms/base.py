"""RFTModule: the thin base LightningModule every rftlab algorithm (built-in or yours) extends.

It owns the policy (loading, LoRA, the reference policy), the two protocol methods the
RolloutDataModule calls (``generate`` and ``score_rollout``), optimisation, validation and logging.
A subclass implements ``compute_advantages`` and ``compute_loss``; see ``GRPO`` for the pattern.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from rftlab.algorithms.faults import CHECKPOINT_KEY, abort_nonfinite, grad_scaler_active, pending_rng, resume_state
from rftlab.core import entropy_from_logits, kl_penalty, masked_mean, selective_log_softmax
from rftlab.core.arguments import check_init_arguments
from rftlab.models.build import PolicySpec, build_policy, check_reference_placement, frozen_reference, module_device
from rftlab.models.cast_cache import FrozenCastCache
from rftlab.models.hf import hf_model
from rftlab.models.loading import load_tokenizer
from rftlab.models.onednn import OneDNNLinears
from rftlab.models.optim import build_optimizer, check_optimizer
from rftlab.models.packing import PACKING
from rftlab.models.policy import adapter_disabled, completion_logits, trainable_state_keys
from rftlab.models.sampling_copy import SAMPLING_DTYPES, SamplingCopy
from rftlab.rollout.distributed import any_rank, is_distributed, reduce_metrics
from rftlab.rollout.evaluation import EvalBatch
from rftlab.rollout.rollout import Rollout
from rftlab.rollout.resume import restore_rng_state
from rftlab.rollout.sampler import SamplingParams, sample_completions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RFTModule(L.LightningModule):
    """Policy, protocol and optimisation shared by all algorithms.

    Args:
        policy: "default" (bundled SmolLM2-135M-Instruct), "tiny" (random test model), a local
            model folder, or a hub id (downloaded only because you named it).
        lora: train a LoRA adapter instead of all weights; the reference policy is then the same
            model with the adapter disabled (no second copy).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (update scale alpha / r).
        lora_dropout: LoRA dropout.
        lora_target_modules: "all-linear" or module-name suffixes such as ["q_proj", "v_proj"].
        num_generations: completions sampled per prompt (the group size G).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps (then constant).
        max_grad_norm: gradient clipping norm (used unless the Trainer sets gradient_clip_val); 0 disables.
        beta: coefficient of the KL-to-reference term; 0 skips the reference forward entirely.
        dtype: parameter dtype: "float32", "bfloat16" or "float16" (use Trainer precision for autocast).
        gradient_checkpointing: recompute activations in backward (switched off while sampling).
        quantization: "none", "nf4"/"fp4" (4-bit base weights, QLoRA) or "int8" (8-bit loading);
            needs ``lora=True`` and bitsandbytes.
        compute_dtype: dtype 4-bit layers compute in ("float32", "bfloat16", "float16"); None: ``dtype``.
        optimizer: "adamw" (torch), "adamw8bit" (bitsandbytes 8-bit state, CPU or GPU), or the paged
            variants "paged_adamw", "paged_adamw8bit", "paged_adamw32bit" (CUDA only); see
            ``rftlab.models.optim.OPTIMIZERS``.
        reference_placement: where the frozen reference copy of a fully fine-tuned policy (beta > 0)
            lives: "device" (with the policy), "cpu" (CPU memory, its forward runs there) or
            "offload" (CPU memory, moved to the device for each forward). Adapter runs have no copy.
        init_checkpoint: a Lightning checkpoint of any rftlab algorithm (e.g. ``SFT``) whose policy,
            adapter merged, is the starting policy (and the reference); ``policy`` names its base model.
        logprob_batch_size: sequences per forward when scoring a rollout without grad (memory bound).
        log_kl_every: with beta 0 (no KL term, so no reference forward), still log ``kl``, the masked
            token mean of KL(policy || reference), every n steps: two extra no-grad forwards (the
            policy, the reference) on that step's rollout; None never. Needs a reference: LoRA (the
            adapter switched off) or beta > 0 (where ``kl`` is logged every step anyway).
        share_prompt: encode each prompt once per group in the training and scoring forwards (its
            key/value cache serves the G completions; same result, ~40% less work at 36-token prompts
            and 8 x 32-token completions); off only for a model whose cache cannot carry gradients.
        packing: with ``share_prompt``, lay out each group as one row of real tokens only (the
            prompt once, then its completions back to back, a 4D attention mask keeping them
            apart): no padding, and prompt sharing also under gradient checkpointing. "auto" packs
            when it is estimated cheaper (attention over a packed row grows with the square of its
            length, so long rows with little padding stay padded), "always" whenever the model's
            attention takes the mask (SDPA or eager), "never" keeps the padded layout.
        sampling_dtype: None samples with the policy itself; "bfloat16" (or "float16") samples from
            a copy of its weights in that dtype, adapter merged, refreshed after every update: half
            the memory traffic per generated token (~+270 MB for the 135M model). Held-out
            evaluation decodes with it too; training and the log-probs stay in the policy's
            precision. Not with ``quantization``.
        cache_weight_casts: under bf16/fp16 autocast (Trainer ``precision="bf16-mixed"``), cast
            the frozen float32 linear weights (a LoRA run's base model) once and keep the copies,
            instead of autocast casting them again at every call and every decoded token. Same
            numbers (bit-identical logits and gradients); costs 2 bytes per frozen weight (~270 MB
            for the 135M model under LoRA). No effect in float32.
        onednn_kernels: on a CPU in float32, run the linear layers (sampling, scoring and the
            training forward and backward) with oneDNN instead of torch's default BLAS; frozen
            weights are prepacked once (+4 bytes per frozen weight, ~540 MB for the 135M model
            under LoRA). Here: 66 -> 34 ms per decoded token, forward+backward 1.5-2x faster.
            float32 math in another summation order (within ~1e-5 relative). No effect under
            autocast or on a GPU; only sampling uses it under gradient checkpointing.
        validate_at_start: evaluate the held-out split before the first step (logged at step 0).
        log_every_n_steps: overrides the Trainer's (its default 50 suits supervised training, not
            RL steps that take seconds).
        seed: seeds the random initialisation of the "tiny" policy.
        max_nonfinite_steps: stop with ``NonFiniteTrainingError`` (after saving a checkpoint) when
            this many optimizer steps in a row had a non-finite loss or gradient; each such step
            is skipped and counted in ``faults/nonfinite_steps``. None never stops.
    """

    # The DataModule drops zero-variance groups when its own dynamic_sampling is None and this is True.
    prefers_dynamic_sampling: bool = False

    def __init__(
        self,
        policy: str = "default",
        lora: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        num_generations: int = 8,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        beta: float = 0.0,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        quantization: str = "none",
        compute_dtype: str | None = None,
        optimizer: str = "adamw",
        reference_placement: str = "device",
        init_checkpoint: str | None = None,
        logprob_batch_size: int = 64,
        log_kl_every: int | None = None,
        share_prompt: bool = True,
        packing: str = "auto",
        sampling_dtype: str | None = None,
        cache_weight_casts: bool = True,
        onednn_kernels: bool = True,
        validate_at_start: bool = True,
        log_every_n_steps: int | None = 1,
        seed: int = 0,
        max_nonfinite_steps: int | None = 5,
    ) -> None:
        # Types first (of every subclass's arguments too): a string where a number belongs must
        # fail here, naming the parameter, not in a comparison below or deep inside torch.
        check_init_arguments(self, inspect.currentframe())
        super().__init__()
        _require(isinstance(policy, str) and policy != "", "policy", policy, "a non-empty model name or path")
        _require(lora_r >= 1, "lora_r", lora_r, ">= 1")
        _require(lora_alpha > 0, "lora_alpha", lora_alpha, "> 0")
        _require(0.0 <= lora_dropout < 1.0, "lora_dropout", lora_dropout, "in [0, 1)")
        _require(isinstance(num_generations, int) and num_generations >= 1, "num_generations", num_generations, ">= 1")
        _require(lr > 0 and math.isfinite(lr), "lr", lr, "a finite number > 0")
        _require(weight_decay >= 0, "weight_decay", weight_decay, ">= 0")
        _require(warmup_steps >= 0, "warmup_steps", warmup_steps, ">= 0")
        _require(max_grad_norm >= 0, "max_grad_norm", max_grad_norm, ">= 0 (0 disables clipping)")
        _require(beta >= 0 and math.isfinite(beta), "beta", beta, ">= 0")
        _require(dtype in DTYPES, "dtype", dtype, f"one of {', '.join(DTYPES)}")
        PolicySpec(policy, dtype, quantization, compute_dtype, lora, lora_r, lora_alpha, lora_dropout,
                   lora_target_modules, gradient_checkpointing, seed, init_checkpoint).check()
        check_optimizer(optimizer)
        check_reference_placement(reference_placement)
        _require(logprob_batch_size >= 1, "logprob_batch_size", logprob_batch_size, ">= 1")
        _require(packing in PACKING, "packing", packing, f"one of {', '.join(PACKING)}")
        _require(log_kl_every is None or log_kl_every >= 1, "log_kl_every", log_kl_every, ">= 1 or None")
        _require(log_kl_every is None or lora or beta > 0, "log_kl_every", log_kl_every,
                 "None for full fine-tuning with beta=0 (no reference model is kept: use lora=True or beta > 0)")
        _require(sampling_dtype is None or sampling_dtype in SAMPLING_DTYPES, "sampling_dtype", sampling_dtype,
                 f"None or one of {', '.join(SAMPLING_DTYPES)}")
        _require(sampling_dtype is None or quantization == "none", "sampling_dtype", sampling_dtype,
                 f"None with quantization={quantization!r} (a quantized base has no weights to copy)")
        _require(log_every_n_steps is None or log_every_n_steps >= 1, "log_every_n_steps", log_every_n_steps, ">= 1 or None")
        self.save_hyperparameters()
        self.num_generations = num_generations
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        # Lightning's load_from_checkpoint decides strictness before calling configure_model, and
        # adapter (or reference-copy) checkpoints hold only trainable weights; refined in configure_model.
        self.strict_loading = not (lora or beta > 0)
        self._tokenizer = None
        self.val_accuracy = MeanMetric()
        self.val_reward = MeanMetric()
        self.initial_val_accuracy: float | None = None
        _require(max_nonfinite_steps is None or max_nonfinite_steps >= 1, "max_nonfinite_steps", max_nonfinite_steps, ">= 1 or None")
        _require(0 <= seed <= 2**32 - 1, "seed", seed, "in [0, 2**32 - 1] (as Lightning's seed_everything)")
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self._pending_rng: dict[str, Any] | None = None  # restored when training starts
        self._drop_update = False  # a skipped non-finite loss under DDP (see training_step)
        self._batch_start = 0.0
        # The low-precision sampling copy (sampling_dtype), built at the first rollout; a plain
        # attribute, so it is neither saved in checkpoints nor counted as a submodule.
        self._sampling_copy: SamplingCopy | None = None
        self._sampling_copy_step = -1
        # Frozen linear weights already cast to the autocast dtype (cache_weight_casts); a plain
        # attribute for the same reason.
        self._cast_cache = FrozenCastCache()
        self._onednn = OneDNNLinears()  # onednn_kernels: prepacked frozen weights

    # ---- the policy ------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The policy's tokenizer (loaded on first use; always has a pad token)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.policy)
        return self._tokenizer

    @property
    def uses_adapter(self) -> bool:
        return bool(self.hparams.lora)

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs are computed (subclasses with other KL terms override)."""
        return self.hparams.beta > 0

    def configure_model(self) -> None:
        """Load the policy (and a frozen reference copy only for full fine-tuning with a KL term)."""
        if self.policy is not None:
            return
        hp = self.hparams
        model = build_policy(PolicySpec.from_hparams(hp), vocab_size=len(self.tokenizer), device=self._policy_device())
        if not hp.lora and self.needs_reference:
            # Full fine-tuning has no adapter to switch off: keep a frozen copy of the start policy.
            self.set_reference_policy(frozen_reference(model, hp.reference_placement))
        self.policy = model
        self.configure_extra_modules()
        # Checkpoints keep only what trains (adapter, heads): frozen base weights come from `policy`.
        self.strict_loading = not hp.lora and self.ref_policy is None

    def _policy_device(self) -> torch.device:
        # The device training runs on: the strategy's when attached to a Trainer (the module may
        # still be on CPU when configure_model runs), else the module's own.
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def set_reference_policy(self, reference: torch.nn.Module) -> None:
        """Install a frozen reference copy; one kept in CPU memory is hidden from Lightning.

        Lightning moves every registered submodule to the training device and saves it in
        checkpoints; a reference placed with ``reference_placement="cpu"``/``"offload"`` is
        therefore stored as a plain attribute, outside ``state_dict`` and ``.to()``.
        """
        if self.hparams.get("reference_placement", "device") == "device":
            self.ref_policy = reference
            return
        if "ref_policy" in self._modules:
            del self._modules["ref_policy"]
        object.__setattr__(self, "ref_policy", reference)

    def reference_logits(self, batch: Rollout) -> Tensor:
        """(N, T, V) temperature-scaled logits of the frozen reference copy, on the policy's device."""
        placement = self.hparams.get("reference_placement", "device")
        reference, device = self.ref_policy, self.device
        if placement == "offload":
            reference.to(device)
        where = module_device(reference)
        try:
            # oneDNN on the copy's own weights: prepacking would keep a second copy of the model.
            with self._linear_kernels(reference, prepack=False):
                logits = completion_logits(
                    reference, batch.prompt_ids.to(where), batch.prompt_mask.to(where), batch.completion_ids.to(where),
                    batch.completion_mask.to(where), batch.temperature, **self.forward_options,
                )
        finally:
            if placement == "offload":
                reference.to("cpu")
        return logits.to(device)

    @property
    def forward_options(self) -> dict[str, Any]:
        """How ``completion_forward`` lays out a batch (``share_prompt``, ``packing``).

        Checkpoints saved before an option existed get its default.
        """
        return {"share_prompt": bool(self.hparams.get("share_prompt", True)),
                "packing": self.hparams.get("packing", "auto")}

    def configure_extra_modules(self) -> None:
        """Hook for subclasses to add modules (value heads, critics) after the policy exists."""

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int, params: SamplingParams
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample completions with the current policy (protocol method used by the DataModule)."""
        self.configure_model()
        eos = [self.tokenizer.eos_token_id]
        gen_eos = getattr(getattr(self._hf_model(), "generation_config", None), "eos_token_id", None)
        for extra in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if extra is not None and extra not in eos:
                eos.append(extra)
        model = self.sampling_model()  # before the cast cache swaps weights: the copy merges float32 ones
        with self._precision_context(), self._linear_kernels(model, sampling=True):
            return sample_completions(
                model, prompt_ids.to(self.device), prompt_mask.to(self.device), num_generations,
                params, eos_token_ids=eos, pad_token_id=self.tokenizer.pad_token_id,
            )

    def sampling_model(self) -> torch.nn.Module:
        """The model that decodes: the policy, or its low-precision copy (``sampling_dtype``), up to date."""
        dtype = self.hparams.get("sampling_dtype")
        if dtype is None:
            return self.policy
        if self._sampling_copy is None:
            self._sampling_copy = SamplingCopy(self.policy, dtype)
        elif self._trainer is None or self._sampling_copy_step != self.global_step:
            # Under a Trainer weights change only at optimizer steps; outside one, always refresh.
            self._sampling_copy.refresh(self.policy)
        self._sampling_copy_step = self.global_step
        return self._sampling_copy.model

    def _hf_model(self) -> torch.nn.Module:
        return hf_model(self.policy)

    @contextmanager
    def _precision_context(self) -> Iterator[None]:
        """The Trainer's precision context (autocast under ``*-mixed``), cached weight casts, oneDNN linears."""
        trainer = self._trainer
        with (trainer.precision_plugin.forward_context() if trainer is not None else nullcontext(),
              self._weight_casts(), self._linear_kernels(self.policy)):
            yield

    def _linear_kernels(self, model: torch.nn.Module | None, sampling: bool = False, prepack: bool = True) -> Any:
        """Run ``model``'s float32 linears with oneDNN on a CPU (``onednn_kernels``; see ``rftlab.models.onednn``)."""
        if model is None or not self.hparams.get("onednn_kernels", True):
            return nullcontext()
        return self._onednn.active(model, sampling=sampling, prepack=prepack)

    def _weight_casts(self) -> Any:
        """Serve frozen linear weights from the cast cache while autocast is on (``cache_weight_casts``)."""
        if self.policy is None or not self.hparams.get("cache_weight_casts", True):
            return nullcontext()
        return self._cast_cache.active(self.policy)

    # ---- scoring a rollout -----------------------------------------------------------------
    def score_rollout(self, rollout: Rollout) -> Rollout:
        """Annotate a fresh rollout: old/ref log-probs where needed, then advantages (protocol method)."""
        rollout = rollout.to(self.device)
        timing = {}
        with torch.no_grad(), self._precision_context():
            start = time.perf_counter()
            rollout = self.record_sampling_state(rollout)
            timing["timing/logprobs"] = time.perf_counter() - start
            if self.needs_reference:
                start = time.perf_counter()
                rollout.ref_logp = self.batched_logprobs(rollout, reference=True)
                timing["timing/ref"] = time.perf_counter() - start
            elif self.monitors_kl():
                start = time.perf_counter()
                timing["kl"] = self.monitored_kl(rollout)
                timing["timing/kl_monitor"] = time.perf_counter() - start
            rollout = self.compute_advantages(rollout)
        # Per-phase costs (issue: where the time goes) and the KL monitor; the DataModule merges
        # them into the rollout's metrics, which training_step logs.
        rollout.extras["score_metrics"] = timing
        return rollout

    def monitors_kl(self) -> bool:
        """Whether this step's rollout gets the KL monitor (``log_kl_every``, beta 0 only)."""
        every = self.hparams.get("log_kl_every")
        return every is not None and self.hparams.beta == 0 and self.global_step % every == 0

    def monitored_kl(self, rollout: Rollout) -> float:
        """Masked token mean of KL(policy || reference) on a rollout, for logging only (no grad).

        The rollout's log-probs are left as they are: with beta 0 the loss has no KL term.
        """
        ref = self.batched_logprobs(rollout, reference=True)
        current = rollout.old_logp if rollout.old_logp is not None else self.batched_logprobs(rollout, reference=False)
        kl = kl_penalty(current, ref, kind=self.hparams.get("kl_estimator", "k3"))
        return float(masked_mean(kl, rollout.completion_mask))

    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """Hook (no grad): freeze what the sampling policy computes, once, at rollout time.

        The default records old log-probs when the rollout feeds several updates; with one update
        they equal the detached current ones (no forward). Algorithms with a critic also record
        the old values here, in the same forward where they can (see ``PPO``).
        """
        if rollout.num_updates > 1:
            rollout.old_logp = self.batched_logprobs(rollout, reference=False)
        return rollout

    def batched_logprobs(self, rollout: Rollout, reference: bool = False) -> Tensor:
        """Log-probs of the rollout's completions, in chunks of ``logprob_batch_size``, no grad."""
        out = []
        step = self.hparams.logprob_batch_size
        was_training = self.policy.training
        self.policy.eval()  # no dropout: the log-probs of the distribution that sampled
        try:
            for i in range(0, len(rollout), step):
                mb = rollout.select(torch.arange(i, min(i + step, len(rollout))), trim=False)
                logits = self.policy_logits(mb, reference=reference)
                out.append(selective_log_softmax(logits, mb.completion_ids).float())
        finally:
            self.policy.train(was_training)
        return torch.cat(out)

    def policy_logits(self, batch: Rollout, reference: bool = False) -> Tensor:
        """(N, T, V) temperature-scaled logits of the policy (or the reference) on the completions."""
        if reference and self.ref_policy is not None:
            return self.reference_logits(batch)
        model, ctx = self.policy, adapter_disabled(self.policy) if reference else nullcontext()
        with ctx:
            return completion_logits(
                model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                batch.temperature, **self.forward_options,
            )

    def check_datamodule(self, datamodule: Any) -> None:
        """Hook: raise on settings incompatible with the DataModule's (called before any sampling)."""

    def shape_rewards(self, rollout: Rollout) -> Tensor:
        """Hook: the (N,) rewards the algorithm trains on, from the verifier totals (protocol method).

        Called by the DataModule right after scoring, before dynamic sampling; the default keeps them.
        """
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
        with self._weight_casts(), self._linear_kernels(self.policy):
            loss, metrics = self.compute_loss(batch)
        n = len(batch)
        step = {name: float(value) for name, value in batch.extras.get("metrics", {}).items()}
        step["rollout/policy_lag"] = float(self.global_step - batch.policy_version)
        for name, value in metrics.items():
            step[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)
        step["lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        # Under DDP each process trains on its own groups: log the mean over processes (weighted by
        # sequences), reduced once here because processes may log different keys.
        for name, value in reduce_metrics(step, n).items():
            self.log(name, value, on_step=True, batch_size=n, prog_bar=name == "reward/mean")
        # Every process must skip together, or DDP's gradient all-reduce waits for the one that did not.
        if any_rank(not torch.isfinite(loss)):
            # Skip the update instead of writing NaN into the weights (returning None skips it).
            self.record_nonfinite_step("loss")
            if not is_distributed():
                return None
            # Lightning refuses None under DDP: a zero loss over every trainable weight keeps the
            # gradient all-reduce in step, and on_before_optimizer_step drops the update.
            self._drop_update = True
            return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)
        return loss

    def record_nonfinite_step(self, what: str) -> None:
        """Count and warn about a skipped non-finite step; stop after ``max_nonfinite_steps`` in a row.

        Args:
            what: "loss" or "gradient".
        """
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        self.log("faults/nonfinite_steps", float(self.nonfinite_steps), on_step=True, batch_size=1)
        warnings.warn(f"non-finite {what} at step {self.global_step}: update skipped "
                      f"({self.consecutive_nonfinite} in a row)", stacklevel=2)
        limit = self.hparams.get("max_nonfinite_steps")
        if limit is not None and self.consecutive_nonfinite >= limit:
            raise abort_nonfinite(self, what, self.consecutive_nonfinite)

    def token_entropy(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Masked mean entropy of the policy at the completion tokens (a monitoring metric)."""
        with torch.no_grad():
            return masked_mean(entropy_from_logits(logits.detach()), mask)

    def on_fit_start(self) -> None:
        if self.hparams.log_every_n_steps is not None:
            self.trainer.log_every_n_steps = self.hparams.log_every_n_steps
        # Evaluated here rather than in on_train_start so that training clocks (which start in
        # on_train_start) do not count it.
        self.validate_before_training()

    def on_train_start(self) -> None:
        # A resumed run restores the random generators here, after the sanity check and any
        # evaluation, right where the uninterrupted run was when the checkpoint was saved.
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("timing/train", time.perf_counter() - self._batch_start, on_step=True, batch_size=len(batch))

    def on_before_backward(self, loss: Tensor) -> None:
        self._backward_start = time.perf_counter()
        self.log("timing/forward", self._backward_start - self._batch_start, on_step=True, batch_size=1)

    def on_after_backward(self) -> None:
        self.log("timing/backward", time.perf_counter() - self._backward_start, on_step=True, batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_update:  # the zero loss of a skipped non-finite step under DDP: no update
            self._drop_update = False
            for p in self.parameters():
                p.grad = None
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])) if grads else torch.tensor(0.0)
        self.log("grad_norm", norm, on_step=True, batch_size=1)
        # Gradients are all-reduced before this hook, so every process reaches the same verdict.
        if not torch.isfinite(norm):
            for p in self.parameters():
                p.grad = None  # AdamW skips parameters without gradients: the step becomes a no-op
            if not grad_scaler_active(self._trainer):  # float16's GradScaler skips overflows by design
                self.record_nonfinite_step("gradient")
        elif grads:  # a real update (a skipped non-finite loss reaches this hook without gradients)
            self.consecutive_nonfinite = 0

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.max_grad_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Hook: AdamW parameter groups (e.g. a critic with its own lr); the first group's lr is logged."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.hparams.optimizer, self.optimizer_param_groups(), lr=self.hparams.lr,
                                    weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- validation ------------------------------------------------------------------------
    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self.val_accuracy.update(batch.correct)
        self.val_reward.update(batch.rewards)
        n = len(batch.correct)
        self.log("val/accuracy", self.val_accuracy, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("val/reward", self.val_reward, on_step=False, on_epoch=True, batch_size=n)
        self.log("val/mean_length", batch.lengths.mean(), on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def validate_before_training(self) -> None:
        """Held-out accuracy of the untrained policy, logged as ``val/accuracy`` at step 0."""
        if not self.hparams.validate_at_start or self.global_step > 0:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        stream = datamodule.val_dataloader() if datamodule is not None else []
        if not stream or self.trainer.limit_val_batches == 0:
            return
        metric = MeanMetric().to(self.device)
        with torch.inference_mode():
            for batch in stream:
                metric.update(batch.correct.to(self.device))
        self.initial_val_accuracy = float(metric.compute())
        for logger in self.loggers:
            logger.log_metrics({"val/accuracy": self.initial_val_accuracy}, step=self.global_step)

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = resume_state(self)  # random generators, fault counters
        if self.strict_loading:
            return
        keep = trainable_state_keys(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_resume_state(checkpoint.get(CHECKPOINT_KEY))
        if self.policy is None:
            return
        missing = sorted(k for k in self._trainable_param_names() if k not in checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks trainable weights {missing[:5]}{'...' if len(missing) > 5 else ''}")

    def load_resume_state(self, state: dict[str, Any] | None) -> None:
        """Restore the fault counters and stage this process's random generators for ``on_train_start``.

        Args:
            state: the checkpoint's ``"rftlab"`` entry (None for checkpoints saved before it existed).
        """
        if not state:
            return
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._pending_rng = pending_rng(state, rank, world)

    def _trainable_param_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming the parameter, its value and the allowed range."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")
