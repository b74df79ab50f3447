"""Multi-turn episodes: the model's turns and the environment's answers in one sequence per row.

An episode is one Rollout row. Its completion holds every turn the model sampled and, between
them, the environment's observation tokens (tool results, feedback, and the chat markup that
opens the next assistant turn); ``completion_mask`` is 1 on the model's tokens and ``env_mask``
on the environment's, so every loss, KL, entropy and advantage trains on the model's tokens only.

Sampling keeps one KV cache per episode across turns: the prompt is encoded once per prompt,
each sampled token extends the cache, and each observation is appended to it in one forward
(``decode_episodes``), never re-encoding the history. Episodes that end leave the batch; an
episode that finished its turn waits (masked padding) while others in the batch finish theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rftlab.rollout.sampler import SamplingParams

#: ``respond(rows, turns)``: for the episodes ``rows`` (indices into the batch) that ended a turn
#: with the token lists ``turns``, the observation tokens to append to each, or None where the
#: episode is over.
Respond = Callable[[list[int], list[list[int]]], list[list[int] | None]]

MODEL, ENVIRONMENT = 1, 2  # token kinds in ``decode_episodes``' layout


@dataclass
class EpisodeTokens:
    """What ``decode_episodes`` sampled.

    Attributes:
        completion_ids: (N, T) every turn and observation, right-padded with the pad id.
        completion_mask: (N, T) 1 on the model's tokens.
        env_mask: (N, T) 1 on the environment's tokens.
        truncated: (N,) the budget or ``max_turns`` cut the episode before the environment ended it.
        turns: (N,) model turns sampled.
        logps: (N, T) float32 sampler log-probs of the model's tokens (0 elsewhere), or None.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    env_mask: Tensor
    truncated: Tensor
    turns: Tensor
    logps: Tensor | None = None


def decode_episodes(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    respond: Respond,
    max_turns: int,
    logprobs: bool = False,
) -> EpisodeTokens:
    """Sample ``num_generations`` episodes per prompt, turn by turn, on one KV cache per episode.

    A turn ends at an EOS (then ``respond`` is asked for the observation) or when the episode's
    completion reaches ``params.max_new_tokens`` tokens, the budget of the model's and the
    environment's tokens together (then the episode is truncated). An episode is also truncated
    when the environment answers its ``max_turns``-th turn with an observation instead of ending,
    or when an observation leaves no room for a token of the next turn. Call it under
    ``sampling_mode(model)``.

    Args:
        model: a HF causal LM (or PEFT-wrapped one) that accepts ``past_key_values``.
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: episodes per prompt (G); row ``b * G + g``.
        params: sampling parameters (``max_new_tokens`` is the episode's completion budget).
        eos_token_ids: ids that end a turn.
        pad_token_id: filler.
        respond: the environment side (see ``Respond``).
        max_turns: model turns per episode (>= 1).
        logprobs: also return the sampler's log-probs (``decoding.sample_next``; None when greedy).
    """
    from rftlab.rollout.decoding import prefill, sample_next

    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    G = num_generations
    device = prompt_ids.device
    budget = params.max_new_tokens
    cache, logits, attention, next_position = prefill(model, prompt_ids, prompt_mask, G)
    N = prompt_ids.shape[0] * G
    tokens = torch.full((N, budget), pad_token_id, dtype=torch.long, device=device)
    kind = torch.zeros((N, budget), dtype=torch.long, device=device)
    record = logprobs and not params.greedy
    token_logps = torch.zeros((N, budget), dtype=torch.float32, device=device) if record else None
    length = torch.zeros(N, dtype=torch.long, device=device)
    turns = torch.zeros(N, dtype=torch.long, device=device)
    truncated = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)  # episodes still in the batch
    eos = torch.tensor(eos_token_ids, device=device)
    for turn in range(max_turns):
        active = torch.ones(len(rows), dtype=torch.bool, device=device)  # still sampling this turn
        turn_start = length[rows].clone()
        ended_by_eos = torch.zeros(len(rows), dtype=torch.bool, device=device)
        while True:
            idx = active.nonzero().squeeze(-1)
            token, logp = sample_next(logits[idx], params, logprobs=record)
            r = rows[idx]
            tokens[r, length[r]] = token
            kind[r, length[r]] = MODEL
            if record:
                token_logps[r, length[r]] = logp
            length[r] += 1
            stop = torch.isin(token, eos)
            ended_by_eos[idx] = stop
            active[idx] = ~stop & (length[r] < budget)
            if not active.any():
                break
            # One step for the whole batch: an episode that finished its turn feeds masked padding,
            # so every cache row stays aligned; its position does not advance.
            step_ids = torch.full((len(rows),), pad_token_id, dtype=torch.long, device=device)
            step_ids[idx] = token
            column = active.long().unsqueeze(1)
            attention = torch.cat([attention, column.to(attention.dtype)], dim=1)
            out = model(input_ids=step_ids.unsqueeze(-1), attention_mask=attention, position_ids=next_position,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
            next_position = next_position + column
        turns[rows] += 1
        # The budget ran out inside the turn: the episode is cut there.
        truncated[rows[~ended_by_eos]] = True
        asks = ended_by_eos.nonzero().squeeze(-1)
        observations: list[list[int] | None] = [None] * len(rows)
        if len(asks):
            answered = respond(rows[asks].tolist(),
                               [tokens[rows[i], int(turn_start[i]): int(length[rows[i]])].tolist() for i in asks.tolist()])
            for i, obs in zip(asks.tolist(), answered):
                observations[i] = obs
        keep = []
        for i, obs in enumerate(observations):
            if obs is None:
                continue
            room = budget - int(length[rows[i]])
            if turn == max_turns - 1 or len(obs) >= room or not obs:
                truncated[rows[i]] = True  # the environment would go on; the turns or the budget do not
                continue
            keep.append(i)
        if not keep:
            break
        keep_t = torch.tensor(keep, dtype=torch.long, device=device)
        if len(keep) < len(rows):
            cache.batch_select_indices(keep_t)
            rows, attention, next_position = rows[keep_t], attention[keep_t], next_position[keep_t]
        # Append the observations in one forward, left-padded inside the chunk so that every row's
        # last position is a real token (its logits start the next turn). The turn's EOS was
        # sampled but never fed to the model: it goes first.
        obs_lists = [observations[i] for i in keep]
        width = 1 + max(len(o) for o in obs_lists)
        chunk = torch.full((len(keep), width), pad_token_id, dtype=torch.long, device=device)
        chunk_mask = torch.zeros((len(keep), width), dtype=attention.dtype, device=device)
        for j, obs in enumerate(obs_lists):
            r, n_obs = int(rows[j]), len(obs)
            end = int(length[r])
            chunk[j, width - n_obs - 1] = tokens[r, end - 1]
            chunk[j, width - n_obs:] = torch.tensor(obs, dtype=torch.long, device=device)
            chunk_mask[j, width - n_obs - 1:] = 1
            tokens[r, end: end + n_obs] = chunk[j, width - n_obs:]
            kind[r, end: end + n_obs] = ENVIRONMENT
            length[r] += n_obs
        attention = torch.cat([attention, chunk_mask], dim=1)
        chunk_positions = next_position + chunk_mask.cumsum(-1) - 1
        chunk_positions = torch.where(chunk_mask != 0, chunk_positions, next_position)
        out = model(input_ids=chunk, attention_mask=attention, position_ids=chunk_positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_position = next_position + chunk_mask.sum(-1, keepdim=True)
    width = max(1, int(length.max()))
    model_mask, env_mask = (kind[:, :width] == MODEL).long(), (kind[:, :width] == ENVIRONMENT).long()
    ids = tokens[:, :width].masked_fill((model_mask + env_mask) == 0, pad_token_id)
    logps = token_logps[:, :width] * model_mask if record else None
    return EpisodeTokens(ids, model_mask, env_mask, truncated, turns, logps)


# ---- the environment side --------------------------------------------------------------------------

_SENTINEL = "\x1erftlab-turn\x1e"


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools=`` (its source mentions ``tools``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def as_fallback_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results as one user message of ``<tool_response>`` blocks, for templates without tool support."""
    out: list[dict[str, Any]] = []
    responses: list[str] = []
    for m in messages:
        if m.get("role") == "tool":
            responses.append(f"<tool_response>\n{m.get('content', '')}\n</tool_response>")
            continue
        if responses:
            out.append({"role": "user", "content": "\n".join(responses)})
            responses = []
        out.append({"role": m["role"], "content": m.get("content", "")})
    if responses:
        out.append({"role": "user", "content": "\n".join(responses)})
    return out


def with_tool_instructions(prompt: Any, instructions: str) -> Any:
    """The prompt with the tool instructions first: in the system message (added or extended), or
    as leading text of a plain-string prompt."""
    if isinstance(prompt, str):
        return instructions + "\n\n" + prompt
    messages = [dict(m) for m in prompt]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = instructions + "\n\n" + messages[0].get("content", "")
        return messages
    return [{"role": "system", "content": instructions}, *messages]


def observation_text(messages: Sequence[dict[str, Any]], tokenizer: Any, native_tools: bool) -> str:
    """The text between the end of a model turn and the start of the next one, for ``messages``.

    Rendered by the chat template after a placeholder assistant turn, from the end of that turn
    to the opened next assistant turn, so the markup is the template's own. It starts with the
    template's end-of-turn text (``<|im_end|>``); ``ObservationEncoder`` drops that when the turn
    already ended with the same token.
    """
    msgs = list(messages) if native_tools else as_fallback_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n" + "\n\n".join(str(m.get("content", "")) for m in msgs) + "\n\n"
    history = [{"role": "user", "content": "-"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(history + msgs, tokenize=False, add_generation_prompt=True)
    return text[text.index(_SENTINEL) + len(_SENTINEL):]


class ObservationEncoder:
    """Observation messages -> the token ids appended after a model turn.

    Args:
        tokenizer: the policy's tokenizer.
        native_tools: render tool messages with the template's own tool role (it supports tools),
            else as ``<tool_response>`` user messages.
    """

    def __init__(self, tokenizer: Any, native_tools: bool) -> None:
        self.tokenizer = tokenizer
        self.native_tools = native_tools

    def encode(self, messages: Sequence[dict[str, Any]], last_token: int | None) -> list[int]:
        """Token ids of ``messages`` after a turn whose last sampled token is ``last_token``."""
        text = observation_text(messages, self.tokenizer, self.native_tools)
        if last_token is not None:
            sampled = self.tokenizer.decode([last_token])
            if sampled and text.startswith(sampled):
                text = text[len(sampled):]  # the turn already holds the end-of-turn token
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class EpisodeLog:
    """What one episode did, beside its tokens.

    Attributes:
        turns: the model's turn texts (special tokens removed).
        messages: the episode as chat messages after the prompt (assistant turns and observations).
        env_reward: the sum of the environment's step rewards (None: it gave none).
        stats: the environment's counters (tool calls, errors, ...).
        failed: the environment raised; the episode ended there.
    """

    turns: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    env_reward: float | None = None
    stats: dict[str, float] = field(default_factory=dict)
    failed: bool = False


class EpisodeDriver:
    """Holds one environment per episode and answers ``decode_episodes``' turns (its ``respond``).

    Args:
        environments: one fresh environment per episode (row order of the batch).
        encoder: renders observations into tokens.
        tokenizer: decodes the model's turns.
        max_turns: model turns per episode.
        max_workers: environment steps run concurrently on this many threads (tool calls of a
            batch overlap).
    """

    def __init__(self, environments: Sequence[Any], encoder: ObservationEncoder, tokenizer: Any, max_turns: int,
                 max_workers: int = 16) -> None:
        self.environments = list(environments)
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_turns = max_turns
        self.max_workers = max_workers
        self.logs = [EpisodeLog() for _ in self.environments]
        self.env_seconds = 0.0

    def respond(self, rows: list[int], turns: list[list[int]]) -> list[list[int] | None]:
        texts = self.tokenizer.batch_decode(turns, skip_special_tokens=True)
        start = time.perf_counter()
        workers = min(self.max_workers, len(rows))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="rftlab-env") as pool:
                steps = list(pool.map(self._step, rows, texts))
        else:
            steps = [self._step(r, t) for r, t in zip(rows, texts)]
        self.env_seconds += time.perf_counter() - start
        out: list[list[int] | None] = []
        for row, turn, step in zip(rows, turns, steps):
            if step is None or step.done or not step.observation:
                out.append(None)
                continue
            self.logs[row].messages.extend(step.observation)
            out.append(self.encoder.encode(step.observation, turn[-1] if turn else None))
        return out

    def _step(self, row: int, text: str) -> Any:
        log = self.logs[row]
        log.turns.append(text)
        log.messages.append({"role": "assistant", "content": text})
        try:
            step = self.environments[row].step(text)
        except Exception:  # noqa: BLE001 - an environment fault ends that episode, never the run
            log.failed = True
            return None
        if step.reward is not None:
            log.env_reward = (log.env_reward or 0.0) + float(step.reward)
        return step

    def finish(self) -> list[EpisodeLog]:
        """The episodes' logs, with each environment's counters collected."""
        for log, env in zip(self.logs, self.environments):
            try:
                log.stats = dict(env.stats()) if hasattr(env, "stats") else {}
            except Exception:  # noqa: BLE001
                log.stats = {}
        return self.logs


def episode_metrics(logs: Sequence[EpisodeLog], turns: Tensor, truncated: Tensor, env_seconds: float) -> dict[str, float]:
    """Per-rollout statistics of multi-turn episodes (means are per episode).

    Args:
        logs: the episodes' logs.
        turns: (N,) model turns per episode.
        truncated: (N,) episodes cut by the budget or ``max_turns``.
        env_seconds: wall time spent in the environments' steps (tool calls included).
    """
    n = max(1, len(logs))
    totals: dict[str, float] = {}
    for log in logs:
        for key, value in log.stats.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    metrics = {
        "episodes/turns_mean": turns.float().mean().item() if len(turns) else 0.0,
        "episodes/budget_ended_ratio": truncated.float().mean().item() if len(truncated) else 0.0,
        "episodes/env_failures": float(sum(log.failed for log in logs)),
        "timing/environment": env_seconds,
    }
    if "tool_calls" in totals or any(k.startswith("calls/") for k in totals):
        metrics["tools/calls_per_episode"] = totals.get("tool_calls", 0.0) / n
        metrics["tools/errors"] = totals.get("tool_errors", 0.0)
        metrics["tools/timeouts"] = totals.get("tool_timeouts", 0.0)
        metrics["tools/seconds"] = totals.get("tool_seconds", 0.0)
    for key, value in totals.items():
        if key.startswith("calls/"):
            metrics[f"tools/{key[len('calls/'):]}/calls_per_episode"] = value / n
        elif key.startswith("errors/"):
            metrics[f"tools/errors/{key[len('errors/'):]}"] = value
        elif key not in ("tool_calls", "tool_errors", "tool_timeouts", "tool_seconds"):
            metrics[f"env/{key}"] = value / n
    return metrics
