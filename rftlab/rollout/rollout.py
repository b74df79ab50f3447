"""The Rollout: one batch of experience, the single contract between the DataModule and algorithms.

Shapes: N sequences (prompts x completions per prompt, grouped consecutively), P prompt positions
(left-padded), T completion positions (right-padded, EOS included), F reward functions, K segments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def _field(kind: str, fill: float | None = 0, **kwargs: Any) -> Any:
    """A Rollout field whose ``kind`` says how it is sliced, trimmed, joined and moved.

    Kinds: "prompt" (N, P) left-padded; "token" (N, T) right-padded, trimmed to the longest real
    completion; "seq" (N, ...) per sequence, never trimmed (2-D ones are right-padded with ``fill``
    when joined; ``fill=None`` pads with the joined completion width); "list" N Python values.
    """
    return field(metadata={"kind": kind, "fill": fill}, **kwargs)


@dataclass
class Rollout:
    """Tensors and texts of N sampled completions; algorithms fill the optional fields.

    Every field is typed, and sliced (``select``), trimmed, joined (``concat``) and moved (``to``)
    by its kind, so what an algorithm adds travels with the rows it belongs to.

    Attributes:
        prompt_ids: (N, P) long, left-padded prompt tokens (repeated for each completion of a prompt).
        prompt_mask: (N, P) long, 1 on real prompt tokens.
        completion_ids: (N, T) long, right-padded completion tokens; EOS included when sampled.
        completion_mask: (N, T) long, 1 on the model's completion tokens (up to and including the
            first EOS; in a multi-turn episode, every turn's tokens): every loss, KL, entropy and
            advantage uses it.
        env_mask: (N, T) long, 1 on the environment's tokens inside a multi-turn episode (tool
            results, feedback, the chat markup around them): the model attends to them but is never
            trained on them. None for single-turn rollouts (no such token).
        group: (N,) long, index of the prompt each completion answers; groups are consecutive blocks.
        rewards: (N,) float, weighted sum of the reward functions (None scores count as 0), after
            the algorithm's ``shape_rewards``.
        rewards_per_fn: (N, F) float, each function's score; NaN where the function returned None.
        truncated: (N,) bool, True when no EOS was sampled within max_new_tokens (multi-turn: the
            episode was cut by ``max_turns`` or the token budget before the environment ended it).
        reward_names: the F reward function names, in column order.
        prompts: N prompt texts (as rendered, chat template applied).
        completions: N completion texts (special tokens removed); a multi-turn episode's text holds
            every turn and every observation, in order.
        rows: N task rows (dicts: answer, tests, ...), the columns the rewards were given.
        temperature: the sampling temperature; log-probs must divide logits by it.
        group_size: G, completions per prompt (every group has G rows).
        max_new_tokens: the completion budget the rollout was sampled with (None: unknown).
        policy_version: the optimizer step count of the policy that sampled this rollout.
        num_updates: optimizer steps that will consume this rollout (num_iterations x minibatches);
            when 1, the sampling policy IS the trained one and old log-probs need no extra forward.
        old_logp: (N, T) float, log-probs of the sampling policy (filled by ``score_rollout``).
        sampler_logp: (N, T) float, log-probs of the sampled tokens as the sampler computed them
            (temperature-scaled, before top-p/top-k), 0 on padding; differs from the trainer's when
            the sampler runs another precision or engine (``forward.sampling_dtype``, vLLM). None
            when the sampler does not report them (greedy decoding, the "vllm" backend).
        baseline_rewards: (N,) float, the reward of the greedy completion of each row's prompt,
            drawn by the DataModule when the algorithm asks for it (ReMax's baseline).
        ref_logp: (N, T) float, log-probs of the reference policy (when a KL term is used).
        values: (N, T) float, critic values at rollout time (PPO-style algorithms).
        advantages: (N, T) float, per-token advantages.
        returns: (N, T) float, value targets.
        seq_advantages: (N,) float, per-sequence advantages before broadcasting (for logging).
        state_values: (N, T + 1) float, value-head outputs after the prompt and each completion
            token, at rollout time (SegmentRFT, while scoring).
        segment_starts: (N, K) long, first completion token of each segment (padding: >= T).
        segment_mask: (N, K) float, 1 on real segments.
        segment_rewards: (N, K) float, segment rewards.
        segment_targets: (N, K) float, the segments' value targets.
        segment_old_values: (N, K) float, V_rollout at each segment's start.
        metrics: per-rollout statistics (rewards, lengths, timing, the algorithm's own), logged
            on every optimizer step the rollout feeds; shared by its minibatches.
        first_of_rollout: whether this is the first minibatch served from its rollout.
    """

    prompt_ids: Tensor = _field("prompt")
    prompt_mask: Tensor = _field("prompt")
    completion_ids: Tensor = _field("token")
    completion_mask: Tensor = _field("token")
    group: Tensor = _field("seq")
    rewards: Tensor = _field("seq")
    rewards_per_fn: Tensor = _field("seq", fill=math.nan)
    truncated: Tensor = _field("seq")
    reward_names: list[str] = field(default_factory=list)
    prompts: list[str] = _field("list", default_factory=list)
    completions: list[str] = _field("list", default_factory=list)
    rows: list[dict[str, Any]] = _field("list", default_factory=list)
    temperature: float = 1.0
    group_size: int = 1
    max_new_tokens: int | None = None
    policy_version: int = 0
    num_updates: int = 1
    env_mask: Tensor | None = _field("token", default=None)
    old_logp: Tensor | None = _field("token", default=None)
    sampler_logp: Tensor | None = _field("token", default=None)
    baseline_rewards: Tensor | None = _field("seq", default=None)
    ref_logp: Tensor | None = _field("token", default=None)
    values: Tensor | None = _field("token", default=None)
    advantages: Tensor | None = _field("token", default=None)
    returns: Tensor | None = _field("token", default=None)
    seq_advantages: Tensor | None = _field("seq", default=None)
    state_values: Tensor | None = _field("seq", default=None)
    segment_starts: Tensor | None = _field("seq", fill=None, default=None)
    segment_mask: Tensor | None = _field("seq", default=None)
    segment_rewards: Tensor | None = _field("seq", default=None)
    segment_targets: Tensor | None = _field("seq", default=None)
    segment_old_values: Tensor | None = _field("seq", default=None)
    metrics: dict[str, float] = field(default_factory=dict)
    first_of_rollout: bool = True

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> Tensor:
        """(N,) number of the model's completion tokens (EOS included; every turn of an episode)."""
        return self.completion_mask.sum(-1)

    @property
    def attention_mask(self) -> Tensor:
        """(N, T) 1 on every real completion position: the model's tokens and the environment's.

        What a forward over prompt + completion attends to; the losses use ``completion_mask``.
        """
        if self.env_mask is None:
            return self.completion_mask
        return self.completion_mask + self.env_mask

    def select(self, index: Tensor | list[int], trim: bool = True) -> "Rollout":
        """The sub-rollout of sequences ``index`` (in that order); ``trim`` drops all-padding columns."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, Any] = {}
        for f in _fields_of("prompt", "token", "seq"):
            value = getattr(self, f)
            if value is not None:
                changes[f] = value[idx.to(value.device)]
        for f in _fields_of("list"):
            values = getattr(self, f)
            changes[f] = [values[i] for i in idx.tolist()] if values else []
        out = dataclasses.replace(self, **changes)
        return out.trimmed() if trim else out

    def trimmed(self) -> "Rollout":
        """Drop completion columns that are padding in every row, and prompt columns likewise."""
        changes: dict[str, Any] = {}
        real = self.attention_mask
        t_real = int(real.sum(0).nonzero().max().item()) + 1 if real.any() else 1
        if t_real < self.completion_ids.shape[1]:
            for f in _fields_of("token"):
                value = getattr(self, f)
                if value is not None:
                    changes[f] = value[:, :t_real]
        p_cols = self.prompt_mask.sum(0).nonzero()
        p_first = int(p_cols.min().item()) if len(p_cols) else 0
        if p_first > 0:  # prompts are left-padded: leading all-padding columns can go
            changes["prompt_ids"] = self.prompt_ids[:, p_first:]
            changes["prompt_mask"] = self.prompt_mask[:, p_first:]
        return dataclasses.replace(self, **changes) if changes else self

    def minibatches(self, num_minibatches: int, generator: torch.Generator | None = None) -> list["Rollout"]:
        """Split into ``num_minibatches`` sub-rollouts of whole groups, shuffled by ``generator``.

        Groups are never split, so group-level statistics stay computable inside a minibatch.
        """
        groups = torch.unique_consecutive(self.group)
        if num_minibatches < 1 or num_minibatches > len(groups):
            raise ValueError(f"num_minibatches must be in [1, {len(groups)}] (groups), got {num_minibatches}")
        order = groups[torch.randperm(len(groups), generator=generator)] if generator is not None else groups
        out = []
        for chunk in order.chunk(num_minibatches):
            keep = torch.isin(self.group.cpu(), chunk.cpu()).nonzero().squeeze(-1)
            out.append(self.select(keep))
        return out

    def to(self, device: torch.device | str) -> "Rollout":
        """A copy with every tensor on ``device`` (Lightning calls this to move batches)."""
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device)
        return dataclasses.replace(self, **changes)

    @staticmethod
    def concat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Join rollouts (e.g. generation rounds of dynamic sampling); re-pads to common widths.

        Scalars and ``metrics`` are the first part's; a tensor field set on only some parts is dropped.
        """
        if not parts:
            raise ValueError("Rollout.concat needs at least one rollout")
        if len(parts) == 1:
            return parts[0]
        t_max = max(p.completion_ids.shape[1] for p in parts)
        p_max = max(p.prompt_ids.shape[1] for p in parts)
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(Rollout):
            kind = f.metadata.get("kind")
            values = [getattr(p, f.name) for p in parts]
            if f.name == "env_mask" and any(v is not None for v in values):
                # Single-turn parts have no environment token: zeros, never a dropped mask.
                values = [torch.zeros_like(p.completion_mask) if v is None else v for p, v in zip(parts, values)]
            if kind == "list":
                changes[f.name] = [x for v in values for x in v]
            elif kind is None:
                continue
            elif any(v is None for v in values):
                changes[f.name] = None
            elif kind == "prompt":
                fill = pad_token_id if f.name == "prompt_ids" else 0
                changes[f.name] = torch.cat([_pad_left(v, p_max, fill) for v in values])
            elif kind == "token":
                fill = pad_token_id if f.name == "completion_ids" else 0
                changes[f.name] = torch.cat([_pad_right(v, t_max, fill) for v in values])
            elif values[0].dim() == 2:
                width = max(v.shape[1] for v in values)
                fill = t_max if f.metadata["fill"] is None else f.metadata["fill"]
                changes[f.name] = torch.cat([_pad_right(v, width, fill) for v in values])
            else:
                changes[f.name] = torch.cat(values)
        offset = 0
        groups = []
        for p in parts:  # renumber groups so they stay unique and consecutive
            _, inverse = torch.unique_consecutive(p.group, return_inverse=True)
            groups.append(inverse + offset)
            offset += int(inverse.max().item()) + 1 if len(inverse) else 0
        changes["group"] = torch.cat(groups)
        return dataclasses.replace(parts[0], **changes)


def _fields_of(*kinds: str) -> list[str]:
    return [f.name for f in dataclasses.fields(Rollout) if f.metadata.get("kind") in kinds]


def _pad_right(x: Tensor, width: int, fill: float) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1]), fill)
    return torch.cat([x, pad], dim=1)


def _pad_left(x: Tensor, width: int, fill: float) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1]), fill)
    return torch.cat([pad, x], dim=1)
