"""Typed option groups of the algorithms: one vocabulary for GRPO, DAPO, PPO, SegmentRFT and yours.

Each group is a frozen dataclass whose fields are checked at construction; an invalid value raises
an error naming the group and the field (``clip.eps_high=-1 is invalid: must be >= clip.eps_low``).
In Python a group is given as the dataclass or as a mapping of its fields
(``GRPO(clip={"eps_high": 0.28})``); in YAML as a mapping (``clip: {eps_high: 0.28}``);
on the command line field by field (``--model.init_args.clip.eps_high 0.28``).
``rftlab fit --model.help rftlab.GRPO`` lists every field with its type and the allowed values of
each ``Literal`` choice.

The policy group is ``rftlab.models.PolicySpec`` and the forward group ``rftlab.models.ForwardOptions``
(they are also what export and generation build the network from).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from rftlab.core.correction import CORRECTION_DEFAULTS, check_correction_options
from rftlab.core.options import OptionGroup, as_group
from rftlab.core.segments import SEGMENT_RATIO_MODES, SegmentRewardParams

@dataclass(frozen=True)
class ClipOptions(OptionGroup):
    """Clipping of the policy ratio (PPO, Schulman et al. 2017, eq. 7; DAPO's clip-higher; dual clip).

    Attributes:
        eps_low: lower clip range: the ratio is kept >= 1 - eps_low.
        eps_high: upper clip range: the ratio is kept <= 1 + eps_high; above eps_low is DAPO's
            clip-higher (arXiv 2503.14476, sec. 3.1).
        dual_clip: dual-clip constant c > 1 bounding the loss of negative advantages (Ye et al.
            2020, arXiv 1912.09729); None disables it.
    """

    group: ClassVar[str] = "clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None

    def validate(self) -> None:
        self.require(0 <= self.eps_low < 1, "eps_low", "in [0, 1) (the ratio's lower bound 1 - eps_low stays > 0)")
        self.require(self.eps_high >= self.eps_low, "eps_high", f">= clip.eps_low ({self.eps_low})")
        self.require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "None or > 1")


@dataclass(frozen=True)
class KLOptions(OptionGroup):
    """The KL to the reference policy (its coefficient is the top-level ``beta``).

    Attributes:
        estimator: per-token estimator: "k1", "k2", "k3" (Schulman, "Approximating KL divergence",
            2020) or a name registered in ``rftlab.core.KL_ESTIMATORS``; SegmentRFT also takes
            "exact" (summed over the vocabulary).
        in_reward: put ``beta * k1`` per token into the reward (classic RLHF PPO, Ziegler et al.
            2019, eq. 2; REINFORCE++) instead of a loss term; for advantage estimators that take the
            KL ("gae", "reinforce_pp", "reinforce_pp_baseline").
        target: adapt the coefficient towards this KL per sequence (Ziegler et al. 2019, sec. 2.2;
            starts from ``beta``); None keeps ``beta`` fixed; PPO only.
        horizon: horizon of the adaptive controller, in sequences.
        log_every: with beta 0 (no KL term, no reference forward), still log ``kl`` every n steps
            (two extra no-grad forwards on those steps); needs a reference: LoRA (the adapter switched
            off) or beta > 0. "auto": every 10 steps when the reference is free (LoRA), else never
            (full fine-tuning keeps no copy of the start policy at beta 0; the run says so). None never.
    """

    group: ClassVar[str] = "kl"
    estimator: str = "k3"
    in_reward: bool = False
    target: float | None = None
    horizon: int = 10_000
    log_every: int | Literal["auto"] | None = "auto"

    #: Steps between KL logs of ``log_every="auto"`` when a reference is free.
    AUTO_LOG_EVERY: ClassVar[int] = 10

    def validate(self) -> None:
        self.require(self.target is None or self.target > 0, "target", "None or > 0")
        self.require(self.horizon >= 1, "horizon", ">= 1")
        self.require(self.log_every in ("auto", None) or (isinstance(self.log_every, int) and self.log_every >= 1),
                     "log_every", "'auto', an integer >= 1 or None")

    def monitor_every(self, has_reference: bool) -> int | None:
        """Steps between KL logs at beta 0 (None: never), ``log_every`` with "auto" resolved.

        Args:
            has_reference: whether a reference policy is kept (LoRA, or beta > 0).
        """
        if self.log_every == "auto":
            return self.AUTO_LOG_EVERY if has_reference else None
        return self.log_every

    def check_for(self, algorithm: str, estimators: list[str], in_reward_supported: bool, has_reference: bool,
                  target_supported: bool = False) -> None:
        """Checks that need the algorithm: its estimators, whether it puts the KL in the reward, a reference.

        Args:
            algorithm: the algorithm's class name, for messages.
            estimators: the estimator names it accepts.
            in_reward_supported: whether ``in_reward`` means something to it (GRPO's family, PPO).
            has_reference: whether a reference policy is kept (LoRA, or beta > 0).
            target_supported: whether ``target`` (the adaptive coefficient) means something to it (PPO).
        """
        self.require(self.estimator in estimators, "estimator", f"one of {', '.join(estimators)}")
        for name, default, supported, owner in (("in_reward", False, in_reward_supported, "GRPO's and PPO's"),
                                                ("target", None, target_supported, "PPO's")):
            self.require(supported or getattr(self, name) == default, name,
                         f"{default!r} for {algorithm} ({owner} option)")
        self.require(self.log_every in ("auto", None) or has_reference, "log_every",
                     "None for full fine-tuning with beta=0 (no reference model is kept: use lora=True or beta > 0)")


@dataclass(frozen=True)
class OptimOptions(OptionGroup):
    """Optimisation (the learning rate is the top-level ``lr``).

    Attributes:
        optimizer: "adamw" (torch), "adamw8bit" (bitsandbytes 8-bit state, CPU or GPU), the paged
            variants "paged_adamw", "paged_adamw8bit", "paged_adamw32bit" (CUDA only), or a name you
            registered in ``rftlab.models.optim.OPTIMIZERS``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps (then constant).
        max_grad_norm: gradient clipping norm (used unless the Trainer sets gradient_clip_val); 0 disables.
        max_nonfinite_steps: stop with ``NonFiniteTrainingError`` (after saving a checkpoint) when
            this many optimizer steps in a row had a non-finite loss or gradient; each such step is
            skipped and counted in ``faults/nonfinite_steps``. None never stops.
    """

    group: ClassVar[str] = "optim"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int | None = 5

    def validate(self) -> None:
        self.require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.require(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        self.require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)")
        self.require(self.max_nonfinite_steps is None or self.max_nonfinite_steps >= 1, "max_nonfinite_steps",
                     ">= 1 or None")


@dataclass(frozen=True)
class LogOptions(OptionGroup):
    """What is logged and evaluated, and when.

    Attributes:
        every_n_steps: overrides the Trainer's ``log_every_n_steps`` (its default 50 suits
            supervised training, not RL steps that take seconds); None keeps the Trainer's.
        validate_at_start: evaluate the held-out split before the first step (logged at step 0).
        default_callbacks: add the registered default callbacks the Trainer lacks (training clock,
            sample table, W&B layout, atomic checkpoint writes; ``rftlab.core.plugins.DEFAULT_CALLBACKS``).
    """

    group: ClassVar[str] = "log"
    every_n_steps: int | None = 1
    validate_at_start: bool = True
    default_callbacks: bool = True

    def validate(self) -> None:
        self.require(self.every_n_steps is None or self.every_n_steps >= 1, "every_n_steps", ">= 1 or None")


@dataclass(frozen=True)
class CriticOptions(OptionGroup):
    """The learned critic (value head) of PPO and SegmentRFT.

    Attributes:
        kind: "shared" (value head on the policy's trunk: one model in memory, the value loss also
            trains the trunk), "adapter" (own LoRA adapter on the policy's base; needs ``lora``) or
            "model" (a separate model built like the policy: own weights, own LoRA with ``lora``).
        model: for kind "model": the critic's base model ("default", "tiny", a folder or a hub id);
            None uses the policy's. Its tokenizer must equal the policy's.
        lr: learning rate of the value head and critic weights; None uses ``lr``.
        vf_coef: >= 0, weight of the value loss.
        value_clip: clip range of ``V - V_old`` in the value loss; 0 disables value clipping.
        head_init_scale: >= 0, scale of the value head's initial weights (see ``ValueHead``).
        warmup_steps: first optimizer steps that train only the critic (the policy, and a shared
            trunk, stay unchanged), so values are useful before the policy moves.
        whiten_advantages: whiten the advantages over the rollout's real tokens (PPO) or the
            minibatch's real segments (SegmentRFT).
    """

    group: ClassVar[str] = "critic"
    kind: Literal["shared", "adapter", "model"] = "shared"
    model: str | None = None
    lr: float | None = None
    vf_coef: float = 0.1
    value_clip: float = 0.2
    head_init_scale: float = 0.01
    warmup_steps: int = 0
    whiten_advantages: bool = True

    def validate(self) -> None:
        self.require(self.model is None or self.kind == "model", "model", "None unless critic.kind='model'")
        self.require(self.lr is None or self.lr > 0, "lr", "None or > 0")
        self.require(self.vf_coef >= 0, "vf_coef", ">= 0")
        self.require(self.value_clip >= 0, "value_clip", ">= 0 (0 disables value clipping)")
        self.require(self.head_init_scale >= 0, "head_init_scale", ">= 0")
        self.require(self.warmup_steps >= 0, "warmup_steps", ">= 0")


@dataclass(frozen=True)
class AdvantageSpec(OptionGroup):
    """Which advantage estimator, and its options; an unset (None) name is the algorithm's own.

    Attributes:
        name: a name registered in ``rftlab.core.ADVANTAGE_ESTIMATORS`` ("grpo", "dr_grpo", "gae",
            or yours, registered with ``rftlab.core.register_advantage``); None: the algorithm's
            default ("grpo" for GRPO and DAPO, "gae" for PPO).
        options: the estimator's keyword options (e.g. ``{"scale": "batch"}`` for "grpo",
            ``{"lam": 0.9}`` for "gae"), checked against its signature when the algorithm is built.
    """

    group: ClassVar[str] = "advantage"
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CorrectionOptions(OptionGroup):
    """Rollout correction: reweight each token by how far the trainer's policy is from the sampler's.

    When the sampler's log-probs differ from the trainer's (a bfloat16 sampling copy, another
    engine), the rollout is slightly off-policy. With ``d = old_logp - sampler_logp`` per token,
    each token's advantage is multiplied by a no-grad weight of ``exp(d)``, truncated or masked
    (``rftlab.core.correction``); the gap itself is logged whenever the sampler reports log-probs.

    Attributes:
        mode: "none" (log the gap only), "token_truncate" (truncated importance sampling),
            "token_mask" (masked importance sampling), "sequence_truncate", "sequence_mask",
            "icepop" (two-sided token mask), or a name registered in
            ``rftlab.core.ROLLOUT_CORRECTIONS``.
        cap: > 0, the truncation (or masking) threshold of the truncate and mask modes.
        low: in (0, 1], IcePop's lower bound on the token ratio.
        high: >= 1, IcePop's upper bound on the token ratio.
    """

    group: ClassVar[str] = "loss.correction"
    mode: str = "none"
    cap: float = CORRECTION_DEFAULTS["cap"]
    low: float = CORRECTION_DEFAULTS["low"]
    high: float = CORRECTION_DEFAULTS["high"]

    def validate(self) -> None:
        check_correction_options(self.mode, self.cap, self.low, self.high, where=self.group)


@dataclass(frozen=True)
class LossSpec(OptionGroup):
    """Which policy loss, how it is aggregated, and the terms around it; unset (None) fields are the algorithm's.

    Entropy masking and rollout correction act on the per-token advantages (a token's advantage is
    multiplied by its 0/1 mask or its weight), which scales each token's loss term exactly for
    every loss linear in the advantage (all the built-ins); the KL term is left as it is.

    Attributes:
        name: a name registered in ``rftlab.core.POLICY_LOSSES`` ("ppo_clip", "gspo",
            "gspo_token", "cispo", "sapo", "gmpo", or yours, registered with
            ``rftlab.core.register_policy_loss``); None: "ppo_clip".
        agg: aggregation over tokens of the policy loss and the KL term: "seq-mean-token-mean"
            (GRPO), "token-mean" (DAPO, PPO), "seq-mean-token-sum", "seq-mean-token-sum-norm"
            (Dr. GRPO), or a name registered in ``rftlab.core.AGGREGATIONS``; None: the algorithm's.
        mask_truncated: truncated completions (no EOS) carry no loss (DAPO's overlong filtering);
            None: False.
        entropy_coef: >= 0, weight of an entropy bonus (0: entropy is only logged); the starting
            value when ``entropy_target`` is set; None: 0.
        entropy_target: adapt the entropy coefficient after every step so the policy's mean token
            entropy tracks this value, and apply the bonus only while the entropy is at or below it
            (Skywork-OR1's adaptive entropy control, arXiv 2505.22312, sec. 3.3); None: fixed.
        entropy_step: > 0, the coefficient's change per step when adapting; None: 1e-4 (Skywork-OR1's
            released scripts, with target 0.2 and the coefficient bounded by 0.005).
        entropy_max_coef: upper bound of the adapted coefficient; None: no bound.
        top_entropy_quantile: in (0, 1], train only on this top fraction of the batch's tokens by
            entropy (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939, keep 0.2);
            None: 1.0, every token.
        correction: rollout correction (``CorrectionOptions``); None: mode "none".
        options: the loss's own keyword options, checked against its signature.
    """

    group: ClassVar[str] = "loss"
    name: str | None = None
    agg: str | None = None
    mask_truncated: bool | None = None
    entropy_coef: float | None = None
    entropy_target: float | None = None
    entropy_step: float | None = None
    entropy_max_coef: float | None = None
    top_entropy_quantile: float | None = None
    correction: CorrectionOptions | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.correction, Mapping):  # errors name "loss.correction.<field>"
            object.__setattr__(self, "correction", as_group(self.correction, CorrectionOptions))
        super().__post_init__()

    def validate(self) -> None:
        self.require(self.entropy_coef is None or self.entropy_coef >= 0, "entropy_coef", ">= 0")
        self.require(self.entropy_target is None or self.entropy_target >= 0, "entropy_target", "None or >= 0")
        self.require(self.entropy_step is None or self.entropy_step > 0, "entropy_step", "None or > 0")
        self.require(self.entropy_max_coef is None or self.entropy_max_coef >= 0, "entropy_max_coef", "None or >= 0")
        self.require(self.top_entropy_quantile is None or 0 < self.top_entropy_quantile <= 1,
                     "top_entropy_quantile", "None or in (0, 1] (the kept fraction of tokens)")


#: What unset fields of an algorithm's own default specs mean.
SPEC_FALLBACKS = {AdvantageSpec: AdvantageSpec(name="grpo"),
                  LossSpec: LossSpec(name="ppo_clip", agg="seq-mean-token-mean", mask_truncated=False, entropy_coef=0.0,
                                     entropy_step=1e-4, top_entropy_quantile=1.0, correction=CorrectionOptions())}


def resolve_spec(value: Any, default: Any, cls: type) -> Any:
    """The complete ``AdvantageSpec``/``LossSpec`` an algorithm runs with.

    ``value`` is a registered name (the algorithm's default spec with that name), a spec or a
    mapping of its fields; fields left unset (None) take the algorithm's default spec's values,
    then ``SPEC_FALLBACKS``. The default's options carry over only to the same piece.

    Args:
        value: the argument given.
        default: the algorithm's default spec (its signature's default).
        cls: ``AdvantageSpec`` or ``LossSpec``.
    """
    spec = cls(name=value) if isinstance(value, str) else as_group(value, cls, cls.group)
    for base in (default, SPEC_FALLBACKS[cls]):
        same_piece = spec.name is None or spec.name == base.name
        changes = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)
                   if f.name != "options" and getattr(spec, f.name) is None}
        if same_piece and not spec.options:
            changes["options"] = dict(base.options)
        spec = dataclasses.replace(spec, **changes)
    return spec


@dataclass(frozen=True)
class OverlongOptions(OptionGroup):
    """DAPO's overlong reward shaping (arXiv 2503.14476, sec. 3.4, eq. 13).

    Attributes:
        buffer_len: length of the soft-penalty window (DAPO's L_cache) in tokens; 0 disables it.
        max_len: the hard length L_max; None uses the DataModule's ``max_new_tokens``.
        penalty_factor: scale of the penalty added to the reward (1.0 in the paper).
    """

    group: ClassVar[str] = "overlong"
    buffer_len: int = 0
    max_len: int | None = None
    penalty_factor: float = 1.0

    def validate(self) -> None:
        self.require(self.buffer_len >= 0, "buffer_len", ">= 0 (0 disables)")
        self.require(self.max_len is None or self.buffer_len < self.max_len, "buffer_len",
                     f"< overlong.max_len ({self.max_len})")
        self.require(self.penalty_factor >= 0, "penalty_factor", ">= 0")


@dataclass(frozen=True)
class SegmentOptions(OptionGroup):
    """SegmentRFT's segments: discounting, the ratio, pi_rollout's schedule and the segment rewards.

    Attributes:
        gamma: discount between segments, in [0, 1].
        td_lambda: lambda-return weight in [0, 1]: 0 is the one-step TD target (the answer's reward
            reaches a thought segment only through the critic), 1 the Monte-Carlo return.
        ratio_mode: "sum" (exp of the summed token log-ratios), "mean" (length-normalised,
            GSPO-style) or "token" (per-token ratios carrying the segment's advantage), or a name
            registered in ``rftlab.core.SEGMENT_RATIO_MODES``.
        rollout_sync_every: re-sync pi_rollout (the sampling snapshot) to pi_theta every this many
            rollouts (>= 1; 1 is on-policy).
        rewards: the segment-reward hyper-parameters (``rftlab.core.SegmentRewardParams``).
    """

    group: ClassVar[str] = "segments"
    gamma: float = 1.0
    td_lambda: float = 0.0
    ratio_mode: str = "sum"
    rollout_sync_every: int = 1
    rewards: SegmentRewardParams = field(default_factory=SegmentRewardParams)

    def __post_init__(self) -> None:
        if isinstance(self.rewards, Mapping):  # errors name "segments.rewards.<field>"
            object.__setattr__(self, "rewards", as_group(self.rewards, SegmentRewardParams))
        super().__post_init__()

    def validate(self) -> None:
        self.require(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]")
        self.require(0.0 <= self.td_lambda <= 1.0, "td_lambda", "in [0, 1]")
        self.require(self.ratio_mode in SEGMENT_RATIO_MODES, "ratio_mode",
                     f"one of {', '.join(SEGMENT_RATIO_MODES.names())}")
        self.require(self.rollout_sync_every >= 1, "rollout_sync_every", "an integer >= 1")
