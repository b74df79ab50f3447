"""Rendering and tokenising prompts: chat template, left padding, length limits."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from rftlab.rollout.sampler import left_pad

TRUNCATION_MODES = ("left", "error")
Prompt = str | Sequence[dict[str, str]]


def render_prompt(prompt: Prompt, tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> str:
    """Chat messages -> text with the tokenizer's chat template (and the assistant turn opened).

    Args:
        prompt: a plain string (used as is) or chat messages.
        tokenizer: the policy's tokenizer.
        tools: JSON schemas passed to the chat template's ``tools=`` (templates with tool support).
    """
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    # A base model without a template: plain text, one message per paragraph.
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


class PromptEncoder:
    """Turns task prompts into left-padded token tensors.

    Args:
        max_prompt_length: longest prompt in tokens (>= 1).
        truncation: "left" keeps the last ``max_prompt_length`` tokens (the question usually ends the
            prompt) and warns once; "error" raises instead.
    """

    def __init__(self, max_prompt_length: int = 512, truncation: str = "left") -> None:
        if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be an integer >= 1, got {max_prompt_length!r}")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"prompt_truncation={truncation!r}; valid: {', '.join(TRUNCATION_MODES)}")
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self._warned = False

    def encode(self, prompts: Sequence[Prompt], tokenizer: Any,
               tools: list[dict[str, Any]] | None = None) -> tuple[list[str], Tensor, Tensor]:
        """Render and tokenize; returns (texts, ids (B, P), mask (B, P)), left-padded.

        Args:
            prompts: strings or chat messages.
            tokenizer: the policy's tokenizer.
            tools: tool JSON schemas for the chat template (``render_prompt``).
        """
        texts = [render_prompt(p, tokenizer, tools) for p in prompts]
        # add_special_tokens=False: the chat template already wrote any BOS/role tokens.
        token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for i, tokens in enumerate(token_lists):
            if len(tokens) > self.max_prompt_length:
                if self.truncation == "error":
                    raise ValueError(
                        f"prompt {i} has {len(tokens)} tokens > max_prompt_length={self.max_prompt_length} "
                        "(set prompt_truncation='left' to keep its end)"
                    )
                if not self._warned:
                    warnings.warn(
                        f"a prompt of {len(tokens)} tokens exceeds max_prompt_length={self.max_prompt_length}; "
                        "keeping its last tokens (prompt_truncation='left')",
                        stacklevel=2,
                    )
                    self._warned = True
                token_lists[i] = tokens[-self.max_prompt_length :]
        ids, mask = left_pad(token_lists, tokenizer.pad_token_id)
        return texts, ids, mask
