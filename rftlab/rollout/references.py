"""Batches of (prompt, reference completion) from a task: the DataModule of supervised fine-tuning.

``SFTDataModule`` hands the module the same ``Rollout`` every algorithm trains on, with the task's
reference solutions as the completions; only a module whose ``trains_on_references`` is True
(``rftlab.SFT``) accepts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rftlab.rollout.datamodule import RolloutDataModule
from rftlab.rollout.episodes import ObservationEncoder, template_supports_tools
from rftlab.rollout.rollout import Rollout
from rftlab.tasks.base import Task

#: Row columns read as the reference completion when no template is given, in this order.
REFERENCE_COLUMNS = ("solution", "answer")


def reference_text(row: Mapping[str, Any], template: str | None = None) -> str:
    """The reference completion of a task row.

    Args:
        row: a task row (``prompt`` plus reference columns).
        template: a ``str.format`` template over the row's columns (e.g. ``"{a} {op} {b} = {answer}"``);
            None reads the first of ``REFERENCE_COLUMNS`` the row has.
    """
    if template is not None:
        try:
            return template.format(**row)
        except (KeyError, IndexError) as err:
            raise ValueError(f"target_template={template!r} names {err} which the task's rows lack; "
                             f"columns: {sorted(row)}") from err
    for column in REFERENCE_COLUMNS:
        if row.get(column) is not None:
            return str(row[column])
    raise ValueError(f"the task's rows have no reference column ({' or '.join(REFERENCE_COLUMNS)}); "
                     f"columns: {sorted(row)}; set target_template, e.g. '{{answer}}'")


def reference_episode(row: Mapping[str, Any], column: str) -> list[dict[str, Any]]:
    """The reference episode of a row: chat messages that start with an assistant turn.

    Args:
        row: a task row.
        column: the column holding the episode.
    """
    episode = row.get(column)
    if not isinstance(episode, (list, tuple)) or not episode or not all(isinstance(m, Mapping) and "role" in m
                                                                        for m in episode):
        raise ValueError(f"episode_column={column!r}: the row's value must be a list of chat messages "
                         f"({{'role': ..., 'content': ...}}), got {type(episode).__name__}; columns: {sorted(row)}")
    if episode[0]["role"] != "assistant":
        raise ValueError(f"episode_column={column!r}: an episode starts with the model's (assistant) turn, "
                         f"got role {episode[0]['role']!r}")
    return [dict(m) for m in episode]


def episode_tokens(messages: Sequence[Mapping[str, Any]], tokenizer: Any, encoder: Any) -> tuple[list[int], list[int]]:
    """A reference episode as sampled episodes are laid out: token ids and kinds (1 model, 2 environment).

    Each assistant turn is its content's tokens and EOS; the messages between two turns are one
    observation, rendered as ``decode_episodes`` renders the environment's (``ObservationEncoder``).

    Args:
        messages: the episode (``reference_episode``).
        tokenizer: the policy's tokenizer.
        encoder: an ``ObservationEncoder`` for the observations.
    """
    ids: list[int] = []
    kinds: list[int] = []
    pending: list[Mapping[str, Any]] = []
    for message in messages:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        if pending:
            obs = encoder.encode(pending, ids[-1] if ids else None)
            ids += obs
            kinds += [2] * len(obs)
            pending = []
        turn = tokenizer(str(message.get("content", "")), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += turn
        kinds += [1] * len(turn)
    return ids, kinds


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Stack token lists into (B, L) ids and mask, padded on the right (as completions are)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), max(width, 1)), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


class SFTDataModule(RolloutDataModule):
    """Batches of (prompt, reference completion) from a task, for ``SFT``.

    Prompt order, held-out validation, seeding and checkpointed stream position are the
    ``RolloutDataModule``'s; only the training batches differ: the reference, not a sample.

    Args:
        task: the task; its rows give the prompts and the references, its verifier the validation.
        batch_size: examples per optimizer step (per process).
        target_template: ``str.format`` template of the reference over a row's columns; None reads
            the row's ``solution``, else its ``answer``.
        max_target_length: longest reference in tokens, EOS included; longer ones are cut (and lose
            the EOS, so the model is not taught to stop there).
        max_prompt_length: longest prompt in tokens.
        prompt_truncation: "left" (keep a long prompt's end, with a warning) or "error".
        val_batch_size: held-out prompts per validation batch.
        val_max_new_tokens: answer budget of the greedy validation answers.
        num_val_prompts: validate on the first n held-out prompts only (default: all).
        steps_per_epoch: optimizer steps per "epoch" (default: one pass over the training rows).
        seed: seeds the example order.
        episode_column: a row column holding a reference multi-turn episode (chat messages after
            the prompt: assistant turns, then tool or user observations, ...); the model's turns
            are trained on, the observations only attended to (``Rollout.env_mask``). None: a
            single-turn reference (``target_template`` or the row's solution/answer).
        tools: tools shown in the prompt, as ``RolloutDataModule(tools=...)`` shows them; the
            validation answers then run as multi-turn episodes with these tools.
        max_turns: model turns per validation episode (with ``tools``).
    """

    def __init__(
        self,
        task: Task,
        batch_size: int = 8,
        target_template: str | None = None,
        max_target_length: int = 256,
        max_prompt_length: int = 512,
        prompt_truncation: str = "left",
        val_batch_size: int = 64,
        val_max_new_tokens: int = 64,
        num_val_prompts: int | None = None,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        episode_column: str | None = None,
        tools: Sequence[Callable[..., Any] | str] | None = None,
        max_turns: int = 4,
    ) -> None:
        if not isinstance(max_target_length, int) or max_target_length < 1:
            raise ValueError(f"max_target_length={max_target_length!r} is invalid: must be an integer >= 1")
        super().__init__(
            task=task, prompts_per_step=batch_size, num_generations=1, max_new_tokens=val_max_new_tokens, max_prompt_length=max_prompt_length,
            prompt_truncation=prompt_truncation, dynamic_sampling=False, val_batch_size=val_batch_size,
            num_val_prompts=num_val_prompts, steps_per_epoch=steps_per_epoch, seed=seed, tools=tools, max_turns=max_turns,
        )
        if episode_column is not None:
            reference_episode(self.train_rows[0], episode_column)  # a missing or malformed column fails here
        else:
            reference_text(self.train_rows[0], target_template)  # a missing column fails here, not at step 1
        self.episode_column = episode_column
        self.target_template = target_template
        self.max_target_length = max_target_length

    def check_module(self, module: Any) -> None:
        if not module.trains_on_references:
            raise ValueError(f"SFTDataModule feeds reference solutions, which only rftlab.SFT trains on; "
                             f"{type(module).__name__} samples its own completions: give it a RolloutDataModule")
        module.check_datamodule(self)

    def next_minibatch(self) -> Rollout:
        """The next ``batch_size`` examples as a Rollout whose completions are the references."""
        module = self.module
        self.check_module(module)
        rollout = self.reference_batch(self.next_prompt_rows(self.prompts_per_step), module.tokenizer)
        rollout.policy_version = int(module.global_step)
        return rollout

    def reference_batch(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any) -> Rollout:
        """Encode rows as prompts (left-padded) and reference completions + EOS (right-padded).

        Args:
            rows: task rows.
            tokenizer: the policy's tokenizer.
        """
        prompts, prompt_ids, prompt_mask = self.encode_prompts(rows, tokenizer)
        env_mask = None
        if self.episode_column is not None:
            encoder = ObservationEncoder(tokenizer, template_supports_tools(tokenizer))
            layouts = [episode_tokens(reference_episode(r, self.episode_column), tokenizer, encoder) for r in rows]
            tokens = [ids for ids, _ in layouts]
            targets = [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]
            kinds, _ = right_pad([k[: self.max_target_length] for _, k in layouts], 0)
        else:
            targets = [reference_text(r, self.target_template) for r in rows]
            tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in targets]
        truncated = torch.tensor([len(t) > self.max_target_length for t in tokens])
        completion_ids, completion_mask = right_pad([t[: self.max_target_length] for t in tokens], tokenizer.pad_token_id)
        if self.episode_column is not None:
            env_mask = (kinds == 2).long()
            completion_mask = (kinds == 1).long()
        n = len(rows)
        rollout = Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, env_mask=env_mask, group=torch.arange(n), rewards=torch.zeros(n),
            rewards_per_fn=torch.zeros(n, 0), truncated=truncated, prompts=prompts, completions=targets,
            rows=[dict(r) for r in rows],
        )
        lengths = completion_mask.sum(-1).float()
        rollout.metrics = {"completions/mean_length": lengths.mean().item(),
                           "completions/clipped_ratio": truncated.float().mean().item()}
        return rollout
