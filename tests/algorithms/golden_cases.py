"""Golden cases of the algorithm layer: fixed modules, fixed rollouts, one scored minibatch each.

Not a test module: ``test_algorithms_golden.py`` recomputes every case and compares it with the
values ``record_golden.py`` saved in ``golden_values.pt``.

A case is a name in ``CASES``: the algorithm class and the keyword arguments it is built with (the
ONLY place that names constructor arguments: after a redesign of the constructors, edit the dicts
below, nothing else), plus what the harness needs to know, independent of the module: the group
size G of the rollout, which rollout builder, ``Rollout.num_updates``, the rows the loss sees and
the sampling temperature.

``run_case(name)`` runs the flow the RolloutDataModule and ``training_step`` run, without a Trainer:

1. build the module (``configure_model()``), re-draw its LoRA A matrices from name-seeded
   generators (``reinit_lora``) and move its trainable weights off their initial values with
   seeded noise (``perturb``), so the policy differs from the reference (a fresh LoRA adapter,
   B = 0, would make every KL term and its gradient exactly 0) and the value heads are not ~0;
2. build the rollout (no sampling), set ``rollout.rewards = module.shape_rewards(rollout)`` (DAPO's
   overlong shaping; the DataModule does this right after the verifiers) and ``score_rollout``;
3. with ``num_updates > 1`` perturb the trainable weights again, as the first update of the
   rollout would, so the ratio to the recorded old log-probs (and old values) is not 1 and the
   clipping, dual-clip and value-clipping branches are exercised;
4. ``compute_loss`` on the minibatch (``rollout.select(rows)``, or the whole rollout), ``backward``.

It returns the loss, every metric, the rollout's annotations and every trainable parameter's
gradient, keyed by ``canonical_name`` (see there for renamed parameters).

The noise is seeded by the case name and the parameter's canonical name: do not rename a case
without re-recording it. ``Case.group_size`` (the rollout's G) is kept apart from the module's
``num_generations`` on purpose: when the group size moves to the RolloutDataModule, drop
``num_generations`` from the kwargs below and the rollouts stay the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rftlab.algorithms.dapo import DAPO
from rftlab.algorithms.grpo import GRPO
from rftlab.algorithms.ppo import PPO
from rftlab.algorithms.segment_rft import SegmentRFT
from rftlab.algorithms.sft import SFT
from rftlab.rollout.rollout import Rollout

#: Parameters with more elements than this are stored as a fingerprint, not in full.
FULL_GRADIENT_LIMIT = 20_000
#: Rollout annotations recorded after ``score_rollout`` (None when the algorithm leaves one unset).
ANNOTATIONS = ("rewards", "advantages", "seq_advantages", "old_logp", "ref_logp", "values", "returns")
#: SegmentRFT's per-segment fields (``Rollout.segment_<key>``), recorded under the key.
SEGMENT_FIELDS = ("starts", "mask", "rewards", "targets", "old_values")


def canonical_name(name: str) -> str:
    """The name a parameter is recorded under (gradients and the seeds of ``perturb``).

    The identity at the recording commit. If a redesign renames parameters (e.g. the policy moves
    under another attribute, so ``policy.model.layers.0...`` becomes ``actor.policy.model...``),
    map the new names back to the recorded ones here: both the perturbation noise (seeded by this
    name) and the comparison then line up again without re-recording.
    """
    return name


def name_seed(text: str) -> int:
    """A stable 63-bit seed from a string (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Case:
    """One golden case.

    Attributes:
        cls: the algorithm class.
        kwargs: its constructor arguments (the only place they are named).
        group_size: G, completions per prompt in the rollout (must match the module's setting).
        rollout: "tokens" (fixed token ids), "segments" (multi-line arithmetic chains, for
            SegmentRFT's step critic) or "references" (SFT batches: one completion per prompt).
        num_updates: ``Rollout.num_updates`` (> 1 records old log-probs at scoring).
        rows: the rows ``compute_loss`` sees, in this order (``rollout.select``); None: all.
        temperature: the rollout's sampling temperature.
        noise: std of the seeded noise added to the trainable weights before scoring and, when
            ``num_updates > 1``, again after scoring.
        score: run ``shape_rewards`` and ``score_rollout`` (False for SFT, which trains on
            references as its DataModule hands them over).
    """

    cls: type
    kwargs: dict[str, Any]
    group_size: int
    rollout: str = "tokens"
    num_updates: int = 1
    rows: tuple[int, ...] | None = None
    temperature: float = 1.0
    noise: float = 0.02
    score: bool = True


# The tiny random Llama (real SmolLM2 tokenizer). oneDNN linears off: scoring would use them and
# the bare compute_loss call would not; torch's default kernels everywhere keep the numbers portable.
# Packed rows on SDPA, the kernel the values were recorded with (explicit attention, the CPU default
# for short rows, sums in another order: test_golden_values_hold_with_explicit_attention).
TINY = dict(lr=1e-2, forward={"onednn_kernels": False, "packed_attention": "sdpa"})
POLICY = {"model": "tiny", "seed": 0}
LORA = dict(policy={**POLICY, "lora_r": 4, "lora_alpha": 8}, lora=True)
# Groups 2 and 0 of a 3 x 4 rollout, in that order (a minibatch of whole groups, reordered).
MINIBATCH = (8, 9, 10, 11, 0, 1, 2, 3)

CASES: dict[str, Case] = {
    "grpo_lora_beta0": Case(GRPO, dict(**TINY, **LORA, beta=0.0, advantage={"name": "grpo", "options": {"scale": "group"}},
                                       loss={"agg": "seq-mean-token-mean"}), group_size=4),
    "grpo_lora_beta_dualclip": Case(GRPO, dict(**TINY, **LORA, beta=0.04, clip={"eps_high": 0.28, "dual_clip": 3.0}),
                                    group_size=4, num_updates=2, rows=MINIBATCH, temperature=0.3, noise=0.2),
    "grpo_full_beta": Case(GRPO, dict(**TINY, policy=POLICY, lora=False, beta=0.04), group_size=4,
                           num_updates=2, rows=MINIBATCH, noise=0.01),
    "grpo_dr_grpo": Case(GRPO, dict(**TINY, **LORA, beta=0.0, advantage="dr_grpo",
                                    loss={"agg": "seq-mean-token-sum-norm"}), group_size=4),
    "grpo_scale_batch": Case(GRPO, dict(**TINY, **LORA, beta=0.0, advantage={"name": "grpo", "options": {"scale": "batch"}},
                                        loss={"agg": "seq-mean-token-sum"}), group_size=4, num_updates=2, noise=0.1),
    "dapo_overlong": Case(DAPO, dict(**TINY, **LORA, overlong={"buffer_len": 4, "penalty_factor": 0.5},
                                     loss={"agg": "token-mean", "mask_truncated": True}), group_size=4, num_updates=2,
                          rows=MINIBATCH, noise=0.1),
    "ppo_shared": Case(PPO, dict(**TINY, **LORA, beta=0.05, critic={"kind": "shared"}, kl={"in_reward": True},
                                 advantage={"name": "gae", "options": {"gamma": 0.99, "lam": 0.9}}), group_size=4,
                       num_updates=2, rows=MINIBATCH, noise=0.1),
    "ppo_adapter": Case(PPO, dict(**TINY, **LORA, beta=0.05, critic={"kind": "adapter", "vf_coef": 0.5}), group_size=4,
                        temperature=0.7, noise=0.1),
    "ppo_model_adaptive_kl": Case(PPO, dict(**TINY, **LORA, beta=0.1,
                                            critic={"kind": "model", "whiten_advantages": False, "value_clip": 0.5},
                                            kl={"in_reward": False, "estimator": "k3", "target": 0.5, "horizon": 100},
                                            loss={"agg": "seq-mean-token-mean", "entropy_coef": 0.01}),
                                  group_size=4, num_updates=2, rows=MINIBATCH, noise=0.1),
    "segment_sum_k3": Case(SegmentRFT, dict(**TINY, **LORA, beta=0.05, kl={"estimator": "k3"},
                                            clip={"dual_clip": 3.0}, segments={"ratio_mode": "sum", "gamma": 0.95}),
                           group_size=4, rollout="segments", num_updates=2, rows=(4, 5, 6, 7, 0, 1, 2, 3),
                           temperature=0.5, noise=0.2),
    "segment_token_exact_whiten": Case(SegmentRFT, dict(**TINY, **LORA, beta=0.05, kl={"estimator": "exact"},
                                                        critic={"whiten_advantages": True},
                                                        segments={"ratio_mode": "token", "td_lambda": 0.5,
                                                                  "rewards": {"whiten": "chain"}}),
                                       group_size=4, rollout="segments", num_updates=2, temperature=0.7,
                                       noise=0.1),
    "segment_mean_beta0": Case(SegmentRFT, dict(**TINY, **LORA, beta=0.0, critic={"value_clip": 0.0, "vf_coef": 0.5},
                                                segments={"ratio_mode": "mean", "td_lambda": 1.0,
                                                          "rewards": {"whiten": "batch"}}),
                               group_size=4, rollout="segments", noise=0.1),
    "sft_lora": Case(SFT, dict(**TINY, **LORA, loss_agg="token-mean"), group_size=1,
                     rollout="references", score=False, noise=0.1),
    "sft_full_seq_mean": Case(SFT, dict(**TINY, policy=POLICY, lora=False, loss_agg="seq-mean-token-mean"), group_size=1,
                              rollout="references", score=False, noise=0.01),
}


def make_module(name: str, **forward: Any) -> Any:
    """The module of case ``name``, its policy (and critic/reference) loaded; ``forward`` overrides options."""
    case = CASES[name]
    # The values were recorded without the beta-0 KL monitor (a logged metric, not part of the
    # loss), which LoRA runs now get by default: keep it off so the recorded metric names hold.
    kwargs = {**case.kwargs, "kl": {"log_every": None, **case.kwargs.get("kl", {})}}
    kwargs["forward"] = {**case.kwargs.get("forward", {}), **forward}
    module = case.cls(**kwargs)
    module.configure_model()
    return module


# ---- rollouts --------------------------------------------------------------------------------

def _lcg_ids(seed: int, n: int, low: int = 3, high: int = 49_000) -> list[int]:
    """n token ids in [low, high) from a fixed linear congruential generator (no torch RNG involved)."""
    out, x = [], seed * 2654435761 + 12345
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(low + (x >> 33) % (high - low))
    return out


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def _right_pad(seqs: list[list[int]], pad: int, width: int) -> tuple[Tensor, Tensor]:
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, mask


# 3 prompts x G = 4 completions; T = 10 (max_new_tokens). "T" rows are truncated (no EOS, length T);
# row 10 fills the budget exactly but ends with EOS (not truncated). Group 1's rewards are constant.
TOKEN_T = 10
TOKEN_PROMPT_LENGTHS = (7, 4, 5)
TOKEN_LENGTHS = ((10, "T"), 3, 7, 5, 9, (10, "T"), 2, 6, 4, 8, 10, (10, "T"))
TOKEN_REWARDS = (1.0, 0.0, 0.5, 1.0, 0.25, 0.25, 0.25, 0.25, 0.0, 1.0, 0.0, 0.75)


def token_rollout(tokenizer: Any, group_size: int, num_updates: int, temperature: float) -> Rollout:
    """A 12-row rollout of fixed token ids (left-padded prompts, ragged right-padded completions)."""
    if group_size != 4:
        raise ValueError("token_rollout has 3 groups of 4 completions")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [_lcg_ids(100 + g, n) for g, n in enumerate(TOKEN_PROMPT_LENGTHS)]
    prompt_ids, prompt_mask = _left_pad([prompts[i // group_size] for i in range(len(TOKEN_LENGTHS))], pad)
    completions, truncated = [], []
    for i, spec in enumerate(TOKEN_LENGTHS):
        cut = isinstance(spec, tuple)
        length = spec[0] if cut else spec
        body = _lcg_ids(200 + i, length if cut else length - 1)
        completions.append(body if cut else body + [eos])
        truncated.append(cut)
    completion_ids, completion_mask = _right_pad(completions, pad, TOKEN_T)
    rewards = torch.tensor(TOKEN_REWARDS)
    n = len(completions)
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, group=torch.arange(n) // group_size, rewards=rewards.clone(),
        rewards_per_fn=torch.stack([rewards, (rewards > 0.5).float()], 1), truncated=torch.tensor(truncated),
        reward_names=["score", "correct"],
        prompts=[tokenizer.decode(p) for p in prompts for _ in range(group_size)],
        completions=tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad), skip_special_tokens=True),
        rows=[{"answer": str(i // group_size)} for i in range(n)],
        temperature=temperature, num_updates=num_updates, group_size=group_size,
        max_new_tokens=TOKEN_T,  # as the RolloutDataModule records it (DAPO reads it)
    )
    return rollout


# Two word problems with reference steps (the columns ArithmeticStepCritic reads), G = 4 chains each.
PROBLEMS = (
    {"prompt": "Zoe has 17 cards. She gives 3 to a friend. Then she gets 5 more. How many cards does Zoe have now?\n"
               "Solve it step by step. Write one calculation per line. End with the line \"Answer: <number>\".",
     "answer": "19", "steps": [14, 19], "solution": "17 - 3 = 14\n14 + 5 = 19\nAnswer: 19"},
    {"prompt": "A box holds 6 rows of 4 eggs. 5 eggs break. How many eggs are left?\n"
               "Solve it step by step. Write one calculation per line. End with the line \"Answer: <number>\".",
     "answer": "19", "steps": [24, 19], "solution": "6 * 4 = 24\n24 - 5 = 19\nAnswer: 19"},
)
CHAINS = (
    ("17 - 3 = 14\n14 + 5 = 19\nAnswer: 19", 1.0),               # the reference solution
    ("17 - 3 = 15\n15 + 5 = 20\nAnswer: 20", 0.0),               # a wrong first step carried on
    ("The answer is 19", 1.0),                                   # no thought segment
    ("First, 17 - 3 = 14\n\n  then 14 + 5 = 19 cards\nSo she has 19 cards now and then", 0.0),  # truncated
    ("6 * 4 = 24\n24 - 5 = 19\nAnswer: 19", 1.0),
    ("6 * 4 = 24\nsome eggs break\n24 - 5 = 18\nAnswer: 18", 0.0),
    ("6 + 4 = 10\n10 - 5 = 5\n\nAnswer: 5", 0.0),
    ("24 - 5 = 19\nAnswer: 19", 1.0),
)
SEGMENT_T = 24  # max_new_tokens of the segment rollout: chain 3 is cut there


def segment_rollout(tokenizer: Any, group_size: int, num_updates: int, temperature: float) -> Rollout:
    """8 multi-line arithmetic chains answering 2 problems (4 each); one is truncated at SEGMENT_T.

    The completion texts are the tokens decoded as the RolloutDataModule decodes them, so
    SegmentRFT's segmentation (prefix decoding) sees a consistent (ids, text) pair.
    """
    if group_size != 4:
        raise ValueError("segment_rollout has 2 groups of 4 chains")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_tokens = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in PROBLEMS]
    n = len(CHAINS)
    prompt_ids, prompt_mask = _left_pad([prompt_tokens[i // group_size] for i in range(n)], pad)
    completions, truncated = [], []
    for text, _ in CHAINS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        truncated.append(len(ids) > SEGMENT_T)
        completions.append(ids[:SEGMENT_T])
    if not any(truncated):
        raise AssertionError("the segment rollout must hold a truncated chain")
    completion_ids, completion_mask = _right_pad(completions, pad, max(len(c) for c in completions))
    rewards = torch.tensor([r for _, r in CHAINS])
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, group=torch.arange(n) // group_size, rewards=rewards.clone(),
        rewards_per_fn=rewards.unsqueeze(1), truncated=torch.tensor(truncated), reward_names=["correct"],
        prompts=[PROBLEMS[i // group_size]["prompt"] for i in range(n)],
        completions=tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad), skip_special_tokens=True),
        rows=[dict(PROBLEMS[i // group_size]) for i in range(n)],
        temperature=temperature, num_updates=num_updates, group_size=group_size, max_new_tokens=SEGMENT_T,
    )
    return rollout


def reference_rollout(tokenizer: Any, group_size: int, num_updates: int, temperature: float) -> Rollout:
    """An SFT batch as SFTDataModule builds it: 4 prompts, each with its reference completion + EOS.

    The last reference is cut at 8 tokens (truncated, no EOS), as ``max_target_length`` would.
    """
    if group_size != 1:
        raise ValueError("reference_rollout has one completion per prompt")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [dict(PROBLEMS[0]), dict(PROBLEMS[1]), dict(PROBLEMS[0], solution="Answer: 19"),
            dict(PROBLEMS[1], solution=CHAINS[5][0])]
    prompt_ids, prompt_mask = _left_pad([tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-12 - 3 * i:]
                                         for i, r in enumerate(rows)], pad)
    tokens = [tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [eos] for r in rows]
    limit = [64, 64, 64, 8]
    truncated = torch.tensor([len(t) > m for t, m in zip(tokens, limit)])
    cut = [t[:m] for t, m in zip(tokens, limit)]
    completion_ids, completion_mask = _right_pad(cut, pad, max(len(c) for c in cut))
    n = len(rows)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, group=torch.arange(n), rewards=torch.zeros(n),
        rewards_per_fn=torch.zeros(n, 0), truncated=truncated, prompts=[r["prompt"] for r in rows],
        completions=[r["solution"] for r in rows], rows=rows, temperature=temperature, num_updates=num_updates,
        group_size=group_size,
    )


ROLLOUTS: dict[str, Callable[[Any, int, int, float], Rollout]] = {
    "tokens": token_rollout, "segments": segment_rollout, "references": reference_rollout,
}


def make_rollout(name: str, tokenizer: Any) -> Rollout:
    """The fixed rollout of case ``name`` (needs only the tokenizer, not the module's options)."""
    case = CASES[name]
    return ROLLOUTS[case.rollout](tokenizer, case.group_size, case.num_updates, case.temperature)


# ---- the flow --------------------------------------------------------------------------------

def reinit_lora(module: torch.nn.Module) -> None:
    """Re-draw every LoRA A matrix from a generator seeded by its canonical name (B stays as it is).

    PEFT draws A from the global RNG, so its values would depend on how much randomness the
    construction consumed before; seeding by name makes the case independent of that order.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and "lora_A" in name:
                g = torch.Generator().manual_seed(name_seed(f"lora_A/{canonical_name(name)}"))
                bound = 1.0 / p.shape[-1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1).to(p.dtype) * bound)


def perturb(module: torch.nn.Module, salt: str, std: float) -> None:
    """Add N(0, std^2) noise to every trainable parameter, seeded by ``salt`` and its canonical name."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                g = torch.Generator().manual_seed(name_seed(f"{salt}/{canonical_name(name)}"))
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def fingerprint(name: str, grad: Tensor) -> Tensor:
    """(sum, L2 norm, dot with a fixed N(0, 1) vector seeded by the name), float64."""
    g = grad.detach().double().flatten()
    probe = torch.randn(g.numel(), generator=torch.Generator().manual_seed(name_seed(name)), dtype=torch.float64)
    return torch.stack([g.sum(), g.norm(), g @ probe])


def _value(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x.detach().cpu().clone()
    return x


def run_case(name: str, **forward: Any) -> dict[str, Any]:
    """Compute case ``name``: loss, metrics, annotations and gradients (see the module docstring).

    Args:
        name: a key of ``CASES``.
        forward: forward options that replace the case's own (e.g. ``packed_attention="eager"``).

    Returns:
        {"loss": float, "metrics": {name: float}, "annotations": {field: Tensor | None},
         "seq_extras": {key: Tensor}, "grads": {canonical name: Tensor | None},
         "fingerprints": {canonical name: (3,) float64}, "grad_numel": {canonical name: int}}
    """
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left as it was
        torch.manual_seed(0)
        return _run_case(name, **forward)


def _run_case(name: str, **forward: Any) -> dict[str, Any]:
    case = CASES[name]
    module = make_module(name, **forward)
    reinit_lora(module)
    perturb(module, f"{name}/before-scoring", case.noise)
    rollout = make_rollout(name, module.tokenizer)
    if case.score:
        rollout.rewards = module.shape_rewards(rollout)
        rollout = module.score_rollout(rollout)
        if rollout.num_updates > 1:
            perturb(module, f"{name}/first-update", case.noise)
    batch = rollout.select(list(case.rows)) if case.rows is not None else rollout
    module.zero_grad(set_to_none=True)
    loss, metrics = module.compute_loss(batch)
    loss.backward()
    grads, fingerprints, numel = {}, {}, {}
    for pname, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = canonical_name(pname)
        numel[key] = p.numel()
        if p.grad is not None and p.numel() > FULL_GRADIENT_LIMIT:
            fingerprints[key] = fingerprint(key, p.grad)
        else:
            grads[key] = _value(p.grad)
    # Per-rollout statistics (PPO's value and return means, SegmentRFT's segment counts) travel in
    # ``batch.metrics`` and are logged with the step; wall-clock timings are not golden.
    metrics = {**{k: v for k, v in batch.metrics.items() if not k.startswith("timing/")}, **metrics}
    return {
        "loss": float(loss.detach()),
        "metrics": {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in metrics.items()},
        "annotations": {f: _value(getattr(rollout, f)) for f in ANNOTATIONS},
        "seq_extras": {k: _value(getattr(rollout, f"segment_{k}")) for k in SEGMENT_FIELDS
                       if getattr(rollout, f"segment_{k}") is not None},
        "grads": grads,
        "fingerprints": fingerprints,
        "grad_numel": numel,
    }
