"""The DataModule <-> LightningModule protocol: everything a ``RolloutDataModule`` uses of an algorithm.

The DataModule never imports an algorithm; it talks to whatever LightningModule the Trainer holds
through these members. ``rftlab.RFTModule`` implements all of them (subclass it, or implement them
yourself). Per optimizer step, when the queue of minibatches is empty, the DataModule:

1. calls ``check_datamodule(self)`` (and checks its own ``num_generations`` against dynamic sampling);
2. encodes prompts with ``tokenizer`` and calls ``generate(prompt_ids, prompt_mask, G, params)``
   (with ``episodes=`` for multi-turn rollouts: the driver that runs each episode's environment);
3. decodes, scores with the reward functions, builds a ``Rollout`` (``policy_version=global_step``)
   and replaces its rewards with ``shape_rewards(rollout)``;
4. with dynamic sampling (its own setting, or ``prefers_dynamic_sampling`` when that is None) drops
   groups of equal rewards and samples more;
5. calls ``score_rollout(rollout)`` once, then serves ``num_iterations x num_minibatches`` minibatches.

Held-out validation calls ``generate`` with ``G = 1`` and greedy ``params``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from rftlab.rollout.rollout import Rollout
from rftlab.rollout.sampler import SamplingParams


@runtime_checkable
class RolloutModule(Protocol):
    """What the rollout DataModule calls on the training module (an ``RFTModule`` or your own)."""

    #: With the DataModule's ``dynamic_sampling=None``: drop zero-variance groups (DAPO) or not.
    prefers_dynamic_sampling: bool
    #: Whether the module trains on reference completions; ``SFTDataModule`` accepts only such modules.
    trains_on_references: bool

    @property
    def tokenizer(self) -> Any:
        """The policy's tokenizer (has a pad token; EOS ends a completion)."""

    @property
    def global_step(self) -> int:
        """Optimizer steps taken: the policy version that samples the next rollout."""

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int,
                 params: SamplingParams, episodes: Any = None) -> Any:
        """Sample ``num_generations`` completions (or multi-turn episodes) per prompt with the current policy.

        Args:
            prompt_ids: (B, P) left-padded prompt tokens.
            prompt_mask: (B, P) 1 on real prompt tokens.
            num_generations: G; output rows are grouped by prompt (B * G rows).
            params: temperature, top-p/top-k, budget, greedy, backend.
            episodes: for multi-turn rollouts (the DataModule's ``tools`` / ``environment``), the
                ``rftlab.rollout.episodes.EpisodeDriver`` that answers each turn; None otherwise.
                A module whose ``generate`` has no such parameter is refused for multi-turn data.

        Returns:
            Single-turn: ``(completion_ids, completion_mask, truncated)``: (B*G, T) right-padded
            tokens, (B*G, T) mask up to and including the first EOS, (B*G,) bool no EOS within the
            budget; optionally a fourth item, the sampler's (B*G, T) log-probs of the sampled
            tokens or None (``Rollout.sampler_logp``, used by rollout correction). Multi-turn: the
            ``EpisodeTokens`` of ``rftlab.rollout.episodes.decode_episodes``.
        """

    def shape_rewards(self, rollout: Rollout) -> Tensor:
        """The (N,) rewards the algorithm trains on, from the verifier totals in ``rollout.rewards``."""

    def score_rollout(self, rollout: Rollout) -> Rollout:
        """Annotate a fresh rollout (old/ref log-probs, values, advantages; metrics into ``rollout.metrics``)."""

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise on settings of ``datamodule`` the algorithm cannot train with, before any sampling."""
