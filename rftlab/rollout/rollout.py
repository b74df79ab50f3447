"""The Rollout: one batch of experience, the single contract between the DataModule and algorithms.

Shapes: N sequences (prompts x completions per prompt, grouped consecutively), P prompt positions
(left-padded), T completion positions (right-padded, EOS included), F reward functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Fields holding (N, ...) tensors that are sliced along the first dim; the (N, T) ones are also
# trimmed to the longest real completion of a minibatch.
_PER_TOKEN = ("completion_ids", "completion_mask", "old_logp", "ref_logp", "values", "advantages", "returns")
_PER_SEQ = ("prompt_ids", "prompt_mask", "group", "rewards", "rewards_per_fn", "truncated", "seq_advantages")
_PER_SEQ_LISTS = ("prompts", "completions", "rows")


@dataclass
class Rollout:
    """Tensors and texts of N sampled completions; algorithms fill the optional fields.

    Attributes:
        prompt_ids: (N, P) long, left-padded prompt tokens (repeated for each completion of a prompt).
        prompt_mask: (N, P) long, 1 on real prompt tokens.
        completion_ids: (N, T) long, right-padded completion tokens; EOS included when sampled.
        completion_mask: (N, T) long, 1 on real completion tokens up to and including the first EOS.
        group: (N,) long, index of the prompt each completion answers; groups are consecutive blocks.
        rewards: (N,) float, weighted sum of the reward functions (None scores count as 0).
        rewards_per_fn: (N, F) float, each function's score; NaN where the function returned None.
        truncated: (N,) bool, True when no EOS was sampled within max_new_tokens.
        reward_names: the F reward function names, in column order.
        prompts: N prompt texts (as rendered, chat template applied).
        completions: N completion texts (special tokens removed).
        rows: N task rows (dicts: answer, tests, ...), the columns the rewards were given.
        temperature: the sampling temperature; log-probs must divide logits by it.
        policy_version: the optimizer step count of the policy that sampled this rollout.
        num_updates: optimizer steps that will consume this rollout (num_iterations x minibatches);
            when 1, the sampling policy IS the trained one and old log-probs need no extra forward.
        old_logp: (N, T) float, log-probs of the sampling policy (filled by ``score_rollout``).
        ref_logp: (N, T) float, log-probs of the reference policy (when a KL term is used).
        values: (N, T) float, critic values at rollout time (PPO-style algorithms).
        advantages: (N, T) float, per-token advantages.
        returns: (N, T) float, value targets.
        seq_advantages: (N,) float, per-sequence advantages before broadcasting (for logging).
        extras: free-form per-rollout data an algorithm needs (not sliced).
        seq_extras: per-sequence tensors an algorithm adds (first dim N, e.g. (N, K) segment data);
            sliced with the rollout, never trimmed.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    group: Tensor
    rewards: Tensor
    rewards_per_fn: Tensor
    truncated: Tensor
    reward_names: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    temperature: float = 1.0
    policy_version: int = 0
    num_updates: int = 1
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    seq_advantages: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seq_extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> Tensor:
        """(N,) number of real completion tokens (EOS included)."""
        return self.completion_mask.sum(-1)

    def select(self, index: Tensor | list[int], trim: bool = True) -> "Rollout":
        """The sub-rollout of sequences ``index`` (in that order); ``trim`` drops all-padding columns."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, Any] = {}
        for name in _PER_TOKEN + _PER_SEQ:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[idx.to(value.device)]
        for name in _PER_SEQ_LISTS:
            values = getattr(self, name)
            changes[name] = [values[i] for i in idx.tolist()] if values else []
        changes["seq_extras"] = {k: v[idx.to(v.device)] for k, v in self.seq_extras.items()}
        out = dataclasses.replace(self, **changes)
        return out.trimmed() if trim else out

    def trimmed(self) -> "Rollout":
        """Drop completion columns that are padding in every row, and prompt columns likewise."""
        changes: dict[str, Any] = {}
        t_real = int(self.completion_mask.sum(0).nonzero().max().item()) + 1 if self.completion_mask.any() else 1
        if t_real < self.completion_ids.shape[1]:
            for name in _PER_TOKEN:
                value = getattr(self, name)
                if value is not None:
                    changes[name] = value[:, :t_real]
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
        changes["seq_extras"] = {k: v.to(device) for k, v in self.seq_extras.items()}
        return dataclasses.replace(self, **changes)

    @staticmethod
    def concat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Join rollouts (e.g. generation rounds of dynamic sampling); re-pads to common widths."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one rollout")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        t_max = max(p.completion_ids.shape[1] for p in parts)
        p_max = max(p.prompt_ids.shape[1] for p in parts)
        changes: dict[str, Any] = {}
        for name in _PER_TOKEN:
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                changes[name] = None
                continue
            fill = pad_token_id if name == "completion_ids" else 0
            changes[name] = torch.cat([_pad_right(v, t_max, fill) for v in values])
        changes["prompt_ids"] = torch.cat([_pad_left(p.prompt_ids, p_max, pad_token_id) for p in parts])
        changes["prompt_mask"] = torch.cat([_pad_left(p.prompt_mask, p_max, 0) for p in parts])
        offset = 0
        groups = []
        for p in parts:  # renumber groups so they stay unique and consecutive
            _, inverse = torch.unique_consecutive(p.group, return_inverse=True)
            groups.append(inverse + offset)
            offset += int(inverse.max().item()) + 1 if len(inverse) else 0
        changes["group"] = torch.cat(groups)
        for name in ("rewards", "rewards_per_fn", "truncated", "seq_advantages"):
            values = [getattr(p, name) for p in parts]
            changes[name] = None if any(v is None for v in values) else torch.cat(values)
        for name in _PER_SEQ_LISTS:
            changes[name] = [x for p in parts for x in getattr(p, name)]
        return dataclasses.replace(first, **changes)


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
