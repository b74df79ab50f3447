"""Value heads: a scalar critic V(s) read from a language model's last hidden state.

A *state* is the prompt plus the first t completion tokens; its value is a linear function of the
last-layer hidden state at the state's last token, as in the RLHF critics of Stiennon et al. 2020
(arXiv 2009.01325) and Ouyang et al. 2022 (arXiv 2203.02155): a transformer with a scalar head.

The same head serves every critic layout:
- shared trunk: the head reads the policy's own hidden states (``completion_forward(...,
  hidden=True)``), so policy and critic share one forward and one copy of the weights;
- its own LoRA adapter on the policy's base weights (``adapter_active(policy, name)`` around
  ``completion_state_values``);
- a separate model (``completion_state_values(critic_model, head, ...)``).

Positions: with T completion columns, ``state_values`` is (N, T + 1) and column t is the value of
the state after t completion tokens (t = 0: the prompt alone; t = L_i: the whole completion of
row i). ``token_values`` drops the last column to align values with the tokens sampled from them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rftlab.models.policy import completion_forward


class ValueHead(nn.Module):
    """``V = w . h + b``: a float32 ``Linear(hidden_size, 1)`` on last hidden states.

    The head stays float32 whatever the trunk's dtype: the hidden state is cast up, autocast is
    switched off inside, and ``module.to(bfloat16)`` leaves its parameters float32 (a bf16 value
    head loses the small differences between values that GAE subtracts).

    Initialised small: ``w ~ N(0, (init_scale / sqrt(H))^2)``, ``b = 0``, so for a unit-RMS hidden
    state the initial values are ~ N(0, init_scale^2), near 0 next to rewards of order 1, and the
    value loss sends only a small gradient into a shared trunk at first. (Huang et al. 2024,
    "The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031, use std 1/sqrt(H + 1) for
    a reward head; ``init_scale=0`` is the zero init of OpenAI's lm-human-preferences value head.)

    Args:
        hidden_size: H, the trunk's hidden size (``model.config.hidden_size``).
        init_scale: >= 0, scale of the initial weights (0: zeros).
        generator: seeds the initial weights (default: the global RNG).
    """

    def __init__(self, hidden_size: int, init_scale: float = 0.01, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size!r} is invalid: must be an integer >= 1")
        if not (init_scale >= 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale={init_scale!r} is invalid: must be a finite number >= 0")
        self.weight = nn.Parameter(torch.randn(hidden_size, generator=generator) * (init_scale / math.sqrt(hidden_size)))
        # Shape (1,), not a scalar: FSDP2 cannot shard a 0-d parameter.
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., H) hidden states -> (...) float32 values."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return hidden.float() @ self.weight.float() + self.bias.float()[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Checkpoints written before the bias became shape (1,) hold a scalar.
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, Tensor) and bias.dim() == 0:
            state_dict[prefix + "bias"] = bias.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep float32 through module.to(dtype) / .half() / Lightning's "bf16-true" conversion.
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            if param.dtype != torch.float32:
                param.data = param.data.float()
        return self


def completion_state_values(
    trunk: nn.Module,
    head: ValueHead,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    share_prompt: bool = True,
    packing: str = "never",
    packed_attention: str = "auto",
) -> Tensor:
    """Values of every state along the completions, from a trunk's own forward (separate critic).

    Args:
        trunk: HF causal LM whose last hidden states the head reads (a separate critic model, or
            the policy with a critic adapter active).
        head: the value head.
        prompt_ids: (N, P) left-padded.
        prompt_mask: (N, P).
        completion_ids: (N, T) right-padded.
        completion_mask: (N, T).
        share_prompt: encode each distinct prompt once (see ``completion_forward``).
        packing: "auto", "always" or "never" (see ``completion_forward``).
        packed_attention: "auto", "sdpa" or "eager" (see ``completion_forward``).

    Returns:
        (N, T + 1) float32: column t is V(prompt + completion[:t]); columns past a row's length
        L_i read padding and mean nothing.
    """
    out = completion_forward(trunk, prompt_ids, prompt_mask, completion_ids, completion_mask, logits=False, hidden=True,
                             share_prompt=share_prompt, packing=packing, packed_attention=packed_attention)
    return head(out.hidden)


def token_values(state_values: Tensor) -> Tensor:
    """(N, T + 1) state values -> (N, T): column t is the value of the state token t was sampled in.

    These are the V(s_t) of GAE (``rftlab.core.gae``) and of the value loss.
    """
    return state_values[:, :-1]


def values_at(state_values: Tensor, positions: Tensor) -> Tensor:
    """Values of chosen states: ``state_values[i, positions[i, k]]``.

    Args:
        state_values: (N, T + 1), column t the state after t completion tokens.
        positions: (N, K) long, completion-token counts in [0, T] (e.g. segment boundaries).

    Returns:
        (N, K).
    """
    if positions.dim() != 2 or positions.shape[0] != state_values.shape[0]:
        raise ValueError(f"positions must be (N, K) with N={state_values.shape[0]}, got {tuple(positions.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= state_values.shape[1]):
        raise ValueError(f"positions must be in [0, {state_values.shape[1] - 1}], got {positions.min()}..{positions.max()}")
    return state_values.gather(1, positions.long())


def prompt_values(state_values: Tensor) -> Tensor:
    """(N,) values of the states before the completion (the prompt alone)."""
    return state_values[:, 0]


def final_values(state_values: Tensor, completion_mask: Tensor) -> Tensor:
    """(N,) values of the states after each row's last real completion token (column L_i)."""
    lengths = completion_mask.sum(-1).long().unsqueeze(1)
    return values_at(state_values, lengths).squeeze(1)
